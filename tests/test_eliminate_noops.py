import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from util import check_rewrite, assert_same_outputs, make_model, optimize_with, ops, pass_stats, tensor, vinfo

PASSES = ["eliminate_noops", "eliminate_dead_code"]
F, I64 = TensorProto.FLOAT, TensorProto.INT64
I64_MAX = np.iinfo(np.int64).max


def c(name, values, dtype=np.int64):
    return tensor(name, np.array(values, dtype=dtype))


def typed_model(nodes, inputs, outputs, inits=(), opset=17):
    """make_model with the graph outputs' types taken from onnx shape inference."""
    untyped = [helper.make_empty_tensor_value_info(o) for o in outputs]
    raw = helper.make_model(helper.make_graph(nodes, "t", inputs, untyped, list(inits)),
                            opset_imports=[helper.make_opsetid("", opset)])
    typed = onnx.shape_inference.infer_shapes(raw).graph.output
    return make_model(nodes, inputs, typed, inits, opset=opset)


def chain(noop, inits=(), shape=(2, 3, 4), dtype=F, opset=17, out_shape=None, concrete=None):
    """x -> noop -> Neg -> y: the no-op is neither a graph input nor a graph output."""
    nodes = [noop, helper.make_node("Neg", [noop.output[0]], ["y"])]
    inputs = [vinfo("x", list(shape), dtype)]
    if out_shape is not None:
        return make_model(nodes, inputs, [vinfo("y", out_shape, dtype)], inits, opset=opset)
    return typed_model(nodes, inputs, ["y"], inits, opset)


def run(model, expect, concrete=None):
    """Optimize, check the op list, compare outputs (`concrete` fixes x's dynamic dims)."""
    return check_rewrite(model, PASSES, expect, "eliminate_noops", concrete)


N = helper.make_node
REMOVED = {
    "identity": dict(noop=N("Identity", ["x"], ["t"])),
    "dropout": dict(noop=N("Dropout", ["x"], ["t"])),
    "dropout_false": dict(noop=N("Dropout", ["x", "r", "tm"], ["t", "mask"]),
                          inits=[c("r", 0.5, np.float32), c("tm", False, np.bool_)]),
    "cast_same": dict(noop=N("Cast", ["x"], ["t"], to=F)),
    "castlike_same": dict(noop=N("CastLike", ["x", "like"], ["t"]), inits=[c("like", [1.0], np.float32)]),
    "transpose_identity": dict(noop=N("Transpose", ["x"], ["t"], perm=[0, 1, 2])),
    "transpose_rank1_default": dict(noop=N("Transpose", ["x"], ["t"]), shape=(5,)),
    "reshape_same": dict(noop=N("Reshape", ["x", "s"], ["t"]), inits=[c("s", [2, 3, 4])]),
    "reshape_zeros": dict(noop=N("Reshape", ["x", "s"], ["t"]), inits=[c("s", [0, 0, 4])]),
    "reshape_minus_one_dynamic": dict(noop=N("Reshape", ["x", "s"], ["t"]), inits=[c("s", [-1, 3, 4])],
                                      shape=("N", 3, 4), concrete=(5, 3, 4)),
    "reshape_allowzero_dynamic": dict(noop=N("Reshape", ["x", "s"], ["t"], allowzero=1),
                                      inits=[c("s", [-1, 3, 4])], shape=("N", 3, 4), opset=18, concrete=(5, 3, 4)),
    "squeeze_no_axes": dict(noop=N("Squeeze", ["x"], ["t"])),
    "squeeze_no_axes_opset11": dict(noop=N("Squeeze", ["x"], ["t"]), opset=11),
    "unsqueeze_empty_axes": dict(noop=N("Unsqueeze", ["x", "a"], ["t"]), inits=[c("a", np.zeros(0))]),
    "flatten_axis1": dict(noop=N("Flatten", ["x"], ["t"], axis=1), shape=(2, 3)),
    "flatten_axis0_leading1": dict(noop=N("Flatten", ["x"], ["t"], axis=0), shape=(1, 3)),
    "slice_int_max": dict(noop=N("Slice", ["x", "s", "e", "a"], ["t"]),
                          inits=[c("s", [0, 0]), c("e", [I64_MAX, 4]), c("a", [0, 2])], shape=("N", 3, 4),
                          concrete=(5, 3, 4)),
    "slice_negative_start": dict(noop=N("Slice", ["x", "s", "e"], ["t"]), inits=[c("s", [-2]), c("e", [10])]),
    "slice_opset9": dict(noop=N("Slice", ["x"], ["t"], starts=[0], ends=[100], axes=[-1]), opset=9),
    "expand_no_growth": dict(noop=N("Expand", ["x", "s"], ["t"]), inits=[c("s", [3, 1])]),
    "pad_zero": dict(noop=N("Pad", ["x", "p"], ["t"]), inits=[c("p", [0] * 6)]),
    "pad_zero_reflect": dict(noop=N("Pad", ["x", "p"], ["t"], mode="reflect"), inits=[c("p", [0] * 6)]),
    "mul_one": dict(noop=N("Mul", ["x", "one"], ["t"]), inits=[c("one", 1.0, np.float32)]),
    "mul_one_left_ones": dict(noop=N("Mul", ["one", "x"], ["t"]), inits=[c("one", np.ones((1, 1, 4)), np.float32)]),
    "mul_one_full_shape": dict(noop=N("Mul", ["x", "one"], ["t"]), inits=[c("one", np.ones((2, 3, 4)), np.float32)]),
    "mul_one_dynamic_rank_known": dict(noop=N("Mul", ["x", "one"], ["t"]),
                                       inits=[c("one", [[1.0]], np.float32)], shape=("N", "M"),
                                       concrete=(2, 3)),
    "div_one_int": dict(noop=N("Div", ["x", "one"], ["t"]), inits=[c("one", [1])], dtype=I64),
    "add_zero_left": dict(noop=N("Add", ["z", "x"], ["t"]), inits=[c("z", [0.0, 0.0, 0.0, 0.0], np.float32)]),
    "sub_zero": dict(noop=N("Sub", ["x", "z"], ["t"]), inits=[c("z", 0.0, np.float32)]),
    "pow_one": dict(noop=N("Pow", ["x", "p"], ["t"]), inits=[c("p", 1.0, np.float32)]),
    "concat_single": dict(noop=N("Concat", ["x"], ["t"], axis=1)),
    "sum_single": dict(noop=N("Sum", ["x"], ["t"])),
    "max_single": dict(noop=N("Max", ["x"], ["t"])),
    "min_single": dict(noop=N("Min", ["x"], ["t"])),
    "mean_single": dict(noop=N("Mean", ["x"], ["t"])),
    "split_single_sizes": dict(noop=N("Split", ["x", "sp"], ["t"], axis=1), inits=[c("sp", [3])]),
    "split_single_no_sizes": dict(noop=N("Split", ["x"], ["t"], axis=0)),
    "split_single_opset11": dict(noop=N("Split", ["x"], ["t"], axis=2, split=[4]), opset=11),
    "split_single_num_outputs": dict(noop=N("Split", ["x"], ["t"], axis=0, num_outputs=1), opset=18),
}


@pytest.mark.parametrize("case", sorted(REMOVED))
def test_noop_removed(case):
    run(chain(**REMOVED[case]), ["Neg"], REMOVED[case].get("concrete"))


KEPT = {
    "mul_one_broadcasts": (dict(noop=N("Mul", ["one", "x"], ["t"]), shape=(4,),
                                inits=[c("one", np.ones((1, 1, 4)), np.float32)]), "could broadcast"),
    "mul_two": (dict(noop=N("Mul", ["x", "two"], ["t"]), inits=[c("two", 2.0, np.float32)]), None),
    "sub_from_zero": (dict(noop=N("Sub", ["z", "x"], ["t"]), inits=[c("z", 0.0, np.float32)]), None),
    "one_div_x": (dict(noop=N("Div", ["one", "x"], ["t"]), inits=[c("one", 1.0, np.float32)]), None),
    "cast_float_to_int": (dict(noop=N("Cast", ["x"], ["t"], to=I64)), None),
    "reshape_changes_shape": (dict(noop=N("Reshape", ["x", "s"], ["t"]), inits=[c("s", [6, 4])]), None),
    "reshape_dynamic_unprovable": (dict(noop=N("Reshape", ["x", "s"], ["t"]), inits=[c("s", [2, 12])],
                                        shape=("N", 12), concrete=(2, 12)), "not fully known"),
    "squeeze_drops_ones": (dict(noop=N("Squeeze", ["x"], ["t"]), shape=(2, 1, 4)), None),
    "squeeze_symbolic": (dict(noop=N("Squeeze", ["x"], ["t"]), shape=("N", 3), out_shape=("N", 3),
                              concrete=(2, 3)), "may be 1"),
    "transpose_swaps": (dict(noop=N("Transpose", ["x"], ["t"], perm=[0, 2, 1])), None),
    "slice_partial": (dict(noop=N("Slice", ["x", "s", "e"], ["t"]), inits=[c("s", [1]), c("e", [I64_MAX])]), None),
    "slice_reversed": (dict(noop=N("Slice", ["x", "s", "e", "a", "st"], ["t"]),
                            inits=[c("s", [-1]), c("e", [-I64_MAX]), c("a", [0]), c("st", [-1])]), None),
    "expand_grows": (dict(noop=N("Expand", ["x", "s"], ["t"]), inits=[c("s", [5, 1, 1, 1])]), None),
    "pad_nonzero": (dict(noop=N("Pad", ["x", "p"], ["t"]), inits=[c("p", [0, 0, 1, 0, 0, 0])]), None),
    "flatten_rank3": (dict(noop=N("Flatten", ["x"], ["t"])), None),
}


def test_split_with_two_outputs_stays():
    nodes = [N("Split", ["x", "sp"], ["a", "b"], axis=1), N("Neg", ["a"], ["y"]), N("Neg", ["b"], ["z"])]
    model = typed_model(nodes, [vinfo("x", [2, 3, 4])], ["y", "z"], [c("sp", [1, 2])])
    run(model, ["Split", "Neg", "Neg"])


@pytest.mark.parametrize("case", sorted(KEPT))
def test_not_a_noop_stays(case):
    spec, reason = KEPT[case]
    op = spec["noop"].op_type
    _, report = run(chain(**spec), [op, "Neg"], spec.get("concrete"))
    if reason:
        assert any(reason in r for r in pass_stats(report, "eliminate_noops")["rejections"])


def test_dropout_with_used_mask_stays():
    nodes = [N("Dropout", ["x"], ["t", "mask"]), N("Neg", ["t"], ["y"]), N("Cast", ["mask"], ["m"], to=F)]
    model = make_model(nodes, [vinfo("x", [2, 3])], [vinfo("y", [2, 3]), vinfo("m", [2, 3])])
    out, report = optimize_with(model, PASSES)
    assert ops(out) == ["Dropout", "Neg", "Cast"]
    assert "Dropout mask output is used" in pass_stats(report, "eliminate_noops")["rejections"]
    assert_same_outputs(model, out)


def test_training_dropout_stays():
    nodes = [N("Dropout", ["x", "r", "tm"], ["t"]), N("Neg", ["t"], ["y"])]
    model = make_model(nodes, [vinfo("x", [2, 3]), vinfo("tm", [], TensorProto.BOOL)], [vinfo("y", [2, 3])],
                       [c("r", 0.5, np.float32)])
    out, report = optimize_with(model, PASSES, validate=False)
    assert ops(out) == ["Dropout", "Neg"]
    assert "Dropout training_mode is not a constant" in pass_stats(report, "eliminate_noops")["rejections"]


def test_chain_of_noops_and_graph_output_keeps_name():
    nodes = [N("Relu", ["x"], ["r"]), N("Identity", ["r"], ["a"]), N("Mul", ["a", "one"], ["b"]),
             N("Cast", ["b"], ["y"], to=F)]
    model = make_model(nodes, [vinfo("x", [2, 3])], [vinfo("y", [2, 3])], [c("one", 1.0, np.float32)])
    out, _ = run(model, ["Relu"])
    assert [o.name for o in out.graph.output] == ["y"] and out.graph.node[0].output[0] == "y"


def test_graph_input_to_graph_output_terminates():
    nodes = [N("Identity", ["x"], ["y"]), N("Mul", ["x", "one"], ["z"]), N("Identity", ["one"], ["w"])]
    model = make_model(nodes, [vinfo("x", [2, 3])], [vinfo("y", [2, 3]), vinfo("z", [2, 3]), vinfo("w", [])],
                       [c("one", 1.0, np.float32)])
    out, report = run(model, ["Identity", "Identity", "Identity"])
    assert report.simplify_rounds <= 3
    assert any("must stay" in r for r in pass_stats(report, "eliminate_noops")["rejections"])
    assert [o.name for o in out.graph.output] == ["y", "z", "w"]


def _if_model(then_nodes, then_out, else_nodes, else_out, inits=()):
    then = helper.make_graph(then_nodes, "then", [], [vinfo(then_out, [2, 3])])
    other = helper.make_graph(else_nodes, "else", [], [vinfo(else_out, [2, 3])])
    nodes = [N("Relu", ["x"], ["r"]), N("If", ["cond"], ["o"], then_branch=then, else_branch=other)]
    return make_model(nodes, [vinfo("x", [2, 3]), vinfo("cond", [], TensorProto.BOOL)],
                      [vinfo("o", [2, 3])], inits)


def test_identity_inside_if_branch_removed():
    model = _if_model([N("Identity", ["r"], ["i"]), N("Neg", ["i"], ["t"])], "t",
                      [N("Mul", ["r", "two"], ["m"]), N("Identity", ["m"], ["e"])], "e",
                      inits=[c("two", 2.0, np.float32)])
    out, _ = optimize_with(model, PASSES)
    branches = {a.name: [n.op_type for n in a.g.node] for a in out.graph.node[1].attribute}
    assert branches == {"then_branch": ["Neg"], "else_branch": ["Mul"]}
    assert_same_outputs(model, out, feeds=[{"x": np.ones((2, 3), np.float32) * k, "cond": np.array(b)}
                                           for k in (1, -1) for b in (True, False)])


def test_identity_of_outer_value_as_branch_output_stays():
    model = _if_model([N("Identity", ["r"], ["t"])], "t", [N("Neg", ["r"], ["e"])], "e")
    out, _ = optimize_with(model, PASSES)
    branches = {a.name: [n.op_type for n in a.g.node] for a in out.graph.node[1].attribute}
    assert branches == {"then_branch": ["Identity"], "else_branch": ["Neg"]}
    assert_same_outputs(model, out, feeds=[{"x": np.ones((2, 3), np.float32), "cond": np.array(b)}
                                           for b in (True, False)])


def test_mul_one_on_unknown_rank_stays():
    # Squeeze with runtime axes: the rank of its output is unknown, so [1] could broadcast it
    nodes = [N("Squeeze", ["x", "axes"], ["s"]), N("Mul", ["s", "one"], ["t"]), N("Reshape", ["t", "flat"], ["y"])]
    model = make_model(nodes, [vinfo("x", [2, 1, 3]), vinfo("axes", [1], I64)], [vinfo("y", [None])],
                       [c("one", [1.0], np.float32), c("flat", [-1])])
    feeds = [{"x": np.ones((2, 1, 3), np.float32), "axes": np.array([1])}]
    out, report = optimize_with(model, PASSES, validate=False)
    assert ops(out) == ["Squeeze", "Mul", "Reshape"]
    assert any("could broadcast" in r for r in pass_stats(report, "eliminate_noops")["rejections"])
    assert_same_outputs(model, out, feeds=feeds)
