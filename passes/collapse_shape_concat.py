"""A Concat that re-assembles Shape(x) from its pieces becomes Shape(x) (or a sliced Shape).

TorchScript exports rebuild a shape dimension by dimension: Concat(Unsqueeze(Gather(Shape(x), 0)),
Unsqueeze(Gather(Shape(x), 1)), Unsqueeze(Gather(Shape(x), 2))) when x has rank 3 is Shape(x)
itself (Faster R-CNN's box decoding: seven nodes). A piece is, for one tensor x (through a Shape
node without start/end):
  Shape(x)                             -> all dims of x
  Unsqueeze(Gather(Shape(x), i), [0])  -> dim i (i a constant scalar)
  Gather(Shape(x), [i, j, ...])        -> dims i, j, ... (constant 1-D indices)
  Slice(Shape(x), s, e[, [0], [1]])    -> dims s..e-1 (constant bounds, step 1)
When the pieces give dims 0..rank-1 in order, the Concat output is replaced by Shape(x). From
opset 15, Shape has start/end: a run of two or more consecutive pieces giving consecutive dims
becomes one Shape(x, start, end) (the whole Concat when the run covers it). Pieces read by other
nodes stay for them; a run is only rewritten when each of its pieces is read by this Concat only,
so at least two nodes go for the one added. Needs x's rank (from shape inference).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim_opt.graph import (Edit, NewNode, Node, attr, bypass, constant_value, fresh_name, is_standard,
                                optional_input, single_consumer, sole_producer, tensor_shape, walk_graphs)
from onnxslim_opt.pass_api import PassContext, PassResult, RewritePass
from onnxslim_opt.shape_inference import ensure_shapes

Piece = tuple[gs.Tensor, list[int], gs.Tensor]  # (x, dims of x, the Shape(x) output it reads)


def _is(node: Optional[Node], op: str) -> bool:
    return node is not None and node.op == op and is_standard(node)


def _shape_source(t: gs.Tensor) -> Optional[tuple[gs.Tensor, int]]:
    """(x, rank of x) when t = Shape(x) over all dims and x's rank is known."""
    node = sole_producer(t)
    if not _is(node, "Shape") or not node.inputs or "start" in node.attrs or "end" in node.attrs:
        return None
    shape = tensor_shape(node.inputs[0])
    return (node.inputs[0], len(shape)) if shape is not None else None


def _ints(t: Optional[gs.Tensor]) -> Optional[np.ndarray]:
    value = constant_value(t) if t is not None else None
    return None if value is None or value.dtype.kind not in "iu" else value.astype(np.int64)


def _gather_dims(node: Node, rank: int) -> Optional[list[int]]:
    index = _ints(node.inputs[1]) if len(node.inputs) > 1 else None
    if index is None or int(attr(node, "axis", 0)) != 0 or index.ndim > 1:
        return None
    dims = [int(i) + rank if i < 0 else int(i) for i in index.reshape(-1)]
    return dims if all(0 <= d < rank for d in dims) else None


def _slice_dims(node: Node, rank: int, opset: int) -> Optional[list[int]]:
    if opset < 10:
        return None
    starts, ends = _ints(optional_input(node, 1)), _ints(optional_input(node, 2))
    axes, steps = optional_input(node, 3), optional_input(node, 4)
    if starts is None or ends is None or starts.size != 1 or ends.size != 1:
        return None
    if axes is not None and (_ints(axes) is None or [int(a) for a in _ints(axes).reshape(-1)] not in ([0], [-1])):
        return None
    if steps is not None and (_ints(steps) is None or [int(s) for s in _ints(steps).reshape(-1)] != [1]):
        return None
    return list(range(rank))[int(starts[0]):int(ends[0])]


def piece(t: gs.Tensor, ctx: PassContext) -> Optional[Piece]:
    """What `t` is as a piece of some Shape(x), or None."""
    source = _shape_source(t)
    if source is not None:
        return (source[0], list(range(source[1])), t) if source[1] > 0 else None
    node = sole_producer(t)
    if node is None or not is_standard(node) or not node.inputs:
        return None
    if node.op == "Unsqueeze":
        axes = attr(node, "axes") if ctx.opset < 13 else _ints(optional_input(node, 1))
        if axes is None or [int(a) for a in np.asarray(axes).reshape(-1)] not in ([0], [-1]):
            return None
        gather = sole_producer(node.inputs[0])
        source = _shape_source(gather.inputs[0]) if _is(gather, "Gather") else None
        index = _ints(gather.inputs[1]) if source is not None and len(gather.inputs) > 1 else None
        if index is None or index.ndim != 0:
            return None
        dims = _gather_dims(gather, source[1])
        return (source[0], dims, gather.inputs[0]) if dims is not None else None
    source = _shape_source(node.inputs[0])
    if source is None:
        return None
    dims = None
    if node.op == "Gather":
        index = _ints(node.inputs[1]) if len(node.inputs) > 1 else None
        dims = _gather_dims(node, source[1]) if index is not None and index.ndim == 1 else None
    elif node.op == "Slice":
        dims = _slice_dims(node, source[1], ctx.opset)
    return (source[0], dims, node.inputs[0]) if dims else None


def _runs(pieces: list[Optional[Piece]]) -> list[tuple[int, int]]:
    """[begin, end) index ranges of two or more consecutive pieces of one x with consecutive dims."""
    runs, begin = [], 0
    for i in range(1, len(pieces) + 1):
        prev = pieces[i - 1]
        cur = pieces[i] if i < len(pieces) else None
        joins = prev is not None and cur is not None and cur[0] is prev[0] and cur[1][0] == prev[1][-1] + 1
        if not joins:
            if i - begin >= 2 and prev is not None:
                runs.append((begin, i))
            begin = i
    return runs


def _contiguous(dims: list[int]) -> bool:
    return dims == list(range(dims[0], dims[0] + len(dims)))


class CollapseShapeConcat(RewritePass):
    name = "collapse_shape_concat"
    description = "turn a Concat re-assembling Shape(x) from Gather/Slice pieces into Shape(x)"
    stage = "simplify"
    order = 330
    anchors = ("Concat",)

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        if any(_is(n, "Concat") for g in walk_graphs(graph) for n in g.nodes) and \
                any(_is(n, "Shape") for g in walk_graphs(graph) for n in g.nodes):
            ensure_shapes(graph, ctx)  # ranks of the Shape inputs; fills shapes in place
        return super().run(graph, ctx)

    def plan(self, node: Node, graph: gs.Graph, ctx: PassContext) -> Optional[Edit | str]:
        if len(node.inputs) < 2 or not node.outputs or int(attr(node, "axis", 0)) not in (0, -1):
            return None
        found = [piece(t, ctx) for t in node.inputs]
        pieces = [p if p is not None and _contiguous(p[1]) else None for p in found]
        runs = _runs(pieces)
        if not runs:
            return None
        whole = runs[0] == (0, len(pieces))
        if whole:
            x, dims = pieces[0][0], [d for p in pieces for d in p[1]]
            rank = len(tensor_shape(x))
            if dims == list(range(rank)):
                return bypass(graph, node, pieces[0][2])
        if ctx.opset < 15:
            return "pieces of Shape(x) in order: a Shape with start/end needs opset >= 15"
        runs = [r for r in runs if all(single_consumer(graph, node.inputs[i]) is node for i in range(*r))]
        if not runs:
            return "pieces of Shape(x) in order, but read by other nodes too: nothing would be saved"
        edit, inputs, done = Edit(remove=[node]), [], 0
        for begin, end in runs:
            inputs += node.inputs[done:begin]
            x, first, last = pieces[begin][0], pieces[begin][1][0], pieces[end - 1][1][-1]
            out = node.outputs[0] if (begin, end) == (0, len(pieces)) else \
                gs.Variable(fresh_name(graph, f"{node.name}_shape"), dtype=np.int64)
            edit.add.append(NewNode("Shape", [x], [out], {"start": first, "end": last + 1},
                                    name=fresh_name(graph, f"{node.name}_Shape")))
            inputs.append(out)
            done = end
        inputs += node.inputs[done:]
        if len(inputs) > 1:
            edit.add.append(NewNode("Concat", inputs, list(node.outputs), dict(node.attrs), name=node.name))
        return edit
