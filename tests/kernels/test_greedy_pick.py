"""kernels.greedy_pick (the greedy id and the finiteness flag in one launch) against numpy's argmax and
isfinite on fresh random logits: ties, small and large vocabularies, NaN and inf anywhere."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from flashmoe.kernels.greedy import greedy_pick, reference
from tests.helpers import needs_cuda

BACKENDS = [pytest.param("cuda", marks=needs_cuda), "reference"]


def expected(logits: mx.array) -> list[int]:
    values = np.array(logits.astype(mx.float32))[0]
    if not np.isfinite(values).all():
        return [0, 0]
    return [int(np.argmax(values)), 1]  # numpy: the first index of the largest


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("vocab", [7, 1000, 151936])
def test_picks_the_first_largest_logit(backend, dtype, vocab, seed):
    logits = (4 * mx.random.normal((1, vocab))).astype(dtype)
    got = greedy_pick(logits, backend=backend)
    assert got.dtype == mx.int32 and got.tolist() == expected(logits), f"seed {seed}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_go_to_the_lowest_index(backend, seed):
    logits = np.array(mx.random.normal((1, 151936)).astype(mx.bfloat16).astype(mx.float32))
    for i in (120000, 4097, 100, 99999):  # one maximum in several threads' shares
        logits[0, i] = 9.0
    got = greedy_pick(mx.array(logits).astype(mx.bfloat16), backend=backend)
    assert got.tolist() == [100, 1], f"seed {seed}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("at", [0, 1023, 151935])
def test_a_non_finite_logit_gives_zero_and_the_flag(backend, bad, at, seed):
    logits = np.array(mx.random.normal((1, 151936)))
    logits[0, at] = bad
    assert greedy_pick(mx.array(logits).astype(mx.bfloat16), backend=backend).tolist() == [0, 0]


def test_reference_takes_several_rows(seed):
    logits = mx.random.normal((3, 50))
    got = reference(logits).tolist()
    assert got == [*np.argmax(np.array(logits), axis=-1).tolist(), 1]
