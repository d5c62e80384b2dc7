"""Shared fixtures: a fresh seed each run (printed on failure), the tiny tokenizer. Helpers: tests/helpers.py."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

# float32 means float32 here: MLX's CUDA backend otherwise rounds float32 matmuls through TF32
# (measured on an H200: prefill-vs-decode logits of one model differ by 2e-4 with it, 5e-7 without).
# MLX reads this once, at its first matmul.
os.environ.setdefault("MLX_ENABLE_TF32", "0")

import mlx.core as mx  # noqa: E402
import pytest  # noqa: E402

from flashmoe.tokenizer import Tokenizer
from tests.helpers import write_checkpoint, write_tiny_tokenizer


@pytest.fixture
def seed() -> int:
    """A fresh seed per test; failures print it so a run can be replayed."""
    value = secrets.randbits(31)
    mx.random.seed(value)
    return value


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return write_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tokenizer"))


@pytest.fixture
def tok(tiny_dir) -> Tokenizer:
    return Tokenizer.from_dir(tiny_dir)


@pytest.fixture(scope="session")
def float_checkpoint(tmp_path_factory) -> Path:
    """A tiny unquantized qwen3_moe checkpoint written by mlx-lm (the tools' tests convert and repack it)."""
    return write_checkpoint(tmp_path_factory.mktemp("float"), "qwen3_moe", quantize=False)


@pytest.fixture(scope="session")
def quantized_checkpoint(tmp_path_factory) -> Path:
    """The same, quantized by mlx-lm (4-bit, 8-bit routers)."""
    return write_checkpoint(tmp_path_factory.mktemp("quantized"), "qwen3_moe")
