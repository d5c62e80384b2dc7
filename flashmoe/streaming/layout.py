"""Where each expert's bytes are on disk: the index that expert streaming reads from.

Two layouts, one index (E experts per MoE layer, each made of up to 9 slices:
{gate,up,down}_proj x {weight, scales, biases}):

    safetensors   mlx-lm's own files. Each `*.switch_mlp.<proj>.<kind>` tensor is stacked (E, out, words);
                  expert e's slice starts at 8 + header length + data_offsets[0] + e * slice bytes,
                  so reading one expert takes 9 reads in 9 places.
    repacked      `python -m flashmoe.tools.repack`: one file per layer in which each expert's slices sit
                  back to back, so reading one expert takes one read. MANIFEST describes it:
                  per layer its file, per expert its block's offset and size, per tensor its
                  offset, shape and dtype within a block.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import FlashMoeError
from ..models.args import ModelArgs
from ..models.sanitize import EXPERT_KEY, canonical_name
from ..quant import TensorInfo
from ..safetensors import (
    DTYPE_SIZES,
    nbytes,
    read_header_info,
    regular_file_size,
    safetensors_files,
)

MANIFEST = "flashmoe_experts.json"
MANIFEST_FORMAT = "flashmoe-repacked-experts"
MANIFEST_VERSION = 1
# the order of slices in a repacked block
PARTS = tuple(
    f"{proj}.{kind}"
    for proj in ("gate_proj", "up_proj", "down_proj")
    for kind in ("weight", "scales", "biases")
)
EXPERT_TENSOR = re.compile(
    r"^(?P<mlp>.+\.mlp)\.switch_mlp\.(?P<part>(?:gate|up|down)_proj\.(?:weight|scales|biases))$"
)
LAYER_NUMBER = re.compile(r"\.layers\.(\d+)\.")


def is_expert_tensor(name: str) -> bool:
    """A stacked routed-expert tensor (`*.switch_mlp.{gate,up,down}_proj.{weight,scales,biases}`)."""
    return EXPERT_TENSOR.match(name) is not None


@dataclass(frozen=True)
class ExpertPiece:
    """One tensor of one MoE layer, seen as E per-expert slices."""

    name: str  # the stored tensor name (for errors)
    part: str  # its role: "gate_proj.weight", ..., "down_proj.biases"
    dtype: str  # safetensors dtype: "U32", "BF16", ...
    shape: tuple[int, ...]  # one expert's slice, e.g. (I, D * bits / 32)
    file: int  # index into ExpertLayout.files
    offsets: np.ndarray  # (E,) absolute byte offset of each expert's slice in that file

    @property
    def nbytes(self) -> int:
        return nbytes(self.dtype, self.shape)


@dataclass
class LayerExperts:
    """The routed experts of one MoE layer: E experts, each read as `pieces` slices."""

    prefix: str  # the MoE block's (sanitized) module prefix, e.g. "model.layers.3.mlp"
    layer: int  # its layer number (for statistics and cache keys)
    num_experts: int
    pieces: list[ExpertPiece]

    @property
    def expert_bytes(self) -> int:
        """Bytes of one expert (all its slices)."""
        return sum(p.nbytes for p in self.pieces)

    def runs(self, expert: int, destinations: list[memoryview]) -> list[tuple[int, int, list[memoryview]]]:
        """Expert `expert` as (file, offset, destination buffers) reads, adjacent slices merged into one read."""
        order = sorted(
            range(len(self.pieces)),
            key=lambda i: (self.pieces[i].file, self.pieces[i].offsets[expert]),
        )
        runs: list[tuple[int, int, list[memoryview]]] = []
        end = None
        for i in order:
            piece = self.pieces[i]
            offset = int(piece.offsets[expert])
            if runs and runs[-1][0] == piece.file and offset == end:
                runs[-1][2].append(destinations[i])
            else:
                runs.append((piece.file, offset, [destinations[i]]))
            end = offset + piece.nbytes
        return runs


@dataclass
class ExpertLayout:
    """Every MoE layer's experts, and the files they are in."""

    kind: str  # "safetensors" or "repacked"
    files: list[Path]
    layers: dict[str, LayerExperts]  # sanitized MoE prefix -> its experts
    stored_prefixes: dict[str, str]  # sanitized MoE prefix -> the prefix as stored (for tensor_infos)

    def tensor_infos(self) -> dict[str, TensorInfo]:
        """The stacked expert tensors as the checkpoint would hold them (to check quantization against config)."""
        infos = {}
        for prefix, layer in self.layers.items():
            for p in layer.pieces:
                infos[f"{self.stored_prefixes[prefix]}.switch_mlp.{p.part}"] = TensorInfo(
                    (layer.num_experts, *p.shape), p.dtype, str(self.files[p.file])
                )
        return infos


def open_layout(directory: str | Path, args: ModelArgs) -> ExpertLayout:
    """The expert index of a checkpoint: the repacked layout when MANIFEST is present, else the safetensors."""
    directory = Path(directory)
    if (directory / MANIFEST).is_file():
        layout = _from_manifest(directory, args)
    else:
        layout = _from_safetensors(directory, args)
    _check_file_sizes(layout)
    return layout


def _from_safetensors(directory: Path, args: ModelArgs) -> ExpertLayout:
    files = safetensors_files(directory)
    grouped: dict[str, dict[str, ExpertPiece]] = {}
    for index, path in enumerate(files):
        header, start = read_header_info(path)
        for name, entry in header.items():
            if EXPERT_KEY.match(name) or name.endswith(".experts.gate_up_proj"):
                raise FlashMoeError(
                    f"{path}: '{name}' stores experts one by one (a Hugging Face layout); expert streaming "
                    "reads mlx-lm's stacked switch_mlp tensors: convert the checkpoint first (flashmoe.tools.convert)"
                )
            match = EXPERT_TENSOR.match(name)
            if match is None:
                continue
            shape, dtype = tuple(entry["shape"]), entry["dtype"]
            begin, end = entry["data_offsets"]
            _check_stack(path, name, shape, dtype, end - begin, args.num_experts)
            step = nbytes(dtype, shape[1:])
            offsets = start + begin + step * np.arange(shape[0], dtype=np.int64)
            grouped.setdefault(match["mlp"], {})[match["part"]] = ExpertPiece(
                name, match["part"], dtype, shape[1:], index, offsets
            )
    return _layout("safetensors", files, grouped, args)


def _check_stack(path: Path, name: str, shape: tuple, dtype: str, size: int, num_experts: int) -> None:
    if dtype not in DTYPE_SIZES:
        raise FlashMoeError(f"{path}: tensor '{name}' has unknown dtype {dtype!r}")
    if len(shape) != 3 or shape[0] != num_experts:
        raise FlashMoeError(
            f"{path}: tensor '{name}' has shape {list(shape)}; expected ({num_experts}, out, in) "
            f"stacked experts (config.json num_experts={num_experts})"
        )
    if size != nbytes(dtype, shape):
        raise FlashMoeError(
            f"{path}: tensor '{name}' {dtype} {list(shape)} should take {nbytes(dtype, shape)} "
            f"bytes, its data_offsets span {size}"
        )


def _from_manifest(directory: Path, args: ModelArgs) -> ExpertLayout:
    path = directory / MANIFEST
    regular_file_size(path, "manifest")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (
        ValueError,
        RecursionError,
    ) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise FlashMoeError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(manifest, dict):
        raise FlashMoeError(f"{path}: expected a JSON object, found a {type(manifest).__name__}")
    if manifest.get("format") != MANIFEST_FORMAT or manifest.get("version") != MANIFEST_VERSION:
        raise FlashMoeError(
            f"{path}: expected format {MANIFEST_FORMAT!r} version {MANIFEST_VERSION}, found "
            f"{manifest.get('format')!r} version {manifest.get('version')!r}"
        )
    layers = manifest.get("layers")
    if not isinstance(layers, dict):
        raise FlashMoeError(f"{path}: 'layers' must be an object (MoE prefix -> layer entry)")
    files, grouped = [], {}
    for stored_prefix, entry in layers.items():
        if not isinstance(entry, dict):
            raise FlashMoeError(f"{path}: layer '{stored_prefix}' is a {type(entry).__name__}, not an object")
        files.append(_inside(directory, path, stored_prefix, entry.get("file")))
        try:
            grouped[stored_prefix] = _manifest_layer(
                path, stored_prefix, entry, len(files) - 1, args.num_experts
            )
        except (KeyError, TypeError, ValueError, OverflowError) as err:
            if isinstance(err, FlashMoeError):
                raise
            raise FlashMoeError(
                f"{path}: layer '{stored_prefix}' is malformed ({type(err).__name__}: {err})"
            ) from None
    return _layout("repacked", files, grouped, args)


def _inside(directory: Path, manifest: Path, prefix: str, file) -> Path:
    """A manifest's `file` entry as a path that stays inside the checkpoint directory (symlinks
    that resolve inside it are fine: Hugging Face caches are made of them) and is a regular file."""
    if not isinstance(file, str) or not file or "\0" in file:
        raise FlashMoeError(f"{manifest}: layer '{prefix}' has file {file!r}; expected a relative path")
    candidate = directory / file
    try:
        resolved, root = candidate.resolve(), directory.resolve()
    except (OSError, RuntimeError) as err:  # symlink loops
        raise FlashMoeError(
            f"{manifest}: layer '{prefix}' file {file!r} cannot be resolved ({err})"
        ) from None
    if Path(file).is_absolute() or not resolved.is_relative_to(root):
        raise FlashMoeError(
            f"{manifest}: layer '{prefix}' file {file!r} leads outside the checkpoint directory {root} (to {resolved})"
        )
    if resolved.exists():
        regular_file_size(resolved, f"expert file of layer '{prefix}' ({manifest})")
    return candidate


def _manifest_layer(
    path: Path, prefix: str, entry: dict, file: int, num_experts: int
) -> dict[str, ExpertPiece]:
    experts = np.asarray(entry["experts"], dtype=np.int64).reshape(-1, 2)  # (E, [offset, size])
    if len(experts) != num_experts:
        raise FlashMoeError(
            f"{path}: layer '{prefix}' lists {len(experts)} experts; config.json has {num_experts}"
        )
    if (experts < 0).any():
        raise FlashMoeError(f"{path}: layer '{prefix}' has a negative expert offset or size")
    if not isinstance(entry["tensors"], dict):
        raise FlashMoeError(f"{path}: layer '{prefix}' 'tensors' must be an object")
    pieces = {}
    for part, t in entry["tensors"].items():
        name = f"{prefix}.switch_mlp.{part}"
        if not isinstance(t, dict) or part not in PARTS or t.get("dtype") not in DTYPE_SIZES:
            raise FlashMoeError(f"{path}: tensor '{name}' ({t!r:.80}) is not an expert tensor flashmoe knows")
        shape, offset = t.get("shape"), t.get("offset")
        if (
            not isinstance(shape, list)
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**40 for d in shape)
            or not isinstance(offset, int)
            or isinstance(offset, bool)
        ):
            raise FlashMoeError(
                f"{path}: tensor '{name}' has shape {shape!r} and offset {offset!r}; expected non-negative integers"
            )
        size = nbytes(t["dtype"], shape)
        if offset < 0 or offset + size > experts[:, 1].min():
            raise FlashMoeError(
                f"{path}: tensor '{name}' at offset {offset} ({size} bytes) does not fit "
                f"in an expert block of {experts[:, 1].min()} bytes"
            )
        pieces[part] = ExpertPiece(name, part, t["dtype"], tuple(shape), file, experts[:, 0] + offset)
    return pieces


def _layout(
    kind: str, files: list[Path], grouped: dict[str, dict[str, ExpertPiece]], args: ModelArgs
) -> ExpertLayout:
    """Check each layer has a full set of slices, and key the layers by their sanitized prefix."""
    layers, stored = {}, {}
    for stored_prefix, pieces in grouped.items():
        for role in (
            "weight",
            "scales",
            "biases",
        ):  # weights always; scales and biases for all or none
            absent = [p for p in PARTS if p.endswith(role) and p not in pieces]
            if absent and (role == "weight" or len(absent) < 3):
                where = files[next(iter(pieces.values())).file]
                raise FlashMoeError(
                    f"{where}: tensor '{stored_prefix}.switch_mlp.{absent[0]}' is missing (found {sorted(pieces)})"
                )
        prefix = canonical_name(stored_prefix, args)
        number = LAYER_NUMBER.search(prefix + ".")
        layers[prefix] = LayerExperts(
            prefix,
            int(number[1]) if number else len(layers),
            args.num_experts,
            [pieces[p] for p in PARTS if p in pieces],
        )
        stored[prefix] = stored_prefix
    if not layers:
        raise FlashMoeError(f"{files[0].parent}: no stacked expert tensors (*.switch_mlp.*) to stream")
    return ExpertLayout(kind, files, layers, stored)


def _check_file_sizes(layout: ExpertLayout) -> None:
    """Every slice must lie inside its file: a truncated file is named with the first tensor it cuts."""
    sizes = [regular_file_size(f, "expert file") if f.exists() else -1 for f in layout.files]
    for layer in layout.layers.values():
        for p in layer.pieces:
            if sizes[p.file] < 0:
                raise FlashMoeError(f"{layout.files[p.file]}: not found (it should hold tensor '{p.name}')")
            end = int(p.offsets.max()) + p.nbytes
            if end > sizes[p.file]:
                raise FlashMoeError(
                    f"{layout.files[p.file]}: {sizes[p.file]} bytes, but tensor '{p.name}' "
                    f"needs bytes up to {end} (truncated file?)"
                )
