"""Registry of the known E5 checkpoints.

Each entry records what the model card says about a checkpoint: its architecture and size, its
maximum input length, which prompt convention it was trained with, its languages and its licence.
A checkpoint that is not listed here (a local fine-tune, say) is described from its config.json
(see :func:`e5kit.loading.load_spec`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ModelSpec:
    """What e5kit needs to know about one checkpoint."""

    name: str  # hub id, e.g. "intfloat/e5-small-v2", or a local path
    architecture: str  # "bert" or "xlm-roberta"
    layers: int
    hidden: int
    heads: int
    max_tokens: int = 512
    prompt_style: str = "e5"  # see e5kit.prompts.PROMPT_STYLES
    languages: str = "en"
    license: str = "mit"
    vocab: str = "wordpiece-uncased"

    def as_dict(self) -> dict:
        return asdict(self)


def _spec(name: str, arch: str, size: str, **kw) -> ModelSpec:
    layers, hidden, heads = {"small": (12, 384, 12), "base": (12, 768, 12), "large": (24, 1024, 16)}[size]
    return ModelSpec(name=name, architecture=arch, layers=layers, hidden=hidden, heads=heads, **kw)


_MULTI = dict(languages="multilingual (~100)", vocab="xlm-r-sentencepiece")

REGISTRY: dict[str, ModelSpec] = {
    s.name: s
    for s in [
        _spec("intfloat/e5-small-v2", "bert", "small"),
        _spec("intfloat/e5-base-v2", "bert", "base"),
        _spec("intfloat/e5-large-v2", "bert", "large"),
        _spec("intfloat/e5-small", "bert", "small"),
        _spec("intfloat/e5-base", "bert", "base"),
        _spec("intfloat/e5-large", "bert", "large"),
        _spec("intfloat/e5-small-unsupervised", "bert", "small"),
        _spec("intfloat/e5-base-unsupervised", "bert", "base"),
        _spec("intfloat/e5-large-unsupervised", "bert", "large"),
        # multilingual-e5-small keeps the BERT layout but uses the XLM-R SentencePiece vocabulary.
        _spec("intfloat/multilingual-e5-small", "bert", "small", **_MULTI),
        _spec("intfloat/multilingual-e5-base", "xlm-roberta", "base", **_MULTI),
        _spec("intfloat/multilingual-e5-large", "xlm-roberta", "large", **_MULTI),
        _spec("intfloat/multilingual-e5-large-instruct", "xlm-roberta", "large", prompt_style="instruct", **_MULTI),
    ]
}

DEFAULT_MODEL = "intfloat/e5-small-v2"


def lookup(name: str) -> ModelSpec | None:
    """The registry entry for a hub id; ``e5-small-v2`` without the ``intfloat/`` owner also works."""
    if name in REGISTRY:
        return REGISTRY[name]
    return REGISTRY.get(f"intfloat/{name}")
