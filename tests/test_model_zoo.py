"""Real graphs the onnx package ships as backend test data, each optimized by the default
pipeline and checked against its expected outputs with ONNX Runtime.

The "light" model-zoo graphs generate their weights with ConstantOfShape at run time: folding
them blindly turns a few-kB file into hundreds of MB, so they also test the fold size limit.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxslim_opt.api import OptimizeOptions, run
from util import session

DATA = Path(onnx.__file__).parent / "backend" / "test" / "data"
LIGHT = sorted(DATA.glob("light/*.onnx"))
CASES = sorted(p.parent for p in list(DATA.glob("pytorch-converted/*/model.onnx")) + list(DATA.glob("pytorch-operator/*/model.onnx")))


def _read_pb(path: Path) -> np.ndarray:
    t = onnx.TensorProto()
    t.ParseFromString(path.read_bytes())
    return numpy_helper.to_array(t)


def _light_input(vi: onnx.ValueInfoProto) -> np.ndarray:
    # what onnx's backend runner feeds these models (Runner.generate_dummy_data, random=False)
    shape = tuple(d.dim_value if d.HasField("dim_value") else 1 for d in vi.type.tensor_type.shape.dim)
    n = int(np.prod(shape))
    return (np.arange(n).reshape(shape) / n).astype(np.float32)


def _optimize_file(path: Path, tmp_path: Path, feeds: list[dict]) -> tuple[onnx.ModelProto, object]:
    npz = tmp_path / "inputs.npz"
    np.savez(npz, **{k: np.stack([f[k] for f in feeds]) for k in feeds[0]})
    out = tmp_path / "opt.onnx"
    outcome = run(path, out, OptimizeOptions(inputs_file=str(npz)), keep_model=False)
    assert outcome.report.validation["status"] == "passed", outcome.report.validation
    return onnx.load(out), outcome.report


@pytest.mark.parametrize("path", LIGHT, ids=[p.stem for p in LIGHT])
def test_light_model_zoo(path, tmp_path):
    model = onnx.load(path)
    inits = {t.name for t in model.graph.initializer}
    feed = {vi.name: _light_input(vi) for vi in model.graph.input if vi.name not in inits}
    optimized, report = _optimize_file(path, tmp_path, [feed])
    expected = _read_pb(path.with_name(path.stem + "_output_0.pb"))
    got = session(optimized).run(None, feed)[0]
    np.testing.assert_allclose(got, expected, rtol=2e-3, atol=1e-5)
    # the size limit keeps the generated weights unfolded: no bloat
    size = (tmp_path / "opt.onnx").stat().st_size
    assert size <= max(2 * path.stat().st_size, path.stat().st_size + (1 << 20)), f"{size} bytes"
    assert report.after.nodes <= report.before.nodes


@pytest.mark.parametrize("case", CASES, ids=[f"{c.parent.name}/{c.name}" for c in CASES])
def test_pytorch_cases(case, tmp_path):
    model_path = case / "model.onnx"
    model = onnx.load(model_path)
    inits = {t.name for t in model.graph.initializer}
    names = [vi.name for vi in model.graph.input if vi.name not in inits]
    data_set = case / "test_data_set_0"
    inputs = [_read_pb(p) for p in sorted(data_set.glob("input_*.pb"), key=lambda p: int(p.stem.split("_")[1]))]
    expected = [_read_pb(p) for p in sorted(data_set.glob("output_*.pb"), key=lambda p: int(p.stem.split("_")[1]))]
    feed = dict(zip(names, inputs))
    try:
        reference = session(model).run(None, feed)
    except Exception:
        # ONNX Runtime lacks some opset-6 kernels: test the same graph converted to opset 11
        try:
            model = onnx.version_converter.convert_version(model, 11)
            reference = session(model).run(None, feed)
        except Exception as exc:
            pytest.skip(f"ONNX Runtime cannot run the original, even at opset 11: {str(exc)[:100]}")
        model_path = tmp_path / "converted.onnx"
        onnx.save(model, model_path)
    optimized, report = _optimize_file(model_path, tmp_path, [feed])
    got = session(optimized).run(None, feed)
    for g, r, e in zip(got, reference, expected):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(g, e, rtol=1e-3, atol=1e-4)
