"""The safetensors format, both ways: headers, reading a checkpoint's tensors, writing and sharding.

A safetensors file is an 8-byte little-endian header length, a JSON header (name -> dtype,
shape, data_offsets relative to the end of the header, padded with spaces to 8 bytes), then
the tensors' bytes back to back in header order. The header alone is enough to check every
quantized tensor against the config before a byte of weights is read. Knowing every tensor's
dtype and shape up front is enough to write the header first and stream the data after it,
so a checkpoint larger than memory can be written (tools.synth) or rewritten (tools.repack).
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import mlx.core as mx
import numpy as np

from .errors import FlashMoeError
from .quant import TensorInfo

DTYPE_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "BF16": 2, "F16": 2, "U16": 2, "I16": 2,
               "F32": 4, "U32": 4, "I32": 4, "F64": 8, "U64": 8, "I64": 8}
DEFAULT_SHARD_BYTES = 5 * 2**30  # 5 GB shards, as mlx-lm and Hugging Face write them
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


def safetensors_files(directory: str | Path) -> list[Path]:
    """The checkpoint's *.safetensors files, sorted (shards in order)."""
    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        raise FlashMoeError(f"{directory}: no *.safetensors files found")
    return files


def read_header(path: str | Path) -> dict[str, dict]:
    """The JSON header of one safetensors file (tensor name -> dtype, shape, data_offsets)."""
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise FlashMoeError(f"{path}: too short to be a safetensors file")
        (length,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise FlashMoeError(f"{path}: unreadable safetensors header ({err})") from None
    header.pop("__metadata__", None)
    return header


def tensor_infos(directory: str | Path) -> dict[str, TensorInfo]:
    """Every tensor of the checkpoint: name -> TensorInfo (shape, dtype, file)."""
    infos = {}
    for path in safetensors_files(directory):
        for name, entry in read_header(path).items():
            if name in infos:
                raise FlashMoeError(f"{path}: tensor '{name}' also appears in {infos[name].file}")
            infos[name] = TensorInfo(tuple(entry["shape"]), entry["dtype"], str(path))
    return infos



def read_tensors(directory: str | Path) -> dict[str, mx.array]:
    """Every tensor of every *.safetensors file.

    Read with mx.load: the safetensors package's MLX reader goes through numpy, which has
    no bfloat16 ("data type 'bfloat16' not understood"), and MLX checkpoints are bf16.
    """
    tensors = {}
    for path in safetensors_files(directory):
        tensors.update(mx.load(str(path)))
    return tensors



def save_shards(tensors: dict[str, mx.array], directory: str | Path, prefix: str = "model",
                max_bytes: int = DEFAULT_SHARD_BYTES) -> dict[str, str]:
    """{prefix}-0000i-of-0000N.safetensors of at most `max_bytes` each (a tensor never splits), plus
    {prefix}.safetensors.index.json; returns the weight map (tensor name -> file)."""
    directory = Path(directory)
    shards, current, size = [], {}, 0
    for name in sorted(tensors):
        nbytes = tensors[name].nbytes
        if nbytes > max_bytes:
            raise FlashMoeError(f"{directory}: tensor '{name}' has {nbytes} bytes; a shard holds at most {max_bytes}")
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensors[name]
        size += nbytes
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"{prefix}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        mx.save_safetensors(str(directory / file), shard, metadata={"format": "mlx"})
        weight_map.update({name: file for name in shard})
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}
    (directory / f"{prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return weight_map

