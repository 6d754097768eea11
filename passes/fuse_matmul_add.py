"""MatMul(A, B) followed by Add(bias) becomes one Gemm(A, B, bias).

Gemm only covers the 2-D case with a bias that broadcasts *into* (M, N), so the rewrite is
restricted to rank-2 operands and biases of shape [], [N], [1, N], [M, 1], [M, N] (or 1s);
anything else would change the result shape or need extra Reshape nodes.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim_opt.graph import Edit, NewNode, Node, is_standard, single_consumer, walk_graphs
from onnxslim_opt.pass_api import PassContext, PassResult, RewritePass
from onnxslim_opt.shape_inference import ensure_shapes

_FLOATS = {np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)}
_INTS = {np.dtype(t) for t in (np.int32, np.int64, np.uint32, np.uint64)}


def _shape(tensor: gs.Tensor) -> Optional[Sequence]:
    """Shape of a tensor if known (constants always know theirs)."""
    if isinstance(tensor, gs.Constant):
        return tensor.values.shape
    return tensor.shape


def _dtype_problem(dtype, opset: int) -> Optional[str]:
    """Why Gemm cannot take this element type here, or None."""
    if dtype is None:
        return "element type unknown"
    name = getattr(dtype, "name", str(dtype))
    if name == "bfloat16":
        return None if opset >= 13 else f"bfloat16 Gemm needs opset >= 13 (model has {opset})"
    try:
        dt = np.dtype(dtype)
    except TypeError:
        return f"element type {dtype} is not supported by Gemm"
    if dt in _FLOATS:
        return None
    if dt in _INTS:
        # valid ONNX from opset 9, but ONNX Runtime has no integer Gemm kernel: the model would not run
        return f"integer ({dt}) Gemm has no ONNX Runtime kernel"
    return f"element type {dt} is not supported by Gemm"


def _dim_fits(bias_dim, target) -> bool:
    """A bias dimension broadcasts into `target` without enlarging it."""
    if bias_dim == 1:
        return True
    if isinstance(bias_dim, int) and isinstance(target, int):
        return bias_dim == target
    return isinstance(bias_dim, str) and bias_dim != "" and bias_dim == target


def _bias_problem(bias_shape: Optional[Sequence], m, n) -> Optional[str]:
    """Why `bias` is not a Gemm C for an (M, N) product, or None."""
    if bias_shape is None:
        return "bias shape unknown"
    if len(bias_shape) > 2:
        return f"bias of rank {len(bias_shape)} would broadcast the result beyond 2-D"
    for bias_dim, target in zip(reversed(list(bias_shape)), (n, m)):
        if not _dim_fits(bias_dim, target):
            return f"bias shape {list(bias_shape)} does not broadcast unidirectionally to {[m, n]}"
    return None


class FuseMatMulAdd(RewritePass):
    name = "fuse_matmul_add"
    description = "fuse a 2-D MatMul followed by a bias Add into one Gemm"
    stage = "simplify"
    order = 600
    anchors = ("MatMul",)

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        if any(n.op == "MatMul" and is_standard(n) for g in walk_graphs(graph) for n in g.nodes):
            ensure_shapes(graph, ctx)  # ranks decide the rewrite; fills shapes in place, never restructures
        return super().run(graph, ctx)

    def plan(self, node: Node, graph: gs.Graph, ctx: PassContext) -> Optional[Edit | str]:
        out = node.outputs[0]
        add = single_consumer(graph, out)
        if add is None:
            return None if not out.outputs else "MatMul output has other consumers or is a graph output"
        if add.op != "Add" or not is_standard(add) or len(add.inputs) != 2:
            return None
        if add.inputs[0] is out and add.inputs[1] is out:
            return "Add adds the MatMul output to itself"
        bias = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
        a, b = node.inputs
        a_shape, b_shape = _shape(a), _shape(b)
        if a_shape is None or b_shape is None:
            return "MatMul operand rank unknown"
        if len(a_shape) != 2 or len(b_shape) != 2:
            return (f"MatMul of ranks {len(a_shape)}x{len(b_shape)}: Gemm is 2-D only "
                    f"(a Reshape-Gemm-Reshape would add nodes)")
        problem = _dtype_problem(a.dtype if a.dtype is not None else out.dtype, ctx.opset)
        if problem:
            return problem
        problem = _bias_problem(_shape(bias), a_shape[0], b_shape[1])
        if problem:
            return problem
        return Edit(add=[NewNode("Gemm", [a, b, bias], list(add.outputs), name=add.name)], remove=[node, add])
