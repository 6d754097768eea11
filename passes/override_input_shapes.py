"""Fix the shapes of graph inputs named in `--input-shapes`, so later passes see static shapes
(and fold Shape computations that only depended on dynamic dims).

Only dynamic (symbolic or unknown) dims are specialized: a dim the model fixes to another value
is a conflict and the input is left alone, since the original model would reject such inputs.
Shapes of the other tensors are then re-inferred; the outputs get the refined shapes, which
onnx.checker and ONNX Runtime accept.
"""
from __future__ import annotations

import onnx_graphsurgeon as gs

from onnxslim_opt.pass_api import Pass, PassContext, PassResult
from onnxslim_opt.shape_inference import infer_shapes


class OverrideInputShapes(Pass):
    name = "override_input_shapes"
    description = "give graph inputs the static shapes of --input-shapes"
    stage = "prepare"
    order = 20

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        result = PassResult()
        if not ctx.input_shapes:
            return result
        inputs = {t.name: t for t in graph.inputs if isinstance(t, gs.Variable)}
        for name, shape in ctx.input_shapes.items():
            tensor = inputs.get(name)
            if tensor is None:
                result.notes.append(f"--input-shapes names {name!r}, which is not a graph input; ignored")
                continue
            problem = _conflict(tensor.shape, tuple(shape))
            if problem:
                result.notes.append(f"input {name!r} keeps its shape {tensor.shape}: {problem}")
                continue
            new = [int(d) for d in shape]
            if tensor.shape is not None and list(tensor.shape) == new:
                continue
            tensor.shape = new
            result.rewrites += 1
        if result.rewrites:
            infer_shapes(graph)
            result.changed = True
        return result


def _conflict(current, shape: tuple) -> str:
    """Why `shape` cannot replace `current`, or '' if it only specializes dynamic dims."""
    if not all(isinstance(d, int) and d > 0 for d in shape):
        return f"override {shape} must be positive integers"
    if current is None:
        return ""
    if len(current) != len(shape):
        return f"override {shape} has rank {len(shape)}, the input has rank {len(current)}"
    for axis, (old, new) in enumerate(zip(current, shape)):
        if isinstance(old, int) and old > 0 and old != new:
            return f"dim {axis} is fixed to {old} in the model, the override asks for {new}"
    return ""
