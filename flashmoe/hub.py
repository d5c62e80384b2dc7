"""Hugging Face Hub model ids (`mlx-community/Qwen3-Coder-Next-4bit`) -> a local checkpoint directory.

    resolve_model("mlx-community/Qwen3-Coder-Next-4bit")   the cached snapshot, downloaded when missing

The cache comes first: a cached snapshot is used without touching the network. Only an id that
is not cached is downloaded, and only when downloads are allowed (HF_HUB_OFFLINE unset); what
is fetched is what flashmoe reads: config.json, *.safetensors, the other JSON files, tokenizer
files and chat templates. The cache folder is huggingface_hub's (HF_HUB_CACHE, else HF_HOME/hub,
else ~/.cache/huggingface/hub), read from the environment at call time.
"""

from __future__ import annotations

import os
import re
import sys
from contextlib import contextmanager
from pathlib import Path

from .errors import FlashMoeError

ALLOW_PATTERNS = [
    "config.json",
    "*.safetensors",
    "*.json",
    "tokenizer*",
    "*.jinja",
    "*.txt",
    "*.model",
]
# owner/name, as the Hub spells them: letters, digits, '-', '_', '.'; no '--' or '..', no leading or trailing '-' or '.'
REPO_ID = re.compile(r"^(?![-.])[\w.-]{1,96}(?<![-.])/(?![-.])[\w.-]{1,96}(?<![-.])$")
_TRUE = {"1", "on", "yes", "true"}


class _Incomplete(Exception):
    """Stands for huggingface_hub's IncompleteSnapshotError where that version has none."""


def is_repo_id(text: str) -> bool:
    """Whether `text` reads as a Hub repository id `owner/name` (a local path is tried first anyway)."""
    return bool(REPO_ID.match(text)) and "--" not in text and ".." not in text


def cache_dir() -> Path:
    """huggingface_hub's cache folder, from the environment now (its own constants are read at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg).expanduser() / "huggingface" / "hub"


def offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) set, now or when huggingface_hub was imported."""
    if any(
        os.environ.get(name, "").strip().lower() in _TRUE
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    ):
        return True
    constants = sys.modules.get("huggingface_hub.constants")
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def resolve_model(repo_id: str, *, progress: bool | None = None) -> Path:
    """The local snapshot folder of Hub repository `repo_id`: the cache's, else a download (when online).

    `progress`: huggingface_hub's download bars (None: only when stderr is a terminal).
    """
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:
        raise FlashMoeError(
            f"{repo_id}: not a local directory, and huggingface_hub (to fetch it from the Hugging Face "
            "Hub) is not installed: pip install huggingface_hub"
        ) from None
    try:
        from huggingface_hub.errors import IncompleteSnapshotError as incomplete
    except ImportError:  # before huggingface_hub 1.0 a partial snapshot is returned as it is
        incomplete = _Incomplete
    cache = cache_dir()
    kwargs = dict(repo_id=repo_id, cache_dir=str(cache), allow_patterns=ALLOW_PATTERNS)
    cached = None
    try:
        cached = Path(snapshot_download(**kwargs, local_files_only=True))
    except (LocalEntryNotFoundError, incomplete, OSError):
        pass  # not cached (or only in part): download it, if downloads are allowed
    except Exception as err:  # noqa: BLE001 an invalid id and the like: one line
        raise FlashMoeError(f"{repo_id}: {type(err).__name__}: {' '.join(str(err).split())[:300]}") from None
    if cached is not None and (cached / "config.json").is_file():
        return cached
    if offline():
        where = (
            f"the cached snapshot {cached} has no config.json"
            if cached
            else f"not in the Hugging Face cache ({cache})"
        )
        raise FlashMoeError(
            f"{repo_id}: not a local directory and {where}, and downloads are off "
            "(HF_HUB_OFFLINE is set): download it once with a network (unset HF_HUB_OFFLINE), "
            "or pass a checkpoint directory"
        )
    try:
        with _bars(progress):
            return _checked(repo_id, Path(snapshot_download(**kwargs)), cache)
    except FlashMoeError:
        raise
    except Exception as err:  # noqa: BLE001 no network, no such repository, gated, disk full: one line each
        kind = type(err).__name__
        if kind in ("RepositoryNotFoundError", "GatedRepoError"):
            why = "no such repository on the Hugging Face Hub (or it is private or gated: `hf auth login`)"
        elif isinstance(err, LocalEntryNotFoundError):
            why = (
                f"not in the Hugging Face cache ({cache}) and the Hub cannot be reached "
                "(no network? set HF_HUB_OFFLINE=1 to use the cache alone)"
            )
        else:
            why = f"download failed ({kind}: {' '.join(str(err).split())[:300]})"
        raise FlashMoeError(f"{repo_id}: {why}") from None


def _checked(repo_id: str, folder: Path, cache: Path) -> Path:
    """A snapshot that holds a checkpoint (config.json and weights); else a FlashMoeError."""
    if not (folder / "config.json").is_file():
        raise FlashMoeError(
            f"{repo_id}: the snapshot {folder} has no config.json: not a model repository "
            f"(or an interrupted download: delete it from {cache} and try again)"
        )
    return folder


@contextmanager
def _bars(progress: bool | None):
    """huggingface_hub's own tqdm bars on or off for the block (off: --quiet, or stderr not a terminal)."""
    from huggingface_hub.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )

    show = sys.stderr.isatty() if progress is None else progress
    was_disabled = are_progress_bars_disabled()
    if not show and not was_disabled:
        disable_progress_bars()
    try:
        yield
    finally:
        if not show and not was_disabled:
            enable_progress_bars()
