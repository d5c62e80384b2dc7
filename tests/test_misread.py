"""The bug model against a plain numpy loop written from the C engine's description."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from flashmoe import kernels, misread_as
from flashmoe.errors import FlashMoeError
from tests.helpers import rel_err, require_backend


def engine_4bit_matvec(
    words: np.ndarray, scales: np.ndarray, biases: np.ndarray, x: np.ndarray, group_size: int
):
    """flash-moe's 4-bit kernel, as a loop: row r starts at word r * in/8 of the flat buffer,
    value i is nibble i % 8 of word i // 8, dequantized with row r's scale and bias of group i // group_size."""
    flat = words.reshape(-1)
    out_dim, in_dim = scales.shape[0], x.shape[0]
    y = np.zeros(out_dim, dtype=np.float64)
    for r in range(out_dim):
        for i in range(in_dim):
            word = int(flat[r * (in_dim // 8) + i // 8])
            nibble = (word >> (4 * (i % 8))) & 0xF
            g = i // group_size
            y[r] += (nibble * float(scales[r, g]) + float(biases[r, g])) * float(x[i])
    return y


def to_numpy(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32) if a.dtype == mx.bfloat16 else a)


@pytest.mark.parametrize("backend", kernels.BACKENDS)
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_an_8_bit_gate_read_as_4_bit_matches_the_engine_loop(backend, group_size, seed):
    require_backend(backend)
    experts, hidden = 24, 256  # a router: (E, D)
    gate = mx.random.normal((experts, hidden)).astype(mx.bfloat16)
    q, scales, biases = mx.quantize(gate, group_size=group_size, bits=8)
    x = mx.random.normal((hidden,))

    bad_words = misread_as(q, stored_bits=8, read_bits=4, in_dim=hidden)
    assert bad_words.shape == (experts, hidden // 8)  # half of each 8-bit row's words
    got = kernels.dequant_matvec(
        x[None], bad_words, scales, biases, bits=4, group_size=group_size, backend=backend
    )
    want = engine_4bit_matvec(to_numpy(q), to_numpy(scales), to_numpy(biases), to_numpy(x), group_size)
    assert rel_err(got[0], mx.array(want.astype(np.float32))) < 1e-4, f"seed {seed}"

    true_scores = x @ mx.dequantize(q, scales, biases, group_size=group_size, bits=8).T
    assert rel_err(got[0], true_scores) > 0.1  # the misread really is wrong


def test_misread_of_stacked_experts_recuts_the_whole_buffer(seed):
    w = mx.random.normal((3, 16, 128))
    q, _, _ = mx.quantize(w, group_size=64, bits=8)  # (3, 16, 32) words
    bad = misread_as(q, stored_bits=8, read_bits=4, in_dim=128)
    assert bad.shape == (3, 16, 16)
    assert mx.array_equal(bad.reshape(-1), q.reshape(-1)[: 3 * 16 * 16])


def test_reading_past_the_end_of_the_buffer_is_refused():
    q, _, _ = mx.quantize(mx.zeros((4, 128)), group_size=64, bits=4)
    with pytest.raises(FlashMoeError, match="run past the end"):
        misread_as(q, stored_bits=4, read_bits=8, in_dim=128, name="model.layers.0.mlp.gate")
    with pytest.raises(FlashMoeError, match="is not 8-bit"):
        misread_as(q, stored_bits=8, read_bits=4, in_dim=128)
