"""Input shape specs (`--input-shapes`) and the sample inputs validation feeds the models."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import onnx

from .errors import OptimizeError


def parse_input_shapes(text: Optional[str | list[str]]) -> dict[str, tuple[int, ...]]:
    """Parse `name:1,3,224,224 other:1,128` (space- or semicolon-separated; repeated flags OK)."""
    if not text:
        return {}
    items = text if isinstance(text, list) else [text]
    shapes: dict[str, tuple[int, ...]] = {}
    for item in items:
        for part in re.split(r"[;\s]+", item.strip()):
            if not part:
                continue
            name, sep, dims = part.rpartition(":")
            if not sep or not name or not dims:
                raise OptimizeError(f"bad --input-shapes entry {part!r}; expected name:d0,d1,... e.g. input:1,3,224,224")
            try:
                shape = tuple(int(d) for d in dims.replace("x", ",").split(",") if d != "")
            except ValueError:
                raise OptimizeError(f"bad --input-shapes entry {part!r}: dimensions must be integers") from None
            if any(d <= 0 for d in shape):
                raise OptimizeError(f"bad --input-shapes entry {part!r}: dimensions must be positive")
            shapes[name] = shape
    return shapes


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Real inputs: graph inputs that are not also initializers (old IR models list both)."""
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def check_shape_names(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> None:
    names = {i.name: i for i in graph_inputs(model)}
    for name, shape in shapes.items():
        if name not in names:
            raise OptimizeError(f"--input-shapes names {name!r}, but the model's inputs are {sorted(names)}")
        tt = names[name].type.tensor_type
        if not tt.HasField("shape"):
            continue
        if len(tt.shape.dim) != len(shape):
            raise OptimizeError(f"--input-shapes gives {name!r} {len(shape)} dims, but it has rank {len(tt.shape.dim)}")
        for axis, (dim, wanted) in enumerate(zip(tt.shape.dim, shape)):
            if dim.HasField("dim_value") and dim.dim_value > 0 and dim.dim_value != wanted:
                raise OptimizeError(f"--input-shapes gives {name!r} size {wanted} at axis {axis}, "
                                    f"but the model fixes it to {dim.dim_value}")


@dataclass
class InputSpec:
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]


def resolve_input_specs(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> tuple[list[InputSpec], list[str]]:
    """Concrete shapes for every input. A dynamic leading (batch) dim defaults to 1 with a note;
    any other dynamic dim needs `--input-shapes`, and the error says which input and dim."""
    specs, notes = [], []
    for vi in graph_inputs(model):
        if vi.type.WhichOneof("value") != "tensor_type":
            raise OptimizeError(f"input {vi.name!r} is not a tensor; give sample inputs with --inputs file.npz")
        tt = vi.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        if vi.name in shapes:
            specs.append(InputSpec(vi.name, dtype, shapes[vi.name]))
            continue
        dims = []
        for axis, d in enumerate(tt.shape.dim):
            if d.HasField("dim_value") and d.dim_value > 0:
                dims.append(d.dim_value)
            elif axis == 0:
                dims.append(1)
                notes.append(f"input {vi.name!r}: dynamic batch dim {d.dim_param or '?'!r} set to 1 for validation")
            else:
                raise OptimizeError(
                    f"input {vi.name!r} has a dynamic dim {d.dim_param or '?'!r} at axis {axis}; "
                    f"give its shape with --input-shapes {vi.name}:" + ",".join(
                        str(x.dim_value) if x.HasField("dim_value") else "N" for x in tt.shape.dim))
        specs.append(InputSpec(vi.name, dtype, tuple(dims)))
    return specs, notes


def random_inputs(specs: list[InputSpec], count: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Seeded sample inputs: floats ~N(0,1), integers and booleans in {0, 1} (safe as indices/masks)."""
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(count):
        feed = {}
        for s in specs:
            if np.issubdtype(s.dtype, np.floating):
                feed[s.name] = rng.standard_normal(s.shape).astype(s.dtype)
            elif s.dtype == np.bool_:
                feed[s.name] = rng.integers(0, 2, s.shape).astype(np.bool_)
            elif np.issubdtype(s.dtype, np.integer):
                feed[s.name] = rng.integers(0, 2, s.shape).astype(s.dtype)
            else:
                raise OptimizeError(f"cannot make sample data for input {s.name!r} of type {s.dtype}; use --inputs")
        samples.append(feed)
    return samples


def load_inputs_file(path: str | Path, specs: list[InputSpec]) -> list[dict[str, np.ndarray]]:
    """Samples from an .npz holding one array per input name (leading axis = samples if rank+1)."""
    p = Path(path)
    if not p.exists():
        raise OptimizeError(f"--inputs file not found: {p}")
    try:
        data = dict(np.load(p, allow_pickle=False))
    except Exception as exc:
        raise OptimizeError(f"--inputs {p} is not a readable .npz file: {exc}") from exc
    by_name = {s.name: s for s in specs}
    missing = sorted(set(by_name) - set(data))
    if missing:
        raise OptimizeError(f"--inputs {p} lacks arrays for inputs {missing} (it has {sorted(data)})")
    count = None
    per_input = {}
    for name, spec in by_name.items():
        arr = data[name]
        if arr.ndim == len(spec.shape):
            arr = arr[None]
        if arr.ndim != len(spec.shape) + 1:
            raise OptimizeError(f"--inputs array {name!r} has shape {arr.shape}; expected {spec.shape} "
                                f"or (samples, {', '.join(map(str, spec.shape))})")
        if count is not None and arr.shape[0] != count:
            raise OptimizeError(f"--inputs arrays disagree on the number of samples ({count} vs {arr.shape[0]} for {name!r})")
        count = arr.shape[0]
        per_input[name] = arr.astype(spec.dtype, copy=False)
    return [{n: per_input[n][i] for n in per_input} for i in range(count or 0)]
