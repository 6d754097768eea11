#!/usr/bin/env python3
"""Side-by-side benchmark of lossless ONNX optimizers on the exported corpus.

    /work/venv-bench/bin/python benchmarks/run_lossless.py                       # whole corpus
    /work/venv-bench/bin/python benchmarks/run_lossless.py --models resnet18 --exporters torchscript,bn

For every corpus model and every tool, a fresh subprocess optimizes the model file to a new file
and reports the wall time of that call (load + optimize + save), the peak RSS of the process, and
the node count and size of the result. A second subprocess per model then checks each result
against the original (ONNX Runtime CPU, graph optimizations disabled, seeded random inputs) and
measures latency (ORT default optimizations, 1 intra-op thread, all files of that model run
round-robin in one process, median of --runs). A tool that fails, crashes or times out gets an
error cell; one that is not installed gets "missing". See benchmarks/README.md for the columns.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import io
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WORK = HERE / "work"

OURS = "onnxslim-opt"
OURS_VAL = "onnxslim-opt+val"
#: tool name -> (module that must import, distribution whose version is shown)
TOOLS: dict[str, tuple[str, str]] = {
    OURS: ("onnxslim_opt", "onnxslim-opt"),
    "onnxslim": ("onnxslim", "onnxslim"),
    "onnxsim": ("onnxsim", "onnxsim"),
    "onnxoptimizer": ("onnxoptimizer", "onnxoptimizer"),
    "polygraphy": ("polygraphy", "polygraphy"),
    "ort-basic": ("onnxruntime", "onnxruntime"),
    OURS_VAL: ("onnxslim_opt", "onnxslim-opt"),
}
#: tools shown in the result-quality tables (nodes, size, match, latency); OURS_VAL only adds time/RSS
QUALITY_TOOLS = [t for t in TOOLS if t != OURS_VAL]
VERSION_PACKAGES = ["onnxslim-opt", "onnx", "onnxruntime", "onnx-graphsurgeon", "onnxslim", "onnxsim",
                    "onnxoptimizer", "polygraphy", "onnxscript", "torch", "torchvision", "numpy", "psutil"]
BIG_MODEL_BYTES = 100 * 10**6


# =============================================================================== shared helpers
def one_line(text: Any, limit: int = 300) -> str:
    return " ".join(str(text).split())[:limit]


def count_nodes(graph) -> int:
    """Nodes of a graph, subgraphs (If/Loop/Scan bodies) included."""
    import onnx

    total = 0
    for node in graph.node:
        total += 1
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                total += count_nodes(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                total += sum(count_nodes(g) for g in a.graphs)
    return total


def dir_bytes(path: Path) -> int:
    """Size of a result: the .onnx file plus any external-data files written beside it."""
    return sum(f.stat().st_size for f in path.parent.iterdir() if f.is_file())


def file_facts(path: Path) -> dict:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    opset = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), None)
    return {"nodes": count_nodes(m.graph), "opset": opset}


class Tee(io.TextIOBase):
    """Writes through to a stream and keeps a copy, so a tool's own error line can be reported."""

    def __init__(self, stream):
        self.stream, self.buffer_ = stream, io.StringIO()

    def write(self, s):
        self.buffer_.write(s)
        try:
            return self.stream.write(s)
        except Exception:
            return len(s)

    def flush(self):
        self.stream.flush()

    def isatty(self):
        return False


def error_line(text: str, prefer: tuple[str, ...] = ()) -> str:
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    for pref in prefer:
        hits = [l for l in lines if l.startswith(pref)]
        if hits:
            return one_line(hits[-1])
    hits = [l for l in lines if "error" in l.lower() or "exception" in l.lower()]
    return one_line(hits[-1] if hits else (lines[-1] if lines else "no output"))


# =============================================================================== worker: optimize
class _HideTorch:
    """Meta-path finder that makes `import torch` fail, as in a deployment venv without PyTorch.

    onnxsim and polygraphy import torch when it is installed (~700 MB RSS and seconds of import);
    the benchmark venv has it only to export the corpus. --with-torch turns this off.
    """

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision"):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by the benchmark)", name=name)
        return None


def _run_tool(tool: str, src: str, dst: str, report: str) -> Optional[str]:
    """Runs the tool file-to-file. Returns an error line, or None on success."""
    if tool in (OURS, OURS_VAL):
        from onnxslim_opt import cli

        args = [src, "-o", dst, "-q", "--report", report]
        if tool == OURS:
            args.append("--no-validate")
        err = Tee(sys.stderr)
        saved, sys.stderr = sys.stderr, err
        try:
            code = cli.main(args)
        finally:
            sys.stderr = saved
        if code != 0:
            return error_line(err.buffer_.getvalue(), ("optimize: error", "optimize: internal error", "optimize:")) \
                + f" (exit {code})"
        return None
    if tool == "onnxslim":
        import onnxslim

        onnxslim.slim(src, dst)
        return None
    if tool == "onnxsim":
        import onnx
        import onnxsim

        model, _ = onnxsim.simplify(onnx.load(src))
        onnx.save(model, dst)
        return None
    if tool == "onnxoptimizer":
        import onnx
        import onnxoptimizer

        onnx.save(onnxoptimizer.optimize(onnx.load(src)), dst)  # default: fuse-and-elimination passes
        return None
    if tool == "polygraphy":
        from polygraphy.tools import main as polygraphy_main

        out = Tee(sys.stdout)
        saved_argv, saved_out, sys.stdout = sys.argv, sys.stdout, out
        sys.argv = ["polygraphy", "surgeon", "sanitize", src, "--fold-constants", "-o", dst]
        try:
            code = polygraphy_main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        finally:
            sys.argv, sys.stdout = saved_argv, saved_out
        if code:
            return error_line(out.buffer_.getvalue(), ("[E]",)) + f" (exit {code})"
        return None
    if tool == "ort-basic":
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.optimized_model_filepath = dst
        so.log_severity_level = 3
        ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
        return None
    raise ValueError(f"unknown tool {tool}")


def optimize_worker(tool: str, src: str, dst: str, result_path: str) -> int:
    import resource

    res: dict[str, Any] = {"tool": tool}
    if os.environ.get("BENCH_HIDE_TORCH") == "1":
        sys.meta_path.insert(0, _HideTorch())
    t = time.perf_counter()
    module = TOOLS[tool][0]
    __import__(module)  # top-level import outside the timed region; lazy imports inside stay timed
    if tool in (OURS, OURS_VAL):
        import onnxslim_opt.cli  # noqa: F401
    res["import_s"] = round(time.perf_counter() - t, 3)
    res["rss_after_import_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    report = str(Path(dst).with_suffix(".report.json"))
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    try:
        err = _run_tool(tool, src, dst, report)
    except BaseException as exc:  # noqa: BLE001 - any failure of the tool is a result, not a crash
        err = f"{type(exc).__name__}: {one_line(exc)}"
    res["seconds"] = round(time.perf_counter() - t, 4)
    peak_kb = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    res["peak_rss_mb"] = round(peak_kb / 1024, 1)
    if err is None and not Path(dst).exists():
        err = "the tool reported success but wrote no file"
    if Path(report).exists():
        try:
            rep = json.loads(Path(report).read_text())
            res["ours_seconds"] = rep.get("seconds")
            res["ours_validation"] = (rep.get("validation") or {}).get("status")
            res["ours_notes"] = rep.get("notes")
        except Exception:
            pass
        Path(report).unlink(missing_ok=True)
    if err is None:
        try:
            res.update(file_facts(Path(dst)))
            res["bytes"] = dir_bytes(Path(dst))
            res["status"] = "ok"
        except Exception as exc:
            res.update(status="error", error=f"result unreadable: {type(exc).__name__}: {one_line(exc)}")
    else:
        res.update(status="error", error=err)
    Path(result_path).write_text(json.dumps(res))
    return 0


# =============================================================================== worker: evaluate
def _inputs(session, samples: int, seed: int) -> list[dict]:
    import numpy as np

    type_map = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
                "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_,
                "tensor(uint8)": np.uint8, "tensor(int8)": np.int8}
    feeds = []
    for i in range(samples):
        rng = np.random.default_rng(seed + i)
        feed = {}
        for inp in session.get_inputs():
            shape = [d if isinstance(d, int) and d > 0 else 1 for d in inp.shape]
            dtype = type_map.get(inp.type, np.float32)
            if np.issubdtype(dtype, np.floating):
                feed[inp.name] = rng.standard_normal(shape).astype(dtype)
            elif dtype == np.bool_:
                feed[inp.name] = rng.integers(0, 2, shape).astype(np.bool_)
            else:
                feed[inp.name] = rng.integers(0, 8, shape).astype(dtype)
        feeds.append(feed)
    return feeds


def _session(path: str, level: str, threads: int = 0):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if level == "off":
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def _remap(feed: dict, session) -> dict:
    names = [i.name for i in session.get_inputs()]
    if set(names) == set(feed):
        return feed
    return dict(zip(names, feed.values()))  # renamed inputs: match by position


def _compare(ref_names, refs, names, outs, rtol, atol) -> tuple[bool, float, str]:
    import numpy as np

    if len(names) != len(ref_names):
        return False, float("inf"), f"{len(names)} outputs instead of {len(ref_names)}"
    order = [names.index(n) for n in ref_names] if set(names) == set(ref_names) else list(range(len(names)))
    ok, worst, why, bad, total, scale = True, 0.0, "", 0, 0, 0.0
    for ref_run, run in zip(refs, outs):
        for j, k in enumerate(order):
            r, g = np.asarray(ref_run[j]), np.asarray(run[k])
            if r.shape != g.shape:
                return False, float("inf"), f"output {ref_names[j]!r} shape {g.shape} instead of {r.shape}"
            if r.dtype.kind in "biu":
                d = float(np.max(np.abs(r.astype(np.int64) - g.astype(np.int64)))) if r.size else 0.0
                good = d == 0
            else:
                r64, g64 = r.astype(np.float64), g.astype(np.float64)
                same = (np.isnan(r64) & np.isnan(g64)) | (r64 == g64)
                diff = np.where(same, 0.0, np.abs(r64 - g64))
                diff = np.nan_to_num(diff, nan=np.inf)
                d = float(diff.max()) if diff.size else 0.0
                over = diff > atol + rtol * np.abs(np.nan_to_num(r64))
                good = not bool(over.any())
                if not good:
                    bad, total = bad + int(over.sum()), total + over.size
                    scale = max(scale, float(np.max(np.abs(np.nan_to_num(r64)))))
            worst = max(worst, d)
            if not good and ok:
                ok, why = False, f"output {ref_names[j]!r} differs"
    if not ok:
        why += f": {bad} of {total} values beyond tolerance, max abs diff {worst:.2g}"
        if scale:
            why += f" = {worst / scale:.2g} of the output's max |value| {scale:.3g}"
    return ok, worst, why


def evaluate_worker(spec_path: str, result_path: str) -> int:
    import numpy as np

    spec = json.loads(Path(spec_path).read_text())
    out: dict[str, Any] = {"candidates": {}}

    def save():
        Path(result_path).write_text(json.dumps(out))

    t = time.perf_counter()
    out["original"] = file_facts(Path(spec["original"]))
    try:
        ref = _session(spec["original"], "off")
        feeds = _inputs(ref, spec["samples"], spec["seed"])
        ref_names = [o.name for o in ref.get_outputs()]
        refs = [ref.run(None, f) for f in feeds]
        del ref
        scales = [float(np.max(np.abs(np.asarray(o, dtype=np.float64)))) for run in refs for o in run
                  if np.asarray(o).dtype.kind == "f" and np.asarray(o).size]
        out["ref_max_abs"] = max(scales) if scales else None
    except Exception as exc:
        why = f"ORT cannot run the original: {type(exc).__name__}: {one_line(exc, 200)}"
        out["original_error"] = why
        for tool in spec["candidates"]:
            out["candidates"][tool] = {"match": None, "eval_error": why}
        save()
        return 0
    save()
    for tool, path in spec["candidates"].items():
        c: dict[str, Any] = {}
        out["candidates"][tool] = c
        try:
            s = _session(path, "off")
            names = [o.name for o in s.get_outputs()]
            outs = [s.run(None, _remap(f, s)) for f in feeds]
            del s
            c["match"], c["max_abs_diff"], why = _compare(ref_names, refs, names, outs, spec["rtol"], spec["atol"])
            if why:
                c["mismatch"] = why
        except Exception as exc:
            c["match"], c["eval_error"] = None, f"ORT cannot run it: {type(exc).__name__}: {one_line(exc, 200)}"
        save()
    out["check_s"] = round(time.perf_counter() - t, 2)

    # Latency: ORT default optimizations, one intra-op thread, round-robin over all files.
    t = time.perf_counter()
    sessions = {}
    for key, path in [("original", spec["original"])] + list(spec["candidates"].items()):
        if key != "original" and out["candidates"][key].get("eval_error"):
            continue
        try:
            sessions[key] = _session(path, "default", threads=1)
        except Exception as exc:
            if key == "original":
                out["latency_error"] = one_line(exc, 200)
                save()
                return 0
            out["candidates"][key]["eval_error"] = f"ORT (optimized) cannot load it: {one_line(exc, 200)}"
    feed = feeds[0]
    samples: dict[str, list[float]] = {k: [] for k in sessions}
    keys = list(sessions)
    try:
        for k in keys:
            f = _remap(feed, sessions[k])
            for _ in range(spec["warmup"]):
                sessions[k].run(None, f)
        est = []
        for k in keys:
            f = _remap(feed, sessions[k])
            t0 = time.perf_counter()
            sessions[k].run(None, f)
            est.append(time.perf_counter() - t0)
        runs = spec["runs"]
        if spec.get("min_time") and est:
            runs = max(runs, min(10 * runs, int(spec["min_time"] / max(min(est), 1e-4)) + 1))
        out["latency_runs"] = runs
        for r in range(runs):
            order = keys[r % len(keys):] + keys[:r % len(keys)]
            for k in order:
                f = _remap(feed, sessions[k])
                t0 = time.perf_counter()
                sessions[k].run(None, f)
                samples[k].append(time.perf_counter() - t0)
    except Exception as exc:
        out["latency_error"] = one_line(exc, 200)
    if samples.get("original"):
        base = statistics.median(samples["original"])
        out["original_latency_ms"] = round(base * 1000, 3)
        for k in keys:
            if k != "original" and samples[k]:
                med = statistics.median(samples[k])
                out["candidates"][k]["latency_ms"] = round(med * 1000, 3)
                out["candidates"][k]["latency_ratio"] = round(med / base, 4)
    out["latency_s"] = round(time.perf_counter() - t, 2)
    save()
    return 0


# =============================================================================== worker: versions
def versions_worker(result_path: str) -> int:
    import importlib
    import importlib.metadata as md

    info: dict[str, Any] = {"versions": {}, "available": {}}
    for dist in VERSION_PACKAGES:
        try:
            info["versions"][dist] = md.version(dist)
        except md.PackageNotFoundError:
            info["versions"][dist] = None
    for tool, (module, _) in TOOLS.items():
        try:
            importlib.import_module(module)
            info["available"][tool] = None
        except Exception as exc:
            info["available"][tool] = f"{type(exc).__name__}: {one_line(exc, 150)}"
    try:
        from onnxslim_opt.registry import registry

        info["ours_passes"] = registry.names()
        info["ours_pass_errors"] = dict(registry.load_errors)
    except Exception as exc:
        info["ours_passes"], info["ours_pass_errors"] = [], {"registry": one_line(exc)}
    Path(result_path).write_text(json.dumps(info))
    return 0


# =============================================================================== driver
def run_child(cmd: list[str], timeout: float, log: Path, extra_env: Optional[dict] = None) -> tuple[Optional[int], float, str]:
    """Runs a worker in its own process group. Returns (exit code or None on timeout, seconds, log text)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1", **(extra_env or {})})
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
            code = None
    return code, time.perf_counter() - t, log.read_text(errors="replace")


def describe_death(code: Optional[int], text: str, timeout: float) -> str:
    if code is None:
        return f"timeout after {timeout:.0f} s"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"crashed ({name}{', out of memory?' if name == 'SIGKILL' else ''}): {error_line(text)}"
    return f"worker failed (exit {code}): {error_line(text)}"


def optimize_one(tool: str, src: Path, out_dir: Path, timeout: float, logs: Path, key: str, hide_torch: bool) -> dict:
    dst = out_dir / tool / "model.onnx"
    if dst.parent.exists():
        shutil.rmtree(dst.parent)
    dst.parent.mkdir(parents=True)
    result_path = out_dir / f"{tool}.result.json"
    result_path.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--_optimize", tool, str(src), str(dst), str(result_path)]
    code, wall, text = run_child(cmd, timeout, logs / f"{key}__{tool}.log", {"BENCH_HIDE_TORCH": "1" if hide_torch else "0"})
    if result_path.exists():
        res = json.loads(result_path.read_text())
        result_path.unlink()
    else:
        res = {"tool": tool, "status": "timeout" if code is None else "error",
               "error": describe_death(code, text, timeout)}
    res["process_wall_s"] = round(wall, 3)
    res["output"] = str(dst) if res.get("status") == "ok" else None
    return res


def evaluate(src: Path, candidates: dict[str, str], args, logs: Path, key: str, scratch: Path) -> dict:
    """One process for all results of a model; if it dies, each candidate is retried alone."""
    def attempt(cands: dict[str, str], tag: str) -> tuple[dict, Optional[str]]:
        spec = {"original": str(src), "candidates": cands, "samples": args.samples, "seed": args.seed,
                "rtol": args.rtol, "atol": args.atol, "runs": args.runs, "warmup": args.warmup, "min_time": args.min_time}
        spec_path, result_path = scratch / f"eval{tag}.spec.json", scratch / f"eval{tag}.result.json"
        spec_path.write_text(json.dumps(spec))
        result_path.unlink(missing_ok=True)
        code, _, text = run_child([sys.executable, __file__, "--_evaluate", str(spec_path), str(result_path)],
                                  args.eval_timeout, logs / f"{key}__eval{tag}.log")
        res = json.loads(result_path.read_text()) if result_path.exists() else {"candidates": {}}
        failure = None if code == 0 else describe_death(code, text, args.eval_timeout)
        return res, failure

    res, failure = attempt(candidates, "")
    if failure:
        res["eval_failure"] = failure
        done = res.setdefault("candidates", {})
        for tool, path in candidates.items():
            if "latency_ratio" in done.get(tool, {}) or done.get(tool, {}).get("eval_error"):
                continue
            alone, why = attempt({tool: path}, f"-{tool}")
            c = alone.get("candidates", {}).get(tool, {})
            if why and not c.get("eval_error"):
                c["eval_error"] = f"evaluation {why}"
            done[tool] = {**done.get(tool, {}), **c}
            for k in ("original", "original_latency_ms"):
                if k in alone and k not in res:
                    res[k] = alone[k]
    return res


def corpus_entries(corpus: Path, models: Optional[set], exporters: Optional[set]) -> tuple[list[dict], list[dict]]:
    manifest_path = corpus / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    entries, skipped = [], []
    for path in sorted(corpus.glob("*.onnx")):
        key = path.stem
        model, _, exporter = key.partition("__")
        if key not in manifest:
            manifest[key] = {"model": model, "exporter": exporter or "-", "status": "ok", "file": path.name}
    for key, info in sorted(manifest.items()):
        if models and info.get("model") not in models:
            continue
        if exporters and info.get("exporter") not in exporters:
            continue
        if info.get("status") != "ok" or not (corpus / info["file"]).exists():
            skipped.append({"key": key, "reason": info.get("reason", "file missing")})
            continue
        entries.append({"key": key, "path": corpus / info["file"], **info})
    return entries, skipped


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default=str(WORK / "corpus"), help="folder of .onnx files (export_corpus.py output)")
    p.add_argument("--models", help="comma-separated model names (default: all in the corpus)")
    p.add_argument("--exporters", help="comma-separated exporters: torchscript, dynamo, bn (default: all)")
    p.add_argument("--tools", default=",".join(TOOLS), help="comma-separated tools (default: all): " + ", ".join(TOOLS))
    p.add_argument("--timeout", type=float, default=600, help="seconds per optimization run (default 600)")
    p.add_argument("--eval-timeout", type=float, default=1200, help="seconds per model's evaluation (default 1200)")
    p.add_argument("--runs", type=int, default=20, help="timed latency runs per file (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed latency runs per file (default 3)")
    p.add_argument("--samples", type=int, default=3, help="random inputs for the output check (default 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rtol", type=float, default=1e-4)
    p.add_argument("--atol", type=float, default=1e-5)
    p.add_argument("--out", default=str(HERE / "RESULTS.md"), help="markdown output (default benchmarks/RESULTS.md)")
    p.add_argument("--work", default=str(WORK / "runs"), help="scratch folder for results and logs")
    p.add_argument("--with-torch", action="store_true",
                   help="let optimizers import torch (default: hidden from them, as in a venv without PyTorch)")
    p.add_argument("--min-time", type=float, default=2.0,
                   help="fast models get more latency runs: at least this many seconds per file (default 2, max 10x --runs)")
    p.add_argument("--keep-outputs", action="store_true", help="keep optimized files (default: deleted per model)")
    p.add_argument("--reuse", action="store_true", help="reuse a model's stored results if all requested tools are in them")
    p.add_argument("--_optimize", nargs=4, help=argparse.SUPPRESS)
    p.add_argument("--_evaluate", nargs=2, help=argparse.SUPPRESS)
    p.add_argument("--_versions", nargs=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._optimize:
        return optimize_worker(*args._optimize)
    if args._evaluate:
        return evaluate_worker(*args._evaluate)
    if args._versions:
        return versions_worker(*args._versions)

    split = lambda s: [x.strip() for x in (s or "").split(",") if x.strip()]  # noqa: E731
    tools = split(args.tools)
    for t in tools:
        if t not in TOOLS:
            p.error(f"unknown tool {t!r}; choose from {', '.join(TOOLS)}")
    work = Path(args.work)
    logs, results_dir = work / "logs", work / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    entries, skipped = corpus_entries(Path(args.corpus), set(split(args.models)) or None,
                                      set(split(args.exporters)) or None)
    if not entries:
        print(f"run_lossless: no corpus models match in {args.corpus}; run benchmarks/export_corpus.py first",
              file=sys.stderr)
        return 2

    started = _dt.datetime.now(_dt.timezone.utc)
    load_start = os.getloadavg()
    git_at_start = git_state()
    vpath = work / "versions.json"
    run_child([sys.executable, __file__, "--_versions", str(vpath)], 300, logs / "versions.log")
    env = json.loads(vpath.read_text()) if vpath.exists() else {"versions": {}, "available": {}}
    missing = {t: env["available"].get(t, "import check failed") for t in tools if env["available"].get(t, "x")}
    for t, why in missing.items():
        print(f"run_lossless: {t} is missing ({why})", file=sys.stderr)

    all_results = []
    t_all = time.perf_counter()
    for i, entry in enumerate(entries, 1):
        key, src = entry["key"], entry["path"]
        stored = results_dir / f"{key}.json"
        if args.reuse and stored.exists():
            old = json.loads(stored.read_text())
            if all(t in old["tools"] for t in tools) and old.get("src_mtime") == src.stat().st_mtime:
                print(f"[{i}/{len(entries)}] {key}: reused stored results")
                all_results.append(old)
                continue
        print(f"[{i}/{len(entries)}] {key} ({src.stat().st_size / 1e6:.1f} MB)", flush=True)
        out_dir = work / "out" / key
        rec: dict[str, Any] = {"key": key, "model": entry.get("model"), "exporter": entry.get("exporter"),
                               "src_bytes": src.stat().st_size, "src_mtime": src.stat().st_mtime, "tools": {}}
        for tool in tools:
            if tool in missing:
                rec["tools"][tool] = {"status": "missing", "error": missing[tool]}
                continue
            r = optimize_one(tool, src, out_dir, args.timeout, logs, key, not args.with_torch)
            rec["tools"][tool] = r
            shown = (f"{r['nodes']} nodes, {r['seconds']:.2f} s, {r['peak_rss_mb']:.0f} MB RSS" if r["status"] == "ok"
                     else f"{r['status'].upper()}: {r.get('error')}")
            print(f"    {tool:18} {shown}", flush=True)
        candidates = {t: r["output"] for t, r in rec["tools"].items()
                      if t in QUALITY_TOOLS and r.get("status") == "ok"}
        ev = evaluate(src, candidates, args, logs, key, out_dir)
        rec["eval"] = ev
        rec["original"] = ev.get("original") or {}
        rec["original_latency_ms"] = ev.get("original_latency_ms")
        rec["ref_max_abs"] = ev.get("ref_max_abs")
        for t, c in ev.get("candidates", {}).items():
            rec["tools"][t].update(c)
        verdicts = ", ".join(f"{t}={'ok' if c.get('match') else ('ERR' if c.get('match') is None else 'MISMATCH')}"
                             f"/{c.get('latency_ratio', '-')}" for t, c in ev.get("candidates", {}).items())
        print(f"    check/latency: {verdicts}", flush=True)
        if not args.keep_outputs:
            shutil.rmtree(out_dir, ignore_errors=True)
        stored.write_text(json.dumps(rec, indent=1))
        all_results.append(rec)

    meta = {
        "git": git_at_start,
        "command": "python " + shlex.join([os.path.relpath(__file__, REPO)] + (sys.argv[1:] if argv is None else list(argv))),
        "started": started, "elapsed_s": time.perf_counter() - t_all, "load_start": load_start,
        "load_end": os.getloadavg(), "env": env, "tools": tools, "missing": missing, "skipped": skipped,
        "args": args,
    }
    text = render(all_results, meta)
    print()
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(f"\nwrote {args.out}", file=sys.stderr)
    return 0


# =============================================================================== report
def git_state() -> str:
    """Commit of the repo the optimizer is installed from, and whether its code had local edits."""
    try:
        head = subprocess.run(["git", "-C", str(REPO), "log", "-1", "--format=%h %cI"], capture_output=True,
                              text=True, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "onnxslim_opt", "passes",
                                "pyproject.toml"], capture_output=True, text=True, timeout=30).stdout.strip()
    except Exception as exc:
        return f"unknown ({one_line(exc, 80)})"
    if not head:
        return "unknown (not a git checkout)"
    return f"commit {head}" + (f", with uncommitted changes in {len(dirty.splitlines())} file(s)" if dirty else "")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _mem_gib() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return f"{int(line.split()[1]) / 2**20:.0f} GiB"
    except OSError:
        pass
    return "?"


class Notes:
    """Numbered footnotes for error cells, so the tables stay narrow."""

    def __init__(self):
        self.items: list[str] = []
        self.index: dict[str, int] = {}

    def ref(self, text: str) -> int:
        if text not in self.index:
            self.items.append(text)
            self.index[text] = len(self.items)
        return self.index[text]


def _fmt_mb(b: Optional[float]) -> str:
    return "-" if b is None else f"{b / 1e6:.1f}"


def _cell_error(r: dict, notes: Notes, key: str, tool: str) -> Optional[str]:
    status = r.get("status")
    if status == "ok":
        return None
    if status == "missing":
        return "missing"
    n = notes.ref(f"{tool} on {key}: {r.get('error')}")
    return f"timeout [{n}]" if status == "timeout" else f"error [{n}]"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths)) + "|"
    return "\n".join([line(header), sep] + [line(r) for r in rows])


def _median(xs: list[float]) -> Optional[float]:
    return statistics.median(xs) if xs else None


def render(results: list[dict], meta: dict) -> str:
    args, env = meta["args"], meta["env"]
    tools = meta["tools"]
    qtools = [t for t in tools if t in QUALITY_TOOLS]
    notes = Notes()
    v = env.get("versions", {})
    out: list[str] = []
    out.append("# Lossless optimizers, side by side")
    out.append("")
    out.append(f"- Command: `{meta['command']}`")
    out.append(f"- Date: {meta['started']:%Y-%m-%d %H:%M} UTC; run took {meta['elapsed_s'] / 60:.1f} min")
    out.append(f"- Machine: {os.cpu_count()} cores ({_cpu_model()}), {_mem_gib()} RAM, Python "
               f"{platform.python_version()}, load average {meta['load_start'][0]:.2f} at start / "
               f"{meta['load_end'][0]:.2f} at end (shared machine: read times as ratios)")
    out.append("- Versions: " + ", ".join(f"{k} {v[k] or 'MISSING'}" for k in VERSION_PACKAGES if k in v))
    out.append(f"- onnxslim-opt source: {meta.get('git', 'unknown')}")
    passes = env.get("ours_passes") or []
    out.append(f"- onnxslim-opt passes registered ({len(passes)}): {', '.join(passes) or 'none'}")
    if env.get("ours_pass_errors"):
        out.append(f"- onnxslim-opt passes that failed to load ({len(env['ours_pass_errors'])}): "
                   + ", ".join(sorted(env["ours_pass_errors"])))
    out.append(f"- Output check: ORT CPU, graph optimizations off, {args.samples} seeded random inputs, "
               f"rtol {args.rtol:g}, atol {args.atol:g}. Latency: ORT default optimizations, 1 intra-op thread, "
               f"all files of a model round-robin in one process, median of {args.runs} runs (more for fast models: "
               f"at least {args.min_time:g} s per file, up to {10 * args.runs}) after {args.warmup} warm-up.")
    out.append("- torch is " + ("importable by" if args.with_torch else "hidden from") + " the optimizer processes"
               + ("" if args.with_torch else " (a deployment venv without PyTorch; onnxsim and polygraphy import "
                  "it when present, ~700 MB RSS and seconds of start-up; --with-torch measures that)") + ".")
    for t, why in meta["missing"].items():
        out.append(f"- **{t} missing**: {why}")
    out.append("")
    out.append("Each optimizer runs file to file in a fresh process; time is that call (load + optimize + save, "
               "imports excluded), RSS is the process peak (imports included). `onnxslim-opt` runs with "
               "`--no-validate`; `onnxslim-opt+val` is the same run with its own ONNX Runtime validation.")
    out.append("")


    def get(r, t):
        return r["tools"].get(t, {"status": "missing", "error": "not run"})

    # ---- nodes
    rows = []
    for r in results:
        row = [r["key"], str(r.get("original", {}).get("nodes", "-"))]
        vals = {t: get(r, t).get("nodes") for t in qtools if get(r, t).get("status") == "ok"}
        best = min(vals.values()) if vals else None
        for t in qtools:
            e = _cell_error(get(r, t), notes, r["key"], t)
            row.append(e or (f"**{vals[t]}**" if vals[t] == best else str(vals[t])))
        rows.append(row)
    out += ["## Node count (lowest in bold)", "", _table(["model", "original"] + qtools, rows), ""]

    # ---- size
    rows = []
    for r in results:
        row = [r["key"], _fmt_mb(r.get("src_bytes"))]
        for t in qtools:
            row.append(_cell_error(get(r, t), notes, r["key"], t) or _fmt_mb(get(r, t).get("bytes")))
        rows.append(row)
    out += ["## File size (MB)", "", _table(["model", "original"] + qtools, rows), ""]

    # ---- time
    rows = []
    for r in results:
        row = [r["key"]]
        for t in tools:
            g = get(r, t)
            row.append(_cell_error(g, notes, r["key"], t) or f"{g['seconds']:.2f}")
        rows.append(row)
    out += ["## Optimize time (s, wall, one cold run)", "", _table(["model"] + tools, rows), ""]

    # ---- RSS
    rows = []
    for r in results:
        row = [r["key"], _fmt_mb(r.get("src_bytes"))]
        for t in tools:
            g = get(r, t)
            row.append(_cell_error(g, notes, r["key"], t) or f"{g['peak_rss_mb']:.0f}")
        rows.append(row)
    out += ["## Peak RSS of the optimizing process (MB)", "", _table(["model", "file MB"] + tools, rows), ""]

    # ---- match
    rows = []
    for r in results:
        scale = r.get("ref_max_abs")
        row = [r["key"], "-" if scale is None else f"{scale:.1e}"]
        for t in qtools:
            g = get(r, t)
            e = _cell_error(g, notes, r["key"], t)
            if e:
                row.append(e)
            elif g.get("eval_error"):
                row.append(f"not run [{notes.ref(t + ' on ' + r['key'] + ': ' + g['eval_error'])}]")
            elif g.get("match") is None:
                row.append("?")
            else:
                d = g.get("max_abs_diff", float("nan"))
                cell = f"yes {d:.1e}" if g["match"] else f"**NO** {d:.1e}"
                if not g["match"] and g.get("mismatch"):
                    cell += f" [{notes.ref(t + ' on ' + r['key'] + ': ' + g['mismatch'])}]"
                row.append(cell)
        rows.append(row)
    out += ["## Outputs match the original (max abs diff; `output max` = largest |value| of the original's outputs)",
            "", _table(["model", "output max"] + qtools, rows), ""]

    # ---- latency
    rows = []
    for r in results:
        base = r.get("original_latency_ms")
        row = [r["key"], f"{base:.2f}" if base else "-"]
        for t in qtools:
            g = get(r, t)
            e = _cell_error(g, notes, r["key"], t)
            row.append(e or (f"{g['latency_ratio']:.3f}" if g.get("latency_ratio") else
                             (f"not run [{notes.ref(t + ' on ' + r['key'] + ': ' + g['eval_error'])}]"
                              if g.get("eval_error") else "-")))
        rows.append(row)
    out += ["## ORT latency relative to the original (lower is faster; original in ms)", "",
            _table(["model", "original ms"] + qtools, rows), ""]

    # ---- summary
    out += ["## Summary", ""]
    ref_tool = "onnxslim"
    parts = []
    for t in tools:
        ratios = [get(r, t)["seconds"] / get(r, ref_tool)["seconds"] for r in results
                  if get(r, t).get("status") == "ok" and get(r, ref_tool).get("status") == "ok"
                  and get(r, ref_tool)["seconds"] > 0]
        m = _median(ratios)
        parts.append(f"{t} {m:.2f}x (n={len(ratios)})" if m is not None else f"{t} -")
    out.append(f"- Median optimize-time ratio vs {ref_tool} (tool time / {ref_tool} time, per model): " + "; ".join(parts))
    rivals = [t for t in ("onnxslim", "onnxsim", "ort-basic") if t in tools]
    wins, total, losses = 0, 0, []
    for r in results:
        ours = get(r, OURS)
        best = [get(r, t)["nodes"] for t in rivals if get(r, t).get("status") == "ok"]
        if ours.get("status") != "ok" or not best:
            continue
        total += 1
        if ours["nodes"] <= min(best):
            wins += 1
        else:
            losses.append(f"{r['key']} ({ours['nodes']} vs {min(best)})")
    ours_failed = [r["key"] for r in results if get(r, OURS).get("status") not in ("ok", "missing")]
    line = (f"- {OURS} node count <= best of {'/'.join(rivals)}: {wins} of {total} models"
            + (f" (behind on: {', '.join(losses)})" if losses else ""))
    if ours_failed:
        line += f"; {OURS} failed on {len(ours_failed)}: {', '.join(ours_failed)}"
    out.append(line)
    ours_mism = [r["key"] for r in results if get(r, OURS).get("match") is False]
    if ours_mism:
        out.append(f"- {OURS} outputs DIFFER from the original on: {', '.join(ours_mism)}")
    big = [r for r in results if (r.get("src_bytes") or 0) > BIG_MODEL_BYTES]
    if big:
        parts = []
        for t in tools:
            ratios = [get(r, t)["peak_rss_mb"] * 1e6 / r["src_bytes"] for r in big if get(r, t).get("status") == "ok"]
            m = _median(ratios)
            parts.append(f"{t} {m:.2f}x (n={len(ratios)})" if m is not None else f"{t} -")
        out.append(f"- Peak RSS / input file size, models > 100 MB ({', '.join(r['key'] for r in big)}), median: "
                   + "; ".join(parts))
    else:
        out.append("- Peak RSS / input file size on models > 100 MB: no model over 100 MB in this run")
    out.append("")
    if meta["skipped"]:
        out += ["## Corpus entries skipped at export", ""]
        out += [f"- {s['key']}: {s['reason']}" for s in meta["skipped"]]
        out.append("")
    if notes.items:
        out += ["## Errors", ""]
        out += [f"{i}. {one_line(text, 400)}" for i, text in enumerate(notes.items, 1)]
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
