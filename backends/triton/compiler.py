"""Graph -> lowered program: fold weight-only subgraphs, lower every node through the registry, load kernels.

Order of work:
1. Values computed from weights alone (dequant/cast/stack of params) are *constant*: they are evaluated once at
   compile time with the torch references, when some kernel needs them, and listed in the report as folded.
2. Each remaining node, in graph order, goes to the first lowering of `TABLE` that accepts it; a lowering may
   claim a fused region of later nodes. Nodes no lowering accepts run their torch reference, reported as
   `fallback` with the reason.
3. Generated sources (deduplicated by text, headed by every node they implement) are written, imported and
   optionally copied to `emit_dir`; weights are materialised, cast to their param dtype and moved to the device.
"""
from __future__ import annotations

import torch
from dsgraph.passes.weightref import WeightRef, weight_ref

from dsgraph.dtypes import to_torch
from dsgraph.interpreter import Step, load_param, reference_fn, run_node
from dsgraph.ir import Graph, Node, Value
from dsgraph.ops.mlp import dequant_fp8_block
from dsgraph.pattern import Match, P, Roots, match_region
from dsgraph.progress import MIN_NODES, track

from ..base import KernelChoice
from . import decode_graphs, paged_decode
from . import lowering as _lowerings  # noqa: F401  (registers every lowering module)
from .codegen.source import KernelSource, emit, load_kernel
from .lowering.registry import TABLE, Lowered
from .program import Program
from .runtime import interpreting


class LowerCtx:
    """What lowerings see: the graph, the device, constants, generated-kernel registration and region checks."""

    def __init__(self, graph: Graph, weights, device: torch.device, options: dict):
        self.graph = graph
        self.weights = weights
        self.device = device
        self.options = options
        self.interpreting = device.type == "cpu" and interpreting()
        self.index = {id(n): i for i, n in enumerate(graph.nodes)}
        self.claimed: set[int] = set()
        self.sources: dict[str, KernelSource] = {}
        self.notes: list[str] = []
        self.lengths = decode_graphs.length_inputs()  # the static-capacity decode step's optional inputs
        # options["paged"]: lower the paged decode program (pools, block tables; backends/triton/paged_decode.py)
        self.paged = paged_decode.PagedValues(graph, self.lengths["cache_lens"]) if options.get("paged") else None
        self._const_cache: dict[int, torch.Tensor] = {}
        self.const_nodes = self._find_const_nodes()

    # constants ----------------------------------------------------------------------------------
    def _find_const_nodes(self) -> set[int]:
        const: set[int] = {id(v) for v in self.graph.inputs.values() if v.kind == "param"}
        nodes: set[int] = set()
        for n in self.graph.nodes:  # a shape that names a dim symbol (a token count) is known only at run time
            if all(id(v) in const for v in n.inputs) and all(isinstance(d, int) for v in n.outputs
                                                               for d in v.type.shape):
                nodes.add(id(n))
                const.update(id(v) for v in n.outputs)
        self._const_values = const
        return nodes

    def is_const(self, v: Value) -> bool:
        return id(v) in self._const_values

    def const(self, v: Value) -> torch.Tensor:
        """The compile-time tensor of a weight or weight-only value, on the device in its declared dtype."""
        if id(v) not in self._const_cache:
            if v.is_input:
                t = load_param(v, self.weights, self.device)
            elif (ref := _fp8_cast(v)) is not None:  # straight to the cast's dtype: no fp32 copy of a large weight
                t = dequant_fp8_block(self.const(ref.w), self.const(ref.s), ref.block, out_dtype=to_torch(v.dtype))
            else:
                args = [self.const(u) for u in v.node.inputs]
                for out, t_out in zip(v.node.outputs, run_node(v.node, args, {})):
                    self._const_cache[id(out)] = t_out.to(self.device)  # a `constant` reference makes it on the CPU
                return self._const_cache[id(v)]
            self._const_cache[id(v)] = t
        return self._const_cache[id(v)]

    # generated kernels ----------------------------------------------------------------------------
    def generated(self, src: KernelSource, *nodes: Node) -> KernelSource:
        """Register a generated kernel for `nodes`; identical specialisations share one source."""
        src = self.sources.setdefault(src.body, src)
        for n in nodes:
            src.nodes.append(n.format(4))
        return src

    # regions --------------------------------------------------------------------------------------
    def users(self, v: Value) -> list[Node]:
        return sorted(v.users, key=lambda n: self.index[id(n)])

    def region(self, pattern: P | Roots, node: Node, anchor: str) -> Match | None:
        """The fused region `pattern` declares (dsgraph.pattern, the passes' matcher), claimed from `node`, the
        region's first node in graph order and the pattern's sub-pattern `anchor`. None unless it matches (single
        use inside is the pattern's rule), its other nodes are free and it can run where its last node stands.
        The match's `nodes` come back in graph order."""
        m = match_region(pattern, node, self.graph, anchor)
        if m is None:
            return None
        m.nodes = sorted(m.nodes, key=lambda n: self.index[id(n)])
        if m.nodes[0] is not node or not all(self.free(n) for n in m.nodes[1:]) or not self.region_ok(m.nodes):
            return None
        return m

    def free(self, n: Node) -> bool:
        return id(n) not in self.claimed and id(n) not in self.const_nodes

    def region_ok(self, nodes: list[Node]) -> bool:
        """A region runs where its last node stands: every value it defines that is used outside must only be
        used after that point (graph outputs are read at the end and are always fine)."""
        inside = {id(n) for n in nodes}
        last = max(self.index[id(n)] for n in nodes)
        for n in nodes:
            for v in n.outputs:
                for u in v.users:
                    if id(u) not in inside and self.index[id(u)] <= last:
                        return False
        return True

    def region_outputs(self, nodes: list[Node]) -> tuple[Value, ...]:
        """Values the region defines that the rest of the graph (or its outputs) reads."""
        inside = {id(n) for n in nodes}
        graph_outs = {id(v) for v in self.graph.outputs.values()}
        return tuple(v for n in nodes for v in n.outputs
                     if id(v) in graph_outs or any(id(u) not in inside for u in v.users))


def _fp8_cast(v: Value) -> WeightRef | None:
    """The FP8 weight behind v = cast(dequant_fp8(w, s)) when the fp32 dequantised weight feeds nothing else."""
    ref = weight_ref(v)
    if ref is None or ref.s is None or v.node.op != "cast" or len(ref.dequant.outputs[0].users) != 1:
        return None
    return ref


def lower_node(ctx: LowerCtx, node: Node) -> Lowered:
    """The first candidate of TABLE that accepts `node`, else its torch reference (the table's "reference"
    fallback), reported as `fallback` with every candidate's reason."""
    lowered, reasons = TABLE.lower(ctx, node)
    if lowered is not None:
        return lowered
    return Lowered("fallback", f"torch reference of {node.op}", "; ".join(reasons),
                   fn=reference_fn(node))


def lower_graph(graph: Graph, weights, device: str, report, options: dict,
                consts: dict[int, torch.Tensor] | None = None) -> Program:
    """The lowered program of `graph`; `consts` are bound values another program of the same graph already holds
    (the paged decode program shares the main program's weights)."""
    dev = torch.device(device)
    ctx = LowerCtx(graph, weights, dev, options)
    placed: list[tuple[int, Step]] = []
    for node in track(graph.nodes, "lowering (triton)", unit="node", long=len(graph.nodes) >= MIN_NODES):
        if not ctx.free(node):
            continue
        lw = lower_node(ctx, node)
        nodes = lw.nodes or (node,)
        for n in nodes:
            ctx.claimed.add(id(n))
        outputs = lw.outputs if lw.outputs is not None else node.outputs
        inputs = lw.inputs if lw.inputs is not None else node.inputs
        op = node.op if len(nodes) == 1 else "+".join(dict.fromkeys(n.op for n in nodes))
        label = f"{op} -> %{outputs[0].name}"
        if len(nodes) > 1:
            label += f" (fused region of {len(nodes)} nodes)"
        placed.append((max(ctx.index[id(n)] for n in nodes), Step(lw.fn, tuple(inputs), tuple(outputs), label)))
        report.kernels.append(KernelChoice(tuple(v.name for n in nodes for v in n.outputs), op, lw.kind,
                                           lw.kernel, lw.note))
    placed.sort(key=lambda p: p[0])
    steps = [s for _, s in placed]
    for src in ctx.sources.values():
        load_kernel(src)
    consts = _bind_consts(graph, steps, ctx, report, consts or {})
    if options.get("emit_dir"):
        paths = emit(list(ctx.sources.values()), options["emit_dir"])
        report.notes.append(f"wrote {len(paths)} generated kernel sources to {options['emit_dir']}")
    report.notes.extend(ctx.notes)
    if ctx.paged is not None:
        program = Program(ctx.paged.program_graph(), steps, consts, dev, optional_inputs=ctx.paged.inputs)
    else:
        program = Program(graph, steps, consts, dev, optional_inputs=ctx.lengths)
    program.sources = list(ctx.sources.values())
    return program


def _bind_consts(graph: Graph, steps: list[Step], ctx: LowerCtx, report,
                 bound: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Materialise every weight or folded value a step (or a graph output) reads; report the folded nodes."""
    needed: dict[int, Value] = {}
    for s in steps:
        for v in s.inputs:
            if ctx.is_const(v):
                needed[id(v)] = v
    for v in graph.outputs.values():
        if ctx.is_const(v):
            needed[id(v)] = v
    folded: dict[int, Node] = {}

    def walk(v: Value):
        if v.node is not None and id(v.node) not in folded:
            folded[id(v.node)] = v.node
            for u in v.node.inputs:
                walk(u)

    for v in needed.values():
        walk(v)
    for n in sorted(folded.values(), key=lambda n: ctx.index[id(n)]):
        report.kernels.append(KernelChoice(tuple(v.name for v in n.outputs), n.op, "reference",
                                           "folded at compile time (torch reference, weights only)"))
    consts = {k: bound[k] if k in bound else ctx.const(v) for k, v in needed.items()}
    ctx._const_cache.clear()
    return consts
