"""Held-out perplexity: one function, its setting stated, and the same windows as the model card's."""

from __future__ import annotations

import math
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import flashmoe
from flashmoe.analysis import evaluate

HELDOUT = Path(__file__).resolve().parents[2] / "training" / "data" / "heldout.bin"


@pytest.fixture(scope="module")
def setup():
    model, _ = flashmoe.load(None)
    return model, np.fromfile(HELDOUT, dtype=np.uint16).astype(np.int32)


def test_windows_start_at_multiples_of_seq_len_and_share_one_id():
    ids = np.arange(100)
    ws = evaluate.windows(ids, seq_len=16, max_tokens=40)
    assert [w[0] for w in ws] == [0, 16, 32] and [len(w) for w in ws] == [17, 17, 9]
    assert sum(len(w) - 1 for w in ws) == 40
    assert [w[0] for w in evaluate.windows(ids, seq_len=16)] == list(range(0, 99, 16))  # all: the same starts


def test_perplexity_is_exp_mean_nll_over_the_windows_computed_independently(setup):
    model, heldout = setup
    result = evaluate.measure(model, heldout, seq_len=32, max_tokens=80, batch=2, quant="config")
    nll = []
    for start in range(0, 80, 32):
        ids = mx.array(heldout[start : min(start + 33, 81)][None])
        nll += evaluate.token_nll(model(ids[:, :-1]), ids[:, 1:])[0].tolist()
    assert result.tokens == len(nll) == 80 and result.windows == 3
    assert result.value == pytest.approx(math.exp(np.mean(nll)), rel=1e-5)
    assert evaluate.perplexity(model, heldout, seq_len=32, max_tokens=80) == pytest.approx(
        result.value, rel=1e-6
    )


def test_a_smaller_budget_scores_the_first_windows_of_a_larger_one(setup):
    model, heldout = setup
    small = evaluate.measure(model, heldout, seq_len=32, max_tokens=64)
    large = evaluate.measure(model, heldout, seq_len=32, max_tokens=128)
    np.testing.assert_allclose(small.window_nll, large.window_nll[:2], rtol=1e-5)
    assert small.window_perplexities().shape == (2,)


def test_the_label_says_tokens_windows_k_and_quant(setup):
    model, heldout = setup
    result = evaluate.measure(model, heldout, seq_len=32, max_tokens=64, quant="config")
    assert result.label() == f'{result.value:.2f} (64 held-out tokens, 2 windows of 32, K=4, quant="config")'
