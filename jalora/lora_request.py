"""vLLM's LoRARequest, for `LLM.generate(..., lora_request=...)`: an adapter by name and directory."""

import dataclasses


@dataclasses.dataclass(frozen=True)
class LoRARequest:
    """An adapter for a generation, as vLLM names one: `LLM.generate` loads the PEFT directory `lora_path` under
    `lora_name` the first time it is asked for (afterwards the loaded adapter of that name serves). `lora_int_id`
    is vLLM's numeric id, kept for its callers; jalora knows adapters by name."""

    lora_name: str
    lora_int_id: int
    lora_path: str = ""

    @property
    def name(self) -> str:
        return self.lora_name

    @property
    def path(self) -> str:
        return self.lora_path
