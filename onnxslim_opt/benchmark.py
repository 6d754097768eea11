"""Latency benchmark of the original and the optimized model on ONNX Runtime execution providers.

Both models run in one process with their timed runs interleaved (A B B A ...), so clock,
thermal and noisy-neighbour drift hit both alike and the optimized/original ratios stay fair.
A provider that ONNX Runtime cannot load is never measured: ORT silently falls back to the CPU,
so the session's actual providers and the nodes each provider ran are checked, and a fallback is
reported as an error for that provider instead of a CPU number labelled CUDA or TensorRT.
"""
from __future__ import annotations

import json
import os
import re
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import onnx

from .errors import OptimizeError
from .specs import InputSpec, graph_inputs, random_inputs

#: short names accepted by --benchmark -> ONNX Runtime provider names
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
             "tensorrt": "TensorrtExecutionProvider"}
ALIASES = {"trt": "tensorrt", "gpu": "cuda"}
MEMORY_NOTE = ("peak_rss_delta_bytes: growth of the process's peak resident set (Linux VmHWM, reset before "
               "each session) from before session creation to the end of warm-up: weights, arena and "
               "transient allocations in host memory; a lower bound (pages the allocator freed earlier and "
               "reuses do not count); device memory is not measured")


@dataclass
class BenchmarkOptions:
    providers: Sequence[str] = ("cpu",)
    batches: Sequence[int] = (1,)
    runs: int = 100
    warmup: int = 10
    #: intra-op thread counts to measure; 0 = ONNX Runtime's default
    threads: Sequence[int] = (0,)
    #: GPU providers: time host<->device copies too (default: IO binding keeps them out)
    include_copies: bool = False
    trt_fp16: bool = False
    trt_int8: bool = False
    trt_cache: Optional[str] = None
    trt_workspace: Optional[int] = None
    seed: int = 0
    custom_op_libraries: Sequence[str] = ()


class ProviderUnavailable(Exception):
    """The requested execution provider cannot run here; the message names what is missing."""


def parse_providers(text: str | Sequence[str]) -> list[str]:
    items = text.split(",") if isinstance(text, str) else list(text)
    names = []
    for item in (s.strip().lower() for s in items if s.strip()):
        item = ALIASES.get(item, item)
        if item not in PROVIDERS:
            raise OptimizeError(f"unknown --benchmark provider {item!r}; choose from {', '.join(PROVIDERS)}")
        if item not in names:
            names.append(item)
    return names


def parse_ints(text: str | int | Sequence[int], flag: str, minimum: int = 1) -> list[int]:
    items = [text] if isinstance(text, int) else (text.split(",") if isinstance(text, str) else list(text))
    try:
        values = [int(str(x).strip()) for x in items if str(x).strip()]
    except ValueError:
        raise OptimizeError(f"bad {flag} {text!r}: expected comma-separated integers") from None
    if not values or any(v < minimum for v in values):
        raise OptimizeError(f"bad {flag} {text!r}: values must be >= {minimum}")
    return list(dict.fromkeys(values))


# ----------------------------------------------------------------------------- providers
def provider_chain(name: str, opts: BenchmarkOptions) -> list:
    """The providers list given to InferenceSession: the requested one first, then its usual
    fallbacks for nodes it cannot take (TensorRT -> CUDA -> CPU)."""
    if name == "cpu":
        return ["CPUExecutionProvider"]
    if name == "cuda":
        return [("CUDAExecutionProvider", {}), "CPUExecutionProvider"]
    trt: dict[str, Any] = {"trt_fp16_enable": opts.trt_fp16, "trt_int8_enable": opts.trt_int8}
    if opts.trt_cache:
        cache = str(Path(opts.trt_cache).resolve())
        Path(cache).mkdir(parents=True, exist_ok=True)
        trt.update(trt_engine_cache_enable=True, trt_engine_cache_path=cache,
                   trt_timing_cache_enable=True, trt_timing_cache_path=cache)
    if opts.trt_workspace:
        trt["trt_max_workspace_size"] = int(opts.trt_workspace)
    return [("TensorrtExecutionProvider", trt), ("CUDAExecutionProvider", {}), "CPUExecutionProvider"]


def missing_provider_message(name: str, available: Sequence[str]) -> str:
    """Why a provider is not in this onnxruntime build, naming the package to install."""
    import onnxruntime as ort

    have = f"this onnxruntime {ort.__version__} offers {', '.join(available)}"
    if name == "cuda":
        return (f"CUDAExecutionProvider is not available ({have}): install the onnxruntime-gpu package "
                f"in place of onnxruntime (pip uninstall onnxruntime && pip install 'onnxslim-opt[gpu]'), "
                f"with a CUDA and cuDNN version it supports")
    return (f"TensorrtExecutionProvider is not available ({have}): it needs the onnxruntime-gpu package "
            f"(pip install 'onnxslim-opt[gpu]') and NVIDIA TensorRT's libraries (libnvinfer, "
            f"libnvinfer_plugin, libnvonnxparser, e.g. pip install tensorrt) on the library path")


def check_placement(name: str, actual: Sequence[str], placement: dict[str, int]) -> Optional[str]:
    """An error when ORT fell back: the requested provider is not among the session's providers,
    or it was given no node at all. None when the provider really ran (part of) the model."""
    wanted = PROVIDERS[name]
    if wanted not in actual:
        missing = ("the CUDA/cuDNN libraries" if name == "cuda"
                   else "the TensorRT libraries (libnvinfer, libnvinfer_plugin, libnvonnxparser) or CUDA/cuDNN")
        return (f"{wanted} is built into onnxruntime but failed to load, and ONNX Runtime fell back to "
                f"{', '.join(actual)}; check {missing} on the library path. No {name} figures reported")
    if name != "cpu" and placement and not placement.get(wanted):
        return (f"{wanted} loaded but ran none of the model's nodes (placement {placement}); "
                f"these would be CPU figures, so none are reported for {name}")
    return None


# ----------------------------------------------------------------------------- sessions
@dataclass
class _Model:
    label: str  # "original" or "optimized"
    path: Path
    session: Any = None
    feed: dict = field(default_factory=dict)
    binding: Any = None
    latencies: list[float] = field(default_factory=list)
    window: list[float] = field(default_factory=list)
    stats: dict = field(default_factory=dict)


def _session_options(threads: int, profile_prefix: Optional[str], custom_ops: Sequence[str]):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    for lib in custom_ops:
        so.register_custom_ops_library(str(lib))
    return so


def _rss_peak_reset() -> Optional[int]:
    """Reset the kernel's peak-RSS counter and return the current RSS (bytes); None off Linux."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _proc_status("VmRSS")
    except OSError:
        return None


def _proc_status(key: str) -> Optional[int]:
    try:
        m = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(m.group(1)) * 1024 if m else None


def _placement(profile_file: str) -> dict[str, int]:
    """Nodes per provider, from the ORT profile of the first run (fused TensorRT subgraphs count once)."""
    try:
        events = json.loads(Path(profile_file).read_text())
    except (OSError, ValueError):
        return {}
    nodes: dict[str, str] = {}
    for e in events:
        if e.get("cat") == "Node" and "provider" in e.get("args", {}):
            nodes[e["name"].removesuffix("_kernel_time")] = e["args"]["provider"]
    counts: dict[str, int] = {}
    for prov in nodes.values():
        counts[prov] = counts.get(prov, 0) + 1
    return dict(sorted(counts.items()))


def _open(m: _Model, name: str, threads: int, opts: BenchmarkOptions, feed: dict, scratch: str) -> dict:
    """Create the session, check where it runs, bind IO, warm up. Returns the setup figures."""
    import onnxruntime as ort

    base = _rss_peak_reset()
    t = time.perf_counter()
    so = _session_options(threads, os.path.join(scratch, f"{m.label}_{name}_{threads}"), opts.custom_op_libraries)
    m.session = ort.InferenceSession(str(m.path), so, providers=provider_chain(name, opts))
    setup = {"session_seconds": time.perf_counter() - t}
    actual = m.session.get_providers()
    error = check_placement(name, actual, {})  # a fallback shows here already: never bind or run on it
    if error:
        raise ProviderUnavailable(error)
    wanted = {i.name for i in m.session.get_inputs()}
    m.feed = {k: v for k, v in feed.items() if k in wanted}
    gpu = name != "cpu" and not opts.include_copies
    if gpu:
        m.binding = _bind(m.session, m.feed)
    t = time.perf_counter()
    _run_once(m)  # the first run: TensorRT builds engines for dynamic shapes here
    setup["first_run_seconds"] = time.perf_counter() - t
    placement = _placement(m.session.end_profiling())
    error = check_placement(name, actual, placement)
    if error:
        raise ProviderUnavailable(error)
    for _ in range(max(opts.warmup - 1, 0)):
        _run_once(m)
    peak = _proc_status("VmHWM")
    setup.update(providers=actual, node_placement=placement, io_binding=gpu,
                 peak_rss_delta_bytes=(peak - base) if peak is not None and base is not None else None)
    return setup


def _bind(session: Any, feed: dict) -> Any:
    """IO binding for CUDA/TensorRT: inputs copied to the device once, tensor outputs left there,
    so the timed runs measure the model and not PCIe copies."""
    import onnxruntime as ort

    binding = session.io_binding()
    for name, value in feed.items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0))
    for out in session.get_outputs():
        if out.type.startswith("tensor("):
            binding.bind_output(out.name, "cuda", 0)
        else:  # sequences/maps (ZipMap) stay on the host
            binding.bind_output(out.name)
    return binding


def _run_once(m: _Model) -> float:
    t = time.perf_counter()
    if m.binding is not None:
        m.session.run_with_iobinding(m.binding)  # ORT synchronizes the device stream at the end of Run
    else:
        m.session.run(None, m.feed)
    return time.perf_counter() - t


def _summary(latencies: list[float], batch: int) -> dict:
    arr = np.asarray(latencies) * 1000.0
    return {"runs": len(latencies), "p50_ms": float(np.percentile(arr, 50)), "p90_ms": float(np.percentile(arr, 90)),
            "p99_ms": float(np.percentile(arr, 99)), "mean_ms": float(arr.mean()),
            "stdev_ms": float(statistics.pstdev(arr.tolist())) if len(arr) > 1 else 0.0,
            "min_ms": float(arr.min()), "throughput_per_s": batch * len(arr) / (arr.sum() / 1000.0)}


# ----------------------------------------------------------------------------- batches
def _batch_dims(model: onnx.ModelProto) -> dict[str, Optional[int]]:
    """Leading dim of each input: an int when fixed, None when dynamic (rank-0 inputs: 0)."""
    dims: dict[str, Optional[int]] = {}
    for vi in graph_inputs(model):
        tt = vi.type.tensor_type
        if not tt.HasField("shape") or not tt.shape.dim:
            dims[vi.name] = 0
            continue
        d = tt.shape.dim[0]
        dims[vi.name] = d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
    return dims


def plan_batches(original: onnx.ModelProto, optimized: onnx.ModelProto, wanted: Sequence[int]
                 ) -> tuple[list[int], Optional[str]]:
    """Batch sizes both models accept, and a note when some requested sizes cannot run."""
    dims = [d for m in (original, optimized) for d in _batch_dims(m).values()]
    fixed = {d for d in dims if d}
    if not fixed:
        return list(wanted), None
    if len(fixed) == 1 and all(d is None or d == next(iter(fixed)) for d in dims):
        b = next(iter(fixed))
        note = None if list(wanted) == [b] else f"the model has a fixed batch of {b}: only batch {b} was run"
        return [b], note
    return [], "the inputs have different fixed leading dims: the model has no batch axis to vary; ran as declared"


def _feed(specs: Sequence[InputSpec], batch: int, dyn: dict[str, Optional[int]], seed: int) -> dict:
    shaped = [InputSpec(s.name, s.dtype, (batch,) + tuple(s.shape[1:]) if dyn.get(s.name) is None and s.shape else
                        tuple(s.shape)) for s in specs]
    return random_inputs(shaped, 1, seed)[0]


# ----------------------------------------------------------------------------- the benchmark
def benchmark(original_path: str | Path, optimized_path: str | Path, specs: Sequence[InputSpec],
              opts: BenchmarkOptions, original: Optional[onnx.ModelProto] = None,
              optimized: Optional[onnx.ModelProto] = None) -> dict:
    """Benchmark both models on every requested provider, batch and thread count.

    Returns the report's "benchmark" section; a provider that cannot run gets an "error" entry
    (and no figures) while the others still run."""
    import onnxruntime as ort

    original = original or onnx.load(str(original_path), load_external_data=False)
    optimized = optimized or onnx.load(str(optimized_path), load_external_data=False)
    batches, note = plan_batches(original, optimized, opts.batches)
    run_batches: list[Optional[int]] = list(batches) or [None]
    dyn = _batch_dims(original)
    available = ort.get_available_providers()
    section: dict[str, Any] = {
        "onnxruntime": ort.__version__, "available_providers": available,
        "requested_providers": list(opts.providers), "batches": [b for b in run_batches if b],
        "threads": list(opts.threads), "runs": opts.runs, "warmup": opts.warmup,
        "schedule": "interleaved ABBA: run i times original then optimized, run i+1 the reverse",
        "graph_optimization_level": "ORT default (ORT_ENABLE_ALL)", "memory": MEMORY_NOTE,
        "notes": [note] if note else [], "results": [], "errors": [],
    }
    clock0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="onnxslim-bench-") as scratch:
        for name in opts.providers:
            if PROVIDERS[name] not in available:
                section["errors"].append({"provider": name, "error": missing_provider_message(name, available)})
                continue
            _run_provider(name, section, specs, run_batches, dyn, original_path, optimized_path, opts, scratch, clock0)
    return section


def _run_provider(name: str, section: dict, specs, run_batches, dyn, original_path, optimized_path,
                  opts: BenchmarkOptions, scratch: str, clock0: float) -> None:
    for threads in opts.threads:
        for batch in run_batches:
            feed = _feed(specs, batch, dyn, opts.seed) if batch else random_inputs(list(specs), 1, opts.seed)[0]
            try:
                section["results"].append(_measure(name, threads, batch, feed, original_path, optimized_path,
                                                    opts, scratch, clock0))
            except ProviderUnavailable as exc:  # nothing else on this provider can be trusted
                section["errors"].append({"provider": name, "error": str(exc)})
                return
            except Exception as exc:  # e.g. a model ORT cannot run on this provider or batch
                section["errors"].append({"provider": name, "batch": batch, "threads": threads,
                                          "error": " ".join(str(exc).split())[:400]})


def _measure(name: str, threads: int, batch: Optional[int], feed: dict, original_path, optimized_path,
             opts: BenchmarkOptions, scratch: str, clock0: float) -> dict:
    models = [_Model("original", Path(original_path)), _Model("optimized", Path(optimized_path))]
    setup = {m.label: _open(m, name, threads, opts, feed, scratch) for m in models}
    for i in range(opts.runs):
        order = models if i % 2 == 0 else models[::-1]
        for m in order:
            start = time.perf_counter()
            m.latencies.append(_run_once(m))
            m.window = [m.window[0] if m.window else start - clock0, time.perf_counter() - clock0]
    entry: dict[str, Any] = {"provider": name, "ort_provider": PROVIDERS[name], "batch": batch,
                             "threads": threads}
    for m in models:
        figures = _summary(m.latencies, batch or 1)
        entry[m.label] = {**setup[m.label], **figures, "timed_window_s": [round(x, 6) for x in m.window]}
        m.session = m.binding = None
    a, b = entry["original"], entry["optimized"]
    entry["ratios"] = {k: (b[k] / a[k] if a[k] else None) for k in
                       ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "throughput_per_s", "session_seconds")}
    return entry


def format_table(section: dict) -> str:
    """The human table for stderr."""
    lines = [f"benchmark ({section['runs']} interleaved runs after {section['warmup']} warm-up, "
             f"onnxruntime {section['onnxruntime']})",
             f"{'provider':10}{'batch':>6}{'thr':>4}{'model':>10}{'session':>9}{'p50 ms':>9}{'p90 ms':>9}"
             f"{'p99 ms':>9}{'mean ms':>9}{'items/s':>10}{'peak RSS':>10}"]
    for r in section["results"]:
        for label in ("original", "optimized"):
            f = r[label]
            rss = f["peak_rss_delta_bytes"]
            lines.append(f"{r['provider']:10}{r['batch'] or '-':>6}{r['threads'] or 'def':>4}{label[:9]:>10}"
                         f"{f['session_seconds']:>8.3f}s{f['p50_ms']:>9.3f}{f['p90_ms']:>9.3f}{f['p99_ms']:>9.3f}"
                         f"{f['mean_ms']:>9.3f}{f['throughput_per_s']:>10.1f}"
                         f"{(f'{rss / 2**20:.1f} MB' if rss is not None else '-'):>10}")
        q = r["ratios"]
        lines.append(f"{'':30}ratio optimized/original: p50 {q['p50_ms']:.3f}, mean {q['mean_ms']:.3f}, "
                     f"throughput {q['throughput_per_s']:.3f}")
    for e in section["errors"]:
        lines.append(f"benchmark error ({e['provider']}): {e['error']}")
    for n in section["notes"]:
        lines.append(f"benchmark note: {n}")
    return "\n".join(lines)
