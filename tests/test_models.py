"""The small models shipped in models/ (made by models/make_models.py) load, check and run in ONNX Runtime.

No torch or scikit-learn here: only onnx, onnxruntime and numpy.
"""
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

MODELS = Path(__file__).resolve().parents[1] / "models"

ALL_MODELS = [
    "digits_cnn.onnx",
    "digits_cnn_dynamo.onnx",
    "sklearn_logreg_zipmap.onnx",
    "sklearn_tree.onnx",
    "paddle_style_mlp.onnx",
    "tf_style_nhwc.onnx",
    "old_ir_initializers_as_inputs.onnx",
]


def _session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _path(name: str) -> Path:
    path = MODELS / name
    if not path.exists():
        pytest.fail(f"{path} missing: regenerate with models/make_models.py (see models/README.md)")
    return path


@pytest.fixture(scope="module")
def digits_test():
    data = np.load(_path("digits_test.npz"))
    return data["input"], data["label"]


@pytest.mark.parametrize("name", ALL_MODELS)
def test_model_passes_checker_and_runs(name):
    path = _path(name)
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path))
    inits = {t.name for t in model.graph.initializer}
    sess = _session(path)
    rng = np.random.default_rng(0)
    feed = {}
    for inp in sess.get_inputs():
        if inp.name in inits:
            continue
        assert inp.type == "tensor(float)"
        shape = [d if isinstance(d, int) and d > 0 else 3 for d in inp.shape]
        feed[inp.name] = rng.standard_normal(shape).astype(np.float32)
    outs = sess.run(None, feed)
    assert len(outs) == len(model.graph.output)


def test_digits_test_split(digits_test):
    x, y = digits_test
    assert x.dtype == np.float32 and x.ndim == 4 and x.shape[1:] == (1, 32, 32)
    assert y.dtype == np.int64 and y.shape == (x.shape[0],)
    assert set(np.unique(y)) == set(range(10))


@pytest.mark.parametrize("name", ["digits_cnn.onnx", "digits_cnn_dynamo.onnx"])
def test_digits_cnn_accuracy(name, digits_test):
    x, y = digits_test
    model = onnx.load(str(_path(name)))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("BatchNormalization") == 8 and ops.count("Conv") == 8 and ops.count("Add") >= 3
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    sess = _session(_path(name))
    logits = sess.run(None, {"input": x})[0]
    assert logits.shape == (len(y), 10)
    accuracy = float((logits.argmax(1) == y).mean())
    assert accuracy >= 0.95, accuracy
    # dynamic batch: one image gives the same logits as in the full batch
    np.testing.assert_allclose(sess.run(None, {"input": x[5:6]})[0], logits[5:6], rtol=1e-4, atol=1e-4)


def test_digits_exporters_agree(digits_test):
    x, _ = digits_test
    a = _session(_path("digits_cnn.onnx")).run(None, {"input": x[:64]})[0]
    b = _session(_path("digits_cnn_dynamo.onnx")).run(None, {"input": x[:64]})[0]
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_sklearn_zipmap_outputs_list_of_dicts():
    sess = _session(_path("sklearn_logreg_zipmap.onnx"))
    x = np.random.default_rng(0).uniform(0, 16, (5, 64)).astype(np.float32)
    label, proba = sess.run(None, {"input": x})
    assert label.dtype == np.int64 and label.shape == (5,)
    assert isinstance(proba, list) and len(proba) == 5
    assert all(isinstance(d, dict) and sorted(d) == list(range(10)) for d in proba)
    assert all(abs(sum(d.values()) - 1.0) < 1e-4 for d in proba)
    assert [max(d, key=d.get) for d in proba] == label.tolist()


def test_sklearn_tree_is_tree_ensemble():
    model = onnx.load(str(_path("sklearn_tree.onnx")))
    assert [(n.domain, n.op_type) for n in model.graph.node] == [("ai.onnx.ml", "TreeEnsembleClassifier")]
    x = np.random.default_rng(0).uniform(0, 16, (4, 64)).astype(np.float32)
    label, proba = _session(_path("sklearn_tree.onnx")).run(None, {"input": x})
    assert label.shape == (4,) and proba.shape == (4, 10)


def test_paddle_style_has_no_initializers():
    model = onnx.load(str(_path("paddle_style_mlp.onnx")))
    assert len(model.graph.initializer) == 0
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Constant") >= 6 and {"Conv", "BatchNormalization", "Gemm"} <= set(ops)
    assert [i.name for i in model.graph.input] == ["x"]


def test_tf_style_nhwc_layout():
    model = onnx.load(str(_path("tf_style_nhwc.onnx")))
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 16, 16, 3]
    perms = [list(n.attribute[0].ints) for n in model.graph.node if n.op_type == "Transpose"]
    assert perms == [[0, 3, 1, 2], [0, 2, 3, 1]] * 3
    assert [n.op_type for n in model.graph.node][-3:] == ["ReduceMean", "MatMul", "Add"]


def test_old_ir_lists_initializers_as_inputs():
    model = onnx.load(str(_path("old_ir_initializers_as_inputs.onnx")))
    assert model.ir_version == 3
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 8)]
    input_names = {i.name for i in model.graph.input}
    assert model.graph.initializer and all(t.name in input_names for t in model.graph.initializer)
    assert len(input_names) == len(model.graph.initializer) + 1
    out = _session(_path("old_ir_initializers_as_inputs.onnx")).run(
        None, {"data": np.ones((1, 3, 16, 16), np.float32)})[0]
    assert out.shape == (1, 10) and abs(float(out.sum()) - 1.0) < 1e-5
