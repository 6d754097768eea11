from collections import Counter

import numpy as np
import pytest
from onnx import helper, numpy_helper

from util import check_rewrite, assert_same_outputs, make_model, optimize_with, ops, pass_stats, tensor, vinfo

N = helper.make_node
PASSES = ["merge_reshapes", "eliminate_dead_code"]


def c(name, values):
    return tensor(name, np.array(values, dtype=np.int64))


def chain(first, target, shape, out_shape, inits=(), allowzero=None, opset=17):
    """x -> first -> Reshape(target) -> Neg -> y."""
    attrs = {} if allowzero is None else {"allowzero": allowzero}
    nodes = [first, N("Reshape", [first.output[0], "target"], ["r"], **attrs), N("Neg", ["r"], ["y"])]
    return make_model(nodes, [vinfo("x", list(shape))], [vinfo("y", list(out_shape))],
                      [*inits, c("target", target)], opset=opset)


def check(model, expect, concrete=None):
    return check_rewrite(model, PASSES, expect, "merge_reshapes", concrete)


def target_of(model, node_index=0):
    node = model.graph.node[node_index]
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert list(node.input)[0] == "x"
    return inits[node.input[1]].tolist()


FIRSTS = {
    "reshape": (N("Reshape", ["x", "s1"], ["m"]), [c("s1", [6, 4])]),
    "reshape_allowzero": (N("Reshape", ["x", "s1"], ["m"], allowzero=1), [c("s1", [6, 4])]),
    "flatten": (N("Flatten", ["x"], ["m"], axis=2), []),
    "squeeze": (N("Squeeze", ["x", "ax"], ["m"]), [c("ax", [1])]),
    "unsqueeze": (N("Unsqueeze", ["x", "ax"], ["m"]), [c("ax", [0])]),
}


@pytest.mark.parametrize("kind", sorted(FIRSTS))
def test_shape_op_then_reshape_merged(kind):
    first, inits = FIRSTS[kind]
    shape = (2, 1, 12) if kind == "squeeze" else (2, 3, 4)
    out, _ = check(chain(first, [4, -1], shape, (4, 6), inits, opset=18), ["Reshape", "Neg"])
    assert target_of(out) == [4, -1]


def test_first_with_other_reader_stays():
    nodes = [N("Reshape", ["x", "s1"], ["m"]), N("Reshape", ["m", "s2"], ["r"]), N("Neg", ["r"], ["y"]),
             N("Relu", ["m"], ["z"])]
    model = make_model(nodes, [vinfo("x", [2, 3, 4])], [vinfo("y", [4, 6]), vinfo("z", [6, 4])],
                       [c("s1", [6, 4]), c("s2", [4, 6])])
    out, _ = optimize_with(model, PASSES)
    assert Counter(ops(out)) == Counter(["Reshape", "Reshape", "Neg", "Relu"])
    second = next(n for n in out.graph.node if n.output[0] == "r")
    assert second.input[0] == "x"
    assert_same_outputs(model, out)


def test_long_chain_collapses():
    nodes = [N("Flatten", ["x"], ["a"]), N("Unsqueeze", ["a", "ax"], ["b"]), N("Reshape", ["b", "s1"], ["m"]),
             N("Reshape", ["m", "s2"], ["r"]), N("Neg", ["r"], ["y"])]
    model = make_model(nodes, [vinfo("x", [2, 3, 4])], [vinfo("y", [3, 8])],
                       [c("ax", [0]), c("s1", [12, 2]), c("s2", [3, 8])])
    out, _ = check(model, ["Reshape", "Neg"])
    assert target_of(out) == [3, 8]


def test_dynamic_batch_with_minus_one():
    first = N("Reshape", ["x", "s1"], ["m"])
    model = chain(first, [-1, 4, 3], ("N", 3, 4), ("N", 4, 3), [c("s1", [-1, 12])])
    out, _ = check(model, ["Reshape", "Neg"], concrete=(5, 3, 4))
    assert target_of(out) == [-1, 4, 3]


def test_zero_copying_a_dim_of_x_is_kept():
    # [N,12] -> [0,3,4] -> [0,12]: both 0s copy x's batch dim, so Reshape(x, [0,12]) is exact
    model = chain(N("Reshape", ["x", "s1"], ["m"]), [0, 12], ("N", 12), ("N", 12), [c("s1", [0, 3, 4])])
    out, _ = check(model, ["Reshape", "Neg"], concrete=(5, 12))
    assert target_of(out) == [0, 12]


def test_zero_after_flatten_axis1_is_kept():
    model = chain(N("Flatten", ["x"], ["m"]), [0, 3, 4], ("N", 3, 4), ("N", 3, 4))
    out, _ = check(model, ["Reshape", "Neg"], concrete=(5, 3, 4))
    assert target_of(out) == [0, 3, 4]


def test_zero_resolved_from_known_intermediate_shape():
    # [2,3,4] -> [6,4] -> [0,2,2]: the 0 copies the intermediate 6, which x does not have at dim 0
    model = chain(N("Reshape", ["x", "s1"], ["m"]), [0, 2, 2], (2, 3, 4), (6, 2, 2), [c("s1", [6, 4])])
    out, _ = check(model, ["Reshape", "Neg"])
    assert target_of(out) == [6, 2, 2]


def test_zero_resolved_through_shape_inference():
    model = chain(N("Squeeze", ["x", "ax"], ["m"]), [0, 2, 2], (6, 1, 4), (6, 2, 2), [c("ax", [1])])
    out, _ = check(model, ["Reshape", "Neg"])
    assert target_of(out) == [6, 2, 2]


def test_zero_of_unknown_intermediate_dim_declined():
    # x[N,1,12] -> Squeeze -> [N,12] -> [0,3,4]: the 0 is N, which only the intermediate knows
    model = chain(N("Squeeze", ["x", "ax"], ["m"]), [0, 3, 4], ("N", 1, 12), ("N", 3, 4), [c("ax", [1])])
    _, report = check(model, ["Squeeze", "Reshape", "Neg"], concrete=(5, 1, 12))
    assert any("intermediate shape" in r for r in pass_stats(report, "merge_reshapes")["rejections"])


def test_allowzero_literal_zero_target_is_independent():
    model = chain(N("Reshape", ["x", "s1"], ["m"], allowzero=1), [0, 4], (2, 0, 4), (0, 4), [c("s1", [0, 8])],
                  allowzero=1, opset=18)
    out, _ = check(model, ["Reshape", "Neg"], concrete=(2, 0, 4))
    assert target_of(out) == [0, 4]


def test_runtime_target_not_merged():
    nodes = [N("Reshape", ["x", "s1"], ["m"]), N("Reshape", ["m", "s2"], ["r"]), N("Neg", ["r"], ["y"])]
    model = make_model(nodes, [vinfo("x", [2, 3, 4]), vinfo("s2", [2], 7)], [vinfo("y", [4, 6])], [c("s1", [6, 4])])
    out, report = optimize_with(model, PASSES, validate=False)
    assert ops(out) == ["Reshape", "Reshape", "Neg"]
    assert "target shape is not a constant" in pass_stats(report, "merge_reshapes")["rejections"]


def test_shared_target_constant_is_not_modified():
    # the 0 in the shared target is resolved into a new constant; the other Reshape keeps [0, 2, 2]
    nodes = [N("Reshape", ["x", "s1"], ["m"]), N("Reshape", ["m", "target"], ["r"]), N("Neg", ["r"], ["y"]),
             N("Reshape", ["w", "target"], ["z"])]
    model = make_model(nodes, [vinfo("x", [2, 3, 4]), vinfo("w", [5, 4])],
                       [vinfo("y", [6, 2, 2]), vinfo("z", [5, 2, 2])], [c("s1", [6, 4]), c("target", [0, 2, 2])])
    out, _ = optimize_with(model, PASSES)
    assert Counter(ops(out)) == Counter(["Reshape", "Reshape", "Neg"])
    inits = {t.name: numpy_helper.to_array(t).tolist() for t in out.graph.initializer}
    assert inits["target"] == [0, 2, 2] and [6, 2, 2] in inits.values()
    assert_same_outputs(model, out)


# ---- a shape-only op of static output shape fed by another: one Reshape to that shape
def second_chain(nodes, x_shape, y_shape, inits=(), outputs=()):
    return make_model([*nodes, N("Neg", ["r"], ["y"])], [vinfo("x", list(x_shape))],
                      [vinfo("y", list(y_shape)), *outputs], [c("s1", [4, 1, 6]), c("ax", [0]), *inits])


SECONDS = {
    "unsqueeze": (N("Unsqueeze", ["m", "ax"], ["r"]), [1, 4, 1, 6]),
    "squeeze": (N("Squeeze", ["m", "ax1"], ["r"]), [4, 6]),
    "flatten": (N("Flatten", ["m"], ["r"], axis=2), [4, 6]),
}


@pytest.mark.parametrize("kind", sorted(SECONDS))
def test_reshape_then_static_shape_op_merged(kind):
    second, y_shape = SECONDS[kind]
    model = second_chain([N("Reshape", ["x", "s1"], ["m"]), second], (2, 3, 4), y_shape, [c("ax1", [1])])
    out, _ = check(model, ["Reshape", "Neg"])
    assert target_of(out) == y_shape


def test_unsqueeze_then_squeeze_chain_collapses():
    nodes = [N("Reshape", ["x", "s1"], ["m"]), N("Unsqueeze", ["m", "ax"], ["u"]), N("Squeeze", ["u", "ax2"], ["r"])]
    model = second_chain(nodes, (2, 3, 4), [1, 4, 6], [c("ax2", [2])])
    out, _ = check(model, ["Reshape", "Neg"])
    assert target_of(out) == [1, 4, 6]


def test_static_merge_declined_when_first_has_other_reader():
    nodes = [N("Reshape", ["x", "s1"], ["m"]), N("Unsqueeze", ["m", "ax"], ["r"]), N("Relu", ["m"], ["z"])]
    model = second_chain(nodes, (2, 3, 4), [1, 4, 1, 6], outputs=[vinfo("z", [4, 1, 6])])
    out, report = optimize_with(model, PASSES)
    assert Counter(ops(out)) == Counter(["Reshape", "Unsqueeze", "Neg", "Relu"])
    assert any("other readers" in r for r in pass_stats(report, "merge_reshapes")["rejections"])
    assert_same_outputs(model, out)


def test_static_merge_declined_for_dynamic_shape():
    nodes = [N("Reshape", ["x", "s"], ["m"]), N("Unsqueeze", ["m", "ax"], ["r"])]
    model = second_chain(nodes, ("n", 3, 4), ["n", 1, 12], [c("s", [-1, 12])])
    out, report = optimize_with(model, PASSES)
    assert ops(out) == ["Reshape", "Unsqueeze", "Neg"]
    assert any("not fully static" in r for r in pass_stats(report, "merge_reshapes")["rejections"])
    assert_same_outputs(model, out, shapes={"x": [5, 3, 4]})


def test_static_merge_inside_if_branch():
    def branch(tag):
        nodes = [N("Reshape", ["x", "s1"], [tag + "_m"]), N("Unsqueeze", [tag + "_m", "ax"], [tag + "_y"])]
        return helper.make_graph(nodes, tag, [], [helper.make_tensor_value_info(tag + "_y", 1, None)])
    model = make_model([N("If", ["cond"], ["y"], then_branch=branch("t"), else_branch=branch("e"))],
                       [vinfo("cond", [], 9), vinfo("x", [2, 3, 4])], [vinfo("y", [1, 4, 1, 6])],
                       [c("s1", [4, 1, 6]), c("ax", [0])])
    out, _ = optimize_with(model, PASSES)
    for flag in (True, False):
        feed = {"cond": np.array(flag), "x": np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)}
        assert_same_outputs(model, out, feeds=[feed])
    for a in out.graph.node[0].attribute:
        assert [n.op_type for n in a.g.node] == ["Reshape"]
