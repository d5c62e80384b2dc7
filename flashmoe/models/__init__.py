"""The model: one decoder stack for the four architectures. Read in this order:

args.py         ModelArgs from config.json, the feature row of each architecture (Arch),
                and the name and shape of every tensor (param_shapes)
store.py        TensorStore: each checkpoint tensor handed out once, meeting its quantization spec
sanitize.py     Hugging Face key layouts -> mlx-lm's, in one step
layers.py       Linear, ExpertLinear, Embedding: where the kernels are called
attention.py    full attention (output gate, q/k norm, bias: asked of the row)
gated_delta.py  Gated DeltaNet, the linear attention of the hybrid models
moe.py          router, experts as one object (resident here, streamed in flashmoe.streaming),
                shared expert
cache.py        KV cache, conv + recurrent state
model.py        DecoderLayer and Model: tokens (B, T) -> logits (B, T, vocab)
"""
