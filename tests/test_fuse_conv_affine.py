"""fuse_conv_affine: per-channel constant Mul/Div/Add/Sub after a Conv folded into its weight and bias."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from util import assert_same_outputs, make_model, ops, optimize_with, pass_stats, tensor, vinfo

RNG = np.random.default_rng(7)
PASSES = ["fuse_conv_affine", "eliminate_dead_code"]


def rnd(*shape, dtype=np.float32) -> np.ndarray:
    return RNG.standard_normal(shape).astype(dtype)


def conv_then(op: str, const: np.ndarray, conv_left: bool = True, bias: bool = True, dims: int = 2):
    """x -> Conv(4 -> 3 channels) -> op(conv, k) (or op(k, conv)) -> y."""
    inits = [tensor("w", rnd(3, 4, *[3] * dims)), tensor("k", const)] + ([tensor("b", rnd(3))] if bias else [])
    operands = ["c", "k"] if conv_left else ["k", "c"]
    nodes = [helper.make_node("Conv", ["x", "w"] + (["b"] if bias else []), ["c"]),
             helper.make_node(op, operands, ["y"])]
    out_shape = [2, 3] + [4] * dims
    return make_model(nodes, [vinfo("x", [2, 4] + [6] * dims)], [vinfo("y", out_shape)], inits)


def fuse(model, expected_ops=("Conv",)):
    out, report = optimize_with(model, PASSES, debug=True)
    assert ops(out) == list(expected_ops)
    assert report.validation["status"] == "passed"
    assert_same_outputs(model, out)
    return out, report


def declined(model, reason_part):
    out, report = optimize_with(model, PASSES, debug=True)
    assert ops(out) == ops(model)
    reasons = pass_stats(report, "fuse_conv_affine")["rejections"]
    assert any(reason_part in r for r in reasons), reasons
    assert_same_outputs(model, out)


CHANNEL_SHAPES = [(3, 1, 1), (1, 3, 1, 1), (), (1,), (1, 1, 1, 1), (1, 1)]


@pytest.mark.parametrize("shape", CHANNEL_SHAPES)
@pytest.mark.parametrize("op", ["Mul", "Add", "Sub", "Div"])
@pytest.mark.parametrize("bias", [False, True])
def test_fold(op, shape, bias):
    const = (RNG.uniform(0.5, 2.0, shape) * RNG.choice([-1, 1], shape)).astype(np.float32)
    out, report = fuse(conv_then(op, const, bias=bias))
    assert pass_stats(report, "fuse_conv_affine")["nodes_added"] == 0


@pytest.mark.parametrize("op", ["Mul", "Add", "Sub"])
def test_constant_on_the_left(op):
    fuse(conv_then(op, rnd(3, 1, 1), conv_left=False))


@pytest.mark.parametrize("dims", [1, 3])
def test_fold_1d_3d(dims):
    fuse(conv_then("Mul", rnd(3, *[1] * dims), dims=dims))


def test_mul_without_bias_adds_no_bias():
    out, _ = fuse(conv_then("Mul", rnd(1, 3, 1, 1), bias=False))
    assert len(out.graph.node[0].input) == 2


def test_add_reuses_weight():
    out, _ = fuse(conv_then("Add", rnd(3, 1, 1), bias=False))
    assert out.graph.node[0].input[1] == "w"


def test_chain_and_grouped_conv_folds_to_one_conv():
    inits = [tensor("w", rnd(4, 1, 3, 3)), tensor("s", rnd(4, 1, 1)), tensor("t", rnd(1, 4, 1, 1)),
             tensor("d", RNG.uniform(1, 2, (4, 1, 1)).astype(np.float32))]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], group=4, pads=[1, 1, 1, 1]),
             helper.make_node("Mul", ["c", "s"], ["m"]), helper.make_node("Add", ["m", "t"], ["a"]),
             helper.make_node("Div", ["a", "d"], ["y"])]
    model = make_model(nodes, [vinfo("x", [1, 4, 5, 5])], [vinfo("y", [1, 4, 5, 5])], inits)
    fuse(model)


def test_constant_nodes():
    nodes = [helper.make_node("Constant", [], ["w"], value=tensor("w", rnd(3, 4, 3, 3))),
             helper.make_node("Constant", [], ["k"], value=tensor("k", rnd(3, 1, 1))),
             helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Mul", ["c", "k"], ["y"])]
    model = make_model(nodes, [vinfo("x", [1, 4, 6, 6])], [vinfo("y", [1, 3, 4, 4])])
    fuse(model)


def test_shared_weight_and_bias_keep_other_consumer():
    w, b = rnd(3, 4, 3, 3), rnd(3)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"]), helper.make_node("Mul", ["c", "k"], ["y1"]),
             helper.make_node("Conv", ["x", "w", "b"], ["y2"])]
    model = make_model(nodes, [vinfo("x", [1, 4, 6, 6])], [vinfo("y1", [1, 3, 4, 4]), vinfo("y2", [1, 3, 4, 4])],
                       [tensor("w", w), tensor("b", b), tensor("k", rnd(3, 1, 1))])
    out, _ = fuse(model, ["Conv", "Conv"])
    values = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    np.testing.assert_array_equal(values["w"], w)
    np.testing.assert_array_equal(values["b"], b)
    assert list(next(n for n in out.graph.node if n.output[0] == "y2").input) == ["x", "w", "b"]


def test_in_loop_body():
    body = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Mul", ["c", "k"], ["m"]),
         helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body", [vinfo("i", [], TensorProto.INT64), vinfo("cond_in", [], TensorProto.BOOL)],
        [vinfo("cond_out", [], TensorProto.BOOL), vinfo("m", [1, 3, 4, 4])])
    node = helper.make_node("Loop", ["n", ""], ["y"], body=body)
    model = make_model([node], [vinfo("n", [], TensorProto.INT64), vinfo("x", [1, 4, 6, 6])],
                       [vinfo("y", [2, 1, 3, 4, 4])], [tensor("w", rnd(3, 4, 3, 3)), tensor("k", rnd(3, 1, 1))])
    out, report = optimize_with(model, PASSES, debug=True)
    assert sorted(n.op_type for n in out.graph.node[0].attribute[0].g.node) == ["Conv", "Identity"]
    assert_same_outputs(model, out, feeds=[{"n": np.array(2, np.int64), "x": rnd(1, 4, 6, 6)}])


# ----------------------------------------------------------------------------- declines
@pytest.mark.parametrize("shape,reason", [
    ((3, 4, 4), "spatial"),             # varies over the spatial dims
    ((3, 1, 4), "spatial"),
    ((1, 4), "spatial"),
    ((2, 3, 1, 1), "batch"),
    ((1, 1, 3, 1, 1), "rank 5"),        # would broadcast the output rank
])
def test_decline_shapes(shape, reason):
    declined(conv_then("Mul", rnd(*shape)), reason)


def test_decline_constant_that_broadcasts_the_output():
    """Conv output [1, 3, 1, 1] + [3, 4, 4] is [1, 3, 4, 4]: folding would change the shape."""
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Add", ["c", "k"], ["y"])]
    model = make_model(nodes, [vinfo("x", [1, 4, 3, 3])], [vinfo("y", [1, 3, 4, 4])],
                       [tensor("w", rnd(3, 4, 3, 3)), tensor("k", rnd(3, 4, 4))])
    declined(model, "spatial")


def test_decline_last_axis_vector():
    """A [4] constant broadcasts along width, not channels."""
    declined(conv_then("Add", rnd(4)), "spatial")


def test_decline_div_constant_by_conv():
    declined(conv_then("Div", rnd(3, 1, 1), conv_left=False), "not affine")


def test_decline_div_by_zero():
    declined(conv_then("Div", np.array([[[1.0]], [[0.0]], [[2.0]]], np.float32)), "zeros")


def test_decline_conv_output_consumed_twice():
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Mul", ["c", "k"], ["y"]),
             helper.make_node("Relu", ["c"], ["r"])]
    model = make_model(nodes, [vinfo("x", [1, 4, 6, 6])], [vinfo("y", [1, 3, 4, 4]), vinfo("r", [1, 3, 4, 4])],
                       [tensor("w", rnd(3, 4, 3, 3)), tensor("k", rnd(3, 1, 1))])
    declined(model, "several consumers")


def test_decline_non_constant_operand():
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Mul", ["c", "k"], ["y"])]
    model = make_model(nodes, [vinfo("x", [1, 4, 6, 6]), vinfo("k", [3, 1, 1])], [vinfo("y", [1, 3, 4, 4])],
                       [tensor("w", rnd(3, 4, 3, 3))])
    declined(model, "not constant")


def test_standalone_batchnorm_and_other_ops_left_alone():
    inits = [tensor(n, RNG.uniform(0.5, 2, 3).astype(np.float32)) for n in ("s", "b", "m", "v")]
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("BatchNormalization", ["r", "s", "b", "m", "v"], ["n"]),
             helper.make_node("Mul", ["n", "s3"], ["y"])]
    model = make_model(nodes, [vinfo("x", [1, 3, 4, 4])], [vinfo("y", [1, 3, 4, 4])],
                       inits + [tensor("s3", rnd(3, 1, 1))])
    out, report = optimize_with(model, PASSES, debug=True)
    assert ops(out) == ["Relu", "BatchNormalization", "Mul"]
    assert not pass_stats(report, "fuse_conv_affine")["rejections"]
