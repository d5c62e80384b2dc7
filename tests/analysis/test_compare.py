"""Repeats, spreads and verdicts: the rule every speed claim in the notebooks goes through."""

from __future__ import annotations

import numpy as np
import pytest

from flashmoe.analysis import bench


def test_spread_gives_median_range_quartiles_and_error_bars():
    s = bench.spread([3.0, 1.0, 2.0, 5.0, 4.0])
    assert (s.median, s.lo, s.hi) == (3.0, 1.0, 5.0)
    assert s.iqr == (2.0, 4.0) and s.yerr == (2.0, 2.0)
    assert s.scaled(1e3).median == 3000.0
    medians, yerr = bench.error_bars([s, bench.spread([10.0, 12.0, 11.0])])
    assert medians == [3.0, 11.0] and yerr.shape == (2, 2) and yerr[:, 1].tolist() == [1.0, 1.0]
    assert "n=5" in str(s)
    with pytest.raises(ValueError):
        bench.spread([])


def test_interleaved_takes_turns_and_reverses_every_other_round():
    calls = []
    result = bench.interleaved(
        {"a": lambda: calls.append("a") or 1, "b": lambda: calls.append("b") or 2},
        repeats=4,
        warmup=1,
    )
    assert calls == ["a", "b"] + ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert result == {"a": [1] * 4, "b": [2] * 4}


@pytest.mark.parametrize(
    "a, b, expected",
    [
        ([10, 11, 12, 11, 10], [8, 9, 9.5, 8.5, 9], "faster"),  # separated: every A above every B
        ([8, 9, 9.5, 8.5, 9], [10, 11, 12, 11, 10], "slower"),
        (
            [10, 11, 12, 11, 10],
            [9, 9.5, 10.5, 9, 9],
            "within noise",
        ),  # one overlapping sample is enough
        ([10, 10, 10], [10, 10, 10], "within noise"),
        ([20, 21], [10, 11], "within noise"),  # too few runs to claim anything
    ],
)
def test_compare_claims_a_direction_only_when_the_ranges_do_not_overlap(a, b, expected):
    assert bench.compare(a, b) == expected


def test_compare_for_times_lower_is_faster():
    assert bench.compare([1.0, 1.1, 1.2], [2.0, 2.1, 2.2], higher_is_faster=False) == "faster"
    assert bench.compare([2.0, 2.1, 2.2], [1.0, 1.1, 1.2], higher_is_faster=False) == "slower"


def test_compare_is_antisymmetric_on_random_samples():
    rng = np.random.default_rng(0)
    flip = {"faster": "slower", "slower": "faster", "within noise": "within noise"}
    for _ in range(200):
        a, b = rng.normal(10, 1, 5), rng.normal(10 + rng.normal(0, 2), 1, 5)
        assert bench.compare(b, a) == flip[bench.compare(a, b)]


def test_a_median_ordering_alone_is_not_a_verdict():
    """The notebook 03 K sweep once printed K=1 slower than K=2 from single runs; the ranges say within noise."""
    k1, k2 = [40, 55, 61, 47, 58], [52, 44, 60, 49, 50]
    assert bench.compare(k1, k2) == "within noise"


def test_verdict_words_follow_compare():
    text = bench.verdict("correct", [10, 11, 12], "corrupted", [9, 11.5, 13])
    assert "within noise" in text and "faster" not in text and "slower" not in text
    text = bench.verdict("flashmoe", [30, 31, 32], "mlx-lm", [20, 21, 22])
    assert "flashmoe is faster than mlx-lm" in text and "1.48x" in text
    text = bench.verdict("fma", [1.0, 1.1, 1.2], "naive", [2.0, 2.2, 2.4], unit="ms", higher_is_faster=False)
    assert "fma is faster than naive" in text and "2.00x" in text


def test_time_kernels_interleaves_backends_and_keeps_every_sample():
    timings = bench.time_kernels(["mlx", "reference"], 4, 64, 64, 256, repeats=3, number=2)
    assert [t.backend for t in timings] == ["mlx", "reference"]
    for t in timings:
        assert len(t.samples) == 3 and t.seconds == bench.spread(t.samples).median
        assert t.gbps_spread.lo <= t.gbps <= t.gbps_spread.hi


def test_decode_speeds_gives_a_spread_per_engine():
    import flashmoe

    model, tokenizer = flashmoe.load(None)
    speeds = bench.decode_speeds(
        {"a": (model, model.make_cache), "b": (model, model.make_cache)},
        tokenizer.encode("def f(x):\n"),
        tokens=2,
        repeats=3,
    )
    assert set(speeds) == {"a", "b"} and all(len(s.samples) == 3 and s.lo > 0 for s in speeds.values())
