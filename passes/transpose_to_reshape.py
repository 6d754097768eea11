"""A Transpose that only moves size-1 axes becomes a Reshape.

When the axes of size other than 1 keep their relative order, the elements are laid out in
memory exactly as before: the Transpose moves no data and equals Reshape(x, output shape). The
node count stays the same, but Reshapes merge with neighbouring Reshapes/Squeezes/Unsqueezes
(merge_reshapes) where a Transpose would not: e.g. the [S, 1, D] <-> [1, S, D] Transposes around
attention blocks. Needs a fully static input shape (the Reshape target is that shape permuted).
A Transpose next to another Transpose is left to merge_transposes, which removes a node.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim_opt.graph import (Edit, NewNode, Node, attr, is_standard, make_constant, single_consumer,
                                sole_producer, static_shape, walk_graphs)
from onnxslim_opt.pass_api import PassContext, PassResult, RewritePass
from onnxslim_opt.shape_inference import ensure_shapes


def moves_only_unit_axes(shape: list[int], perm: list[int]) -> bool:
    """True when the non-1 axes appear in `perm` in increasing order (no data moves)."""
    moved = [p for p in perm if shape[p] != 1]
    return moved == sorted(moved)


def _is_transpose(node: Optional[Node]) -> bool:
    return node is not None and node.op == "Transpose" and is_standard(node)


class TransposeToReshape(RewritePass):
    name = "transpose_to_reshape"
    description = "turn a Transpose that only moves size-1 axes into a Reshape"
    stage = "simplify"
    order = 410
    anchors = ("Transpose",)

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        # the rewrite needs static input shapes; known ones stay true (lossless rewrites keep values)
        if any(_is_transpose(n) and n.inputs and static_shape(n.inputs[0]) is None
               for g in walk_graphs(graph) for n in g.nodes):
            ensure_shapes(graph, ctx)
        return super().run(graph, ctx)

    def plan(self, node: Node, graph: gs.Graph, ctx: PassContext) -> Optional[Edit | str]:
        if not node.inputs or not node.outputs:
            return None
        x = node.inputs[0]
        if isinstance(x, gs.Constant):
            return None  # fold_constants' job
        shape = static_shape(x)
        if shape is None:
            return "input shape is not fully static"
        perm = attr(node, "perm")
        perm = list(range(len(shape)))[::-1] if perm is None else [int(p) for p in perm]
        if sorted(perm) != list(range(len(shape))):
            return f"perm {perm} is not a permutation of the input's rank {len(shape)}"
        if perm == sorted(perm):
            return None  # identity: eliminate_noops' job
        if not moves_only_unit_axes(shape, perm):
            return None  # a real data movement, not a candidate
        if _is_transpose(sole_producer(x)) or _is_transpose(single_consumer(graph, node.outputs[0])):
            return "next to another Transpose: left to merge_transposes"
        if ctx.opset < 5:
            return "Reshape with a shape input needs opset >= 5"
        target = make_constant(graph, f"{node.name}_shape", np.array([shape[p] for p in perm], dtype=np.int64))
        return Edit(add=[NewNode("Reshape", [x, target], [node.outputs[0]], name=node.name)], remove=[node])
