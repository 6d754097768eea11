import numpy as np
from onnx import TensorProto, helper

from util import assert_same_outputs, make_model, optimize_with, ops, pass_stats, tensor, vinfo

PASSES = ["collapse_shape_concat", "eliminate_dead_code"]
N = helper.make_node
I64 = TensorProto.INT64
X_SHAPE = ["B", 3, 4]
CONCRETE = {"x": [2, 3, 4]}


def c(name, values):
    return tensor(name, np.array(values, dtype=np.int64))


def dim(i, tag, opset=17):
    """Unsqueeze(Gather(Shape(x), i)) -> d<tag>."""
    unsq = N("Unsqueeze", [f"g{tag}", "zero"], [f"d{tag}"]) if opset >= 13 else \
        N("Unsqueeze", [f"g{tag}"], [f"d{tag}"], axes=[0])
    return [N("Gather", ["sh", f"i{tag}"], [f"g{tag}"], axis=0), unsq], [c(f"i{tag}", i)]


def model_of(pieces, opset=17, x_shape=X_SHAPE, out_shape=None, extra=(), outputs=()):
    """Shape(x) -> pieces -> Concat -> y (the rebuilt shape, an int64 graph output)."""
    nodes, inits, names = [N("Shape", ["x"], ["sh"])], [c("zero", [0])], []
    for k, p in enumerate(pieces):
        if isinstance(p, int):
            more, init = dim(p, k, opset)
            nodes += more
            inits += init
            names.append(f"d{k}")
        elif p[0] == "slice":
            nodes.append(N("Slice", ["sh", f"s{k}", f"e{k}"], [f"d{k}"]))
            inits += [c(f"s{k}", [p[1]]), c(f"e{k}", [p[2]])]
            names.append(f"d{k}")
        elif p[0] == "gather":
            nodes.append(N("Gather", ["sh", f"i{k}"], [f"d{k}"], axis=0))
            inits.append(c(f"i{k}", p[1]))
            names.append(f"d{k}")
        elif p[0] == "const":
            inits.append(c(f"d{k}", p[1]))
            names.append(f"d{k}")
    nodes.append(N("Concat", names, ["y"], axis=0))
    return make_model(nodes + list(extra), [vinfo("x", x_shape)], [vinfo("y", [out_shape], I64), *outputs], inits,
                      opset=opset)


def run(model, expect=None, any_order=True, shapes=None):
    out, report = optimize_with(model, PASSES)
    if expect is not None:
        got = sorted(ops(out)) if any_order else ops(out)
        assert got == (sorted(expect) if any_order else expect), pass_stats(report, "collapse_shape_concat")["rejections"]
    assert_same_outputs(model, out, shapes=shapes or CONCRETE)
    return out, report


def rejections(report):
    return pass_stats(report, "collapse_shape_concat")["rejections"]


def test_full_rebuild_is_shape():
    out, _ = run(model_of([0, 1, 2], out_shape=3), ["Shape"])
    assert out.graph.output[0].name == "y"


def test_negative_index_and_slice_and_gather_pieces():
    run(model_of([("slice", 0, 1), 1, -1], out_shape=3), ["Shape"])
    run(model_of([("gather", [0, 1]), ("slice", -1, 2**62)], out_shape=3), ["Shape"])


def test_opset11_unsqueeze_attribute():
    run(model_of([0, 1, 2], opset=11, out_shape=3), ["Shape"])


def test_leading_run_becomes_sliced_shape():
    out, _ = run(model_of([0, 1, ("const", [-1])], out_shape=3), ["Shape", "Concat"])
    shape = next(n for n in out.graph.node if n.op_type == "Shape")
    assert {a.name: a.i for a in shape.attribute} == {"start": 0, "end": 2}


def test_middle_run_covering_the_concat_is_one_sliced_shape():
    out, _ = run(model_of([1, 2], x_shape=["B", 3, 4, 5], out_shape=2), ["Shape"], shapes={"x": [2, 3, 4, 5]})
    shape = out.graph.node[0]
    assert {a.name: a.i for a in shape.attribute} == {"start": 1, "end": 3}


def test_partial_run_before_opset15_declined():
    _, report = run(model_of([0, 1, ("const", [-1])], opset=13, out_shape=3))
    assert any("opset >= 15" in r for r in rejections(report))


def test_out_of_order_pieces_stay():
    out, _ = run(model_of([1, 0], out_shape=2))
    assert ops(out).count("Gather") == 2 and "Concat" in ops(out)


def test_gap_between_dims_stays():
    out, _ = run(model_of([0, 2], out_shape=2))
    assert "Concat" in ops(out)


def test_pieces_of_two_tensors_stay():
    # the second dim comes from Shape(x2): same index, other tensor
    model = model_of([0, 1, 2], out_shape=3)
    g = model.graph
    g.input.append(vinfo("x2", ["B", 6, 4]))
    g.node.insert(0, N("Shape", ["x2"], ["sh2"]))
    gather = next(n for n in g.node if n.op_type == "Gather" and n.input[1] == "i1")
    gather.input[0] = "sh2"
    out, _ = optimize_with(model, PASSES)
    assert "Concat" in ops(out)
    assert_same_outputs(model, out, shapes={"x": [2, 3, 4], "x2": [2, 6, 4]})


def test_partial_run_with_other_readers_declined():
    extra = [N("Neg", ["d0"], ["z"])]
    model = model_of([0, 1, ("const", [-1])], out_shape=3, extra=extra, outputs=[vinfo("z", [1], I64)])
    out, report = run(model)
    assert "Concat" in ops(out) and ops(out).count("Gather") == 2
    assert any("read by other nodes" in r for r in rejections(report))


def test_full_rebuild_with_other_readers_still_drops_the_concat():
    extra = [N("Neg", ["d0"], ["z"])]
    model = model_of([0, 1, 2], out_shape=3, extra=extra, outputs=[vinfo("z", [1], I64)])
    out, _ = run(model, ["Shape", "Gather", "Unsqueeze", "Neg"])


def test_reshape_target_inside_if_branch():
    nodes = [N("Shape", ["x"], ["sh"]), N("Gather", ["sh", "i0"], ["g0"], axis=0), N("Unsqueeze", ["g0", "zero"], ["d0"]),
             N("Gather", ["sh", "i1"], ["g1"], axis=0), N("Unsqueeze", ["g1", "zero"], ["d1"]),
             N("Gather", ["sh", "i2"], ["g2"], axis=0), N("Unsqueeze", ["g2", "zero"], ["d2"]),
             N("Concat", ["d0", "d1", "d2"], ["tgt"], axis=0), N("Relu", ["x"], ["r"]),
             N("Reshape", ["r", "tgt"], ["y_then"])]
    then = helper.make_graph(nodes, "then", [], [helper.make_tensor_value_info("y_then", TensorProto.FLOAT, None)],
                             [c("i0", 0), c("i1", 1), c("i2", 2), c("zero", [0])])
    other = helper.make_graph([N("Neg", ["x"], ["z"])], "else", [],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)])
    model = make_model([N("If", ["cond"], ["y"], then_branch=then, else_branch=other)],
                       [vinfo("cond", [], TensorProto.BOOL), vinfo("x", X_SHAPE)], [vinfo("y", X_SHAPE)])
    out, _ = optimize_with(model, PASSES)
    body = next(a.g for a in out.graph.node[0].attribute if a.name == "then_branch")
    assert sorted(n.op_type for n in body.node) == ["Relu", "Reshape", "Shape"]
    x = np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)
    for flag in (True, False):
        assert_same_outputs(model, out, feeds=[{"cond": np.array(flag), "x": x}])
