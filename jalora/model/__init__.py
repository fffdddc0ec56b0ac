"""The model: HF config, the Flax decoder over the paged cache, weight loading, on-device sampling, and
the kernel plan that picks which kernel runs each op; GGUF files converted to HF directories (gguf.py)
and the default real model fetched into jalora's cache (default_model.py)."""
