"""Low-rank factorization of Conv, Gemm and MatMul, kept only where measured faster (lossy).

FLOPs saved are not time saved: a factored 3x3 conv with many channels runs several times
faster, while small layers (few channels, small images, 1x1) often get slower. So for every
eligible layer this pass builds the factored replacement(s) (channel SVD, Tucker-2, spatial SVD
for Conv; two thinner layers for Conv 1x1, Gemm and MatMul with a constant 2-D weight), times each
against the original layer with ONNX Runtime on the layer's real input shape, and keeps the
fastest one only when it beats the original by `margin`. Ranks come from an energy threshold
(`energy=0.95`: fraction of squared singular values), a target FLOPs ratio over the eligible
layers (`ratio=0.5`) or a per-layer relative error budget (`error=0.2`), are rounded up to a multiple of 8 (or full rank), and a rank at which the
factored form has no fewer MACs is refused. With calibration data, the output subspace of
channel SVD / Tucker-2 / Gemm / MatMul comes from the covariance of the layer's responses on
that data (Zhang et al. 2015) instead of from the weights alone.

`details["layers"]` lists every layer seen: method, ranks, MACs ratio, time ratio, kept and why.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim_opt.errors import OptimizeError
from onnxslim_opt.graph import (Edit, NewNode, constant_value, fresh_name, is_standard, make_constant,
                                optional_input, topological_sort, walk_graphs)
from onnxslim_opt.pass_api import Pass, PassContext, PassResult
from onnxslim_opt.shape_inference import ensure_shapes

from . import _lowrank_decomp as D
from . import _lowrank_timing as T

METHODS = ("auto", "tucker2", "svd", "spatial")


@dataclass
class LowRankOptions:
    #: keep this fraction of the squared singular values (ignored when `ratio` is set)
    energy: Optional[float] = 0.95
    #: target MACs of the eligible layers as a fraction of the original (overrides `energy`)
    ratio: Optional[float] = None
    #: per-layer budget: relative (Frobenius) error of the weight, or of the responses when
    #: data-driven (overrides `energy`; Tucker-2 splits it over its two modes, HOSVD bound)
    error: Optional[float] = None
    #: conv decomposition: tucker2, svd (channel), spatial, or auto (time them all, keep the fastest)
    method: str = "auto"
    #: execution provider the timing runs on
    target_ep: str = "cpu"
    #: interleaved timed runs per candidate (medians compared)
    runs: int = 15
    #: keep a factorization only when it is at least this much faster (0.05: 5%)
    margin: float = 0.05
    #: False keeps every candidate under the break-even rank without timing (tests, offline use)
    measure: bool = True
    #: ranks rounded up to a multiple of this (1: no rounding)
    rank_multiple: int = 8
    #: use the calibration data, when the run has some, to choose output subspaces
    data_driven: bool = True


@dataclass
class Layer:
    """An eligible layer: its weight as the decompositions want it and its geometry."""

    node: gs.Node
    kind: str  # conv, gemm, matmul
    weight: np.ndarray  # conv: (C_out, C_in, k...); gemm/matmul: (K, N) with alpha/transB folded
    bias: Optional[np.ndarray]
    in_shape: list[int]
    geom: Optional[D.ConvGeom] = None
    rows: int = 1
    methods: tuple[str, ...] = ()
    original: list = field(default_factory=list)  # the layer as one Step (for timing)
    gemm_attrs: dict = field(default_factory=dict)  # transA and beta, kept by the factored Gemms
    #: data-driven: (eigenvectors of the responses' covariance, mean response, bias vector)
    basis: Optional[tuple] = None
    #: data-driven: sqrt of those eigenvalues, the spectrum the output rank is chosen from
    response_spectrum: Optional[np.ndarray] = None

    def macs(self) -> int:
        if self.kind == "conv":
            return D.conv_macs(self.weight.shape, self.geom)
        return self.rows * self.weight.shape[0] * self.weight.shape[1]


class LowRankFactorize(Pass):
    name = "lowrank"
    description = "low-rank factorization of Conv/Gemm/MatMul, kept only where measured faster (lossy)"
    lossless = False
    stage = "transform"
    order = 400
    default = False
    Options = LowRankOptions

    @classmethod
    def add_arguments(cls, group: Any) -> None:
        group.add_argument("--lowrank", metavar="SPEC",
                           help="low-rank factorization: energy=0.95 (squared singular values kept), ratio=0.5 "
                                "(target MACs of eligible layers) or error=0.2 (per-layer relative weight error); "
                                "lossy, kept only where measured faster")
        group.add_argument("--lowrank-method", choices=METHODS, default="auto",
                           help="conv decomposition (default auto: time tucker2, svd, spatial; keep the fastest)")
        group.add_argument("--target-ep", default="cpu", metavar="EP",
                           help="execution provider the factored layers are timed on (default cpu)")
        group.add_argument("--lowrank-runs", type=int, default=15, metavar="N",
                           help="interleaved timed runs per candidate layer (default 15)")
        group.add_argument("--lowrank-margin", type=float, default=0.05, metavar="F",
                           help="keep a factorization only when at least this much faster (default 0.05)")

    @classmethod
    def from_arguments(cls, args: Any) -> Optional["LowRankFactorize"]:
        spec = getattr(args, "lowrank", None)
        if spec is None:
            return None
        options = parse_spec(spec)
        options.method, options.target_ep = args.lowrank_method, args.target_ep
        options.runs, options.margin = args.lowrank_runs, args.lowrank_margin
        _check(options)
        return cls(options)

    def applicable(self, graph: gs.Graph, ctx: PassContext) -> bool:
        _check(self.options)  # raised outside the manager's roll-back: a clear error for bad flags
        return True

    # ------------------------------------------------------------------ run
    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        o = self.options
        provider = T.provider_for(o.target_ep) if o.measure else None
        result = PassResult()
        if any(g is not graph for g in walk_graphs(graph)):
            result.notes.append("lowrank: layers inside subgraphs (If/Loop/Scan bodies) are not factorized")
        ensure_shapes(graph, ctx)
        shapes = _concrete_shapes(graph, ctx)
        report: list[dict] = []
        layers: list[Layer] = []
        for node in list(graph.nodes):
            if node.op not in ("Conv", "Gemm", "MatMul", "ConvTranspose") or not is_standard(node):
                continue
            outcome = analyze(node, shapes, o.method)
            if outcome is None:
                continue
            if isinstance(outcome, str):
                result.reject(node, outcome)
                report.append(dict(node=node.name, op=node.op, kept=False, reason=outcome))
                continue
            layers.append(outcome)
        if o.data_driven and (ctx.calibration or ctx.calibration_random) and layers:
            from ._lowrank_calib import output_subspaces
            output_subspaces(graph, ctx, layers)
            result.notes.append("lowrank: output subspaces from calibration data (response reconstruction)")
        energy = o.energy
        if o.ratio is not None:
            energy = energy_for_ratio(layers, o.ratio, o.rank_multiple)
            result.details["energy_for_ratio"] = energy
        edits: list[tuple[Layer, list]] = []
        total_before = total_after = 0
        for layer in layers:
            entry, steps = choose(layer, energy, o, provider, ctx.opset)
            report.append(entry)
            total_before += entry["macs"]
            if steps is None:
                result.reject(layer.node, entry["reason"])
                total_after += entry["macs"]
                continue
            total_after += entry["factored_macs"]
            edits.append((layer, steps))
        for layer, steps in edits:  # built one at a time: a layer reads what the previous edit rewired
            build_edit(graph, layer, steps).apply(graph)
        if edits:
            topological_sort(graph)  # new nodes were appended at the end
        result.rewrites = len(edits)
        result.changed = bool(edits)
        result.details.update(layers=report, eligible_macs=total_before, eligible_macs_after=total_after,
                              macs_ratio=round(total_after / total_before, 4) if total_before else 1.0)
        return result


# ----------------------------------------------------------------------------- options
def parse_spec(spec: str) -> LowRankOptions:
    """`energy=0.95`, `ratio=0.5`, optionally with more `key=value` options after commas."""
    options = LowRankOptions()
    for item in filter(None, (s.strip() for s in str(spec).split(","))):
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in LowRankOptions.__dataclass_fields__:
            raise OptimizeError(f"--lowrank {spec!r}: expected energy=F, ratio=F or error=F (got {item!r})")
        current = getattr(options, key)
        if isinstance(current, bool):
            setattr(options, key, value.strip().lower() in ("1", "true", "yes"))
        elif key in ("energy", "ratio", "error", "margin"):
            setattr(options, key, float(value))
        elif isinstance(current, int):
            setattr(options, key, int(value))
        else:
            setattr(options, key, value.strip())
        if key in ("ratio", "error"):
            options.energy = None
    return options


def _check(o: LowRankOptions) -> None:
    if o.error is not None and not 0 < o.error < 1:
        raise OptimizeError(f"lowrank error must be in (0, 1) (got {o.error})")
    if o.ratio is None and o.error is None and (o.energy is None or not 0 < o.energy <= 1):
        raise OptimizeError(f"lowrank energy must be in (0, 1] (got {o.energy})")
    if o.ratio is not None and not 0 < o.ratio < 1:
        raise OptimizeError(f"lowrank ratio must be in (0, 1) (got {o.ratio})")
    if o.method not in METHODS:
        raise OptimizeError(f"lowrank method must be one of {', '.join(METHODS)} (got {o.method!r})")
    if o.measure:
        try:
            T.provider_for(o.target_ep)
        except ValueError as exc:
            raise OptimizeError(str(exc)) from None


# ----------------------------------------------------------------------------- eligibility
def _concrete_shapes(graph: gs.Graph, ctx: PassContext) -> dict[str, list]:
    """Tensor shapes with the graph inputs fixed to their concrete specs (ONNX shape inference);
    falls back on the shapes the graph already holds."""
    import onnx
    shapes = {name: t.shape for name, t in graph.tensors().items() if t.shape is not None}
    specs = {s.name: list(s.shape) for s in (ctx.input_specs or [])}
    try:
        model = gs.export_onnx(graph.copy(), do_type_check=False)
        for vi in model.graph.input:
            if vi.name in specs:
                dims = vi.type.tensor_type.shape.dim
                for d, v in zip(dims, specs[vi.name]):
                    d.Clear()
                    d.dim_value = int(v)
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
        for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
            if vi.type.tensor_type.HasField("shape"):
                shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None
                                   for d in vi.type.tensor_type.shape.dim]
    except Exception:  # noqa: BLE001 - huge or odd models: keep what the graph knows
        pass
    # a dynamic leading (batch) dim is timed as 1
    return {k: [1 if (i == 0 and not isinstance(d, (int, np.integer))) else d for i, d in enumerate(v)]
            for k, v in shapes.items()}


def analyze(node: gs.Node, shapes: dict, method: str) -> Optional[Layer | str]:
    """The layer as a factorization candidate, or the reason it is refused (None: not a candidate)."""
    if node.op == "ConvTranspose":
        return "ConvTranspose is not factorized (not handled)"
    x = node.inputs[0]
    w = constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
    if w is None or constant_value(x) is not None:
        return None if node.op == "MatMul" else "weight is not a constant"
    if w.dtype != np.float32:
        return f"weight dtype {w.dtype} (only float32 is factorized)"
    in_shape = shapes.get(x.name)
    if node.op == "Conv":
        return _analyze_conv(node, w, in_shape, method)
    if in_shape is None or not all(isinstance(d, (int, np.integer)) and d > 0 for d in in_shape):
        return "input shape unknown (needed for FLOPs and timing)"
    in_shape = [int(d) for d in in_shape]
    if w.ndim != 2:
        return f"weight is {w.ndim}-D (only a 2-D weight is factorized)"
    if node.op == "MatMul":
        return Layer(node, "matmul", w, None, in_shape, rows=math.prod(in_shape[:-1]), methods=("matrix",),
                     original=[D.Step("MatMul", w)])
    c = optional_input(node, 2)
    bias = constant_value(c) if c is not None else None
    if c is not None and bias is None:
        return "Gemm C is not a constant"
    alpha, beta = float(node.attrs.get("alpha", 1.0)), float(node.attrs.get("beta", 1.0))
    trans_a, trans_b = int(node.attrs.get("transA", 0)), int(node.attrs.get("transB", 0))
    w_eff = (w.T if trans_b else w) * np.float32(alpha)
    return Layer(node, "gemm", w_eff.astype(np.float32), bias, in_shape, rows=in_shape[1 if trans_a else 0],
                 methods=("matrix",), gemm_attrs={"transA": trans_a, "beta": beta},
                 original=[D.Step("Gemm", w, bias, dict(alpha=alpha, beta=beta, transA=trans_a, transB=trans_b))])


def _analyze_conv(node: gs.Node, w: np.ndarray, in_shape, method: str) -> Layer | str:
    group = int(node.attrs.get("group", 1))
    if group != 1:
        return f"grouped conv (group={group}) is not factorized"
    if w.ndim < 3:
        return "conv weight has no spatial dims"
    b_t = optional_input(node, 2)
    bias = constant_value(b_t) if b_t is not None else None
    if b_t is not None and bias is None:
        return "conv bias is not a constant"
    try:
        geom = D.conv_geometry(node.attrs, w.shape, in_shape)
    except D.Refused as exc:
        return str(exc)
    pointwise = all(k == 1 for k in geom.kernel)
    if pointwise:
        methods = ("svd",)
    elif method == "auto":
        methods = ("tucker2", "svd") + (("spatial",) if w.ndim == 4 else ())
    elif method == "spatial" and w.ndim != 4:
        return "spatial SVD needs a 2-D conv"
    else:
        methods = (method,)
    return Layer(node, "conv", w, bias, [int(d) for d in in_shape], geom=geom, methods=methods,
                 original=[D.Step("Conv", w, bias, geom.attrs())])


# ----------------------------------------------------------------------------- ranks
def layer_ranks(layer: Layer, method: str, energy: float, multiple: int) -> list[int]:
    cache = layer.__dict__.setdefault("_spectra", {})
    if method not in cache:
        cache[method] = D.spectra(method, layer.weight)
        if layer.response_spectrum is not None and method in ("svd", "tucker2", "matrix"):
            cache[method][0] = layer.response_spectrum  # data-driven: the output rank from the responses' variance
    fulls = D.full_ranks(method, layer.weight.shape)
    return [D.round_rank(D.energy_rank(s, energy), full, multiple) for s, full in zip(cache[method], fulls)]


def layer_macs(layer: Layer, method: str, ranks: list[int]) -> int:
    return D.factored_macs(method, layer.weight.shape, ranks, layer.geom if layer.kind == "conv" else None,
                           layer.rows)


def energy_for_ratio(layers: list[Layer], ratio: float, multiple: int) -> float:
    """The largest energy whose ranks bring the eligible layers' MACs down to `ratio` (bisection);
    a layer counts at its cheapest method, or at its original MACs when no rank beats it."""
    total = sum(layer.macs() for layer in layers)
    if not total:
        return 1.0

    def macs_at(e: float) -> int:
        return sum(min([layer.macs()] + [layer_macs(layer, m, layer_ranks(layer, m, e, multiple))
                                         for m in layer.methods]) for layer in layers)

    lo, hi = 0.0, 1.0
    for _ in range(25):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if macs_at(mid) <= ratio * total else (lo, mid)
    return max(lo, 1e-6)


# ----------------------------------------------------------------------------- choosing
def decompose(layer: Layer, method: str, ranks: list[int]) -> list[D.Step]:
    """The factored steps of `layer` by `method` at `ranks` (data-driven basis when present)."""
    basis = layer.basis
    if layer.kind in ("gemm", "matmul"):
        p = _basis(basis, ranks[0])
        attrs = dict(layer.gemm_attrs)
        if p is not None:
            attrs["beta"] = 1.0
        op = "MatMul" if layer.kind == "matmul" else "Gemm"
        return D.matrix_svd(op, layer.weight, layer.bias, ranks[0], attrs, *(p or (None, None)))
    if method == "svd":
        return D.channel_svd(layer.weight, layer.bias, layer.geom, ranks[0], *(_basis(basis, ranks[0]) or (None, None)))
    if method == "tucker2":
        return D.tucker2(layer.weight, layer.bias, layer.geom, ranks[0], ranks[1],
                         *(_basis(basis, ranks[0]) or (None, None)))
    return D.spatial_svd(layer.weight, layer.bias, layer.geom, ranks[0])


def _basis(basis: Optional[tuple], r: int):
    """(P[:, :r], the bias that goes with it) from the layer's response statistics."""
    if basis is None:
        return None
    vectors, mean, bias = basis
    p = vectors[:, :r]
    proj = p @ (p.T @ bias)
    new_bias = (proj + mean - p @ (p.T @ mean)).astype(np.float32)
    return p, new_bias


def choose(layer: Layer, energy: float, o: LowRankOptions, provider: Optional[str], opset: int):
    """The report entry for `layer` and the steps to use (None: left alone, entry says why)."""
    macs = layer.macs()
    entry: dict[str, Any] = dict(node=layer.node.name, op=layer.node.op, macs=macs, kept=False)
    trials = []
    refusals = []
    for method in layer.methods:
        e = energy if o.error is None else 1 - o.error ** 2 / (2 if method == "tucker2" else 1)
        ranks = layer_ranks(layer, method, e, o.rank_multiple)
        fmacs = layer_macs(layer, method, ranks)
        name = "svd" if method == "matrix" else method
        if fmacs >= macs:
            refusals.append(f"{name} rank {ranks} at or above break-even ({fmacs / macs:.2f}x MACs)")
            continue
        trials.append(dict(method=name, ranks=ranks, factored_macs=fmacs, macs_ratio=round(fmacs / macs, 4),
                           steps=decompose(layer, method, ranks)))
    if not trials:
        entry.update(reason="; ".join(refusals))
        return entry, None
    if o.measure:
        base = T.steps_model(layer.original, layer.in_shape, opset)
        for t in trials:
            t_orig, t_fact = T.compare(base, T.steps_model(t["steps"], layer.in_shape, opset), layer.in_shape,
                                       o.runs, provider)
            t.update(time_ratio=round(t_fact / t_orig, 4), time_ms=round(t_orig * 1e3, 4))
        best = min(trials, key=lambda t: t["time_ratio"])
        winners = [t for t in trials if t["time_ratio"] <= 1 - o.margin]
        if o.ratio is not None and winners:  # a MACs target: the fewest MACs among those that are faster
            best = min(winners, key=lambda t: (t["factored_macs"], t["time_ratio"]))
    else:
        best = min(trials, key=lambda t: t["factored_macs"])
    steps = best.pop("steps")
    entry.update(best)
    entry["tried"] = [{k: v for k, v in t.items() if k != "steps"} for t in trials if t is not best]
    if refusals:
        entry["refused"] = refusals
    if o.measure and best["time_ratio"] > 1 - o.margin:
        entry["reason"] = (f"not faster: best {best['method']} takes {best['time_ratio']:.2f}x the original's time "
                           f"(needs <= {1 - o.margin:.2f}x)")
        return entry, None
    entry.update(kept=True, reason="faster" if o.measure else "fewer MACs (not timed)")
    return entry, steps


# ----------------------------------------------------------------------------- editing
def build_edit(graph: gs.Graph, layer: Layer, steps: list[D.Step]) -> Edit:
    node = layer.node
    out = node.outputs[0]
    base = node.name or node.op
    add, prev = [], node.inputs[0]
    bias_t = optional_input(node, 2)
    for i, s in enumerate(steps):
        last = i == len(steps) - 1
        t = gs.Variable(fresh_name(graph, f"{out.name}_lowrank{i}"), dtype=out.dtype,
                        shape=out.shape if last else None)
        inputs = [prev, make_constant(graph, f"{base}_lowrank_w{i}", s.weight)]
        if s.bias is not None:
            inputs.append(bias_t if s.bias is layer.bias and bias_t is not None
                          else make_constant(graph, f"{base}_lowrank_b{i}", s.bias))
        add.append(NewNode(s.op, inputs, [t], dict(s.attrs), name=fresh_name(graph, f"{base}_lowrank{i}")))
        prev = t
    return Edit(add=add, remove=[node], replace=[(out, prev)])
