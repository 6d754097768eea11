import numpy as np
from onnx import helper

from util import assert_same_outputs, make_model, optimize_with, ops, tensor, vinfo


def test_dead_code_and_constant_nodes():
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    nodes = [
        helper.make_node("Constant", [], ["w"], value=tensor("w", w)),
        helper.make_node("MatMul", ["x", "w"], ["y"]),
        helper.make_node("Relu", ["x"], ["dead"]),
    ]
    model = make_model(nodes, [vinfo("x", [4, 2])], [vinfo("y", [4, 3])])
    out, report = optimize_with(model, ["inline_constant_nodes", "eliminate_dead_code"])
    assert ops(out) == ["MatMul"]
    assert [t.name for t in out.graph.initializer] == ["w"]
    assert report.validation["status"] == "passed"
    assert_same_outputs(model, out)
