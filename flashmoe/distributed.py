"""Expert parallelism over mx.distributed: N ranks, each holding 1/N of every MoE layer's experts.

    flashmoe.load(path, group=True)            mx.distributed.init() picks the backend (mlx.launch sets it up)
    mlx.launch -n 2 --backend ring -- python -m flashmoe --model PATH --distributed

What each rank holds and does (docs/DISTRIBUTED.md):

    replicated   embeddings, attention / Gated DeltaNet, norms, routers, shared experts, lm_head
    sharded      the routed experts: rank r owns experts [r E/N, (r+1) E/N) of every MoE layer,
                 read from the checkpoint alone (flashmoe.streaming.layout's byte ranges), resident
                 as (E/N, out, words) stacks, or streamed from disk per token (stream_experts=True)
    per layer    the router runs on every rank (same weights, same input: the same choice); each rank
                 computes the selected (token, expert) slots it owns, weighted, scatter-added per token;
                 then one all_sum of (B, T, D) combines the ranks. The shared expert is computed on every
                 rank after it (FOLD_SHARED=True: on rank 0 only, before it; no faster here, see docs).

`ShardedSource(inner, ...)` wraps an expert source (models.moe.ResidentSource or
streaming.ExpertStreamer) with the same interface; its experts objects wrap the inner ones,
and models.moe.MoE hands them the layer's output through their `combine` hook.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np

from .errors import FlashMoeError
from .models.args import ModelArgs
from .models.moe import ResidentSource
from .streaming.layout import ExpertLayout, is_expert_tensor, open_layout
from .streaming.reader import ExpertReader

# The shared expert on rank 0 only, added before the all_sum (True), or on every rank after it (False, kept):
# folding never shortens the critical path (rank 0 still computes it) and the imbalance it creates is paid
# in the ring backend's polling while the other ranks wait; measured in benchmarks/distributed.py.
FOLD_SHARED = False
LOAD_THREADS = 8  # positioned reads in flight while a rank reads its experts at load


def resolve_group(group) -> mx.distributed.Group | None:
    """load()'s `group`: None/False (one process), True (mx.distributed.init()), or a Group."""
    if group is None or group is False:
        return None
    if group is True:
        if not mx.distributed.is_available():
            raise FlashMoeError(
                "group=True: this MLX build has no distributed backend (mx.distributed.is_available())"
            )
        return mx.distributed.init()
    if isinstance(group, mx.distributed.Group):
        return group
    raise FlashMoeError(f"group must be an mx.distributed.Group, True or None, found {type(group).__name__}")


def expert_range(num_experts: int, group) -> tuple[int, int]:
    """The experts [lo, hi) rank group.rank() owns: a contiguous 1/N of them."""
    size, rank = group.size(), group.rank()
    if num_experts % size:
        raise FlashMoeError(
            f"expert parallelism over {size} ranks needs a number of experts divisible by {size}; "
            f"the model has {num_experts} experts per MoE layer (use a divisor of {num_experts})"
        )
    per = num_experts // size
    return rank * per, (rank + 1) * per


class ShardedSource:
    """An expert source whose layers hold (and compute) only this rank's experts."""

    def __init__(
        self,
        inner,
        directory: str | Path,
        args: ModelArgs,
        group: mx.distributed.Group,
        fold_shared: bool | None = None,
    ):
        self.inner, self.group = inner, group
        self.rank, self.size = group.rank(), group.size()
        self.lo, self.hi = expert_range(args.num_experts, group)
        self.fold_shared = FOLD_SHARED if fold_shared is None else fold_shared
        self.resident = isinstance(inner, ResidentSource)
        self.layout: ExpertLayout | None = None
        if self.resident:
            try:
                self.layout = open_layout(directory, args)
            except FlashMoeError as err:
                raise FlashMoeError(
                    f"expert parallelism reads each rank's experts by their byte ranges; {err} "
                    "(convert the checkpoint to mlx-lm's layout first)"
                ) from None
        self.loaded_bytes = 0  # expert bytes this rank read at load (resident)
        self.stats = inner.stats  # streaming counters of this rank (None: resident)

    def tensor_infos(self) -> dict:
        """Every expert tensor as the checkpoint holds it (all E experts: quantization is checked on those)."""
        return self.layout.tensor_infos() if self.resident else self.inner.tensor_infos()

    def keep(self, tensors: dict[str, mx.array]) -> dict[str, mx.array]:
        """Resident: the lazily loaded expert stacks (never read) replaced by this rank's experts, read
        from their byte ranges as (E/N, ...) stacks. Streamed: what the streamer keeps."""
        if not self.resident:
            return self.inner.keep(tensors)
        kept = {name: value for name, value in tensors.items() if not is_expert_tensor(name)}
        reader = ExpertReader(self.layout.files, threads=LOAD_THREADS, probe=False)
        owned = np.arange(self.lo, self.hi)
        for prefix, layer in self.layout.layers.items():
            arrays, report = reader.read(layer, owned)  # copies out of the reader's buffers
            self.loaded_bytes += report.bytes
            stored = self.layout.stored_prefixes[prefix]
            for part, value in arrays.items():
                kept[f"{stored}.switch_mlp.{part}"] = value
        return kept

    def __call__(self, store, prefix: str) -> ShardedExperts:
        offset = self.lo if self.resident else 0  # resident stacks hold experts lo..hi-1 as 0..E/N-1
        return ShardedExperts(
            self.inner(store, prefix), self.lo, self.hi, offset, self.group, self.fold_shared
        )

    def finish(self) -> None:
        self.inner.finish()


class ShardedExperts:
    """One MoE layer's experts on this rank: the owned slots through the inner experts object, a
    partial (B, T, D) sum; `combine` all_sums it (with the shared expert) into the layer's output."""

    def __init__(self, inner, lo: int, hi: int, offset: int, group: mx.distributed.Group, fold_shared: bool):
        self.inner, self.lo, self.hi, self.offset = inner, lo, hi, offset
        self.group, self.rank, self.fold_shared = group, group.rank(), fold_shared

    def __call__(self, x: mx.array, experts: mx.array, weights: mx.array) -> mx.array:
        """x (B, T, D), experts and weights (B, T, K) -> this rank's share of sum_k w_k expert_k(x): (B, T, D)."""
        *lead, k = experts.shape
        d = x.shape[-1]
        # The owned slots are picked on the host: one sync per MoE layer (streaming syncs here anyway).
        flat = np.array(experts).reshape(-1)
        slots = np.nonzero((flat >= self.lo) & (flat < self.hi))[0]
        if len(slots) == 0:
            return mx.zeros(x.shape, x.dtype)
        local = (flat[slots] - self.offset).astype(np.uint32)
        w = weights.reshape(-1)[mx.array(slots)]
        if x.size == d:  # one token (decode): its n owned slots as (1, 1, n), as the engine's decode path
            n = len(slots)
            return self.inner(x, mx.array(local).reshape(1, 1, n), w.reshape(1, 1, n))
        tokens = mx.array(slots // k)  # each slot's token
        rows = x.reshape(-1, d)[tokens][None]  # (1, n, D): one row per owned slot, one expert each
        y = self.inner(rows, mx.array(local).reshape(1, -1, 1), w.reshape(1, -1, 1))[0]  # (n, D), weighted
        return mx.zeros((x.size // d, d), x.dtype).at[tokens].add(y).reshape(*lead, d)

    def combine(self, x: mx.array, y: mx.array, shared) -> mx.array:
        """The layer's output from this rank's partial sum y; `shared(x)` is the gated shared expert (or None)."""
        if shared is not None and self.fold_shared:
            if self.rank == 0:
                y = y + shared(x)
            return mx.distributed.all_sum(y, group=self.group)
        y = mx.distributed.all_sum(y, group=self.group)
        return y if shared is None else y + shared(x)


def expert_nbytes(model) -> int:
    """Bytes of the routed experts this process holds in memory (resident stacks; 0 when streamed)."""
    total = 0
    for layer in model.layers:
        experts = getattr(layer.mlp, "experts", None)
        experts = getattr(experts, "inner", experts)
        for name in ("gate_proj", "up_proj", "down_proj"):
            linear = getattr(experts, name, None)
            for part in ("weight", "scales", "biases"):
                value = getattr(linear, part, None)
                if isinstance(value, mx.array):
                    total += value.nbytes
    return total
