"""flashmoe.load: a checkpoint directory (or the bundled default model) -> (Model, Tokenizer).

One straight line, in load_model:
    config.json -> ModelArgs (the architecture's row) and a QuantPlan (flashmoe.quant)
    the expert source, chosen once: resident (models.moe.ResidentSource) or streamed
        from disk (streaming.ExpertStreamer)
    the safetensors headers -> every quantized tensor checked against the plan
    the tensors -> sanitize -> TensorStore -> Model, with every tensor accounted for
    what the loader found -> model.report (a LoadReport), weight bytes per token included

`path` may also be a Hugging Face Hub id (`mlx-community/Qwen3-Coder-Next-4bit`, flashmoe.hub):
a local directory of that name wins, else the cached snapshot, else a download when online.
"""

from __future__ import annotations

import json
import sys
import warnings
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from . import distributed, kernels
from .errors import FlashMoeError
from .models.args import ModelArgs
from .models.model import Model
from .models.moe import ResidentSource
from .models.sanitize import DROPPED_PREFIXES, sanitize
from .models.store import TensorStore
from .progress import progress_bar, shown
from .quant import QuantPlan, Resolved, TensorInfo, check_tensors, resolve
from .safetensors import nbytes, read_tensors, tensor_infos
from .streaming.experts import ExpertStreamer, StreamOptions, stream_options
from .streaming.layout import MANIFEST
from .streaming.stats import StreamStats
from .tokenizer import Tokenizer

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "assets" / "flashmoe-coder-tiny"
LARGE_CHECKPOINT_BYTES = 1 << 30  # above this, a load with a progress bar reads the weights shard by shard


@dataclass
class LoadReport:
    """What the loader found and chose, in one place (`model.report`)."""

    directory: Path
    backend: str  # the kernel backend the model runs
    dtype: mx.Dtype  # the compute dtype
    misread_modules: list[str] = field(default_factory=list)  # quant="global": modules read at the wrong bits
    # tensors flashmoe does not use (mtp heads, vision tower)
    dropped: list[str] = field(default_factory=list)
    stream_stats: StreamStats | None = None  # expert streaming counters (None: experts resident)
    # weight bytes one decode step reads, gpt-fast's figure: {"dense", "experts", "total"} (bytes_per_token())
    bytes_per_token: dict[str, float] = field(default_factory=dict)


def load(
    path: str | Path | None = None,
    backend: str = "auto",
    quant: str = "config",
    k: int | None = None,
    dtype: mx.Dtype | None = None,
    stream_experts: bool | StreamOptions = False,
    expert_cache_mb: float | None = None,
    progress: bool | None = None,
    group=None,
) -> tuple[Model, Tokenizer]:
    """Load a model and its tokenizer. `quant="global"` reproduces the 4-bit-only engine's bug.

    `path`: a checkpoint directory, a Hugging Face Hub id (`owner/name`: the cache, else a download),
    or None for the bundled model. `progress`: download and loading bars on stderr (None: when
    stderr is a terminal; False: never). `group` (an mx.distributed.Group, or True for
    mx.distributed.init()) shards the routed experts over its ranks (flashmoe.distributed;
    docs/DISTRIBUTED.md).
    """
    directory = _resolve_path(path, progress)
    _say_backend_once(backend)
    model = load_model(
        directory,
        backend=backend,
        quant=quant,
        k=k,
        dtype=dtype,
        stream_experts=stream_experts,
        expert_cache_mb=expert_cache_mb,
        progress=progress,
        group=group,
    )
    tokenizer = Tokenizer.from_dir(directory)
    vocab = getattr(tokenizer, "vocab_size", None)
    if isinstance(vocab, int) and vocab > model.args.vocab_size:
        raise FlashMoeError(
            f"{directory / 'tokenizer.json'}: the tokenizer has {vocab} ids but the model's "
            f"embedding has {model.args.vocab_size} rows ({directory / 'config.json'} vocab_size): "
            "ids past the table have no embedding (do tokenizer and model belong together?)"
        )
    return model, tokenizer


def load_model(
    directory: str | Path,
    backend: str = "auto",
    quant: str = "config",
    k: int | None = None,
    dtype: mx.Dtype | None = None,
    stream_experts: bool | StreamOptions = False,
    expert_cache_mb: float | None = None,
    progress: bool | None = None,
    group=None,
) -> Model:
    """The model alone (no tokenizer needed). `dtype` overrides the compute dtype (compute_dtype).

    `stream_experts` leaves the routed experts on disk and reads the selected ones per layer
    (flashmoe.streaming); `expert_cache_mb` sizes its LRU of recently used experts (0: none).
    `progress`: for a checkpoint over 1 GiB with a bar shown (None: stderr is a terminal), the
    weights are read here shard by shard under a bar; otherwise at the first forward pass.
    `group` (an mx.distributed.Group, or True): expert parallelism, each rank holding and computing
    1/N of every MoE layer's experts (flashmoe.distributed).
    """
    directory = Path(directory)
    config = read_config(directory)
    args = ModelArgs.from_config(config)
    plan = resolve(config)
    experts = expert_source(directory, args, stream_experts, expert_cache_mb, group)
    infos = tensor_infos(directory) | experts.tensor_infos()
    specs = check_tensors(plan, infos)
    tensors, specs, dropped = sanitize(experts.keep(read_tensors(directory)), specs, args)
    _read_with_progress(tensors, infos, directory, progress)
    if dropped:
        warnings.warn(
            f"{directory}: {len(dropped)} tensors not used by flashmoe were dropped "
            f"({', '.join(sorted({name.split('.')[0] for name in dropped}))}.*)",
            stacklevel=2,
        )
    store = TensorStore(
        tensors,
        specs=specs,
        default_spec=plan.default,
        quant=quant,
        backend=kernels.resolve_backend(backend),
        dtype=dtype or compute_dtype(_stored_dtype(tensors)),
        source=str(directory),
    )
    model = Model(store, args, k=k, experts=experts)
    store.finish()
    experts.finish()
    model.report = LoadReport(
        directory,
        store.backend,
        store.dtype,
        store.misread_modules,
        dropped,
        experts.stats,
        bytes_per_token=bytes_per_token(infos, args, k),
    )
    return model


def bytes_per_token(
    infos: Mapping[str, TensorInfo], args: ModelArgs, k: int | None = None
) -> dict[str, float]:
    """Weight bytes one decode step reads, from the tensors' headers (gpt-fast's figure).

    Every non-expert tensor in full (the embedding table: one row, unless it is also the output
    head), and K/E of each stacked expert tensor (the K experts a token routes to); tensors the
    loader drops (mtp heads, vision tower) are not read. Returns {"dense", "experts", "total"} in bytes.
    """
    share = (k or args.num_experts_per_tok or 0) / max(args.num_experts or 0, 1)
    dense = experts = 0.0
    for name, info in infos.items():
        if name.startswith(DROPPED_PREFIXES):
            continue
        size = nbytes(info.dtype, info.shape)
        if ".switch_mlp." in name or ".experts." in name:
            experts += size * share
        elif "embed_tokens" in name and not args.tie_word_embeddings and info.shape:
            dense += size / info.shape[0]  # one row of the table per token
        else:
            dense += size
    return {"dense": dense, "experts": experts, "total": dense + experts}


def _read_with_progress(
    tensors: dict[str, mx.array],
    infos: Mapping[str, TensorInfo],
    directory: Path,
    progress: bool | None,
) -> None:
    """A large checkpoint with a bar shown: read (evaluate) its weights now, one shard at a time."""
    if not shown(progress):
        return  # mx.load is lazy: the weights are read at the first forward pass
    total = sum(value.nbytes for value in tensors.values())
    if total < LARGE_CHECKPOINT_BYTES:
        return
    by_file: dict[str, list[mx.array]] = defaultdict(list)
    for name, value in tensors.items():
        by_file[infos[name].file if name in infos else ""].append(value)  # renamed by sanitize: last
    with progress_bar(total=total, desc=f"loading {directory.name}", unit="B", enabled=True) as bar:
        for file in sorted(by_file, key=lambda f: (f == "", f)):
            mx.eval(by_file[file])
            bar.update(sum(value.nbytes for value in by_file[file]))


_said: set[str] = set()


def _say_backend_once(backend: str) -> None:
    """The first load in a process says on stderr which kernel backend "auto" picked, and why."""
    if backend == "auto" and not _said:
        _said.add(backend)
        print(f"flashmoe: {kernels.backend_reason()}", file=sys.stderr)


def expert_source(directory: Path, args: ModelArgs, stream_experts, expert_cache_mb, group=None):
    """Where the routed experts come from: the disk (streaming) or memory, all of them or this rank's
    share (expert parallelism: distributed.ShardedSource); chosen once, here."""
    options = stream_options(stream_experts, expert_cache_mb)
    group = distributed.resolve_group(group)
    if options is not None:
        source = ExpertStreamer(directory, args, options)
    elif group is not None or not ((directory / MANIFEST).is_file() and args.num_experts):
        source = ResidentSource()  # sharded: read from the byte ranges, repacked layout included
    else:
        raise FlashMoeError(
            f"{directory}: a repacked checkpoint ({MANIFEST}) keeps its experts outside the "
            "safetensors files; load it with stream_experts=True"
        )
    if group is None or not args.num_experts:
        return source
    return distributed.ShardedSource(source, directory, args, group)


def _resolve_path(path, progress: bool | None = None) -> Path:
    """The checkpoint directory `path` names: the bundled model (None), a local directory (always first),
    or a Hugging Face Hub id `owner/name` (flashmoe.hub: the cache, else a download when online)."""
    from . import hub

    if path is None:
        path = default_model_dir()
        if path is None:
            raise FlashMoeError(
                f"no default model in this install ({DEFAULT_MODEL_DIR} is missing): "
                "pass a checkpoint directory or a Hugging Face id (owner/name)"
            )
    directory = Path(path)
    if directory.is_dir():
        return directory
    if not directory.exists() and hub.is_repo_id(str(path)):
        return hub.resolve_model(str(path), progress=progress)
    raise FlashMoeError(
        f"{directory}: not a directory (expected a checkpoint with config.json, "
        "or a Hugging Face id such as mlx-community/Qwen3-Coder-Next-4bit)"
    )


def _stored_dtype(tensors: dict[str, mx.array]) -> mx.Dtype:
    """The checkpoint's float dtype: the one most of its float tensors use."""
    counts: dict = {}
    for value in tensors.values():
        if mx.issubdtype(value.dtype, mx.floating):
            counts[value.dtype] = counts.get(value.dtype, 0) + 1
    return max(counts, key=counts.get) if counts else mx.float32


def read_config(directory: str | Path) -> dict:
    """config.json of a checkpoint directory, with a clear error when it is missing or broken."""
    path = Path(directory) / "config.json"
    if not path.exists():
        raise FlashMoeError(f"{path}: not found; a checkpoint directory needs config.json")
    if not path.is_file():
        raise FlashMoeError(f"{path}: not a regular file")
    if path.stat().st_size > 64 << 20:
        raise FlashMoeError(
            f"{path}: {path.stat().st_size} bytes; a config.json is far smaller (wrong file?)"
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise FlashMoeError(f"{path}: not UTF-8 ({err.reason} at byte {err.start})") from None
    except (ValueError, RecursionError) as err:
        raise FlashMoeError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise FlashMoeError(f"{path}: expected a JSON object, found a {type(config).__name__}")
    return config


def check_checkpoint(directory: str | Path) -> tuple[QuantPlan, dict[str, Resolved]]:
    """Resolve the config's quantization and check it against every tensor's shapes."""
    plan = resolve(read_config(directory))
    return plan, check_tensors(plan, tensor_infos(directory))


def default_model_dir() -> Path | None:
    """The bundled checkpoint directory, or None when this install has none."""
    return DEFAULT_MODEL_DIR if (DEFAULT_MODEL_DIR / "config.json").is_file() else None


def compute_dtype(stored: mx.Dtype, device: mx.Device | None = None) -> mx.Dtype:
    """float32 on the CPU backend, the checkpoint's own dtype on a GPU.

    On CPU, MLX's quantized matmul is ~8x slower with bf16 activations than with
    float32 (4096x4096 4-bit matvec: ~24 ms vs ~200 ms) and float16 is slower still.
    """
    device = device or mx.default_device()
    if device == mx.cpu and mx.issubdtype(stored, mx.floating):
        return mx.float32
    return stored
