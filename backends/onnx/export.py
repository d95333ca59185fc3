"""Export a dsgraph graph to a standard ONNX model (default opset 21, domain "" only).

    model = export_onnx(graph, weights)            # onnx.ModelProto
    save_onnx(model, "model.onnx")                 # external data file beside it when > 2 GB

Every node goes through the onnx lowering table (registry.py; converters.py for primitives,
domain.py for domain ops); an op without a converter is lowered with its
registered `.decomposition` into primitives and those are converted. No custom
ONNX domain is used: everything maps onto standard operators (MoE experts run in
dense form, see domain.py). An op with neither a converter nor a decomposition
is an UnknownOpError naming it.

Graph inputs keep their names and symbolic dims become ONNX dim_params ("B", "S",
"T"); params become initializers under their checkpoint names; outputs keep their
names (logits, cache.L.k.next, ...). `export_onnx(..., records=list)` collects
(node, Converted) per dsgraph node: which ONNX operators it became, for the compile report.
"""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import torch

from dsgraph.builder import GraphBuilder
from dsgraph.errors import UnknownOpError
from dsgraph.interpreter import load_param
from dsgraph.progress import MIN_NODES, track
from dsgraph.symbolic import Sym

from . import converters, domain  # noqa: F401  (register the primitive and domain converters in TABLE)
from .context import OnnxContext, onnx_dtype, tensor_proto
from .deps import onnx
from .registry import TABLE, Converted

OPSET = 21
IR_VERSION = 10
EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's 2 GB limit, with headroom


def _value_info(name: str, ty) -> onnx.ValueInfoProto:
    dims = []
    for d in ty.shape:
        if isinstance(d, int):
            dims.append(d)
        elif isinstance(d, Sym) and list(d.terms.values()) == [1] and len(next(iter(d.terms))) == 1:
            dims.append(str(d))
        else:
            dims.append(None)  # composite dims (T+S, B*S) stay unnamed: ONNX dim_params are plain names
    return onnx.helper.make_tensor_value_info(name, onnx_dtype(ty.dtype), dims)


def convert_node(ctx: OnnxContext, node, records: list | None = None) -> None:
    """Emit ONNX nodes for one dsgraph node and name its outputs in `ctx.names`. An op without a converter is
    legalized here, through its decomposition; the table's fallback policy ("error") covers the rest."""
    first = len(ctx.nodes)
    saved, ctx.prefix = ctx.prefix, node.outputs[0].name
    try:
        if TABLE.candidates(node.op):
            res, _ = TABLE.lower(ctx, node)
        elif node.opdef.decompose_fn is not None:
            res = Converted(note="decomposed into primitives", outputs=_decompose(ctx, node))
        else:
            raise UnknownOpError(f"ONNX export: no converter for {node.format(4)} and the op has no decomposition; "
                                 f"add one in backends/onnx/domain.py or run a pass that removes {node.op}")
    finally:
        ctx.prefix = saved
    if len(res.outputs) != len(node.outputs):
        raise UnknownOpError(f"ONNX converter for {node.op} returned {len(res.outputs)} outputs, the node has "
                             f"{len(node.outputs)}")
    for v, name in zip(node.outputs, res.outputs):
        ctx.names[id(v)] = name
    if records is not None:
        ops = sorted({n.op_type for n in ctx.nodes[first:]})
        records.append((node, replace(res, kernel=f"onnxruntime: {'+'.join(ops) or 'Identity'}")))


def _decompose(ctx: OnnxContext, node) -> list[str]:
    """Build the op's decomposition as a small graph over the node's input types, then convert it."""
    b = GraphBuilder(f"decompose_{node.op}")
    sub_inputs = [b.graph.add_input(f"in{i}", v.type, "activation") for i, v in enumerate(node.inputs)]
    outs = node.opdef.decompose_fn(b, *sub_inputs, **node.attrs)
    outs = list(outs) if isinstance(outs, (list, tuple)) else [outs]
    ctx.names.update({id(sv): name for sv, name in zip(sub_inputs, ctx.inputs(node))})
    for sub in b.graph.nodes:
        convert_node(ctx, sub)
    return [ctx.names[id(o)] for o in outs]


def export_onnx(graph, weights, opset: int = OPSET, records: list | None = None) -> onnx.ModelProto:
    """The graph with its weights as an ONNX ModelProto (not yet checked or saved)."""
    if opset < 17:
        raise UnknownOpError(f"ONNX export targets opset >= 17 (uses Split/Reduce axes as inputs); got {opset}")
    ctx = OnnxContext(graph)
    inputs, initializers = [], []
    for name in list(graph.inputs) + list(graph.outputs):
        ctx.reserve(name)
    for name, v in graph.inputs.items():
        ctx.names[id(v)] = name
        if v.kind != "param":
            inputs.append(_value_info(name, v.type))
        elif v.users:
            initializers.append(_param_proto(v, weights))
    for node in track(graph.nodes, "lowering (onnx)", unit="node", long=len(graph.nodes) >= MIN_NODES):
        convert_node(ctx, node, records)
    outputs = []
    for name, v in graph.outputs.items():
        ctx.nodes.append(onnx.helper.make_node("Identity", [ctx.names[id(v)]], [name], name=ctx.fresh(f"out/{name}")))
        outputs.append(_value_info(name, v.type))
    g = onnx.helper.make_graph(ctx.nodes, graph.name, inputs, outputs, initializer=initializers + ctx.initializers)
    model = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", opset)], producer_name="dsgraph",
                                   ir_version=IR_VERSION)
    model.doc_string = f"dsgraph prefill/step entry of {graph.name}: inputs {list(n.name for n in inputs)}"
    return model


def _param_proto(v, weights) -> onnx.TensorProto:
    return tensor_proto(load_param(v, weights, torch.device("cpu")), v.name)


def model_bytes(model: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) or 0 for t in model.graph.initializer)


def save_onnx(model: onnx.ModelProto, path: str | os.PathLike, external_data: bool | None = None) -> Path:
    """Write the model (weights to `<file>.data` beside it when large or asked) and check it with onnx.checker."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    big = model_bytes(model) > EXTERNAL_DATA_BYTES if external_data is None else external_data
    if big:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
        onnx.checker.check_model(str(path))
    else:
        onnx.checker.check_model(model)
        onnx.save_model(model, str(path))
    return path
