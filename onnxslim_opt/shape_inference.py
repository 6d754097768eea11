"""Shape inference for a gs graph without copying its weights.

onnx's shape inference works on a ModelProto. Exporting the whole graph would copy every
weight, so large constants are exported as typed graph inputs instead: shapes propagate the
same, the proto stays small, and peak memory stays near one copy of the weights.
"""
from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_graphsurgeon as gs

log = logging.getLogger("onnxslim_opt")

#: constants above this many bytes are exported as typed inputs rather than data
INLINE_LIMIT = 4096


def infer_shapes(graph: gs.Graph) -> bool:
    """Fill in dtype and shape of the graph's Variables in place. Returns False if inference failed."""
    light = graph.copy()
    for tensor in list(light.tensors().values()):
        if isinstance(tensor, gs.Constant) and _nbytes(tensor) > INLINE_LIMIT:
            dtype, shape = tensor.dtype, tensor.shape
            tensor.to_variable(dtype=dtype, shape=list(shape))
            tensor.type = "tensor_type"  # gs's to_variable leaves it unset and export then fails
            light.inputs.append(tensor)
    try:
        model = gs.export_onnx(light, do_type_check=False)
        model.ir_version = max(model.ir_version, 4)  # IR 3 ignores initializers that are not inputs
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as exc:  # unknown ops and malformed graphs: keep what the model declared
        log.debug("shape inference failed: %s", exc)
        return False
    known = {}
    for vi in _all_value_infos(inferred.graph):
        if vi.type.WhichOneof("value") != "tensor_type":
            continue
        tt = vi.type.tensor_type
        if not tt.elem_type:
            continue
        shape = None
        if tt.HasField("shape"):
            shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
        known[vi.name] = (onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type), shape)
    for tensor in _all_tensors(graph):
        name = tensor.name
        if isinstance(tensor, gs.Variable) and name in known:
            dtype, shape = known[name]
            if tensor.dtype is None:
                tensor.dtype = dtype
            if shape is not None and (tensor.shape is None or _less_known(tensor.shape, shape)):
                tensor.shape = shape
    return True


def ensure_shapes(graph: gs.Graph, ctx) -> None:
    """Infer shapes unless nothing changed since the last inference in this run.

    The pass manager marks shapes stale after every pass that changed the graph, so several
    passes of one round share one inference instead of each running its own.
    """
    if getattr(ctx, "shapes_stale", True):
        infer_shapes(graph)
        ctx.shapes_stale = False


def _all_value_infos(graph: onnx.GraphProto):
    yield from graph.value_info
    yield from graph.output
    for node in graph.node:
        for a in node.attribute:
            subgraphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
            for sub in subgraphs:
                yield from _all_value_infos(sub)


def _all_tensors(graph: gs.Graph):
    from .graph import walk_graphs

    for g in walk_graphs(graph):
        yield from g.tensors().values()


def _less_known(current, new) -> bool:
    if len(current) != len(new):
        return False
    return sum(isinstance(d, int) for d in current) < sum(isinstance(d, int) for d in new)


def _nbytes(tensor: gs.Constant) -> int:
    try:
        return int(np.prod(tensor.shape)) * np.dtype(tensor.dtype).itemsize
    except TypeError:
        return 0
