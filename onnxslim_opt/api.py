"""The Python API. The CLI is a thin layer over `run`; `optimize` is the one-call convenience."""
from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import onnx

from .benchmark import BenchmarkOptions, benchmark
from .errors import OptimizeError, ValidationFailed
from .gates import GatesFailed, accuracy, build_gates, evaluate, load_labels, metrics_of
from .graph import export_model, export_skeleton, import_graph, node_count, op_histogram, weight_stats
from .model_io import StagedModel, check_opset, default_opset, load_model_sized
from .pass_api import STAGES, PassContext
from .pipeline import PassManager
from .registry import registry
from .report import ModelSummary, Report
from .specs import check_shape_names, load_inputs_file, parse_input_shapes, random_inputs, resolve_input_specs
from .validate import ValidationResult, validate
from .weights_on_disk import attach_file_backed_values

log = logging.getLogger("onnxslim_opt")


@dataclass
class OptimizeOptions:
    """Every knob of a run; the CLI and the API fill the same object."""

    passes: Optional[Sequence[str]] = None
    skip: Sequence[str] = ()
    pass_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    input_shapes: dict[str, tuple[int, ...]] | str | None = None
    validate: bool = True
    inputs_file: Optional[str] = None
    samples: int = 3
    seed: int = 0
    rtol: float = 1e-4
    atol: float = 1e-5
    force: bool = False
    overwrite: bool = False
    debug: bool = False
    fold_size_limit: int = 1 << 20
    custom_op_libraries: Sequence[str] = ()
    progress: Optional[Callable[[str], None]] = None
    #: configured pass instances added to the run (e.g. from a pass's own CLI flags)
    extra_passes: Sequence[Any] = ()
    calibration: Optional[str] = None
    calibration_random: int = 0
    preprocess: Optional[str] = None
    #: benchmark both models on execution providers after validation (report section "benchmark")
    benchmark: Optional[BenchmarkOptions] = None
    #: gates such as "cosine<0.999" (fail when true); a failed gate raises GatesFailed, nothing written
    fail_if: Sequence[str] = ()
    max_accuracy_drop: Optional[float] = None
    #: labels for top-1 accuracy: "FILE.npz" or "FILE.npz:KEY"; inputs come from inputs_file (or this file)
    labels: Optional[str] = None
    labels_output: Optional[str] = None


@dataclass
class Outcome:
    model: Optional[onnx.ModelProto]
    report: Report
    output_path: Optional[Path]


def default_output_path(source: Path) -> Path:
    name = source.name[:-5] if source.name.endswith(".onnx") else source.name
    return source.with_name(name + ".opt.onnx")


def run(source: str | os.PathLike | onnx.ModelProto, output: str | os.PathLike | None = None,
        options: Optional[OptimizeOptions] = None, keep_model: bool = True) -> Outcome:
    """Optimize `source`, validate the result, and write it to `output` (if given) atomically.

    Raises OptimizeError for bad input (nothing written), ValidationFailed when outputs differ and
    GatesFailed when a gate fails (nothing written unless `force`). With keep_model=False no
    complete in-memory copy of the optimized model is ever built: weights are streamed to disk.
    """
    opts = options or OptimizeOptions()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="onnxslim-opt-") as scratch:
        model, source_path, file_bytes, label = _load_source(source, Path(scratch))
        if output is not None and not isinstance(source, onnx.ModelProto) and Path(output).exists():
            if Path(output).resolve() == source_path.resolve() and not opts.overwrite:
                raise OptimizeError(f"refusing to overwrite the input {source_path}; pass --overwrite to allow it")
        report = Report(input=label, output=str(output) if output is not None else None)
        plan = _plan_run(opts, model, report)  # every check of the user's input, before any work
        report.before = ModelSummary.of_model(model, file_bytes)
        timings["load"] = time.perf_counter() - t0

        t = time.perf_counter()
        optimized, staging = _optimize(opts, model, source_path, plan, report, keep_model)
        timings["optimize"] = time.perf_counter() - t

        destination = Path(output) if output is not None else Path(scratch) / "optimized.onnx"
        t = time.perf_counter()
        with StagedModel(destination, **staging) as staged:
            del staging
            _check_staged(staged.path)
            report.after.file_bytes = staged.size()
            timings["write"] = time.perf_counter() - t
            try:
                _evaluate(opts, model, source_path, staged.path, plan, report, timings)
            finally:
                _finish_timings(report, timings, t0)
            if report.gates and not report.gates["passed"] and not opts.force:
                failed = [c["gate"] + f" ({c['message']})" for c in report.gates["checks"] if not c["passed"]]
                raise GatesFailed(f"gate(s) failed, nothing written: {'; '.join(failed)}", report)
            if output is not None:
                staged.commit()
                report.written = True
        return Outcome(optimized, report, Path(output) if output is not None else None)


@dataclass
class _Plan:
    """What a run will do, settled from the options and the model before any work."""

    passes: list
    lossy: list[str]
    shapes: dict
    specs: list
    samples: Optional[list]
    gates: list
    labels: Any
    inputs_file: Optional[str]


def _plan_run(opts: OptimizeOptions, model: onnx.ModelProto, report: Report) -> _Plan:
    shapes = opts.input_shapes if isinstance(opts.input_shapes, dict) else parse_input_shapes(opts.input_shapes)
    check_shape_names(model, shapes)
    passes = _build_passes(opts)
    gates = build_gates(opts.fail_if, opts.max_accuracy_drop)
    inputs_file = opts.inputs_file or opts.labels and _labels_file(opts.labels)
    labels = load_labels(opts.labels) if opts.labels else None
    if opts.max_accuracy_drop is not None and labels is None:
        raise OptimizeError("--max-accuracy-drop needs --labels FILE.npz (and --inputs, unless the labels "
                            "file also holds the input arrays)")
    lossy = [p.name for p in passes if not p.lossless]
    specs: list = []
    if opts.validate or lossy or opts.benchmark or labels is not None:
        specs, notes = resolve_input_specs(model, shapes)
        if not inputs_file:  # with --inputs (or a labels file holding inputs) the real batch is used
            report.notes.extend(notes)
    samples = None
    if opts.validate:
        samples = (load_inputs_file(inputs_file, specs) if inputs_file
                   else random_inputs(specs, opts.samples, opts.seed))
    listed_inits = {t.name for t in model.graph.initializer} & {i.name for i in model.graph.input}
    if listed_inits:
        report.notes.append(f"{len(listed_inits)} initializers were also listed as graph inputs (old IR); "
                            f"they are treated as constants and are no longer inputs")
    return _Plan(passes, lossy, shapes, specs, samples, gates, labels, inputs_file)


def _optimize(opts: OptimizeOptions, model: onnx.ModelProto, source_path: Path, plan: _Plan, report: Report,
              keep_model: bool) -> tuple[Optional[onnx.ModelProto], dict]:
    """Run the passes; return the optimized model (if kept) and what StagedModel writes."""
    ctx = PassContext(opset=default_opset(model) or 0, input_shapes=plan.shapes, fold_size_limit=opts.fold_size_limit,
                      debug=opts.debug, custom_op_libraries=tuple(opts.custom_op_libraries), original=model,
                      input_specs=plan.specs, calibration=opts.calibration, calibration_random=opts.calibration_random,
                      preprocess=opts.preprocess, seed=opts.seed)
    graph = import_graph(model)
    attach_file_backed_values(graph, source_path.parent)
    manager = PassManager(plan.passes, ctx, model, progress=opts.progress)
    graph = manager.run(graph)
    report.passes = [s.to_dict() for s in manager.stats.values()]
    report.simplify_rounds = manager.rounds
    for s in manager.stats.values():
        if s.errors:
            report.notes.append(f"pass {s.name} failed on this model and was rolled back: {s.errors[0]}")
    report.after = summarize_graph(graph)
    if keep_model:
        optimized = export_model(graph, model)
        return optimized, dict(model=optimized)
    skeleton, weights = export_skeleton(graph, model)
    return None, dict(skeleton=skeleton, weights=weights)


def _evaluate(opts: OptimizeOptions, model: onnx.ModelProto, source_path: Path, staged_path: Path, plan: _Plan,
              report: Report, timings: dict[str, float]) -> None:
    """Validation, accuracy, benchmark and gates on the staged file; fills the report."""
    t = time.perf_counter()
    if plan.samples is not None:
        result = validate(source_path, staged_path, plan.samples, opts.rtol, opts.atol, opts.custom_op_libraries,
                          lossy=bool(plan.lossy))
        if result.status == "unavailable":
            report.notes.append(f"outputs were NOT validated: {result.message}")
    else:
        result = ValidationResult("skipped", message="validation disabled (--no-validate)")
    report.validation = result.to_dict()
    timings["validate"] = time.perf_counter() - t
    report.metrics = metrics_of(report.to_dict())
    if result.status == "failed" and not opts.force:
        raise ValidationFailed(f"validation failed, nothing written: {result.message}", report)
    if plan.labels is not None:
        t = time.perf_counter()
        acc_samples = plan.samples if plan.samples is not None else load_inputs_file(plan.inputs_file, plan.specs)
        report.accuracy = accuracy(source_path, staged_path, acc_samples, plan.labels, opts.labels_output,
                                   opts.custom_op_libraries)
        timings["accuracy"] = time.perf_counter() - t
    if opts.benchmark:
        t = time.perf_counter()
        report.benchmark = benchmark(source_path, staged_path, plan.specs, opts.benchmark, original=model)
        timings["benchmark"] = time.perf_counter() - t
    report.metrics = metrics_of(report.to_dict())
    if plan.gates:
        report.gates = evaluate(plan.gates, report.metrics)


def _finish_timings(report: Report, timings: dict[str, float], t0: float) -> None:
    report.seconds = {k: round(v, 4) for k, v in timings.items()}
    report.seconds["total"] = round(time.perf_counter() - t0, 4)


def _labels_file(spec: str) -> Optional[str]:
    """A labels file that also holds the model's input arrays serves as --inputs."""
    from .gates import parse_labels

    return str(parse_labels(spec)[0])


def _load_source(source: str | os.PathLike | onnx.ModelProto, scratch: Path
                 ) -> tuple[onnx.ModelProto, Path, Optional[int], str]:
    """(model, a file holding it for ONNX Runtime, its size on disk, a label for the report)."""
    if isinstance(source, onnx.ModelProto):
        check_opset(source)
        path = scratch / "input.onnx"
        StagedModel(path, model=source).commit()
        return source, path, None, "<in-memory model>"
    path = Path(source)
    model, file_bytes = load_model_sized(path, lazy=True)
    return model, path, file_bytes, str(path)


def _build_passes(opts: OptimizeOptions) -> list:
    extra = {p.name: p for p in opts.extra_passes}
    try:
        passes = [cls.with_options(**opts.pass_options[cls.name]) if opts.pass_options.get(cls.name) else cls()
                  for cls in registry.select(opts.passes, opts.skip) if cls.name not in extra]
    except (TypeError, ValueError) as exc:  # a misspelt --pass-option: the user's error, not ours
        raise OptimizeError(str(exc)) from None
    passes += list(extra.values())
    passes.sort(key=lambda p: (STAGES.index(p.stage), p.order, p.name))
    for name in opts.pass_options:
        if name not in {p.name for p in passes}:
            raise OptimizeError(f"options given for pass {name!r}, which is not in this run")
    return passes


def summarize_graph(graph) -> ModelSummary:
    params, nbytes = weight_stats(graph)
    return ModelSummary(node_count(graph), dict(sorted(op_histogram(graph).items())), params, nbytes)


def _check_staged(path: Path) -> None:
    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:
        raise ValidationFailed(f"the optimized model fails onnx.checker, nothing written: {' '.join(str(exc).split())[:300]}")


def optimize(model: str | os.PathLike | onnx.ModelProto, output: str | os.PathLike | None = None,
             **options: Any) -> onnx.ModelProto:
    """Optimize a model (path or ModelProto) and return the optimized ModelProto.

    Keyword options are the fields of OptimizeOptions, e.g. `skip=["fuse_pad"]`,
    `input_shapes={"x": (1, 3, 224, 224)}`, `validate=False`. Raises ValidationFailed if the
    result does not match the original.
    """
    return run(model, output, OptimizeOptions(**options)).model
