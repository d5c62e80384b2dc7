"""`python -m flashmoe.tools.repack SRC DST`: rewrite a checkpoint so that each expert is one read.

mlx-lm stores each MoE layer's experts as 9 stacked tensors, so streaming one expert means 9
reads in 9 places. DST holds the same bytes laid out for streaming:

    model.safetensors       every non-expert tensor of SRC, names and bytes unchanged
    experts/layer-NNN.bin   per MoE layer, E blocks; block e holds expert e's gate/up/down
                            weight, scales and biases back to back (streaming.layout.PARTS order,
                            each slice on a 64-byte boundary, each block on a 4096-byte one)
    flashmoe_experts.json   the manifest: per layer its file, per expert its block's offset and
                            size, per tensor its offset, shape and dtype within a block
    config.json, tokenizer files, ...   copied

DST must be new or empty (`--force` replaces an earlier checkpoint there). A run that fails before
any progress is saved leaves nothing behind.

`--delete-source` removes each SRC shard as soon as everything in it is in DST, so a disk
that cannot hold two copies of a large checkpoint can still be repacked. Progress is saved
after every layer (flashmoe_experts.partial.json): `--resume` continues an interrupted run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np

from ..errors import FlashMoeError
from ..loader import read_config
from ..models.args import ModelArgs
from ..progress import progress_bar, shown
from ..safetensors import (
    SafetensorsWriter,
    nbytes,
    read_header_info,
    safetensors_files,
    tensor_infos,
)
from ..streaming.layout import (
    MANIFEST,
    MANIFEST_FORMAT,
    MANIFEST_VERSION,
    PARTS,
    ExpertLayout,
    LayerExperts,
    is_expert_tensor,
    open_layout,
)
from . import HelpFormatter, add_output_options, output_directory

SLICE_ALIGN, BLOCK_ALIGN = 64, 4096
COPY_CHUNK = 64 << 20  # bytes per read when copying non-expert tensors
PROGRESS = "flashmoe_experts.partial.json"  # the manifest so far, to --resume an interrupted run
SKIPPED = ("model.safetensors.index.json", MANIFEST, PROGRESS)


def repack(
    src: str | Path,
    dst: str | Path,
    *,
    delete_source: bool = False,
    resume: bool = False,
    chunk_experts: int = 64,
    log=print,
    force: bool = False,
    progress: bool | None = False,
) -> Path:
    """Write the repacked copy of checkpoint `src` to `dst` (a new or empty directory); returns `dst`.

    `resume` continues an interrupted run from PROGRESS (the manifest so far) in `dst`; `force` replaces
    an earlier checkpoint in a non-empty `dst`. A failure before any progress is saved leaves nothing in
    `dst`. `progress` (None: when stderr is a terminal): a bar over the bytes to write; `log` gets one
    line per step (None: no lines).
    """
    src, dst = Path(src), Path(dst)
    if isinstance(chunk_experts, bool) or not isinstance(chunk_experts, int) or chunk_experts < 1:
        raise FlashMoeError(f"--chunk-experts {chunk_experts!r}: must be a positive integer")
    args = ModelArgs.from_config(read_config(src))
    _check_paths(src, dst, resume, force)
    _check_links(src)
    state = _read_progress(dst) if resume else dict(source=str(src), non_experts=False, layers={})
    target = (
        nullcontext()
        if resume
        else output_directory(dst, force, (src,), keep=lambda: (dst / PROGRESS).is_file())
    )
    with target:
        _repack(src, dst, args, state, delete_source, chunk_experts, log, progress)
    return dst


def _repack(
    src: Path,
    dst: Path,
    args: ModelArgs,
    progress: dict,
    delete_source: bool,
    chunk_experts: int,
    log,
    show: bool | None,
) -> None:
    layout = open_layout(src, args)
    for layer in layout.layers.values():
        if not 0 <= layer.layer < args.num_hidden_layers:
            raise FlashMoeError(
                f"{layout.files[layer.pieces[0].file]}: tensor '{layer.pieces[0].name}' is in layer "
                f"{layer.layer}; config.json has num_hidden_layers={args.num_hidden_layers}"
            )
    todo = [
        (prefix, layer)
        for prefix, layer in sorted(layout.layers.items(), key=lambda item: item[1].layer)
        if layout.stored_prefixes[prefix] not in progress["layers"]
    ]
    _check_space(src, dst, [layer for _, layer in todo], progress["non_experts"], delete_source)
    (dst / "experts").mkdir(parents=True, exist_ok=True)
    shards = safetensors_files(src)
    rest = 0 if progress["non_experts"] else _non_expert_bytes(src)
    total = rest + sum(layer.num_experts * layer.expert_bytes for _, layer in todo)
    with progress_bar(total=total, desc=f"repacking {src.name}", unit="B", enabled=show) as bar:
        say = (lambda text: None) if log is None else (bar.write if shown(show) else log)
        if not progress["non_experts"]:
            _copy_non_experts(shards, dst / "model.safetensors", say)
            _save_progress(dst, {**progress, "non_experts": True})
            progress["non_experts"] = True
            bar.update(rest)
        pending = {
            i: {p for p, layer in layout.layers.items() if any(x.file == i for x in layer.pieces)}
            for i in range(len(layout.files))
        }
        for prefix, layer in todo:
            tic = time.perf_counter()
            name = f"experts/layer-{layer.layer:03d}.bin"
            progress["layers"][layout.stored_prefixes[prefix]] = _write_layer(
                layout, layer, dst / name, chunk_experts
            )
            _save_progress(dst, progress)
            bar.update(layer.num_experts * layer.expert_bytes)
            say(
                f"layer {layer.layer}: {layer.num_experts * layer.expert_bytes / 1e6:.0f} MB in "
                f"{time.perf_counter() - tic:.1f} s -> {name}"
            )
            if delete_source:
                _delete_done(layout, pending, prefix, say)
    for shard in shards if delete_source else []:
        if shard.exists():  # shards without experts: their tensors are in model.safetensors
            shard.unlink()
    _finish(src, dst, args, progress)


def _non_expert_bytes(src: Path) -> int:
    return sum(nbytes(i.dtype, i.shape) for n, i in tensor_infos(src).items() if not is_expert_tensor(n))


def _check_paths(src: Path, dst: Path, resume: bool, force: bool = False) -> None:
    if (src / MANIFEST).is_file():
        raise FlashMoeError(f"{src}: already repacked ({MANIFEST} is there)")
    if dst.exists() and dst.resolve() == src.resolve():
        raise FlashMoeError(f"{dst}: the destination must not be the source")
    if resume and not (dst / PROGRESS).is_file():
        raise FlashMoeError(f"{dst / PROGRESS}: not found; nothing to resume")
    if resume and force:
        raise FlashMoeError("--resume continues the run in DST, --force deletes it: pass one of them")
    if not resume and not force and dst.exists() and dst.is_dir() and any(dst.iterdir()):
        hint = (
            "an interrupted repack: add --resume, or"
            if (dst / PROGRESS).is_file()
            else "choose a new directory or"
        )
        raise FlashMoeError(
            f"{dst}: must be a new or empty directory ({hint} pass --force to replace its contents)"
        )


def _check_links(src: Path) -> None:
    """Refuse symbolic links in SRC that lead outside it: repack reads (and may delete) what they point to."""
    root = src.resolve()
    for path in src.iterdir():
        try:
            target = path.resolve()
        except (OSError, RuntimeError) as err:
            raise FlashMoeError(f"{path}: cannot be resolved ({err})") from None
        if not target.is_relative_to(root):
            raise FlashMoeError(
                f"{path}: a symbolic link to {target}, outside the source directory {root}; "
                "repack refuses to follow it (copy the file in instead)"
            )


def _check_space(
    src: Path, dst: Path, layers: list[LayerExperts], non_experts_done: bool, delete_source: bool
):
    """Refuse to start what the disk cannot finish (with --delete-source one layer at a time must fit)."""
    sizes = [layer.num_experts * block_layout(layer)[2] for layer in layers]
    rest = (
        0
        if non_experts_done
        else sum(nbytes(i.dtype, i.shape) for n, i in tensor_infos(src).items() if not is_expert_tensor(n))
    )
    need = rest + (max(sizes, default=0) if delete_source else sum(sizes))
    free = shutil.disk_usage(dst if dst.exists() else dst.parent).free
    if need > free:
        hint = "" if delete_source else "; --delete-source needs room for one layer at a time"
        raise FlashMoeError(
            f"{dst}: repacking needs {need / 1e9:.1f} GB free, the disk has {free / 1e9:.1f} GB{hint}"
        )


def _read_progress(dst: Path) -> dict:
    try:
        return json.loads((dst / PROGRESS).read_text())
    except json.JSONDecodeError as err:
        raise FlashMoeError(
            f"{dst / PROGRESS}: not valid JSON ({err}); repack again into a new directory"
        ) from None


def _save_progress(dst: Path, progress: dict) -> None:
    """The manifest so far, replaced atomically (a crash leaves the previous one)."""
    (dst / (PROGRESS + ".tmp")).write_text(json.dumps(progress))
    os.replace(dst / (PROGRESS + ".tmp"), dst / PROGRESS)


def _finish(src: Path, dst: Path, args: ModelArgs, progress: dict) -> None:
    """Copy config and tokenizer files, then write the manifest (last: its presence means complete)."""
    moe_layers = sum(args.is_moe(i) for i in range(args.num_hidden_layers))
    if len(progress["layers"]) != moe_layers:
        raise FlashMoeError(
            f"{src}: {len(progress['layers'])} MoE layers were repacked, the config has {moe_layers} "
            "(source shards missing?)"
        )
    _copy_other_files(src, dst)
    manifest = dict(
        format=MANIFEST_FORMAT,
        version=MANIFEST_VERSION,
        source=progress["source"],
        layers=progress["layers"],
    )
    (dst / MANIFEST).write_text(json.dumps(manifest, separators=(",", ":")))
    (dst / PROGRESS).unlink()


def block_layout(layer: LayerExperts) -> tuple[dict[str, int], int, int]:
    """(offset of each part within a block, block bytes, bytes between blocks)."""
    offsets, end = {}, 0
    for piece in sorted(layer.pieces, key=lambda p: PARTS.index(p.part)):
        offsets[piece.part] = end
        end = _round_up(end + piece.nbytes, SLICE_ALIGN)
    return offsets, end, _round_up(end, BLOCK_ALIGN)


def _write_layer(layout: ExpertLayout, layer: LayerExperts, path: Path, chunk: int) -> dict:
    """One layer's experts as blocks, `chunk` experts at a time; returns its manifest entry."""
    offsets, block, stride = block_layout(layer)
    fds = {p.file: os.open(layout.files[p.file], os.O_RDONLY) for p in layer.pieces}
    try:
        with open(path, "wb") as out:
            for first in range(0, layer.num_experts, chunk):
                count = min(chunk, layer.num_experts - first)
                blocks = np.zeros((count, stride), dtype=np.uint8)
                for piece in layer.pieces:
                    start = int(piece.offsets[first])
                    raw = _pread_exact(
                        fds[piece.file],
                        count * piece.nbytes,
                        start,
                        layout.files[piece.file],
                        piece.name,
                    )
                    blocks[:, offsets[piece.part] : offsets[piece.part] + piece.nbytes] = raw.reshape(
                        count, -1
                    )
                out.write(blocks)
    finally:
        for fd in fds.values():
            os.close(fd)
    tensors = {p.part: dict(offset=offsets[p.part], shape=list(p.shape), dtype=p.dtype) for p in layer.pieces}
    experts = [[e * stride, block] for e in range(layer.num_experts)]
    return dict(
        file=f"experts/{path.name}",
        layer=layer.layer,
        num_experts=layer.num_experts,
        block_bytes=block,
        experts=experts,
        tensors=tensors,
    )


def _copy_non_experts(shards: list[Path], path: Path, log) -> None:
    """Every non-expert tensor of every shard into one safetensors file, copied in bounded pieces."""
    entries = []
    for shard in shards:
        header, start = read_header_info(shard)
        entries += [(shard, start, name, e) for name, e in header.items() if not is_expert_tensor(name)]
    with SafetensorsWriter(path, [(n, e["dtype"], e["shape"]) for _, _, n, e in entries]) as writer:
        for shard, start, name, entry in entries:
            begin, end = entry["data_offsets"]
            with open(shard, "rb") as f:
                for at in range(begin, end, COPY_CHUNK):
                    writer.write(
                        name,
                        _pread_exact(f.fileno(), min(COPY_CHUNK, end - at), start + at, shard, name),
                    )
    log(f"non-expert tensors: {len(entries)} -> {path.name} ({path.stat().st_size / 1e6:.0f} MB)")


def _delete_done(layout: ExpertLayout, pending: dict[int, set], prefix: str, log) -> None:
    """Remove the source shards whose expert layers are all repacked."""
    for index, layers in pending.items():
        layers.discard(prefix)
        path = layout.files[index]
        if not layers and path.exists():
            path.unlink()
            log(f"deleted {path.name}")


def _copy_other_files(src: Path, dst: Path) -> None:
    for path in src.iterdir():
        if path.is_file() and path.suffix != ".safetensors" and path.name not in SKIPPED:
            shutil.copy2(path, dst / path.name)


def _pread_exact(fd: int, size: int, offset: int, path: Path, name: str) -> np.ndarray:
    data = os.pread(fd, size, offset)
    if len(data) != size:
        raise FlashMoeError(
            f"{path}: tensor '{name}' needs {size} bytes at offset {offset}, found {len(data)} (truncated file?)"
        )
    return np.frombuffer(data, dtype=np.uint8)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    """Command line: python -m flashmoe.tools.repack SRC DST [--delete-source]."""
    parser = argparse.ArgumentParser(
        prog="python -m flashmoe.tools.repack",
        description=__doc__.split("\n")[0],
        formatter_class=HelpFormatter,
    )
    parser.add_argument("src", help="an MLX checkpoint directory (mlx-lm's switch_mlp layout)")
    parser.add_argument("dst", help="a new (or empty) directory for the repacked copy")
    parser.add_argument(
        "--delete-source",
        action="store_true",
        help="delete each source shard once its tensors are in DST (for disks too small for two copies)",
    )
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run into the same DST")
    parser.add_argument(
        "--chunk-experts",
        type=_positive_int,
        default=64,
        help="experts rewritten per step (bounds the memory used)",
    )
    add_output_options(parser, "DST")
    options = parser.parse_args(argv)
    try:
        tic = time.perf_counter()
        repack(
            options.src,
            options.dst,
            delete_source=options.delete_source,
            resume=options.resume,
            chunk_experts=options.chunk_experts,
            force=options.force,
            log=None if options.quiet else print,
            progress=False if options.quiet else None,
        )
        if not options.quiet:
            print(f"repacked {options.src} -> {options.dst} in {time.perf_counter() - tic:.0f} s")
        return 0
    except (FlashMoeError, OSError) as err:
        kept = Path(options.dst, PROGRESS).is_file() and not options.resume
        print(
            f"flashmoe.tools.repack: error: {err}"
            + (" (the work so far is kept: --resume continues it)" if kept else ""),
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
