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
import os
import stat
import struct
from pathlib import Path

import mlx.core as mx
import numpy as np

from .errors import FlashMoeError
from .quant import TensorInfo

DTYPE_SIZES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "BF16": 2,
    "F16": 2,
    "U16": 2,
    "I16": 2,
    "F32": 4,
    "U32": 4,
    "I32": 4,
    "F64": 8,
    "U64": 8,
    "I64": 8,
}
DEFAULT_SHARD_BYTES = 5 * 2**30  # 5 GB shards, as mlx-lm and Hugging Face write them
MLX_DTYPES = {
    mx.bfloat16: "BF16",
    mx.float16: "F16",
    mx.float32: "F32",
    mx.uint32: "U32",
    mx.int32: "I32",
    mx.uint8: "U8",
    mx.uint16: "U16",
    mx.int64: "I64",
    mx.uint64: "U64",
}


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
            header[name] = {
                "dtype": dtype,
                "shape": list(shape),
                "data_offsets": [offset, offset + size],
            }
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
            raise FlashMoeError(
                f"{self.path}: tensor '{name}' {dtype} {shape} takes {size} bytes; "
                f"{self._written + len(raw)} were written"
            )
        self._file.write(raw)
        self._written += len(raw)
        if self._written == size:
            self._index, self._written = self._index + 1, 0

    def close(self) -> None:
        """Finish the file; an error if some tensor was not (completely) written."""
        self._file.close()
        if self._index < len(self.entries):
            raise FlashMoeError(
                f"{self.path}: closed before tensor '{self.entries[self._index][0]}' was written"
            )

    def __enter__(self) -> SafetensorsWriter:
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


MAX_HEADER_BYTES = 100_000_000  # the safetensors format's own limit on the JSON header
_MAX_TENSOR_BYTES = 2**63 - 1


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list) -> dict:
    """object_pairs_hook: a JSON object that names a key twice is refused (json keeps the last one)."""
    result = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def regular_file_size(path: Path, what: str = "file") -> int:
    """The size of `path`, refusing anything but a regular file (a FIFO or device would block or never end)."""
    try:
        info = os.stat(path)
    except OSError as err:
        raise FlashMoeError(f"{path}: cannot read the {what} ({err.strerror or err})") from None
    if not stat.S_ISREG(info.st_mode):
        raise FlashMoeError(f"{path}: not a regular file (a {what} must be one)")
    return info.st_size


def read_header_info(path: str | Path) -> tuple[dict[str, dict], int]:
    """The validated JSON header of one safetensors file and where its tensor data begins.

    Every failure is a FlashMoeError naming the file (and the tensor): the 8-byte length is
    bounded, the header is a UTF-8 JSON object without duplicate keys, each entry has a known
    dtype, a shape of non-negative ints and data_offsets whose span is exactly the bytes that
    shape takes, and the tensors tile the data section from 0 to the end of the file with
    no gap and no overlap.
    """
    path = Path(path)
    file_size = regular_file_size(path, "safetensors file")
    try:
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) != 8:
                raise FlashMoeError(f"{path}: {len(prefix)} bytes, too short to be a safetensors file")
            length = int.from_bytes(prefix, "little")
            if length > MAX_HEADER_BYTES:
                raise FlashMoeError(
                    f"{path}: the header claims {length} bytes; safetensors headers are at most "
                    f"{MAX_HEADER_BYTES} (not a safetensors file, or a corrupt one)"
                )
            if 8 + length > file_size:
                raise FlashMoeError(
                    f"{path}: the header claims {length} bytes but the file has only "
                    f"{file_size - 8} after the length (truncated file?)"
                )
            raw = f.read(length)
    except OSError as err:
        raise FlashMoeError(f"{path}: cannot read the safetensors file ({err.strerror or err})") from None
    if len(raw) != length:
        raise FlashMoeError(f"{path}: the header is cut short ({len(raw)} of {length} bytes)")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except _DuplicateKey as err:
        raise FlashMoeError(f"{path}: the header names tensor '{err.args[0]}' twice") from None
    except UnicodeDecodeError as err:
        raise FlashMoeError(f"{path}: the header is not UTF-8 ({err.reason} at byte {err.start})") from None
    except (ValueError, RecursionError) as err:
        raise FlashMoeError(f"{path}: unreadable safetensors header ({type(err).__name__}: {err})") from None
    if not isinstance(header, dict):
        raise FlashMoeError(f"{path}: the header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not isinstance(metadata, dict):
        raise FlashMoeError(
            f"{path}: the header's __metadata__ is a {type(metadata).__name__}, not an object"
        )
    data_bytes = file_size - 8 - length
    spans = []
    for name, entry in header.items():
        where = f"{path}: tensor '{name}'"
        if not isinstance(entry, dict):
            raise FlashMoeError(f"{where}: its header entry is a {type(entry).__name__}, not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
            raise FlashMoeError(f"{where}: unknown dtype {dtype!r} (known: {', '.join(DTYPE_SIZES)})")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise FlashMoeError(f"{where}: shape {shape!r} is not a list of non-negative integers")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_is_int(o) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise FlashMoeError(
                f"{where}: data_offsets {offsets!r} is not [begin, end] with 0 <= begin <= end"
            )
        size = DTYPE_SIZES[dtype]
        for d in shape:
            size *= d
            if size > _MAX_TENSOR_BYTES:
                raise FlashMoeError(f"{where}: shape {shape} is too large ({dtype})")
        if size != offsets[1] - offsets[0]:
            raise FlashMoeError(
                f"{where}: {dtype} {shape} takes {size} bytes, its data_offsets {offsets} "
                f"span {offsets[1] - offsets[0]}"
            )
        spans.append((offsets[0], offsets[1], name))
    spans.sort()
    end = 0
    for begin, stop, name in spans:
        if begin != end:
            kind = (
                "overlaps the tensor before it"
                if begin < end
                else f"leaves a gap of {begin - end} bytes before it"
            )
            raise FlashMoeError(
                f"{path}: tensor '{name}' at data_offsets [{begin}, {stop}] {kind} (at byte {end})"
            )
        end = stop
    if end != data_bytes:
        last = f" (after tensor '{spans[-1][2]}')" if spans else ""
        if end > data_bytes:
            raise FlashMoeError(
                f"{path}: the tensors need {end} data bytes{last}, the file holds {data_bytes} (truncated file?)"
            )
        raise FlashMoeError(
            f"{path}: {data_bytes - end} bytes after the last tensor's data{last} that no tensor describes"
        )
    return header, 8 + length


def read_header(path: str | Path) -> dict[str, dict]:
    """The validated JSON header of one safetensors file (tensor name -> dtype, shape, data_offsets)."""
    return read_header_info(path)[0]


def data_start(path: str | Path) -> int:
    """Where a safetensors file's tensor data begins (after the 8-byte length and the validated header)."""
    return read_header_info(path)[1]


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
        read_header_info(path)  # mx.load trusts the header: check it first
        try:
            tensors.update(mx.load(str(path)))
        except (RuntimeError, ValueError, OSError, MemoryError) as err:
            raise FlashMoeError(f"{path}: MLX cannot read it ({type(err).__name__}: {err})") from None
    return tensors


def save_shards(
    tensors: dict[str, mx.array],
    directory: str | Path,
    prefix: str = "model",
    max_bytes: int = DEFAULT_SHARD_BYTES,
) -> dict[str, str]:
    """{prefix}-0000i-of-0000N.safetensors of at most `max_bytes` each (a tensor never splits), plus
    {prefix}.safetensors.index.json; returns the weight map (tensor name -> file)."""
    directory = Path(directory)
    shards, current, size = [], {}, 0
    for name in sorted(tensors):
        nbytes = tensors[name].nbytes
        if nbytes > max_bytes:
            raise FlashMoeError(
                f"{directory}: tensor '{name}' has {nbytes} bytes; a shard holds at most {max_bytes}"
            )
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
    index = {
        "metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
        "weight_map": weight_map,
    }
    (directory / f"{prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return weight_map
