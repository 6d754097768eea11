import numpy as np
import pytest
from onnx import TensorProto, helper

from util import assert_same_outputs, make_model, optimize_with, ops, pass_stats, tensor, vinfo

PASSES = ["fuse_matmul_add", "eliminate_dead_code"]
RNG = np.random.default_rng(0)


def rand(*shape, dtype=np.float32):
    return RNG.standard_normal(shape).astype(dtype)


def build(bias_shape, a_shape=(4, 3), b_shape=(3, 5), bias_first=False, bias_const=True, b_const=True,
          dtype=TensorProto.FLOAT, out_shape=None):
    np_dtype = helper.tensor_dtype_to_np_dtype(dtype)
    inits = [tensor("b", rand(*bias_shape).astype(np_dtype))] if bias_const else []
    inputs = [vinfo("x", list(a_shape), dtype)] + ([] if bias_const else [vinfo("b", list(bias_shape), dtype)])
    if b_const:
        inits.append(tensor("w", rand(*b_shape).astype(np_dtype)))
    else:
        inputs.append(vinfo("w", list(b_shape), dtype))
    add_inputs = ["b", "mm"] if bias_first else ["mm", "b"]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"]), helper.make_node("Add", add_inputs, ["y"])]
    if out_shape is None:
        out_shape = np.broadcast_shapes((a_shape[0], b_shape[1]), tuple(bias_shape)) if len(a_shape) == 2 else \
            np.broadcast_shapes(tuple(a_shape[:-1]) + (b_shape[1],), tuple(bias_shape))
    return make_model(nodes, inputs, [vinfo("y", list(out_shape), dtype)], inits)


def check(model, expect_ops, any_order=False):
    out, report = optimize_with(model, PASSES)
    assert report.validation["status"] == "passed"
    assert_same_outputs(model, out)
    assert (sorted(ops(out)) == sorted(expect_ops)) if any_order else ops(out) == expect_ops
    return out, report


@pytest.mark.parametrize("bias_shape", [(5,), (1, 5), (4, 5), (4, 1), (), (1,), (1, 1)])
@pytest.mark.parametrize("bias_first", [False, True])
def test_fuses_broadcastable_bias(bias_shape, bias_first):
    out, _ = check(build(bias_shape, bias_first=bias_first), ["Gemm"])
    assert out.graph.output[0].name == "y"


def test_non_constant_b_and_bias():
    check(build((5,), b_const=False, bias_const=False), ["Gemm"])


def test_double():
    check(build((5,), dtype=TensorProto.DOUBLE), ["Gemm"])


def test_shared_weight_and_bias():
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m1"]), helper.make_node("Add", ["m1", "b"], ["y1"]),
             helper.make_node("MatMul", ["x2", "w"], ["m2"]), helper.make_node("Add", ["b", "m2"], ["y2"])]
    model = make_model(nodes, [vinfo("x", [4, 3]), vinfo("x2", [2, 3])], [vinfo("y1", [4, 5]), vinfo("y2", [2, 5])],
                       [tensor("w", rand(3, 5)), tensor("b", rand(5))])
    check(model, ["Gemm", "Gemm"])


def test_declines_3d_matmul():
    model = build((5,), a_shape=(2, 4, 3))
    out, report = check(model, ["MatMul", "Add"])
    assert any("ranks 3x2" in r for r in pass_stats(report, "fuse_matmul_add")["rejections"])


def test_declines_bias_that_grows_result():
    check(build((2, 4, 5)), ["MatMul", "Add"])
    check(build((4, 5), a_shape=(1, 3)), ["MatMul", "Add"])  # M=1 would be broadcast to 4


def test_declines_second_consumer():
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"]), helper.make_node("Add", ["mm", "b"], ["y"]),
             helper.make_node("Relu", ["mm"], ["z"])]
    model = make_model(nodes, [vinfo("x", [4, 3])], [vinfo("y", [4, 5]), vinfo("z", [4, 5])],
                       [tensor("w", rand(3, 5)), tensor("b", rand(5))])
    check(model, ["MatMul", "Add", "Relu"])


def test_declines_matmul_output_is_graph_output():
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"]), helper.make_node("Add", ["mm", "b"], ["y"])]
    model = make_model(nodes, [vinfo("x", [4, 3])], [vinfo("y", [4, 5]), vinfo("mm", [4, 5])],
                       [tensor("w", rand(3, 5)), tensor("b", rand(5))])
    check(model, ["MatMul", "Add"])


def test_declines_integer_matmul():
    model = build((5,), dtype=TensorProto.INT32)
    out, report = check(model, ["MatMul", "Add"])
    assert any("integer" in r for r in pass_stats(report, "fuse_matmul_add")["rejections"])


def test_declines_unknown_rank():
    nodes = [helper.make_node("Reshape", ["x", "s"], ["r"]), helper.make_node("MatMul", ["r", "w"], ["mm"]),
             helper.make_node("Add", ["mm", "b"], ["y"])]
    model = make_model(nodes, [vinfo("x", [4, 3]), vinfo("s", ["n"], TensorProto.INT64)], [vinfo("y", ["d0", "d1"])],
                       [tensor("w", rand(3, 5)), tensor("b", rand(5))])
    out, report = optimize_with(model, PASSES, validate=False)  # random feeds cannot make a valid shape
    assert ops(out) == ["Reshape", "MatMul", "Add"]
    assert "MatMul operand rank unknown" in pass_stats(report, "fuse_matmul_add")["rejections"]


def test_inside_if_branch():
    def branch(tag):
        nodes = [helper.make_node("MatMul", ["x", "w"], [tag + "_mm"]),
                 helper.make_node("Add", [tag + "_mm", "b"], [tag + "_y"])]
        return helper.make_graph(nodes, tag, [], [helper.make_tensor_value_info(tag + "_y", TensorProto.FLOAT, None)])
    model = make_model([helper.make_node("If", ["c"], ["y"], then_branch=branch("t"), else_branch=branch("e"))],
                       [vinfo("c", [], TensorProto.BOOL), vinfo("x", [4, 3])], [vinfo("y", [4, 5])],
                       [tensor("w", rand(3, 5)), tensor("b", rand(5))])
    out, _ = optimize_with(model, PASSES)
    for flag in (True, False):
        feed = {"c": np.array(flag), "x": rand(4, 3)}
        assert_same_outputs(model, out, feeds=[feed])
    for attr in out.graph.node[0].attribute:
        assert [n.op_type for n in attr.g.node] == ["Gemm"]


# ---- MatMul(Reshape(X), W) + bias with A of rank > 2: Reshape(Gemm(X, W, bias))
def reshaped(x_shape, target, w_shape=(4, 5), bias_shape=(5,), out_shape=None, tail=(), outputs=(), inits=(),
             extra=()):
    """x -> Reshape(target) -> MatMul(w) -> Add(b) -> [tail nodes]; y is the last node's output."""
    nodes = [helper.make_node("Reshape", ["x", "t"], ["a"]), helper.make_node("MatMul", ["a", "w"], ["mm"]),
             helper.make_node("Add", ["mm", "b"], ["y" if not tail else "s"]), *tail, *extra]
    out_shape = out_shape or list(target[:-1]) + [w_shape[1]]
    return make_model(nodes, [vinfo("x", list(x_shape))], [vinfo("y", out_shape), *outputs],
                      [tensor("t", np.array(target, dtype=np.int64)), tensor("w", rand(*w_shape)),
                       tensor("b", rand(*bias_shape)), *inits])


@pytest.mark.parametrize("bias_shape", [(5,), (1, 5), (), (1,)])
def test_reshaped_rank2_input_becomes_gemm_reshape(bias_shape):
    out, _ = check(reshaped((6, 4), [2, 3, 4], bias_shape=bias_shape), ["Gemm", "Reshape"])
    assert out.graph.node[0].input[0] == "x" and out.graph.output[0].name == "y"


def test_reshaped_dynamic_rows_use_input_target():
    model = reshaped(("n", 4), [-1, 1, 4], out_shape=["n", 1, 5])
    out, report = optimize_with(model, PASSES, input_shapes=None)
    assert ops(out) == ["Gemm", "Reshape"], pass_stats(report, "fuse_matmul_add")["rejections"]
    assert_same_outputs(model, out, shapes={"x": [7, 4]})


def test_reshaped_rank3_input_when_a_shape_op_follows():
    # [1,6,4] -> [6,1,4] @ W + b -> [6,1,5] -> Unsqueeze: Reshape, Gemm, Reshape once the Reshapes merge
    tail = [helper.make_node("Unsqueeze", ["s", "ax"], ["y"])]
    model = reshaped((1, 6, 4), [6, 1, 4], tail=tail, out_shape=[1, 6, 1, 5],
                     inits=[tensor("ax", np.array([0], dtype=np.int64))])
    out, report = optimize_with(model, ["fuse_matmul_add", "merge_reshapes", "eliminate_dead_code"])
    assert ops(out) == ["Reshape", "Gemm", "Reshape"], pass_stats(report, "fuse_matmul_add")["rejections"]
    assert_same_outputs(model, out)


def test_reshaped_rank3_input_declined_without_a_following_shape_op():
    out, report = check(reshaped((1, 6, 4), [6, 1, 4]), ["Reshape", "MatMul", "Add"])
    assert any("no shape op to merge" in r for r in pass_stats(report, "fuse_matmul_add")["rejections"])


def test_reshaped_rank2_input_with_other_last_dim_is_not_fed_directly():
    # X [6,4] -> [2,6,2]: rows of A are not rows of X, so Gemm(X) would be wrong; declined (no follower)
    out, _ = check(reshaped((6, 4), [2, 6, 2], w_shape=(2, 5)), ["Reshape", "MatMul", "Add"])


def test_reshaped_declines_reshape_with_other_reader():
    model = reshaped((6, 4), [2, 3, 4], outputs=[vinfo("z", [2, 3, 4])], extra=[helper.make_node("Relu", ["a"], ["z"])])
    out, report = check(model, ["Reshape", "MatMul", "Add", "Relu"], any_order=True)
    assert any("other readers" in r for r in pass_stats(report, "fuse_matmul_add")["rejections"])


def test_reshaped_declines_row_bias_and_plain_3d():
    check(reshaped((6, 4), [2, 3, 4], bias_shape=(3, 5)), ["Reshape", "MatMul", "Add"])
    check(build((5,), a_shape=(2, 3, 4), b_shape=(4, 5)), ["MatMul", "Add"])


def test_reshaped_shared_weight_kept_for_other_matmul():
    model = reshaped((6, 4), [2, 3, 4], outputs=[vinfo("z", [6, 5])], extra=[helper.make_node("MatMul", ["x", "w"], ["z"])])
    out, _ = check(model, ["Gemm", "Reshape", "MatMul"], any_order=True)
    assert sum(1 for t in out.graph.initializer if t.name == "w") == 1


# ---- plain N-D MatMul + bias sharing one Reshape(X, [-1, K]) (attention Q/K/V projections)
SIBLING_PASSES = ["fuse_matmul_add", "merge_reshapes", "eliminate_common_subexpressions", "eliminate_dead_code"]


def qkv(count=3, x_shape=(2, 5, 4), heads=(2, 3), tail_op="Reshape", w_k=4, inits=(), dyn=False):
    """x [B, S, 4] -> count x (MatMul(w_i [4, 6]) + b_i -> Reshape [B, S, 2, 3]) -> Sum of the pieces."""
    nodes, ws = [], []
    b, s, k = x_shape
    for i in range(count):
        nodes += [helper.make_node("MatMul", ["x", f"w{i}"], [f"mm{i}"]),
                  helper.make_node("Add", [f"mm{i}", f"b{i}"], [f"l{i}"])]
        if tail_op == "Reshape":
            nodes.append(helper.make_node("Reshape", [f"l{i}", "hs"], [f"h{i}"]))
        else:
            nodes.append(helper.make_node("Relu", [f"l{i}"], [f"h{i}"]))
        ws += [tensor(f"w{i}", rand(w_k, 6)), tensor(f"b{i}", rand(6))]
    nodes.append(helper.make_node("Sum", [f"h{i}" for i in range(count)], ["y"]))
    out = [b if not dyn else "B", s, *heads] if tail_op == "Reshape" else [b if not dyn else "B", s, 6]
    x = vinfo("x", ["B" if dyn else b, s, k])
    target = [-1 if dyn else b, s, *heads]
    return make_model(nodes, [x], [vinfo("y", out)], [tensor("hs", np.array(target, dtype=np.int64)), *ws, *inits])


def test_siblings_share_one_flat_reshape():
    model = qkv()
    out, report = optimize_with(model, SIBLING_PASSES)
    assert sorted(ops(out)) == sorted(["Reshape"] + ["Gemm", "Reshape"] * 3 + ["Sum"]), \
        pass_stats(report, "fuse_matmul_add")["rejections"]
    assert len(out.graph.node) < len(model.graph.node)  # 10 -> 8
    assert_same_outputs(model, out)


def test_siblings_with_dynamic_batch():
    model = qkv(dyn=True)
    out, report = optimize_with(model, SIBLING_PASSES)
    assert ops(out).count("Gemm") == 3, pass_stats(report, "fuse_matmul_add")["rejections"]
    assert len(out.graph.node) == 8
    assert_same_outputs(model, out, shapes={"x": [3, 5, 4]})


def test_single_plain_nd_matmul_declined():
    model = qkv(count=1)
    out, report = optimize_with(model, SIBLING_PASSES)
    assert ops(out) == ["MatMul", "Add", "Reshape", "Sum"]
    assert any("no other MatMul shares" in r for r in pass_stats(report, "fuse_matmul_add")["rejections"])


def test_siblings_without_following_shape_op_declined():
    out, report = optimize_with(qkv(tail_op="Relu"), SIBLING_PASSES)
    assert "Gemm" not in ops(out)
    assert any("no shape op to merge" in r for r in pass_stats(report, "fuse_matmul_add")["rejections"])


def test_siblings_reuse_an_existing_flat_reshape():
    # x already has a Reshape to [-1, K] read by another node: a single MatMul can use it
    model = qkv(count=1)
    g = model.graph
    g.node.append(helper.make_node("Reshape", ["x", "flat"], ["xf"]))
    g.initializer.append(tensor("flat", np.array([-1, 4], dtype=np.int64)))
    g.output.append(vinfo("xf", [10, 4]))
    out, report = optimize_with(model, SIBLING_PASSES)
    assert sorted(ops(out)) == sorted(["Reshape", "Gemm", "Reshape", "Sum"]), \
        pass_stats(report, "fuse_matmul_add")["rejections"]
    assert_same_outputs(model, out)


def test_siblings_inside_if_branch():
    inner = qkv().graph
    branch = helper.make_graph(list(inner.node), "then", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                               list(inner.initializer))
    zeros = helper.make_node("Constant", [], ["z"], value=tensor("zv", np.zeros((2, 5, 2, 3), np.float32)))
    other = helper.make_graph([zeros], "else", [], [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)])
    model = make_model([helper.make_node("If", ["c"], ["out"], then_branch=branch, else_branch=other)],
                       [vinfo("c", [], TensorProto.BOOL), vinfo("x", [2, 5, 4])], [vinfo("out", [2, 5, 2, 3])])
    out, _ = optimize_with(model, SIBLING_PASSES)
    then = next(a.g for a in out.graph.node[0].attribute if a.name == "then_branch")
    assert [n.op_type for n in then.node].count("Gemm") == 3 and len(then.node) == 8
    assert_same_outputs(model, out, feeds=[{"c": np.array(True), "x": rand(2, 5, 4)}])
