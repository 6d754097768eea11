"""Low-rank decompositions of Conv / Gemm / MatMul weights (numpy SVD only), for passes/lowrank.py.

Each decomposition returns a list of `Step`s: the thinner layers that replace one layer, in order.
Steps are plain numpy + attributes so the same description builds the graph edit and the
stand-alone model used to time the candidate. At full rank every decomposition is exact.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np


class Refused(Exception):
    """A layer this pass does not factorize; the message is the reason for the report."""


@dataclass
class Step:
    op: str  # "Conv", "Gemm" or "MatMul"
    weight: np.ndarray
    bias: Optional[np.ndarray] = None
    attrs: dict = field(default_factory=dict)


@dataclass
class ConvGeom:
    """A Conv with auto_pad resolved: kernel, strides, pads (begin..., end...), dilations, and
    the spatial sizes of its input and output (batch included in `batch`)."""

    kernel: list[int]
    strides: list[int]
    pads: list[int]
    dilations: list[int]
    in_spatial: list[int]
    out_spatial: list[int]
    batch: int = 1

    def attrs(self, **override) -> dict:
        a = dict(kernel_shape=self.kernel, strides=self.strides, pads=self.pads, dilations=self.dilations)
        a.update(override)
        return a


def conv_geometry(attrs: dict, weight_shape: Sequence[int], in_shape: Optional[Sequence]) -> ConvGeom:
    """Resolve auto_pad (needs the input's spatial size for SAME_*) into explicit pads."""
    kernel = [int(k) for k in attrs.get("kernel_shape", weight_shape[2:])]
    nd = len(kernel)
    if list(kernel) != [int(k) for k in weight_shape[2:]]:
        raise Refused("kernel_shape differs from the weight's shape")
    strides = [int(s) for s in attrs.get("strides", [1] * nd)]
    dil = [int(d) for d in attrs.get("dilations", [1] * nd)]
    if in_shape is None or len(in_shape) != nd + 2 or not all(isinstance(d, (int, np.integer)) and d > 0
                                                              for d in in_shape):
        raise Refused("input shape unknown (needed for FLOPs, auto_pad and timing)")
    spatial = [int(d) for d in in_shape[2:]]
    auto = attrs.get("auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("NOTSET", "", None):
        pads = [int(p) for p in attrs.get("pads", [0] * 2 * nd)]
    elif auto == "VALID":
        pads = [0] * 2 * nd
    elif auto in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for n, k, s, d in zip(spatial, kernel, strides, dil):
            total = max((math.ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0)
            small, big = total // 2, total - total // 2
            begin.append(small if auto == "SAME_UPPER" else big)
            end.append(big if auto == "SAME_UPPER" else small)
        pads = begin + end
    else:
        raise Refused(f"unknown auto_pad {auto!r}")
    out = [(n + pads[i] + pads[i + nd] - ((k - 1) * d + 1)) // s + 1
           for i, (n, k, s, d) in enumerate(zip(spatial, kernel, strides, dil))]
    return ConvGeom(kernel, strides, pads, dil, spatial, out, int(in_shape[0]))


# ----------------------------------------------------------------------------- singular values
def _gram_eig(m: np.ndarray, left: bool) -> tuple[np.ndarray, np.ndarray]:
    """Eigen-decomposition of M M^T (left) or M^T M, largest first: the singular values and
    vectors of M from the small side, far faster than an SVD of a wide conv unfolding."""
    m = m.astype(np.float64)
    values, vectors = np.linalg.eigh(m @ m.T if left else m.T @ m)
    return np.sqrt(np.clip(values[::-1], 0, None)), vectors[:, ::-1]


def singular_values(m: np.ndarray) -> np.ndarray:
    return _gram_eig(m, m.shape[0] <= m.shape[1])[0][:min(m.shape)]


def left_vectors(m: np.ndarray, r: int) -> np.ndarray:
    """The r leading left singular vectors of M (orthonormal columns)."""
    if m.shape[0] <= m.shape[1]:
        return _gram_eig(m, True)[1][:, :r]
    return np.linalg.svd(m.astype(np.float64), full_matrices=False)[0][:, :r]


def _low_rank(m: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
    """M ~ A @ B with A (rows x r), B (r x cols), from the smaller Gram matrix; exact at full rank."""
    m64 = m.astype(np.float64)
    if m.shape[0] <= m.shape[1]:
        u = _gram_eig(m64, True)[1][:, :r]
        return u, u.T @ m64
    v = _gram_eig(m64, False)[1][:, :r]
    return m64 @ v, v.T


def _spatial_matrix(w: np.ndarray) -> np.ndarray:
    """W[o,i,h,w] as M[(i,h),(o,w)]: a rank-r M is a kx1 conv followed by a 1xk conv."""
    co, ci, kh, kw = w.shape
    return w.transpose(1, 2, 0, 3).reshape(ci * kh, co * kw)


def spectra(method: str, w: np.ndarray) -> list[np.ndarray]:
    """The singular values the rank of `method` is chosen from (two spectra for Tucker-2)."""
    if method == "svd":
        return [singular_values(w.reshape(w.shape[0], -1))]
    if method == "spatial":
        return [singular_values(_spatial_matrix(w))]
    if method == "tucker2":
        return [singular_values(w.reshape(w.shape[0], -1)), singular_values(np.moveaxis(w, 1, 0).reshape(w.shape[1], -1))]
    if method == "matrix":
        return [singular_values(w)]
    raise ValueError(method)


def full_ranks(method: str, shape: Sequence[int]) -> list[int]:
    if method == "svd":
        return [min(shape[0], math.prod(shape[1:]))]
    if method == "spatial":
        return [min(shape[1] * shape[2], shape[0] * shape[3])]
    if method == "tucker2":
        return [min(shape[0], math.prod(shape[1:])), min(shape[1], shape[0] * math.prod(shape[2:]))]
    if method == "matrix":
        return [min(shape)]
    raise ValueError(method)


def energy_rank(s: np.ndarray, energy: float) -> int:
    """Smallest rank keeping `energy` of the squared singular values."""
    e = np.cumsum(s.astype(np.float64) ** 2)
    if e[-1] <= 0:
        return 1
    return int(min(np.searchsorted(e / e[-1], min(energy, 1.0) - 1e-12) + 1, len(s)))


def round_rank(r: int, full: int, multiple: int = 8) -> int:
    """Up to a multiple of `multiple` (kernels like aligned channel counts), capped at full rank."""
    return min(full, max(multiple, -(-r // multiple) * multiple)) if multiple > 1 else min(full, max(r, 1))


# ----------------------------------------------------------------------------- FLOPs (MACs)
def conv_macs(w_shape: Sequence[int], g: ConvGeom) -> int:
    return g.batch * math.prod(g.out_spatial) * math.prod(w_shape)


def factored_macs(method: str, w_shape: Sequence[int], ranks: Sequence[int], g: Optional[ConvGeom] = None,
                  rows: int = 1) -> int:
    if method == "matrix":
        k, n = w_shape
        return rows * ranks[0] * (k + n)
    co, ci = w_shape[0], w_shape[1]
    ksize = math.prod(w_shape[2:])
    out_px, in_px = g.batch * math.prod(g.out_spatial), g.batch * math.prod(g.in_spatial)
    if method == "svd":
        r = ranks[0]
        return out_px * r * (ci * ksize + co)
    if method == "tucker2":
        r_out, r_in = ranks
        return in_px * ci * r_in + out_px * (r_in * r_out * ksize + r_out * co)
    if method == "spatial":
        r = ranks[0]
        kh, kw = w_shape[2], w_shape[3]
        mid_px = g.batch * g.out_spatial[0] * g.in_spatial[1]
        return mid_px * ci * kh * r + out_px * r * kw * co
    raise ValueError(method)


# ----------------------------------------------------------------------------- decompositions
def channel_svd(w: np.ndarray, bias: Optional[np.ndarray], g: ConvGeom, r: int,
                out_basis: Optional[np.ndarray] = None, out_bias: Optional[np.ndarray] = None) -> list[Step]:
    """kxk conv C_in->r (original stride/pads/dilations), then 1x1 r->C_out with the bias.

    `out_basis` (C_out x r, orthonormal) replaces the weight SVD by a data-driven output subspace
    P: W ~ P (P^T W), and `out_bias` is then the bias to use (see _lowrank_calib)."""
    co = w.shape[0]
    nd = len(g.kernel)
    if out_basis is not None:
        a, b = out_basis, out_basis.T @ w.reshape(co, -1).astype(np.float64)
        bias = out_bias
    else:
        a, b = _low_rank(w.reshape(co, -1), r)
    first = Step("Conv", b.reshape((r,) + w.shape[1:]).astype(w.dtype), None, g.attrs())
    second = Step("Conv", a.reshape((co, r) + (1,) * nd).astype(w.dtype), bias, _pointwise(nd))
    return [first, second]


def tucker2(w: np.ndarray, bias: Optional[np.ndarray], g: ConvGeom, r_out: int, r_in: int,
            out_basis: Optional[np.ndarray] = None, out_bias: Optional[np.ndarray] = None) -> list[Step]:
    """1x1 C_in->r_in (no bias), kxk r_in->r_out (original geometry), 1x1 r_out->C_out (bias).

    One-shot HOSVD: the factors are the leading left singular vectors of the two unfoldings."""
    co, ci = w.shape[:2]
    nd = len(g.kernel)
    w64 = w.astype(np.float64)
    u_out = out_basis if out_basis is not None else left_vectors(w64.reshape(co, -1), r_out)
    if out_basis is not None:
        bias = out_bias
    u_in = left_vectors(np.moveaxis(w64, 1, 0).reshape(ci, -1), r_in)
    core = np.tensordot(u_out.T, w64, axes=(1, 0))  # (r_out, ci, k...)
    core = np.moveaxis(np.tensordot(core, u_in, axes=(1, 0)), -1, 1)  # (r_out, r_in, k...)
    ones = (1,) * nd
    return [Step("Conv", u_in.T.reshape((r_in, ci) + ones).astype(w.dtype), None, _pointwise(nd)),
            Step("Conv", core.astype(w.dtype), None, g.attrs()),
            Step("Conv", u_out.reshape((co, r_out) + ones).astype(w.dtype), bias, _pointwise(nd))]


def spatial_svd(w: np.ndarray, bias: Optional[np.ndarray], g: ConvGeom, r: int) -> list[Step]:
    """2-D only: kx1 conv C_in->r (stride, pads, dilation of H), then 1xk r->C_out (those of W)."""
    if len(g.kernel) != 2:
        raise Refused("spatial SVD needs a 2-D conv")
    co, ci, kh, kw = w.shape
    a, b = _low_rank(_spatial_matrix(w), r)  # a: (ci*kh, r), b: (r, co*kw)
    v1 = a.reshape(ci, kh, r).transpose(2, 0, 1)[..., None]  # (r, ci, kh, 1)
    v2 = b.reshape(r, co, kw).transpose(1, 0, 2)[:, :, None, :]  # (co, r, 1, kw)
    (sh, sw), (dh, dw), p = g.strides, g.dilations, g.pads
    first = dict(kernel_shape=[kh, 1], strides=[sh, 1], dilations=[dh, 1], pads=[p[0], 0, p[2], 0])
    second = dict(kernel_shape=[1, kw], strides=[1, sw], dilations=[1, dw], pads=[0, p[1], 0, p[3]])
    return [Step("Conv", v1.astype(w.dtype), None, first), Step("Conv", v2.astype(w.dtype), bias, second)]


def matrix_svd(op: str, w: np.ndarray, bias: Optional[np.ndarray], r: int, attrs: Optional[dict] = None,
               out_basis: Optional[np.ndarray] = None, out_bias: Optional[np.ndarray] = None) -> list[Step]:
    """y = x W (W: K x N) as (x A) B. Gemm keeps transA on the first layer and beta/C on the second
    (alpha and transB are folded into W by the caller); MatMul becomes two MatMuls."""
    if out_basis is not None:  # W ~ (W P) P^T with P (N x r) from the outputs' covariance
        a, b = w.astype(np.float64) @ out_basis, out_basis.T
        bias = out_bias
    else:
        a, b = _low_rank(w, r)
    a, b = a.astype(w.dtype), b.astype(w.dtype)
    if op == "MatMul":
        return [Step("MatMul", a), Step("MatMul", b)]
    attrs = attrs or {}
    first = {"transA": attrs["transA"]} if attrs.get("transA") else {}
    second = {"beta": attrs["beta"]} if bias is not None and attrs.get("beta", 1.0) != 1.0 else {}
    return [Step("Gemm", a, None, first), Step("Gemm", b, bias, second)]


def _pointwise(nd: int) -> dict:
    return dict(kernel_shape=[1] * nd, strides=[1] * nd, pads=[0] * 2 * nd, dilations=[1] * nd)
