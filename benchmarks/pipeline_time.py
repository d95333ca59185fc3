"""Wall time of a backend's default pass pipeline on a full-size graph (no weights are allocated).

    python benchmarks/pipeline_time.py deepseek-v3 --backend triton
"""
from __future__ import annotations

import argparse
import time

import dsgraph.models as models
import dsgraph.passes as passes
from dsgraph.backends import get_backend


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default="deepseek-v3")
    ap.add_argument("--backend", default="triton")
    args = ap.parse_args()
    t0 = time.perf_counter()
    model = models.build_model(args.model, weights=False)
    built = time.perf_counter() - t0
    t0 = time.perf_counter()
    _, _, records = passes.run_pipeline(model.graph, model.weights,
                                        get_backend(args.backend).default_pipeline(), out=lambda *a: None)
    total = time.perf_counter() - t0
    print(f"{args.model}: {len(model.graph.nodes)} nodes built in {built:.1f} s; {args.backend} default pipeline "
          f"{total:.1f} s: " + " ".join(f"{r.name}={r.seconds:.1f}" for r in records))


if __name__ == "__main__":
    main()
