"""Calibration data and streaming activation statistics, shared by data-driven passes.

Passes that need activation ranges (quantization, later pruning and low-rank) load the user's
samples with `load_calibration` (validated up front, so a wrong file fails before any work) and
collect per-tensor statistics with `collect_statistics`: ONNX Runtime runs a copy of the model
with the wanted intermediate tensors added as outputs, batch by batch; each tensor keeps its
min/max and a histogram of |x| merged batch by batch, so memory does not grow with the number
of samples. Many tensors are calibrated in chunks (one pass over the data per chunk) so the
extra outputs held at once stay bounded. Ranges come from the statistics by `minmax`,
`percentile` or `entropy` (KL divergence threshold search, as TensorRT does).
"""
from __future__ import annotations

import importlib.util

import json
import math
import os
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import onnx

from .errors import OptimizeError
from .runtime import cpu_session, extra_outputs

METHODS = ("minmax", "percentile", "entropy")
HIST_BINS = 2048
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
CACHE_VERSION = 1


# ----------------------------------------------------------------------------- calibration data
@dataclass
class CalibrationData:
    """Validated calibration samples. Iterate `batches(n)` as often as needed (one pass per chunk).

    A sample of input `name` has exactly the spec's shape; `sources` are callables that load
    the samples lazily (per file or per array), so only one batch is in memory at a time.
    """

    specs: list
    count: int
    random: bool = False
    description: str = ""
    _loaders: list[Callable[[], dict[str, np.ndarray]]] = field(default_factory=list, repr=False)

    def samples(self) -> Iterator[dict[str, np.ndarray]]:
        for load in self._loaders:
            yield from _split_samples(load(), self.specs)

    def batches(self, batch_size: int = 1) -> Iterator[dict[str, np.ndarray]]:
        """Feeds of up to `batch_size` samples concatenated on axis 0 (batch_size 1: one sample each)."""
        pending: list[dict[str, np.ndarray]] = []
        for sample in self.samples():
            pending.append(sample)
            if len(pending) >= batch_size:
                yield _concat(pending)
                pending = []
        if pending:
            yield _concat(pending)


def _concat(samples: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if len(samples) == 1:
        return samples[0]
    return {k: np.concatenate([s[k] for s in samples], axis=0) for k in samples[0]}


def _split_samples(arrays: dict[str, np.ndarray], specs: list) -> Iterator[dict[str, np.ndarray]]:
    """Arrays already normalized to [N, *spec.shape] -> N feeds."""
    n = len(next(iter(arrays.values())))
    for i in range(n):
        yield {s.name: arrays[s.name][i] for s in specs}


def load_calibration(source: Optional[str | os.PathLike], specs: Sequence, preprocess: Optional[str] = None,
                     random_samples: int = 0, seed: int = 0) -> CalibrationData:
    """Load and check calibration data for a model whose inputs are `specs` (specs.InputSpec).

    `source`: one .npz with N samples per input (arrays named by input; leading axis = samples,
    or exactly the input's shape for a single sample), or a directory of .npy/.npz files, one
    sample each (bare .npy only for single-input models). Every file is checked (shape, dtype,
    names) before anything runs: a mismatch raises one OptimizeError naming the input and the
    expected shape. `random_samples` > 0 (and no source) draws seeded random data instead.
    """
    specs = list(specs)
    if not specs:
        raise OptimizeError("calibration needs the model's input shapes, and none could be resolved")
    if source is None:
        if random_samples > 0:
            return _random_data(specs, random_samples, seed)
        raise OptimizeError("calibration data is needed: give --calibration PATH (.npz or a directory of "
                            ".npy/.npz files) or --calibration-random N")
    path = Path(source)
    if not path.exists():
        raise OptimizeError(f"calibration data {str(path)!r} does not exist")
    if path.is_dir():
        return _load_directory(path, specs, preprocess)
    if path.suffix.lower() == ".npz":
        return _load_npz_file(path, specs)
    if path.suffix.lower() == ".npy":
        return _load_npy_files([path], specs, str(path))
    if path.suffix.lower() in IMAGE_SUFFIXES:
        _require_pillow()
    raise OptimizeError(f"calibration data {str(path)!r}: expected a .npz file or a directory of .npy/.npz files")


def _expected(spec) -> str:
    shape = list(spec.shape)
    many = ([ "N"] + shape[1:]) if shape and shape[0] == 1 else (["N"] + shape)
    return f"{shape} (one sample) or [{', '.join(map(str, many))}] (N samples), {np.dtype(spec.dtype).name}"


def _normalize(name: str, array: np.ndarray, spec, where: str, convert: bool = True) -> np.ndarray:
    """`array` as [N, *spec.shape] in the spec's dtype, or one clear error (convert=False: check only)."""
    shape = tuple(spec.shape)
    a = np.asarray(array)
    if a.shape == shape:
        a = a[None]
    elif a.ndim == len(shape) + 1 and a.shape[1:] == shape:
        pass
    elif shape and shape[0] == 1 and a.ndim == len(shape) and a.shape[1:] == shape[1:]:
        a = a[:, None]  # N samples stacked on the (size-1) batch axis
    else:
        raise OptimizeError(f"calibration input {name!r} in {where}: shape {list(a.shape)} does not fit the "
                            f"expected {_expected(spec)}")
    want = np.dtype(spec.dtype)
    if a.dtype != want:
        same_kind = (np.issubdtype(a.dtype, np.floating) and np.issubdtype(want, np.floating)) or (
            np.issubdtype(a.dtype, np.integer) and np.issubdtype(want, np.integer))
        if not same_kind:
            raise OptimizeError(f"calibration input {name!r} in {where}: dtype {a.dtype.name} does not fit the "
                                f"expected {want.name} of shape {list(shape)}")
        if convert:
            a = a.astype(want)
    return a


def _check_names(names: Sequence[str], specs: list, where: str) -> None:
    wanted = [s.name for s in specs]
    missing = [n for n in wanted if n not in names]
    if missing:
        spec = next(s for s in specs if s.name == missing[0])
        raise OptimizeError(f"calibration data {where} has no array for input {missing[0]!r} (expected shape "
                            f"{list(spec.shape)}); it holds {sorted(names)}, the model's inputs are {wanted}")


def _load_npz_file(path: Path, specs: list) -> CalibrationData:
    n = _check_npz(path, specs)
    return CalibrationData(specs, n, description=str(path), _loaders=[lambda: _read_npz(path, specs)])


def _npz_names(names: list[str], specs: list, where: str) -> dict[str, str]:
    """input name -> array name (a single unnamed array, np.savez(f, x), serves a single-input model)."""
    if len(specs) == 1 and names == ["arr_0"]:
        return {specs[0].name: names[0]}
    _check_names(names, specs, where)
    return {s.name: s.name for s in specs}


def _check_npz(path: Path, specs: list) -> int:
    """Check names, shapes and dtypes from the array headers only; returns the sample count."""
    try:
        with zipfile.ZipFile(path) as zf:
            headers = {}
            for member in zf.namelist():
                if member.endswith(".npy"):
                    with zf.open(member) as f:
                        version = np.lib.format.read_magic(f)
                        read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                else np.lib.format.read_array_header_2_0)
                        shape, _, dtype = read(f)
                    headers[member[:-4]] = (shape, dtype)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise OptimizeError(f"cannot read calibration data {path}: {type(exc).__name__}: {exc}") from None
    names = _npz_names(list(headers), specs, str(path))
    counts = {}
    for s in specs:
        shape, dtype = headers[names[s.name]]
        counts[s.name] = len(_normalize(s.name, np.lib.stride_tricks.as_strided(np.zeros(1, dtype), shape,
                                                                                  [0] * len(shape)), s, str(path), False))
    if len(set(counts.values())) != 1:
        raise OptimizeError(f"calibration data {path}: inputs hold different numbers of samples {counts}")
    return next(iter(counts.values()))


def _read_npz(path: Path, specs: list) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            names = _npz_names(list(z.files), specs, str(path))
            return {s.name: _normalize(s.name, z[names[s.name]], s, str(path)) for s in specs}
    except OptimizeError:
        raise
    except Exception as exc:
        raise OptimizeError(f"cannot read calibration data {path}: {type(exc).__name__}: {exc}") from None


def _load_directory(path: Path, specs: list, preprocess: Optional[str]) -> CalibrationData:
    files = sorted(p for p in path.iterdir() if p.is_file())
    arrays = [p for p in files if p.suffix.lower() in (".npy", ".npz")]
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    if not arrays and images:
        _require_pillow()
        raise OptimizeError("image calibration data is not supported yet; convert the images to .npy/.npz")
    if not arrays:
        raise OptimizeError(f"calibration directory {path} holds no .npy/.npz files")
    npy = [p for p in arrays if p.suffix.lower() == ".npy"]
    if npy and len(specs) > 1:
        raise OptimizeError(f"calibration directory {path}: bare .npy files ({npy[0].name}) only fit single-input "
                            f"models; this model has inputs {[s.name for s in specs]}: use one .npz per sample")
    return _load_npy_files(arrays, specs, str(path))


def _load_npy_files(files: list[Path], specs: list, where: str) -> CalibrationData:
    total = 0
    loaders = []
    for f in files:
        if f.suffix.lower() == ".npy":
            try:
                header = np.load(f, mmap_mode="r", allow_pickle=False)
            except Exception as exc:
                raise OptimizeError(f"cannot read calibration file {f}: {type(exc).__name__}: {exc}") from None
            n = len(_normalize(specs[0].name, header, specs[0], str(f), False))
            loaders.append(lambda f=f: {specs[0].name: _normalize(specs[0].name, np.load(f), specs[0], str(f))})
        else:
            n = _check_npz(f, specs)
            loaders.append(lambda f=f: _read_npz(f, specs))
        total += n
    return CalibrationData(specs, total, description=where, _loaders=loaders)


def _random_data(specs: list, count: int, seed: int, chunk: int = 64) -> CalibrationData:
    """Seeded random samples, generated `chunk` at a time so memory does not grow with `count`."""
    def loader(start: int) -> Callable[[], dict[str, np.ndarray]]:
        def load() -> dict[str, np.ndarray]:
            rng = np.random.default_rng([seed, start])
            n = min(chunk, count - start)
            out = {}
            for s in specs:
                shape, dtype = (n,) + tuple(s.shape), np.dtype(s.dtype)
                out[s.name] = (rng.standard_normal(shape).astype(dtype) if np.issubdtype(dtype, np.floating)
                               else rng.integers(0, 2, shape).astype(dtype))
            return out
        return load

    return CalibrationData(specs, count, random=True, description=f"{count} random samples",
                           _loaders=[loader(i) for i in range(0, count, chunk)])


def _require_pillow() -> None:
    if importlib.util.find_spec("PIL") is None:
        raise OptimizeError("image calibration data needs Pillow: pip install pillow")


# ----------------------------------------------------------------------------- streaming statistics
class TensorStats:
    """min/max and a histogram of |x| over [0, edge] in HIST_BINS bins, merged batch by batch.

    When a batch exceeds the edge, the edge doubles (as often as needed) and old bins are summed
    in pairs: exact re-binning, constant memory.
    """

    __slots__ = ("min", "max", "edge", "hist", "count")

    def __init__(self) -> None:
        self.min = math.inf
        self.max = -math.inf
        self.edge = 0.0
        self.hist: Optional[np.ndarray] = None
        self.count = 0

    def update(self, x: np.ndarray, histogram: bool = True) -> None:
        x = np.asarray(x)
        if x.size == 0:
            return
        if not np.issubdtype(x.dtype, np.floating):
            x = x.astype(np.float32)
        finite = x if np.isfinite(x).all() else x[np.isfinite(x)]
        if finite.size == 0:
            return
        self.min = min(self.min, float(finite.min()))
        self.max = max(self.max, float(finite.max()))
        self.count += finite.size
        if histogram:
            self._add_histogram(np.abs(finite).ravel())

    def _add_histogram(self, a: np.ndarray) -> None:
        top = float(a.max())
        if self.hist is None:
            self.hist = np.zeros(HIST_BINS, np.int64)
            self.edge = top if top > 0 else 1e-12
        while top > self.edge:
            self.hist = self.hist.reshape(-1, 2).sum(axis=1)
            self.hist = np.concatenate([self.hist, np.zeros(HIST_BINS // 2, np.int64)])
            self.edge *= 2.0
        idx = np.minimum((a * (HIST_BINS / self.edge)).astype(np.int64), HIST_BINS - 1)
        self.hist += np.bincount(idx, minlength=HIST_BINS)

    def merge(self, other: "TensorStats") -> None:
        """Fold another collector in (e.g. statistics gathered in parallel)."""
        if other.count == 0:
            return
        self.min, self.max, self.count = min(self.min, other.min), max(self.max, other.max), self.count + other.count
        if other.hist is None:
            return
        if self.hist is None:
            self.hist, self.edge = other.hist.copy(), other.edge
            return
        mine, theirs = (self, other) if self.edge >= other.edge else (other, self)
        hist, edge = mine.hist.copy(), mine.edge
        # re-bin the finer histogram onto the coarser one by bin centres
        centres = (np.arange(HIST_BINS) + 0.5) * (theirs.edge / HIST_BINS)
        idx = np.minimum((centres * (HIST_BINS / edge)).astype(np.int64), HIST_BINS - 1)
        hist += np.bincount(idx, weights=theirs.hist, minlength=HIST_BINS).astype(np.int64)
        self.hist, self.edge = hist, edge


def tensor_range(stats: TensorStats, method: str = "minmax", percentile: float = 99.999,
                 unsigned_levels: int = 255, signed_levels: int = 128) -> tuple[float, float]:
    """The (low, high) range to quantize a tensor with, by `method`."""
    if stats.count == 0:
        return 0.0, 0.0
    lo, hi = stats.min, stats.max
    if method == "minmax" or stats.hist is None:
        return lo, hi
    if method == "percentile":
        threshold = _percentile_threshold(stats.hist, stats.edge, percentile)
    elif method == "entropy":
        levels = unsigned_levels if lo >= 0 else signed_levels
        threshold = _entropy_threshold(stats.hist, stats.edge, levels)
    else:
        raise OptimizeError(f"unknown calibration method {method!r}; choose one of {', '.join(METHODS)}")
    return max(lo, -threshold), min(hi, threshold)


def _percentile_threshold(hist: np.ndarray, edge: float, percentile: float) -> float:
    cdf = np.cumsum(hist) / max(1, hist.sum())
    i = int(np.searchsorted(cdf, percentile / 100.0))
    return (min(i, len(hist) - 1) + 1) * edge / len(hist)


def _entropy_threshold(hist: np.ndarray, edge: float, levels: int) -> float:
    """TensorRT-style: the |x| threshold whose `levels`-bin quantized histogram is closest (KL) to
    the clipped reference distribution."""
    hist = hist.astype(np.float64)
    if len(hist) > 1:
        hist[0] = hist[1]  # the spike of exact zeros (Relu outputs) would dominate the divergence
    n = len(hist)
    nonzero = np.nonzero(hist)[0]
    if len(nonzero) == 0:
        return edge
    last = int(nonzero[-1]) + 1
    if last <= levels:
        return last * edge / n
    best, best_i = math.inf, last
    total = hist.sum()
    candidates = range(levels, last + 1, max(1, (last - levels) // 512))
    for i in candidates:
        p = hist[:i].copy()
        p[i - 1] += total - p.sum()  # outliers clipped into the last bin
        sliced = hist[:i]
        # merge i bins into `levels` groups, then spread each group's mass over its nonzero bins
        bounds = np.linspace(0, i, levels + 1).astype(np.int64)
        group = np.repeat(np.arange(levels), np.diff(bounds))
        mass = np.bincount(group, weights=sliced, minlength=levels)
        nz = (sliced > 0).astype(np.float64)
        nz_count = np.bincount(group, weights=nz, minlength=levels)
        q = np.where(nz > 0, mass[group] / np.maximum(nz_count[group], 1), 0.0)
        kl = _kl(p, q)
        if kl < best:
            best, best_i = kl, i
    return (best_i + 0.5) * edge / n


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    p = p / p.sum()
    qs = q.sum()
    if qs <= 0:
        return math.inf
    q = q / qs
    mask = p > 0
    q = np.where(q > 0, q, 1e-4 / len(q))  # smoothed: a clipped outlier costs, but not infinitely
    q = q / q.sum()
    return float(np.sum(p[mask] * np.log(p[mask] / q[mask])))


# ----------------------------------------------------------------------------- running the model
def collect_statistics(model: onnx.ModelProto, tensors: Sequence[str], data: CalibrationData,
                       histogram: bool = True, batch_size: int = 1, chunk_bytes: int = 256 << 20,
                       tensor_bytes: Optional[dict[str, int]] = None, threads: int = 0,
                       progress: Optional[bool] = None) -> dict[str, TensorStats]:
    """Statistics of `tensors` (value names in `model`) over all of `data`.

    Tensors are split in chunks whose outputs for one batch total at most `chunk_bytes`
    (`tensor_bytes` gives per-sample sizes; unknown sizes count as 4 MB); each chunk is one
    pass over the data with ORT (CPU, graph optimizations off, so every tensor exists).
    """
    stats = {name: TensorStats() for name in tensors}
    chunks = _chunks(list(tensors), tensor_bytes or {}, chunk_bytes // max(1, batch_size))
    batches_per_pass = math.ceil(data.count / max(1, batch_size))
    bar = _progress_bar(len(chunks) * batches_per_pass, progress)
    for chunk in chunks:
        with extra_outputs(model, chunk):
            session = cpu_session(model, threads)
        wanted = [o.name for o in session.get_outputs() if o.name in stats]
        for feed in data.batches(batch_size):
            values = session.run(wanted, feed)
            for name, value in zip(wanted, values):
                stats[name].update(value, histogram)
            if bar is not None:
                bar.update(1)
        del session
    if bar is not None:
        bar.close()
    return stats


def _chunks(names: list[str], sizes: dict[str, int], budget: int) -> list[list[str]]:
    chunks: list[list[str]] = [[]]
    used = 0
    for name in names:
        size = sizes.get(name, 4 << 20)
        if chunks[-1] and used + size > budget:
            chunks.append([])
            used = 0
        chunks[-1].append(name)
        used += size
    return [c for c in chunks if c] or [[]]


def _progress_bar(total: int, show: Optional[bool]):
    if show is None:
        show = sys.stderr.isatty()
    if not show or total <= 1:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="calibrating", unit="batch", file=sys.stderr, leave=False)


# ----------------------------------------------------------------------------- cache
def save_ranges(path: str | os.PathLike, ranges: dict[str, tuple[float, float]], meta: dict[str, Any]) -> None:
    """Write ranges (and what produced them) as JSON, atomically."""
    body = {"version": CACHE_VERSION, **meta, "ranges": {k: [float(lo), float(hi)] for k, (lo, hi) in ranges.items()}}
    target = Path(path)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps(body, indent=1, sort_keys=True))
    os.replace(tmp, target)


def load_ranges(path: str | os.PathLike, meta: dict[str, Any]) -> Optional[dict[str, tuple[float, float]]]:
    """Ranges from a cache written by save_ranges with the same `meta`, else None (stale or absent)."""
    target = Path(path)
    if not target.exists():
        return None
    try:
        body = json.loads(target.read_text())
    except (OSError, ValueError) as exc:
        raise OptimizeError(f"calibration cache {target} is unreadable: {exc}") from None
    if body.get("version") != CACHE_VERSION or any(body.get(k) != v for k, v in meta.items()):
        return None
    return {k: (float(v[0]), float(v[1])) for k, v in body.get("ranges", {}).items()}
