"""flashmoe: quantized Mixture-of-Experts models on MLX, with its own dequantization kernels."""

from . import kernels, quant
from .errors import BackendUnavailableError, FlashMoeError, QuantConfigError, QuantMismatchError
from .generate import GenerationStep, generate, stream_generate
from .loader import check_checkpoint, compute_dtype, default_model_dir, load, load_model
from .misread import misread_as
from .sample import make_sampler
from .tokenizer import StreamingDetokenizer, Tokenizer

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "default_model_dir",
    "load_model",
    "GenerationStep",
    "StreamingDetokenizer",
    "Tokenizer",
    "generate",
    "load",
    "make_sampler",
    "stream_generate",
    "FlashMoeError",
    "QuantConfigError",
    "QuantMismatchError",
    "check_checkpoint",
    "compute_dtype",
    "kernels",
    "misread_as",
    "quant",
]
