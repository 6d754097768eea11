"""Reshape(P(x), target) becomes Reshape(x, target) when P is a Reshape, Flatten, Squeeze or
Unsqueeze and `target` does not depend on P's output shape.

All four keep the element count, and a constant target with at most one -1 and no 0 (or with
allowzero=1) depends only on that count, so P can be skipped. A 0 (copy that dim) is kept when
it copies a dim of x as well (P is a Reshape copying the same dim, or Flatten(axis=1) at dim 0),
replaced by the intermediate dim when that is statically known, and declined otherwise. The
second Reshape is rewritten; P stays while others read it, else dead-code elimination drops it.

A Squeeze, Unsqueeze or Flatten (or a Reshape whose target cannot be resolved) fed by P, whose
output shape is fully static, becomes Reshape(x, that shape) when P has no other reader: the
two nodes become one (Reshape -> Unsqueeze in attention heads). With another reader P would stay
and nothing would be saved, so that case is declined.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim_opt.graph import (Edit, NewNode, Node, attr, constant_value, is_standard, make_constant,
                                single_consumer, sole_producer, static_shape, walk_graphs)
from onnxslim_opt.pass_api import PassContext, PassResult, RewritePass
from onnxslim_opt.shape_inference import ensure_shapes

#: ops that only rearrange the shape: their data input has the output's element count
SHAPE_ONLY = ("Reshape", "Flatten", "Squeeze", "Unsqueeze")


def _target(node: Node) -> Optional[list[int]]:
    if len(node.inputs) < 2:
        return None
    value = constant_value(node.inputs[1])
    return None if value is None else [int(v) for v in np.asarray(value).reshape(-1)]


def _intermediate_dim(first: Node, i: int) -> tuple[bool, Optional[int]]:
    """What dim i of `first`'s output is: (True, None) if it equals dim i of first's input,
    (False, n) if it is the known int n, (False, None) if unknown."""
    if first.op == "Reshape" and not attr(first, "allowzero", 0):
        target = _target(first)
        if target is not None and i < len(target):
            if target[i] == 0:
                return True, None
            if target[i] > 0:
                return False, target[i]
    if first.op == "Flatten" and i == 0 and attr(first, "axis", 1) == 1:
        return True, None
    shape = first.outputs[0].shape
    if shape is not None and i < len(shape) and isinstance(shape[i], int) and shape[i] >= 0:
        return False, shape[i]
    return False, None


def resolve_target(first: Node, second: Node) -> list[int] | str:
    """`second`'s target made independent of `first`'s output, or why that is impossible."""
    target = _target(second)
    if target is None:
        return "target shape is not a constant"
    if target.count(-1) > 1:
        return "target has several -1"
    if attr(second, "allowzero", 0):
        return target if 0 not in target or -1 not in target else "allowzero target with both 0 and -1"
    resolved = []
    for i, t in enumerate(target):
        if t != 0:
            resolved.append(t)
            continue
        same, known = _intermediate_dim(first, i)
        if same:
            resolved.append(0)
        elif known is not None and known > 0:
            resolved.append(known)
        else:
            return f"target copies dim {i} (0) of the intermediate shape, which is not known"
    return resolved


def _first(node: Node) -> Optional[Node]:
    """The shape-only node feeding this shape-only node, if any."""
    if node.op not in SHAPE_ONLY or not node.inputs or (node.op == "Reshape" and len(node.inputs) < 2):
        return None
    first = sole_producer(node.inputs[0])
    if first is None or first.op not in SHAPE_ONLY or not is_standard(first) or not first.inputs:
        return None
    return first


def _copies_unknown_dim(node: Node) -> bool:
    """A merge candidate whose target copies a dim (0) of an intermediate of unknown shape."""
    first = _first(node)
    if first is None or node.op != "Reshape":
        return False
    target = _target(node)
    return (target is not None and 0 in target and not attr(node, "allowzero", 0)
            and first.outputs[0].shape is None)


def _needs_static_shape(graph: gs.Graph, node: Node) -> bool:
    """A Squeeze/Unsqueeze/Flatten fed by a single-reader shape-only op, whose static output shape
    is not known yet (shapes, once known, stay true: lossless rewrites never change a value)."""
    if node.op == "Reshape" or not is_standard(node) or static_shape(node.outputs[0]) is not None:
        return False
    first = _first(node)
    return first is not None and single_consumer(graph, first.outputs[0]) is node


def _merge_static(first: Node, node: Node, graph: gs.Graph) -> Edit | str:
    """Replace `node` by Reshape(first's input, node's static output shape) when `first` dies."""
    if single_consumer(graph, first.outputs[0]) is not node:
        return f"{first.op} -> {node.op}: {first.op} has other readers, so merging would not remove a node"
    shape = static_shape(node.outputs[0])
    if shape is None:
        return f"{first.op} -> {node.op}: output shape is not fully static"
    target = make_constant(graph, f"{node.name}_shape", np.array(shape, dtype=np.int64))
    return Edit(add=[NewNode("Reshape", [first.inputs[0], target], [node.outputs[0]], name=node.name)],
                remove=[node])


class MergeReshapes(RewritePass):
    name = "merge_reshapes"
    description = ("skip a Reshape/Flatten/Squeeze/Unsqueeze feeding a Reshape whose target is input-independent, "
                   "or feeding a shape-only op of static output shape")
    stage = "simplify"
    order = 310
    anchors = SHAPE_ONLY

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        if any(_copies_unknown_dim(n) or _needs_static_shape(g, n) for g in walk_graphs(graph) for n in g.nodes):
            ensure_shapes(graph, ctx)
        return super().run(graph, ctx)

    def plan(self, node: Node, graph: gs.Graph, ctx: PassContext) -> Optional[Edit | str]:
        first = _first(node)
        if first is None:
            return None
        if node.op != "Reshape":
            return _merge_static(first, node, graph) if ctx.opset >= 5 else "Reshape needs opset >= 5"
        target = resolve_target(first, node)
        if isinstance(target, str):
            merged = _merge_static(first, node, graph)
            return merged if isinstance(merged, Edit) else target
        shape = node.inputs[1]
        if target != _target(node):
            shape = make_constant(graph, f"{node.name}_shape", np.array(target, dtype=np.int64))
        return Edit(add=[NewNode("Reshape", [first.inputs[0], shape], [node.outputs[0]], dict(node.attrs),
                                    name=node.name)],
                    remove=[node])
