import numpy as np
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper

from onnxslim_opt.pass_api import PassContext
from passes.override_input_shapes import OverrideInputShapes
from util import assert_same_outputs, make_model, optimize_with, ops, pass_stats, tensor, vinfo

PASSES = ["override_input_shapes", "fold_constants", "eliminate_dead_code"]


def dims(value_info):
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in value_info.type.tensor_type.shape.dim]


def dynamic_reshape_model():
    """x [N,3,8,8] -> Reshape(x, Concat(Shape(x)[0], -1)) -> Relu, plus Size(x) as a second output."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "i0"], ["b"], axis=0),
        helper.make_node("Unsqueeze", ["b", "ax"], ["bu"]),
        helper.make_node("Concat", ["bu", "m1"], ["shp"], axis=0),
        helper.make_node("Reshape", ["x", "shp"], ["r"]),
        helper.make_node("Relu", ["r"], ["y"]),
        helper.make_node("Size", ["x"], ["n"]),
    ]
    inits = [tensor("i0", np.array(0, np.int64)), tensor("ax", np.array([0], np.int64)), tensor("m1", np.array([-1], np.int64))]
    return make_model(nodes, [vinfo("x", ["N", 3, 8, 8])], [vinfo("y", ["N", 192]), vinfo("n", [], TensorProto.INT64)], inits)


def test_fixed_input_shape_lets_the_shape_chain_fold():
    model = dynamic_reshape_model()
    out, report = optimize_with(model, PASSES, input_shapes={"x": (1, 3, 8, 8)})
    assert report.validation["status"] == "passed"
    assert ops(out) == ["Reshape", "Relu"]
    assert dims(out.graph.input[0]) == [1, 3, 8, 8]
    assert dims(out.graph.output[0]) == [1, 192]
    assert pass_stats(report, "override_input_shapes")["rewrites"] == 1
    assert_same_outputs(model, out, shapes={"x": (1, 3, 8, 8)})


def test_without_override_nothing_folds():
    model = dynamic_reshape_model()
    out, _ = optimize_with(model, PASSES)
    assert sorted(ops(out)) == sorted(ops(model))  # (gs cleanup may reorder nodes)
    assert dims(out.graph.input[0]) == ["N", 3, 8, 8]


def test_default_pipeline_entry():
    # None = the default pipeline; whatever else it holds, the chain must end up folded
    model = dynamic_reshape_model()
    out, report = optimize_with(model, None, input_shapes={"x": (2, 3, 8, 8)})
    assert report.validation["status"] == "passed"
    assert "Shape" not in ops(out) and "Concat" not in ops(out)
    assert dims(out.graph.input[0]) == [2, 3, 8, 8]


def test_conflicting_or_unknown_overrides_are_guarded():
    graph = gs.import_onnx(make_model([helper.make_node("Relu", ["x"], ["y"])], [vinfo("x", [2, "W"])], [vinfo("y", [2, "W"])]))
    ctx = PassContext(opset=17, input_shapes={"x": (4, 5), "nope": (1,)})
    result = OverrideInputShapes().run(graph, ctx)
    assert not result.changed
    assert graph.inputs[0].shape == [2, "W"]
    assert any("fixed to 2" in n for n in result.notes) and any("nope" in n for n in result.notes)
    result = OverrideInputShapes().run(graph, PassContext(opset=17, input_shapes={"x": (2, 5, 1)}))
    assert not result.changed and any("rank" in n for n in result.notes)
    result = OverrideInputShapes().run(graph, PassContext(opset=17, input_shapes={"x": (2, 5)}))
    assert result.changed and graph.inputs[0].shape == [2, 5] and graph.outputs[0].shape == [2, 5]
    assert not OverrideInputShapes().run(graph, PassContext(opset=17, input_shapes={"x": (2, 5)})).changed
