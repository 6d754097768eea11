"""Remove nodes that compute their input unchanged: Identity, inference Dropout, Cast to the same
type, identity Transpose/Reshape/Squeeze/Unsqueeze/Flatten/Slice/Expand/Pad, x*1, x/1, x+0,
x-0, x**1, single-input Concat/Sum/Max/Min/Mean, and single-output Split (its one piece must be
the whole axis: the spec requires the split sizes to add up to it).

Each op has a small check in `CHECKS` that answers with the index of the input that passes
through unchanged, None (not a no-op) or a reason string (a candidate that cannot be proven a
no-op). Shapes and dtypes come from shape inference, so anything not statically known declines.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim_opt.graph import (Edit, Node, attr, bypass, constant_value, is_graph_output, onnx_dtype,
                                optional_input, tensor_shape)
from onnxslim_opt.pass_api import PassContext, PassResult, RewritePass
from onnxslim_opt.shape_inference import ensure_shapes

#: Slice ends at or beyond this are "to the end" even when the dimension is unknown
INT_MAX = 2**31 - 1

Verdict = Union[int, str, None]


# ----------------------------------------------------------------------------- helpers (candidates for the core)
def _ints(node: Node, ctx: PassContext, name: str, index: int, since: int) -> Optional[list[int]]:
    """An int list given as an attribute before opset `since` and as a constant input from it on.
    Returns [] when absent, None when given but not constant."""
    if ctx.opset < since:
        return [int(v) for v in attr(node, name, [])]
    tensor = optional_input(node, index)
    if tensor is None:
        return []
    value = constant_value(tensor)
    return None if value is None else [int(v) for v in np.asarray(value).reshape(-1)]


def _fits(small: Sequence, shape: Optional[Sequence]) -> bool:
    """Broadcasting `small` into `shape` leaves `shape` unchanged (each dim is 1 or a known equal)."""
    if shape is None or len(small) > len(shape):
        return False
    return all(t == 1 or (isinstance(d, int) and d == t) for t, d in zip(reversed(list(small)), reversed(list(shape))))


# ----------------------------------------------------------------------------- per-op checks
def _always(node: Node, graph: gs.Graph, ctx: PassContext) -> Verdict:
    return 0


def _single_input(node: Node, graph: gs.Graph, ctx: PassContext) -> Verdict:
    return 0 if len(node.inputs) == 1 else None


def _single_output(node: Node, graph: gs.Graph, ctx: PassContext) -> Verdict:
    return 0 if len(node.outputs) == 1 else None


def _dropout(node: Node, graph: gs.Graph, ctx: PassContext) -> Verdict:
    if len(node.outputs) > 1 and (node.outputs[1].outputs or is_graph_output(graph, node.outputs[1])):
        return "Dropout mask output is used"
    if ctx.opset < 7 and not attr(node, "is_test", 0):
        return "Dropout in training mode (is_test=0)"
    training = optional_input(node, 2)
    if training is not None:
        value = constant_value(training)
        if value is None:
            return "Dropout training_mode is not a constant"
        if bool(np.asarray(value).reshape(-1)[0]):
            return "Dropout in training mode"
    return 0


def _cast(node: Node, graph: gs.Graph, ctx: PassContext) -> Verdict:
    source = onnx_dtype(node.inputs[0].dtype)
    if source is None:
        return "input element type unknown"
    return 0 if source == attr(node, "to") else None


def _cast_like(node: Node, graph: gs.Graph, ctx: PassContext) -> Verdict:
    source, target = onnx_dtype(node.inputs[0].dtype), onnx_dtype(node.inputs[1].dtype)
    if source is None or target is None:
        return "element types unknown"
    return 0 if source == target else None


def _transpose(node: Node, graph: gs.Graph, ctx: PassContext) -> Verdict:
    perm = attr(node, "perm")
    if perm is None:  # default reverses the dims: identity only up to rank 1
        shape = tensor_shape(node.inputs[0])
        if shape is None:
            return "Transpose without perm on an input of unknown rank"
        return 0 if len(shape) <= 1 else None
    return 0 if list(perm) == list(range(len(perm))) else None


def _target_and_shape(node: Node) -> tuple[Optional[list[int]], Optional[list]] | str | None:
    """(constant target of input 1, input shape) for Reshape/Expand checks, or the Verdict to
    return: None when the target is not constant, a reason when the input shape is unknown."""
    target = constant_value(optional_input(node, 1))
    if target is None:
        return None
    shape = tensor_shape(node.inputs[0])
    if shape is None:
        return "input shape unknown"
    return [int(v) for v in np.asarray(target).reshape(-1)], shape


def _reshape(node: Node, graph: gs.Graph, ctx: PassContext) -> Verdict:
    known = _target_and_shape(node)
    if not isinstance(known, tuple):
        return known
    target, shape = known
    if len(target) != len(shape) or target.count(-1) > 1:
        return None
    copies_zero = not attr(node, "allowzero", 0)
    unresolved = [i for i, (t, d) in enumerate(zip(target, shape))
                  if not ((t == 0 and copies_zero) or (isinstance(d, int) and t == d))]
    if not unresolved:
        return 0
    # a single -1 left is the one dim the others leave: equal to the input's when all others are
    if len(unresolved) == 1 and target[unresolved[0]] == -1 and 0 not in shape:
        return 0
    return None if all(isinstance(d, int) for d in shape) else "input shape not fully known"


def _squeeze(node: Node, graph: gs.Graph, ctx: PassContext) -> Verdict:
    axes = _ints(node, ctx, "axes", 1, 13)
    if axes is None or axes:
        return None
    shape = tensor_shape(node.inputs[0])
    if shape is None or not all(isinstance(d, int) for d in shape):
        return "Squeeze without axes on an input whose dims may be 1"
    return 0 if 1 not in shape else None


def _unsqueeze(node: Node, graph: gs.Graph, ctx: PassContext) -> Verdict:
    axes = _ints(node, ctx, "axes", 1, 13)
    return 0 if axes == [] else None


def _flatten(node: Node, graph: gs.Graph, ctx: PassContext) -> Verdict:
    shape = tensor_shape(node.inputs[0])
    if shape is None:
        return "input rank unknown"
    if len(shape) != 2:
        return None
    axis = attr(node, "axis", 1)
    axis = axis + 2 if axis < 0 else axis
    keeps = axis == 1 or (axis == 0 and shape[0] == 1) or (axis == 2 and shape[1] == 1)
    return 0 if keeps else None


def _slice_bound(value: int, dim) -> Optional[int]:
    """Start or end index clamped into [0, dim] (None when it depends on an unknown dim)."""
    if isinstance(dim, int):
        value = value + dim if value < 0 else value
        return min(max(value, 0), dim)
    if value == 0:
        return 0
    return INT_MAX if value >= INT_MAX else None


def _slice(node: Node, graph: gs.Graph, ctx: PassContext) -> Verdict:
    if ctx.opset < 10:
        starts, ends = list(attr(node, "starts", [])), list(attr(node, "ends", []))
        axes, steps = list(attr(node, "axes", range(len(starts)))), [1] * len(starts)
    else:
        values = [_ints(node, ctx, "", i, since=0) for i in range(1, 5)]  # always inputs
        if any(v is None for v in values):
            return None
        starts, ends, axes, steps = values
        axes = axes or list(range(len(starts)))
        steps = steps or [1] * len(starts)
    if any(s != 1 for s in steps):
        return None
    shape = tensor_shape(node.inputs[0])
    if shape is None and any(a < 0 for a in axes):
        return "input rank unknown"
    for start, end, axis in zip(starts, ends, axes):
        dim = shape[axis] if shape is not None else None
        first, last = _slice_bound(start, dim), _slice_bound(end, dim)
        if first != 0 or last != (dim if isinstance(dim, int) else INT_MAX):
            return None if (first is not None and last is not None) else "input dims unknown"
    return 0


def _expand(node: Node, graph: gs.Graph, ctx: PassContext) -> Verdict:
    known = _target_and_shape(node)
    if not isinstance(known, tuple):
        return known
    target, shape = known
    return 0 if _fits(target, shape) else None


def _pad(node: Node, graph: gs.Graph, ctx: PassContext) -> Verdict:
    """Zero pads copy the input whatever the mode."""
    pads = _ints(node, ctx, "pads", 1, 11)
    if pads is None or (ctx.opset >= 11 and optional_input(node, 1) is None):
        return None
    return 0 if not any(pads) else None


def _neutral(identity: float, const_sides: tuple[int, ...]) -> Callable[[Node, gs.Graph, PassContext], Verdict]:
    """x op c == x when c is all `identity` and broadcasting c does not grow x."""
    def check(node: Node, graph: gs.Graph, ctx: PassContext) -> Verdict:
        if len(node.inputs) != 2:
            return None
        for side in const_sides:
            value = constant_value(node.inputs[side])
            if value is None or value.size == 0 or not np.all(np.asarray(value) == identity):
                continue
            other = node.inputs[1 - side]
            if value.ndim == 0:
                return 1 - side
            if _fits(value.shape, tensor_shape(other)):
                return 1 - side
            return f"{node.op} by a neutral constant of shape {list(value.shape)} could broadcast the other input"
        return None
    return check


CHECKS: dict[str, Callable[[Node, gs.Graph, PassContext], Verdict]] = {
    "Identity": _always,
    "Dropout": _dropout,
    "Cast": _cast,
    "CastLike": _cast_like,
    "Transpose": _transpose,
    "Reshape": _reshape,
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    "Flatten": _flatten,
    "Slice": _slice,
    "Expand": _expand,
    "Pad": _pad,
    "Mul": _neutral(1, (1, 0)),
    "Div": _neutral(1, (1,)),
    "Add": _neutral(0, (1, 0)),
    "Sub": _neutral(0, (1,)),
    "Pow": _neutral(1, (1,)),
    "Concat": _single_input,
    "Sum": _single_input,
    "Max": _single_input,
    "Min": _single_input,
    "Mean": _single_input,
    "Split": _single_output,
}

#: ops whose check reads the input's shape or element type (the arithmetic ones only next to a constant)
_NEEDS_TYPES = {"Cast", "CastLike", "Transpose", "Reshape", "Squeeze", "Flatten", "Slice", "Expand"}
_ARITHMETIC = {"Mul", "Div", "Add", "Sub", "Pow"}


def _needs_types(node: Node) -> bool:
    untyped = any(isinstance(t, gs.Variable) and (t.dtype is None or t.shape is None) for t in node.inputs)
    if node.op in _ARITHMETIC:
        return untyped and any(constant_value(t) is not None for t in node.inputs)
    return untyped and node.op in _NEEDS_TYPES


class EliminateNoops(RewritePass):
    name = "eliminate_noops"
    description = "remove nodes whose output equals their input (Identity, x*1, same-type Cast, ...)"
    stage = "simplify"
    order = 200
    anchors = tuple(CHECKS)

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        if any(_needs_types(n) for n in graph.nodes):
            ensure_shapes(graph, ctx)
        return super().run(graph, ctx)

    def plan(self, node: Node, graph: gs.Graph, ctx: PassContext) -> Optional[Edit | str]:
        if not node.inputs or not node.outputs:
            return None
        verdict = CHECKS[node.op](node, graph, ctx)
        if not isinstance(verdict, int):
            return verdict
        return bypass(graph, node, node.inputs[verdict])
