"""One-off tools, each a command: `python -m flashmoe.tools.NAME --help`.

    convert.py  float checkpoint -> MLX quantized format (8-bit routers, per-module overrides)
    repack.py   each expert's slices made contiguous, for streaming
    synth.py    shape-faithful random checkpoints at real model widths

Each refuses a non-empty output directory unless --force, leaves nothing behind when it fails,
draws a progress bar on a terminal (never in a pipe or a log), and says nothing with --quiet.
"""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import FlashMoeError

# what an earlier output of these tools holds: --force deletes a non-empty directory only when it has one
CHECKPOINT_MARKERS = (
    "config.json",
    "*.safetensors",
    "flashmoe_experts.json",
    "flashmoe_experts.partial.json",
)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each option's default, where it has one to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False, []) or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def add_output_options(parser: argparse.ArgumentParser, dst: str) -> None:
    """--force and --quiet, which every tool takes; `dst` names the output in the help ("DST", "--out")."""
    parser.add_argument(
        "--force",
        action="store_true",
        help=f"replace an earlier checkpoint in a non-empty {dst} (its files are deleted first)",
    )
    parser.add_argument(
        "--quiet",
        action="store_true",
        help="print nothing but errors (the progress bar is drawn only on a terminal anyway)",
    )


def check_output(dst: str | Path, force: bool, sources: tuple[str | Path, ...] = ()) -> None:
    """Refuse what must not be written over: DST a file, DST the source or inside-out with it, or DST
    non-empty without `force` (and with it, non-empty but not an earlier checkpoint)."""
    dst = Path(dst)
    if dst.exists() and not dst.is_dir():
        raise FlashMoeError(f"{dst}: exists and is not a directory")
    for src in map(Path, sources):
        if (
            src.exists()
            and dst.exists()
            and (src.resolve() == dst.resolve() or src.resolve().is_relative_to(dst.resolve()))
        ):
            raise FlashMoeError(f"{dst}: the output directory must not be (or hold) the source {src}")
    if not dst.exists() or not any(dst.iterdir()):
        return
    if not force:
        raise FlashMoeError(
            f"{dst}: exists and is not empty; choose a new directory, or pass --force to replace its contents"
        )
    if not any(any(dst.glob(marker)) for marker in CHECKPOINT_MARKERS):
        raise FlashMoeError(
            f"{dst}: --force replaces an earlier checkpoint (config.json, *.safetensors), and this "
            "directory holds none; refusing to delete it: choose a new directory"
        )


@contextmanager
def output_directory(
    dst: str | Path,
    force: bool = False,
    sources: tuple[str | Path, ...] = (),
    keep: Callable[[], bool] = lambda: False,
) -> Iterator[Path]:
    """DST ready to write into (check_output; with `force` its old contents deleted first); on any error
    or interrupt inside the block what was written is removed, and DST itself if this made it, unless
    `keep()` says it is worth keeping (a state an interrupted run can resume from)."""
    dst = Path(dst)
    check_output(dst, force, sources)
    created = None  # the first directory this makes (DST or a missing parent of it)
    for folder in [dst, *dst.parents]:
        if folder.exists():
            break
        created = folder
    if dst.exists() and force:
        _empty(dst)
    dst.mkdir(parents=True, exist_ok=True)
    try:
        yield dst
    except BaseException:
        if keep():
            raise
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        else:
            _empty(dst)
        raise


def _empty(folder: Path) -> None:
    for path in folder.iterdir():
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
