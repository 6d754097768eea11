"""Calibration data loading (validated up front) and streaming statistics."""
from __future__ import annotations

import tracemalloc

import numpy as np
import onnx
import pytest
from onnx import helper

from onnxslim_opt.calibration import (HIST_BINS, TensorStats, collect_statistics, load_calibration, load_ranges,
                                      save_ranges, tensor_range)
from onnxslim_opt.errors import OptimizeError
from onnxslim_opt.specs import InputSpec
from util import MODELS, make_model, tensor, vinfo

SPEC = [InputSpec("input", np.dtype(np.float32), (1, 1, 32, 32))]
TWO = [InputSpec("a", np.dtype(np.float32), (1, 4)), InputSpec("b", np.dtype(np.int64), (1, 2))]


@pytest.fixture(scope="module")
def digits():
    return np.load(MODELS / "digits_test.npz")["input"][:64]


def test_npz_with_samples_on_the_batch_axis(tmp_path, digits):
    np.savez(tmp_path / "c.npz", input=digits)
    data = load_calibration(tmp_path / "c.npz", SPEC)
    assert data.count == 64 and not data.random
    batches = list(data.batches(16))
    assert [b["input"].shape for b in batches] == [(16, 1, 32, 32)] * 4
    np.testing.assert_array_equal(np.concatenate([b["input"] for b in batches]), digits)
    assert list(data.batches(1))[3]["input"].shape == (1, 1, 32, 32)


def test_single_sample_new_axis_and_float64_accepted(tmp_path, digits):
    np.savez(tmp_path / "one.npz", input=digits[:1])                       # exactly the input shape
    assert load_calibration(tmp_path / "one.npz", SPEC).count == 1
    np.savez(tmp_path / "many.npz", input=digits[:5, None].astype(np.float64))  # [N, *shape], float64
    data = load_calibration(tmp_path / "many.npz", SPEC)
    assert data.count == 5 and next(data.batches(5))["input"].dtype == np.float32


def test_directory_of_npy_and_multi_input_npz(tmp_path, digits):
    d = tmp_path / "npy"
    d.mkdir()
    for i in range(3):
        np.save(d / f"{i}.npy", digits[i:i + 1])
    data = load_calibration(d, SPEC)
    assert data.count == 3
    np.testing.assert_array_equal(next(data.batches(3))["input"], digits[:3])
    m = tmp_path / "multi"
    m.mkdir()
    for i in range(2):
        np.savez(m / f"{i}.npz", a=np.ones((1, 4), np.float32) * i, b=np.array([[i, i]]))
    feeds = list(load_calibration(m, TWO).batches(2))
    assert feeds[0]["a"].shape == (2, 4) and feeds[0]["b"].dtype == np.int64


@pytest.mark.parametrize("make, message", [
    (lambda p, x: np.savez(p, input=x[:, :, :16]), "'input'"),
    (lambda p, x: np.savez(p, image=x), "no array for input 'input'"),
    (lambda p, x: np.savez(p, input=(x > 0)), "dtype bool"),
])
def test_bad_npz_is_one_clear_error(tmp_path, digits, make, message):
    path = tmp_path / "bad.npz"
    make(path, digits)
    with pytest.raises(OptimizeError) as err:
        load_calibration(path, SPEC)
    text = str(err.value)
    assert message in text and "[1, 1, 32, 32]" in text and "\n" not in text


def test_missing_data_and_bare_npy_for_multi_input(tmp_path):
    with pytest.raises(OptimizeError, match="does not exist"):
        load_calibration(tmp_path / "nope.npz", SPEC)
    with pytest.raises(OptimizeError, match="--calibration-random"):
        load_calibration(None, SPEC)
    d = tmp_path / "d"
    d.mkdir()
    np.save(d / "0.npy", np.zeros((1, 4), np.float32))
    with pytest.raises(OptimizeError, match="single-input"):
        load_calibration(d, TWO)
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(b"\x89PNG")
    with pytest.raises(OptimizeError, match="pillow|not supported"):
        load_calibration(tmp_path / "img", SPEC)


def test_random_data_is_seeded_and_flagged():
    a = load_calibration(None, TWO, random_samples=70, seed=3)
    b = load_calibration(None, TWO, random_samples=70, seed=3)
    assert a.random and a.count == 70
    xa, xb = next(a.batches(70)), next(b.batches(70))
    np.testing.assert_array_equal(xa["a"], xb["a"])
    assert xa["a"].shape == (70, 4)


# ----------------------------------------------------------------------------- statistics
def test_histogram_rebins_exactly_when_the_range_grows():
    rng = np.random.default_rng(0)
    s = TensorStats()
    chunks = [rng.standard_normal(1000) * scale for scale in (0.1, 1.0, 30.0)]
    for c in chunks:
        s.update(c)
    allx = np.concatenate(chunks)
    assert s.hist.sum() == allx.size == s.count and len(s.hist) == HIST_BINS
    assert s.min == allx.min() and s.max == allx.max() and s.edge >= np.abs(allx).max()
    expected = np.histogram(np.abs(allx), bins=HIST_BINS, range=(0, s.edge))[0]
    assert np.abs(expected - s.hist).sum() <= 0.01 * allx.size  # only bin-edge rounding differs


def test_ranges_by_method_clip_outliers():
    rng = np.random.default_rng(1)
    s = TensorStats()
    s.update(np.concatenate([rng.standard_normal(100000), [100.0]]).astype(np.float32))
    assert tensor_range(s, "minmax")[1] == pytest.approx(100.0)
    assert 3.0 < tensor_range(s, "percentile", 99.99)[1] < 6.0
    lo, hi = tensor_range(s, "entropy")
    assert 2.0 < hi < 20.0 and lo == max(s.min, -hi)


def test_one_batch_equals_eight_batches(digits, tmp_path):
    np.savez(tmp_path / "c.npz", input=digits)
    model = onnx.load(MODELS / "digits_cnn.onnx")
    names = [n.output[0] for n in model.graph.node if n.op_type in ("Relu", "Add", "Conv")]
    data = load_calibration(tmp_path / "c.npz", SPEC)
    one = collect_statistics(model, names, data, batch_size=64)
    eight = collect_statistics(model, names, data, batch_size=8, chunk_bytes=1)  # also: one tensor per pass
    for n in names:
        assert (one[n].min, one[n].max, one[n].count) == pytest.approx((eight[n].min, eight[n].max, eight[n].count),
                                                                       rel=1e-6)
        for method in ("percentile", "entropy"):
            a, b = tensor_range(one[n], method), tensor_range(eight[n], method)
            assert b[1] == pytest.approx(a[1], rel=0.1, abs=0.05 * one[n].max)


def test_memory_does_not_grow_with_samples():
    x = vinfo("x", ["N", 256])
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
                       [x], [vinfo("y", ["N", 256])], [tensor("w", np.eye(256, dtype=np.float32))])
    spec = [InputSpec("x", np.dtype(np.float32), (1, 256))]

    def peak(samples: int) -> int:
        data = load_calibration(None, spec, random_samples=samples)
        tracemalloc.start()
        collect_statistics(model, ["h", "y"], data, batch_size=16)
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top

    small, large = peak(16), peak(1024)
    assert large < small * 1.5 + (256 << 10), (small, large)


def test_range_cache_round_trips(tmp_path):
    path = tmp_path / "ranges.json"
    ranges = {"a": (-1.5, 2.25), "b/c:0": (0.0, 7.0)}
    save_ranges(path, ranges, {"method": "entropy", "percentile": None})
    assert load_ranges(path, {"method": "entropy", "percentile": None}) == ranges
    assert load_ranges(path, {"method": "minmax", "percentile": None}) is None  # stale: other method
    assert load_ranges(tmp_path / "absent.json", {}) is None
    path.write_text("{not json")
    with pytest.raises(OptimizeError, match="unreadable"):
        load_ranges(path, {})
