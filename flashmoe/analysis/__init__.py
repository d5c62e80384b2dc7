"""What the notebooks, tests and benchmarks measure with; no engine logic.

routing.py   routers compared (the bug against the fix), gate tensors, lying copies
evaluate.py  perplexity on held-out tokens
bench.py     medians, memory bandwidth, kernel timings, per-phase decode breakdown, K sweep
parity.py    flashmoe against mlx-lm through the same decode loop; rel_err
notebook.py  the checkpoint and held-out tokens the three notebooks share
"""
