"""PEFT LoRA / aLoRA adapters: reading and validating adapter directories (peft.py) and keeping them in
device slots as stacks the step reads (manager.py)."""
