"""Fold an explicit constant Pad into the `pads` of the Conv/AveragePool/MaxPool reading it.

Exporters (TF/Keras "same" padding, torch F.pad) often emit Pad -> Conv; the consumer's own
implicit padding does the same work without materializing the padded tensor. Only paddings
whose value equals what the consumer implicitly pads with are folded: 0 for Conv and
AveragePool counting the pad, -inf for MaxPool (which ignores its implicit padding).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim_opt.graph import Edit, NewNode, Node, attr, constant_value, is_standard, single_consumer
from onnxslim_opt.pass_api import PassContext, RewritePass

_CONSUMERS = ("Conv", "AveragePool", "MaxPool")


def _absent(tensor: Optional[gs.Tensor]) -> bool:
    return tensor is None or (isinstance(tensor, gs.Variable) and not tensor.name)


def _pad_spec(pad: Node) -> tuple[Optional[np.ndarray], Optional[np.ndarray], Optional[np.ndarray] | str]:
    """(pads, axes or None, value or None) of a Pad in either form; a str is why it is unreadable."""
    if len(pad.inputs) < 2:  # opset < 11: attributes
        pads = attr(pad, "pads", attr(pad, "paddings"))
        if pads is None:
            return "Pad has no pads"
        return np.asarray(list(pads), dtype=np.int64), None, np.asarray(attr(pad, "value", 0.0))
    pads = constant_value(pad.inputs[1])
    if pads is None:
        return "pads are not constant"
    value = None
    if len(pad.inputs) > 2 and not _absent(pad.inputs[2]):
        value = constant_value(pad.inputs[2])
        if value is None:
            return "pad value is not constant"
    axes = None
    if len(pad.inputs) > 3 and not _absent(pad.inputs[3]):
        axes = constant_value(pad.inputs[3])
        if axes is None:
            return "Pad axes are not constant"
    return np.asarray(pads, dtype=np.int64).reshape(-1), axes, value


def _rank(pad: Node, consumer: Node) -> Optional[int]:
    """Rank of the padded tensor, from the Pad input or from the consumer's kernel."""
    shape = pad.inputs[0].shape
    if shape is not None:
        return len(shape)
    if "kernel_shape" in consumer.attrs:
        return len(consumer.attrs["kernel_shape"]) + 2
    if consumer.op == "Conv" and consumer.inputs[1].shape is not None:
        return len(consumer.inputs[1].shape)
    return None


def _full_pads(pads: np.ndarray, axes: Optional[np.ndarray], rank: Optional[int]) -> np.ndarray | str:
    """Per-axis (begin, end) pairs as a (rank, 2) array."""
    if axes is None:
        if len(pads) % 2:
            return "odd number of pads"
        return np.stack([pads[: len(pads) // 2], pads[len(pads) // 2:]], axis=1)
    if rank is None:
        return "rank of the padded tensor unknown (Pad has axes)"
    axes = [int(a) + rank if a < 0 else int(a) for a in np.asarray(axes).reshape(-1)]
    if len(set(axes)) != len(axes) or len(pads) != 2 * len(axes) or not all(0 <= a < rank for a in axes):
        return "invalid Pad axes"
    full = np.zeros((rank, 2), dtype=np.int64)
    for i, a in enumerate(axes):
        full[a] = (pads[i], pads[i + len(axes)])
    return full


def _value_problem(value: Optional[np.ndarray], consumer: Node) -> Optional[str]:
    """Why padding with `value` differs from the consumer's implicit padding, or None."""
    v = np.asarray(0.0 if value is None else value)
    if v.size != 1:
        return "pad value is not a scalar"
    v = v.reshape(())
    if consumer.op == "MaxPool":
        lowest = np.iinfo(v.dtype).min if np.issubdtype(v.dtype, np.integer) else -np.inf
        return None if v == lowest else f"MaxPool ignores its padding, so only a -inf Pad folds (value is {v})"
    return None if v == 0 else f"pad value {v} is not 0"


def _consumer_problem(consumer: Node, merged: np.ndarray) -> Optional[str]:
    """Why the consumer cannot take the merged pads (pools), or None."""
    if attr(consumer, "auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        return f"{consumer.op} uses auto_pad={attr(consumer, 'auto_pad')}"
    if consumer.op == "Conv":
        return None
    if attr(consumer, "ceil_mode", 0):
        return "pool uses ceil_mode=1 (windows past the padding are treated differently)"
    if consumer.op == "MaxPool" and len(consumer.outputs) > 1 and consumer.outputs[1].outputs:
        return "MaxPool Indices output is used (indices refer to the padded tensor)"
    kernel = list(consumer.attrs.get("kernel_shape", []))
    if len(kernel) != len(merged) or any(max(b, e) >= k for (b, e), k in zip(merged, kernel)):
        return "merged pads would not be smaller than the kernel"
    return None


class FusePad(RewritePass):
    name = "fuse_pad"
    description = "fold a constant spatial Pad into the pads of the following Conv/AveragePool/MaxPool"
    stage = "simplify"
    order = 610
    anchors = ("Pad",)

    def plan(self, node: Node, graph: gs.Graph, ctx: PassContext) -> Optional[Edit | str]:
        consumer = single_consumer(graph, node.outputs[0])
        if consumer is None:
            return "Pad output has several consumers or is a graph output" if node.outputs[0].outputs else None
        if consumer.op not in _CONSUMERS or not is_standard(consumer) or consumer.inputs[0] is not node.outputs[0]:
            return None
        if attr(node, "mode", "constant") != "constant":
            return f"Pad mode {attr(node, 'mode')} is not constant"
        spec = _pad_spec(node)
        if isinstance(spec, str):
            return spec
        pads, axes, value = spec
        problem = _value_problem(value, consumer)
        if problem:
            return problem
        full = _full_pads(pads, axes, _rank(node, consumer))
        if isinstance(full, str):
            return full
        if len(full) < 3 or full[:2].any():
            return "Pad touches the batch or channel axis"
        if (full < 0).any():
            return "negative pads (cropping)"
        spatial = len(full) - 2
        own = np.asarray(list(attr(consumer, "pads", [0] * 2 * spatial)), dtype=np.int64)
        if attr(consumer, "auto_pad", "NOTSET") == "VALID":
            own = np.zeros(2 * spatial, dtype=np.int64)
        if len(own) != 2 * spatial:
            return "consumer pads do not match the Pad rank"
        merged = np.stack([own[:spatial], own[spatial:]], axis=1) + full[2:]
        problem = _consumer_problem(consumer, merged)
        if problem:
            return problem
        attrs = dict(consumer.attrs)
        attrs.pop("auto_pad", None)
        attrs["pads"] = [int(p) for p in merged[:, 0]] + [int(p) for p in merged[:, 1]]
        if consumer.op == "AveragePool" and not attr(consumer, "count_include_pad", 0):
            if own.any():
                return "AveragePool excludes its own padding from the average but would have to count the Pad's"
            attrs["count_include_pad"] = 1  # the explicit zeros were counted; keep counting them
        inputs = [node.inputs[0]] + list(consumer.inputs[1:])
        return Edit(add=[NewNode(consumer.op, inputs, list(consumer.outputs), attrs, name=consumer.name)],
                    remove=[node, consumer])
