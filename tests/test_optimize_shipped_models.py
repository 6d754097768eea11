"""The default pipeline on every model in models/, through the CLI, plus the unfamiliar:
custom ops, already-quantized graphs, ai.onnx.ml ops with non-tensor outputs."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from util import MODELS, make_model, tensor, vinfo

SHIPPED = sorted(p.name for p in MODELS.glob("*.onnx"))


def optimize_cli(src: Path, out: Path, *extra) -> dict:
    r = subprocess.run([sys.executable, "-m", "onnxslim_opt.cli", str(src), "-o", str(out), "--report", "-", "-q",
                        *map(str, extra)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_model_optimizes_and_validates(name, tmp_path):
    report = optimize_cli(MODELS / name, tmp_path / name)
    assert report["validation"]["status"] == "passed"
    assert report["after"]["nodes"] <= report["before"]["nodes"]
    onnx.checker.check_model(str(tmp_path / name), full_check=True)


def test_digits_accuracy_is_unchanged(tmp_path):
    data = np.load(MODELS / "digits_test.npz")
    report = optimize_cli(MODELS / "digits_cnn.onnx", tmp_path / "d.onnx")
    assert report["after"]["ops"].get("BatchNormalization", 0) == 0  # folded into the convs
    accs = []
    for path in (MODELS / "digits_cnn.onnx", tmp_path / "d.onnx"):
        logits = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": data["input"]})[0]
        accs.append(float((logits.argmax(1) == data["label"]).mean()))
    assert accs[0] >= 0.95 and accs[1] == accs[0]


def test_zipmap_sequence_of_maps_type_survives(tmp_path):
    optimize_cli(MODELS / "sklearn_logreg_zipmap.onnx", tmp_path / "z.onnx")
    out = onnx.load(tmp_path / "z.onnx")
    prob = next(o for o in out.graph.output if o.name == "output_probability")
    assert prob.type.WhichOneof("value") == "sequence_type"
    assert prob.type.sequence_type.elem_type.WhichOneof("value") == "map_type"
    result = ort.InferenceSession(str(tmp_path / "z.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"input": np.ones((2, 64), np.float32)})
    assert isinstance(result[1], list) and isinstance(result[1][0], dict)


def test_tf_style_transposes_cancel(tmp_path):
    report = optimize_cli(MODELS / "tf_style_nhwc.onnx", tmp_path / "t.onnx")
    assert report["before"]["ops"]["Transpose"] == 6
    assert report["after"]["ops"]["Transpose"] <= 2


def test_custom_op_is_carried_through_and_validation_says_it_could_not_run(tmp_path):
    w = np.ones((4, 4), np.float32)
    nodes = [helper.make_node("Identity", ["x"], ["a"]),
             helper.make_node("MyFancyOp", ["a"], ["b"], domain="com.example", alpha=0.5),
             helper.make_node("MatMul", ["b", "w"], ["m"]),
             helper.make_node("Mul", ["m", "one"], ["y"])]
    model = make_model(nodes, [vinfo("x", [2, 4])], [vinfo("y", [2, 4])],
                       [tensor("w", w), tensor("one", np.array(1.0, np.float32))],
                       extra_opsets=[helper.make_opsetid("com.example", 1)])
    src = tmp_path / "custom.onnx"
    onnx.save(model, src)
    report = optimize_cli(src, tmp_path / "o.onnx")
    assert report["validation"]["status"] == "unavailable"
    assert "MyFancyOp" in report["validation"]["message"] and "--custom-op-library" in report["validation"]["message"]
    assert any("NOT validated" in n for n in report["notes"])
    out = onnx.load(tmp_path / "o.onnx")
    assert [n.op_type for n in out.graph.node] == ["MyFancyOp", "MatMul"]  # Identity and Mul by 1 gone
    custom = out.graph.node[0]
    assert custom.domain == "com.example" and custom.attribute[0].f == 0.5
    assert {(o.domain, o.version) for o in out.opset_import} >= {("com.example", 1)}


def test_quantized_qdq_and_integer_graphs_are_kept(tmp_path):
    rng = np.random.default_rng(0)
    wq = rng.integers(-127, 127, (8, 4, 3, 3)).astype(np.int8)
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
        helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"]),
        helper.make_node("Conv", ["xd", "wd"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Identity", ["c"], ["ci"]),
        helper.make_node("ConvInteger", ["xq", "wq", "xz"], ["ci32"], pads=[1, 1, 1, 1]),
        helper.make_node("Cast", ["ci32"], ["cf"], to=onnx.TensorProto.FLOAT),
        helper.make_node("Add", ["ci", "cf"], ["y"]),
    ]
    inits = [tensor("xs", np.array(0.05, np.float32)), tensor("xz", np.array(128, np.uint8)),
             tensor("wq", wq), tensor("ws", np.array(0.02, np.float32)), tensor("wz", np.array(0, np.int8))]
    model = make_model(nodes, [vinfo("x", [1, 4, 6, 6])], [vinfo("y", [1, 8, 6, 6])], inits, opset=13)
    src = tmp_path / "q.onnx"
    onnx.save(model, src)
    report = optimize_cli(src, tmp_path / "o.onnx")
    assert report["validation"]["status"] == "passed"
    ops = [n.op_type for n in onnx.load(tmp_path / "o.onnx").graph.node]
    assert ops.count("DequantizeLinear") == 2 and "QuantizeLinear" in ops and "ConvInteger" in ops
    assert "Identity" not in ops
