"""INT8 post-training quantization: calibrate activation ranges, place Q/DQ for ONNX Runtime CPU.

The placement is planned on the simplified graph (Conv+BN already folded), ranges are collected
with streaming statistics over the user's calibration data (onnxslim_opt.calibration), then
Q/DQ nodes and int8 weights are inserted (passes/_qdq_cpu.py). Finally the result is loaded in
ONNX Runtime to count which nodes really became integer kernels (passes/_qdq_check.py).
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxslim_opt.calibration import (METHODS, collect_statistics, load_calibration, load_ranges, save_ranges,
                                      tensor_range)
from onnxslim_opt.errors import OptimizeError
from onnxslim_opt.graph import export_model, static_shape, walk_graphs
from onnxslim_opt.pass_api import Pass, PassContext, PassResult
from onnxslim_opt.shape_inference import ensure_shapes

from . import _qdq_cpu
from ._qdq_check import fusion_summary

TARGETS = ("cpu", "tensorrt")


@dataclass
class QuantizeOptions:
    target: str = "cpu"
    method: str = "minmax"
    percentile: float = 99.999
    cache: Optional[str] = None
    #: node names, op types or regexes (comma separated) left in float
    exclude: str = ""
    #: samples per ORT run while calibrating (models with a fixed batch dim run one sample at a time)
    batch_size: int = 16
    #: bytes of extra outputs held per calibration run; more tensors are calibrated in several passes
    chunk_bytes: int = 256 << 20
    #: load the result in ORT and count fused integer kernels (the report's fused/float counts)
    check_fusion: bool = True


class QuantizeInt8(Pass):
    name = "quantize_int8"
    description = "INT8 QDQ quantization with streaming calibration, placed for ONNX Runtime CPU"
    lossless = False
    stage = "transform"
    order = 500
    default = False
    Options = QuantizeOptions

    @classmethod
    def add_arguments(cls, group: Any) -> None:
        group.add_argument("--quantize", choices=["int8"], help="quantize the model (needs --calibration)")
        group.add_argument("--target", choices=TARGETS, default="cpu",
                           help="runtime the Q/DQ placement is made for (default cpu: ONNX Runtime CPU)")
        group.add_argument("--calibration-method", choices=METHODS, default="minmax",
                           help="how activation ranges come from the statistics (default minmax)")
        group.add_argument("--percentile", type=float, default=99.999, metavar="P",
                           help="percentile of |x| kept by --calibration-method percentile (default 99.999)")
        group.add_argument("--calibration-cache", metavar="FILE",
                           help="save calibrated ranges to FILE (JSON), or reuse them if FILE matches")
        group.add_argument("--exclude", default="", metavar="LIST",
                           help="node names, op types or regexes (comma separated) to keep in float")

    @classmethod
    def from_arguments(cls, args: Any) -> Optional["QuantizeInt8"]:
        if getattr(args, "quantize", None) is None:
            return None
        options = QuantizeOptions(target=args.target, method=args.calibration_method, percentile=args.percentile,
                                  cache=args.calibration_cache, exclude=args.exclude)
        _check_options(options)
        if not args.calibration and not args.calibration_random and not (options.cache and Path(options.cache).exists()):
            raise OptimizeError("--quantize int8 needs calibration data: --calibration PATH (.npz or a directory of "
                                ".npy/.npz files), or --calibration-random N (ranges then mean nothing)")
        _early_check(args)
        return cls(options)

    def applicable(self, graph: gs.Graph, ctx: PassContext) -> bool:
        # Runs outside the manager's roll-back: bad user input (calibration data, flags) must stop
        # the run with one clear error (exit 2) rather than be rolled back as a pass failure.
        _check_options(self.options)
        if ctx.opset and ctx.opset < 13:
            raise OptimizeError(f"--quantize int8 needs opset >= 13 (per-channel DequantizeLinear); "
                                f"the model has opset {ctx.opset}")
        self._data = None
        if ctx.calibration or ctx.calibration_random:
            self._data = load_calibration(ctx.calibration, ctx.input_specs, ctx.preprocess,
                                          0 if ctx.calibration else ctx.calibration_random, ctx.seed)
        elif not (self.options.cache and Path(self.options.cache).exists()):
            raise OptimizeError("quantize_int8 needs calibration data: set calibration or calibration_random")
        return True

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        opts = self.options
        result = PassResult()
        ensure_shapes(graph, ctx)
        placement = _qdq_cpu.plan(graph, _qdq_cpu.parse_exclude(opts.exclude), ctx.opset)
        for node, reason in placement.declined:
            result.reject(node, reason)
        if any(g is not graph for g in walk_graphs(graph)):
            result.notes.append("quantize_int8: nodes inside subgraphs (If/Loop/Scan bodies) stay float")
        if not placement.nodes:
            result.notes.append("quantize_int8: nothing to quantize")
            return result
        t = time.perf_counter()
        ranges, calib = self._ranges(graph, ctx, placement.calibrated_tensors())
        calib["seconds"] = round(time.perf_counter() - t, 3)
        if calib.get("random"):
            result.notes.append("quantize_int8: calibrated on random data (--calibration-random): the ranges are "
                                "not meaningful and accuracy is not representative")
        bad = [n for n in placement.calibrated_tensors() if not np.all(np.isfinite(ranges[n]))]
        if bad:
            raise OptimizeError(f"calibration gave no finite range for {bad[:3]} (no samples, or NaN/inf values)")
        quantized_nodes = [(n.name, n.op) for n in placement.nodes]
        counts = _qdq_cpu.apply(graph, placement, ranges)
        result.changed = True
        result.rewrites = len(quantized_nodes)
        details: dict[str, Any] = {"target": opts.target, "method": opts.method, "calibration": calib,
                                   "quantized": dict(Counter(op for _, op in quantized_nodes)),
                                   "data_movement_in_int8": len(placement.moves), **counts,
                                   "float_nodes": [{"node": n.name, "op": n.op, "reason": r}
                                                   for n, r in placement.declined]}
        if opts.check_fusion:
            fused = fusion_summary(export_model(graph, ctx.original), quantized_nodes,
                                   [n.name for n, _ in placement.declined])
            details["ort_fusion"] = fused
            details["float_nodes"] += fused["not_fused"]
            summary = ", ".join(f"{op} {c['fused']}/{c['fused'] + c['float']}" for op, c in fused["ops"].items())
            result.notes.append(f"quantize_int8: integer kernels in ORT CPU's optimized graph: {summary}; "
                                f"unfused Q/DQ left: {sum(fused['qdq_left'].values())}")
        result.details = details
        return result

    def _ranges(self, graph: gs.Graph, ctx: PassContext, names: list[str]) -> tuple[dict, dict]:
        opts = self.options
        meta = {"method": opts.method, "percentile": opts.percentile if opts.method == "percentile" else None}
        if opts.cache:
            cached = load_ranges(opts.cache, meta)
            if cached is not None and all(n in cached for n in names):
                return cached, {"cache": str(opts.cache), "reused": True}
        data = getattr(self, "_data", None)
        if data is None:
            raise OptimizeError(f"calibration cache {opts.cache} does not cover this model and method, "
                                f"and no calibration data was given")
        model = export_model(graph, ctx.original)
        batch = opts.batch_size if _batch_is_free(model) else 1
        sizes = {}
        for name, tensor in graph.tensors().items():
            shape = static_shape(tensor) if name in names else None
            if shape:
                sizes[name] = int(np.prod(shape)) * 4
        stats = collect_statistics(model, names, data, histogram=opts.method != "minmax", batch_size=batch,
                                   chunk_bytes=opts.chunk_bytes, tensor_bytes=sizes)
        ranges = {n: tensor_range(stats[n], opts.method, opts.percentile) for n in names}
        info = {"samples": data.count, "source": data.description, "random": data.random, "batch": batch}
        if opts.cache:
            save_ranges(opts.cache, ranges, meta)
            info["cache"] = str(opts.cache)
        return ranges, info


def _check_options(opts: QuantizeOptions) -> None:
    if opts.target == "tensorrt":
        raise OptimizeError("--target tensorrt: the TensorRT Q/DQ placement is not implemented yet; "
                            "use --target cpu (ONNX Runtime CPU)")
    if opts.target not in TARGETS:
        raise OptimizeError(f"unknown --target {opts.target!r}; choose one of {', '.join(TARGETS)}")
    if opts.method not in METHODS:
        raise OptimizeError(f"unknown --calibration-method {opts.method!r}; choose one of {', '.join(METHODS)}")
    if not 0 < opts.percentile <= 100:
        raise OptimizeError(f"--percentile must be in (0, 100], got {opts.percentile}")


def _early_check(args: Any) -> None:
    """Check the calibration data against the model's inputs before any work is done."""
    if not getattr(args, "calibration", None) or not getattr(args, "model", None):
        return
    from onnxslim_opt.specs import parse_input_shapes, resolve_input_specs

    try:
        model = onnx.load(args.model, load_external_data=False)
        specs, _ = resolve_input_specs(model, parse_input_shapes(getattr(args, "input_shapes", None)))
    except Exception:  # a bad model or shape flag is reported by the run itself
        return
    load_calibration(args.calibration, specs, getattr(args, "preprocess", None))


def _batch_is_free(model: onnx.ModelProto) -> bool:
    """Whether every input's leading dim is symbolic, so samples can be concatenated on it."""
    inits = {t.name for t in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        dims = vi.type.tensor_type.shape.dim
        if not dims or dims[0].HasField("dim_value"):
            return False
    return True
