"""Counters of expert streaming: bytes and reads per token, I/O time per layer, cache hits.

    model.stream_stats.summary()       a dict, decode (one token per call) and prefill apart
    format_stream_stats(stats)         the text block `--timing` prints

"expected bytes" (the summary's theory_bytes_per_token) is what a resident engine's kernel
would touch without any reuse: K experts x expert bytes x MoE layers per token. Reading less than that means experts shared between
the tokens of a prefill chunk (read once for all of them) or served by the LRU.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass, field

from .reader import FetchReport


@dataclass
class Counters:
    """Sums over the streamed MoE layer calls of one phase."""

    calls: int = 0
    slots: int = 0  # token x expert selections (B * T * K per call)
    slot_bytes: int = 0  # slots x expert bytes: the no-reuse "theory"
    experts: int = 0  # distinct experts delivered (read or from the LRU)
    cached: int = 0  # of which from the LRU
    reads: int = 0
    bytes: int = 0
    page_cache_bytes: int = 0
    probed_bytes: int = 0  # bytes read while the page-cache probe was on
    seconds: float = 0.0
    upload_seconds: float = 0.0
    layer_tokens: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    layer_seconds: dict[int, float] = field(default_factory=lambda: defaultdict(float))
    layer_calls: dict[int, int] = field(default_factory=lambda: defaultdict(int))

    @property
    def tokens(self) -> int:
        """Tokens that went through (every streamed layer sees each token once)."""
        return max(self.layer_tokens.values(), default=0)

    def add(self, layer: int, tokens: int, slots: int, expert_bytes: int, report: FetchReport) -> None:
        """Book one read; `tokens` and `slots` are given with a call's first read only (0 for later groups)."""
        self.calls += tokens > 0
        self.slots += slots
        self.slot_bytes += slots * expert_bytes
        self.experts += report.experts
        self.cached += report.cached
        self.reads += report.reads
        self.bytes += report.bytes
        if report.page_cache_bytes is not None:
            self.page_cache_bytes += report.page_cache_bytes
            self.probed_bytes += report.bytes
        self.seconds += report.seconds
        self.upload_seconds += report.upload_seconds
        self.layer_tokens[layer] += tokens
        self.layer_seconds[layer] += report.seconds + report.upload_seconds
        self.layer_calls[layer] += tokens > 0

    def summary(self) -> dict:
        """Per-token figures of this phase (empty dict when nothing ran)."""
        tokens = self.tokens
        if not tokens:
            return {}
        per_layer = {
            layer: 1e3 * s / self.layer_calls[layer] for layer, s in sorted(self.layer_seconds.items())
        }
        return dict(
            tokens=tokens,
            bytes_per_token=self.bytes / tokens,
            theory_bytes_per_token=self.slot_bytes / tokens,
            reads_per_token=self.reads / tokens,
            experts_per_token=self.experts / tokens,
            io_ms_per_token=1e3 * (self.seconds + self.upload_seconds) / tokens,
            read_ms_per_token=1e3 * self.seconds / tokens,
            upload_ms_per_token=1e3 * self.upload_seconds / tokens,
            io_ms_per_layer_call=statistics.fmean(per_layer.values()),
            read_gb_per_s=self.bytes / self.seconds / 1e9 if self.seconds else 0.0,
            page_cache_hit_rate=self.page_cache_bytes / self.probed_bytes if self.probed_bytes else None,
            lru_hit_rate=self.cached / self.experts if self.experts else 0.0,
            io_ms_per_layer=per_layer,
        )


class StreamStats:
    """Counters for a streaming model, decode and prefill apart; `reset()` between measurements."""

    def __init__(self, layout: str, threads: int, cache_mb: float, probe: bool):
        self.layout, self.threads, self.cache_mb, self.probe = layout, threads, cache_mb, probe
        self.reset()

    def reset(self) -> None:
        self.decode, self.prefill = Counters(), Counters()

    def record(
        self,
        layer: int,
        *,
        decode: bool,
        tokens: int,
        slots: int,
        expert_bytes: int,
        report: FetchReport,
    ) -> None:
        """Book one read of layer `layer`: `tokens` = B * T, `slots` = B * T * K (once per call)."""
        (self.decode if decode else self.prefill).add(layer, tokens, slots, expert_bytes, report)

    def summary(self) -> dict:
        """{"decode": {...}, "prefill": {...}, "settings": {...}}; see Counters.summary for the fields."""
        settings = dict(
            layout=self.layout,
            io_threads=self.threads,
            expert_cache_mb=self.cache_mb,
            page_cache_probe="RWF_NOWAIT" if self.probe else "off",
        )
        return dict(decode=self.decode.summary(), prefill=self.prefill.summary(), settings=settings)


def format_stream_stats(stats: StreamStats) -> str:
    """The expert-streaming block of `--timing`: one line per phase, then I/O time per layer."""
    summary = stats.summary()
    settings = summary["settings"]
    lru = f"LRU {settings['expert_cache_mb']:g} MB" if settings["expert_cache_mb"] else "no LRU"
    probe = "page-cache hits measured with RWF_NOWAIT" if stats.probe else "page-cache hits not measured"
    lines = [
        f"expert streaming: {settings['layout']} layout, {settings['io_threads']} I/O threads, {lru}, {probe}",
        "  MB read/token: expert bytes read from disk per token; expected MB/token: K experts x expert bytes x "
        "MoE layers (no reuse); LRU hits: experts served from memory",
        f"{'phase':<8}{'tokens':>7}{'MB read/token':>14}{'expected MB/token':>18}{'reads/token':>12}"
        f"{'I/O ms/token':>13}{'GB/s':>7}{'page cache hits':>16}{'LRU hits':>9}",
    ]
    for phase in ("prefill", "decode"):
        s = summary[phase]
        if not s:
            continue
        hit = "?" if s["page_cache_hit_rate"] is None else f"{s['page_cache_hit_rate']:.0%}"
        lines.append(
            f"{phase:<8}{s['tokens']:>7}{s['bytes_per_token'] / 1e6:>14.1f}"
            f"{s['theory_bytes_per_token'] / 1e6:>18.1f}{s['reads_per_token']:>12.1f}"
            f"{s['io_ms_per_token']:>13.2f}{s['read_gb_per_s']:>7.2f}{hit:>16}{s['lru_hit_rate']:>9.0%}"
        )
    decode = summary["decode"] or summary["prefill"]
    if decode:
        per_layer = decode["io_ms_per_layer"]
        slowest = max(per_layer, key=per_layer.get)
        lines.append(
            f"I/O ms per layer call: mean {decode['io_ms_per_layer_call']:.2f}, "
            f"median {statistics.median(per_layer.values()):.2f}, "
            f"max {per_layer[slowest]:.2f} (layer {slowest}); upload to MLX "
            f"{decode['upload_ms_per_token']:.2f} ms/token"
        )
    return "\n".join(lines)
