"""The `optimize` command end to end: outputs, exit codes, report JSON, bad inputs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from util import assert_same_outputs, make_model, tensor, vinfo

CLI = [sys.executable, "-m", "onnxslim_opt.cli"]


def run_cli(*args, cwd=None):
    return subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.fixture
def small_model(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Identity", ["x"], ["x1"]),
        helper.make_node("Conv", ["x1", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["y"]),
        helper.make_node("Relu", ["c"], ["unused"]),
    ]
    model = make_model(nodes, [vinfo("x", [1, 3, 8, 8])], [vinfo("y", [1, 4, 8, 8])], [tensor("w", w)])
    path = tmp_path / "small.onnx"
    onnx.save(model, path)
    return path


def test_writes_default_output_and_summary(small_model):
    before = small_model.read_bytes()
    r = run_cli(small_model)
    assert r.returncode == 0, r.stderr
    out = small_model.with_name("small.opt.onnx")
    assert out.exists()
    assert small_model.read_bytes() == before  # input untouched
    assert "nodes" in r.stderr and "validation: passed" in r.stderr
    assert_same_outputs(onnx.load(small_model), onnx.load(out))
    assert len(onnx.load(out).graph.node) < len(onnx.load(small_model).graph.node)


def test_report_json_to_file_and_stdout(small_model, tmp_path):
    out = tmp_path / "o.onnx"
    rep = tmp_path / "r.json"
    r = run_cli(small_model, "-o", out, "--report", rep)
    assert r.returncode == 0, r.stderr
    data = json.loads(rep.read_text())
    assert data["schema_version"].startswith("1.")
    assert data["written"] is True and data["validation"]["status"] == "passed"
    assert data["after"]["nodes"] < data["before"]["nodes"]
    assert {p["name"] for p in data["passes"]} >= {"eliminate_dead_code"}
    r = run_cli(small_model, "-o", out, "--report", "-", "--quiet")
    assert r.returncode == 0
    assert json.loads(r.stdout)["output"] == str(out)


def test_list_passes():
    r = run_cli("--list-passes")
    assert r.returncode == 0
    assert "eliminate_dead_code" in r.stdout and "failed to load" not in r.stdout


def test_skip_and_passes_flags(small_model, tmp_path):
    out = tmp_path / "o.onnx"
    r = run_cli(small_model, "-o", out, "--passes", "eliminate_dead_code", "--report", "-", "-q")
    data = json.loads(r.stdout)
    assert [p["name"] for p in data["passes"]] == ["eliminate_dead_code"]
    assert "Identity" in data["after"]["ops"]
    r = run_cli(small_model, "-o", out, "--skip", "no_such_pass")
    assert r.returncode == 2 and "unknown pass 'no_such_pass'" in r.stderr


@pytest.mark.parametrize("content,message", [
    (None, "input file not found"),
    (b"", "input file is empty"),
    (b"this is not a protobuf at all \x00\xff\xfe", "is not a valid ONNX model"),
])
def test_bad_inputs_exit_2_without_traceback(tmp_path, content, message):
    path = tmp_path / "bad.onnx"
    if content is not None:
        path.write_bytes(content)
    r = run_cli(path, "-o", tmp_path / "out.onnx")
    assert r.returncode == 2
    assert message in r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out.onnx").exists()


def test_truncated_protobuf(small_model, tmp_path):
    data = small_model.read_bytes()
    path = tmp_path / "trunc.onnx"
    path.write_bytes(data[: len(data) // 2])
    r = run_cli(path, "-o", tmp_path / "out.onnx")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert not (tmp_path / "out.onnx").exists()


def test_unsupported_opset(tmp_path):
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [vinfo("x", [2])], [vinfo("y", [2])])
    model.opset_import[0].version = 99
    path = tmp_path / "future.onnx"
    path.write_bytes(model.SerializeToString())
    r = run_cli(path)
    assert r.returncode == 2 and "opset 99" in r.stderr


def test_unwritable_output(small_model, tmp_path):
    r = run_cli(small_model, "-o", tmp_path / "no" / "such" / "dir" / "o.onnx")
    assert r.returncode == 2 and "output directory does not exist" in r.stderr
    if os.geteuid() != 0:  # root can write anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        r = run_cli(small_model, "-o", ro / "o.onnx")
        assert r.returncode == 2


def test_refuses_to_overwrite_input(small_model):
    before = small_model.read_bytes()
    r = run_cli(small_model, "-o", small_model)
    assert r.returncode == 2 and "--overwrite" in r.stderr
    assert small_model.read_bytes() == before
    r = run_cli(small_model, "-o", small_model, "--overwrite")
    assert r.returncode == 0, r.stderr


def test_dynamic_dims_need_input_shapes(tmp_path):
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [vinfo("x", ["N", "T"])], [vinfo("y", ["N", "T"])])
    path = tmp_path / "dyn.onnx"
    onnx.save(model, path)
    r = run_cli(path)
    assert r.returncode == 2 and "--input-shapes x:N,N" in r.stderr
    r = run_cli(path, "--input-shapes", "x:2,5")
    assert r.returncode == 0, r.stderr
    r = run_cli(path, "--input-shapes", "nope:2,5")
    assert r.returncode == 2 and "model's inputs are ['x']" in r.stderr


def test_validation_failure_exit_1_and_nothing_written(small_model, tmp_path):
    """A pass that breaks numerics (registered at run time) is caught by validation."""
    code = f"""
import sys, numpy as np
import onnxslim_opt
from onnxslim_opt import Pass, PassResult, register_pass
from onnxslim_opt.cli import main

@register_pass
class Breaker(Pass):
    name = "breaker"
    description = "test pass that scales a weight"
    def run(self, graph, ctx):
        for t in graph.tensors().values():
            if t.name == "w":
                t.values = t.values * 2
        return PassResult(changed=True, rewrites=1)

sys.exit(main([{str(small_model)!r}, "-o", {str(tmp_path / 'o.onnx')!r}, "--passes", "breaker", "--report", {str(tmp_path / 'r.json')!r}]))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr
    assert "validation failed" in r.stderr and "'y'" in r.stderr
    assert not (tmp_path / "o.onnx").exists()
    assert json.loads((tmp_path / "r.json").read_text())["validation"]["worst_output"] == "y"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".onnxslim-opt-")]


def test_failing_pass_is_rolled_back(small_model, tmp_path):
    code = f"""
import sys, json
from onnxslim_opt import Pass, register_pass
from onnxslim_opt.cli import main

@register_pass
class HalfEdit(Pass):
    name = "half_edit"
    description = "test pass that edits, then raises"
    def run(self, graph, ctx):
        graph.nodes.pop()          # half-edited ...
        raise RuntimeError("boom") # ... then fails
sys.exit(main([{str(small_model)!r}, "-o", {str(tmp_path / 'o.onnx')!r}, "--passes", "half_edit,eliminate_dead_code", "--report", "-", "-q"]))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    half = next(p for p in data["passes"] if p["name"] == "half_edit")
    assert half["errors"] == ["RuntimeError: boom"]
    assert data["validation"]["status"] == "passed"
    assert any("rolled back" in n for n in data["notes"])


def test_debug_names_the_pass_that_broke_the_graph(small_model, tmp_path):
    code = f"""
import sys
import onnx_graphsurgeon as gs
from onnxslim_opt import Pass, PassResult, register_pass
from onnxslim_opt.cli import main

@register_pass
class Dangling(Pass):
    name = "dangling"
    description = "test pass reading an undefined tensor"
    def run(self, graph, ctx):
        graph.nodes[1].inputs[0] = gs.Variable("never_defined", dtype=None)
        return PassResult(changed=True)
try:
    main([{str(small_model)!r}, "-o", {str(tmp_path / 'o.onnx')!r}, "--passes", "dangling", "--debug"])
except Exception as exc:
    print(type(exc).__name__, exc)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "pass dangling produced an invalid graph" in r.stdout, r.stdout + r.stderr
    assert not (tmp_path / "o.onnx").exists()


def test_python_api(small_model, tmp_path):
    import onnxslim_opt

    model = onnxslim_opt.optimize(str(small_model))
    assert isinstance(model, onnx.ModelProto)
    assert_same_outputs(onnx.load(small_model), model)
    outcome = onnxslim_opt.run(str(small_model), tmp_path / "api.onnx")
    assert outcome.report.written and (tmp_path / "api.onnx").exists()


def test_inputs_npz(small_model, tmp_path):
    npz = tmp_path / "in.npz"
    np.savez(npz, x=np.ones((2, 1, 3, 8, 8), np.float32))
    r = run_cli(small_model, "-o", tmp_path / "o.onnx", "--inputs", npz, "--report", "-", "-q")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["validation"]["samples"] == 2
    np.savez(npz, x=np.ones((2, 5), np.float32))
    r = run_cli(small_model, "-o", tmp_path / "o.onnx", "--inputs", npz)
    assert r.returncode == 2 and "'x'" in r.stderr


def test_plugin_pass_adds_its_own_flag_and_lossy_runs_report_fidelity(small_model, tmp_path):
    code = f"""
import sys
from onnxslim_opt import Pass, PassResult, register_pass
from onnxslim_opt.cli import main

@register_pass
class Shrink(Pass):
    name = "shrink_weights"
    description = "test plug-in: scales weights (lossy)"
    lossless = False
    stage = "transform"
    default = False
    def __init__(self, factor=1.0):
        super().__init__()
        self.factor = factor
    @classmethod
    def add_arguments(cls, group):
        group.add_argument("--shrink", type=float, metavar="F", help="scale weights by F")
    @classmethod
    def from_arguments(cls, args):
        return cls(args.shrink) if args.shrink is not None else None
    def run(self, graph, ctx):
        for t in graph.tensors().values():
            if t.name == "w":
                t.values = t.values * self.factor
        return PassResult(changed=True, rewrites=1)
sys.exit(main([{str(small_model)!r}, "-o", {str(tmp_path / 'o.onnx')!r}, "--shrink", "0.999", "--report", "-", "-q"]))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["validation"]["status"] == "fidelity"
    assert 0.999 < data["validation"]["outputs"][0]["cosine"] <= 1.0 + 1e-9
    assert any(p["name"] == "shrink_weights" and p["rewrites"] == 1 for p in data["passes"])
    help_text = subprocess.run([sys.executable, "-c", code.replace('"--shrink", "0.999", "--report", "-", "-q"', '"--help"')],
                               capture_output=True, text=True, timeout=300).stdout
    assert "--shrink F" in help_text and "pass shrink_weights" in help_text
