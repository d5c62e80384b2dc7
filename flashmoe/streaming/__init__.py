"""Expert streaming, flash-moe style: routed experts stay on disk and are read per layer, per token.

layout.py   where each expert's bytes are (mlx-lm's safetensors, or a repacked manifest)
reader.py   parallel positioned reads into reused buffers, an LRU of experts
experts.py  ExpertStreamer (the loader's expert source) and StreamedExperts (one layer's experts)
stats.py    bytes, reads and seconds per token, page-cache hits
"""
