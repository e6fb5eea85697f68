"""Parse a .safetensors header with bounds checks before anything is allocated or memory-mapped.

Torch-free: dtypes are the format's own codes ("BF16"), mapped to torch dtypes only when a caller asks, so that
commands that only copy tensors (prune --layers) start without importing torch.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from normsurgery.errors import NormSurgeryError

if TYPE_CHECKING:
    import torch

MAX_HEADER_BYTES = 100_000_000  # safetensors itself caps headers at 100 MB

# safetensors dtype code -> (torch dtype name, bytes per element)
DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1), "U8": ("uint8", 1),
    "BOOL": ("bool", 1), "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1),
}  # fmt: skip
_TORCH_NAMES = {code: name for code, (name, _) in DTYPES.items()}
ITEMSIZE = {code: size for code, (_, size) in DTYPES.items()}
FLOAT_CODES = frozenset(code for code, name in _TORCH_NAMES.items() if "float" in name)


def torch_dtype(code: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype code."""
    import torch

    return getattr(torch, _TORCH_NAMES[code])


def dtype_name(code: str) -> str:
    """The torch name of a safetensors dtype code ("BF16" -> "bfloat16"), without importing torch."""
    return _TORCH_NAMES[code]


def dtype_code(dtype: torch.dtype) -> str:
    """The safetensors dtype code of a torch dtype."""
    name = str(dtype).replace("torch.", "")
    for code, torch_name in _TORCH_NAMES.items():
        if torch_name == name:
            return code
    raise ValueError(f"safetensors has no dtype for {dtype}")


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it is, read from a header without loading the data."""

    name: str
    code: str  # the safetensors dtype code, e.g. "BF16"
    shape: tuple[int, ...]
    file: Path
    begin: int  # byte offset within the file's data section
    nbytes: int
    data_start: int = 0  # byte offset of the data section in the file (8 + header length)

    @property
    def dtype(self) -> torch.dtype:
        """The torch dtype (imports torch)."""
        return torch_dtype(self.code)

    @property
    def is_floating_point(self) -> bool:
        """Whether the tensor holds floating-point values (no torch needed)."""
        return self.code in FLOAT_CODES

    @property
    def file_offset(self) -> int:
        """Absolute byte offset of the tensor's data in its file."""
        return self.data_start + self.begin

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)


def _corrupt(path: Path, what: str) -> NormSurgeryError:
    return NormSurgeryError(
        f"{path} is not a valid safetensors file ({what}); it is truncated or corrupt. Re-download or re-export it."
    )


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """The tensors described by a safetensors file and its metadata, checked against the file's size."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise _corrupt(path, f"{size} bytes, shorter than the 8-byte header length")
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_HEADER_BYTES or length > size - 8:
                raise _corrupt(path, f"header claims {length} bytes but the file has {size}")
            raw = f.read(length)
    except OSError as err:
        raise NormSurgeryError(f"cannot read {path}: {err.strerror or err}. Check the path and its permissions.") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise _corrupt(path, "its header is not JSON") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise _corrupt(path, "its __metadata__ is not an object")
    data_size = size - 8 - length
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        tensors[name] = _tensor_info(path, name, entry, data_size, 8 + length)
    spans = sorted((t.begin, t.begin + t.nbytes, t.name) for t in tensors.values() if t.nbytes)
    for (b0, e0, n0), (b1, _, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise _corrupt(path, f"tensors {n0} and {n1} overlap")
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def _tensor_info(path: Path, name: str, entry: object, data_size: int, data_start: int) -> TensorInfo:
    if not isinstance(entry, dict):
        raise _corrupt(path, f"entry {name!r} is not an object")
    code = entry.get("dtype")
    itemsize = ITEMSIZE.get(code)  # type: ignore[arg-type]
    if itemsize is None:
        raise _corrupt(path, f"tensor {name} has unknown dtype {entry.get('dtype')!r}")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise _corrupt(path, f"tensor {name} has an invalid shape {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise _corrupt(path, f"tensor {name} has invalid data offsets {offsets!r}")
    begin, end = offsets
    if end - begin != math.prod(shape) * itemsize:
        raise _corrupt(path, f"tensor {name} spans {end - begin} bytes but shape {shape} needs {math.prod(shape) * itemsize}")
    if end > data_size:
        raise _corrupt(path, f"tensor {name} ends at byte {end}, past the end of the data ({data_size} bytes)")
    return TensorInfo(name, str(code), tuple(shape), path, begin, end - begin, data_start)
