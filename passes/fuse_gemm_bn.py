"""Fold an inference-mode BatchNormalization over features into the Gemm/MatMul feeding it.

Classifier heads (BatchNorm1d after Linear) export as Gemm -> BN or MatMul -> BN on a [M, N]
tensor: BN's channel axis 1 is then the feature axis N, so the BN scales the weight's N
columns and becomes the Gemm bias. For a MatMul output of rank > 2 ([B, T, N]) BN normalizes
axis 1 (T), which is not a weight axis: that is declined, whatever the sizes.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim_opt.graph import Edit, NewNode, Node, attr, fresh_name, make_constant, sole_producer, walk_graphs
from onnxslim_opt.pass_api import PassContext, PassResult, RewritePass
from onnxslim_opt.shape_inference import ensure_shapes

from ._batchnorm import bn_affine, bn_producer, float_constant, optional_input


class FuseGemmBatchNorm(RewritePass):
    name = "fuse_gemm_bn"
    description = "fold inference-mode BatchNormalization into the preceding Gemm, or MatMul (becomes Gemm)"
    stage = "simplify"
    order = 520
    anchors = ("BatchNormalization",)

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        if any(_unknown_rank_matmul(n) for g in walk_graphs(graph) for n in g.nodes):
            ensure_shapes(graph, ctx)  # the MatMul fold needs the input rank
        return super().run(graph, ctx)

    def plan(self, node: Node, graph: gs.Graph, ctx: PassContext) -> Optional[Edit | str]:
        producer = bn_producer(node, graph, ("Gemm", "MatMul"))
        if producer is None or isinstance(producer, str):
            return producer
        affine = bn_affine(node, graph, ctx)
        if isinstance(affine, str):
            return affine
        fold = _fold_gemm if producer.op == "Gemm" else _fold_matmul
        return fold(graph, producer, node, *affine, ctx)


def _unknown_rank_matmul(node: Node) -> bool:
    if node.op != "BatchNormalization" or not node.inputs:
        return False
    producer = sole_producer(node.inputs[0])
    return producer is not None and producer.op == "MatMul" and producer.inputs[0].shape is None


def _fold_gemm(graph: gs.Graph, gemm: Node, bn: Node, a: np.ndarray, b: np.ndarray, ctx: PassContext) -> Edit | str:
    weight = float_constant(gemm.inputs[1])
    if weight is None or weight.ndim != 2:
        return "Gemm B is not a 2-D float constant"
    trans_b = int(attr(gemm, "transB", 0))
    n = weight.shape[0] if trans_b else weight.shape[1]
    if a.shape != (n,):
        return f"BatchNormalization has {a.size} channels, Gemm outputs {n} features"
    beta = float(attr(gemm, "beta", 1.0))
    c_tensor = optional_input(gemm, 2)
    if c_tensor is None:
        new_c = b
    else:
        c = float_constant(c_tensor)
        if c is None:
            return "Gemm C is not a float constant"
        if c.ndim > 2 or (c.ndim >= 1 and c.shape[-1] not in (1, n)):
            return f"Gemm C of shape {list(c.shape)} does not broadcast to [M, {n}]"
        new_c = beta * c.astype(np.float64) * a + b  # broadcast over [..., N]
        if new_c.ndim == 2 and new_c.shape[0] == 1:
            new_c = new_c.reshape(n)
        if new_c.size > max(c.size, n) and new_c.size * weight.itemsize > ctx.fold_size_limit:
            return f"the fused Gemm C {list(new_c.shape)} would exceed the fold size limit"
    scale = a[:, None] if trans_b else a[None, :]
    new_w = make_constant(graph, f"{gemm.inputs[1].name}_fused", (weight.astype(np.float64) * scale).astype(weight.dtype))
    base = c_tensor.name if c_tensor is not None else f"{gemm.inputs[1].name}_bias"
    new_c_tensor = make_constant(graph, f"{base}_fused", new_c.astype(weight.dtype))
    attrs = dict(gemm.attrs)
    attrs["beta"] = 1.0
    return _replace(graph, gemm, bn, NewNode("Gemm", [gemm.inputs[0], new_w, new_c_tensor], [], attrs, name=gemm.name))


def _fold_matmul(graph: gs.Graph, matmul: Node, bn: Node, a: np.ndarray, b: np.ndarray, ctx: PassContext) -> Edit | str:
    weight = float_constant(matmul.inputs[1])
    if weight is None or weight.ndim != 2:
        return "MatMul right operand is not a 2-D float constant"
    shape = matmul.inputs[0].shape
    if shape is None:
        return "rank of the MatMul input is unknown"
    if len(shape) != 2:
        return (f"MatMul output has rank {len(shape)}: BatchNormalization's channel axis 1 is not the "
                f"weight's feature axis")
    if a.shape != (weight.shape[1],):
        return f"BatchNormalization has {a.size} channels, MatMul outputs {weight.shape[1]} features"
    new_w = (weight.astype(np.float64) * a[None, :]).astype(weight.dtype)
    w_tensor = make_constant(graph, f"{matmul.inputs[1].name}_fused", new_w)
    c_tensor = make_constant(graph, f"{matmul.inputs[1].name}_bias_fused", b.astype(weight.dtype))
    return _replace(graph, matmul, bn, NewNode("Gemm", [matmul.inputs[0], w_tensor, c_tensor], [], {}, name=matmul.name))


def _replace(graph: gs.Graph, producer: Node, bn: Node, node: NewNode) -> Edit:
    old_out = bn.outputs[0]
    out = gs.Variable(fresh_name(graph, f"{old_out.name}_fused"), dtype=old_out.dtype, shape=old_out.shape)
    node.outputs = [out]
    return Edit(add=[node], remove=[producer, bn], replace=[(old_out, out)])
