"""Shared math for folding BatchNormalization and other per-channel affines into a producer.

An inference-mode BatchNormalization is y = a * x + b per channel (axis 1), with
a = scale / sqrt(var + eps) and b = B - mean * a. Folding (a, b) into the weights of the node
that feeds it removes the BatchNormalization at no cost. Everything is computed in float64 and
cast back to the weight dtype once, so a float16 model loses no more than one rounding.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim_opt.graph import (Edit, NewNode, Node, attr, constant_value, fresh_name, is_graph_output, optional_input,
                                is_standard, make_constant, single_consumer, sole_producer)
from onnxslim_opt.pass_api import PassContext

FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


def float_constant(tensor: Optional[gs.Tensor]) -> Optional[np.ndarray]:
    """A constant with a numpy float dtype (what the folding math can handle), else None."""
    value = constant_value(tensor)
    if value is None or np.asarray(value).dtype not in FLOAT_DTYPES:
        return None
    return np.asarray(value)


def bn_producer(bn: Node, graph: gs.Graph, ops: tuple[str, ...]) -> Optional[Node | str]:
    """The node of type in `ops` feeding `bn`, if it is a candidate (None: not one, str: declined)."""
    x = bn.inputs[0] if bn.inputs else None
    producer = sole_producer(x) if x is not None else None
    if producer is None or producer.op not in ops or not is_standard(producer):
        return None
    if single_consumer(graph, x) is not bn:
        return f"the {producer.op} output has other consumers or is a graph output"
    return producer


def bn_affine(bn: Node, graph: gs.Graph, ctx: PassContext) -> tuple[np.ndarray, np.ndarray] | str:
    """(a, b) such that the BatchNormalization is y = a * x + b along axis 1, or a reason.

    float32 parameters are folded in float32 in ONNX Runtime's order (scale / sqrt(var + eps)),
    so the folded model rounds exactly as ONNX Runtime's own Conv+BN fusion would; other float
    types are folded in float64."""
    if ctx.opset < 7:
        return "BatchNormalization before opset 7 (is_test semantics) is not handled"
    if len(bn.inputs) != 5:
        return f"BatchNormalization has {len(bn.inputs)} inputs, expected 5"
    if int(attr(bn, "training_mode", 0)) != 0:
        return "training_mode=1 (normalizes with batch statistics)"
    if int(attr(bn, "spatial", 1)) == 0:
        return "spatial=0 (per-activation statistics)"
    for out in bn.outputs[1:]:
        if out.outputs or is_graph_output(graph, out):
            return "running/saved statistics outputs are used (training mode)"
    params = [float_constant(t) for t in bn.inputs[1:]]
    if any(p is None for p in params):
        return "BatchNormalization parameters are not float constants"
    dtype = np.float32 if all(p.dtype == np.float32 for p in params) else np.float64
    scale, bias, mean, var = (p.astype(dtype) for p in params)
    if any(p.ndim != 1 or p.shape != scale.shape for p in (scale, bias, mean, var)):
        return "BatchNormalization parameters are not 1-D vectors of one length"
    a = scale / np.sqrt(var + dtype(attr(bn, "epsilon", 1e-5)))
    b = bias - mean * a
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return "folded scale/shift is not finite (var + epsilon <= 0?)"
    return a, b


def conv_out_channels(conv: Node, weight: np.ndarray) -> int:
    """Output channels of a Conv ([M, C/g, k...]) or ConvTranspose ([C, M/g, k...]) weight."""
    if conv.op == "ConvTranspose":
        return weight.shape[1] * int(attr(conv, "group", 1))
    return weight.shape[0]


def scale_out_channels(conv: Node, weight: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Weight with output channel o multiplied by scale[o] (scale computed in float64 by the
    caller, applied in the weight's dtype: one rounding step, and no float64 copy of big weights).

    ConvTranspose keeps output channel g*(M/group)+j at weight[g-th block of input channels, j].
    """
    s = scale.astype(weight.dtype) if weight.dtype in (np.float32, np.float64) else scale
    spatial = (1,) * (weight.ndim - 2)
    if conv.op != "ConvTranspose":
        return weight * s.reshape((-1, 1) + spatial)
    group = int(attr(conv, "group", 1))
    c_in, per_group = weight.shape[0], weight.shape[1]
    blocks = weight.reshape((group, c_in // group, per_group) + weight.shape[2:])
    return (blocks * s.reshape((group, 1, per_group) + spatial)).reshape(weight.shape)


def fold_into_conv(graph: gs.Graph, conv: Node, scale: np.ndarray, shift: np.ndarray, absorbed: Node) -> Edit | str:
    """Edit replacing conv -> absorbed (computing scale * conv + shift per channel) by one Conv."""
    weight = float_constant(conv.inputs[1] if len(conv.inputs) > 1 else None)
    if weight is None:
        return f"{conv.op} weight is not a float constant"
    if weight.ndim < 3:
        return f"{conv.op} weight has rank {weight.ndim}, expected >= 3"
    group = int(attr(conv, "group", 1))
    if group < 1 or (conv.op == "ConvTranspose" and weight.shape[0] % group):
        return f"{conv.op} group={group} does not divide the weight's input channels"
    channels = conv_out_channels(conv, weight)
    if scale.shape != (channels,) or shift.shape != (channels,):
        return f"per-channel constant has {scale.size} channels, {conv.op} outputs {channels}"
    bias_tensor = optional_input(conv, 2)
    bias = float_constant(bias_tensor) if bias_tensor is not None else None
    if bias_tensor is not None and (bias is None or bias.shape != (channels,)):
        return f"{conv.op} bias is not a constant [{channels}] float vector"
    if bias is not None and bias.dtype != weight.dtype:
        return f"{conv.op} bias dtype {bias.dtype} differs from weight dtype {weight.dtype}"

    w_tensor = conv.inputs[1]
    if not np.all(scale == 1.0):
        new_w = scale_out_channels(conv, weight, scale).astype(weight.dtype)
        w_tensor = make_constant(graph, f"{conv.inputs[1].name}_fused", new_w)
    inputs = [conv.inputs[0], w_tensor]
    if bias is not None or np.any(shift != 0):
        new_b = (bias.astype(np.float64) * scale if bias is not None else 0.0) + shift
        base = bias_tensor.name if bias_tensor is not None else f"{conv.inputs[1].name}_bias"
        inputs.append(make_constant(graph, f"{base}_fused", np.asarray(new_b).astype(weight.dtype)))
    old_out = absorbed.outputs[0]
    out = gs.Variable(fresh_name(graph, f"{old_out.name}_fused"), dtype=old_out.dtype, shape=old_out.shape)
    node = NewNode(conv.op, inputs, [out], dict(conv.attrs), name=conv.name)
    return Edit(add=[node], remove=[conv, absorbed], replace=[(old_out, out)])
