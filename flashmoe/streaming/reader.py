"""Reading experts from disk: positioned reads in parallel into reused buffers, and an optional LRU.

    ExpertReader.read(layer, ids) -> ({part: mx.array (U, *slice shape)}, FetchReport)   U = len(ids)

Each expert is read with os.preadv straight into its slot of a per-part numpy buffer. The
buffers are reused from call to call (they grow to the largest batch seen) and copied once
into MLX arrays, so the next layer can refill them at once. A small thread pool keeps
several reads in flight: positioned reads release the GIL, and a deeper queue is what a
disk needs to reach its bandwidth.

Page-cache hits are measured, not guessed: each read is first tried with RWF_NOWAIT
(preadv2), which the kernel serves only from the page cache and refuses with EAGAIN when a
page would have to come from disk; the bytes it returns are the hits. Where RWF_NOWAIT is
not supported the probe switches itself off and the hit rate is reported as unknown.
"""

from __future__ import annotations

import errno
import os
import threading
import time
import weakref
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..errors import FlashMoeError
from .layout import ExpertPiece, LayerExperts

NUMPY_DTYPES = {
    "U32": np.uint32,
    "I32": np.int32,
    "BF16": np.uint16,
    "F16": np.float16,
    "U16": np.uint16,
    "F32": np.float32,
    "U8": np.uint8,
    "I8": np.int8,
}  # bf16 travels as uint16 and is viewed back
RWF_NOWAIT = getattr(os, "RWF_NOWAIT", None)


@dataclass
class FetchReport:
    """What one read() cost."""

    experts: int = 0  # experts delivered
    cached: int = 0  # of which from the LRU (no file read)
    reads: int = 0  # positioned reads issued (contiguous runs; the RWF_NOWAIT probes are not counted)
    bytes: int = 0  # bytes read from files
    page_cache_bytes: int | None = 0  # of which served from the page cache (None: probe off)
    seconds: float = 0.0  # wall time of the reads (and LRU copies)
    upload_seconds: float = 0.0  # numpy buffers -> MLX arrays


class ExpertCache:
    """Least-recently-used experts' bytes, bounded in bytes; capacity 0 turns it off."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max(0, int(max_bytes))
        self.entries: OrderedDict[tuple[int, int], list[np.ndarray]] = OrderedDict()
        self.bytes = 0

    def get(self, key: tuple[int, int]) -> list[np.ndarray] | None:
        slices = self.entries.get(key)
        if slices is not None:
            self.entries.move_to_end(key)
        return slices

    def put(self, key: tuple[int, int], slices: list[np.ndarray]) -> None:
        size = sum(s.nbytes for s in slices)
        if size > self.max_bytes or key in self.entries:
            return
        self.entries[key] = [s.copy() for s in slices]
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self.entries.popitem(last=False)
            self.bytes -= sum(s.nbytes for s in old)


@dataclass
class _Buffers:
    """One reusable (capacity, slice bytes) uint8 array per expert tensor part."""

    arrays: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)

    def get(self, piece: ExpertPiece, count: int) -> np.ndarray:
        key = (piece.part, piece.nbytes)
        array = self.arrays.get(key)
        if array is None or array.shape[0] < count:
            array = self.arrays[key] = np.empty((count, piece.nbytes), dtype=np.uint8)
        return array


class ExpertReader:
    """Reads experts of any layer of one layout; owns the file descriptors, threads, buffers and LRU."""

    def __init__(self, files: list[Path], *, threads: int = 4, cache_bytes: int = 0, probe: bool = True):
        self.files = list(files)
        self.fds = [os.open(f, os.O_RDONLY) for f in self.files]
        self.pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="flashmoe-io")
        self.cache = ExpertCache(cache_bytes)
        self.probe = probe and RWF_NOWAIT is not None  # switched off if the kernel refuses it
        self._buffers = _Buffers()
        # read() fills shared buffers and the LRU: one caller at a time (a model used from two threads
        # would otherwise hand one thread's experts to the other). Uncontended it costs ~0.2 us a call (<1% of a decode step on the tiny model).
        self._lock = threading.Lock()
        weakref.finalize(self, _close, self.fds, self.pool)

    def read(self, layer: LayerExperts, ids: np.ndarray) -> tuple[dict[str, mx.array], FetchReport]:
        """Experts `ids` of `layer`, stacked in that order: part -> (len(ids), *slice shape). Thread safe."""
        with self._lock:
            return self._read(layer, ids)

    def _read(self, layer: LayerExperts, ids: np.ndarray) -> tuple[dict[str, mx.array], FetchReport]:
        tic = time.perf_counter()
        count = len(ids)
        buffers = [self._buffers.get(p, count) for p in layer.pieces]
        report, pending = FetchReport(experts=count), []
        for slot, expert in enumerate(ids.tolist()):
            cached = self.cache.get((layer.layer, expert)) if self.cache.max_bytes else None
            if cached is not None:
                for buffer, piece_bytes in zip(buffers, cached):
                    buffer[slot] = piece_bytes
                report.cached += 1
            else:
                rows = [b[slot] for b in buffers]
                pending.append((expert, rows, self.pool.submit(self._read_expert, layer, expert, rows)))
        for expert, rows, future in pending:
            reads, size, hits = future.result()
            report.reads, report.bytes = report.reads + reads, report.bytes + size
            report.page_cache_bytes += hits
            if self.cache.max_bytes:
                self.cache.put((layer.layer, expert), rows)
        if not self.probe:
            report.page_cache_bytes = None
        mid = time.perf_counter()
        arrays = {p.part: _to_mlx(b[:count], p) for p, b in zip(layer.pieces, buffers)}
        report.seconds, report.upload_seconds = mid - tic, time.perf_counter() - mid
        return arrays, report

    def _read_expert(self, layer: LayerExperts, expert: int, rows: list[np.ndarray]) -> tuple[int, int, int]:
        """Read one expert into its buffer rows: (reads, bytes, bytes found in the page cache)."""
        reads = size = hits = 0
        for file, offset, views in layer.runs(expert, [memoryview(r) for r in rows]):
            got, hit = self._read_run(file, offset, views, layer, expert)
            reads, size, hits = reads + 1, size + got, hits + hit
        return reads, size, hits

    def _read_run(
        self, file: int, offset: int, views: list[memoryview], layer: LayerExperts, expert: int
    ) -> tuple[int, int]:
        """Fill `views` from `offset`: (bytes read, of which from the page cache)."""
        fd, total = self.fds[file], sum(len(v) for v in views)
        done = hits = 0
        if self.probe:
            try:
                done = hits = os.preadv(fd, views, offset, RWF_NOWAIT)
            except BlockingIOError:  # EAGAIN: some page is not cached
                pass
            except OSError as err:
                if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                    raise
                self.probe = False
        while done < total:
            got = os.preadv(fd, _skip(views, done), offset + done)
            if got == 0:
                names = [p.name for p in layer.pieces if int(p.offsets[expert]) >= offset and p.file == file]
                raise FlashMoeError(
                    f"{self.files[file]}: ends at byte {offset + done}, expected {total - done} more "
                    f"bytes of expert {expert} ('{names[0] if names else '?'}')"
                )
            done += got
        return total, hits


def _skip(views: list[memoryview], n: int) -> list[memoryview]:
    """`views` without their first `n` bytes (to resume a short read)."""
    rest = []
    for view in views:
        if n >= len(view):
            n -= len(view)
        else:
            rest.append(view[n:])
            n = 0
    return rest


def _to_mlx(rows: np.ndarray, piece: ExpertPiece) -> mx.array:
    """(U, slice bytes) uint8 -> an MLX array (U, *slice shape) of the piece's dtype (a copy)."""
    value = mx.array(rows.view(NUMPY_DTYPES[piece.dtype]).reshape(len(rows), *piece.shape))
    return value.view(mx.bfloat16) if piece.dtype == "BF16" else value


def _close(fds: list[int], pool: ThreadPoolExecutor) -> None:
    pool.shutdown(wait=False)
    for fd in fds:
        os.close(fd)
