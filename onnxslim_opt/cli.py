"""`optimize` command line: parses flags into OptimizeOptions and calls the API. Nothing more."""
from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

from . import __version__
from .api import OptimizeOptions, default_output_path, run
from .benchmark import BenchmarkOptions, parse_ints, parse_providers
from .config import config_defaults, config_path, read_toml
from .errors import OptimizeError, ValidationFailed
from .pass_api import Pass
from .registry import registry

log = logging.getLogger("onnxslim_opt")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="optimize",
        description="Optimize an ONNX model with lossless graph rewrites, validated with ONNX Runtime.",
    )
    p.add_argument("model", nargs="?", help="input .onnx file")
    p.add_argument("-o", "--output", help="output file (default: <name>.opt.onnx beside the input)")
    p.add_argument("--report", metavar="FILE", help="write the JSON report to FILE ('-' for stdout)")
    p.add_argument("--passes", help="comma-separated passes to run instead of the default pipeline")
    p.add_argument("--skip", default="", help="comma-separated passes to leave out")
    p.add_argument("--pass-option", action="append", default=[], metavar="PASS.KEY=VALUE",
                   help="set an option of a pass, e.g. fold_constants.size_limit=4096 (repeatable)")
    p.add_argument("--list-passes", action="store_true", help="list the registered passes and exit")
    p.add_argument("--input-shapes", nargs="+", metavar="NAME:D0,D1,...",
                   help="fix input shapes, e.g. input:1,3,224,224 (lets dynamic models fold further)")
    p.add_argument("--inputs", metavar="NPZ", help="validate on these inputs (.npz, one array per input name)")
    p.add_argument("--samples", type=int, default=3, help="random validation samples (default 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random validation inputs")
    p.add_argument("--rtol", type=float, default=1e-4, help="relative tolerance of validation (default 1e-4)")
    p.add_argument("--atol", type=float, default=1e-5, help="absolute tolerance of validation (default 1e-5)")
    p.add_argument("--no-validate", action="store_true", help="do not compare outputs with ONNX Runtime")
    p.add_argument("--force", action="store_true", help="write the output even if validation fails")
    p.add_argument("--overwrite", action="store_true", help="allow the output to replace the input file")
    p.add_argument("--fold-size-limit", type=_size, default=1 << 20, metavar="BYTES",
                   help="largest constant folding may create (default 1MB; accepts kB/MB suffixes)")
    p.add_argument("--custom-op-library", action="append", default=[], metavar="SO",
                   help="ONNX Runtime custom-op library used for validation (repeatable)")
    p.add_argument("--calibration", metavar="PATH",
                   help="calibration data for data-driven passes: .npz, a directory of .npy/.npz, or images")
    p.add_argument("--calibration-random", type=int, default=0, metavar="N",
                   help="calibrate on N random samples instead (the report says the ranges mean nothing)")
    p.add_argument("--preprocess", metavar="SPEC",
                   help='image preprocessing for --calibration images, e.g. "resize=224,mean=...,std=...,layout=NCHW"')
    p.add_argument("--debug", action="store_true", help="check the graph after every pass; show tracebacks")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    p.add_argument("--version", action="version", version=f"onnxslim-opt {__version__}")
    p.add_argument("--config", metavar="TOML", help="recipe file holding any of these options (long flag names "
                   "as keys); flags on the command line override it")
    _add_benchmark_arguments(p.add_argument_group("benchmark", "latency of the original and optimized model "
                                                  "on ONNX Runtime execution providers"))
    _add_gate_arguments(p.add_argument_group("gates", "fail the run (exit code 1, nothing written) when a "
                                             "figure of the report crosses a threshold"))
    for cls in registry.all():  # passes (plug-ins too) add their own flags, each in its own group
        if cls.add_arguments.__func__ is not Pass.add_arguments.__func__:
            cls.add_arguments(p.add_argument_group(f"pass {cls.name}", cls.description))
    return p


def _add_benchmark_arguments(g) -> None:
    g.add_argument("--benchmark", metavar="PROVIDERS", help="benchmark on these providers: cpu,cuda,tensorrt")
    g.add_argument("--batch", default="1", metavar="B1,B2", help="batch sizes for models with a dynamic batch dim (default 1)")
    g.add_argument("--runs", type=int, default=100, help="timed runs per model (default 100)")
    g.add_argument("--warmup", type=int, default=10, help="warm-up runs per model, not timed (default 10)")
    g.add_argument("--threads", default="0", metavar="T1,T2", help="intra-op threads (default 0: ORT's choice)")
    g.add_argument("--benchmark-copies", action="store_true",
                   help="CUDA/TensorRT: time host-device copies too (default: IO binding leaves them out)")
    g.add_argument("--trt-fp16", action="store_true", help="TensorRT: allow fp16 kernels")
    g.add_argument("--trt-int8", action="store_true", help="TensorRT: allow int8 (needs a Q/DQ model, e.g. --quantize int8)")
    g.add_argument("--trt-cache", metavar="DIR", help="TensorRT: engine and timing cache directory, reused between runs")
    g.add_argument("--trt-workspace", type=_size, metavar="BYTES", help="TensorRT: max workspace size (kB/MB/GB suffixes)")


def _add_gate_arguments(g) -> None:
    g.add_argument("--fail-if", action="append", default=[], metavar="EXPR",
                   help='fail when METRIC OP NUMBER holds, e.g. "cosine<0.999", "latency_ratio>1.0" (repeatable)')
    g.add_argument("--max-accuracy-drop", type=float, metavar="X",
                   help="fail when top-1 accuracy on --labels drops by more than X (a fraction, e.g. 0.01)")
    g.add_argument("--labels", metavar="NPZ[:KEY]", help="labels for accuracy (array 'label' by default); inputs "
                   "come from --inputs, or from this file when it holds the input arrays")
    g.add_argument("--labels-output", metavar="NAME", help="the [batch, classes] output scored against --labels")


def _benchmark_options(args) -> Optional[BenchmarkOptions]:
    if not args.benchmark:
        return None
    if args.runs < 1 or args.warmup < 1:
        raise OptimizeError("--runs and --warmup must be at least 1")
    return BenchmarkOptions(
        providers=parse_providers(args.benchmark), batches=parse_ints(args.batch, "--batch"), runs=args.runs,
        warmup=args.warmup, threads=parse_ints(args.threads, "--threads", minimum=0),
        include_copies=args.benchmark_copies, trt_fp16=args.trt_fp16, trt_int8=args.trt_int8,
        trt_cache=args.trt_cache, trt_workspace=args.trt_workspace, seed=args.seed,
        custom_op_libraries=args.custom_op_library)


def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """Flags over the --config recipe over the built-in defaults."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    recipe = config_path(argv)
    if recipe:
        parser.set_defaults(**config_defaults(parser, read_toml(recipe), recipe))
    return parser.parse_args(argv)


def _size(text: str) -> int:
    t = text.strip().lower().replace(" ", "")
    for suffix, mult in (("gb", 1 << 30), ("mb", 1 << 20), ("kb", 1 << 10), ("b", 1)):
        if t.endswith(suffix):
            return int(float(t[: -len(suffix)]) * mult)
    return int(t)


def _split(text: Optional[str]) -> list[str]:
    return [s.strip() for s in (text or "").split(",") if s.strip()]


def _parse_pass_options(items: Sequence[str]) -> dict[str, dict]:
    options: dict[str, dict] = {}
    for item in items:
        key, sep, value = item.partition("=")
        name, dot, field = key.partition(".")
        if not sep or not dot or not field:
            raise OptimizeError(f"bad --pass-option {item!r}; expected PASS.KEY=VALUE")
        options.setdefault(name, {})[field] = _literal(value)
    return options


def _literal(value: str):
    low = value.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def list_passes() -> str:
    lines = [f"{'pass':34}{'stage':10}{'lossless':10}description"]
    for cls in registry.all():
        default = "" if cls.default else " (not in the default pipeline)"
        lines.append(f"{cls.name:34}{cls.stage:10}{'yes' if cls.lossless else 'no':10}{cls.description}{default}")
    for name, err in registry.load_errors.items():
        lines.append(f"{name:34}{'-':10}{'-':10}failed to load: {err}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        args = _parse_args(argv)
    except OptimizeError as exc:
        print(f"optimize: error: {exc}", file=sys.stderr)
        return exc.exit_code
    logging.basicConfig(level=logging.DEBUG if args.debug else (logging.ERROR if args.quiet else logging.WARNING),
                        format="optimize: %(levelname)s: %(message)s", stream=sys.stderr)
    _quiet_graphsurgeon(args.debug)
    if args.list_passes:
        print(list_passes())
        return 0
    if not args.model:
        print("optimize: error: give a model file (see optimize --help)", file=sys.stderr)
        return 2
    report = None
    try:
        source = Path(args.model)
        output = Path(args.output) if args.output else default_output_path(source)
        options = OptimizeOptions(
            passes=_split(args.passes) or None, skip=_split(args.skip),
            pass_options=_parse_pass_options(args.pass_option),
            input_shapes=args.input_shapes, validate=not args.no_validate, inputs_file=args.inputs,
            samples=args.samples, seed=args.seed, rtol=args.rtol, atol=args.atol, force=args.force,
            overwrite=args.overwrite, debug=args.debug, fold_size_limit=args.fold_size_limit,
            custom_op_libraries=args.custom_op_library, progress=_progress_printer(args),
            extra_passes=[p for p in (cls.from_arguments(args) for cls in registry.all()) if p is not None],
            calibration=args.calibration, calibration_random=args.calibration_random, preprocess=args.preprocess,
            benchmark=_benchmark_options(args), fail_if=args.fail_if, max_accuracy_drop=args.max_accuracy_drop,
            labels=args.labels, labels_output=args.labels_output,
        )
        # libraries (onnx-graphsurgeon) print warnings to stdout; stdout is the report's when `--report -`
        with contextlib.redirect_stdout(sys.stderr):
            outcome = run(source, output, options, keep_model=False)
        report = outcome.report
        code = 1 if report.gates and not report.gates["passed"] else 0  # --force wrote it; the gate still fails
    except OptimizeError as exc:
        print(f"optimize: error: {exc}", file=sys.stderr)
        if args.debug:
            raise
        return exc.exit_code
    except ValidationFailed as exc:
        report = exc.report
        print(f"optimize: error: {exc}", file=sys.stderr)
        code = exc.exit_code
    except KeyboardInterrupt:
        print("optimize: interrupted, nothing written", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug of ours: one line, the traceback only with --debug
        if args.debug:
            raise
        print(f"optimize: internal error ({type(exc).__name__}: {' '.join(str(exc).split())[:300]}); "
              f"nothing written; rerun with --debug for the traceback", file=sys.stderr)
        return 3
    if report is not None:
        if not args.quiet:
            print(report.format_table(), file=sys.stderr)
            if report.written:
                print(f"wrote {report.output}", file=sys.stderr)
        if args.report:
            text = report.to_json()
            if args.report == "-":
                sys.stdout.write(text + "\n")
            else:
                try:
                    Path(args.report).write_text(text + "\n")
                except OSError as exc:
                    print(f"optimize: error: cannot write report {args.report}: {exc.strerror}", file=sys.stderr)
                    return 2
    return code


def _quiet_graphsurgeon(debug: bool) -> None:
    """onnx-graphsurgeon logs routine warnings (dtype guesses, missing `colored`) that say nothing
    to a user of this command; show them only with --debug. The CLI owns its process, so it may
    set the library's logger; the Python API leaves it alone."""
    from onnx_graphsurgeon.logger import G_LOGGER

    G_LOGGER.severity = G_LOGGER.WARNING if debug else G_LOGGER.CRITICAL


def _progress_printer(args):
    if args.quiet or not sys.stderr.isatty():
        return None

    def show(name: str) -> None:
        sys.stderr.write(f"\r\033[Krunning {name}")
        sys.stderr.flush()

    return show


if __name__ == "__main__":
    sys.exit(main())
