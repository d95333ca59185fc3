"""The Triton backend: passes, then every node (or fused region) lowered through a registry to generated
Triton source, a kernel template, a named library call, or a reported torch fallback.

    compiled = get_backend("triton").compile(graph, weights, device="cpu", emit_dir="kernels/")
    print(compiled.report)       # one line per node: generated | template | library | fallback

Importing this package does not import triton: on the CPU the backend switches Triton's interpreter on first
(TRITON_INTERPRET=1 must precede the triton import), see runtime.py. Options of `compile`:
  passes         pipeline run before lowering: None (default; dsgraph.compile has run `pipeline`
                 already), "default" (the triton pipeline), or a list of pass names
  emit_dir       write every generated kernel's source there
  fp8_act_quant  force FP8 activation quantisation on/off (default: on for GPUs with fp8 tensor cores)
  decode_graphs  replay one-token decode steps from CUDA graphs (default: on for CUDA where the graph allows,
                 decode_graphs.py; also the paged decode steps of a serving engine, paged_decode.py, per batch
                 bucket); the report says which
  gemv           dense projections of <= 4 rows through the `gemv` template instead of cuBLAS (default: on
                 for CUDA, off on the interpreter; benchmarks/gemv_gpu.py compares the two)
"""
from __future__ import annotations

from pathlib import Path

from dsgraph.errors import ArtifactError

from ..base import Backend, CompiledGraph, CompileReport, register_backend
from . import artifact, paged_decode
from . import decode_graphs as dg
from .runtime import prepare, unavailable_reason


class TritonBackend(Backend):
    name = "triton"
    grows_caches_in_place = True

    # hand-tuned templates: absorbed-MLA decode over the latent cache, grouped-GEMM MoE with fused routing,
    # fused add+RMSNorm, SwiGLU over one gate|up GEMM, the FP8 block GEMM, absorbed MLA's cache row (written into
    # the cache) and query. The lowerings take the fused forms only (group_moe, fuse_swiglu, fuse_fp8_linear and
    # fuse_mla_rows make them). `dsgraph.compile` runs it before `compile_graph`, so
    # the Executable sees the graph (and cache layout) the kernels were built for.
    pipeline = ("cse", "fold_constants", "absorb_mla", "merge_qkv_a", "fuse_mla_rows", "merge_qkv", "fuse_router",
                "group_moe", "fuse_add_rmsnorm", "fuse_swiglu", "fuse_fp8_linear", "dce")

    def available(self, device: str) -> str | None:
        return unavailable_reason(device)

    def compile_graph(self, graph, weights, device, report, passes=None, emit_dir=None, decode_graphs=None,
                      **options) -> CompiledGraph:
        """Lower `graph` (after `passes`: None/"none" when the caller already ran them, as dsgraph.compile does;
        "default" for the triton pipeline; or a list of names) and bind `weights` on `device`."""
        note = prepare(device)
        if note:
            report.notes.append(note)
        graph, weights = self.run_passes(graph, weights, passes, report)
        from .compiler import lower_graph  # imports triton: only after `prepare`
        program = lower_graph(graph, weights, device, report, {**options, "emit_dir": emit_dir})
        compiled = CompiledGraph(graph, program, report, records=True)
        compiled.sources = program.sources
        compiled.decode_step = self._decode_graphs(graph, program, device, report, decode_graphs)
        compiled.paged_decode = self._paged_decode(graph, weights, device, report, program,
                                                   {**options, "emit_dir": None}, decode_graphs)
        return compiled

    @staticmethod
    def _paged_decode(graph, weights, device, report, program, options, wanted_graphs):
        """The paged decode runner a serving engine uses (lowered on first use, sharing the program's weights)
        where the graph allows, else None; the report says which."""
        why = paged_decode.unsupported_reason(graph)
        if why:
            report.notes.append(f"no paged decode program (a serving engine gathers contiguous caches): {why}")
            return None
        capture = str(device).startswith("cuda") and wanted_graphs is not False

        def build():
            from .compiler import lower_graph  # imports triton: only after `prepare`
            sub = CompileReport("triton", device, report.dtype)
            paged = lower_graph(graph, weights, device, sub, {**options, "paged": True}, consts=program.consts)
            cache_ops = sorted({k.kernel for k in sub.kernels if k.op == "cache.append" or "attention" in k.op
                                or k.op.startswith("indexer.logits")})
            report.notes.append(f"paged decode program lowered: {'; '.join(cache_ops)}")
            return paged
        return paged_decode.PagedDecode(build, capture, report)

    @staticmethod
    def _decode_graphs(graph, program, device, report, wanted):
        """The CUDA-graph decode runner where it applies (decode_graphs None: wherever it can), else None; the
        report says which."""
        on_cuda = str(device).startswith("cuda")
        if wanted is False or (wanted is None and not on_cuda):
            return None
        why = ("CUDA graphs need a CUDA device" if not on_cuda else
               "the graph has no KV cache" if not graph.cache_map else dg.unsupported_reason(graph))
        if why:
            report.notes.append(f"decode steps run without CUDA graphs: {why}")
            return None
        states = dg.fixed_states(graph)
        report.notes.append("one-token decode steps replay CUDA graphs (static-capacity caches, device-side "
                            "lengths" + (f"; {len(states)} fixed-size state caches copied into static buffers"
                                         if states else "") + "; one graph per batch size and capacity)")
        return dg.DecodeGraphs(program, dict(graph.cache_map), graph.meta.get("max_position_embeddings"),
                               report=report)

    def save_compiled(self, compiled, directory) -> None:
        artifact.save(compiled, Path(directory))

    def load_compiled(self, directory, graph, weights, device, dtype) -> CompiledGraph:
        """Lower again with the artifact's tuned configs (no autotuning); lowering must ask for exactly the
        kernels the artifact holds, each regenerated byte-identical to the artifact's copy (which is never
        imported: the cache gets this process's own text)."""
        listed = artifact.seed_cache(Path(directory))
        compiled = self.compile(graph, weights, device=device, dtype=dtype)
        made = sorted(s.filename for s in compiled.sources)
        if made != sorted(listed):
            raise ArtifactError(f"{directory}: lowering here produced kernels {made}, the artifact holds {listed}; "
                                "it was made by another dsgraph version — recompile it")
        artifact.check_sources(Path(directory), compiled.sources)
        compiled.report.notes.append(f"loaded {len(listed)} generated kernels and tuned configs from the artifact")
        return compiled


register_backend("triton", TritonBackend)
