"""Weights stay on disk: read a model without loading its large initializers, write one by
streaming them.

protobuf can only parse or serialize a whole message, so `onnx.load` + `onnx.save` of a 500 MB
model costs 3-4 copies of the weights (file bytes, parsed proto, exported copy, serialized
bytes). Here the top-level initializers' raw bytes are located by walking the protobuf wire
format (the bytes themselves are skipped, not read), each becomes a stub with an external-data
reference to its place in the file, and the graph reads it only when a pass needs its values.
Writing emits the same wire format with each tensor's bytes copied in chunks from where they
live. Peak memory is then the graph structure plus the weights a pass actually touched.
"""
from __future__ import annotations

import mmap
import os
from pathlib import Path
from typing import BinaryIO, Iterable, Optional, Union

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

#: initializers smaller than this are parsed normally (stubs would cost more than they save)
MIN_LAZY_BYTES = 4096
#: the key an external-data stub uses to carry the absolute source path
SOURCE_KEY = "location"

# wire-format field numbers
_MODEL_GRAPH = 7
_GRAPH_INITIALIZER = 5
_TENSOR_RAW_DATA = 9
_TENSOR_DATA_LOCATION = 14
_LEN = 2


class WireError(ValueError):
    """The bytes are not the protobuf message we expected."""


# ----------------------------------------------------------------------------- wire format
def _read_varint(buf, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise WireError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _fields(buf, start: int, end: int) -> Iterable[tuple[int, int, int, int, int]]:
    """(field number, wire type, field start, payload start, payload end) of each field."""
    pos = start
    while pos < end:
        field_start = pos
        key, pos = _read_varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, pos2 = _read_varint(buf, pos, end)
            yield number, wire, field_start, pos, pos2
            pos = pos2
        elif wire == 1:
            yield number, wire, field_start, pos, pos + 8
            pos += 8
        elif wire == _LEN:
            length, pos = _read_varint(buf, pos, end)
            yield number, wire, field_start, pos, pos + length
            pos += length
        elif wire == 5:
            yield number, wire, field_start, pos, pos + 4
            pos += 4
        else:
            raise WireError(f"unsupported wire type {wire}")
        if pos > end:
            raise WireError("field runs past the end of its message")


def _varint_bytes(value: int) -> bytes:
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _len_field_header(number: int, length: int) -> bytes:
    return _varint_bytes((number << 3) | _LEN) + _varint_bytes(length)


# ----------------------------------------------------------------------------- reading
def read_model_lazy(path: Union[str, os.PathLike], min_bytes: int = MIN_LAZY_BYTES) -> onnx.ModelProto:
    """Parse a model whose large top-level initializers stay in the file as external-data stubs.

    Raises WireError (or protobuf's DecodeError) on malformed input; callers fall back to
    onnx.load for the canonical error message.
    """
    path = Path(path).resolve()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            model_rest = bytearray()
            graph_rest = bytearray()
            stubs: list[onnx.TensorProto] = []
            for number, wire, fstart, pstart, pend in _fields(buf, 0, size):
                if number != _MODEL_GRAPH or wire != _LEN:
                    model_rest += buf[fstart:pend]
                    continue
                for gnum, gwire, gfstart, gpstart, gpend in _fields(buf, pstart, pend):
                    stub = None
                    if gnum == _GRAPH_INITIALIZER and gwire == _LEN and gpend - gpstart >= min_bytes:
                        stub = _tensor_stub(buf, gpstart, gpend, path, min_bytes)
                    if stub is None:
                        graph_rest += buf[gfstart:gpend]
                    else:
                        stubs.append(stub)
    model = onnx.ModelProto()
    model.ParseFromString(bytes(model_rest))
    graph = onnx.GraphProto()
    graph.ParseFromString(bytes(graph_rest))
    graph.initializer.extend(stubs)
    model.graph.MergeFrom(graph)
    return model


def _tensor_stub(buf, start: int, end: int, path: Path, min_bytes: int) -> Optional[onnx.TensorProto]:
    """A TensorProto without its raw_data, pointing at where raw_data lies in `path`."""
    header = bytearray()
    raw: Optional[tuple[int, int]] = None
    for number, wire, fstart, pstart, pend in _fields(buf, start, end):
        if number == _TENSOR_RAW_DATA and wire == _LEN:
            raw = (pstart, pend - pstart)
        elif number == _TENSOR_DATA_LOCATION:
            return None  # already external: keep as written
        else:
            header += buf[fstart:pend]
    if raw is None or raw[1] < min_bytes:
        return None
    stub = onnx.TensorProto()
    stub.ParseFromString(bytes(header))
    if _numpy_dtype(stub.data_type) is None:
        return None
    stub.data_location = onnx.TensorProto.EXTERNAL
    for key, value in ((SOURCE_KEY, str(path)), ("offset", str(raw[0])), ("length", str(raw[1]))):
        entry = stub.external_data.add()
        entry.key, entry.value = key, value
    return stub


def _numpy_dtype(data_type: int) -> Optional[np.dtype]:
    """numpy dtype for element types whose raw bytes numpy reads as-is (not bf16/fp8/int4)."""
    try:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(data_type))
    except Exception:
        return None
    return dtype if dtype.kind in "fiub" and dtype.name in np.sctypeDict else None


# ----------------------------------------------------------------------------- values on disk
class FileBackedValues(LazyValues):
    """gs lazy values read from a byte range of a file, and only when asked for."""

    def __init__(self, stub: onnx.TensorProto, base_dir: Path):
        info = {e.key: e.value for e in stub.external_data}
        location = Path(info["location"])
        self.path = location if location.is_absolute() else base_dir / location
        self.offset = int(info.get("offset", 0))
        self.name = stub.name
        self.numpy_dtype = _numpy_dtype(stub.data_type)
        self.shape = tuple(stub.dims)
        self.dtype = self.numpy_dtype
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * self.numpy_dtype.itemsize
        self.data_type = stub.data_type

    def load(self) -> np.ndarray:
        count = self.nbytes // self.numpy_dtype.itemsize
        array = np.fromfile(self.path, dtype=self.numpy_dtype.newbyteorder("<"), count=count, offset=self.offset)
        if array.size != count:
            raise OSError(f"weight {self.name!r}: {self.path} ends before its data")
        return array.astype(self.numpy_dtype, copy=False).reshape(self.shape)

    @property
    def tensor(self) -> onnx.TensorProto:
        """A full TensorProto (materialized: for code paths that need the data in a proto)."""
        return onnx.numpy_helper.from_array(self.load(), self.name)

    def copy_raw_to(self, out: BinaryIO) -> None:
        with open(self.path, "rb") as src:
            src.seek(self.offset)
            remaining = self.nbytes
            while remaining:
                chunk = src.read(min(remaining, 16 << 20))
                if not chunk:
                    raise OSError(f"weight {self.name!r}: {self.path} ends before its data")
                out.write(chunk)
                remaining -= len(chunk)

    def __str__(self) -> str:
        return f"FileBackedValues (shape={self.shape}, dtype={self.dtype})"


def attach_file_backed_values(graph: gs.Graph, base_dir: Path) -> int:
    """Replace gs's lazy values of external-data stubs with FileBackedValues. Returns the count."""
    count = 0
    for tensor in graph.tensors().values():
        values = getattr(tensor, "_values", None)
        if isinstance(values, LazyValues) and not isinstance(values, FileBackedValues):
            stub = values.tensor
            if stub.data_location == onnx.TensorProto.EXTERNAL and _numpy_dtype(stub.data_type) is not None:
                tensor._values = FileBackedValues(stub, base_dir)
                # where the bytes live is ours to track: once loaded, gs must export them inline
                tensor.data_location = None
                count += 1
    return count


# ----------------------------------------------------------------------------- writing
Source = Union[FileBackedValues, LazyValues, np.ndarray]


def _tensor_header(name: str, source: Source) -> tuple[bytes, int, Optional[onnx.TensorProto]]:
    """(serialized fields other than raw_data, raw byte count, or a full proto to write as-is)."""
    if isinstance(source, FileBackedValues):
        head = onnx.TensorProto(name=name, data_type=source.data_type, dims=list(source.shape))
        return head.SerializeToString(), source.nbytes, None
    if isinstance(source, LazyValues):
        proto = source.tensor
        proto.name = name
        return b"", 0, proto
    return b"", 0, onnx.numpy_helper.from_array(np.asarray(source), name)


def write_model_streaming(skeleton: onnx.ModelProto, initializers: list[tuple[str, Source]], out: BinaryIO) -> None:
    """Write `skeleton` (a model whose top-level graph lacks these initializers) plus the
    initializers, streaming file-backed bytes. The result parses as one ModelProto."""
    graph_bytes = skeleton.graph.SerializeToString()
    rest = onnx.ModelProto()
    rest.CopyFrom(skeleton)
    rest.ClearField("graph")
    pieces = []
    graph_len = len(graph_bytes)
    for name, source in initializers:
        head, raw_len, proto = _tensor_header(name, source)
        if proto is not None:
            body = proto.SerializeToString()
            pieces.append((_len_field_header(_GRAPH_INITIALIZER, len(body)), body, None))
            graph_len += len(pieces[-1][0]) + len(body)
        else:
            raw_head = _len_field_header(_TENSOR_RAW_DATA, raw_len)
            tensor_len = len(head) + len(raw_head) + raw_len
            outer = _len_field_header(_GRAPH_INITIALIZER, tensor_len)
            pieces.append((outer, head + raw_head, source))
            graph_len += len(outer) + tensor_len
    out.write(rest.SerializeToString())
    out.write(_len_field_header(_MODEL_GRAPH, graph_len))
    out.write(graph_bytes)
    for outer, body, source in pieces:
        out.write(outer)
        out.write(body)
        if source is not None:
            source.copy_raw_to(out)


def write_model_external(skeleton: onnx.ModelProto, initializers: list[tuple[str, Source]], out: BinaryIO,
                         data: BinaryIO, data_name: str) -> None:
    """Write a model over protobuf's 2 GB limit: tensors above MIN_LAZY_BYTES go to `data`."""
    model = onnx.ModelProto()
    model.CopyFrom(skeleton)
    for name, source in initializers:
        if isinstance(source, FileBackedValues):
            nbytes, write = source.nbytes, source.copy_raw_to
            stub = onnx.TensorProto(name=name, data_type=source.data_type, dims=list(source.shape))
        else:
            proto = source.tensor if isinstance(source, LazyValues) else onnx.numpy_helper.from_array(np.asarray(source))
            proto.name = name
            if proto.ByteSize() < MIN_LAZY_BYTES or not proto.HasField("raw_data"):
                model.graph.initializer.append(proto)
                continue
            raw = proto.raw_data
            nbytes, write = len(raw), (lambda f, raw=raw: f.write(raw))
            proto.ClearField("raw_data")
            stub = proto
        offset = data.tell()
        write(data)
        stub.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(nbytes))):
            entry = stub.external_data.add()
            entry.key, entry.value = key, value
        model.graph.initializer.append(stub)
    out.write(model.SerializeToString())
