"""The training run's options (kept free of torch so the CLI can list them cheaply)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..models import DEFAULT_MODEL

DEFAULT_TEMPERATURE = 0.01  # the E5 paper's tau
DEFAULT_ALPHA = 0.2  # weight of InfoNCE next to the KL term when distilling
PRECISIONS = ("fp32", "float32", "bf16", "bfloat16", "fp16", "float16")


@dataclass
class TrainConfig:
    """Everything a run needs; the YAML config and the CLI flags set these fields."""

    data: str = ""  # training jsonl
    model: str = DEFAULT_MODEL  # hub id or local directory to start from
    output_dir: str = "e5kit-model"
    epochs: int = 1
    max_steps: int | None = None  # overrides epochs
    batch_size: int = 32  # queries per step per process (contrastive batch = batch_size x processes)
    negatives: int = 1  # hard negatives per query (0 for pair data / pre-training)
    chunk_size: int | None = None  # GradCache chunk (sequences); None = one full-batch backward
    lr: float = 2e-5
    weight_decay: float = 0.01
    warmup_steps: int | None = None
    warmup_ratio: float = 0.1  # used when warmup_steps is not set
    max_grad_norm: float = 1.0  # 0 disables clipping
    temperature: float = DEFAULT_TEMPERATURE
    alpha: float = DEFAULT_ALPHA  # loss = KL + alpha * InfoNCE when distilling
    teacher_temperature: float = 1.0
    distill: bool | None = None  # None: on when the data has teacher_scores
    gather: bool = True  # negatives from every process
    query_max_length: int = 64
    passage_max_length: int = 256
    precision: str = "fp32"  # fp32, bf16 or fp16 (autocast; fp16 uses a gradient scaler)
    gradient_checkpointing: bool = False
    dropout: float | None = None  # None: the checkpoint's hidden/attention dropout
    seed: int = 42
    shuffle: bool = True
    device: str | None = None  # default: cuda:LOCAL_RANK when CUDA is available, else cpu
    threads: int | None = None
    prompt_style: str | None = None  # override the model's (e5, instruct, none)
    task: str | None = None  # instruction for instruct models
    skip_bad_lines: bool = False
    log_every: int = 1
    save_every: int | None = None  # checkpoint every N steps
    save_total_limit: int | None = 2  # keep the last N step checkpoints
    save_optimizer: bool = True  # AdamW moments in checkpoints (2x the weights); off: resume restarts them
    eval_data: str | None = None  # BEIR-format directory evaluated every eval_every steps
    eval_split: str | None = None  # None: dev when eval_data has qrels/dev.tsv, else test
    eval_every: int | None = None
    tensorboard: bool = False
    progress: bool | None = None  # None: when stderr is a terminal
    resume: str | None = None  # a checkpoint-N directory, or "auto" for the latest in output_dir

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown training option(s) {unknown}; known: {sorted(names)}")
        return cls(**d)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "TrainConfig":
        import yaml

        try:
            d = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML ({e})") from None
        if not isinstance(d, dict):
            raise ValueError(f"{path}: expected a mapping of option: value")
        return cls.from_dict(d)

    def validate(self) -> None:
        if not self.data:
            raise ValueError("no training data: give --data (or `data:` in the config file), a jsonl file")
        for name in ("batch_size", "epochs", "query_max_length", "passage_max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{flag(name)} must be at least 1")
        if self.negatives < 0 or (self.chunk_size is not None and self.chunk_size < 1):
            raise ValueError("--negatives must be >= 0 and --chunk-size >= 1")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {PRECISIONS}, not {self.precision!r}")
        if self.temperature <= 0 or self.lr <= 0:
            raise ValueError("--temperature and --lr must be positive")
        for name in ("eval_every", "threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{flag(name)} must be at least 1")


def flag(name: str) -> str:
    """The CLI flag of a field (``--batch-size``); errors name it, since most runs come from the CLI."""
    return "--" + name.replace("_", "-")


def option_type(f: dataclasses.Field) -> type:
    """int / float / str / bool for a field annotated ``X`` or ``X | None``."""
    return {"int": int, "float": float, "str": str, "bool": bool}[str(f.type).split("|")[0].strip()]


__all__ = ["TrainConfig", "DEFAULT_TEMPERATURE", "DEFAULT_ALPHA", "PRECISIONS", "option_type", "flag"]
