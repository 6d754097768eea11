import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper

import passes.fold_constants as fold_module
from onnxslim_opt.pass_api import PassContext
from util import assert_same_outputs, make_model, optimize_with, ops, pass_stats, session, tensor, vinfo

PASSES = ["fold_constants", "eliminate_dead_code"]
F32 = np.float32


def i64(*values):
    return np.array(values, dtype=np.int64)


def fold(model, **options):
    out, report = optimize_with(model, PASSES, **options)
    assert report.validation["status"] in ("passed", "skipped"), report.validation
    onnx.checker.check_model(out)
    return out, pass_stats(report, "fold_constants")


def body_ops(model, attr_name):
    """Op types of the first subgraph attribute named `attr_name` in the main graph."""
    for node in model.graph.node:
        for a in node.attribute:
            if a.name == attr_name:
                return [n.op_type for n in a.g.node]
    raise AssertionError(f"no subgraph {attr_name}")


def flatten_chain(dims):
    """x -> Reshape(x, Concat(Unsqueeze(Gather(Shape(x), 0)), [-1]))"""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "i0"], ["b"], axis=0),
        helper.make_node("Unsqueeze", ["b", "ax"], ["bu"]),
        helper.make_node("Concat", ["bu", "m1"], ["shp"], axis=0),
        helper.make_node("Reshape", ["x", "shp"], ["y"]),
    ]
    inits = [tensor("i0", np.array(0, np.int64)), tensor("ax", i64(0)), tensor("m1", i64(-1))]
    return make_model(nodes, [vinfo("x", dims)], [vinfo("y", [dims[0], 192])], inits)


# ----------------------------------------------------------------------------- plain folding
def test_arithmetic_chain_on_constants():
    nodes = [
        helper.make_node("Add", ["a", "b"], ["ab"]),
        helper.make_node("Mul", ["ab", "c"], ["abc"]),
        helper.make_node("Sqrt", ["abc"], ["r"]),
        helper.make_node("Add", ["x", "r"], ["y"]),
    ]
    inits = [tensor("a", np.arange(3, dtype=F32)), tensor("b", np.ones(3, F32)), tensor("c", np.full(3, 2, F32))]
    model = make_model(nodes, [vinfo("x", [2, 3])], [vinfo("y", [2, 3])], inits)
    out, stats = fold(model)
    assert ops(out) == ["Add"]
    assert stats["rewrites"] >= 1 and stats["changed_runs"] == 1
    assert len(out.graph.initializer) == 1
    assert_same_outputs(model, out)


def test_paddle_style_constant_node_weights():
    w = np.arange(12, dtype=F32).reshape(4, 3)
    nodes = [
        helper.make_node("Constant", [], ["w"], value=tensor("w", w)),
        helper.make_node("Constant", [], ["bias"], value=tensor("bias", np.arange(4, dtype=F32))),
        helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
        helper.make_node("Neg", ["bias"], ["nb"]),
        helper.make_node("MatMul", ["x", "wt"], ["mm"]),
        helper.make_node("Add", ["mm", "nb"], ["y"]),
    ]
    model = make_model(nodes, [vinfo("x", [2, 3])], [vinfo("y", [2, 4])])
    out, _ = fold(model)
    assert ops(out) == ["MatMul", "Add"]
    assert_same_outputs(model, out)


def test_nothing_to_fold_is_fast_and_unchanged():
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Add", ["r", "c"], ["y"])]
    model = make_model(nodes, [vinfo("x", [2, 3])], [vinfo("y", [2, 3])], [tensor("c", np.ones(3, F32))])
    out, stats = fold(model)
    assert ops(out) == ["Relu", "Add"]
    assert stats["changed_runs"] == 0 and stats["rewrites"] == 0


def test_changed_is_accurate_and_second_run_is_a_noop():
    nodes = [helper.make_node("Add", ["a", "a"], ["aa"]), helper.make_node("Add", ["x", "aa"], ["y"]),
             helper.make_node("Expand", ["a", "big"], ["e"]), helper.make_node("Add", ["x2", "e"], ["z"])]
    inits = [tensor("a", np.ones(3, F32)), tensor("big", i64(4096, 3))]
    model = make_model(nodes, [vinfo("x", [2, 3]), vinfo("x2", [4096, 3])],
                       [vinfo("y", [2, 3]), vinfo("z", [4096, 3])], inits)
    graph = gs.import_onnx(model)
    ctx = PassContext(opset=17, fold_size_limit=1024)
    first = fold_module.FoldConstants().run(graph, ctx)
    assert first.changed and first.rewrites == 1
    assert any("exceeds fold_size_limit" in r.reason for r in first.rejections)
    graph.cleanup()
    second = fold_module.FoldConstants().run(graph, ctx)
    assert not second.changed and second.rewrites == 0
    third = fold_module.FoldConstants().run(graph, ctx)  # declined candidates are remembered
    assert not third.changed and not third.rejections


def test_graph_outputs_produced_by_foldable_nodes():
    nodes = [
        helper.make_node("Mul", ["a", "b"], ["const_out"]),
        helper.make_node("Constant", [], ["node_out"], value=tensor("v", np.arange(2, dtype=F32))),
        helper.make_node("Add", ["a", "b"], ["ab"]),
        helper.make_node("Add", ["x", "ab"], ["y"]),
    ]
    inits = [tensor("a", np.full(2, 3, F32)), tensor("b", np.full(2, 2, F32))]
    outputs = [vinfo("const_out", [2]), vinfo("node_out", [2]), vinfo("y", [2])]
    model = make_model(nodes, [vinfo("x", [2])], outputs, inits)
    out, _ = fold(model)
    assert [o.name for o in out.graph.output] == ["const_out", "node_out", "y"]
    assert ops(out) == ["Add"]
    assert_same_outputs(model, out)
    values = session(out).run(None, {"x": np.zeros(2, F32)})
    np.testing.assert_array_equal(values[0], [6, 6])


# ----------------------------------------------------------------------------- shapes
def test_static_flatten_chain_folds():
    model = flatten_chain([2, 3, 8, 8])
    out, _ = fold(model)
    assert ops(out) == ["Reshape"]
    assert_same_outputs(model, out)


def test_dynamic_batch_flatten_chain_left_alone():
    model = flatten_chain(["N", 3, 8, 8])
    out, stats = fold(model)
    assert ops(out) == ["Shape", "Gather", "Unsqueeze", "Concat", "Reshape"]
    assert stats["changed_runs"] == 0
    assert_same_outputs(model, out, shapes={"x": (4, 3, 8, 8)})


def test_static_dims_of_a_dynamic_shape_fold():
    # Gather(Shape(x), 1) is 3 even with a dynamic batch; Slice(Shape(x), -1, -100, -1) reversed
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "i1"], ["c"], axis=0),
        helper.make_node("Shape", ["x"], ["s2"], start=1),
        helper.make_node("Slice", ["s2", "st", "en", "ax", "step"], ["rev"]),
        helper.make_node("Cast", ["c"], ["cf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["x", "cf"], ["y"]),
        helper.make_node("Identity", ["rev"], ["r"]),
    ]
    inits = [tensor("i1", np.array(1, np.int64)), tensor("st", i64(-1)), tensor("en", i64(-100)),
             tensor("ax", i64(0)), tensor("step", i64(-1))]
    model = make_model(nodes, [vinfo("x", ["N", 3, 5, 7])], [vinfo("y", ["N", 3, 5, 7]), vinfo("r", [3], TensorProto.INT64)],
                       inits)
    out, _ = fold(model)
    assert ops(out) == ["Mul"]
    assert_same_outputs(model, out, shapes={"x": (2, 3, 5, 7)})
    r = session(out).run(["r"], {"x": np.zeros((2, 3, 5, 7), F32)})[0]
    np.testing.assert_array_equal(r, [7, 5, 3])


def test_shape_start_end_and_cast_round_trip_stay_exact():
    # gs's own shape folding ignores Shape(start=...) and its cast elision turns 0.5 into 0
    nodes = [
        helper.make_node("Shape", ["x"], ["s"], start=1, end=-1),
        helper.make_node("Shape", ["x"], ["n"], end=1),
        helper.make_node("Cast", ["n"], ["nf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["nf", "half"], ["m"]),
        helper.make_node("Cast", ["m"], ["mi"], to=TensorProto.INT64),
        helper.make_node("Add", ["a", "a"], ["aa"]),  # something to fold, so gs does run
        helper.make_node("Add", ["mi", "aa"], ["k"]),
    ]
    inits = [tensor("half", np.array([0.5], F32)), tensor("a", i64(1))]
    model = make_model(nodes, [vinfo("x", ["N", 3, 5, 7])],
                       [vinfo("s", [2], TensorProto.INT64), vinfo("k", [1], TensorProto.INT64)], inits)
    out, _ = fold(model)
    assert "Cast" in ops(out)
    assert_same_outputs(model, out, shapes={"x": (4, 3, 5, 7)})
    s, k = session(out).run(None, {"x": np.zeros((4, 3, 5, 7), F32)})
    np.testing.assert_array_equal(s, [3, 5])
    np.testing.assert_array_equal(k, [4])


# ----------------------------------------------------------------------------- never folded
def test_qdq_on_constant_weight_not_folded():
    w = np.linspace(-1, 1, 12, dtype=F32).reshape(3, 4)
    nodes = [
        helper.make_node("QuantizeLinear", ["w", "sc", "zp"], ["wq"]),
        helper.make_node("DequantizeLinear", ["wq", "sc", "zp"], ["wd"]),
        helper.make_node("DequantizeLinear", ["w8", "sc", "zp"], ["w8d"]),
        helper.make_node("MatMul", ["x", "wd"], ["m"]),
        helper.make_node("MatMul", ["x", "w8d"], ["m2"]),
        helper.make_node("Add", ["m", "m2"], ["y"]),
    ]
    inits = [tensor("w", w), tensor("sc", np.array(0.01, F32)), tensor("zp", np.array(0, np.int8)),
             tensor("w8", np.arange(12, dtype=np.int8).reshape(3, 4))]
    model = make_model(nodes, [vinfo("x", [2, 3])], [vinfo("y", [2, 4])], inits)
    out, stats = fold(model)
    assert ops(out) == ["QuantizeLinear", "DequantizeLinear", "DequantizeLinear", "MatMul", "MatMul", "Add"]
    assert any("quantization" in reason for reason in stats["rejections"])
    assert_same_outputs(model, out)


def test_random_op_not_folded():
    nodes = [helper.make_node("RandomNormalLike", ["c"], ["r"], seed=3.0),
             helper.make_node("Mul", ["r", "two"], ["r2"]),
             helper.make_node("Add", ["x", "r2"], ["y"])]
    inits = [tensor("c", np.zeros((2, 3), F32)), tensor("two", np.array(2, F32))]
    model = make_model(nodes, [vinfo("x", [2, 3])], [vinfo("y", [2, 3])], inits)
    out, stats = fold(model)
    assert ops(out) == ["RandomNormalLike", "Mul", "Add"]
    assert any("random" in reason for reason in stats["rejections"])
    assert_same_outputs(model, out)


def test_custom_domain_not_folded():
    nodes = [helper.make_node("MyOp", ["a"], ["b"], domain="custom.ops"), helper.make_node("Add", ["x", "b"], ["y"])]
    model = make_model(nodes, [vinfo("x", [3])], [vinfo("y", [3])], [tensor("a", np.ones(3, F32))],
                       extra_opsets=[helper.make_opsetid("custom.ops", 1)])
    out, _ = optimize_with(model, PASSES, validate=False)
    assert ops(out) == ["MyOp", "Add"]


# ----------------------------------------------------------------------------- size limits
def test_constant_of_shape_weight_not_materialized():
    nodes = [helper.make_node("ConstantOfShape", ["wshape"], ["w"], value=tensor("v", np.array([0.02], F32))),
             helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])]
    model = make_model(nodes, [vinfo("x", [1, 64, 5, 5])], [vinfo("y", [1, 64, 5, 5])], [tensor("wshape", i64(64, 64, 3, 3))])
    for options in ({"fold_size_limit": 1024}, {}):  # the default limit: the growth limit applies
        out, stats = fold(model, **options)
        assert ops(out) == ["ConstantOfShape", "Conv"]
        assert out.ByteSize() < 2048
        assert stats["changed_runs"] == 0 and stats["rejections"]
        assert_same_outputs(model, out)


def test_expand_and_tile_too_big_stay_while_their_inputs_fold():
    nodes = [
        helper.make_node("Add", ["a", "a"], ["aa"]),
        helper.make_node("Expand", ["aa", "eshape"], ["e"]),
        helper.make_node("Tile", ["row", "reps"], ["t"]),
        helper.make_node("Add", ["x", "e"], ["s"]),
        helper.make_node("Add", ["s", "t"], ["y"]),
    ]
    inits = [tensor("a", np.ones(64, F32)), tensor("eshape", i64(64, 64)), tensor("row", np.ones((1, 64), F32)),
             tensor("reps", i64(64, 1))]
    model = make_model(nodes, [vinfo("x", [64, 64])], [vinfo("y", [64, 64])], inits)
    out, _ = fold(model, fold_size_limit=1024)
    assert sorted(ops(out)) == ["Add", "Add", "Expand", "Tile"]  # Add(a, a) folded, nothing big created
    assert out.ByteSize() < 2048
    assert_same_outputs(model, out)


def test_huge_intermediate_not_computed(monkeypatch):
    nodes = [helper.make_node("Expand", ["one", "eshape"], ["e"]),
             helper.make_node("ReduceSum", ["e"], ["total"], keepdims=0),
             helper.make_node("Add", ["x", "total"], ["y"])]
    inits = [tensor("one", np.ones(1, F32)), tensor("eshape", i64(1024, 1024))]
    model = make_model(nodes, [vinfo("x", [2])], [vinfo("y", [2])], inits)
    out, _ = fold(model)
    assert ops(out) == ["Add"]  # a 4 MB intermediate is fine by default
    monkeypatch.setattr(fold_module, "INTERMEDIATE_LIMIT", 1 << 20)
    out, stats = fold(model)
    assert ops(out) == ["Expand", "ReduceSum", "Add"]
    assert any("intermediate" in reason for reason in stats["rejections"])
    assert_same_outputs(model, out)


# ----------------------------------------------------------------------------- subgraphs
def branch(name, nodes, outputs, inits=()):
    return helper.make_graph(nodes, name, [], outputs, list(inits))


def test_fold_inside_if_branch():
    then = branch("then", [helper.make_node("Mul", ["c", "c"], ["cc"]), helper.make_node("Add", ["x", "cc"], ["t"]),
                           helper.make_node("Sqrt", ["c"], ["t2"])],  # a branch output that becomes a constant
                  [vinfo("t", [3]), vinfo("t2", [3])], [tensor("c", np.full(3, 2, F32))])
    other = branch("else", [helper.make_node("RandomUniformLike", ["x"], ["r"], seed=1.0),
                            helper.make_node("Add", ["two", "two"], ["four"]),
                            helper.make_node("Sub", ["x", "four"], ["e0"]),
                            helper.make_node("Add", ["e0", "r"], ["e"]),
                            helper.make_node("Identity", ["x"], ["e2"])],
                   [vinfo("e", [3]), vinfo("e2", [3])], [tensor("two", np.full(3, 2, F32))])
    nodes = [helper.make_node("ReduceSum", ["x"], ["sum"], keepdims=0),
             helper.make_node("Greater", ["sum", "zero"], ["cond"]),
             helper.make_node("If", ["cond"], ["y", "y2"], then_branch=then, else_branch=other)]
    model = make_model(nodes, [vinfo("x", [3])], [vinfo("y", [3]), vinfo("y2", [3])], [tensor("zero", np.array(0, F32))])
    out, _ = fold(model)
    assert ops(out) == ["ReduceSum", "Greater", "If"]
    assert body_ops(out, "then_branch") == ["Add"]
    assert sorted(body_ops(out, "else_branch")) == ["Add", "Identity", "RandomUniformLike", "Sub"]
    assert_same_outputs(model, out)
    feed = {"x": -np.ones(3, F32)}
    assert_same_outputs(model, out, feeds=[feed])


def test_fold_inside_loop_body():
    body = helper.make_graph(
        [helper.make_node("Add", ["one", "one"], ["two"]),
         helper.make_node("Mul", ["two", "k"], ["step"]),  # k is an outer-scope constant
         helper.make_node("Add", ["acc_in", "step"], ["acc_out"]),
         helper.make_node("Not", ["no"], ["cond_out"])],  # a body output that becomes a constant
        "body", [vinfo("i", [], TensorProto.INT64), vinfo("cond_in", [], TensorProto.BOOL), vinfo("acc_in", [3])],
        [vinfo("cond_out", [], TensorProto.BOOL), vinfo("acc_out", [3])],
        [tensor("one", np.ones(3, F32)), tensor("no", np.array(False))])
    nodes = [helper.make_node("Loop", ["trips", "", "x"], ["y"], body=body)]
    model = make_model(nodes, [vinfo("x", [3]), vinfo("trips", [], TensorProto.INT64)], [vinfo("y", [3])],
                       [tensor("k", np.full(3, 3, F32))])
    out, _ = fold(model)
    assert ops(out) == ["Loop"]
    assert body_ops(out, "body") == ["Add"]
    feeds = [{"x": np.arange(3, dtype=F32), "trips": np.array(n, np.int64)} for n in (0, 1, 4)]
    assert_same_outputs(model, out, feeds=feeds)


@pytest.mark.parametrize("cond", [True, False])
def test_if_with_constant_condition_flattened(cond):
    then = branch("then", [helper.make_node("Relu", ["x"], ["t"])], [vinfo("t", [3])])
    other = branch("else", [], [vinfo("k", [3])], [tensor("k", np.full(3, 7, F32))])  # output is a constant
    nodes = [helper.make_node("Not", ["nc"], ["c"]),
             helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other),
             helper.make_node("Add", ["y", "x"], ["z"])]
    model = make_model(nodes, [vinfo("x", [3])], [vinfo("y", [3]), vinfo("z", [3])],
                       [tensor("nc", np.array(not cond))])
    out, stats = fold(model)
    assert "If" not in ops(out)
    assert ops(out) == (["Relu", "Add"] if cond else ["Add"])  # Identity(constant) folds next round
    assert [o.name for o in out.graph.output] == ["y", "z"]
    assert stats["rewrites"] >= 2
    assert_same_outputs(model, out)


def test_whole_loop_on_constants_folds_and_if_in_loop_body_flattens():
    body = helper.make_graph(
        [helper.make_node("Cast", ["i"], ["fi"], to=TensorProto.FLOAT),
         helper.make_node("Add", ["acc_in", "fi"], ["acc_out"]),
         helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body", [vinfo("i", [], TensorProto.INT64), vinfo("cond_in", [], TensorProto.BOOL), vinfo("acc_in", [3])],
        [vinfo("cond_out", [], TensorProto.BOOL), vinfo("acc_out", [3])])
    then = branch("then", [helper.make_node("Relu", ["acc_in"], ["t"])], [vinfo("t", [3])])
    other = branch("else", [helper.make_node("Neg", ["acc_in"], ["e"])], [vinfo("e", [3])])
    body2 = helper.make_graph(
        [helper.make_node("If", ["flag"], ["acc_out"], then_branch=then, else_branch=other),
         helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body2", [vinfo("i", [], TensorProto.INT64), vinfo("cond_in", [], TensorProto.BOOL), vinfo("acc_in", [3])],
        [vinfo("cond_out", [], TensorProto.BOOL), vinfo("acc_out", [3])])
    nodes = [helper.make_node("Loop", ["trips", "", "init"], ["l"], body=body),
             helper.make_node("Loop", ["n", "", "x"], ["l2"], body=body2),
             helper.make_node("Add", ["l2", "l"], ["y"])]
    inits = [tensor("trips", np.array(4, np.int64)), tensor("init", np.zeros(3, F32)), tensor("flag", np.array(False))]
    model = make_model(nodes, [vinfo("x", [3]), vinfo("n", [], TensorProto.INT64)], [vinfo("y", [3])], inits)
    out, _ = fold(model)
    assert ops(out) == ["Loop", "Add"]
    assert body_ops(out, "body") == ["Identity", "Neg"] or sorted(body_ops(out, "body")) == ["Identity", "Neg"]
    feeds = [{"x": np.arange(3, dtype=F32) - 1, "n": np.array(n, np.int64)} for n in (0, 1, 3)]
    assert_same_outputs(model, out, feeds=feeds)


def test_dynamo_style_zero_bias_through_castlike():
    nodes = [
        helper.make_node("Shape", ["w"], ["ws"], start=0, end=1),
        helper.make_node("Expand", ["ws", "one"], ["bs"]),
        helper.make_node("CastLike", ["zero", "x"], ["z"]),
        helper.make_node("Expand", ["z", "bs"], ["bias"]),
        helper.make_node("Conv", ["x", "w", "bias"], ["y"]),
    ]
    inits = [tensor("w", np.ones((4, 2, 1, 1), F32)), tensor("one", i64(1)), tensor("zero", np.array(0.0, np.float64))]
    model = make_model(nodes, [vinfo("x", ["N", 2, 3, 3])], [vinfo("y", ["N", 4, 3, 3])], inits)
    out, _ = fold(model)
    assert ops(out) == ["Conv"]
    assert_same_outputs(model, out, shapes={"x": (2, 2, 3, 3)})


def test_sequence_values_survive():
    nodes = [helper.make_node("SequenceConstruct", ["a", "b"], ["sq"]),
             helper.make_node("ConcatFromSequence", ["sq"], ["c"], axis=0),
             helper.make_node("Add", ["x", "c"], ["y"])]
    model = make_model(nodes, [vinfo("x", [6])], [vinfo("y", [6])], [tensor("a", np.ones(3, F32)), tensor("b", np.ones(3, F32))])
    out, stats = fold(model)
    assert ops(out) == ["SequenceConstruct", "ConcatFromSequence", "Add"]
    assert_same_outputs(model, out)
