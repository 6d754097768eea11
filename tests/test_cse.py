import numpy as np
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper

from onnxslim_opt.graph import import_graph
from onnxslim_opt.pass_api import PassContext
from passes.eliminate_common_subexpressions import EliminateCommonSubexpressions
from util import assert_same_outputs, make_model, optimize_with, ops, pass_stats, tensor, vinfo

CSE = ["eliminate_common_subexpressions", "eliminate_dead_code"]


def _check(model, passes=CSE, **options):
    out, report = optimize_with(model, passes, **options)
    assert report.validation["status"] == "passed", report.validation
    assert_same_outputs(model, out)
    return out, report


def _shape_chain(prefix: str, index: str) -> list:
    return [helper.make_node("Shape", ["x"], [f"{prefix}_s"]),
            helper.make_node("Gather", [f"{prefix}_s", index], [f"{prefix}_g"], axis=0),
            helper.make_node("Unsqueeze", [f"{prefix}_g", "axes"], [f"{prefix}_u"])]


def _shape_chain_model(index_b: str = "i0"):
    nodes = _shape_chain("a", "i0") + _shape_chain("b", index_b) + [
        helper.make_node("Concat", ["a_u", "m1"], ["a_shape"], axis=0),
        helper.make_node("Reshape", ["x", "a_shape"], ["a_y"]),
        helper.make_node("Concat", ["b_u", "m1"], ["b_shape"], axis=0),
        helper.make_node("Reshape", ["x", "b_shape"], ["b_y"]),
        helper.make_node("Add", ["a_y", "b_y"], ["y"]),
    ]
    inits = [tensor("i0", np.array(0, np.int64)), tensor("i0b", np.array(0, np.int64)),
             tensor("axes", np.array([0], np.int64)), tensor("m1", np.array([-1], np.int64))]
    return make_model(nodes, [vinfo("x", [3, 4])], [vinfo("y", [3, 4])], inits)


def test_shape_gather_chains_merged():
    out, report = _check(_shape_chain_model())
    assert ops(out) == ["Shape", "Gather", "Unsqueeze", "Concat", "Reshape", "Add"]
    assert pass_stats(report, "eliminate_common_subexpressions")["rewrites"] == 5


def test_equal_index_constants_merged_with_deduplication():
    model = _shape_chain_model(index_b="i0b")
    out, _ = _check(model, CSE + ["deduplicate_initializers"])
    assert ops(out) == ["Shape", "Gather", "Unsqueeze", "Concat", "Reshape", "Add"]


def test_chain_collapses_in_one_run():
    graph = import_graph(_shape_chain_model())
    result = EliminateCommonSubexpressions().run(graph, PassContext(opset=17))
    assert result.rewrites == 5
    assert [n.op for n in graph.nodes] == ["Shape", "Gather", "Unsqueeze", "Concat", "Reshape", "Add"]


def test_unsorted_graph_is_ordered_before_merging():
    x = gs.Variable("x", np.float32, [2])
    a, b, c = (gs.Variable(n, np.float32, [2]) for n in "abc")
    n1 = gs.Node("Relu", inputs=[x], outputs=[a])
    n2 = gs.Node("Relu", inputs=[x], outputs=[b])
    n3 = gs.Node("Add", inputs=[a, b], outputs=[c])
    graph = gs.Graph(nodes=[n3, n2, n1], inputs=[x], outputs=[c])
    EliminateCommonSubexpressions().run(graph, PassContext(opset=17))
    assert [n.op for n in graph.nodes] == ["Relu", "Add"]
    assert graph.nodes[1].inputs[0] is graph.nodes[1].inputs[1] is graph.nodes[0].outputs[0]


def _conv_relu(prefix: str) -> list:
    return [helper.make_node("Conv", ["x", "W", "B"], [f"{prefix}_c"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", [f"{prefix}_c"], [f"{prefix}_r"])]


def test_two_conv_relu_branches_merged():
    rng = np.random.default_rng(0)
    inits = [tensor("W", rng.standard_normal((4, 3, 3, 3)).astype(np.float32)),
             tensor("B", rng.standard_normal(4).astype(np.float32))]
    nodes = _conv_relu("p") + _conv_relu("q") + [helper.make_node("Add", ["p_r", "q_r"], ["y"])]
    model = make_model(nodes, [vinfo("x", [1, 3, 8, 8])], [vinfo("y", [1, 4, 8, 8])], inits)
    out, _ = _check(model)
    assert ops(out) == ["Conv", "Relu", "Add"]
    assert out.graph.node[2].input[0] == out.graph.node[2].input[1]


def test_different_attributes_not_merged():
    nodes = [helper.make_node("LeakyRelu", ["x"], ["a"], alpha=0.1),
             helper.make_node("LeakyRelu", ["x"], ["b"], alpha=0.2),
             helper.make_node("Transpose", ["x"], ["c"], perm=[0, 1]),
             helper.make_node("Transpose", ["x"], ["d"], perm=[1, 0]),
             helper.make_node("Add", ["a", "b"], ["y"]),
             helper.make_node("Add", ["c", "d"], ["z"])]
    model = make_model(nodes, [vinfo("x", [3, 3])], [vinfo("y", [3, 3]), vinfo("z", [3, 3])])
    out, report = _check(model)
    assert ops(out) == ops(model)
    assert pass_stats(report, "eliminate_common_subexpressions")["rewrites"] == 0


def test_tensor_attributes_compared_by_value():
    def cos(name, value):
        return helper.make_node("ConstantOfShape", ["s"], [name], value=tensor("v", np.array([value], np.float32)))
    nodes = [cos("a", 1.0), cos("b", 1.0), cos("c", 2.0),
             helper.make_node("Sum", ["a", "b", "c"], ["y"])]
    model = make_model(nodes, [vinfo("s", [2], TensorProto.INT64)], [vinfo("y", ["a", "b"])])
    out, _ = optimize_with(model, CSE, input_shapes=None)
    assert ops(out) == ["ConstantOfShape", "ConstantOfShape", "Sum"]
    assert_same_outputs(model, out, feeds=[{"s": np.array([2, 3], np.int64)}])


def test_random_ops_and_training_dropout_not_merged():
    nodes = [helper.make_node("RandomNormalLike", ["x"], ["r1"]),
             helper.make_node("RandomNormalLike", ["x"], ["r2"]),
             helper.make_node("Dropout", ["x", "ratio", "train"], ["d1"]),
             helper.make_node("Dropout", ["x", "ratio", "train"], ["d2"]),
             helper.make_node("Sum", ["r1", "r2", "d1", "d2"], ["s"]),
             helper.make_node("Mul", ["s", "zero"], ["m"]),
             helper.make_node("Add", ["x", "m"], ["y"])]
    inits = [tensor("ratio", np.array(0.5, np.float32)), tensor("train", np.array(True)),
             tensor("zero", np.array(0.0, np.float32))]
    model = make_model(nodes, [vinfo("x", [2, 3])], [vinfo("y", [2, 3])], inits)
    out, report = _check(model)
    assert ops(out).count("RandomNormalLike") == 2 and ops(out).count("Dropout") == 2
    reasons = pass_stats(report, "eliminate_common_subexpressions")["rejections"]
    assert "nondeterministic op" in reasons and "Dropout in training mode draws a random mask" in reasons


def test_inference_dropout_merged():
    nodes = [helper.make_node("Dropout", ["x"], ["d1"]), helper.make_node("Dropout", ["x"], ["d2"]),
             helper.make_node("Add", ["d1", "d2"], ["y"])]
    model = make_model(nodes, [vinfo("x", [2, 3])], [vinfo("y", [2, 3])])
    out, _ = _check(model)
    assert ops(out) == ["Dropout", "Add"]


def test_custom_domain_not_merged_contrib_merged():
    custom = [helper.make_node("Counter", ["x"], ["c1"], domain="my.ops"),
              helper.make_node("Counter", ["x"], ["c2"], domain="my.ops"),
              helper.make_node("Add", ["c1", "c2"], ["y"])]
    model = make_model(custom, [vinfo("x", [2])], [vinfo("y", [2])], extra_opsets=[helper.make_opsetid("my.ops", 1)])
    out, report = optimize_with(model, CSE)
    assert ops(out) == ["Counter", "Counter", "Add"]
    assert report.validation["status"] == "unavailable"  # ORT cannot run the custom op
    assert any("custom domain" in r for r in pass_stats(report, CSE[0])["rejections"])

    contrib = [helper.make_node("FastGelu", ["x"], ["g1"], domain="com.microsoft"),
               helper.make_node("FastGelu", ["x"], ["g2"], domain="com.microsoft"),
               helper.make_node("Add", ["g1", "g2"], ["y"])]
    model = make_model(contrib, [vinfo("x", [2])], [vinfo("y", [2])],
                       extra_opsets=[helper.make_opsetid("com.microsoft", 1)])
    out, _ = _check(model)
    assert ops(out) == ["FastGelu", "Add"]


def test_identical_graph_outputs_both_kept():
    nodes = [helper.make_node("Relu", ["x"], ["y1"]), helper.make_node("Relu", ["x"], ["y2"]),
             helper.make_node("Sigmoid", ["x"], ["s1"]), helper.make_node("Sigmoid", ["x"], ["s2"]),
             helper.make_node("Neg", ["s2"], ["z"])]
    outputs = [vinfo("y1", [2]), vinfo("y2", [2]), vinfo("z", [2])]
    model = make_model(nodes, [vinfo("x", [2])], outputs)
    out, _ = _check(model)
    assert [o.name for o in out.graph.output] == ["y1", "y2", "z"]
    assert sorted(ops(out)) == ["Identity", "Neg", "Relu", "Sigmoid"]


def test_merged_inside_if_branch_not_across_scopes():
    branch_nodes = [helper.make_node("Exp", ["x"], ["e1"]), helper.make_node("Exp", ["x"], ["e2"]),
                    helper.make_node("Add", ["e1", "e2"], ["t"])]
    then_g = helper.make_graph(branch_nodes, "then", [], [vinfo("t", [2])])
    else_g = helper.make_graph([helper.make_node("Exp", ["x"], ["f"])], "else", [], [vinfo("f", [2])])
    nodes = [helper.make_node("Exp", ["x"], ["outer"]),
             helper.make_node("If", ["c"], ["i"], then_branch=then_g, else_branch=else_g),
             helper.make_node("Add", ["i", "outer"], ["y"])]
    model = make_model(nodes, [vinfo("x", [2]), vinfo("c", [], TensorProto.BOOL)], [vinfo("y", [2])])
    feeds = [{"x": np.array([0.5, -1.0], np.float32), "c": np.array(v)} for v in (True, False)]
    out, report = optimize_with(model, CSE)
    assert report.validation["status"] == "passed"
    assert_same_outputs(model, out, feeds=feeds)
    branches = {a.name: [n.op_type for n in a.g.node] for a in out.graph.node[1].attribute}
    assert branches == {"then_branch": ["Exp", "Add"], "else_branch": ["Exp"]}
    assert ops(out) == ["Exp", "If", "Add"]


def test_nodes_holding_subgraphs_not_merged():
    def branch(name):
        return helper.make_graph([helper.make_node("Neg", ["x"], [name])], name, [], [vinfo(name, [2])])
    nodes = [helper.make_node("If", ["c"], ["i1"], then_branch=branch("a"), else_branch=branch("b")),
             helper.make_node("If", ["c"], ["i2"], then_branch=branch("c1"), else_branch=branch("d")),
             helper.make_node("Add", ["i1", "i2"], ["y"])]
    model = make_model(nodes, [vinfo("x", [2]), vinfo("c", [], TensorProto.BOOL)], [vinfo("y", [2])])
    out, report = _check(model)
    assert ops(out) == ["If", "If", "Add"]
    assert "holds a subgraph" in pass_stats(report, CSE[0])["rejections"]
