"""ONNX Runtime sessions for evaluating models exactly: CPU provider, graph optimizations off
(so the runtime neither hides nor adds differences), quiet logs. One factory for validation,
calibration and every pass that runs a model."""
from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Iterator, Sequence, Union

import onnx

from .errors import OptimizeError

#: an in-memory model above this is handed to ONNX Runtime through a file with external data
IN_MEMORY_LIMIT = (1 << 31) - (1 << 24)


def cpu_session(model: Union[onnx.ModelProto, str, Path], threads: int = 0,
                custom_op_libraries: Sequence[str] = ()):
    """An exact-evaluation CPU session for a model file or an in-memory ModelProto."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    for lib in custom_op_libraries:
        if not Path(lib).exists():
            raise OptimizeError(f"--custom-op-library not found: {lib}")
        so.register_custom_ops_library(str(lib))
    providers = ["CPUExecutionProvider"]
    if not isinstance(model, onnx.ModelProto):
        return ort.InferenceSession(str(model), so, providers=providers)
    if model.ByteSize() < IN_MEMORY_LIMIT:
        return ort.InferenceSession(model.SerializeToString(), so, providers=providers)
    with tempfile.TemporaryDirectory(prefix="onnxslim-opt-session-") as tmp:
        path = Path(tmp) / "model.onnx"
        onnx.save_model(model, str(path), save_as_external_data=True, location="model.onnx.data")
        return ort.InferenceSession(str(path), so, providers=providers)  # ORT has read the file by now


@contextlib.contextmanager
def extra_outputs(model: onnx.ModelProto, names: Sequence[str]) -> Iterator[onnx.ModelProto]:
    """`model` with the named intermediate tensors added as graph outputs for the duration of
    the block (types are left to ONNX Runtime). Edits the proto in place and restores it, so
    calibration and probes of big models never copy the weights."""
    existing = {o.name for o in model.graph.output}
    added = [n for n in dict.fromkeys(names) if n not in existing]
    model.graph.output.extend(onnx.ValueInfoProto(name=n) for n in added)
    try:
        yield model
    finally:
        del model.graph.output[len(model.graph.output) - len(added):]
