"""Write a trained encoder as a Hugging Face model directory that transformers, sentence-transformers
and e5kit all load: config.json, model.safetensors (prefix-less BertModel / XLMRobertaModel
names), the tokenizer files, sentence-transformers' module description (mean pooling + normalize)
and e5kit.json (prompt style, base model)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from ..encoder import Encoder
from ..loading import read_json, write_metadata

# tokenizer and sentence-transformers files carried over from the source checkpoint
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                "sentencepiece.bpe.model", "added_tokens.json", "modules.json", "sentence_bert_config.json",
                "config_sentence_transformers.json")
ARCHITECTURES = {"bert": "BertModel", "xlm-roberta": "XLMRobertaModel"}


def _st_files(out: Path, dim: int, max_tokens: int, prompt_style: str) -> None:
    """sentence-transformers' description (written only where the source model had none)."""
    if (out / "modules.json").exists():
        return
    (out / "1_Pooling").mkdir(exist_ok=True)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
               {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]
    (out / "modules.json").write_text(json.dumps(modules, indent=2))
    (out / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_tokens, "do_lower_case": False}))
    (out / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": dim, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
         "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False}, indent=2))


def _st_prompts(out: Path, prompt_style: str) -> None:
    """E5's prefixes under the prompt names sentence-transformers looks for: ``encode_query`` takes
    ``query``, ``encode_document`` the first of ``document``/``passage``/``corpus`` (and ST 6 fills a
    missing ``document`` with "", so ``passage`` alone is not enough)."""
    path = out / "config_sentence_transformers.json"
    st = read_json(path) if path.exists() else {"default_prompt_name": None, "similarity_fn_name": "cosine"}
    if prompt_style == "e5":
        st["prompts"] = {**st.get("prompts", {}), "query": "query: ", "document": "passage: ", "passage": "passage: "}
    else:
        st.setdefault("prompts", {})
    path.write_text(json.dumps(st, indent=2))


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it; set straight back
    os.umask(mask)
    return mask


def save_model(encoder: Encoder, source: Path, out: Path, prompt_style: str, base_model: str | None,
               max_tokens: int = 512) -> Path:
    """Write ``encoder``'s weights as a model directory ``out``, taking config and tokenizer files
    from the checkpoint directory ``source`` it was loaded from."""
    from safetensors.torch import save_file

    source, out = Path(source), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if source.resolve() != out.resolve():
        for f in source.iterdir():
            if f.is_file() and f.name in COPIED_FILES:
                shutil.copy2(f, out / f.name)
            elif f.is_dir() and f.name[:1].isdigit() and "_" in f.name:  # sentence-transformers modules (1_Pooling)
                shutil.copytree(f, out / f.name, dirs_exist_ok=True)
    config = read_json(source / "config.json")
    config["architectures"] = [ARCHITECTURES[encoder.cfg.model_type]]
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    # clone: hf_state_dict's q/k/v are views of one fused tensor, and safetensors refuses shared storage
    sd = {k: v.detach().to("cpu", torch.float32).clone() for k, v in encoder.hf_state_dict().items()}
    tmp = out / "model.safetensors.tmp"
    save_file(sd, str(tmp), metadata={"format": "pt"})
    os.chmod(tmp, 0o666 & ~_umask())  # safetensors creates 0600; the other files get the usual mode
    tmp.replace(out / "model.safetensors")
    _st_files(out, encoder.cfg.hidden_size, max_tokens, prompt_style)
    _st_prompts(out, prompt_style)
    write_metadata(out, prompt_style, base_model)
    return out


__all__ = ["save_model"]
