"""Gates for deployment pipelines: `--fail-if "cosine<0.999"` and `--max-accuracy-drop`.

Every figure a gate reads is derived from the JSON report and written back into it (section
"metrics"), so a failed pipeline can always show the number that failed it. A gate whose metric
could not be measured fails: a pipeline must not pass because a check did not happen.
"""
from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from .errors import OptimizeError, ValidationFailed

#: metric -> what it means (the README table is generated from the same words)
METRICS = {
    "cosine": "lowest cosine similarity of any output, original vs optimized (validation samples)",
    "max_abs_diff": "largest absolute difference of any output element",
    "max_rel_diff": "largest relative difference of any output element",
    "top1_agreement": "lowest share of samples whose argmax agrees, over [batch, classes] outputs",
    "nodes_ratio": "nodes after / nodes before (subgraphs included)",
    "size_ratio": "file size after / before (weight bytes when a file size is unknown)",
    "weights_ratio": "weight bytes after / before",
    "latency_ratio": "worst (largest) p50 latency ratio optimized/original over all benchmarked providers, "
                     "batches and thread counts; latency_ratio_cpu / _cuda / _tensorrt: that provider only",
    "throughput_ratio": "worst (smallest) throughput ratio optimized/original; also per provider",
    "session_ratio": "worst session-creation time ratio optimized/original",
    "benchmark_errors": "number of requested providers that could not be benchmarked",
    "accuracy_original": "top-1 accuracy of the original model on --labels",
    "accuracy_optimized": "top-1 accuracy of the optimized model on --labels",
    "accuracy_drop": "accuracy_original - accuracy_optimized (what --max-accuracy-drop checks)",
}
OPS = {"<=": operator.le, ">=": operator.ge, "==": operator.eq, "!=": operator.ne, "<": operator.lt, ">": operator.gt}
_GATE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(<=|>=|==|!=|<|>)\s*([-+0-9.eE]+|inf|nan)\s*$")


class GatesFailed(ValidationFailed):
    """One or more gates failed: exit code 1, nothing written unless --force."""


@dataclass(frozen=True)
class Gate:
    text: str
    metric: str
    op: str
    threshold: float

    def check(self, metrics: dict[str, Any]) -> dict:
        value = metrics.get(self.metric)
        if value is None:
            return self._result(None, True, f"{self.metric} was not measured in this run")
        failed = bool(OPS[self.op](value, self.threshold)) or (isinstance(value, float) and math.isnan(value))
        return self._result(value, failed, f"{self.metric} = {value:.6g}" + (f" {self.op} {self.threshold:g}" if failed else ""))

    def _result(self, value: Any, failed: bool, message: str) -> dict:
        return {"gate": self.text, "metric": self.metric, "op": self.op, "threshold": self.threshold,
                "value": value, "passed": not failed, "message": message}


def parse_gate(text: str) -> Gate:
    """`metric<op>number`, failing when the comparison holds; e.g. `cosine<0.999`."""
    m = _GATE.match(text)
    if not m:
        raise OptimizeError(f"bad --fail-if {text!r}: expected METRIC OP NUMBER, e.g. \"cosine<0.999\"")
    metric, op, number = m.groups()
    base = re.sub(r"_(cpu|cuda|tensorrt)$", "", metric)
    if metric not in METRICS and base not in ("latency_ratio", "throughput_ratio", "session_ratio"):
        raise OptimizeError(f"unknown metric {metric!r} in --fail-if; known: {', '.join(METRICS)}")
    return Gate(text.strip(), metric, op, float(number))


def build_gates(fail_if: Sequence[str], max_accuracy_drop: Optional[float]) -> list[Gate]:
    gates = [parse_gate(t) for t in fail_if]
    if max_accuracy_drop is not None:
        gates.append(Gate(f"accuracy_drop>{max_accuracy_drop:g}", "accuracy_drop", ">", float(max_accuracy_drop)))
    return gates


def metrics_of(report: dict) -> dict[str, Any]:
    """The figures gates read, computed from the report (its JSON dict)."""
    out: dict[str, Any] = {}
    v = report.get("validation") or {}
    outputs = v.get("outputs") or []
    if outputs and v.get("status") in ("passed", "failed", "fidelity"):
        out["cosine"] = min(o["cosine"] for o in outputs)
        out["max_abs_diff"] = max(o["max_abs_diff"] for o in outputs)
        out["max_rel_diff"] = max(o["max_rel_diff"] for o in outputs)
        agree = [o["top1_agreement"] for o in outputs if o.get("top1_agreement") is not None]
        if agree:
            out["top1_agreement"] = min(agree)
    b, a = report.get("before") or {}, report.get("after") or {}
    if b and a:
        out["nodes_ratio"] = _ratio(a["nodes"], b["nodes"])
        out["weights_ratio"] = _ratio(a["weight_bytes"], b["weight_bytes"])
        both_files = b.get("file_bytes") is not None and a.get("file_bytes") is not None
        out["size_ratio"] = (_ratio(a["file_bytes"], b["file_bytes"]) if both_files else out["weights_ratio"])
    bench = report.get("benchmark")
    if bench:
        out["benchmark_errors"] = len({e["provider"] for e in bench.get("errors", [])})
        for key, metric, worst in (("p50_ms", "latency_ratio", max), ("throughput_per_s", "throughput_ratio", min),
                                   ("session_seconds", "session_ratio", max)):
            values = [(r["provider"], r["ratios"][key]) for r in bench.get("results", []) if r["ratios"].get(key)]
            if values:
                out[metric] = worst(x for _, x in values)
            for prov in sorted({p for p, _ in values}):
                out[f"{metric}_{prov}"] = worst(x for p, x in values if p == prov)
    acc = report.get("accuracy")
    if acc:
        out.update(accuracy_original=acc["original"], accuracy_optimized=acc["optimized"],
                   accuracy_drop=acc["original"] - acc["optimized"])
    return out


def _ratio(after: float, before: float) -> Optional[float]:
    return after / before if before else None


def evaluate(gates: Sequence[Gate], metrics: dict[str, Any]) -> dict:
    checks = [g.check(metrics) for g in gates]
    return {"passed": all(c["passed"] for c in checks), "checks": checks}


# ----------------------------------------------------------------------------- accuracy
def parse_labels(spec: str) -> tuple[Path, str]:
    """`FILE.npz` (array "label", else "labels") or `FILE.npz:KEY`."""
    path, sep, key = spec.rpartition(":") if re.search(r"\.npz:[^/\\]+$", spec) else (spec, "", "")
    return Path(path), key


def load_labels(spec: str) -> np.ndarray:
    path, key = parse_labels(spec)
    if not path.exists():
        raise OptimizeError(f"--labels file not found: {path}")
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise OptimizeError(f"--labels {path} is not a readable .npz file: {exc}") from exc
    for k in ([key] if key else ["label", "labels"]):
        if k in data:
            return np.asarray(data[k]).reshape(-1)
    raise OptimizeError(f"--labels {path} has no array {key or 'label'!r} (it has {sorted(data.files)})")


def accuracy(original_path: Path, optimized_path: Path, samples: list[dict], labels: np.ndarray,
             output: Optional[str], custom_op_libraries: Sequence[str] = ()) -> dict:
    """Top-1 accuracy of both models on the validation samples (`--inputs`) against `labels`."""
    from .validate import run_model

    result: dict[str, Any] = {"samples": int(labels.size), "output": output}
    for label, path in (("original", original_path), ("optimized", optimized_path)):
        names, outputs = run_model(path, samples, custom_op_libraries)
        name = output or _class_output(names, outputs)
        if name not in names:
            raise OptimizeError(f"--labels-output {name!r} is not an output of the model (it has {names})")
        scores = np.concatenate([np.asarray(o[names.index(name)]) for o in outputs])
        if scores.ndim != 2 or scores.shape[0] != labels.size:
            raise OptimizeError(f"output {name!r} gives scores of shape {scores.shape}, which do not pair with "
                                f"{labels.size} labels; give --inputs with one sample per label and a "
                                f"[batch, classes] output (--labels-output)")
        result["output"] = name
        result[label] = float(np.mean(scores.argmax(1) == labels))
    return result


def _class_output(names: list[str], outputs: list) -> str:
    for i, name in enumerate(names):
        arr = outputs[0][i]
        if isinstance(arr, np.ndarray) and arr.ndim == 2 and arr.dtype.kind == "f" and arr.shape[1] > 1:
            return name
    raise OptimizeError("no [batch, classes] float output to score against --labels; name one with --labels-output")
