"""Translate a dsgraph Graph into a Relax IRModule with one function, `main`.

    main(activations and caches..., params..., derived params...) -> (outputs...)

in graph-input order. Weights are parameters, never constants baked into the module, so one build
serves any checkpoint of the same shapes. Every node goes through the lowering table (lower/registry.py);
each lowered output is checked against the node's declared type (dtype, rank, and each dim proven equal
by TVM's arithmetic analyser) so a lowering bug is reported at the node, not as wrong numbers later.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from dsgraph.errors import ShapeError, UnknownOpError
from dsgraph.ir import Graph
from dsgraph.progress import MIN_NODES, track

from .deps import relax, tvm
from .lower import TABLE, DerivedParam, LowerCtx


@dataclass
class Translation:
    """The IRModule plus what the runtime needs to call it and the report needs to describe it."""

    mod: tvm.IRModule
    input_names: list[str]      # activations and caches, in call order
    param_names: list[str]      # graph params, in call order after the inputs
    derived: list[DerivedParam]  # appended after the params
    output_names: list[str]
    kernels: list = field(default_factory=list)  # (node, Lowered)


def translate(graph: Graph, target: tvm.target.Target) -> Translation:
    """Lower `graph` node by node into `main`; an op without a lowering is an UnknownOpError naming it."""
    bb = relax.BlockBuilder()
    ctx = LowerCtx(bb, target)
    inputs = [n for n, v in graph.inputs.items() if v.kind != "param"]
    params = [n for n, v in graph.inputs.items() if v.kind == "param"]
    rvars = {n: relax.Var(n, relax.TensorType(ctx.dims(graph.inputs[n].shape), graph.inputs[n].dtype))
             for n in inputs + params}
    ctx.values.update({id(graph.inputs[n]): rvars[n] for n in rvars})
    kernels = []
    missing = sorted({n.op for n in graph.nodes} - TABLE.ops())
    if missing:
        raise UnknownOpError(f"tvm backend has no lowering for op(s) {', '.join(missing)}; add one in "
                             "backends/tvm/lower/, or give the op a decomposition so legalization can lower it")
    with bb.function("main"):
        with bb.dataflow():
            for node in track(graph.nodes, "lowering (tvm)", unit="node", long=len(graph.nodes) >= MIN_NODES):
                try:
                    res, _ = TABLE.lower(ctx, node)  # fallback "error": a node no candidate takes raises, naming it
                    outs = [_check(ctx, node, i, e) for i, e in enumerate(res.outputs)]
                except (RuntimeError, ValueError, TypeError, AttributeError, IndexError, AssertionError,
                        ShapeError) as e:
                    raise ShapeError(f"tvm backend: lowering {node.format(6)} failed: {type(e).__name__}: "
                                     f"{str(e).strip().splitlines()[-1] if str(e).strip() else e}") from e
                if len(outs) != len(node.outputs):
                    raise ShapeError(f"tvm lowering of {node.op} gave {len(outs)} outputs, the node has "
                                     f"{len(node.outputs)}")
                for v, e in zip(node.outputs, outs):
                    ctx.values[id(v)] = e
                kernels.append((node, res))
            result = bb.emit_output(relax.Tuple([ctx.values[id(v)] for v in graph.outputs.values()]))
        all_params = [rvars[n] for n in inputs + params] + [ctx.derived_vars[d.name] for d in ctx.derived]
        bb.emit_func_output(result, params=all_params)
    return Translation(bb.get(), inputs, params, list(ctx.derived), list(graph.outputs), kernels)


def _check(ctx: LowerCtx, node, i: int, expr):
    """The lowered value must have the node's dtype and shape; bind it to a Var for the next nodes."""
    want = node.outputs[i].type
    if not isinstance(expr, relax.Var):
        expr = ctx.emit(expr)
    ty = expr.ty
    if not isinstance(ty, relax.TensorType) or str(ty.dtype) != want.dtype or ty.ndim != want.rank:
        raise ShapeError(f"tvm lowering of {node.op}: output {i} is {ty}, the node declares {want}")
    want_dims = ctx.dims(want.shape)
    if ty.shape is None:
        return ctx.bb.match_cast(expr, relax.TensorType(want_dims, want.dtype))
    ana = tvm.sym.Analyzer()
    for j, (got, exp) in enumerate(zip(ty.shape.values, want_dims)):
        if not ana.can_prove_equal(got, exp):
            raise ShapeError(f"tvm lowering of {node.op}: output {i} dim {j} is {got}, the node declares {exp} "
                             f"(type {want})")
    return expr
