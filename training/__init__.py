"""Training flashmoe's default model: a tiny Qwen3-Next MoE on the Python standard library.

corpus.py        the stdlib's .py files, split by file into train / held-out, tokenized to .bin
tokenizer.py     a byte-level BPE (2048 ids) trained on the train split
model_config.py  the model's config.json
init.py          seeded initial parameters, named as mlx-lm names them
train.py         AdamW over flashmoe's own forward pass, chunked and exactly resumable
report.py        held-out perplexity, expert load, routing entropy, loss curve
"""
