"""Reading a checkpoint directory's metadata without loading its tensors.

A safetensors file starts with an 8-byte little-endian header length, then a JSON
header: tensor name -> {"dtype", "shape", "data_offsets"}. That is enough to check
every quantized tensor against the config before a byte of weights is read.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from .errors import FlashMoeError
from .quant import QuantPlan, Resolved, TensorInfo, check_tensors, resolve


def read_config(directory: str | Path) -> dict:
    """config.json of a checkpoint directory, with a clear error when it is missing or broken."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise FlashMoeError(f"{path}: not found; a checkpoint directory needs config.json")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise FlashMoeError(f"{path}: not valid JSON ({err})") from None


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


def check_checkpoint(directory: str | Path) -> tuple[QuantPlan, dict[str, Resolved]]:
    """Resolve the config's quantization and check it against every tensor's shapes."""
    plan = resolve(read_config(directory))
    return plan, check_tensors(plan, tensor_infos(directory))
