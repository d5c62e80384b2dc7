"""The exceptions flashmoe raises for bad input: each names what was expected and what was found."""


class FlashMoeError(ValueError):
    """Base class for every error flashmoe raises about its input."""


class QuantConfigError(FlashMoeError):
    """A quantization section of config.json that flashmoe cannot read faithfully."""


class QuantMismatchError(FlashMoeError):
    """A quantized tensor whose shapes disagree with the bits its config claims."""


class BackendUnavailableError(FlashMoeError):
    """A kernel backend was asked for on a machine that cannot run it."""
