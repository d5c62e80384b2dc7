"""The embedded default model: a tiny Qwen3-Next coder trained for flashmoe (training/), shipped in the wheel."""

from __future__ import annotations

from pathlib import Path

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "assets" / "flashmoe-coder-tiny"


def default_model_dir() -> Path | None:
    """The bundled checkpoint directory, or None when this install has none."""
    return DEFAULT_MODEL_DIR if (DEFAULT_MODEL_DIR / "config.json").is_file() else None
