"""Data preparation: text sources, tokenizer training, binary token shards and the window sampler."""
