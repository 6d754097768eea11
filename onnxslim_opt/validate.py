"""Numerical validation with ONNX Runtime: the optimized model against the original.

Both models run on the CPU provider with graph optimizations disabled, so the runtime can
neither hide nor add differences. Sessions are built from files (works for >2 GB models) one at
a time, so only one copy of the weights is loaded by the runtime at once.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import onnx

from .errors import OptimizeError
from .runtime import cpu_session, extra_outputs


@dataclass
class OutputComparison:
    name: str
    max_abs_diff: float
    max_rel_diff: float
    cosine: float
    matches: bool
    #: for outputs shaped [batch, classes]: the fraction of samples whose argmax agrees
    top1_agreement: Optional[float] = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class ValidationResult:
    status: str  # "passed", "failed", "unavailable", "skipped", or "fidelity" (lossy passes ran)
    samples: int = 0
    rtol: float = 1e-4
    atol: float = 1e-5
    outputs: list[OutputComparison] = field(default_factory=list)
    message: str = ""

    @property
    def worst(self) -> Optional[OutputComparison]:
        if not self.outputs:
            return None
        return max(self.outputs, key=lambda o: (not o.matches, o.max_abs_diff))

    def to_dict(self) -> dict:
        worst = self.worst
        return {"status": self.status, "samples": self.samples, "rtol": self.rtol, "atol": self.atol,
                "message": self.message, "worst_output": worst.name if worst else None,
                "outputs": [o.to_dict() for o in self.outputs]}


class RuntimeUnavailable(Exception):
    """ONNX Runtime cannot load or run a model (e.g. a custom op without its library)."""


def make_session(path: str | Path | onnx.ModelProto, custom_op_libraries: Sequence[str] = (), threads: int = 0):
    try:
        return cpu_session(path, threads, custom_op_libraries)
    except OptimizeError:
        raise
    except Exception as exc:
        raise RuntimeUnavailable(explain_runtime_error(exc)) from exc


def explain_runtime_error(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    m = re.search(r"Could not find an implementation for (\S+)\((\d+)\) node with name '([^']*)'", text)
    if m:
        return f"ONNX Runtime has no CPU kernel for {m.group(1)} (opset {m.group(2)}), node {m.group(3)!r}"
    m = re.search(r"(No Op registered for (\S+) with domain_version of (\d+))", text)
    if m:
        return (f"ONNX Runtime does not know op {m.group(2)} (domain version {m.group(3)}); "
                f"if it is a custom op, pass its library with --custom-op-library")
    m = re.search(r"Unrecognized attribute|Fatal error: (\S+) is not a registered function/op", text)
    if m:
        return f"ONNX Runtime cannot load the model: {text[:300]}; if it uses custom ops, pass --custom-op-library"
    return f"ONNX Runtime cannot load the model: {text[:300]}"


_ORT_FLOATS = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def run_model(path: str | Path | onnx.ModelProto, samples: list[dict[str, np.ndarray]],
              custom_op_libraries: Sequence[str] = ()) -> tuple[list[str], list[list[Any]]]:
    session = make_session(path, custom_op_libraries)
    names = [o.name for o in session.get_outputs()]
    # a pass may change an input's float type (--fp16-io): feed each model the type it declares
    wanted = {i.name: _ORT_FLOATS.get(i.type) for i in session.get_inputs()}
    try:
        results = [session.run(None, {k: v.astype(wanted[k]) if wanted.get(k) and v.dtype != wanted[k]
                                      and v.dtype.kind == "f" else v for k, v in feed.items()})
                   for feed in samples]
    except Exception as exc:
        raise RuntimeUnavailable(f"ONNX Runtime failed to run the model: {' '.join(str(exc).split())[:300]}") from exc
    return names, results


def compare_values(name: str, ref: Any, got: Any, rtol: float, atol: float) -> OutputComparison:
    """Compare one output; non-tensor outputs (sequences of maps from ZipMap) are flattened."""
    ref_arr, got_arr = _as_array(ref), _as_array(got)
    if ref_arr is None or got_arr is None or ref_arr.shape != got_arr.shape:
        same = _structurally_equal(ref, got)
        return OutputComparison(name, 0.0 if same else float("inf"), 0.0 if same else float("inf"),
                                1.0 if same else 0.0, same)
    if ref_arr.dtype.kind in "biuU" or ref_arr.dtype == object:
        equal = bool(np.array_equal(ref_arr, got_arr))
        diff = 0.0 if equal else float(np.max(ref_arr != got_arr))
        return OutputComparison(name, diff, diff, 1.0 if equal else 0.0, equal)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        return _compare_floats(name, ref_arr, got_arr, rtol, atol)


def _compare_floats(name: str, ref_arr: np.ndarray, got_arr: np.ndarray, rtol: float, atol: float) -> OutputComparison:
    r = ref_arr.astype(np.float64).ravel()
    g = got_arr.astype(np.float64).ravel()
    both_nan = np.isnan(r) & np.isnan(g)
    both_same_inf = np.isinf(r) & (r == g)
    ok_special = both_nan | both_same_inf
    diff = np.where(ok_special, 0.0, np.abs(r - g))
    diff = np.nan_to_num(diff, nan=np.inf)
    max_abs = float(diff.max()) if diff.size else 0.0
    denom = np.abs(r)
    rel = np.where(denom > 0, diff / np.where(denom > 0, denom, 1), np.where(diff > 0, np.inf, 0))
    max_rel = float(rel.max()) if rel.size else 0.0
    finite = ~ok_special & np.isfinite(r) & np.isfinite(g)
    rn, gn = np.linalg.norm(r[finite]), np.linalg.norm(g[finite])
    cosine = float(np.dot(r[finite], g[finite]) / (rn * gn)) if rn > 0 and gn > 0 else (1.0 if rn == gn else 0.0)
    # Float rounding in a deep network scales with the magnitude of the sums that produced an
    # element, not with the element itself: an output near zero in a tensor of values ~1000
    # legitimately differs by more than rtol of itself after any reassociation (ONNX Runtime's
    # own BN folding does). So the relative part is measured against |ref| plus the output's RMS.
    rms = float(np.sqrt(np.mean(np.square(r[finite])))) if finite.any() else 0.0
    matches = bool(np.all(ok_special | (diff <= atol + rtol * (np.abs(np.nan_to_num(r)) + rms))))
    return OutputComparison(name, max_abs, max_rel, cosine, matches)


def _top1_agreement(refs: list, gots: list) -> Optional[float]:
    """Share of rows whose argmax agrees, for [batch, classes] float outputs; else None."""
    try:
        r = np.concatenate([np.asarray(x) for x in refs])
        g = np.concatenate([np.asarray(x) for x in gots])
    except ValueError:
        return None
    if r.ndim != 2 or r.shape[0] == 0 or r.shape[1] < 2 or r.dtype.kind != "f" or r.shape != g.shape:
        return None
    return float(np.mean(r.argmax(1) == g.argmax(1)))


def _as_array(value: Any) -> Optional[np.ndarray]:
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, list) and value and isinstance(value[0], dict):
        keys = sorted(value[0])
        try:
            return np.array([[d[k] for k in keys] for d in value], dtype=np.float64)
        except (KeyError, TypeError, ValueError):
            return None
    return None


def _structurally_equal(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.shape == b.shape and np.array_equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_structurally_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_structurally_equal(x, y) for x, y in zip(a, b))
    return a == b


def validate(original_path: str | Path, optimized_path: str | Path, samples: list[dict[str, np.ndarray]],
             rtol: float = 1e-4, atol: float = 1e-5, custom_op_libraries: Sequence[str] = (),
             lossy: bool = False) -> ValidationResult:
    """Run both models on `samples` and compare every output.

    After lossy passes the result is a fidelity report (status "fidelity": cosine, max diffs,
    top-1 agreement), not a pass/fail against float tolerances; gates decide what is acceptable."""
    result = ValidationResult("passed", samples=len(samples), rtol=rtol, atol=atol)
    try:
        ref_names, ref_outputs = run_model(original_path, samples, custom_op_libraries)
    except RuntimeUnavailable as exc:
        result.status, result.message = "unavailable", f"original model: {exc}"
        return result
    try:
        got_names, got_outputs = run_model(optimized_path, samples, custom_op_libraries)
    except RuntimeUnavailable as exc:
        result.status, result.message = "failed", f"optimized model: {exc}"
        return result
    if ref_names != got_names:
        result.status = "failed"
        result.message = f"output names changed: {ref_names} -> {got_names}"
        return result
    result.outputs = _compare_runs(ref_names, ref_outputs, got_outputs, rtol, atol)
    if lossy:
        result.status = "fidelity"
        result.message = "lossy passes ran: outputs are compared for fidelity, not equality"
    elif not all(o.matches for o in result.outputs):
        worst = result.worst
        result.status = "failed"
        result.message = (f"output {worst.name!r} differs: max abs diff {worst.max_abs_diff:.3g}, "
                          f"max rel diff {worst.max_rel_diff:.3g}, cosine {worst.cosine:.6f} "
                          f"(rtol {rtol:g}, atol {atol:g})")
        explained = _selection_flip(original_path, optimized_path, samples, rtol, atol, custom_op_libraries,
                                    [o.name for o in result.outputs if not o.matches])
        if explained:
            result.status = "passed"
            result.message = f"{result.message}; {explained}"
    return result


def _same_constants(names: set[str], original, optimized) -> bool:
    """Every reader of these constants in the original reads an equal constant at the same input
    of the same-named node in the optimized model (constants may be renamed or deduplicated)."""
    from onnx import numpy_helper

    def constant_protos(model) -> dict:
        found = {t.name: t for t in model.graph.initializer}
        for n in model.graph.node:
            if n.op_type == "Constant":
                found.update({n.output[0]: a.t for a in n.attribute if a.name == "value"})
        return found

    before, after = constant_protos(original), constant_protos(optimized)
    by_name = {n.name: n for n in optimized.graph.node if n.name}
    for node in original.graph.node:
        for j, name in enumerate(node.input):
            if name not in names:
                continue
            twin = by_name.get(node.name) if node.name else None
            if twin is None or j >= len(twin.input) or twin.input[j] not in after or name not in before:
                return False
            if not np.array_equal(numpy_helper.to_array(before[name]), numpy_helper.to_array(after[twin.input[j]])):
                return False
    return True


def _compare_runs(names: list[str], ref_outputs: list, got_outputs: list, rtol: float, atol: float
                  ) -> list[OutputComparison]:
    """Per-output comparison merged over samples (worst case)."""
    merged = []
    for i, name in enumerate(names):
        per_sample = [compare_values(name, ref[i], got[i], rtol, atol) for ref, got in zip(ref_outputs, got_outputs)]
        merged.append(OutputComparison(
            name,
            max(c.max_abs_diff for c in per_sample),
            max(c.max_rel_diff for c in per_sample),
            min(c.cosine for c in per_sample),
            all(c.matches for c in per_sample),
            _top1_agreement([ref[i] for ref in ref_outputs], [got[i] for got in got_outputs]),
        ))
    return merged


#: ops whose outputs jump when near-tied inputs swap order: a rounding-level difference before
#: them can select other boxes or indices after them
SELECTION_OPS = ("NonMaxSuppression", "TopK", "ArgMax", "ArgMin")


def _selection_flip(original_path: str | Path, optimized_path: str | Path, samples: list, rtol: float, atol: float,
                    custom_op_libraries: Sequence[str], mismatched: Sequence[str]) -> Optional[str]:
    """When outputs differ only behind selection ops, say so.

    Everything downstream of a NonMaxSuppression/TopK/ArgMax is a function of the selection and
    of the tensors that flow into that downstream region from outside it (the "frontier": the
    scores fed to TopK, the box deltas a Gather picks from...). If every differing output lies
    downstream of a selection and every frontier tensor matches, the optimization is lossless and
    the difference is a selection flipping on near-tied scores (random inputs make such ties
    common in detectors). Returns that explanation, or None."""
    try:
        original = onnx.load(str(original_path))
        optimized = onnx.load(str(optimized_path))
    except Exception:
        return None
    constants = {t.name for t in original.graph.initializer}
    constants |= {o for n in original.graph.node if n.op_type == "Constant" for o in n.output}
    tainted: set[str] = set()
    frontier: set[str] = set()
    for node in original.graph.node:  # topological order
        downstream = node.op_type in SELECTION_OPS or any(t in tainted for t in node.input)
        if downstream:
            tainted.update(o for o in node.output if o)
            frontier.update(t for t in node.input if t and t not in tainted)
    if not frontier or not set(mismatched) <= tainted:
        return None
    # constants flowing into the selected region must be the same constants in the optimized model
    if not _same_constants(frontier & constants, original, optimized):
        return None
    # tensors computed from shapes and constants only (folded away by the optimizer) are the same
    # in both models by construction; only data-dependent frontier tensors need comparing
    data = {i.name for i in original.graph.input}
    for node in original.graph.node:
        if node.op_type not in ("Shape", "Size") and any(t in data for t in node.input):
            data.update(o for o in node.output if o)
    fed = frontier & data
    produced = {o for n in optimized.graph.node for o in n.output} | {i.name for i in optimized.graph.input}
    if not fed or not fed <= produced:
        return None  # the optimizer renamed a data-dependent frontier tensor: cannot compare
    names = sorted(fed)
    runs = []
    for model in (original, optimized):
        with extra_outputs(model, names):
            try:
                out_names, outputs = run_model(model, samples, custom_op_libraries)
            except RuntimeUnavailable:
                return None
        index = [out_names.index(n) for n in names]
        runs.append([[sample[i] for i in index] for sample in outputs])
    comparisons = _compare_runs(names, runs[0], runs[1], rtol, atol)
    if not all(c.matches for c in comparisons):
        return None
    ops = sorted({n.op_type for n in original.graph.node if n.op_type in SELECTION_OPS})
    return (f"the differing outputs lie behind {'/'.join(ops)} and all {len(names)} tensors flowing into that "
            f"part of the graph match, so the difference is a selection flipping on near-tied scores, not an "
            f"error of the optimization (validate on real inputs with --inputs to see)")
