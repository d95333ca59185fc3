"""The `torch_compile` comparison backend: torch.compile of the eager graph's execution.

The graph runs as one Python function over the ops' torch references (the same code
the eager oracle runs, with weights bound as constants), and that function is handed
to `torch.compile`. It answers "what does PyTorch's own compiler make of this graph
without dsgraph's kernels", so the bench can put it beside triton and tvm. By default
the graph is first rewritten by the shared "torch_compile" pass pipeline (absorbed
MLA, grouped MoE), as for the other backends; `passes="none"` compiles the model's
graph exactly as eager runs it.

Options: `mode` = "default" (the default), "reduce-overhead" (CUDA graphs),
"max-autotune-no-cudagraphs" or "max-autotune"; `compiler` = the torch.compile backend
("inductor", or "aot_eager" to test capture without code generation); `dynamic`.
Compilation happens at the first call for each new input shape. The MoE expert loops
(`EAGER_OPS`: per-expert work split on counts read back to the host) run eagerly between
compiled regions and are reported as fallbacks; any other op whose reference breaks the
Dynamo graph is named in the compile report's notes after that first call.
"""
from __future__ import annotations

import dis
import shutil

import torch

from dsgraph.errors import InputError
from dsgraph.interpreter import Interpreter, Step, reference_fn
from dsgraph.ops.registry import get_op
from dsgraph.symbolic import Sym

from .base import Backend, CompiledGraph, KernelChoice, register_backend

MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")

# Ops whose references split the work on values read back to the host (per-expert loops over `.tolist()` counts).
# Traced, every new routing pattern is a recompile: the bench's torch.compile row of a 256-expert V3 MoE layer had
# not finished after 5 minutes on an H100. They run eagerly between the compiled regions (torch.compiler.disable),
# reported as fallbacks; everything around them is compiled.
EAGER_OPS = {"moe.experts": "per-expert loop over host-side token counts",
             "moe.grouped_gemm": "per-expert loop over host-side row offsets"}


class GraphFunction(Interpreter):
    """The graph as one plain function inputs -> outputs over each op's torch reference, for torch.compile to
    trace. The executor base gives the steps (EAGER_OPS' references wrapped in `torch.compiler.disable`), the
    params and the input check (`check_inputs`, run by the caller outside the compiled function); only the hot
    loop is its own, kept free of what Dynamo would guard on or break at: no symbol binding from tensors, no
    output checks, no try/except, no freeing (Inductor plans the buffers)."""

    def __init__(self, graph, weights, device):
        super().__init__(graph, weights, device)
        self._consts_now = self.consts  # now: loading inside the traced call would trace the weight casts
        self._feeds = [(id(v), n) for n, v in self.runtime_inputs.items()]
        self._symbols = {}  # symbol -> (input, axis) of a dim that is the bare symbol
        for n, v in self.runtime_inputs.items():
            for axis, d in enumerate(v.type.shape):
                if isinstance(d, Sym) and len(d.terms) == 1 and list(d.terms.values()) == [1] \
                        and len(next(iter(d.terms))) == 1:
                    self._symbols.setdefault(str(d), (n, axis))
        self._plan = [(s.fn, [id(v) for v in s.inputs], [id(v) for v in s.outputs]) for s in self.steps]
        self._outputs = [(k, id(v)) for k, v in graph.outputs.items()]

    def node_step(self, node) -> Step:
        step = super().node_step(node)
        if node.op in EAGER_OPS:
            step.fn = reference_fn(node, torch.compiler.disable(get_op(node.op).reference_fn))
        return step

    def __call__(self, inputs: dict) -> dict:
        vals = dict(self._consts_now)
        for key, name in self._feeds:
            vals[key] = inputs[name]
        sym = {s: inputs[n].shape[axis] for s, (n, axis) in self._symbols.items()}
        for fn, ins, outs in self._plan:
            for key, t in zip(outs, fn([vals[k] for k in ins], sym)):
                vals[key] = t
        return {name: vals[key] for name, key in self._outputs}


class TorchCompileBackend(Backend):
    name = "torch_compile"

    # absorbed MLA, grouped MoE and cleanups, so the comparison runs the same graph as triton and tvm
    pipeline = ("cse", "fold_constants", "absorb_mla", "group_moe", "dce")

    def available(self, device: str) -> str | None:
        if not str(device).startswith("cuda") and not (shutil.which("g++") or shutil.which("c++")
                                                         or shutil.which("clang++")):
            return "torch.compile (inductor) on CPU needs a C++ compiler; install g++"
        return None

    def compile_graph(self, graph, weights, device, report, mode: str = "default", compiler: str = "inductor",
                      dynamic: bool | None = None, **options):
        if options:
            raise InputError(f"torch_compile backend: unknown options {sorted(options)}; "
                             "it takes mode, compiler, dynamic")
        if mode not in MODES:
            raise InputError(f"torch_compile mode {mode!r} is not one of {MODES}")
        if mode == "reduce-overhead" and not str(device).startswith("cuda"):
            raise InputError("torch_compile mode 'reduce-overhead' uses CUDA graphs; on CPU use mode='default'")
        fn = GraphFunction(graph, weights, device)
        kwargs = {"backend": compiler, "dynamic": dynamic, "fullgraph": False}
        if compiler == "inductor":
            kwargs["mode"] = mode
        compiled = torch.compile(fn, **kwargs)
        kernel = f"torch.compile({compiler}{', mode=' + mode if compiler == 'inductor' else ''})"
        for node in graph.nodes:
            names = tuple(v.name for v in node.outputs)
            if node.op in EAGER_OPS:
                report.kernels.append(KernelChoice(names, node.op, "fallback", "torch reference, run eagerly "
                                                   "(torch.compiler.disable)", EAGER_OPS[node.op]))
            else:
                report.kernels.append(KernelChoice(names, node.op, "generated", kernel))
        report.notes.append(f"{kernel} of the eager graph; code is generated at the first call per input shape")
        state = {"first": True}

        def run(inputs):
            fn.check_inputs(inputs)
            if not state["first"]:
                return compiled(inputs)
            state["first"] = False
            before = _break_count()
            out = compiled(inputs)
            _note_graph_breaks(graph, report, before)
            return out

        return CompiledGraph(graph, run, report)


def _graph_break_reasons() -> list | None:
    """Dynamo's running record of graph breaks; None where this torch version has no such record."""
    try:
        from torch._dynamo.utils import graph_break_reasons  # torch.compile's internals: loaded once compiling
    except ImportError:
        return None
    return graph_break_reasons


def _break_count() -> int | None:
    reasons = _graph_break_reasons()
    return None if reasons is None else len(reasons)


def _note_graph_breaks(graph, report, before: int | None) -> None:
    """Name the ops whose references broke the Dynamo graph (from dynamo's graph-break records)."""
    if before is None:
        report.notes.append("graph breaks: unknown (torch._dynamo.utils.graph_break_reasons is not available)")
        return
    new = [r for r in _graph_break_reasons()[before:] if "disable" not in r.reason]  # EAGER_OPS: reported already
    spans = _reference_spans(graph)
    found: dict[str, str] = {}
    for reason in new:
        op = next((op for fr in reversed(reason.user_stack or []) for op, (f, lo, hi) in spans.items()
                   if fr.filename == f and lo <= (fr.lineno or 0) <= hi), None)
        found.setdefault(op or "(outside op references)", reason.reason.splitlines()[0][:160])
    if not found:
        eager = sorted({k.op for k in report.kernels if k.op in EAGER_OPS})
        report.notes.append(f"graph breaks: only around {', '.join(eager)} (run eagerly)" if eager
                            else "graph breaks: none (one graph per call)")
        return
    for op, why in sorted(found.items()):
        report.notes.append(f"graph break in {op}: {why}")
    for k in report.kernels:
        if k.op in found:
            k.note = "breaks the torch.compile graph (runs between compiled regions)"


def _reference_spans(graph) -> dict[str, tuple[str, int, int]]:
    spans = {}
    for op in {n.op for n in graph.nodes}:
        code = get_op(op).reference_fn.__code__
        lines = [ln for _, ln in dis.findlinestarts(code) if ln]
        spans[op] = (code.co_filename, code.co_firstlineno, max(lines, default=code.co_firstlineno))
    return spans


register_backend("torch_compile", TorchCompileBackend)
