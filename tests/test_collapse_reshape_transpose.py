import numpy as np
import pytest
from onnx import TensorProto, helper

from util import check_rewrite, assert_same_outputs, make_model, optimize_with, ops, pass_stats, tensor, vinfo

from passes.collapse_reshape_transpose import chain_permutation

PASSES = ["collapse_reshape_transpose", "eliminate_dead_code"]
N = helper.make_node


def sandwich(x_shape, mid, perm, out, tail=True, extra=(), outputs=(), dtype=TensorProto.FLOAT):
    """x -> Reshape(mid) -> Transpose(perm) -> Reshape(out) [-> Neg]."""
    nodes = [N("Reshape", ["x", "s1"], ["r1"]), N("Transpose", ["r1"], ["t"], perm=perm),
             N("Reshape", ["t", "s2"], ["r2" if tail else "y"])]
    if tail:
        nodes.append(N("Neg", ["r2"], ["y"]))
    inits = [tensor("s1", np.array(mid, np.int64)), tensor("s2", np.array(out, np.int64))]
    return make_model(nodes + list(extra), [vinfo("x", list(x_shape), dtype)],
                      [vinfo("y", [d if d != -1 else None for d in out], dtype), *outputs], inits)


def check(model, expect, passes=PASSES):
    return check_rewrite(model, passes, expect, "collapse_reshape_transpose")


def perm_of(model):
    return [list(a.ints) for n in model.graph.node if n.op_type == "Transpose" for a in n.attribute][0]


def test_attention_key_path_is_one_transpose():
    # dynamo BERT: [1, 12, 128, 64] -> [12, 128, 64] -> swap last two -> [1, 12, 64, 128]
    out, _ = check(sandwich((1, 4, 6, 5), [-1, 6, 5], [0, 2, 1], [1, 4, 5, 6]), ["Transpose", "Neg"])
    assert perm_of(out) == [0, 1, 3, 2]


def test_batch_greater_than_one_and_graph_output_name():
    out, _ = check(sandwich((2, 3, 4, 5), [6, 4, 5], [0, 2, 1], [2, 3, 5, 4], tail=False), ["Transpose"])
    assert perm_of(out) == [0, 1, 3, 2] and out.graph.output[0].name == "y"


def test_interleaving_chain_declined():
    # [6, 4] -> [3, 2, 4] -> (1, 0, 2) -> [2, 12]: rows of x are interleaved, no Transpose of x does that
    out, report = check(sandwich((6, 4), [3, 2, 4], [1, 0, 2], [2, 12]), ["Reshape", "Transpose", "Reshape", "Neg"])
    assert any("not a permutation" in r for r in pass_stats(report, "collapse_reshape_transpose")["rejections"])


def test_identity_chain_is_removed():
    # the Transpose only swaps size-1 axes back and forth: the chain is x itself
    out, _ = check(sandwich((3, 4), [3, 1, 4], [1, 0, 2], [3, 4]), ["Neg"])


def test_size_one_axes_are_placed():
    out, _ = check(sandwich((1, 3, 1, 4), [3, 4], [1, 0], [1, 4, 1, 3]), ["Transpose", "Neg"])


def test_first_reshape_with_other_reader_stays():
    extra = [N("Relu", ["r1"], ["z"])]
    model = sandwich((1, 4, 6, 5), [-1, 6, 5], [0, 2, 1], [1, 4, 5, 6], extra=extra, outputs=[vinfo("z", [4, 6, 5])])
    out, _ = optimize_with(model, PASSES)
    assert sorted(ops(out)) == sorted(["Reshape", "Transpose", "Neg", "Relu"])
    assert_same_outputs(model, out)


def test_transpose_with_other_reader_stays():
    extra = [N("Relu", ["t"], ["z"])]
    model = sandwich((1, 4, 6, 5), [-1, 6, 5], [0, 2, 1], [1, 4, 5, 6], extra=extra, outputs=[vinfo("z", [4, 5, 6])])
    out, _ = optimize_with(model, PASSES)
    assert sorted(ops(out)) == sorted(["Reshape", "Transpose", "Reshape", "Neg", "Relu"])
    assert_same_outputs(model, out)


def test_rank_change_declined():
    _, report = check(sandwich((1, 4, 6, 5), [-1, 6, 5], [0, 2, 1], [4, 5, 6]), ["Reshape", "Transpose", "Reshape", "Neg"])
    assert any("changes the rank" in r for r in pass_stats(report, "collapse_reshape_transpose")["rejections"])


def test_dynamic_shape_declined():
    model = sandwich(("B", 4, 6, 5), [-1, 6, 5], [0, 2, 1], [-1, 4, 5, 6])
    out, report = optimize_with(model, PASSES)
    assert ops(out) == ["Reshape", "Transpose", "Reshape", "Neg"]
    assert any("not fully static" in r for r in pass_stats(report, "collapse_reshape_transpose")["rejections"])
    assert_same_outputs(model, out, shapes={"x": [2, 4, 6, 5]})


def test_then_merges_with_previous_transpose():
    # Transpose(0,2,1,3) -> Reshape -> Transpose -> Reshape: one Transpose(0,2,3,1) in the end
    nodes = [N("Transpose", ["x"], ["xt"], perm=[0, 2, 1, 3]), N("Reshape", ["xt", "s1"], ["r1"]),
             N("Transpose", ["r1"], ["t"], perm=[0, 2, 1]), N("Reshape", ["t", "s2"], ["y"])]
    model = make_model(nodes, [vinfo("x", [1, 6, 4, 5])], [vinfo("y", [1, 4, 5, 6])],
                       [tensor("s1", np.array([-1, 6, 5], np.int64)), tensor("s2", np.array([1, 4, 5, 6], np.int64))])
    out, _ = optimize_with(model, ["collapse_reshape_transpose", "merge_transposes", "eliminate_dead_code"])
    assert ops(out) == ["Transpose"] and perm_of(out) == [0, 2, 3, 1]
    assert_same_outputs(model, out)


def test_int64_data_and_inside_if():
    branch_nodes = [N("Reshape", ["x", "s1"], ["r1"]), N("Transpose", ["r1"], ["t"], perm=[0, 2, 1]),
                    N("Reshape", ["t", "s2"], ["y_then"])]
    then = helper.make_graph(branch_nodes, "then", [], [helper.make_tensor_value_info("y_then", TensorProto.INT64, None)],
                             [tensor("s1", np.array([-1, 6, 5], np.int64)), tensor("s2", np.array([1, 4, 5, 6], np.int64))])
    other = helper.make_graph([N("Constant", [], ["z"], value=tensor("zv", np.zeros((1, 4, 5, 6), np.int64)))], "else",
                              [], [helper.make_tensor_value_info("z", TensorProto.INT64, None)])
    model = make_model([N("If", ["c"], ["y"], then_branch=then, else_branch=other)],
                       [vinfo("c", [], TensorProto.BOOL), vinfo("x", [1, 4, 6, 5], TensorProto.INT64)],
                       [vinfo("y", [1, 4, 5, 6], TensorProto.INT64)])
    out, _ = optimize_with(model, PASSES)
    body = next(a.g for a in out.graph.node[0].attribute if a.name == "then_branch")
    assert [n.op_type for n in body.node] == ["Transpose"]
    x = np.arange(120, dtype=np.int64).reshape(1, 4, 6, 5)
    assert_same_outputs(model, out, feeds=[{"c": np.array(True), "x": x}])


@pytest.mark.parametrize("shape,mid,perm,out,expect", [
    ([2, 3, 4], [6, 4], [1, 0], [2, 4, 3], None),      # rank 3 -> [4, 6] -> [2, 4, 3]: elements interleave
    ([2, 3, 4], [6, 4], [1, 0], [4, 2, 3], [2, 0, 1]),
    ([1, 12, 8, 4], [12, 8, 4], [0, 2, 1], [1, 12, 4, 8], [0, 1, 3, 2]),
    ([3, 4], [12], [0], [4, 3], None),                  # a plain Reshape is no permutation
])
def test_chain_permutation(shape, mid, perm, out, expect):
    q = chain_permutation(shape, mid, perm, out)
    assert q == expect
    if q is not None:
        x = np.random.default_rng(0).standard_normal(shape)
        np.testing.assert_array_equal(x.transpose(q), x.reshape(mid).transpose(perm).reshape(out))
