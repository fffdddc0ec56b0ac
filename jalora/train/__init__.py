"""Training LoRA and aLoRA adapters on the jalora decoder (optax, orbax-checkpoint), exported as PEFT
directories that PEFT and jalora load. See docs/training.md."""

from jalora.train.config import TrainConfig
from jalora.train.data import DataError
from jalora.train.trainer import TrainResult, train_adapter

__all__ = ["DataError", "TrainConfig", "TrainResult", "train_adapter"]
