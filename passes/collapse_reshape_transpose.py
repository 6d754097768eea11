"""Reshape -> Transpose -> Reshape that only regroups axes becomes one Transpose.

Exporters write a transpose of the last two axes of a [B, H, S, D] tensor as
Reshape([B*H, S, D]) -> Transpose([0, 2, 1]) -> Reshape([B, H, D, S]) (the dynamo exporter's
key path in attention). The three nodes move elements exactly like Transpose(x, [0, 1, 3, 2]).
In general, with x of static shape S and the last Reshape giving a shape of the same rank, the
chain equals Transpose(x, q) when the element order it produces is that of some permutation q
of x's axes. q is read from the strides of the chain's output axes and then checked on an index
array (arange over x's elements pushed through the chain), so only an exact match is rewritten.

Removes the last Reshape and the Transpose (the first Reshape too when nothing else reads it);
a resulting Transpose next to another is then merged by merge_transposes. Declined: shapes not
fully static, a result of another rank than x, a Transpose read by other nodes, an index check
above MAX_ELEMENTS elements.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim_opt.graph import (Edit, NewNode, Node, attr, bypass, is_standard, single_consumer, sole_producer,
                                static_shape, walk_graphs)
from onnxslim_opt.pass_api import PassContext, PassResult, RewritePass
from onnxslim_opt.shape_inference import ensure_shapes

#: largest tensor whose index array is built to check the rewrite (int64: 32 MiB)
MAX_ELEMENTS = 1 << 22


def _is(node: Optional[Node], op: str) -> bool:
    return node is not None and node.op == op and is_standard(node)


def chain_permutation(shape: list[int], mid: list[int], perm: list[int], out: list[int]) -> Optional[list[int]]:
    """q with reshape(transpose(reshape(x, mid), perm), out) == transpose(x, q) for every x of `shape`, or None."""
    if len(out) != len(shape) or sorted(perm) != list(range(len(mid))):
        return None
    size = int(np.prod(shape))
    if size == 0 or size > MAX_ELEMENTS or int(np.prod(mid)) != size or int(np.prod(out)) != size:
        return None
    index = np.arange(size, dtype=np.int64)
    chained = index.reshape(mid).transpose(perm).reshape(out)
    strides = [int(np.prod(shape[i + 1:])) for i in range(len(shape))]
    q: list[Optional[int]] = [None] * len(out)
    free = set(range(len(shape)))
    for j, d in enumerate(out):
        if d == 1:
            continue
        step = np.zeros(len(out), dtype=np.int64)
        step[j] = 1
        stride = int(chained[tuple(step)] - chained[(0,) * len(out)])
        axis = next((i for i in sorted(free) if strides[i] == stride and shape[i] == d), None)
        if axis is None:
            return None
        q[j] = axis
        free.discard(axis)
    units = iter(sorted(i for i in free if shape[i] == 1))
    q = [next(units, None) if a is None else a for a in q]
    if any(a is None for a in q):
        return None
    if not np.array_equal(index.reshape(shape).transpose(q), chained):
        return None
    return [int(a) for a in q]


class CollapseReshapeTranspose(RewritePass):
    name = "collapse_reshape_transpose"
    description = "turn Reshape -> Transpose -> Reshape that only regroups axes into one Transpose"
    stage = "simplify"
    order = 320
    anchors = ("Transpose",)

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        if any(_is(n, "Transpose") and n.inputs and _is(sole_producer(n.inputs[0]), "Reshape")
               for g in walk_graphs(graph) for n in g.nodes):
            ensure_shapes(graph, ctx)  # the rewrite needs static shapes; fills them in place
        return super().run(graph, ctx)

    def plan(self, node: Node, graph: gs.Graph, ctx: PassContext) -> Optional[Edit | str]:
        if not node.inputs or not node.outputs:
            return None
        first = sole_producer(node.inputs[0])
        last = single_consumer(graph, node.outputs[0])
        if not _is(first, "Reshape") or not _is(last, "Reshape") or last.inputs[0] is not node.outputs[0]:
            return None
        x = first.inputs[0]
        shapes = [static_shape(t) for t in (x, node.inputs[0], last.outputs[0])]
        if any(s is None for s in shapes):
            return "Reshape -> Transpose -> Reshape: shapes are not fully static"
        shape, mid, out = shapes
        perm = attr(node, "perm")
        perm = list(range(len(mid)))[::-1] if perm is None else [int(p) for p in perm]
        if len(out) != len(shape):
            return f"Reshape -> Transpose -> Reshape changes the rank ({len(shape)} -> {len(out)})"
        if int(np.prod(shape)) > MAX_ELEMENTS:
            return f"Reshape -> Transpose -> Reshape: over {MAX_ELEMENTS} elements, not checked"
        q = chain_permutation(shape, mid, perm, out)
        if q is None:
            return "Reshape -> Transpose -> Reshape is not a permutation of the input's axes"
        if q == sorted(q):
            edit = bypass(graph, last, x)
            if isinstance(edit, Edit):
                edit.remove.append(node)
            return edit
        merged = NewNode("Transpose", [x], list(last.outputs), {"perm": q}, name=last.name)
        return Edit(add=[merged], remove=[last, node])
