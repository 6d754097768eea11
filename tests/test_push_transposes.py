import numpy as np
import onnx
from onnx import TensorProto, helper

from util import assert_same_outputs, make_model, optimize_with, ops, pass_stats, tensor, vinfo

TO_NCHW, TO_NHWC = [0, 3, 1, 2], [0, 2, 3, 1]
PASSES = ["push_transposes", "eliminate_dead_code"]
RNG = np.random.default_rng(0)


def rand(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def tr(x, y, perm):
    return helper.make_node("Transpose", [x], [y], perm=perm)


def conv_layer(i, x, cin, cout, inits, out=None):
    """tf2onnx-style layer on an NHWC tensor: Transpose, Conv, Transpose back, bias Add, Relu, scale Mul."""
    inits += [tensor(f"w{i}", rand(cout, cin, 3, 3)), tensor(f"b{i}", rand(cout)), tensor(f"s{i}", rand(cout))]
    return [
        tr(x, f"nchw{i}", TO_NCHW),
        helper.make_node("Conv", [f"nchw{i}", f"w{i}"], [f"conv{i}"], pads=[1, 1, 1, 1]),
        tr(f"conv{i}", f"nhwc{i}", TO_NHWC),
        helper.make_node("Add", [f"nhwc{i}", f"b{i}"], [f"add{i}"]),
        helper.make_node("Relu", [f"add{i}"], [f"relu{i}"]),
        helper.make_node("Mul", [f"relu{i}", f"s{i}"], [out or f"h{i}"]),
    ]


def run(model, passes=PASSES, **kw):
    out, report = optimize_with(model, passes, **kw)
    if kw.get("validate", True):
        assert report.validation["status"] == "passed"
        assert_same_outputs(model, out)
    return out, report


def test_tf2onnx_chain_keeps_only_boundary_transposes():
    inits, nodes, x, chans = [], [], "x", [3, 4, 5, 6, 2]
    for i in range(4):
        nodes += conv_layer(i, x, chans[i], chans[i + 1], inits, out="y" if i == 3 else None)
        x = f"h{i}"
    model = make_model(nodes, [vinfo("x", [1, 6, 6, 3])], [vinfo("y", [1, 6, 6, 2])], inits)
    assert ops(model).count("Transpose") == 8
    out, report = run(model)
    assert ops(out).count("Transpose") == 2
    assert ops(out)[0] == "Transpose" and out.graph.output[0].name == "y"
    assert pass_stats(report, "push_transposes")["rewrites"] == 3
    # the [C] bias became [1, C, 1, 1]; the original initializers are not modified
    shapes = {t.name: list(t.dims) for t in out.graph.initializer}
    assert [1, 4, 1, 1] in shapes.values()


def test_residual_add_of_two_transposed_branches():
    inits = [tensor("wa", rand(4, 3, 3, 3)), tensor("wb", rand(4, 3, 1, 1)), tensor("wc", rand(2, 4, 3, 3))]
    nodes = [
        tr("x", "xc", TO_NCHW),
        helper.make_node("Conv", ["xc", "wa"], ["ca"], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["xc", "wb"], ["cb"]),
        tr("ca", "a", TO_NHWC),
        tr("cb", "b", TO_NHWC),
        helper.make_node("Add", ["a", "b"], ["s"]),
        helper.make_node("Relu", ["s"], ["r"]),
        tr("r", "rc", TO_NCHW),
        helper.make_node("Conv", ["rc", "wc"], ["cc"], pads=[1, 1, 1, 1]),
        tr("cc", "y", TO_NHWC),
    ]
    model = make_model(nodes, [vinfo("x", [1, 5, 5, 3])], [vinfo("y", [1, 5, 5, 2])], inits)
    out, _ = run(model)
    assert ops(out).count("Transpose") == 2
    assert ops(out).index("Add") < ops(out).index("Relu")


def test_fan_out_to_two_inverse_transposes_cancels_all():
    nodes = [
        tr("x", "t", TO_NHWC),
        helper.make_node("Add", ["t", "bias"], ["a"]),
        tr("a", "b1", TO_NCHW),
        tr("a", "b2", TO_NCHW),
        helper.make_node("Relu", ["b1"], ["y1"]),
        helper.make_node("Sigmoid", ["b2"], ["y2"]),
    ]
    model = make_model(nodes, [vinfo("x", [1, 3, 4, 5])], [vinfo("y1", [1, 3, 4, 5]), vinfo("y2", [1, 3, 4, 5])],
                       [tensor("bias", rand(3))])
    out, _ = run(model)
    assert "Transpose" not in ops(out)


def test_fan_out_with_non_cancelling_branches_stays():
    # pushing past Relu would need a Transpose on both the Conv branch and the Sigmoid branch
    nodes = [
        tr("x", "t", TO_NCHW),
        helper.make_node("Relu", ["t"], ["r"]),
        helper.make_node("Conv", ["r", "w"], ["y1"]),
        helper.make_node("Sigmoid", ["r"], ["y2"]),
    ]
    model = make_model(nodes, [vinfo("x", [1, 4, 4, 3])], [vinfo("y1", [1, 2, 3, 4]), vinfo("y2", [1, 3, 4, 3])],
                       [tensor("w", rand(2, 3, 1, 1))])
    out, report = run(model)
    assert ops(out) == ops(model)
    reasons = pass_stats(report, "push_transposes")["rejections"]
    assert any("would not reduce" in r for r in reasons)


def test_transpose_feeding_graph_output_stays():
    nodes = [tr("x", "t", TO_NCHW), helper.make_node("Relu", ["t"], ["y"])]
    model = make_model(nodes, [vinfo("x", [1, 4, 4, 3])], [vinfo("y", [1, 3, 4, 4])])
    out, _ = run(model)
    assert ops(out) == ["Transpose", "Relu"]


def test_unknown_op_blocks_push():
    nodes = [
        tr("x", "t", TO_NHWC),
        helper.make_node("Relu", ["t"], ["r"]),
        helper.make_node("LRN", ["r"], ["l"], size=3),  # not layout-agnostic
        tr("l", "y", TO_NCHW),
    ]
    model = make_model(nodes, [vinfo("x", [1, 3, 4, 4])], [vinfo("y", [1, 3, 4, 4])])
    out, _ = run(model)
    assert ops(out).count("Transpose") == 2


def test_custom_domain_op_blocks_push():
    nodes = [
        tr("x", "t", TO_NHWC),
        helper.make_node("Relu", ["t"], ["r"]),
        helper.make_node("MyOp", ["r"], ["m"], domain="custom"),
        tr("m", "y", TO_NCHW),
    ]
    model = make_model(nodes, [vinfo("x", [1, 3, 4, 4])], [vinfo("y", [1, 3, 4, 4])],
                       extra_opsets=[helper.make_opsetid("custom", 1)])
    out, _ = run(model, validate=False)
    assert ops(out) == ["Transpose", "Relu", "MyOp", "Transpose"]


def test_shared_constant_is_not_modified_and_clip_prelu():
    bias = rand(3)
    nodes = [
        tr("x", "t", TO_NHWC),
        helper.make_node("Add", ["t", "bias"], ["a"]),
        helper.make_node("Clip", ["a", "lo", "hi"], ["c"]),
        helper.make_node("PRelu", ["c", "slope"], ["p"]),
        tr("p", "y", TO_NCHW),
        helper.make_node("Add", ["z", "bias"], ["y2"]),  # another reader of the same bias
    ]
    inits = [tensor("bias", bias), tensor("lo", np.float32(-0.5)), tensor("hi", np.float32(0.5)),
             tensor("slope", rand(3))]
    model = make_model(nodes, [vinfo("x", [2, 3, 4, 5]), vinfo("z", [2, 4, 5, 3])],
                       [vinfo("y", [2, 3, 4, 5]), vinfo("y2", [2, 4, 5, 3])], inits)
    out, _ = run(model)
    assert "Transpose" not in ops(out)
    kept = {t.name: onnx.numpy_helper.to_array(t) for t in out.graph.initializer}
    np.testing.assert_array_equal(kept["bias"], bias)
    assert kept["bias"].shape == (3,)


def test_constant_nodes_and_where():
    nodes = [
        helper.make_node("Constant", [], ["k"], value=tensor("k", rand(4, 1, 3))),
        tr("x", "t", [0, 2, 3, 1]),
        tr("x2", "t2", [0, 2, 3, 1]),
        helper.make_node("Greater", ["t", "k"], ["g"]),
        helper.make_node("Where", ["g", "t", "t2"], ["w"]),
        tr("w", "y", [0, 3, 1, 2]),
    ]
    model = make_model(nodes, [vinfo("x", [2, 3, 4, 5]), vinfo("x2", [2, 3, 4, 5])], [vinfo("y", [2, 3, 4, 5])])
    out, _ = run(model)
    assert ops(out) == ["Greater", "Where"]


def test_compose_and_cancel_direct_transposes():
    nodes = [tr("x", "t", [0, 2, 3, 1]), tr("t", "u", [0, 3, 1, 2]), tr("t", "v", [1, 0, 2, 3])]
    model = make_model(nodes, [vinfo("x", [2, 3, 4, 5])], [vinfo("u", [2, 3, 4, 5]), vinfo("v", [4, 2, 5, 3])])
    out, _ = run(model)
    assert sorted(ops(out)) == ["Identity", "Transpose"]  # x is both input and output: Identity keeps the name
    assert [o.name for o in out.graph.output] == ["u", "v"]


def test_non_constant_operand_gets_inverse_transpose():
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"]),
        tr("c", "t", TO_NHWC),
        helper.make_node("Add", ["t", "z"], ["a"]),  # z is NHWC, not constant
        tr("a", "ac", TO_NCHW),
        helper.make_node("Conv", ["ac", "w2"], ["y"]),
    ]
    model = make_model(nodes, [vinfo("x", [1, 3, 4, 4]), vinfo("z", [1, 4, 4, 2])], [vinfo("y", [1, 2, 4, 4])],
                       [tensor("w", rand(2, 3, 1, 1)), tensor("w2", rand(2, 2, 1, 1))])
    out, _ = run(model)
    assert ops(out).count("Transpose") == 1


def test_axis_ops_concat_softmax_reduce_pad():
    nodes = [
        tr("x", "t", TO_NHWC),
        helper.make_node("Concat", ["t", "k"], ["c"], axis=3),
        helper.make_node("Softmax", ["c"], ["s"], axis=-1),
        helper.make_node("ReduceMean", ["s"], ["r"], axes=[1, 2], keepdims=1),
        helper.make_node("Pad", ["s", "pads"], ["p"]),
        helper.make_node("Add", ["p", "r"], ["a"]),
        tr("a", "y", TO_NCHW),
    ]
    inits = [tensor("k", rand(1, 4, 5, 2)), tensor("pads", np.array([0, 1, 0, 0, 0, 0, 1, 0], np.int64))]
    model = make_model(nodes, [vinfo("x", [1, 3, 4, 5])], [vinfo("y", [1, 5, 5, 6])], inits)
    out, _ = run(model)
    assert "Transpose" not in ops(out)


def test_reduce_keepdims_zero_blocks():
    nodes = [
        tr("x", "t", TO_NHWC),
        helper.make_node("ReduceSum", ["t", "axes"], ["r"], keepdims=0),
        helper.make_node("Transpose", ["r"], ["y"], perm=[0, 2, 1]),
    ]
    model = make_model(nodes, [vinfo("x", [1, 3, 4, 5])], [vinfo("y", [1, 3, 5])],
                       [tensor("axes", np.array([1], np.int64))])
    out, _ = run(model)
    assert ops(out) == ops(model)


def test_inside_if_branch():
    then_nodes = [
        tr("x", "t", TO_NHWC),
        helper.make_node("Mul", ["t", "s"], ["m"]),
        helper.make_node("Relu", ["m"], ["r"]),
        tr("r", "ty", TO_NCHW),
    ]
    then_g = helper.make_graph(then_nodes, "then", [], [vinfo("ty", [1, 3, 4, 4])], [tensor("s", rand(3))])
    else_g = helper.make_graph([helper.make_node("Identity", ["x"], ["ey"])], "else", [],
                               [vinfo("ey", [1, 3, 4, 4])])
    nodes = [helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)]
    model = make_model(nodes, [vinfo("cond", [], TensorProto.BOOL), vinfo("x", [1, 3, 4, 4])],
                       [vinfo("y", [1, 3, 4, 4])])
    out, _ = run(model)
    branch = next(a.g for a in out.graph.node[0].attribute if a.name == "then_branch")
    then_ops = [n.op_type for n in branch.node]
    assert then_ops == ["Mul", "Relu"]
    feeds = [{"cond": np.array(c), "x": rand(1, 3, 4, 4)} for c in (True, False)]
    assert_same_outputs(model, out, feeds=feeds)


def test_region_tensor_read_inside_if_branch_is_rematerialised():
    then_g = helper.make_graph([helper.make_node("Sigmoid", ["a"], ["ty"])], "then", [],
                               [vinfo("ty", [1, 4, 5, 3])])
    else_g = helper.make_graph([helper.make_node("Neg", ["a"], ["ey"])], "else", [], [vinfo("ey", [1, 4, 5, 3])])
    nodes = [
        tr("x", "t", TO_NHWC),
        helper.make_node("Add", ["t", "bias"], ["a"]),
        tr("a", "u", TO_NCHW),
        helper.make_node("Relu", ["u"], ["y"]),
        tr("x", "t0", TO_NHWC),  # a second, unrelated reader of x that stays
        helper.make_node("If", ["cond"], ["z"], then_branch=then_g, else_branch=else_g),
    ]
    model = make_model(nodes, [vinfo("cond", [], TensorProto.BOOL), vinfo("x", [1, 3, 4, 5])],
                       [vinfo("y", [1, 3, 4, 5]), vinfo("z", [1, 4, 5, 3]), vinfo("t0", [1, 4, 5, 3])],
                       [tensor("bias", rand(3))])
    out, _ = run(model)
    assert ops(out).count("Transpose") == 2  # t0 and the re-materialised `a` for the branches
    feeds = [{"cond": np.array(c), "x": rand(1, 3, 4, 5)} for c in (True, False)]
    assert_same_outputs(model, out, feeds=feeds)


def test_opset18_reduce_and_pad_with_axis_inputs_and_default_perm():
    nodes = [
        helper.make_node("Transpose", ["x"], ["t"]),  # no perm: reverses the axes
        helper.make_node("ReduceMax", ["t", "axes"], ["r"], keepdims=1),
        helper.make_node("Pad", ["t", "pads", "cval"], ["p"], mode="constant"),
        helper.make_node("Mul", ["p", "r"], ["m"]),
        helper.make_node("Transpose", ["m"], ["y"]),
    ]
    inits = [tensor("axes", np.array([-3], np.int64)), tensor("pads", np.array([1, 0, 0, 2, 0, 0], np.int64)),
             tensor("cval", np.float32(0.5))]
    model = make_model(nodes, [vinfo("x", [2, 3, 4])], [vinfo("y", [2, 3, 7])], inits, opset=18)
    out, _ = run(model)
    assert "Transpose" not in ops(out)


def test_residual_skip_from_nhwc_tensor():
    inits = []
    nodes = conv_layer(0, "x", 3, 4, inits) + conv_layer(1, "h0", 4, 4, inits)
    nodes += [helper.make_node("Add", ["h1", "h0"], ["res"]), helper.make_node("Relu", ["res"], ["rr"])]
    nodes += conv_layer(2, "rr", 4, 2, inits, out="y")
    model = make_model(nodes, [vinfo("x", [1, 6, 6, 3])], [vinfo("y", [1, 6, 6, 2])], inits)
    out, _ = run(model)
    assert ops(model).count("Transpose") == 6 and ops(out).count("Transpose") == 2
