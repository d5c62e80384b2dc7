"""The measurements notebook 03 plots: what they mean, never how fast they are."""

from __future__ import annotations

import math
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import flashmoe
from flashmoe import kernels
from flashmoe.analysis import accuracy, bench, parity
from flashmoe.loader import default_model_dir

PROMPT = "def parse(line):\n    return"
HELDOUT = Path(__file__).resolve().parents[2] / "training" / "data" / "heldout.bin"


@pytest.fixture(scope="module")
def bundled():
    return flashmoe.load(None)


def test_bandwidth_and_kernel_timings_are_positive_and_consistent():
    assert bench.measure_bandwidth(megabytes=16, repeats=2) > 0
    t = bench.time_kernel("mlx", 4, 64, 256, 512, repeats=3)
    assert t.seconds > 0 and t.bytes > 256 * 512 // 2 and t.gbps == pytest.approx(t.bytes / t.seconds / 1e9)


@pytest.mark.parametrize("bits", kernels.KERNEL_BITS)
def test_every_backend_matches_mx_dequantize(bits):
    errors = accuracy.kernel_errors(bits, 64, 64, 256, seed=1)
    assert set(errors) == set(kernels.available_backends())
    assert all(e < 1e-4 for e in errors.values()), errors


def test_fma_form_and_naive_form_compute_the_same_matvec():
    _, (w, scales, biases), x = bench.random_quantized(64, 256, 4, 64, seed=2)
    q = kernels.reference.unpack(w, 4).astype(mx.float32)
    s, b = scales.astype(mx.float32), biases.astype(mx.float32)
    naive, fma = bench.naive_form(q, s, b, x, 64), bench.fma_form(q, s, b, x, 64)
    np.testing.assert_allclose(np.array(naive), np.array(fma), rtol=1e-4, atol=1e-4)
    result = bench.compare_formulas(64, 256, repeats=2)
    assert result.naive_error < 1e-4 and result.fma_error < 1e-4 and result.fma_seconds > 0


def test_the_phase_breakdown_sums_to_the_step_time(bundled):
    model, tokenizer = bundled
    breakdown = bench.decode_phase_breakdown(model, tokenizer, PROMPT, n=4)
    assert {"routing", "experts", "sampling"} <= set(breakdown.phases)
    assert breakdown.total == pytest.approx(breakdown.step_seconds, rel=0.15, abs=1e-3)
    assert not flashmoe.timing.timer.enabled


def test_tokens_per_second_is_the_same_with_the_bug(bundled):
    """The bug is silent: misread gates cost no time (generous bounds: timing on a shared CI machine)."""
    model, tokenizer = bundled
    bad, _ = flashmoe.load(None, quant="global")
    good_tps = bench.tokens_per_second(model, tokenizer, PROMPT, 16)
    bad_tps = bench.tokens_per_second(bad, tokenizer, PROMPT, 16)
    assert good_tps > 0 and bad_tps > 0 and 0.2 < bad_tps / good_tps < 5


def test_greedy_tokens_match_flashmoe_generate(bundled):
    model, tokenizer = bundled
    ids = tokenizer.encode(PROMPT)
    tokens = parity.greedy_tokens(model, model.make_cache, ids, 8)
    assert tokenizer.decode(tokens) == flashmoe.generate(model, tokenizer, PROMPT, max_tokens=8)
    assert parity.greedy_tokens_per_second(model, model.make_cache, ids, 4) > 0


def test_mlx_lm_greedy_tokens_equal_flashmoe_ones(bundled):
    pytest.importorskip("mlx_lm")
    model, tokenizer = bundled
    ref = parity.mlx_lm_model(default_model_dir())
    ids = tokenizer.encode(PROMPT)
    assert parity.greedy_tokens(ref, parity.mlx_lm_cache(ref), ids, 12) == parity.greedy_tokens(
        model, model.make_cache, ids, 12
    )


def test_k_sweep_more_experts_lower_perplexity():
    heldout = np.fromfile(HELDOUT, dtype=np.uint16).astype(np.int32)
    points = bench.k_sweep(default_model_dir(), [1, 4], heldout, [1, 2, 3], decode_tokens=2, max_tokens=512)
    assert [p.k for p in points] == [1, 4]
    assert all(p.tokens_per_second > 0 and math.isfinite(p.perplexity) for p in points)
    assert points[1].perplexity < points[0].perplexity
