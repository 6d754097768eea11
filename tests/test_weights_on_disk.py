"""Weights stay on disk: lazy reading, streamed writing, external data for >2 GB models."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxslim_opt.api import OptimizeOptions, run
from onnxslim_opt.graph import export_skeleton, import_graph
from onnxslim_opt.model_io import StagedModel, load_model_sized
from onnxslim_opt.weights_on_disk import FileBackedValues, attach_file_backed_values, read_model_lazy
from util import assert_same_outputs, make_model, session, tensor, vinfo


def _mlp(tmp_path, external=False, name="mlp.onnx"):
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((64, 128)).astype(np.float32)
    w2 = rng.standard_normal((128, 16)).astype(np.float16)
    packed = numpy_helper.from_array(rng.standard_normal((32, 64)).astype(np.float32), "packed")
    packed.float_data.extend(numpy_helper.to_array(packed).ravel().tolist())
    packed.ClearField("raw_data")  # stored in the typed field, not raw_data
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Cast", ["r"], ["r16"], to=onnx.TensorProto.FLOAT16),
             helper.make_node("MatMul", ["r16", "w2"], ["y16"]), helper.make_node("Cast", ["y16"], ["y"], to=1),
             helper.make_node("MatMul", ["p", "packed"], ["z"]), helper.make_node("Add", ["z", "small"], ["zz"])]
    model = make_model(nodes, [vinfo("x", [2, 64]), vinfo("p", [3, 32])], [vinfo("y", [2, 16]), vinfo("zz", [3, 64])],
                       [tensor("w1", w1), tensor("w2", w2), tensor("small", np.zeros(64, np.float32)), packed])
    path = tmp_path / name
    if external:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)  # onnx.save turns the saved proto's tensors into external stubs
        onnx.save(copy, path, save_as_external_data=True, location=name + ".data", size_threshold=1024)
    else:
        onnx.save(model, path)
    return model, path


def test_lazy_read_keeps_weights_on_disk_and_reads_them_right(tmp_path):
    model, path = _mlp(tmp_path)
    lazy = read_model_lazy(path)
    stubs = {t.name for t in lazy.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    assert stubs == {"w1", "w2"}  # small and typed-field tensors are parsed normally
    graph = import_graph(lazy)
    assert attach_file_backed_values(graph, path.parent) == 2
    tensors = graph.tensors()
    assert isinstance(tensors["w1"]._values, FileBackedValues)
    for t in model.graph.initializer:
        np.testing.assert_array_equal(tensors[t.name].values, numpy_helper.to_array(t))


def test_streamed_write_is_a_valid_equal_model(tmp_path):
    model, path = _mlp(tmp_path)
    lazy, size = load_model_sized(path, lazy=True)
    assert size == path.stat().st_size
    graph = import_graph(lazy)
    attach_file_backed_values(graph, path.parent)
    skeleton, weights = export_skeleton(graph, lazy)
    assert len(skeleton.graph.initializer) == 0 and len(weights) == 4
    with StagedModel(tmp_path / "out.onnx", skeleton=skeleton, weights=weights) as staged:
        onnx.checker.check_model(str(staged.path), full_check=True)
        written = onnx.load(staged.path)
        assert_same_outputs(model, written)
        assert {t.name: numpy_helper.to_array(t).tobytes() for t in written.graph.initializer} == \
               {t.name: numpy_helper.to_array(t).tobytes() for t in model.graph.initializer}


def test_external_data_output_for_huge_models(tmp_path):
    model, path = _mlp(tmp_path)
    lazy = read_model_lazy(path)
    graph = import_graph(lazy)
    attach_file_backed_values(graph, path.parent)
    skeleton, weights = export_skeleton(graph, lazy)
    out = tmp_path / "big.onnx"
    StagedModel(out, skeleton=skeleton, weights=weights, force_external=True).commit()
    assert (tmp_path / "big.onnx.data").stat().st_size >= 64 * 128 * 4
    onnx.checker.check_model(str(out))
    feeds = {"x": np.ones((2, 64), np.float32), "p": np.ones((3, 32), np.float32)}
    import onnxruntime as ort
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, feeds)
    ref = session(model).run(None, feeds)
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g, r, rtol=1e-3)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".onnxslim-opt-")]


def test_optimize_model_with_external_data_input(tmp_path):
    model, path = _mlp(tmp_path, external=True)
    assert (tmp_path / "mlp.onnx.data").exists()
    outcome = run(path, tmp_path / "opt.onnx", OptimizeOptions(), keep_model=False)
    assert outcome.report.validation["status"] == "passed"
    assert outcome.report.before.file_bytes > path.stat().st_size  # external data counted
    assert_same_outputs(model, onnx.load(tmp_path / "opt.onnx"))


def test_stream_and_in_memory_exports_agree(tmp_path):
    model, path = _mlp(tmp_path)
    a = run(path, tmp_path / "a.onnx", OptimizeOptions(), keep_model=False)
    b = run(path, tmp_path / "b.onnx", OptimizeOptions(), keep_model=True)
    assert a.report.after.nodes == b.report.after.nodes
    assert_same_outputs(onnx.load(tmp_path / "a.onnx"), onnx.load(tmp_path / "b.onnx"), rtol=0, atol=0)


def test_in_memory_export_of_weights_a_pass_loaded(tmp_path):
    """push_transposes reads (and so loads) file-backed weights; the in-memory export must then
    write them inline, not as stale external-data references."""
    from util import MODELS

    outcome = run(MODELS / "tf_style_nhwc.onnx", tmp_path / "t.onnx", OptimizeOptions(), keep_model=True)
    assert outcome.report.validation["status"] == "passed"
    onnx.checker.check_model(outcome.model, full_check=True)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in outcome.model.graph.initializer)


def test_make_constant_keeps_scalars_scalar():
    import onnx_graphsurgeon as gs
    from onnxslim_opt.graph import make_constant

    c = make_constant(gs.Graph(), "s", np.float32(2.0))
    assert c.values.shape == ()
