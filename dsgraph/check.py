"""Compare a backend against eager on one model: logits (prefill and a cached decode
step) and greedy tokens. Used by `dsgraph check`, `dsgraph demo` and the tests."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

TOLERANCE = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 3e-2}
# Whole-model logits of two half-precision implementations drift apart layer after layer (rounding compounds, and a
# near-tied router choice can flip): full-size models' checks allow twice the op tolerance. A wrong kernel is O(1).
MODEL_TOLERANCE = {**TOLERANCE, "float16": 4e-2, "bfloat16": 6e-2}
# FP8 GEMMs in DeepSeek's W8A8 numerics also round activations to e4m3 (3 mantissa bits) per 128-value group: each
# GEMM lands within a few percent of the dequantised-weight reference.
W8A8_TOLERANCE = 8e-2


def tolerance_for(report, dtype: str, model_level: bool = False) -> float:
    """The check tolerance for a compiled graph: by dtype (wider for whole models), W8A8's when the report shows
    an FP8 GEMM quantising activations."""
    tol = (MODEL_TOLERANCE if model_level else TOLERANCE)[dtype]
    if any("w8a8" in k.note for k in report.kernels):
        tol = max(tol, W8A8_TOLERANCE)
    return tol


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    return float((out.double() - ref).norm() / ref.norm().clamp_min(1e-30))


@dataclass
class CheckResult:
    backend: str
    device: str
    dtype: str
    prefill_err: float
    decode_err: float
    tokens: list
    tokens_match: bool
    seconds: float
    compile_seconds: float
    fallbacks: int

    @property
    def ok(self) -> bool:
        tol = TOLERANCE[self.dtype]
        return self.tokens_match and self.prefill_err <= tol and self.decode_err <= tol


def make_prompt(vocab: int, batch: int = 2, length: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def check_backend(model, backend: str, device: str = "cpu", dtype: str = "float32", prompt=None,
                  new_tokens: int = 4, reference=None, **compile_options) -> CheckResult:
    """Compile `model` for `backend` and compare it with eager (fp32 reference)."""
    import dsgraph
    prompt = make_prompt(model.config.vocab_size) if prompt is None else prompt
    ref = reference or dsgraph.compile(model, backend="eager", device="cpu", dtype="float32")
    ref_logits, ref_state = ref.prefill(prompt)
    nxt = ref_logits[:, -1:].argmax(-1)
    ref_dec, _ = ref.decode(nxt, ref_state)
    ref_tokens = ref.generate(prompt, max_new_tokens=new_tokens)

    t0 = time.perf_counter()
    exe = dsgraph.compile(model, backend=backend, device=device, dtype=dtype, **compile_options)
    compile_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    logits, state = exe.prefill(prompt)
    dec, _ = exe.decode(nxt, state)
    tokens = exe.generate(prompt, max_new_tokens=new_tokens)
    secs = time.perf_counter() - t1
    return CheckResult(backend, device, dtype, rel_err(logits.cpu(), ref_logits), rel_err(dec.cpu(), ref_dec),
                       tokens.cpu().tolist(), bool(torch.equal(tokens.cpu(), ref_tokens)), secs, compile_s,
                       len(exe.compiled.report.fallbacks))


@dataclass
class NodeError:
    node: str        # the node, as the printer writes it
    error: float     # relative error of its float outputs, or the fraction of integer outputs that differ
    tolerance: float

    def __str__(self) -> str:
        return f"{self.error:.2e} (tolerance {self.tolerance:.0e})  {self.node}"


def localize(compiled, inputs, tolerance: float | None = None, weights=None) -> list[NodeError]:
    """Replay every node whose outputs the backend materialised through the op's torch reference, fed the
    backend's own inputs; return the nodes whose outputs differ beyond `tolerance`, in graph order.

    Errors do not compound here: each node sees what the backend's kernel saw, so the first entry is the kernel
    that is wrong, not the place where drift became visible. A fused region's unmaterialised intermediates are
    recomputed by the references from the region's materialised inputs, so the region is judged as a whole at
    its outputs (a weight only such a region reads comes from `weights`). Integer outputs (expert ids) count
    the fraction that differ."""
    from .interpreter import load_param, run_node
    from .types import bind_symbols
    graph = compiled.graph
    _, seen = compiled.run(inputs, record=True)
    tolerance = tolerance or TOLERANCE.get(compiled.report.dtype, 1e-4)
    env: dict[str, int] = {}
    for name, v in graph.inputs.items():
        if name in seen:
            bind_symbols(v.type, seen[name], env, f"input %{name}")
    producer = {v.name: (n, i) for n in graph.nodes for i, v in enumerate(n.outputs)}
    replayed: dict[str, torch.Tensor] = {}

    def value(v) -> torch.Tensor:
        """The backend's tensor where it has one, else the reference's recomputation from such tensors."""
        if v.name in seen:
            return seen[v.name]
        if v.name not in replayed and v.name not in producer:  # a param folded into a fused kernel
            if weights is None:
                raise ValueError(f"localize needs `weights` to replay the fused region that reads %{v.name}")
            replayed[v.name] = load_param(v, weights, next(iter(seen.values())).device)
        if v.name not in replayed:
            node, _ = producer[v.name]
            for out, t in zip(node.outputs, run_node(node, [value(a) for a in node.inputs], dict(env))):
                replayed[out.name] = t
        return replayed[v.name]

    bad = []
    for node in graph.nodes:
        if not all(v.name in seen for v in node.outputs):
            continue  # inside a fused region: judged through the region's outputs
        ref = run_node(node, [value(v) for v in node.inputs], dict(env))
        worst = 0.0
        for v, r in zip(node.outputs, ref):
            got = seen[v.name].to(r.device)
            worst = max(worst, rel_err(got, r) if r.is_floating_point() else float((got != r).float().mean()))
        if worst > tolerance:
            bad.append(NodeError(node.format(6), worst, tolerance))
    return bad
