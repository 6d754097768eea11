import numpy as np
from onnx import TensorProto, helper

import passes.deduplicate_initializers as dedup
from onnxslim_opt.graph import import_graph
from onnxslim_opt.pass_api import PassContext
from util import assert_same_outputs, make_model, optimize_with, ops, pass_stats, tensor, vinfo

DEDUP = ["deduplicate_initializers", "eliminate_dead_code"]


def _check(model, passes=DEDUP, feeds=None):
    out, report = optimize_with(model, passes)
    assert report.validation["status"] == "passed", report.validation
    assert_same_outputs(model, out, feeds=feeds)
    return out, pass_stats(report, "deduplicate_initializers")


def test_repeated_shape_constants_merged():
    n = 50
    nodes, inits = [], []
    for i in range(n):
        inits.append(tensor(f"shape{i}", np.array([1, -1], np.int64)))
        nodes.append(helper.make_node("Reshape", ["x" if i == 0 else f"r{i - 1}", f"shape{i}"], [f"r{i}"]))
    model = make_model(nodes, [vinfo("x", [2, 3])], [vinfo(f"r{n - 1}", [1, 6])], inits)
    out, stats = _check(model)
    assert [t.name for t in out.graph.initializer] == ["shape0"]
    assert all(node.input[1] == "shape0" for node in out.graph.node)
    assert stats["bytes_saved"] == (n - 1) * 16 and stats["rewrites"] == n - 1


def test_tied_embeddings_merged():
    emb = np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["emb_in", "ids"], ["h"], axis=0),
             helper.make_node("MatMul", ["h", "emb_out_t"], ["logits"]),
             helper.make_node("Transpose", ["emb_out"], ["emb_out_t"], perm=[1, 0])]
    nodes = [nodes[0], nodes[2], nodes[1]]
    model = make_model(nodes, [vinfo("ids", [3], TensorProto.INT64)], [vinfo("logits", [3, 16])],
                       [tensor("emb_in", emb), tensor("emb_out", emb.copy())])
    out, stats = _check(model)
    assert [t.name for t in out.graph.initializer] == ["emb_in"]
    assert stats["bytes_saved"] == emb.nbytes


def test_same_bytes_other_dtype_or_shape_not_merged():
    nodes = [helper.make_node("Cast", ["zi"], ["zc"], to=TensorProto.FLOAT),
             helper.make_node("Add", ["x", "zf"], ["a"]),
             helper.make_node("Add", ["a", "zc"], ["b"]),
             helper.make_node("Add", ["b", "sq"], ["y"])]
    inits = [tensor("zf", np.zeros(4, np.float32)), tensor("zi", np.zeros(4, np.int32)),
             tensor("sq", np.zeros((1, 4), np.float32))]
    model = make_model(nodes, [vinfo("x", [4])], [vinfo("y", [1, 4])], inits)
    out, stats = _check(model)
    assert sorted(t.name for t in out.graph.initializer) == ["sq", "zf", "zi"]
    assert stats["rewrites"] == 0


def test_hash_collision_never_merges(monkeypatch):
    monkeypatch.setattr(dedup, "_digest", lambda arr: b"same")
    nodes = [helper.make_node("Add", ["x", "a"], ["t"]), helper.make_node("Add", ["t", "b"], ["u"]),
             helper.make_node("Add", ["u", "c"], ["y"])]
    inits = [tensor("a", np.array([1, 2], np.float32)), tensor("b", np.array([3, 4], np.float32)),
             tensor("c", np.array([1, 2], np.float32))]
    model = make_model(nodes, [vinfo("x", [2])], [vinfo("y", [2])], inits)
    out, stats = _check(model)
    assert sorted(t.name for t in out.graph.initializer) == ["a", "b"]
    assert stats["rewrites"] == 1


def test_constant_nodes_and_graph_outputs():
    value = np.array([1.5, -2.0], np.float32)
    nodes = [helper.make_node("Constant", [], ["k_out"], value=tensor("v", value)),
             helper.make_node("Constant", [], ["k2"], value=tensor("v", value)),
             helper.make_node("Add", ["x", "k2"], ["t"]),
             helper.make_node("Mul", ["t", "w"], ["y"])]
    model = make_model(nodes, [vinfo("x", [2])], [vinfo("y", [2]), vinfo("k_out", [2]), vinfo("w", [2])],
                       [tensor("w", value)])
    out, stats = _check(model)
    # k_out and w are graph outputs: both stay; the inner duplicate k2 goes, its reader reads w
    assert ops(out) == ["Constant", "Add", "Mul"]
    assert [o.name for o in out.graph.output] == ["y", "k_out", "w"]
    assert out.graph.node[1].input[1] == "w" and stats["rewrites"] == 1


def test_graph_input_initializers_never_merged():
    """gs drops initializers from the inputs at import; a Constant still listed as an input is overridable."""
    nodes = [helper.make_node("Add", ["x", "a"], ["t"]), helper.make_node("Add", ["t", "b"], ["y"])]
    inits = [tensor("a", np.ones(2, np.float32)), tensor("b", np.ones(2, np.float32))]
    graph = import_graph(make_model(nodes, [vinfo("x", [2])], [vinfo("y", [2])], inits))
    graph.inputs.append(graph.tensors()["a"])
    result = dedup.DeduplicateInitializers().run(graph, PassContext(opset=17))
    assert result.rewrites == 0 and [n.inputs[1].name for n in graph.nodes] == ["a", "b"]


def _if_model(inner_value: np.ndarray, inner_as_constant_node: bool):
    inner = [helper.make_node("Add", ["x", "w_in"], ["t"])]
    inner_inits = []
    if inner_as_constant_node:
        inner.insert(0, helper.make_node("Constant", [], ["w_in"], value=tensor("w_in", inner_value)))
    else:
        inner_inits.append(tensor("w_in", inner_value))
    then_g = helper.make_graph(inner, "then", [], [vinfo("t", [4])], inner_inits)
    else_g = helper.make_graph([helper.make_node("Sub", ["x", "w"], ["e"])], "else", [], [vinfo("e", [4])])
    nodes = [helper.make_node("If", ["c"], ["i"], then_branch=then_g, else_branch=else_g),
             helper.make_node("Mul", ["i", "w"], ["y"])]
    return make_model(nodes, [vinfo("x", [4]), vinfo("c", [], TensorProto.BOOL)], [vinfo("y", [4])],
                      [tensor("w", np.arange(4, dtype=np.float32))])


def _then(model):
    return next(a.g for a in model.graph.node[0].attribute if a.name == "then_branch")


def _feeds():
    return [{"x": np.array([1, -2, 3, 0.5], np.float32), "c": np.array(v)} for v in (True, False)]


def test_if_branch_reads_outer_initializer():
    for as_node in (False, True):
        model = _if_model(np.arange(4, dtype=np.float32), as_node)
        out, stats = _check(model, feeds=_feeds())
        then_g = _then(out)
        assert [n.op_type for n in then_g.node] == ["Add"] and list(then_g.node[0].input) == ["x", "w"]
        assert "w_in" not in {t.name for t in then_g.initializer}
        assert stats["rewrites"] == 1


def test_if_branch_different_value_kept():
    model = _if_model(np.arange(4, dtype=np.float32) + 1, False)
    out, stats = _check(model, feeds=_feeds())
    assert stats["rewrites"] == 0
    assert list(_then(out).node[0].input) == ["x", "w_in"]


def test_inner_constant_never_replaces_outer_one():
    """Survivors are picked outermost first: the outer reader never reads a branch-local name."""
    graph = import_graph(_if_model(np.arange(4, dtype=np.float32), True))
    dedup.DeduplicateInitializers().run(graph, PassContext(opset=17))
    assert graph.nodes[1].inputs[1].name == "w"


def test_unique_weights_are_not_loaded():
    nodes = [helper.make_node("Add", ["x", "u"], ["t"]), helper.make_node("Add", ["t", "d1"], ["s"]),
             helper.make_node("Add", ["s", "d2"], ["y"])]
    inits = [tensor("u", np.arange(1000, dtype=np.float32)), tensor("d1", np.ones(1, np.float32)),
             tensor("d2", np.ones(1, np.float32))]
    graph = import_graph(make_model(nodes, [vinfo("x", [1000])], [vinfo("y", [1000])], inits))
    result = dedup.DeduplicateInitializers().run(graph, PassContext(opset=17))
    assert result.rewrites == 1 and graph.nodes[2].inputs[1].name == "d1"
    assert type(graph.tensors()["u"]._values).__name__ == "LazyValues"  # alone in its group: never read
