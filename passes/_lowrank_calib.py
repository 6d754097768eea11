"""Data-driven output subspaces for passes/lowrank.py (response reconstruction, Zhang et al. 2015).

Instead of the weight's own singular vectors, the output factor of a layer is the leading
eigenvectors P of the covariance of its responses y on calibration data: y ~ P P^T y +
(I - P P^T) mean(y). Directions the data never excites cost no rank, which keeps far more
accuracy at the same rank than weight-only SVD.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim_opt.calibration import load_calibration
from onnxslim_opt.runtime import cpu_session, extra_outputs
from onnxslim_opt.graph import export_model

#: calibration samples used at most (the covariance of a few hundred images is plenty)
MAX_SAMPLES = 512


def output_subspaces(graph: gs.Graph, ctx, layers: list) -> None:
    """Set `layer.basis = (eigenvectors by decreasing variance, mean response, layer bias)`
    on every layer whose responses could be measured."""
    wanted = {}
    for layer in layers:
        bias = _effective_bias(layer)
        if bias is not False:
            wanted[layer.node.outputs[0].name] = (layer, bias)
    if not wanted:
        return
    data = load_calibration(ctx.calibration, ctx.input_specs, ctx.preprocess,
                            0 if ctx.calibration else ctx.calibration_random, ctx.seed)
    model = export_model(graph, ctx.original) if ctx.original is not None else gs.export_onnx(graph, do_type_check=False)
    with extra_outputs(model, list(wanted)):
        sess = cpu_session(model)
    dynamic = all(not isinstance(i.shape[0], int) for i in sess.get_inputs() if i.shape)
    sums = {name: None for name in wanted}
    seen = 0
    for feed in data.batches(32 if dynamic else 1):
        outs = sess.run(list(wanted), feed)
        for name, y in zip(wanted, outs):
            layer = wanted[name][0]
            y = np.moveaxis(y, 1, -1) if layer.kind == "conv" else y
            y = y.reshape(-1, y.shape[-1]).astype(np.float64)
            acc = sums[name]
            if acc is None:
                acc = sums[name] = [0, np.zeros(y.shape[1]), np.zeros((y.shape[1], y.shape[1]))]
            acc[0] += len(y)
            acc[1] += y.sum(0)
            acc[2] += y.T @ y
        seen += len(next(iter(feed.values())))
        if seen >= MAX_SAMPLES:
            break
    for name, (layer, bias) in wanted.items():
        count, total, outer = sums[name]
        mean = total / count
        cov = outer / count - np.outer(mean, mean)
        values, vectors = np.linalg.eigh(cov)
        layer.basis = (vectors[:, ::-1].copy(), mean, bias)
        layer.response_spectrum = np.sqrt(np.clip(values[::-1], 0, None))


def _effective_bias(layer) -> Optional[np.ndarray] | bool:
    """The bias added to every response, as a vector over outputs; False when it is not one
    (a Gemm C varying per row), so the layer keeps the weight-only subspace."""
    n = layer.weight.shape[0] if layer.kind == "conv" else layer.weight.shape[1]
    if layer.bias is None:
        return np.zeros(n)
    b = np.asarray(layer.bias, np.float64)
    if layer.kind == "gemm":
        b = b * float(layer.gemm_attrs.get("beta", 1.0))
        if b.ndim == 2 and b.shape[0] != 1:
            return False
    b = b.reshape(-1)
    if b.size == 1:
        return np.full(n, b[0])
    return b if b.size == n else False
