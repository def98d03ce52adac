"""The names, dtypes and shapes of the tensors in a weights file, read without torch.

Two formats: safetensors (an 8-byte little-endian length, a JSON header, the data) and the zip
that torch.save writes (torch >= 1.6: `<archive>/data.pkl` plus one `<archive>/data/<key>` record
per storage). The pickle is read by an unpickler that knows only what a state dict needs: each
class or function the pickle names maps to a stub here that records a tensor's dtype and shape;
any other name is refused, so nothing in the file is ever executed.
"""

from __future__ import annotations

import io
import json
import math
import pickle
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, NamedTuple

# safetensors' dtype names -> (torch's name, bytes per element).
_SAFETENSORS_DTYPES = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
}
# torch's legacy storage classes, which torch.save still names for these dtypes.
_TORCH_STORAGES = {
    "DoubleStorage": ("float64", 8),
    "FloatStorage": ("float32", 4),
    "HalfStorage": ("float16", 2),
    "BFloat16Storage": ("bfloat16", 2),
    "LongStorage": ("int64", 8),
    "IntStorage": ("int32", 4),
    "ShortStorage": ("int16", 2),
    "CharStorage": ("int8", 1),
    "ByteStorage": ("uint8", 1),
    "BoolStorage": ("bool", 1),
}
# What torch < 1.6 wrote first: its magic number, pickled.
_LEGACY_TORCH_MAGIC = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)


class TensorHeader(NamedTuple):
    dtype: str  # torch's name: "float32", "bfloat16", ...
    shape: tuple[int, ...]


class LegacyTorchFormat(ValueError):
    """A file torch < 1.6 wrote: a bare pickle stream, which only torch itself can take apart."""


def safetensors_headers(data: bytes) -> dict[str, TensorHeader]:
    """Every tensor of a safetensors file, after checking that its bytes lie within the file."""
    if len(data) < 8:
        raise ValueError(f"{len(data)} bytes are too few for a safetensors header")
    header_size = int.from_bytes(data[:8], "little")
    body_size = len(data) - 8 - header_size
    if body_size < 0:
        raise ValueError(f"the header claims {header_size} bytes of a {len(data)}-byte file")
    header = json.loads(data[8 : 8 + header_size])
    if not isinstance(header, dict):
        raise ValueError("the safetensors header is not a JSON object")
    tensors: dict[str, TensorHeader] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, item_size = _SAFETENSORS_DTYPES[entry["dtype"]]
            shape = tuple(int(n) for n in entry["shape"])
            begin, end = (int(n) for n in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"tensor {name!r} has an unusable header entry ({error!r})") from None
        if min(shape, default=0) < 0 or not 0 <= begin <= end <= body_size:
            raise ValueError(f"tensor {name!r} lies outside the file's {body_size} data bytes")
        if end - begin != math.prod(shape) * item_size:
            raise ValueError(f"tensor {name!r} {shape} {dtype} has {end - begin} bytes")
        tensors[name] = TensorHeader(dtype, shape)
    return tensors


def torch_file_contents(data: bytes) -> Any:
    """What torch.load would return, with a TensorHeader in place of each tensor."""
    if data.startswith(_LEGACY_TORCH_MAGIC):
        raise LegacyTorchFormat(
            "written by torch < 1.6 in its legacy format, which ast-label does not read; "
            "re-save it with a current torch (torch.save(torch.load(path), path)) or convert it "
            "to safetensors"
        )
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as error:
        raise ValueError(f"not a zip written by torch.save ({error})") from None
    pickles = [n for n in archive.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
    if len(pickles) != 1:
        raise ValueError("a zip, but not one that torch.save wrote: no <archive>/data.pkl")
    return _StateDictUnpickler(archive, pickles[0].split("/")[0]).load()


@dataclass(frozen=True, slots=True)
class _StorageType:
    dtype: str
    item_size: int


@dataclass(frozen=True, slots=True)
class _Storage:
    dtype: str
    numel: int


def _rebuild_tensor(storage: _Storage, offset: int, size: tuple, stride: tuple, *_) -> TensorHeader:
    """torch._utils._rebuild_tensor(_v2)'s arguments; the rest (requires_grad, hooks) is unused."""
    if not isinstance(storage, _Storage) or len(size) != len(stride):
        raise ValueError("a tensor without a storage, or with a stride that does not fit its size")
    shape = tuple(int(n) for n in size)
    if all(shape):  # an empty tensor reads nothing
        last = offset + sum((n - 1) * step for n, step in zip(shape, stride, strict=True))
        if not 0 <= offset <= last < storage.numel:
            raise ValueError(f"a {shape} tensor reaches past its {storage.numel}-element storage")
    return TensorHeader(storage.dtype, shape)


def _rebuild_parameter(tensor: TensorHeader, *_) -> TensorHeader:
    """torch._utils._rebuild_parameter(_with_state): a Parameter's data is its tensor."""
    return tensor


# Everything a pickled state dict names. collections.OrderedDict is the real class: building one
# runs no code of the file's choosing.
_ALLOWED: dict[str, object] = {
    "collections.OrderedDict": OrderedDict,
    "torch._utils._rebuild_tensor": _rebuild_tensor,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    **{f"torch.{name}": _StorageType(*spec) for name, spec in _TORCH_STORAGES.items()},
}


class _StateDictUnpickler(pickle.Unpickler):
    def __init__(self, archive: zipfile.ZipFile, root: str):
        super().__init__(io.BytesIO(archive.read(f"{root}/data.pkl")))
        self._record_sizes = {info.filename: info.file_size for info in archive.infolist()}
        self._root = root

    def find_class(self, module: str, name: str) -> object:
        allowed = _ALLOWED.get(f"{module}.{name}")
        if allowed is None:
            raise ValueError(
                f"ast-label refuses to unpickle {module}.{name}: a weights file holds tensors, "
                "numbers, strings and containers only"
            )
        return allowed

    def persistent_load(self, pid: Any) -> _Storage:
        match pid:
            case ("storage", _StorageType() as storage_type, str(key), str(), int(numel)):
                record = f"{self._root}/data/{key}"
                size = self._record_sizes.get(record)
                if size != numel * storage_type.item_size:
                    raise ValueError(
                        f"storage record {record} has {size} bytes, not {numel} "
                        f"{storage_type.dtype} elements"
                    )
                return _Storage(storage_type.dtype, numel)
        raise ValueError(f"unknown persistent id {str(pid)[:80]}")
