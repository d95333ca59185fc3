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

from dsgraph.dtypes import to_torch
from dsgraph.errors import InputError
from dsgraph.interpreter import load_param
from dsgraph.ops.registry import get_op
from dsgraph.symbolic import Sym, eval_dim, parse_dim

from .base import Backend, CompiledGraph, KernelChoice, register_backend

MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")

# Ops whose references split the work on values read back to the host (per-expert loops over `.tolist()` counts).
# Traced, every new routing pattern is a recompile: the bench's torch.compile row of a 256-expert V3 MoE layer had
# not finished after 5 minutes on an H100. They run eagerly between the compiled regions (torch.compiler.disable),
# reported as fallbacks; everything around them is compiled.
EAGER_OPS = {"moe.experts": "per-expert loop over host-side token counts",
             "moe.grouped_gemm": "per-expert loop over host-side row offsets"}


class GraphFunction:
    """The graph as a plain function inputs -> outputs over each op's torch reference."""

    def __init__(self, graph, weights, device):
        self.graph = graph
        self.params = {n: load_param(v, weights, torch.device(device)) for n, v in graph.params().items() if v.users}
        self.feeds = [n for n, v in graph.inputs.items() if v.kind != "param"]
        self.symbols = {}
        for n in self.feeds:
            for axis, d in enumerate(graph.inputs[n].type.shape):
                if isinstance(d, Sym) and len(d.terms) == 1 and list(d.terms.values()) == [1] \
                        and len(next(iter(d.terms))) == 1:
                    self.symbols.setdefault(str(d), (n, axis))
        self.plan = []
        eager = {op: torch.compiler.disable(get_op(op).reference_fn) for op in EAGER_OPS}
        for node in graph.nodes:
            opdef = node.opdef
            self.plan.append((eager.get(node.op, opdef.reference_fn), [v.name for v in node.inputs],
                              dict(node.attrs), opdef.shape_attrs, [v.name for v in node.outputs],
                              [to_torch(v.type.dtype) for v in node.outputs]))
        self.outputs = {k: v.name for k, v in graph.outputs.items()}

    def __call__(self, inputs: dict) -> dict:
        vals = dict(self.params)
        for n in self.feeds:
            vals[n] = inputs[n]
        env = {s: vals[n].shape[axis] for s, (n, axis) in self.symbols.items()}
        for fn, ins, attrs, shape_attrs, outs, dtypes in self.plan:
            if shape_attrs:
                attrs = dict(attrs)
                for key in shape_attrs:
                    attrs[key] = tuple(eval_dim(parse_dim(d), env) for d in attrs[key])
            out = fn(*[vals[i] for i in ins], **attrs)
            out = out if isinstance(out, (tuple, list)) else (out,)
            for name, t, dt in zip(outs, out, dtypes):
                vals[name] = t if t.dtype == dt else t.to(dt)
        return {k: vals[v] for k, v in self.outputs.items()}


class TorchCompileBackend(Backend):
    name = "torch_compile"

    @property
    def default_passes(self):
        """The passes package's "torch_compile" pipeline (absorbed MLA, grouped MoE, cleanups), so the comparison runs
        the same graph as triton and tvm; without the package the graph compiles as written (the report's pass
        list is then empty)."""
        try:
            from dsgraph.passes import default_pipeline
        except ImportError:
            return "none"
        return default_pipeline("torch_compile")

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
            missing = [n for n in fn.feeds if n not in inputs]
            if missing:
                raise InputError(f"graph {graph.name} needs inputs {missing}; got {sorted(inputs)}")
            if not state["first"]:
                return compiled(inputs)
            state["first"] = False
            before = _break_count()
            out = compiled(inputs)
            _note_graph_breaks(graph, report, before)
            return out

        return CompiledGraph(graph, run, report)


def _break_count() -> int | None:
    try:
        from torch._dynamo.utils import graph_break_reasons
        return len(graph_break_reasons)
    except ImportError:
        return None


def _note_graph_breaks(graph, report, before: int | None) -> None:
    """Name the ops whose references broke the Dynamo graph (from dynamo's graph-break records)."""
    if before is None:
        report.notes.append("graph breaks: unknown (torch._dynamo.utils.graph_break_reasons is not available)")
        return
    from torch._dynamo.utils import graph_break_reasons
    new = [r for r in graph_break_reasons[before:] if "disable" not in r.reason]  # EAGER_OPS: reported already
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
