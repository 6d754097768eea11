"""Transpose(Transpose(x, p1), p2) becomes Transpose(x, p1[p2]), or x when that is the identity.

The second Transpose is rewritten to read x; the first stays while others read it and is
otherwise left to dead-code elimination. Transposes of constants are fold_constants' job.
"""
from __future__ import annotations

from typing import Optional

import onnx_graphsurgeon as gs

from onnxslim_opt.graph import Edit, NewNode, Node, attr, bypass, is_standard, sole_producer
from onnxslim_opt.pass_api import PassContext, RewritePass


def compose(first: Optional[list[int]], second: Optional[list[int]]) -> Optional[list[int]]:
    """Perm of applying `first` then `second` (None = default reversal); None if unknown."""
    if first is None and second is None:
        return []  # reversing twice: identity at any rank
    rank = len(first if first is not None else second)
    p1 = [int(p) for p in first] if first is not None else list(range(rank))[::-1]
    p2 = [int(p) for p in second] if second is not None else list(range(rank))[::-1]
    if len(p1) != len(p2) or sorted(p1) != list(range(rank)) or sorted(p2) != list(range(rank)):
        return None
    return [p1[j] for j in p2]


class MergeTransposes(RewritePass):
    name = "merge_transposes"
    description = "merge consecutive Transposes into one (or none when they cancel)"
    stage = "simplify"
    order = 300
    anchors = ("Transpose",)

    def plan(self, node: Node, graph: gs.Graph, ctx: PassContext) -> Optional[Edit | str]:
        if not node.inputs:
            return None
        first = sole_producer(node.inputs[0])
        if first is None or first.op != "Transpose" or not is_standard(first) or not first.inputs:
            return None
        perm = compose(attr(first, "perm"), attr(node, "perm"))
        if perm is None:
            return "perms are not permutations of the same rank"
        source = first.inputs[0]
        if perm == list(range(len(perm))):
            return bypass(graph, node, source)
        merged = NewNode("Transpose", [source], [node.outputs[0]], {"perm": perm}, name=node.name)
        return Edit(add=[merged], remove=[node])

