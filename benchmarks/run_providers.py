#!/usr/bin/env python3
"""Latency of optimized vs original models on ONNX Runtime execution providers, as one markdown
table per provider.

    python benchmarks/run_providers.py models/digits_cnn.onnx models/paddle_style_mlp.onnx \
        --providers cpu,cuda,tensorrt --batch 1,8 --runs 200 --out benchmarks/PROVIDERS.md

Each model is optimized with the default pipeline (`onnxslim_opt.run`, validated) and benchmarked
with `onnxslim_opt.benchmark` (interleaved runs in one process). CUDA and TensorRT are run only
where this onnxruntime offers them; elsewhere the table says why they were skipped.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import platform
import sys
import tempfile
from pathlib import Path

import onnxslim_opt
from onnxslim_opt.benchmark import PROVIDERS, BenchmarkOptions, parse_ints, parse_providers


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+", help=".onnx files")
    p.add_argument("--providers", default="cpu,cuda,tensorrt", help="cpu,cuda,tensorrt (missing ones are skipped)")
    p.add_argument("--batch", default="1", help="batch sizes, e.g. 1,8")
    p.add_argument("--threads", default="0", help="intra-op threads (0: ORT default)")
    p.add_argument("--runs", type=int, default=100)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--trt-fp16", action="store_true")
    p.add_argument("--trt-cache", help="TensorRT engine/timing cache directory")
    p.add_argument("--out", help="markdown file (default: stdout)")
    args = p.parse_args(argv)
    import onnxruntime as ort

    available = ort.get_available_providers()
    wanted = parse_providers(args.providers)
    providers = [n for n in wanted if PROVIDERS[n] in available]
    skipped = [n for n in wanted if n not in providers]
    opts = BenchmarkOptions(providers=providers, batches=parse_ints(args.batch, "--batch"), runs=args.runs,
                            warmup=args.warmup, threads=parse_ints(args.threads, "--threads", minimum=0),
                            trt_fp16=args.trt_fp16, trt_cache=args.trt_cache)
    rows: dict[str, list[str]] = {n: [] for n in providers}
    with tempfile.TemporaryDirectory(prefix="run-providers-") as scratch:
        for i, model in enumerate(args.models):
            print(f"[{i + 1}/{len(args.models)}] {model}", file=sys.stderr)
            out = Path(scratch) / f"{i}.opt.onnx"
            try:
                report = onnxslim_opt.run(model, out, onnxslim_opt.OptimizeOptions(benchmark=opts), keep_model=False).report
            except Exception as exc:  # one bad model must not end the table
                for n in providers:
                    rows[n].append(f"| {Path(model).name} | - | - | - | - | - | failed: {' '.join(str(exc).split())[:120]} |")
                continue
            _rows(Path(model).name, report.benchmark, rows)
    text = _markdown(rows, skipped, available, opts)
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def _rows(name: str, section: dict, rows: dict[str, list[str]]) -> None:
    for r in section["results"]:
        a, b, q = r["original"], r["optimized"], r["ratios"]
        rows[r["provider"]].append(
            f"| {name} | {r['batch'] or '-'} | {r['threads'] or 'default'} | {a['p50_ms']:.3f} | {b['p50_ms']:.3f} | "
            f"**{q['p50_ms']:.3f}** | mean {q['mean_ms']:.3f}, p90 {q['p90_ms']:.3f} |")
    for e in section["errors"]:
        if e["provider"] in rows:
            rows[e["provider"]].append(f"| {name} | {e.get('batch') or '-'} | - | - | - | - | error: {e['error'][:160]} |")


def _markdown(rows: dict[str, list[str]], skipped: list[str], available: list[str], opts: BenchmarkOptions) -> str:
    import onnxruntime as ort

    lines = ["# Latency ratios optimized/original by execution provider",
             "",
             f"{_dt.date.today().isoformat()}, {platform.machine()} {platform.system()}, Python "
             f"{platform.python_version()}, onnxruntime {ort.__version__} ({', '.join(available)}); "
             f"{opts.runs} interleaved runs after {opts.warmup} warm-up. Ratio < 1: the optimized model is faster.",
             ""]
    for n in skipped:
        lines.append(f"- {n}: skipped, {PROVIDERS[n]} is not available in this onnxruntime build")
    for n, body in rows.items():
        lines += ["", f"## {n} ({PROVIDERS[n]})", "",
                  "| model | batch | threads | original p50 ms | optimized p50 ms | p50 ratio | other ratios |",
                  "|---|---|---|---|---|---|---|", *body]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
