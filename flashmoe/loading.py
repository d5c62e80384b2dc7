"""flashmoe.load: a checkpoint directory -> (Model, Tokenizer).

    config.json -> ModelArgs and a QuantPlan; the safetensors headers -> every quantized tensor
    checked against the plan (quant.check_tensors); the tensors -> sanitize -> TensorStore ->
    Model, with every tensor accounted for.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import mlx.core as mx

from . import kernels
from .checkpoint import read_config, safetensors_files, tensor_infos
from .config import ModelArgs
from .default_model import DEFAULT_MODEL_DIR, default_model_dir
from .errors import FlashMoeError
from .model import Model
from .precision import compute_dtype
from .quant import check_tensors, resolve
from .sanitize import sanitize
from .streaming import StreamOptions, open_stream
from .tokenizer import Tokenizer
from .weights import TensorStore


def load(path: str | Path | None = None, backend: str = "auto", quant: str = "config",
         k: int | None = None, dtype: mx.Dtype | None = None, stream_experts: bool | StreamOptions = False,
         expert_cache_mb: float | None = None) -> tuple[Model, Tokenizer]:
    """Load a model and its tokenizer. `quant="global"` reproduces the 4-bit-only engine's bug."""
    directory = _checkpoint_dir(path)
    model = load_model(directory, backend=backend, quant=quant, k=k, dtype=dtype, stream_experts=stream_experts,
                       expert_cache_mb=expert_cache_mb)
    return model, Tokenizer.from_dir(directory)


def load_model(directory: str | Path, backend: str = "auto", quant: str = "config", k: int | None = None,
               dtype: mx.Dtype | None = None, stream_experts: bool | StreamOptions = False,
               expert_cache_mb: float | None = None) -> Model:
    """The model alone (no tokenizer needed). `dtype` overrides the compute dtype (precision.compute_dtype).

    `stream_experts` leaves the routed experts on disk and reads the selected ones per layer
    (flashmoe.streaming); `expert_cache_mb` sizes its LRU of recently used experts (0: none).
    """
    config = read_config(directory)
    args = ModelArgs.from_config(config)
    plan = resolve(config)
    stream = open_stream(Path(directory), args, stream_experts, expert_cache_mb)  # None: experts resident
    specs = check_tensors(plan, tensor_infos(directory) | (stream.tensor_infos() if stream else {}))
    tensors = read_tensors(directory) if stream is None else stream.without_experts(read_tensors(directory))
    tensors, specs, dropped = sanitize(tensors, specs, args)
    if dropped:
        warnings.warn(f"{directory}: {len(dropped)} tensors not used by flashmoe were dropped "
                      f"({', '.join(sorted({name.split('.')[0] for name in dropped}))}.*)", stacklevel=2)
    store = (TensorStore if stream is None else stream.store)(
        tensors, specs=specs, default_spec=plan.default, quant=quant,
        backend=kernels.resolve_backend(backend), dtype=dtype or compute_dtype(_stored_dtype(tensors)),
        source=str(directory),
    )
    model = Model(store, args, k=k)
    store.finish()
    return model


def read_tensors(directory: str | Path) -> dict[str, mx.array]:
    """Every tensor of every *.safetensors file.

    Read with mx.load: the safetensors package's MLX reader goes through numpy, which has
    no bfloat16 ("data type 'bfloat16' not understood"), and MLX checkpoints are bf16.
    """
    tensors = {}
    for path in safetensors_files(directory):
        tensors.update(mx.load(str(path)))
    return tensors


def _checkpoint_dir(path) -> Path:
    if path is None:
        path = default_model_dir()
        if path is None:
            raise FlashMoeError(f"no default model in this install ({DEFAULT_MODEL_DIR} is missing): "
                                "pass a checkpoint directory")
    directory = Path(path)
    if not directory.is_dir():
        raise FlashMoeError(f"{directory}: not a directory (expected a checkpoint with config.json)")
    return directory


def _stored_dtype(tensors: dict[str, mx.array]) -> mx.Dtype:
    """The checkpoint's float dtype: the one most of its float tensors use."""
    counts: dict = {}
    for value in tensors.values():
        if mx.issubdtype(value.dtype, mx.floating):
            counts[value.dtype] = counts.get(value.dtype, 0) + 1
    return max(counts, key=counts.get) if counts else mx.float32
