"""One-off tools, each a command: `python -m flashmoe.tools.NAME --help`.

    convert.py  float checkpoint -> MLX quantized format (8-bit routers, per-module overrides)
    repack.py   each expert's slices made contiguous, for streaming
    synth.py    shape-faithful random checkpoints at real model widths
"""
