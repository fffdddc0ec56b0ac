"""The engine core: requests, scheduling, the paged KV cache's blocks and hashes, the step pipeline
and postprocessing. `LLMEngine` (llm_engine.py) puts them together behind the `Engine` interface."""
