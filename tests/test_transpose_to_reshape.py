import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from util import check_rewrite, assert_same_outputs, make_model, optimize_with, ops, pass_stats, tensor, vinfo

N = helper.make_node
PASSES = ["transpose_to_reshape", "eliminate_dead_code"]


def transpose(x_shape, perm, y_shape, extra=(), outputs=()):
    attrs = {} if perm is None else {"perm": perm}
    nodes = [N("Transpose", ["x"], ["t"], **attrs), N("Neg", ["t"], ["y"]), *extra]
    return make_model(nodes, [vinfo("x", list(x_shape))], [vinfo("y", list(y_shape)), *outputs])


def check(model, expect, passes=PASSES):
    return check_rewrite(model, passes, expect, "transpose_to_reshape")


def rejections(report):
    return pass_stats(report, "transpose_to_reshape")["rejections"]


@pytest.mark.parametrize("x_shape, perm, y_shape", [
    ((1, 8, 16), [1, 0, 2], (8, 1, 16)),
    ((8, 1, 16), [1, 0, 2], (1, 8, 16)),
    ((2, 1, 3, 1), [0, 3, 2, 1], (2, 1, 3, 1)),
    ((1, 5, 1), None, (1, 5, 1)),  # default perm (reversal) of a single non-1 axis
])
def test_unit_axis_transpose_becomes_reshape(x_shape, perm, y_shape):
    out, _ = check(transpose(x_shape, perm, y_shape), ["Reshape", "Neg"])
    shape = onnx.numpy_helper.to_array(next(t for t in out.graph.initializer if t.name == out.graph.node[0].input[1]))
    assert shape.tolist() == list(y_shape)


def test_graph_output_keeps_its_name():
    model = make_model([N("Transpose", ["x"], ["y"], perm=[1, 0, 2])], [vinfo("x", [1, 4, 3])], [vinfo("y", [4, 1, 3])])
    out, _ = check(model, ["Reshape"])
    assert out.graph.output[0].name == "y"


def test_moving_a_non_unit_axis_is_kept():
    model = transpose((1, 7, 1, 3, 5), [3, 1, 2, 0, 4], (3, 7, 1, 1, 5))
    check(model, ["Transpose", "Neg"])
    check(transpose((2, 3), [1, 0], (3, 2)), ["Transpose", "Neg"])


def test_dynamic_shape_declined():
    model = transpose(("n", 1, 4), [1, 0, 2], (1, "n", 4))
    out, report = optimize_with(model, PASSES)
    assert ops(out) == ["Transpose", "Neg"]
    assert "input shape is not fully static" in rejections(report)
    assert_same_outputs(model, out, shapes={"x": [3, 1, 4]})


def test_next_to_another_transpose_left_to_merge_transposes():
    nodes = [N("Transpose", ["x"], ["a"], perm=[0, 2, 1]), N("Transpose", ["a"], ["t"], perm=[1, 0, 2]),
             N("Neg", ["t"], ["y"])]
    model = make_model(nodes, [vinfo("x", [1, 3, 4])], [vinfo("y", [4, 1, 3])])
    out, report = check(model, ["Transpose", "Transpose", "Neg"])
    assert "next to another Transpose: left to merge_transposes" in rejections(report)


def test_inside_if_branch():
    def branch(tag):
        return helper.make_graph([N("Transpose", ["x"], [tag + "_y"], perm=[1, 0, 2])], tag, [],
                                 [helper.make_tensor_value_info(tag + "_y", TensorProto.FLOAT, None)])
    model = make_model([N("If", ["c"], ["y"], then_branch=branch("t"), else_branch=branch("e"))],
                       [vinfo("c", [], TensorProto.BOOL), vinfo("x", [1, 4, 3])], [vinfo("y", [4, 1, 3])])
    out, _ = optimize_with(model, PASSES)
    for flag in (True, False):
        feed = {"c": np.array(flag), "x": np.random.default_rng(0).standard_normal((1, 4, 3)).astype(np.float32)}
        assert_same_outputs(model, out, feeds=[feed])
    for a in out.graph.node[0].attribute:
        assert [n.op_type for n in a.g.node] == ["Reshape"]


def ort_basic_node_count(model: onnx.ModelProto, tmp_path) -> int:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(tmp_path / "basic.onnx")
    so.log_severity_level = 3
    ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return len(onnx.load(so.optimized_model_filepath).graph.node)


def test_attention_projection_matches_ort_basic(tmp_path):
    # the TorchScript nn.MultiheadAttention in-projection and output of a layer:
    # [1,S,D] -> Transpose -> MatMul+Add -> Reshape [S,1,3,D] -> Unsqueeze -> ... and [S,1,D] -> Transpose back
    s, d = 8, 16
    rng = np.random.default_rng(0)
    nodes = [N("Transpose", ["x"], ["xt"], perm=[1, 0, 2]), N("MatMul", ["xt", "w"], ["mm"]),
             N("Add", ["b", "mm"], ["qkv"]), N("Reshape", ["qkv", "s1"], ["r"]), N("Unsqueeze", ["r", "ax"], ["u"]),
             N("Transpose", ["u"], ["y"], perm=[3, 1, 2, 0, 4]),
             N("Relu", ["x"], ["h"]), N("Reshape", ["h", "s2"], ["o"]), N("Transpose", ["o"], ["z"], perm=[1, 0, 2])]
    inits = [tensor("w", rng.standard_normal((d, 3 * d)).astype(np.float32)),
             tensor("b", rng.standard_normal(3 * d).astype(np.float32)),
             tensor("s1", np.array([s, 1, 3, d], dtype=np.int64)), tensor("ax", np.array([0], dtype=np.int64)),
             tensor("s2", np.array([s, 1, d], dtype=np.int64))]
    model = make_model(nodes, [vinfo("x", [1, s, d])], [vinfo("y", [3, s, 1, 1, d]), vinfo("z", [1, s, d])], inits)
    out, _ = optimize_with(model, ["transpose_to_reshape", "merge_reshapes", "fuse_matmul_add",
                                   "eliminate_noops", "eliminate_dead_code"])
    # in-projection: Reshape (was the Transpose), Gemm, Reshape (+ Unsqueeze); the output Transpose cancels
    assert sorted(ops(out)) == sorted(["Reshape", "Gemm", "Reshape", "Transpose", "Relu"])
    assert len(out.graph.node) <= ort_basic_node_count(model, tmp_path)
    assert_same_outputs(model, out)
