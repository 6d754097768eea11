"""Fold a per-output-channel Mul/Div/Add/Sub by a constant into the Conv that feeds it.

Exporters leave scale and bias arithmetic after convolutions (frozen BN already split into
Mul + Add, mean/std normalization, channel-wise layer scale). When the constant is constant
along the batch and spatial axes, it is a per-channel affine that the Conv weight and bias
absorb exactly. One op is folded per rewrite; the simplify fixed point folds chains.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim_opt.graph import Edit, Node, constant_value, is_standard, single_consumer
from onnxslim_opt.pass_api import PassContext, RewritePass

from ._batchnorm import fold_into_conv, float_constant

AFFINE_OPS = ("Mul", "Div", "Add", "Sub")


class FuseConvAffine(RewritePass):
    name = "fuse_conv_affine"
    description = "fold a per-channel constant Mul/Div/Add/Sub after a Conv into its weight and bias"
    stage = "simplify"
    order = 530
    anchors = ("Conv",)

    def plan(self, node: Node, graph: gs.Graph, ctx: PassContext) -> Optional[Edit | str]:
        out = node.outputs[0] if node.outputs else None
        if out is None or not any(u.op in AFFINE_OPS and is_standard(u) for u in out.outputs):
            return None
        user = single_consumer(graph, out)
        if user is None:
            return "the Conv output has several consumers or is a graph output"
        if len(user.inputs) != 2 or (user.inputs[0] is out) == (user.inputs[1] is out):
            return None
        weight = float_constant(node.inputs[1] if len(node.inputs) > 1 else None)
        if weight is None or weight.ndim < 3:
            return "Conv weight is not a float constant of rank >= 3"
        conv_left = user.inputs[0] is out
        vector = _channel_vector(constant_value(user.inputs[1 if conv_left else 0]), weight)
        if isinstance(vector, str):
            return f"{user.op}: {vector}"
        affine = _affine(user.op, conv_left, vector)
        if isinstance(affine, str):
            return affine
        return fold_into_conv(graph, node, affine[0], affine[1], user)


def _channel_vector(value: Optional[np.ndarray], weight: np.ndarray) -> np.ndarray | str:
    """The constant as a float64 [M] vector when it is per-output-channel, else a reason."""
    if value is None:
        return "the other operand is not constant"
    value = np.asarray(value)
    if value.dtype != weight.dtype:
        return f"constant dtype {value.dtype} differs from the Conv dtype {weight.dtype}"
    rank = weight.ndim
    if value.ndim > rank:
        return f"constant of rank {value.ndim} would broadcast the rank-{rank} Conv output"
    full = (1,) * (rank - value.ndim) + value.shape
    channels = full[1]
    if full[0] != 1:
        return "constant varies along (or broadcasts) the batch axis"
    if any(d != 1 for d in full[2:]):
        return "constant varies along (or broadcasts) the spatial axes"
    out_channels = weight.shape[0]
    if channels not in (1, out_channels):
        return f"constant has {channels} channels, the Conv outputs {out_channels}"
    vector = np.broadcast_to(value.reshape(channels).astype(np.float64), (out_channels,))
    if not np.isfinite(vector).all():
        return "constant is not finite"
    return vector


def _affine(op: str, conv_left: bool, v: np.ndarray) -> tuple[np.ndarray, np.ndarray] | str:
    """(scale, shift) such that the op computes scale * conv + shift."""
    ones, zeros = np.ones_like(v), np.zeros_like(v)
    if op == "Mul":
        return v, zeros
    if op == "Add":
        return ones, v
    if op == "Sub":
        return (ones, -v) if conv_left else (-ones, v)
    if not conv_left:
        return "Div: constant divided by the Conv output is not affine"
    if (v == 0).any():
        return "Div: the divisor has zeros"
    return 1.0 / v, zeros
