"""NaN/inf detection on a floating tensor's stored bytes (numpy bit tests, no torch and no float conversion).

A value is NaN or inf exactly when all its exponent bits are set (float8 e4m3fn, which has no inf, when all its
bits but the sign are: its only NaN), so one masked maximum per chunk answers for a whole tensor.
"""

from __future__ import annotations

import numpy as np

from normsurgery.checkpoint.raw import RawTensor

# dtype code -> (unsigned view, mask whose bits are all set exactly in NaN/inf)
_MASKS = {
    "F64": (np.uint64, 0x7FF0000000000000), "F32": (np.uint32, 0x7F800000), "F16": (np.uint16, 0x7C00),
    "BF16": (np.uint16, 0x7F80), "F8_E5M2": (np.uint8, 0x7C), "F8_E4M3": (np.uint8, 0x7F),
}  # fmt: skip
CHUNK_ELEMENTS = 1 << 18  # a chunk and its masked copy stay in the CPU cache


def nonfinite_count(tensor: RawTensor) -> int:
    """How many NaN/inf values a floating tensor holds (0 for other dtypes)."""
    if tensor.code not in _MASKS or not tensor.nbytes:
        return 0
    view, mask = _MASKS[tensor.code]
    values = np.frombuffer(tensor.data, dtype=view)
    mask = view(mask)
    scratch = np.empty(min(CHUNK_ELEMENTS, values.size), dtype=view)
    for start in range(0, values.size, CHUNK_ELEMENTS):
        chunk = values[start : start + CHUNK_ELEMENTS]
        masked = np.bitwise_and(chunk, mask, out=scratch[: chunk.size])
        if masked.max() == mask:
            return int(np.count_nonzero(np.bitwise_and(values, mask) == mask))
    return 0
