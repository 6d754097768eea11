"""Recovery after channel pruning without training: least-squares (ridge) refit of every consumer
that lost input channels, layer by layer from input to output (He et al. 2017, asymmetric form).

For a consumer Conv (2D, group 1) or Gemm, solve  min ||Y_orig - [X_pruned 1] [W; b]||^2 + ridge ||W||^2
where X_pruned is its input in the *pruned* model (with the earlier refits applied) and Y_orig its
output in the original model, on sampled output positions of the calibration data.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxslim_opt.runtime import extra_outputs
from onnxslim_opt.graph import attr, constant_value, export_model, make_constant, optional_input

from ._prune_graph import Analysis, Role, keep_mask


def refittable(role: Role) -> Optional[str]:
    """None when the consumer can be refit, else why not."""
    n = role.node
    if n.op == "Conv":
        w = constant_value(n.inputs[1])
        if w.ndim != 4 or int(attr(n, "group", 1)) != 1 or attr(n, "auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
            return "only 2D, group-1 Convs with explicit pads are refit"
        return None
    if n.op == "Gemm":
        if attr(n, "transA", 0) or attr(n, "alpha", 1.0) != 1.0 or attr(n, "beta", 1.0) != 1.0:
            return "Gemm with transA/alpha/beta is not refit"
        bias = optional_input(n, 2)
        w = constant_value(n.inputs[1])
        features = w.shape[0] if attr(n, "transB", 0) else w.shape[1]
        if bias is not None and (constant_value(bias) is None or constant_value(bias).size not in (1, features)):
            return "Gemm bias is not a constant per-feature vector"
        return None
    return f"{n.op} consumers are not refit"


def stream_outputs(model: onnx.ModelProto, names: list[str], feeds: list[dict], session):
    """Per calibration batch, the named tensors (one ORT session, nothing kept across batches)."""
    with extra_outputs(model, names):
        sess = session(model)
    for feed in feeds:
        yield dict(zip(names, sess.run(names, feed)))


def _positions(shape: tuple, rows: int, rng: np.random.Generator) -> np.ndarray:
    """Sampled (n, h, w) output positions of one batch (all of them when few)."""
    n, _, h, w = shape
    total = n * h * w
    flat = np.arange(total) if total <= rows else rng.choice(total, rows, replace=False)
    return np.stack(np.unravel_index(flat, (n, h, w)), axis=1)


def _patches(x: np.ndarray, node: gs.Node, kshape: tuple, pos: np.ndarray) -> np.ndarray:
    """im2col rows of `x` for the output positions `pos`, in the weight's (c, kh, kw) order."""
    kh, kw = kshape
    sh, sw = attr(node, "strides", [1, 1])
    dh, dw = attr(node, "dilations", [1, 1])
    pt, pl, pb, pr = attr(node, "pads", [0, 0, 0, 0])
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    n, oh, ow = pos[:, 0], pos[:, 1] * sh, pos[:, 2] * sw
    hi = oh[:, None, None] + (np.arange(kh) * dh)[None, :, None]
    wi = ow[:, None, None] + (np.arange(kw) * dw)[None, None, :]
    p = xp[n[:, None, None], :, hi, wi]  # [P, kh, kw, C]
    return p.transpose(0, 3, 1, 2).reshape(len(pos), -1)


def _solve(gram: np.ndarray, rhs: np.ndarray, ridge: float) -> np.ndarray:
    """Ridge solution of the normal equations (the last row/column is the bias, not shrunk)."""
    reg = ridge * np.trace(gram) / max(len(gram) - 1, 1) * np.eye(len(gram))
    reg[-1, -1] = 0.0
    return np.linalg.solve(gram + reg, rhs)


def _residual(theta: np.ndarray, gram: np.ndarray, rhs: np.ndarray, yy: float) -> float:
    """||[X 1] theta - Y||^2 from the accumulated statistics."""
    return max(float(np.sum(theta * (gram @ theta)) - 2.0 * np.sum(theta * rhs) + yy), 0.0)


def refit(graph: gs.Graph, a: Analysis, removed: set[int], unpruned: onnx.ModelProto, original: Any,
          feeds: list[dict], session, ridge: float = 1e-3, rows: int = 8192, seed: int = 0) -> dict:
    """Refit the consumers in place (new constants); returns per-layer relative errors before/after.
    Memory stays bounded: only `rows` sampled output positions per layer are kept."""
    order = {id(n): i for i, n in enumerate(graph.nodes)}
    roles = sorted((r for r in a.consumers if not keep_mask(a, r.ids, removed, r.block).all()),
                   key=lambda r: order[id(r.node)])
    skipped = {r.node.name: why for r in roles if (why := refittable(r))}
    roles = [r for r in roles if r.node.name not in skipped]
    if not roles:
        return {"skipped": skipped}
    owners = {id(p.node): p for p in a.producers}
    rng = np.random.default_rng(seed)
    per_batch = max(1, rows // max(len(feeds), 1))
    # targets: the original outputs at sampled positions, batch by batch
    names = list(dict.fromkeys(r.node.outputs[0].name for r in roles))
    positions: dict[str, list] = {n: [] for n in names}
    targets: dict[str, list] = {n: [] for n in names}
    for outs in stream_outputs(unpruned, names, feeds, session):
        for name, y in outs.items():
            pos = _positions(y.shape, per_batch, rng) if y.ndim == 4 else None
            positions[name].append(pos)
            targets[name].append(y[pos[:, 0], :, pos[:, 1], pos[:, 2]] if pos is not None else y.reshape(len(y), -1))
    errors = {}
    for role in roles:
        errors[role.node.name] = _refit_one(graph, role, owners.get(id(role.node)), a, removed, original, feeds,
                                            session, positions[role.node.outputs[0].name],
                                            targets[role.node.outputs[0].name], ridge)
    return {"errors": errors, "skipped": skipped}


def _refit_one(graph, role: Role, prod, a: Analysis, removed: set[int], original, feeds, session,
               positions: list, targets: list, ridge: float) -> tuple[float, float]:
    """Accumulate the normal equations batch by batch (memory: one batch of patches and a DxD
    Gram matrix), solve, and replace the consumer's weight and bias when the fit improves."""
    node = role.node
    w = np.asarray(constant_value(node.inputs[1]), np.float64)
    name = node.inputs[0].name
    keep = keep_mask(a, prod.ids, removed) if prod is not None else None  # consumer's own kept outputs
    gram = rhs = None
    yy = 0.0
    for outs, pos, y in zip(stream_outputs(export_model(graph, original), [name], feeds, session), positions, targets):
        x = np.asarray(outs[name], np.float64)
        xa = _patches(x, node, w.shape[2:], pos) if node.op == "Conv" else x.reshape(len(x), -1)
        xa = np.concatenate([xa, np.ones((len(xa), 1))], axis=1)
        y = np.asarray(y, np.float64)
        y = y[:, keep] if keep is not None else y
        gram = xa.T @ xa if gram is None else gram + xa.T @ xa
        rhs = xa.T @ y if rhs is None else rhs + xa.T @ y
        yy += float(np.sum(y * y))
    bias = optional_input(node, 2)
    b = np.asarray(constant_value(bias), np.float64).reshape(-1) if bias is not None else np.zeros(1)
    w2 = w.reshape(w.shape[0], -1) if node.op == "Conv" else (w if attr(node, "transB", 0) else w.T)
    old = np.concatenate([w2.T, np.broadcast_to(b, (w2.shape[0],))[None, :]], axis=0)
    theta = _solve(gram, rhs, ridge)
    scale = max(yy, 1e-24)
    before, after = (np.sqrt(_residual(t, gram, rhs, yy) / scale) for t in (old, theta))
    if after >= before:
        return before, before
    dtype = constant_value(node.inputs[1]).dtype
    new_w, new_b = theta[:-1].T, theta[-1]
    new_w = new_w.reshape(w.shape) if node.op == "Conv" else (new_w if attr(node, "transB", 0) else new_w.T)
    node.inputs[1] = make_constant(graph, node.inputs[1].name + "_refit", new_w.astype(dtype))
    new_bias = make_constant(graph, f"{node.name}_bias_refit", new_b.astype(dtype))
    if len(node.inputs) > 2:
        node.inputs[2] = new_bias
    else:
        node.inputs.append(new_bias)
    return float(before), float(after)
