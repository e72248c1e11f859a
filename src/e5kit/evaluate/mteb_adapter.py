"""An e5kit model as an ``mteb`` encoder, so ``mteb.evaluate(E5ForMTEB("intfloat/e5-small-v2"), tasks)``
runs MTEB with e5kit's engine and the E5 input conventions.

It implements mteb's ``EncoderProtocol`` (mteb 2.x: ``encode(inputs: DataLoader, *, task_metadata,
hf_split, hf_subset, prompt_type)``, ``similarity``, ``similarity_pairwise``, ``mteb_model_meta``)
and also accepts the mteb 1.x call ``encode(sentences, task_name=..., prompt_type=...)``.
mteb itself is optional: nothing here imports it until ``mteb_model_meta`` is read.

Prompt mapping (the E5 authors' MTEB scripts):

* ``e5`` models: ``prompt_type="query"`` -> ``query: ``, ``"document"`` -> ``passage: ``; tasks without
  a prompt type (STS, classification, clustering, pair classification) -> ``query: ``.
* ``instruct`` models: queries and symmetric tasks -> ``Instruct: {task instruction}\\nQuery: ``,
  documents -> no prefix.
* Embeddings are L2-normalised, except for classification tasks (the E5 script turns it off there).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np

from ..pipeline import finish
from ..prompts import format_texts

if TYPE_CHECKING:  # pragma: no cover
    from ..api import E5


def _input_type(prompt_type: str | None) -> str:
    """MTEB's prompt type -> E5's input type (documents are passages, everything else a query)."""
    return "passage" if prompt_type == "document" else "query"


def _value(x: Any) -> str | None:
    """An enum's value or a plain string (mteb passes PromptType / TaskType enums or str)."""
    if x is None:
        return None
    return str(getattr(x, "value", x))


class E5ForMTEB:
    """Wrap an :class:`e5kit.E5` (or a model name / path) for ``mteb.evaluate``."""

    def __init__(self, model_name: "str | os.PathLike | E5", revision: str | None = None, *, device: str | None = None,
                 prompt_style: str | None = None, batch_size: int = 32, normalize_classification: bool = False,
                 **kwargs: Any):
        from ..api import E5

        if isinstance(model_name, E5):
            self.model = model_name
        else:
            self.model = E5(model_name, device=device, revision=revision, prompt_style=prompt_style, **kwargs)
        self.revision = revision
        self.prompt_style = prompt_style or self.model.prompt_style
        self.batch_size = batch_size
        self.normalize_classification = normalize_classification

    # ---- the protocol --------------------------------------------------------------------------

    def encode(self, inputs: Iterable | Sequence[str], *, task_metadata: Any = None, hf_split: str | None = None,
               hf_subset: str | None = None, prompt_type: Any = None, task_name: str | None = None,
               **kwargs: Any) -> np.ndarray:
        """Embed a DataLoader of batches (``batch["text"]``) or a list of strings."""
        texts = self._texts(inputs)
        name = task_name or getattr(task_metadata, "name", None)
        task_type = _value(getattr(task_metadata, "type", None))
        normalize = self.normalize_classification or task_type not in ("Classification", "MultilabelClassification")
        if not texts:
            return np.zeros((0, self.model.dim), dtype=np.float32)
        prepared = self.model.prepare(texts, _input_type(_value(prompt_type)), prompt_style=self.prompt_style,
                                      task=name)
        pooled = self.model.embed(prepared, batch_size=kwargs.get("batch_size", self.batch_size),
                                  progress=kwargs.get("show_progress_bar"))
        return finish(pooled, normalize=normalize)

    def format(self, texts: Sequence[str], prompt_type: str | None, task_name: str | None) -> list[str]:
        """The exact strings the model sees for a task and prompt type."""
        return format_texts(texts, _input_type(prompt_type), self.prompt_style, task_name)

    @staticmethod
    def similarity(embeddings1, embeddings2) -> np.ndarray:
        """Cosine similarity matrix."""
        a, b = _unit(embeddings1), _unit(embeddings2)
        return a @ b.T

    @staticmethod
    def similarity_pairwise(embeddings1, embeddings2) -> np.ndarray:
        """Cosine similarity of corresponding rows."""
        a, b = _unit(embeddings1), _unit(embeddings2)
        return np.sum(a * b, axis=1)

    @property
    def mteb_model_meta(self):
        """mteb's ``ModelMeta``: mteb's own entry for a known E5 model, else one built from the checkpoint."""
        import mteb
        from mteb.models.model_meta import ModelMeta

        spec = self.model.spec
        try:
            meta = mteb.get_model_meta(spec.name, self.revision)
            if meta is not None and meta.name == spec.name:
                return meta
        except Exception:  # noqa: BLE001 - unknown to mteb's registry
            pass
        n_params = self.model.engine.num_parameters
        return ModelMeta(
            loader=None, name=spec.name if "/" in spec.name else f"local/{os.path.basename(spec.name)}",
            revision=self.revision or "local", release_date=None, languages=None, n_parameters=n_params,
            memory_usage_mb=round(n_params * 4 / 2**20, 1), max_tokens=spec.max_tokens, embed_dim=self.model.dim,
            license=None, open_weights=True, public_training_code=None, public_training_data=None,
            framework=["PyTorch"], similarity_fn_name="cosine", use_instructions=self.prompt_style == "instruct",
            training_datasets=None,
        )

    # ---- helpers -------------------------------------------------------------------------------

    @staticmethod
    def _texts(inputs) -> list[str]:
        if isinstance(inputs, str):
            return [inputs]
        out: list[str] = []
        for item in inputs:
            if isinstance(item, str):
                out.append(item)
            elif isinstance(item, dict) and "text" in item:
                out.extend(item["text"])
            else:
                raise TypeError(f"expected strings or batches with a 'text' field, got {type(item).__name__}")
        return out


def _unit(x) -> np.ndarray:
    from ..api import _as_2d

    x = _as_2d(x)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
