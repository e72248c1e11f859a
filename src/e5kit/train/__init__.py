"""Training with E5's contrastive recipe: InfoNCE over in-batch + hard negatives, KL distillation,
GradCache, multi-process data parallel, hard-negative mining and the consistency filter."""

from .data import DataError, Example, load_examples
from .losses import contrastive_loss
from .config import TrainConfig
from .trainer import TrainResult, Trainer, train

__all__ = ["DataError", "Example", "load_examples", "contrastive_loss", "TrainConfig", "TrainResult", "Trainer", "train"]
