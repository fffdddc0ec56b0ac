"""jalora: a JAX serving engine for a base model and many Activated-LoRA adapters."""
