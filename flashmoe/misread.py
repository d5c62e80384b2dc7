"""The bug, on demand: what a 4-bit-only engine reads when a tensor is stored at other bits.

flash-moe's engine assumed every tensor was 4-bit. For an 8-bit router gate
(out, in/4 words) it computed row r's start as r * in/8 words of the flat buffer,
split each byte into two nibbles, and applied row r's (correct) scales and biases.
So it read the first half of the buffer only, as wrong data with the right scales:
gate scores of the wrong size and sign, wrong experts in every layer, at full speed.

That read is itself a valid packed tensor at the engine's bits: the flat buffer cut
into rows of in * read_bits / 32 words. `misread_as` returns exactly those words, so
any 4-bit kernel run on them (with the real scales and biases) reproduces the engine.
"""

from __future__ import annotations

import math

import mlx.core as mx

from .errors import FlashMoeError


def misread_as(
    w: mx.array, *, stored_bits: int, read_bits: int, in_dim: int, name: str = "tensor"
) -> mx.array:
    """The packed words an engine reading `read_bits` sees in w (..., out, in*stored_bits/32)."""
    if w.shape[-1] * 32 != in_dim * stored_bits:
        raise FlashMoeError(
            f"misread_as: '{name}' {w.shape} is not {stored_bits}-bit for in_dim {in_dim} "
            f"(expected {in_dim * stored_bits // 32} words per row)"
        )
    rows = w.shape[:-1]
    words_per_row = in_dim * read_bits // 32  # the engine's row stride
    needed, held = math.prod(rows) * words_per_row, w.size
    if needed > held:
        raise FlashMoeError(
            f"misread_as: reading {stored_bits}-bit '{name}' as {read_bits}-bit would run past the end "
            f"of its buffer ({needed} words needed, {held} held): the C engine's result is undefined there"
        )
    # Same rows, shorter (or longer) stride through the same flat buffer.
    return w.reshape(-1)[:needed].reshape(*rows, words_per_row)
