"""Peak memory and wall time of optimizing large models (a table on stdout).

Builds synthetic MatMul/Add/Identity/Relu stacks of a chosen total weight size, as a single file
(< 2 GB) or with external data (> 2 GB), and optimizes each in a fresh process per tool. Peak RSS
is the child's ru_maxrss. Run it from the repo root, ideally in the benchmark venv so onnxslim
is there too:

    python benchmarks/bench_large_models.py --sizes 512,2300 --tools onnxslim-opt,onnxslim
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

WIDTH = 2048  # each layer's weight is WIDTH x WIDTH float32 = 16 MiB


def build(path: Path, megabytes: int) -> None:
    layers = max(1, megabytes // 16)
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(layers):
        w = rng.standard_normal((WIDTH, WIDTH), dtype=np.float32) * 0.02
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(np.zeros(WIDTH, np.float32), f"b{i}")]
        nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"]), helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"]),
                  helper.make_node("Identity", [f"a{i}"], [f"i{i}"]), helper.make_node("Relu", [f"i{i}"], [f"r{i}"])]
        x = f"r{i}"
    graph = helper.make_graph(nodes, "large", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, WIDTH])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [4, WIDTH])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    external = megabytes >= 1900
    onnx.save(model, str(path), save_as_external_data=external, location=path.name + ".data" if external else None)


def command(tool: str, src: Path, out: Path, validate: bool) -> list[str]:
    if tool == "onnxslim-opt":
        return [sys.executable, "-m", "onnxslim_opt.cli", str(src), "-o", str(out), "-q"] + ([] if validate else ["--no-validate"])
    if tool == "onnxslim":
        return [sys.executable, "-c", "import sys, onnxslim; onnxslim.slim(sys.argv[1], sys.argv[2])", str(src), str(out)]
    raise SystemExit(f"unknown tool {tool}")


def measure(cmd: list[str]) -> tuple[float, float, int]:
    """(wall seconds, peak RSS MiB of the child, exit code), one fresh child per call."""
    probe = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
             "rc = subprocess.call(sys.argv[1:], stdout=subprocess.DEVNULL); "
             "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, rc)")
    out = subprocess.run([sys.executable, "-c", probe] + cmd, capture_output=True, text=True).stdout.split()
    return float(out[0]), int(out[1]) / 1024, int(out[2])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="512", help="comma-separated total weight sizes in MB")
    ap.add_argument("--tools", default="onnxslim-opt", help="onnxslim-opt and/or onnxslim")
    ap.add_argument("--work", default=None, help="scratch directory (default: a temp dir)")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="large-models-"))
    work.mkdir(parents=True, exist_ok=True)
    print("| model | file MB | tool | validate | wall s | peak RSS MiB | RSS / file | exit |")
    print("|---|---:|---|---|---:|---:|---:|---:|")
    try:
        for mb in (int(s) for s in args.sizes.split(",")):
            src = work / f"stack_{mb}mb.onnx"
            build(src, mb)
            size = sum(p.stat().st_size for p in work.glob(src.name + "*")) / 2**20
            for tool in args.tools.split(","):
                for validate in ((False, True) if tool == "onnxslim-opt" else (False,)):
                    out = work / f"out_{tool}.onnx"
                    wall, rss, rc = measure(command(tool, src, out, validate))
                    print(f"| {src.name} | {size:.0f} | {tool} | {'yes' if validate else 'no'} | {wall:.1f} | "
                          f"{rss:.0f} | {rss / size:.2f}x | {rc} |", flush=True)
                    for p in work.glob("out_*"):
                        p.unlink()
            for p in work.glob(src.name + "*"):
                p.unlink()
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
