"""Loading and saving models safely: clear errors on bad input, atomic writes, >2 GB support."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Optional

import onnx
from google.protobuf.message import DecodeError

from .errors import OptimizeError
from .weights_on_disk import read_model_lazy, write_model_external, write_model_streaming

#: Protobuf cannot serialize a single message above 2 GiB; above this we write external data.
PROTOBUF_LIMIT = 2**31 - 1
#: Oldest default-domain opset handled (ONNX Runtime still runs opset-6 exports; older ones it does not).
MIN_OPSET = 6
#: Newest default-domain opset the installed onnx package knows.
MAX_OPSET = onnx.defs.onnx_opset_version()


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Load an ONNX model with every weight in memory, turning every way it can fail into one
    OptimizeError line."""
    return load_model_sized(path, lazy=False)[0]


def load_model_sized(path: str | os.PathLike, lazy: bool = False) -> tuple[onnx.ModelProto, int]:
    """Like load_model, also returning the bytes on disk (model file plus its external data).

    With lazy=True, large initializers (and external data) stay on disk as external-data stubs
    that weights_on_disk.attach_file_backed_values turns into lazily read values."""
    p = Path(path)
    if not p.exists():
        raise OptimizeError(f"input file not found: {p}")
    if p.is_dir():
        raise OptimizeError(f"input path is a directory, not an ONNX file: {p}")
    if p.stat().st_size == 0:
        raise OptimizeError(f"input file is empty: {p}")
    try:
        # weights stay in the file until a pass needs them (see weights_on_disk)
        model = read_model_lazy(p) if lazy else onnx.load_model(str(p), load_external_data=False)
    except Exception:
        model = None  # the full parser gives the canonical error (or copes with what ours did not)
    try:
        if model is None:
            lazy = False
            model = onnx.load_model(str(p), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise OptimizeError(f"{p} is not a valid ONNX model (protobuf could not be parsed: {_short(exc)})") from exc
    except Exception as exc:  # protobuf raises a zoo of types on garbage input
        raise OptimizeError(f"{p} is not a valid ONNX model ({type(exc).__name__}: {_short(exc)})") from exc
    if not model.HasField("graph") or (len(model.graph.node) == 0 and len(model.graph.output) == 0):
        raise OptimizeError(f"{p} does not contain an ONNX graph (is it really an .onnx file?)")
    check_opset(model, p)
    size = p.stat().st_size
    # external data files (not the model file itself, which lazily read weights point into)
    locations = {loc for loc in _external_locations(model) if (p.parent / loc).resolve() != p.resolve()}
    size += sum((p.parent / loc).stat().st_size for loc in locations if (p.parent / loc).exists())
    if not lazy and locations:
        try:
            onnx.load_external_data_for_model(model, str(p.parent))
        except Exception as exc:
            raise OptimizeError(f"cannot read the external weight data of {p}: {_short(exc)}") from exc
    return model, size


def check_opset(model: onnx.ModelProto, where: object = "model") -> int:
    """Return the default-domain opset, or raise if the tool cannot handle it."""
    version = default_opset(model)
    if version is None:
        raise OptimizeError(f"{where} declares no default-domain opset import")
    if version < MIN_OPSET or version > MAX_OPSET:
        raise OptimizeError(
            f"{where} uses opset {version}; this tool handles opsets {MIN_OPSET} to {MAX_OPSET} "
            f"(convert it with onnx.version_converter first)"
        )
    return version


def default_opset(model: onnx.ModelProto) -> Optional[int]:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return None


def _external_locations(model: onnx.ModelProto) -> set[str]:
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    return {e.value for t in _get_all_tensors(model) if uses_external_data(t)
            for e in t.external_data if e.key == "location"}


def model_byte_size(model: onnx.ModelProto) -> int:
    """Serialized size without serializing: ByteSize() is computed, not materialized."""
    return model.ByteSize()


class StagedModel:
    """A model written beside its destination under a temporary name, moved into place on commit.

    Give either a complete `model`, or a `skeleton` plus its top-level `weights` (from
    graph.export_skeleton), which are streamed to disk without an in-memory copy of the model.
    Validation reads the staged file (path-based, so >2 GB models work); only a committed model
    ever appears at the destination. As a context manager, leaving the block without commit()
    removes every staged file.
    """

    def __init__(self, destination: str | os.PathLike, model: Optional[onnx.ModelProto] = None,
                 skeleton: Optional[onnx.ModelProto] = None, weights: Optional[list] = None,
                 force_external: bool = False):
        self.destination = Path(destination)
        directory = self.destination.parent
        if not directory.exists():
            raise OptimizeError(f"output directory does not exist: {directory}")
        if not os.access(directory, os.W_OK):
            raise OptimizeError(f"output directory is not writable: {directory}")
        if model is not None:
            skeleton, weights = model, []
        size = skeleton.ByteSize() + sum(_source_bytes(src) for _, src in weights)
        self.external = force_external or size > PROTOBUF_LIMIT - (64 << 20)
        self.data_name = self.destination.name + ".data"
        self._tmpdir = Path(tempfile.mkdtemp(prefix=".onnxslim-opt-", dir=directory))
        self.path = self._tmpdir / self.destination.name
        try:
            with open(self.path, "wb") as out:
                if self.external:
                    with open(self._tmpdir / self.data_name, "wb") as data:
                        write_model_external(skeleton, weights, out, data, self.data_name)
                else:
                    write_model_streaming(skeleton, weights, out)
        except OSError as exc:
            self.discard()
            raise OptimizeError(f"cannot write {self.destination}: {exc.strerror or exc}") from exc
        except BaseException:
            self.discard()
            raise

    def size(self) -> int:
        total = self.path.stat().st_size
        data = self._tmpdir / self.data_name
        return total + (data.stat().st_size if data.exists() else 0)

    def commit(self) -> Path:
        try:
            if self.external:
                os.replace(self._tmpdir / self.data_name, self.destination.parent / self.data_name)
            os.replace(self.path, self.destination)
        except OSError as exc:
            raise OptimizeError(f"cannot write {self.destination}: {exc.strerror or exc}") from exc
        finally:
            self.discard()
        return self.destination

    def discard(self) -> None:
        if self._tmpdir.exists():
            for leftover in self._tmpdir.glob("*"):
                leftover.unlink(missing_ok=True)
            self._tmpdir.rmdir()

    def __enter__(self) -> "StagedModel":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.discard()


def _source_bytes(source: object) -> int:
    nbytes = getattr(source, "nbytes", None)
    return int(nbytes) if nbytes is not None else 0


def _short(exc: BaseException, limit: int = 160) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
