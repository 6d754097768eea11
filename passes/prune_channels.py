"""Structured channel pruning (`--prune FRACTION`), lossy.

Removes whole Conv (and 2D Gemm/MatMul) output channels and everything that depends on them:
BatchNormalization/InstanceNormalization parameters, PRelu slopes, per-channel constants of
Add/Mul/..., depthwise convs (input, output and group together), the input channels of the next
Conv, and the feature rows of a Gemm/MatMul after a Flatten/Reshape/spatial Reduce (whose constant
shape is rewritten). Channels joined by an element-wise op of two activations (residual Add, SE
Mul, SiLU) share one keep-set. Anything the rules in `_prune_graph` do not cover is refused,
with the reason in the report.

Plan first (analysis, selection, every new array), then edit. Under `--debug` (and in the tests)
the pruned graph is checked against the *masked* graph: the unpruned graph with the removed
channels' input weights of every terminal consumer zeroed, which must give the same outputs.
With `--calibration`, each Conv/Gemm consumer that lost input channels is refit by ridge least
squares, layer by layer (`_prune_refit`); `reconstruct="bias"` only folds the removed channels'
mean contribution into the consumer's bias.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim_opt.errors import OptimizeError
from onnxslim_opt.graph import constant_value, export_model, make_constant, optional_input
from onnxslim_opt.runtime import cpu_session
from onnxslim_opt.pass_api import Pass, PassContext, PassResult
from onnxslim_opt.shape_inference import ensure_shapes

from ._prune_graph import Analysis, analyze, input_convs, keep_mask
from ._prune_refit import stream_outputs, refit
from ._prune_select import CRITERIA, contribution_scores, select, total_cost


@dataclass
class PruneOptions:
    #: fraction of Conv/Gemm/MatMul MACs (or parameters, see `metric`) to remove
    fraction: float = 0.3
    #: what `fraction` counts: "flops" (MACs from static shapes) or "params" (weight elements)
    metric: str = "flops"
    criterion: str = "l1"
    #: kept channel counts rounded to a multiple of this (per producer)
    round_to: int = 1
    #: comma-separated fnmatch patterns of Conv/Gemm/MatMul names never pruned; "" = the default
    #: (convs reading a graph input, and the last Gemm/MatMul)
    protect: str = ""
    max_layer_ratio: float = 0.7
    #: check the pruned graph against the masked graph with ONNX Runtime (also under ctx.debug)
    verify: bool = False
    #: recovery when the run has calibration data: "refit" (least-squares refit of the consumers),
    #: "bias" (bias compensation only) or "none"
    reconstruct: str = "refit"
    #: calibration samples used for recovery (the first ones)
    max_samples: int = 256


class PruneChannels(Pass):
    name = "prune_channels"
    description = "remove whole conv output channels (structured pruning) with shape propagation"
    lossless = False
    stage = "transform"
    order = 10  # before compress_weights (50), lowrank (400), quantize_int8 (500), convert_fp16 (900)
    default = False
    transactional = False  # slicing is planned whole, but a failing refit would leave it half-done
    Options = PruneOptions

    @classmethod
    def add_arguments(cls, group: Any) -> None:
        group.add_argument("--prune", type=float, metavar="FRACTION",
                           help="remove about FRACTION of the Conv/Gemm/MatMul FLOPs by removing channels")
        group.add_argument("--prune-criterion", default="l1", choices=CRITERIA,
                           help="channel importance: l1 (default), l2, bn (BatchNormalization scale), "
                                "activation (contribution to the next layer on --calibration data)")
        group.add_argument("--round-to", type=int, default=1, metavar="N",
                           help="keep channel counts a multiple of N (8 keeps ONNX Runtime's CPU kernels fast: "
                                "unrounded counts measured 1.07-1.16x slower on the digits CNN)")
        group.add_argument("--protect", default="", metavar="PATTERNS",
                           help="comma-separated node-name patterns (fnmatch) never pruned "
                                "(default: convs reading a graph input and the last Gemm/MatMul)")
        group.add_argument("--max-layer-ratio", type=float, default=0.7, metavar="R",
                           help="remove at most this fraction of one layer's channels (default 0.7)")
        group.add_argument("--prune-metric", choices=["flops", "params"], default="flops",
                           help="what --prune counts: Conv/Gemm/MatMul FLOPs (default) or their parameters")
        group.add_argument("--prune-reconstruct", choices=["refit", "bias", "none"], default="refit",
                           help="recovery with --calibration data: least-squares refit of the consumers "
                                "(default), bias compensation only, or none")

    @classmethod
    def from_arguments(cls, args: Any) -> Optional["PruneChannels"]:
        if getattr(args, "prune", None) is None:
            return None
        options = PruneOptions(fraction=args.prune, metric=args.prune_metric, criterion=args.prune_criterion,
                               round_to=args.round_to, protect=args.protect, max_layer_ratio=args.max_layer_ratio,
                               reconstruct=args.prune_reconstruct)
        check_options(options)
        if options.criterion == "activation" and not (getattr(args, "calibration", None)
                                                   or getattr(args, "calibration_random", 0)):
            raise OptimizeError("--prune-criterion activation needs calibration data (--calibration PATH)")
        return cls(options)

    def applicable(self, graph: gs.Graph, ctx: PassContext) -> bool:
        check_options(self.options)  # bad options stop the run with one clear error (not a roll-back)
        if self.options.criterion == "activation" and not (ctx.calibration or ctx.calibration_random):
            raise OptimizeError("--prune-criterion activation needs calibration data (--calibration PATH)")
        return True

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        check_options(self.options)
        result = PassResult()
        ensure_shapes(graph, ctx)
        analysis = analyze(graph, self._protected(graph), ctx.opset)
        if analysis.refused:
            result.notes.append(f"prune_channels refused: {analysis.refused}")
            return result
        for node, reason in analysis.refusals:
            result.reject(node, reason)
        o = self.options
        total = total_cost(graph, o.metric)
        feeds = (_calibration_feeds(ctx, o.max_samples)
                 if o.criterion == "activation" or o.reconstruct != "none" else None)
        id_scores = None
        if o.criterion == "activation":
            names = [r.node.inputs[0].name for r in analysis.consumers]
            id_scores = contribution_scores(analysis, _input_means(graph, ctx, names, feeds, absolute=True))
        removed, info = select(analysis, total, o.fraction, o.criterion, o.max_layer_ratio, o.round_to, id_scores,
                               o.metric)
        if o.criterion == "bn" and info.get("without_bn"):
            result.notes.append(f"prune_channels: {info['without_bn']} layers have no BatchNormalization right after "
                                f"them (fused by fuse_conv_bn?) and are ranked by L1 instead")
        if not removed:
            result.notes.append("prune_channels: no prunable channel class")
            return result
        self._prune(graph, ctx, analysis, removed, feeds if o.reconstruct != "none" else None, result)
        after = result.details.pop("cost_after_pruning")
        result.changed = True
        result.rewrites = len(removed)
        result.details.update(self._report(analysis, removed, total, after, info, o.metric))
        result.notes.append(f"prune_channels: {'MACs' if o.metric == 'flops' else 'parameters'} {total:.4g} -> "
                            f"{after:.4g} ({after / max(total, 1):.3f}), "
                            f"{len(removed)} channel classes removed"
                            + (f", {result.details['reconstruction']}" if "reconstruction" in result.details else ""))
        return result

    def _prune(self, graph: gs.Graph, ctx: PassContext, a: Analysis, removed: set[int], feeds: Optional[list],
               result: PassResult) -> None:
        """Plan every change, apply it, cross-check against the masked graph, then reconstruct."""
        updates = plan_updates(graph, a, removed)
        self.masked_model = None
        if self.options.verify or ctx.debug:
            if ctx.input_specs and ctx.original is not None:
                self.masked_model = export_model(masked_graph(graph, a, removed), ctx.original)
            else:
                result.notes.append("prune_channels: masked-graph check skipped (input shapes unknown)")
        mode = self.options.reconstruct if feeds else "none"
        compensation = compute_compensation(graph, a, removed, ctx, feeds) if mode == "bias" else {}
        unpruned = export_model(graph, ctx.original) if mode == "refit" else None
        apply_updates(graph, updates)
        ctx.shapes_stale = True
        ensure_shapes(graph, ctx)
        if self.masked_model is not None:
            diff = verify_against_masked(export_model(graph, ctx.original), self.masked_model, ctx)
            result.details["masked_check_max_rel_diff"] = diff
        result.details["cost_after_pruning"] = total_cost(graph, self.options.metric)
        if compensation:
            apply_updates(graph, compensation, clear_shapes=False)
            result.details["reconstruction"] = "bias compensation"
        if unpruned is not None:
            info = refit(graph, a, removed, unpruned, ctx.original, feeds, cpu_session, seed=ctx.seed)
            result.details["reconstruction"] = "least-squares refit"
            result.details["refit"] = info
            for name, why in info.get("skipped", {}).items():
                result.notes.append(f"prune_channels: {name} not refit: {why}")

    def _protected(self, graph: gs.Graph) -> set[int]:
        patterns = [p.strip() for p in self.options.protect.split(",") if p.strip()]
        if not patterns:
            last = [n for n in graph.nodes if n.op in ("Gemm", "MatMul")][-1:]
            return input_convs(graph) | {id(n) for n in last}
        return {id(n) for n in graph.nodes if n.op in ("Conv", "Gemm", "MatMul")
                and any(fnmatch.fnmatch(n.name, p) for p in patterns)}

    @staticmethod
    def _report(a: Analysis, removed: set[int], total: float, after: float, info: dict, metric: str) -> dict:
        layers = []
        for prod in a.producers:
            kept = int(keep_mask(a, prod.ids, removed).sum())
            reason = next((a.blocked[i] for i in prod.ids if i in a.blocked), None)
            layers.append({"node": prod.node.name, "before": len(prod.ids), "after": kept,
                           **({"refused": reason} if reason and kept == len(prod.ids) else {})})
        return {"layers": layers, f"{metric}_before": total, f"{metric}_after": after,
                f"{metric}_ratio": after / max(total, 1.0), **info}


def check_options(o: PruneOptions) -> None:
    if not 0.0 < o.fraction < 1.0:
        raise OptimizeError(f"--prune takes a FLOPs fraction in (0, 1), got {o.fraction}")
    if o.criterion not in CRITERIA:
        raise OptimizeError(f"--prune-criterion {o.criterion!r} is not implemented; use one of {', '.join(CRITERIA)}")
    if o.metric not in ("flops", "params"):
        raise OptimizeError(f"prune metric must be flops or params, got {o.metric!r}")
    if o.reconstruct not in ("refit", "bias", "none"):
        raise OptimizeError(f"reconstruct must be refit, bias or none, got {o.reconstruct!r}")
    if o.round_to < 1 or not 0.0 < o.max_layer_ratio <= 1.0:
        raise OptimizeError("--round-to must be >= 1 and --max-layer-ratio in (0, 1]")


# ----------------------------------------------------------------------------- planning and applying
# updates: {(id(node), input index, or -1 for the group attribute): (node, new value)}


def plan_updates(graph: gs.Graph, a: Analysis, removed: set[int]) -> dict:
    """Every new weight/constant/shape/attribute, computed before any edit."""
    values: dict[tuple[int, int], Any] = {}
    nodes: dict[int, gs.Node] = {}
    for role in a.roles:
        mask = keep_mask(a, role.ids, removed, role.block)
        if mask.all():
            continue  # nothing removed here: keep the tensor as it is (possibly shared)
        key = (id(role.node), role.index)
        nodes[id(role.node)] = role.node
        if role.kind == "group":
            values[key] = int(mask.sum())
            continue
        if role.kind == "split":
            bounds = np.cumsum((0,) + role.sizes)
            kept = [int(mask[s:e].sum()) for s, e in zip(bounds[:-1], bounds[1:])]
            values[key] = kept if role.index == -2 else np.array(kept, np.int64)
            continue
        current = values.get(key)
        if current is None:
            current = constant_value(role.node.inputs[role.index])
        if role.kind == "reshape":
            current = np.array(current, copy=True)
            current[role.axis] = int(mask.sum())
        else:
            current = np.take(current, np.nonzero(mask)[0], axis=role.axis)
        values[key] = current
    return {k: (nodes[k[0]], v) for k, v in values.items()}


def apply_updates(graph: gs.Graph, updates: dict, clear_shapes: bool = True) -> None:
    for (_, index), (node, value) in updates.items():
        if index == -1:
            node.attrs["group"] = value
        elif index == -2:
            node.attrs["split"] = value
        elif index >= len(node.inputs):
            if node.op == "Split":
                node.attrs.pop("num_outputs", None)  # explicit sizes replace an equal split
            node.inputs.append(make_constant(graph, f"{node.name}_input{index}", value))
        else:
            node.inputs[index] = make_constant(graph, node.inputs[index].name + "_pruned", value)
    for t in graph.tensors().values() if clear_shapes else ():  # shapes are re-inferred
        if isinstance(t, gs.Variable) and not any(t is x for x in graph.inputs + graph.outputs):
            t.shape = None


def masked_graph(graph: gs.Graph, a: Analysis, removed: set[int]) -> gs.Graph:
    """A copy of the unpruned graph where every terminal consumer ignores the removed channels
    (their input weights are zero): what the pruned graph must compute exactly."""
    copy = graph.copy()
    index = {id(n): i for i, n in enumerate(graph.nodes)}
    zeroed: dict[tuple[int, int], np.ndarray] = {}
    for role in a.consumers:
        key = (index[id(role.node)], role.index)
        w = zeroed.get(key)
        if w is None:
            w = np.array(constant_value(role.node.inputs[role.index]), copy=True)
        drop = ~keep_mask(a, role.ids, removed, role.block)
        sl = [slice(None)] * w.ndim
        sl[role.axis] = drop
        w[tuple(sl)] = 0
        zeroed[key] = w
    for (i, k), w in zeroed.items():
        node = copy.nodes[i]
        node.inputs[k] = make_constant(copy, node.inputs[k].name + "_masked", w)
    return copy


def _feeds(ctx: PassContext, count: int = 2) -> list[dict]:
    rng = np.random.default_rng(ctx.seed)
    return [{s.name: rng.standard_normal(s.shape).astype(s.dtype) for s in ctx.input_specs} for _ in range(count)]


def verify_against_masked(pruned, masked, ctx: PassContext, feeds: Optional[list] = None) -> float:
    """Max abs difference pruned vs masked on random inputs; raises when they disagree."""
    feeds = feeds or _feeds(ctx)
    sp, sm = cpu_session(pruned), cpu_session(masked)
    worst = 0.0
    for feed in feeds:
        for x, y in zip(sp.run(None, feed), sm.run(None, feed)):
            x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
            scale = max(1.0, float(np.abs(y).max(initial=0.0)))
            worst = max(worst, float(np.abs(x - y).max(initial=0.0)) / scale)
    if worst > 1e-4:
        raise AssertionError(f"prune_channels: pruned graph differs from the masked graph (rel. diff {worst:.3g})")
    return worst


# ----------------------------------------------------------------------------- calibration data
def _calibration_feeds(ctx: PassContext, limit: int) -> Optional[list[dict]]:
    """Calibration batches (at most `limit` samples), or None without calibration data."""
    if not (ctx.calibration or ctx.calibration_random) or ctx.original is None:
        return None
    from onnxslim_opt.calibration import load_calibration
    data = load_calibration(ctx.calibration, ctx.input_specs, ctx.preprocess,
                            0 if ctx.calibration else ctx.calibration_random, ctx.seed)
    inits = {t.name for t in ctx.original.graph.initializer}
    fixed = any(vi.type.tensor_type.shape.dim and vi.type.tensor_type.shape.dim[0].dim_value > 0
                for vi in ctx.original.graph.input if vi.name not in inits)
    feeds, count = [], 0
    for feed in data.batches(1 if fixed else 32):  # a fixed batch dim takes one sample per run
        feeds.append(feed)
        count += next(iter(feed.values())).shape[0]
        if count >= limit:
            break
    return feeds


# ----------------------------------------------------------------------------- bias compensation
def compute_compensation(graph: gs.Graph, a: Analysis, removed: set[int], ctx: PassContext, feeds: list) -> dict:
    """New consumer biases: + sum over removed channels of mean(x_c) * sum_k W[:, c, k] (Conv) or
    mean(x_c) * W[c, :] (Gemm/MatMul, as a bias only for Gemm). Means come from the original model
    on the calibration data; approximate at zero-padded borders."""
    roles = [r for r in a.consumers if r.node.op in ("Conv", "Gemm") and r.node.attrs.get("group", 1) == 1
             and not keep_mask(a, r.ids, removed, r.block).all()]
    if not roles:
        return {}
    means = _input_means(graph, ctx, [r.node.inputs[0].name for r in roles], feeds)
    out = {}
    for r in roles:
        x = means[r.node.inputs[0].name]
        drop = ~keep_mask(a, r.ids, removed, r.block)
        w = np.asarray(constant_value(r.node.inputs[1]), np.float64)
        if r.node.op == "Conv":
            delta = (w[:, drop].sum(axis=tuple(range(2, w.ndim))) * x[drop]).sum(axis=1)
        else:
            delta = (w[:, drop] * x[drop]).sum(axis=1) if r.axis == 1 else (w[drop, :] * x[drop, None]).sum(axis=0)
            delta = delta * float(r.node.attrs.get("alpha", 1.0))
        bias = optional_input(r.node, 2)
        old = constant_value(bias) if bias is not None else np.zeros(delta.shape, np.float32)
        if r.node.op == "Gemm" and (bias is not None and old.shape != delta.shape or r.node.attrs.get("beta", 1.0) != 1.0):
            continue
        new = (old + delta).astype(old.dtype)
        prod = next((p for p in a.producers if p.node is r.node), None)
        if prod is not None:  # the consumer loses output channels too
            new = new[keep_mask(a, prod.ids, removed)]
        out[(id(r.node), 2)] = (r.node, new)
    return out


def _input_means(graph: gs.Graph, ctx: PassContext, names: list[str], feeds: list,
                 absolute: bool = False) -> dict[str, np.ndarray]:
    """Per-feature (axis 1) mean, or mean of |x|, of the named tensors in the unpruned graph on
    the calibration data, accumulated batch by batch."""
    names = list(dict.fromkeys(names))
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for outs in stream_outputs(export_model(graph, ctx.original), names, feeds, cpu_session):
        for name, v in outs.items():
            v = np.abs(np.asarray(v, np.float64)) if absolute else np.asarray(v, np.float64)
            sums[name] = sums.get(name, 0) + v.sum(axis=tuple(i for i in range(v.ndim) if i != 1))
            counts[name] = counts.get(name, 0) + v.size // v.shape[1]
    return {n: s / counts[n] for n, s in sums.items()}
