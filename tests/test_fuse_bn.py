"""fuse_conv_bn, fuse_convtranspose_bn, fuse_gemm_bn: BatchNormalization folded into its producer."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from util import assert_same_outputs, make_model, ops, optimize_with, pass_stats, tensor, vinfo

RNG = np.random.default_rng(42)


def bn_params(c: int, prefix: str = "bn", dtype=np.float32) -> list[onnx.TensorProto]:
    """Realistic inference statistics: scale/B/mean ~ N(0, 1), var in [0.5, 2]."""
    values = {"scale": RNG.standard_normal(c), "B": RNG.standard_normal(c),
              "mean": RNG.standard_normal(c), "var": RNG.uniform(0.5, 2.0, c)}
    return [tensor(f"{prefix}_{k}", v.astype(dtype)) for k, v in values.items()]


def bn_node(x: str, y: str, prefix: str = "bn", extra_outputs=(), **attrs) -> onnx.NodeProto:
    inputs = [x] + [f"{prefix}_{k}" for k in ("scale", "B", "mean", "var")]
    return helper.make_node("BatchNormalization", inputs, [y, *extra_outputs], **attrs)


def rnd(*shape, dtype=np.float32) -> np.ndarray:
    return RNG.standard_normal(shape).astype(dtype)


def fuse(model, name, expected_ops, rtol=1e-4, atol=1e-5):
    out, report = optimize_with(model, [name, "eliminate_dead_code"], debug=True)
    assert ops(out) == expected_ops
    assert report.validation["status"] == "passed"
    assert_same_outputs(model, out, rtol=rtol, atol=atol)
    return out, report


def declined(model, name, reason_part):
    out, report = optimize_with(model, [name, "eliminate_dead_code"], debug=True)
    assert ops(out) == ops(model)
    reasons = pass_stats(report, name)["rejections"]
    assert any(reason_part in r for r in reasons), reasons
    assert_same_outputs(model, out)
    return out


def init_values(model) -> dict:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


# ----------------------------------------------------------------------------- Conv + BN
@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("bias", [False, True])
def test_conv_bn(dims, group, bias):
    c_in, c_out, k = 4, 4, 3
    w = rnd(c_out, c_in // group, *[k] * dims)
    inits = [tensor("w", w)] + bn_params(c_out) + ([tensor("b", rnd(c_out))] if bias else [])
    conv = helper.make_node("Conv", ["x", "w"] + (["b"] if bias else []), ["c"], group=group, pads=[1] * 2 * dims)
    spatial = [5] * dims
    model = make_model([conv, bn_node("c", "y", epsilon=1e-3)], [vinfo("x", [2, c_in] + spatial)],
                       [vinfo("y", [2, c_out] + spatial)], inits)
    out, report = fuse(model, "fuse_conv_bn", ["Conv"])
    assert pass_stats(report, "fuse_conv_bn")["rewrites"] == 1
    assert len(out.graph.node[0].input) == 3  # BN's shift became the bias


def test_conv_bn_chain_with_downstream_consumers():
    """Two Conv+BN+Relu blocks: fused nodes must come before their readers (topological order)."""
    inits = [tensor("w1", rnd(3, 2, 3, 3)), tensor("w2", rnd(3, 3, 1, 1))] + bn_params(3, "bn1") + bn_params(3, "bn2")
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]), bn_node("c1", "n1", "bn1"),
             helper.make_node("Relu", ["n1"], ["r1"]), helper.make_node("Conv", ["r1", "w2"], ["c2"]),
             bn_node("c2", "n2", "bn2"), helper.make_node("Relu", ["n2"], ["y"])]
    model = make_model(nodes, [vinfo("x", [1, 2, 5, 5])], [vinfo("y", [1, 3, 5, 5])], inits)
    fuse(model, "fuse_conv_bn", ["Conv", "Relu", "Conv", "Relu"])


def test_conv_bn_weights_in_constant_nodes():
    """Paddle keeps weights and BN statistics in Constant nodes."""
    params = bn_params(3)
    nodes = [helper.make_node("Constant", [], ["w"], value=tensor("w", rnd(3, 2, 3, 3))),
             helper.make_node("Constant", [], ["b"], value=tensor("b", rnd(3)))]
    nodes += [helper.make_node("Constant", [], [p.name], value=p) for p in params]
    nodes += [helper.make_node("Conv", ["x", "w", "b"], ["c"]), bn_node("c", "y")]
    model = make_model(nodes, [vinfo("x", [1, 2, 6, 6])], [vinfo("y", [1, 3, 4, 4])])
    fuse(model, "fuse_conv_bn", ["Conv"])


def test_conv_bn_shared_weight_keeps_other_consumer():
    w, b = rnd(3, 2, 3, 3), rnd(3)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c1"]), bn_node("c1", "y1"),
             helper.make_node("Conv", ["x", "w", "b"], ["y2"])]
    model = make_model(nodes, [vinfo("x", [1, 2, 6, 6])], [vinfo("y1", [1, 3, 4, 4]), vinfo("y2", [1, 3, 4, 4])],
                       [tensor("w", w), tensor("b", b)] + bn_params(3))
    out, _ = fuse(model, "fuse_conv_bn", ["Conv", "Conv"])
    values = init_values(out)
    other = next(n for n in out.graph.node if n.output[0] == "y2")
    assert list(other.input) == ["x", "w", "b"]
    np.testing.assert_array_equal(values["w"], w)
    np.testing.assert_array_equal(values["b"], b)
    fused = next(n for n in out.graph.node if n.output[0] == "y1")
    assert fused.input[1] != "w" and fused.input[2] != "b"


def test_conv_bn_float16():
    inits = [tensor("w", rnd(4, 3, 3, 3, dtype=np.float16)), tensor("b", rnd(4, dtype=np.float16))]
    inits += bn_params(4, dtype=np.float16)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"]), bn_node("c", "y")]
    model = make_model(nodes, [vinfo("x", [1, 3, 6, 6], TensorProto.FLOAT16)],
                       [vinfo("y", [1, 4, 4, 4], TensorProto.FLOAT16)], inits)
    out, report = optimize_with(model, ["fuse_conv_bn", "eliminate_dead_code"], rtol=1e-2, atol=1e-2, debug=True)
    assert ops(out) == ["Conv"]
    assert init_values(out)[out.graph.node[0].input[1]].dtype == np.float16
    assert_same_outputs(model, out, rtol=1e-2, atol=1e-2)


def test_conv_bn_opset7_spatial():
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), bn_node("c", "y", spatial=1)]
    model = make_model(nodes, [vinfo("x", [1, 2, 5, 5])], [vinfo("y", [1, 3, 3, 3])],
                       [tensor("w", rnd(3, 2, 3, 3))] + bn_params(3), opset=7)
    fuse(model, "fuse_conv_bn", ["Conv"])


@pytest.mark.parametrize("outer_weights", [False, True])
def test_conv_bn_in_if_branch(outer_weights):
    """Weights inside the branch, or read from the outer scope (and shared with the else branch)."""
    weights = [tensor("w", rnd(3, 2, 3, 3))] + bn_params(3)
    branch_nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), bn_node("c", "t")]
    then = helper.make_graph(branch_nodes, "then", [], [vinfo("t", [1, 3, 3, 3])], [] if outer_weights else weights)
    other_w = "w" if outer_weights else "w2"
    other = helper.make_graph([helper.make_node("Conv", ["x", other_w], ["e"])], "else", [],
                              [vinfo("e", [1, 3, 3, 3])], [] if outer_weights else [tensor("w2", rnd(3, 2, 3, 3))])
    node = helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other)
    model = make_model([node], [vinfo("cond", [], TensorProto.BOOL), vinfo("x", [1, 2, 5, 5])],
                       [vinfo("y", [1, 3, 3, 3])], weights if outer_weights else [])
    out, report = optimize_with(model, ["fuse_conv_bn", "eliminate_dead_code"], debug=True)
    assert pass_stats(report, "fuse_conv_bn")["rewrites"] == 1
    branch = out.graph.node[0].attribute[0].g
    assert [n.op_type for n in branch.node] == ["Conv"]
    x = rnd(1, 2, 5, 5)
    feeds = [{"cond": np.array(flag), "x": x} for flag in (True, False)]
    assert_same_outputs(model, out, feeds=feeds)


# ----------------------------------------------------------------------------- Conv + BN declines
def test_decline_training_mode():
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), bn_node("c", "y", extra_outputs=["rm", "rv"], training_mode=1)]
    model = make_model(nodes, [vinfo("x", [2, 2, 5, 5])], [vinfo("y", [2, 3, 3, 3])],
                       [tensor("w", rnd(3, 2, 3, 3))] + bn_params(3))
    declined(model, "fuse_conv_bn", "training_mode")


def test_decline_conv_output_consumed_twice():
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), bn_node("c", "y"), helper.make_node("Relu", ["c"], ["r"])]
    model = make_model(nodes, [vinfo("x", [1, 2, 5, 5])], [vinfo("y", [1, 3, 3, 3]), vinfo("r", [1, 3, 3, 3])],
                       [tensor("w", rnd(3, 2, 3, 3))] + bn_params(3))
    declined(model, "fuse_conv_bn", "other consumers")


def test_decline_conv_output_is_graph_output():
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), bn_node("c", "y")]
    model = make_model(nodes, [vinfo("x", [1, 2, 5, 5])], [vinfo("y", [1, 3, 3, 3]), vinfo("c", [1, 3, 3, 3])],
                       [tensor("w", rnd(3, 2, 3, 3))] + bn_params(3))
    declined(model, "fuse_conv_bn", "graph output")


def test_decline_non_constant_bn_params():
    params = bn_params(3)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), bn_node("c", "y")]
    model = make_model(nodes, [vinfo("x", [1, 2, 5, 5]), vinfo("bn_scale", [3])], [vinfo("y", [1, 3, 3, 3])],
                       [tensor("w", rnd(3, 2, 3, 3))] + params[1:])
    declined(model, "fuse_conv_bn", "not float constants")


def test_decline_non_constant_conv_weight():
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), bn_node("c", "y")]
    model = make_model(nodes, [vinfo("x", [1, 2, 5, 5]), vinfo("w", [3, 2, 3, 3])], [vinfo("y", [1, 3, 3, 3])], bn_params(3))
    declined(model, "fuse_conv_bn", "weight is not a float constant")


def test_decline_spatial_0_opset7():
    c, h = 3, 3
    per_activation = {k: (RNG.uniform(0.5, 2, (c, h, h)) if k == "var" else RNG.standard_normal((c, h, h)))
                      for k in ("scale", "B", "mean", "var")}
    inits = [tensor("w", rnd(c, 2, 3, 3))] + [tensor(f"bn_{k}", v.astype(np.float32)) for k, v in per_activation.items()]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), bn_node("c", "y", spatial=0)]
    model = make_model(nodes, [vinfo("x", [1, 2, 5, 5])], [vinfo("y", [1, c, h, h])], inits, opset=7)
    declined(model, "fuse_conv_bn", "spatial=0")


def test_bn_after_other_op_is_left_alone():
    nodes = [helper.make_node("Relu", ["x"], ["r"]), bn_node("r", "y")]
    model = make_model(nodes, [vinfo("x", [1, 3, 4, 4])], [vinfo("y", [1, 3, 4, 4])], bn_params(3))
    out, report = optimize_with(model, ["fuse_conv_bn", "fuse_convtranspose_bn", "fuse_gemm_bn"], debug=True)
    assert ops(out) == ["Relu", "BatchNormalization"]
    assert all(not pass_stats(report, p)["rejections"] for p in ("fuse_conv_bn", "fuse_convtranspose_bn", "fuse_gemm_bn"))


# ----------------------------------------------------------------------------- ConvTranspose + BN
@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dims", [1, 2])
def test_convtranspose_bn(group, bias, dims):
    c_in, c_out = 4, 4 if group == 4 else 6
    w = rnd(c_in, c_out // group, *[3] * dims)
    inits = [tensor("w", w)] + bn_params(c_out) + ([tensor("b", rnd(c_out))] if bias else [])
    conv = helper.make_node("ConvTranspose", ["x", "w"] + (["b"] if bias else []), ["c"], group=group,
                            strides=[2] * dims, output_padding=[1] * dims)
    nodes = [conv, bn_node("c", "n"), helper.make_node("Relu", ["n"], ["y"])]
    model = make_model(nodes, [vinfo("x", [2, c_in] + [4] * dims)], [vinfo("y", [2, c_out] + [9] * dims)], inits)
    fuse(model, "fuse_convtranspose_bn", ["ConvTranspose", "Relu"])


def test_convtranspose_bn_shared_weight():
    w = rnd(4, 3, 3, 3)
    nodes = [helper.make_node("ConvTranspose", ["x", "w"], ["c"]), bn_node("c", "y1"),
             helper.make_node("ConvTranspose", ["x", "w"], ["y2"])]
    model = make_model(nodes, [vinfo("x", [1, 4, 4, 4])], [vinfo("y1", [1, 3, 6, 6]), vinfo("y2", [1, 3, 6, 6])],
                       [tensor("w", w)] + bn_params(3))
    out, _ = fuse(model, "fuse_convtranspose_bn", ["ConvTranspose", "ConvTranspose"])
    np.testing.assert_array_equal(init_values(out)["w"], w)


# ----------------------------------------------------------------------------- Gemm / MatMul + BN
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("c_shape", [None, [], [1], [6], [1, 6], [5, 6], [5, 1]])
def test_gemm_bn(trans_b, c_shape):
    m, k, n = 5, 4, 6
    inits = [tensor("B", rnd(n, k) if trans_b else rnd(k, n))] + bn_params(n)
    inputs = ["a", "B"]
    if c_shape is not None:
        inits.append(tensor("C", rnd(*c_shape)))
        inputs.append("C")
    gemm = helper.make_node("Gemm", inputs, ["g"], transB=trans_b, alpha=0.7, beta=1.3)
    model = make_model([gemm, bn_node("g", "y")], [vinfo("a", [m, k])], [vinfo("y", [m, n])], inits)
    out, _ = fuse(model, "fuse_gemm_bn", ["Gemm"])
    c_out = init_values(out)[out.graph.node[0].input[2]]
    assert c_out.shape == ((m, n) if c_shape in ([5, 6], [5, 1]) else (n,))


def test_gemm_bn_trans_a_constant_node_weight():
    nodes = [helper.make_node("Constant", [], ["B"], value=tensor("B", rnd(4, 6))),
             helper.make_node("Gemm", ["a", "B"], ["g"], transA=1), bn_node("g", "y")]
    model = make_model(nodes, [vinfo("a", [4, 5])], [vinfo("y", [5, 6])], bn_params(6))
    fuse(model, "fuse_gemm_bn", ["Gemm"])


def test_gemm_bn_shared_weight():
    b = rnd(4, 6)
    nodes = [helper.make_node("Gemm", ["a", "B"], ["g"]), bn_node("g", "y1"), helper.make_node("Gemm", ["a", "B"], ["y2"])]
    model = make_model(nodes, [vinfo("a", [3, 4])], [vinfo("y1", [3, 6]), vinfo("y2", [3, 6])], [tensor("B", b)] + bn_params(6))
    out, _ = fuse(model, "fuse_gemm_bn", ["Gemm", "Gemm"])
    np.testing.assert_array_equal(init_values(out)["B"], b)


def test_matmul_bn_becomes_gemm():
    nodes = [helper.make_node("MatMul", ["a", "W"], ["m"]), bn_node("m", "y")]
    model = make_model(nodes, [vinfo("a", [3, 4])], [vinfo("y", [3, 6])], [tensor("W", rnd(4, 6))] + bn_params(6))
    fuse(model, "fuse_gemm_bn", ["Gemm"])


def test_gemm_bn_with_downstream_consumer():
    nodes = [helper.make_node("Gemm", ["a", "B"], ["g"], transB=1), bn_node("g", "n"), helper.make_node("Relu", ["n"], ["y"])]
    model = make_model(nodes, [vinfo("a", [3, 4])], [vinfo("y", [3, 6])], [tensor("B", rnd(6, 4))] + bn_params(6))
    fuse(model, "fuse_gemm_bn", ["Gemm", "Relu"])


def test_matmul_bn_rank_found_by_shape_inference():
    nodes = [helper.make_node("Relu", ["a"], ["r"]), helper.make_node("MatMul", ["r", "W"], ["m"]), bn_node("m", "y")]
    model = make_model(nodes, [vinfo("a", [3, 4])], [vinfo("y", [3, 6])], [tensor("W", rnd(4, 6))] + bn_params(6))
    fuse(model, "fuse_gemm_bn", ["Relu", "Gemm"])


def test_matmul_bn_rank3_declined_even_when_sizes_match():
    """[B, T, N] with T == N: BN scales axis 1 (T), folding into W would scale N: wrong."""
    nodes = [helper.make_node("MatMul", ["a", "W"], ["m"]), bn_node("m", "y")]
    model = make_model(nodes, [vinfo("a", [2, 6, 4])], [vinfo("y", [2, 6, 6])], [tensor("W", rnd(4, 6))] + bn_params(6))
    declined(model, "fuse_gemm_bn", "not the weight's feature axis")


def test_matmul_bn_declines_constant_on_the_left():
    nodes = [helper.make_node("MatMul", ["W", "a"], ["m"]), bn_node("m", "y")]
    model = make_model(nodes, [vinfo("a", [4, 6])], [vinfo("y", [3, 6])], [tensor("W", rnd(3, 4))] + bn_params(6))
    declined(model, "fuse_gemm_bn", "right operand")


def test_gemm_bn_declines_training_mode_and_non_constant_c():
    nodes = [helper.make_node("Gemm", ["a", "B", "c"], ["g"]), bn_node("g", "y")]
    model = make_model(nodes, [vinfo("a", [3, 4]), vinfo("c", [6])], [vinfo("y", [3, 6])], [tensor("B", rnd(4, 6))] + bn_params(6))
    declined(model, "fuse_gemm_bn", "Gemm C is not a float constant")
    nodes = [helper.make_node("Gemm", ["a", "B"], ["g"]), bn_node("g", "y", extra_outputs=["rm", "rv"], training_mode=1)]
    model = make_model(nodes, [vinfo("a", [3, 4])], [vinfo("y", [3, 6])], [tensor("B", rnd(4, 6))] + bn_params(6))
    declined(model, "fuse_gemm_bn", "training_mode")
