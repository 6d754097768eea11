from collections import Counter

import numpy as np
from onnx import TensorProto, helper

from util import check_rewrite, assert_same_outputs, make_model, optimize_with, ops, pass_stats, vinfo

N = helper.make_node
PASSES = ["merge_transposes", "eliminate_dead_code"]


def transposes(*perms, src="x"):
    """Nodes src -> Transpose(perms[0]) -> ... -> t{k}; a perm of None leaves the attribute out."""
    nodes = []
    for k, perm in enumerate(perms):
        attrs = {} if perm is None else {"perm": perm}
        nodes.append(N("Transpose", [src], [f"t{k}"], **attrs))
        src = f"t{k}"
    return nodes, src


def model_of(perms, out_shape, shape=(2, 3, 4)):
    nodes, last = transposes(*perms)
    nodes.append(N("Neg", [last], ["y"]))
    return make_model(nodes, [vinfo("x", list(shape))], [vinfo("y", list(out_shape))])


def check(model, expect, passes=PASSES):
    return check_rewrite(model, passes, expect, "merge_transposes")[0]


def perm_of(model):
    node = next(n for n in model.graph.node if n.op_type == "Transpose")
    return list(helper.get_attribute_value(node.attribute[0]))


def test_cancelling_pair_removed():
    check(model_of([[0, 2, 1], [0, 2, 1]], (2, 3, 4)), ["Neg"])


def test_pair_composes_to_one_transpose():
    out = check(model_of([[1, 0, 2], [0, 2, 1]], (3, 4, 2)), ["Transpose", "Neg"])
    assert perm_of(out) == [1, 2, 0]


def test_three_transposes_collapse():
    out = check(model_of([[1, 0, 2], [0, 2, 1], [2, 1, 0]], (2, 4, 3)), ["Transpose", "Neg"])
    assert perm_of(out) == [0, 2, 1]


def test_default_perms():
    check(model_of([None, None], (2, 3, 4)), ["Neg"])
    check(model_of([None, [2, 1, 0]], (2, 3, 4)), ["Neg"])
    out = check(model_of([[1, 0, 2], None], (4, 2, 3)), ["Transpose", "Neg"])
    assert perm_of(out) == [2, 0, 1]


def test_shared_first_transpose_stays_for_its_other_reader():
    nodes, _ = transposes([1, 0, 2], [0, 2, 1])
    nodes += [N("Neg", ["t1"], ["y"]), N("Relu", ["t0"], ["z"])]
    model = make_model(nodes, [vinfo("x", [2, 3, 4])], [vinfo("y", [3, 4, 2]), vinfo("z", [3, 2, 4])])
    out, _ = optimize_with(model, PASSES)
    assert Counter(ops(out)) == Counter(["Transpose", "Transpose", "Neg", "Relu"])
    second = next(n for n in out.graph.node if n.op_type == "Transpose" and n.output[0] == "t1")
    assert list(second.input) == ["x"] and list(second.attribute[0].ints) == [1, 2, 0]
    assert_same_outputs(model, out)


def test_cancelling_pair_into_graph_output_keeps_name():
    nodes = [N("Relu", ["x"], ["r"]), *transposes([1, 0], [1, 0], src="r")[0]]
    model = make_model(nodes, [vinfo("x", [2, 3])], [vinfo("t1", [2, 3])])
    out = check(model, ["Relu"])
    assert out.graph.output[0].name == "t1" and out.graph.node[0].output[0] == "t1"


def test_graph_input_to_graph_output_becomes_identity_and_terminates():
    nodes, _ = transposes([1, 0], [1, 0])
    model = make_model(nodes, [vinfo("x", [2, 3])], [vinfo("t1", [2, 3])])
    out, report = optimize_with(model, ["eliminate_noops", "merge_transposes", "eliminate_dead_code"])
    assert ops(out) == ["Identity"] and report.simplify_rounds <= 3
    assert_same_outputs(model, out)


def test_mismatched_ranks_declined():
    nodes = [N("Transpose", ["x"], ["t0"], perm=[1, 0]), N("Transpose", ["t0"], ["t1"], perm=[0, 2, 1])]
    nodes.append(N("Neg", ["t1"], ["y"]))
    model = make_model(nodes, [vinfo("x", [2, 3])], [vinfo("y", [3, 2])])
    out, report = optimize_with(model, PASSES, validate=False)  # an invalid model: nothing may change
    assert ops(out) == ["Transpose", "Transpose", "Neg"]
    assert pass_stats(report, "merge_transposes")["rejections"]


def test_inside_loop_body():
    body_nodes = [*transposes([1, 0], [1, 0], src="v")[0], N("Add", ["t1", "x"], ["v_out"]),
                  N("Identity", ["c"], ["c_out"])]
    body = helper.make_graph(body_nodes, "body",
                             [vinfo("i", [], TensorProto.INT64), vinfo("c", [], TensorProto.BOOL), vinfo("v", [2, 2])],
                             [vinfo("c_out", [], TensorProto.BOOL), vinfo("v_out", [2, 2])])
    loop = N("Loop", ["n", "", "x"], ["y"], body=body)
    model = make_model([loop], [vinfo("x", [2, 2]), vinfo("n", [], TensorProto.INT64)], [vinfo("y", [2, 2])])
    out, _ = optimize_with(model, PASSES)
    assert [n.op_type for n in out.graph.node[0].attribute[0].g.node] == ["Add", "Identity"]
    feeds = [{"x": np.arange(4, dtype=np.float32).reshape(2, 2), "n": np.array(3)}]
    assert_same_outputs(model, out, feeds=feeds)
