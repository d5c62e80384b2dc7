"""Writing a safetensors file one tensor (or one piece of a tensor) at a time.

A safetensors file is an 8-byte little-endian header length, a JSON header (name -> dtype,
shape, data_offsets relative to the end of the header, padded with spaces to 8 bytes), then
the tensors' bytes back to back in header order. Knowing every tensor's dtype and shape up
front is enough to write the header first and stream the data after it, so a checkpoint
larger than memory can be written (flashmoe.synth) or rewritten (flashmoe.repack).
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import mlx.core as mx
import numpy as np

from .errors import FlashMoeError

DTYPE_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "BF16": 2, "F16": 2, "U16": 2, "I16": 2,
               "F32": 4, "U32": 4, "I32": 4, "F64": 8, "U64": 8, "I64": 8}
MLX_DTYPES = {mx.bfloat16: "BF16", mx.float16: "F16", mx.float32: "F32", mx.uint32: "U32",
              mx.int32: "I32", mx.uint8: "U8", mx.uint16: "U16", mx.int64: "I64", mx.uint64: "U64"}


def nbytes(dtype: str, shape) -> int:
    """Bytes of a tensor of safetensors `dtype` and `shape`."""
    return DTYPE_SIZES[dtype] * math.prod(shape)


def host_bytes(value: mx.array) -> np.ndarray:
    """An MLX array's raw bytes as a flat uint8 numpy array (bf16 has no numpy dtype: go through uint16)."""
    if value.dtype == mx.bfloat16:
        value = value.view(mx.uint16)
    return np.ascontiguousarray(np.asarray(value)).reshape(-1).view(np.uint8)


class SafetensorsWriter:
    """`with SafetensorsWriter(path, [(name, dtype, shape), ...]) as w: w.write(name, data)` in header order."""

    def __init__(self, path: str | Path, entries: list[tuple[str, str, tuple]], metadata: dict | None = None):
        self.path = Path(path)
        self.entries = [(name, dtype, tuple(shape)) for name, dtype, shape in entries]
        header: dict = {"__metadata__": metadata or {"format": "mlx"}}
        offset = 0
        for name, dtype, shape in self.entries:
            if dtype not in DTYPE_SIZES:
                raise FlashMoeError(f"{self.path}: tensor '{name}' has unknown dtype {dtype!r}")
            size = nbytes(dtype, shape)
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.data_start = 8 + len(raw)
        self._file = open(self.path, "wb")
        self._file.write(struct.pack("<Q", len(raw)) + raw)
        self._index, self._written = 0, 0  # the tensor being written, and its bytes so far

    def write(self, name: str, data) -> None:
        """Append `data` (numpy array, bytes or mx.array) to tensor `name`; a tensor may come in several pieces."""
        if self._index >= len(self.entries) or self.entries[self._index][0] != name:
            expected = self.entries[self._index][0] if self._index < len(self.entries) else "nothing"
            raise FlashMoeError(f"{self.path}: wrote '{name}' out of order (expected {expected})")
        raw = host_bytes(data) if isinstance(data, mx.array) else memoryview(data).cast("B")
        _, dtype, shape = self.entries[self._index]
        size = nbytes(dtype, shape)
        if self._written + len(raw) > size:
            raise FlashMoeError(f"{self.path}: tensor '{name}' {dtype} {shape} takes {size} bytes; "
                                f"{self._written + len(raw)} were written")
        self._file.write(raw)
        self._written += len(raw)
        if self._written == size:
            self._index, self._written = self._index + 1, 0

    def close(self) -> None:
        """Finish the file; an error if some tensor was not (completely) written."""
        self._file.close()
        if self._index < len(self.entries):
            raise FlashMoeError(f"{self.path}: closed before tensor '{self.entries[self._index][0]}' was written")

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, kind, *_) -> None:
        if kind is None:
            self.close()
        else:
            self._file.close()
