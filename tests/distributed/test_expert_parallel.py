"""Expert parallelism (flashmoe.distributed) against the single-process engine, over real ranks.

One `mlx.launch -n 2 --backend ring` runs tests/distributed/ep_worker.py on tiny checkpoints of
all four architectures, resident and streamed (launching costs seconds: one launch serves every
check); each rank writes its prefill logits, 32 greedy tokens, last decode logits and expert
bytes, which are compared here with the same computation in this process (group=None), float32.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest

from flashmoe.distributed import expert_range, resolve_group
from flashmoe.errors import FlashMoeError
from tests.helpers import CONFIGS, write_checkpoint, write_tiny_tokenizer

from .ep_worker import run_job

RANKS = 2
ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).resolve().parent / "ep_worker.py"
JOBS = [(arch, stream) for arch in CONFIGS for stream in (False, True)]
TOLERANCE = 1e-5


def _launcher() -> str | None:
    beside = Path(sys.executable).parent / "mlx.launch"
    return str(beside) if beside.exists() else shutil.which("mlx.launch")


def _launch(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    )
    return subprocess.run(
        [_launcher(), "-n", str(RANKS), "--backend", "ring", "--", sys.executable, *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )


def _skip_unless_ring_works(failed: subprocess.CompletedProcess | None = None) -> None:
    """Skip with the reason when mlx.launch or the ring backend cannot run here; else fail with `failed`'s output."""
    if _launcher() is None:
        pytest.skip("mlx.launch is not installed (it comes with the mlx package)")
    if not mx.distributed.is_available():
        pytest.skip("this MLX build has no distributed backend (mx.distributed.is_available() is False)")
    probe = _launch(
        [
            "-c",
            (
                "import mlx.core as mx; g = mx.distributed.init(backend='ring'); assert g.size() == 2; "
                "print(mx.distributed.all_sum(mx.array([1.0]), group=g).item())"
            ),
        ],
        timeout=60,
    )
    if probe.returncode != 0 or probe.stdout.split() != ["2.0", "2.0"]:
        pytest.skip(
            f"the ring backend does not run 2 local ranks here: {(probe.stderr or probe.stdout)[-400:]}"
        )
    if failed is not None:
        pytest.fail(
            f"mlx.launch exited {failed.returncode}:\n{failed.stdout[-2000:]}\n{failed.stderr[-4000:]}"
        )


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """Checkpoints, one launch of the worker over all jobs, and the single-process references."""
    if _launcher() is None or not mx.distributed.is_available():
        _skip_unless_ring_works()
    base = tmp_path_factory.mktemp("expert_parallel")
    jobs = []
    for arch in CONFIGS:
        write_checkpoint(base / arch, arch)
        write_tiny_tokenizer(base / arch)  # for the CLI test
        jobs += [
            {
                "name": f"{arch}-{'stream' if s else 'resident'}",
                "path": str(base / arch),
                "stream": s,
            }
            for s in (False, True)
        ]
    (base / "jobs.json").write_text(json.dumps(jobs))
    (base / "out").mkdir()
    done = _launch([str(WORKER), str(base / "jobs.json"), str(base / "out")])
    if done.returncode != 0:
        _skip_unless_ring_works(done)
    ranks = {
        job["name"]: [dict(np.load(base / "out" / f"{job['name']}.rank{r}.npz")) for r in range(RANKS)]
        for job in jobs
    }
    references = {job["name"]: run_job(job["path"], job["stream"], None) for job in jobs}
    return SimpleNamespace(ranks=ranks, references=references, base=base)


def _rel(y: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(y - ref).max() / max(np.abs(ref).max(), 1e-30))


@pytest.mark.parametrize("arch,stream", JOBS, ids=[f"{a}-{'stream' if s else 'resident'}" for a, s in JOBS])
def test_logits_and_greedy_tokens_match_one_process(launched, arch, stream):
    name = f"{arch}-{'stream' if stream else 'resident'}"
    ref = launched.references[name]
    for rank, got in enumerate(launched.ranks[name]):
        assert _rel(got["logits"], ref["logits"]) < TOLERANCE, f"rank {rank}: prefill logits"
        assert _rel(got["last"], ref["last"]) < TOLERANCE, f"rank {rank}: logits after 32 decode steps"
        assert got["tokens"].tolist() == ref["tokens"].tolist(), f"rank {rank}: greedy tokens"


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_each_rank_holds_one_nth_of_the_experts(launched, arch):
    full = int(launched.references[f"{arch}-resident"]["expert_bytes"])
    assert full > 0
    for rank, got in enumerate(launched.ranks[f"{arch}-resident"]):
        assert int(got["expert_bytes"]) == pytest.approx(full / RANKS, rel=0.01), f"rank {rank}"


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_streamed_ranks_read_only_their_experts(launched, arch):
    name = f"{arch}-stream"
    full = int(launched.references[name]["stream_bytes"])  # one process: every selected expert
    read = [int(got["stream_bytes"]) for got in launched.ranks[name]]
    assert all(int(got["expert_bytes"]) == 0 for got in launched.ranks[name])  # nothing resident
    assert sum(read) == full, (read, full)  # each selected expert read by exactly one rank
    assert all(0 < r < full for r in read)


def test_cli_distributed_prints_on_rank_zero_only(launched):
    generate = [
        "-m",
        "flashmoe",
        "--model",
        str(launched.base / "qwen3_moe"),
        "--prompt",
        "x",
        "--max-tokens",
        "8",
    ]
    single = subprocess.run(
        [sys.executable, *generate],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert single.returncode == 0, single.stderr
    done = _launch([*generate, "--distributed"])
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout == single.stdout  # one rank's text, the same text
    assert done.stderr.count("Generation:") == 1


def test_experts_must_divide_among_ranks():
    with pytest.raises(FlashMoeError, match="divisible by 3"):
        expert_range(8, SimpleNamespace(size=lambda: 3, rank=lambda: 0))
    assert expert_range(8, SimpleNamespace(size=lambda: 2, rank=lambda: 1)) == (4, 8)
    with pytest.raises(FlashMoeError, match="mx.distributed.Group"):
        resolve_group("ring")
    assert resolve_group(None) is None and resolve_group(False) is None
