"""Numpy codecs behind compress_weights: symmetric int8/int4 quantizers, MatMulNBits packing and
1-D k-means (palettization). Pure functions over arrays, so they are tested and reused alone."""
from __future__ import annotations

from typing import Optional

import numpy as np

#: k-means fits on at most this many values of a tensor (a fixed random subsample), then assigns all
KMEANS_SAMPLE = 1 << 16
KMEANS_ITERS = 30


def rel_l2(w: np.ndarray, approx: np.ndarray) -> float:
    """Relative L2 error of a reconstruction (0 for an all-zero weight reproduced exactly)."""
    w64, a64 = w.astype(np.float64), approx.astype(np.float64)
    norm = float(np.linalg.norm(w64))
    err = float(np.linalg.norm(w64 - a64))
    return err / norm if norm > 0 else err


def _safe_scale(amax: np.ndarray, qmax: int) -> np.ndarray:
    scale = (amax / qmax).astype(np.float32)
    return np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)


def quantize_int8(w: np.ndarray, axis: Optional[int]) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8: (q int8 shaped like w, scale float32 [w.shape[axis]] or scalar when axis is None)."""
    if axis is None:
        scale = _safe_scale(np.abs(w).max(), 127)
        return np.clip(np.rint(w / scale), -127, 127).astype(np.int8), np.asarray(scale, np.float32)
    others = tuple(i for i in range(w.ndim) if i != axis)
    scale = _safe_scale(np.abs(w).max(axis=others), 127)
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(np.rint(w / scale.reshape(shape)), -127, 127).astype(np.int8)
    return q, scale


def dequantize_int8(q: np.ndarray, scale: np.ndarray, axis: Optional[int]) -> np.ndarray:
    if axis is None or scale.ndim == 0:
        return q.astype(np.float32) * scale
    shape = [1] * q.ndim
    shape[axis] = -1
    return q.astype(np.float32) * scale.reshape(shape)


def quantize_blocked(w: np.ndarray, axis: int, block: int, qmax: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric block-wise quantization along `axis` (the reduction axis K of a 2-D weight).

    Returns (q int8 in [-qmax, qmax] shaped like w, scale float32 shaped like w except
    ceil(K / block) along axis), the layout of a blocked DequantizeLinear."""
    moved = np.moveaxis(w, axis, 0)
    k = moved.shape[0]
    blocks = -(-k // block)
    padded = np.zeros((blocks * block,) + moved.shape[1:], np.float32)
    padded[:k] = moved
    grouped = padded.reshape((blocks, block) + moved.shape[1:])
    scale = _safe_scale(np.abs(grouped).max(axis=1), qmax)
    q = np.clip(np.rint(grouped / scale[:, None]), -qmax, qmax).astype(np.int8)
    q = q.reshape(padded.shape)[:k]
    return np.moveaxis(q, 0, axis), np.moveaxis(scale, 0, axis)


def dequantize_blocked(q: np.ndarray, scale: np.ndarray, axis: int, block: int) -> np.ndarray:
    expanded = np.repeat(scale, block, axis=axis)
    index = [slice(None)] * q.ndim
    index[axis] = slice(0, q.shape[axis])
    return q.astype(np.float32) * expanded[tuple(index)]


def pack_matmulnbits(q_kn: np.ndarray, scale_bn: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """com.microsoft MatMulNBits (bits=4, no zero_points input, so the implied zero point is 8):
    B uint8 [N, k_blocks, block/2] with codes q+8 packed low nibble first along K, scales
    float32 [N * k_blocks]. `q_kn` is [K, N] int in [-8, 7], `scale_bn` is [k_blocks, N]."""
    k, n = q_kn.shape
    blocks = scale_bn.shape[0]
    codes = np.full((n, blocks * block), 8, np.uint8)  # padding codes decode to 0
    codes[:, :k] = (q_kn.T.astype(np.int16) + 8).astype(np.uint8)
    codes = codes.reshape(n, blocks, block)
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    return np.ascontiguousarray(packed), np.ascontiguousarray(scale_bn.T.reshape(-1).astype(np.float32))


def _assign(x: np.ndarray, sorted_centroids: np.ndarray) -> np.ndarray:
    """Nearest centroid in 1-D: binary search on the midpoints (O(n log K), no n x K matrix)."""
    mids = (sorted_centroids[1:] + sorted_centroids[:-1]) / 2
    return np.searchsorted(mids, x)


def _kmeans_pp(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    centroids = [x[rng.integers(x.size)]]
    d2 = (x - centroids[0]) ** 2
    for _ in range(1, k):
        cum = np.cumsum(d2)
        total = cum[-1]
        if total <= 0:  # fewer distinct values than k: the remaining centroids are duplicates
            centroids.append(centroids[-1])
            continue
        pick = x[min(int(np.searchsorted(cum, rng.random() * total, side="right")), x.size - 1)]
        centroids.append(pick)
        d2 = np.minimum(d2, (x - pick) ** 2)
    return np.sort(np.asarray(centroids, np.float64))


def kmeans_1d(values: np.ndarray, k: int, seed: int = 0, iters: int = KMEANS_ITERS,
              sample: int = KMEANS_SAMPLE) -> tuple[np.ndarray, np.ndarray]:
    """Cluster the values into k centroids (k-means++ init, Lloyd): (codebook float32 [k] sorted,
    indices uint8 shaped like values). Deterministic for a given seed."""
    x = values.reshape(-1).astype(np.float64)
    rng = np.random.default_rng(seed)
    fit = x if x.size <= sample else x[np.sort(rng.choice(x.size, sample, replace=False))]
    centroids = _kmeans_pp(fit, k, rng)
    for _ in range(iters):
        labels = _assign(fit, centroids)
        counts = np.bincount(labels, minlength=k)
        sums = np.bincount(labels, weights=fit, minlength=k)
        updated = np.sort(np.where(counts > 0, sums / np.maximum(counts, 1), centroids))
        if np.array_equal(updated, centroids):
            break
        centroids = updated
    codebook = centroids.astype(np.float32)
    labels = _assign(values.reshape(-1).astype(np.float32), codebook)
    return codebook, labels.astype(np.uint8).reshape(values.shape)
