"""Expert streaming, flash-moe style: run MoE checkpoints larger than memory.

`flashmoe.load(path, stream_experts=True)` loads every non-expert weight as usual and leaves
the routed experts on disk. Each MoE layer then routes, reads the selected experts' slices
(flashmoe.streaming.reader: parallel positioned reads into reused buffers), and runs them through
the same gathered kernel as resident experts, with the selected ids remapped onto a small
stack of just the experts read:

    experts (B, T, K) ids -> unique U ids, local (B, T, K) in 0..U-1 -> W (U, out, words) -> (B, T, K, D)

A decode token's K ids are all different: they are read in routing order, so the local ids are
0..K-1, the same array every layer (nothing sent to the device but the experts).

Prefill reads the union of the experts its tokens chose, in groups of at most `buffer_mb`
so memory stays bounded whatever the prompt. Numerics equal resident mode's: the same
kernel computes each (token, expert) product from the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..errors import FlashMoeError
from ..models.args import ModelArgs
from ..models.fused import FusedForm, fusable
from ..models.layers import ExpertLinear
from ..models.moe import mixed_experts, switch_mlp, weighted_sum
from ..models.store import TensorStore
from ..quant import QuantSpec, TensorInfo
from ..timing import timer
from .layout import ExpertLayout, LayerExperts, is_expert_tensor, open_layout
from .reader import NUMPY_DTYPES, ExpertReader
from .stats import StreamStats

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


@dataclass
class StreamOptions:
    """How experts are streamed (the defaults are what measured fastest here: benchmarks/STREAMING.md)."""

    expert_cache_mb: float = 0.0  # LRU of recently used experts; 0 relies on the OS page cache alone
    io_threads: int = 16  # reads in flight (one expert each)
    buffer_mb: float = 256.0  # most expert bytes read at once (prefill reads its union in groups this large)
    probe_page_cache: bool = True  # count page-cache hits with RWF_NOWAIT (streaming.reader)


def stream_options(
    stream_experts: bool | StreamOptions, expert_cache_mb: float | None
) -> StreamOptions | None:
    """load()'s arguments as options, or None when the experts are to be resident."""
    if not stream_experts:
        return None
    options = stream_experts if isinstance(stream_experts, StreamOptions) else StreamOptions()
    if expert_cache_mb is not None:
        if expert_cache_mb < 0:
            raise FlashMoeError(f"expert_cache_mb must be >= 0, found {expert_cache_mb}")
        options = StreamOptions(
            expert_cache_mb, options.io_threads, options.buffer_mb, options.probe_page_cache
        )
    return options


class ExpertStreamer:
    """The routed experts of every MoE layer left on disk: `streamer(store, prefix)` gives a layer's
    StreamedExperts. The same interface as models.moe.ResidentSource, so the loader treats both alike.
    """

    def __init__(self, directory: Path, args: ModelArgs, options: StreamOptions):
        self.layout: ExpertLayout = open_layout(directory, args)
        self.options = options
        self.reader = ExpertReader(
            self.layout.files,
            threads=options.io_threads,
            cache_bytes=int(options.expert_cache_mb * 2**20),
            probe=options.probe_page_cache,
        )
        self.stats = StreamStats(
            self.layout.kind, options.io_threads, options.expert_cache_mb, self.reader.probe
        )
        self._taken: set[str] = set()

    def tensor_infos(self) -> dict[str, TensorInfo]:
        """The expert tensors' infos (a repacked checkpoint has them only in its manifest)."""
        return self.layout.tensor_infos()

    @staticmethod
    def keep(tensors: dict[str, mx.array]) -> dict[str, mx.array]:
        """The lazily loaded tensors minus the experts (mx.load reads nothing until evaluated)."""
        return {name: value for name, value in tensors.items() if not is_expert_tensor(name)}

    def __call__(self, store: TensorStore, prefix: str) -> StreamedExperts:
        if prefix not in self.layout.layers:
            raise FlashMoeError(
                f"{store.source}: tensor '{prefix}.switch_mlp.gate_proj.weight' is missing "
                f"(the model needs it; streamed layers: {len(self.layout.layers)})"
            )
        layer = self.layout.layers[prefix]
        specs = [self._streamed_spec(store, f"{prefix}.switch_mlp.{p}", layer) for p in PROJECTIONS]
        budget = int(self.options.buffer_mb * 2**20) // layer.expert_bytes
        self._taken.add(prefix)
        return StreamedExperts(layer, self.reader, self.stats, specs, store.backend, store.dtype, budget)

    def finish(self) -> None:
        """Every streamed layer must have been taken by the model."""
        unused = sorted(set(self.layout.layers) - self._taken)
        if unused:
            raise FlashMoeError(
                f"{self.layout.files[0].parent}: expert tensors the model does not use: "
                f"'{unused[0]}.switch_mlp.*' ({len(unused)} layers)"
            )

    def _streamed_spec(self, store: TensorStore, module: str, layer: LayerExperts) -> QuantSpec | None:
        """The projection's quantization (None: plain weights), refusing what streaming cannot replay."""
        for piece in layer.pieces:
            if piece.dtype not in NUMPY_DTYPES:
                raise FlashMoeError(
                    f"{store.source}: tensor '{piece.name}' has dtype {piece.dtype}, "
                    f"which expert streaming cannot read (expected one of {sorted(NUMPY_DTYPES)})"
                )
        if not any(p.part.endswith("scales") for p in layer.pieces):
            return None
        spec = store.spec(module)
        if store.quant == "global" and store.default_spec is not None and spec != store.default_spec:
            raise FlashMoeError(
                f"{store.source}: quant='global' would misread '{module}' ({spec}); "
                "that replay is not supported with stream_experts"
            )
        return spec


class StreamedExperts:
    """One MoE layer's routed experts, read from disk on every call: (x, experts) -> (B, T, K, D)."""

    def __init__(
        self,
        layer: LayerExperts,
        reader: ExpertReader,
        stats: StreamStats,
        specs: list,
        backend: str,
        dtype: mx.Dtype,
        group_experts: int,
    ):
        self.layer, self.reader, self.stats = layer, reader, stats
        self.specs, self.backend, self.dtype = specs, backend, dtype
        self.group_experts = max(1, group_experts)  # most experts read at once
        self._slot_orders: dict[tuple[int, ...], mx.array] = {}  # local ids of a read in slot order

    def fused_form(self, k: int) -> FusedForm | None:
        """How the fused kernels take these experts for a decode token's K (read at once), or None."""
        pieces = {p.part: p for p in self.layer.pieces}
        if (
            not fusable(self.backend, self.specs)
            or k > self.group_experts
            or "gate_proj.scales" not in pieces
        ):
            return None
        # scales in the compute dtype: _load casts them so
        return FusedForm(
            self.specs[0], pieces["gate_proj.weight"].shape, pieces["down_proj.weight"].shape, self.dtype
        )

    def __call__(
        self, x: mx.array, experts: mx.array, weights: mx.array, residual=None, shared=None
    ) -> mx.array:
        """x (B, T, D), experts and weights (B, T, K) -> (B, T, D) (+ residual), as resident experts give;
        shared: (SharedSlot, SharedGate), the shared expert as slot K of the fused launches (a decode
        token, where `fused_form` says they run)."""
        # Routing decides what to read, so the ids must be on the host: one sync per MoE layer,
        # inherent to streaming (the forward pass cannot be one lazy graph across layers).
        ids = np.array(experts)  # (B, T, K)
        unique, local = np.unique(ids.reshape(-1), return_inverse=True)  # U ids; each slot's index into them
        if len(unique) == ids.size <= self.group_experts:  # every slot its own expert: a decode token
            # read in slot order: slot i's expert is row i of what was read, so the local ids are a
            # constant (0..N-1) made once, not a fresh array sent to the device every layer
            projections = self._load(ids.reshape(-1), ids, first=True)
            local_ids = self._slot_order(ids.shape)
            return mixed_experts(*projections, x, local_ids, weights, residual, shared=shared)
        if shared is not None:
            raise FlashMoeError(
                f"{self.layer.prefix}: a shared slot for {ids.size} slots of {len(unique)} experts"
            )
        if len(unique) <= self.group_experts:  # a few tokens (K <= the group): one read, one kernel call
            projections = self._load(unique, ids, first=True)
            local_ids = mx.array(local.reshape(ids.shape).astype(np.uint32))  # into the U experts read
            return mixed_experts(*projections, x, local_ids, weights, residual)
        y = weighted_sum(self._grouped(x, ids, unique), weights)
        return y if residual is None else residual + y

    def _slot_order(self, shape: tuple[int, ...]) -> mx.array:
        """0..N-1 uint32 in `shape`, made from data once per shape: no array sent to the device per MoE
        layer (np.unique's local ids cost 80 us a layer on the H200, benchmarks/stream_sync.py)."""
        if shape not in self._slot_orders:
            self._slot_orders[shape] = mx.array(
                np.arange(int(np.prod(shape)), dtype=np.uint32).reshape(shape)
            )
        return self._slot_orders[shape]

    def _grouped(self, x: mx.array, ids: np.ndarray, unique: np.ndarray) -> mx.array:
        """The union read `group_experts` at a time; each group computes the (token, expert) slots it serves."""
        k = ids.shape[-1]
        flat = ids.reshape(-1)  # (N,) slots, N = B * T * K
        order = np.argsort(flat, kind="stable")  # slots sorted by expert
        by_expert = flat[order]
        rows = x.reshape(-1, x.shape[-1])  # (B * T, D)
        outputs = []
        for start in range(0, len(unique), self.group_experts):
            group = unique[start : start + self.group_experts]
            lo, hi = (
                np.searchsorted(by_expert, group[0], "left"),
                np.searchsorted(by_expert, group[-1], "right"),
            )
            slots = order[lo:hi]  # the slots this group serves
            local = np.searchsorted(group, flat[slots]).astype(np.uint32)[:, None]  # (n, 1) into the group
            projections = self._load(group, ids, first=start == 0)
            y = switch_mlp(*projections, rows[mx.array(slots // k)], mx.array(local))  # (n, 1, D)
            # bound memory: free this group's experts before reading the next (a sync, prefill only)
            mx.eval(y)
            timer.mark("experts")
            outputs.append(y[:, 0])
        y = mx.concatenate(outputs)[mx.array(np.argsort(order))]  # (N, D) back in slot order
        return y.reshape(*ids.shape, -1)  # (B, T, K, D)

    def _load(self, experts: np.ndarray, ids: np.ndarray, first: bool) -> list[ExpertLinear]:
        """Read `experts` and wrap them as three stacked (U, out, words) projections."""
        arrays, report = self.reader.read(self.layer, experts)
        tokens = ids.size // ids.shape[-1]
        self.stats.record(
            self.layer.layer,
            decode=tokens == 1,
            tokens=tokens if first else 0,
            slots=ids.size if first else 0,
            expert_bytes=self.layer.expert_bytes,
            report=report,
        )
        timer.mark("expert i/o")
        linears = []
        for proj, spec in zip(PROJECTIONS, self.specs):
            weight = arrays[f"{proj}.weight"]
            if spec is None and mx.issubdtype(weight.dtype, mx.floating):
                # plain experts in the compute dtype, as TensorStore.take does
                weight = weight.astype(self.dtype)
            # scales and biases in the compute dtype, as TensorStore.linear holds a resident layer's
            # (exact; no op where the checkpoint stores that dtype, as bf16 on a GPU)
            scales, biases = (
                _in_dtype(arrays.get(f"{proj}.{part}"), self.dtype) for part in ("scales", "biases")
            )
            linears.append(ExpertLinear(weight, scales, biases, None, spec, self.backend))
        return linears


def _in_dtype(value: mx.array | None, dtype: mx.Dtype) -> mx.array | None:
    """A float array in `dtype` (others, and None, as they are)."""
    if value is None or not mx.issubdtype(value.dtype, mx.floating):
        return value
    return value.astype(dtype)
