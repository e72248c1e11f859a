"""Test helpers: build tiny random E5-shaped checkpoints, and the reference embedder
(`transformers` + the model card's average_pool + F.normalize)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared"
SRC = Path(__file__).resolve().parents[1] / "src"
# The SciFact subset fixture (conftest.scifact_subset) cuts documents to their first 40 words: CI embeds it in seconds.
WORDS_PER_DOC = 40


def run_python(*args: str, env: dict[str, str] | None = None, clean_env: bool = False, stdin: str | None = None,
               cwd: str | Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python ARGS`` in a fresh process that imports this checkout's e5kit (src/ first on PYTHONPATH).

    ``env`` adds variables; ``clean_env`` starts from nothing but PATH (no inherited HF_* / OMP_*).
    The one subprocess runner of the test suite: CLI, offline and thread tests all go through it."""
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")} if clean_env else dict(os.environ)
    full = base | (env or {})
    full["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), full.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, *args], input=stdin, capture_output=True, text=True, env=full, cwd=cwd,
                          timeout=timeout)


def run_e5kit(*args: str, **kwargs) -> subprocess.CompletedProcess:
    """The ``e5kit`` command (``python -m e5kit ARGS``) through :func:`run_python`."""
    return run_python("-m", "e5kit", *args, **kwargs)

_WORDS = ("the a of and to in is was for on that with as by at from it an be this are which or has "
          "protein female eat summit define cdc guideline average requirement women grams day chart "
          "marathon mountain meeting leaders government query passage instruct given web search retrieve "
          "relevant passages answer cell cells gene genes cancer study studies patients risk").split()


def _wordpiece_tokenizer():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789.,:;!?'\"-()/%")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + _WORDS + chars + ["##" + c for c in chars]
    vocab = list(dict.fromkeys(vocab))
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab.index("[CLS]")), ("[SEP]", vocab.index("[SEP]"))],
    )
    return tok, dict(cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]", unk_token="[UNK]", mask_token="[MASK]"), 0


def _unigram_tokenizer():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, decoders

    pieces = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("▁" + w, -5.0) for w in _WORDS]
    pieces += [(c, -8.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789.,:;!?'-()/%"]
    pieces += [("▁", -3.0), ("南", -9.0), ("瓜", -9.0), ("é", -9.0), ("ü", -9.0)]
    tok = Tokenizer(models.Unigram(pieces, unk_id=3, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace("  ", " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    return tok, dict(bos_token="<s>", eos_token="</s>", cls_token="<s>", sep_token="</s>", pad_token="<pad>",
                     unk_token="<unk>", mask_token="<unk>"), 1


def make_tiny_model(out: Path, kind: str = "bert", layers: int = 2, hidden: int = 32, heads: int = 4,
                    seed: int = 0) -> Path:
    """A random checkpoint in Hugging Face layout: 'bert' (WordPiece), 'xlm-roberta', or
    'ml-small' (BERT layout + SentencePiece vocab, like multilingual-e5-small)."""
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast, XLMRobertaConfig, XLMRobertaModel

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok, special, pad_id = _wordpiece_tokenizer() if kind == "bert" else _unigram_tokenizer()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=512, **special)
    fast.save_pretrained(str(out))
    common = dict(vocab_size=tok.get_vocab_size(), hidden_size=hidden, num_hidden_layers=layers,
                  num_attention_heads=heads, intermediate_size=hidden * 4, pad_token_id=pad_id)
    torch.manual_seed(seed)
    if kind == "xlm-roberta":
        model = XLMRobertaModel(XLMRobertaConfig(max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5,
                                                 **common), add_pooling_layer=False)
    elif kind in ("bert", "ml-small"):
        model = BertModel(BertConfig(max_position_embeddings=512, **common), add_pooling_layer=False)
    else:
        raise ValueError(kind)
    with torch.no_grad():  # make layer norms and biases non-trivial so bugs show
        for name, p in model.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(str(out), safe_serialization=True)
    return out


def reference_embed(model_dir: Path, texts: list[str], dtype=torch.float32, normalize: bool = True,
                    batch_size: int = 16) -> np.ndarray:
    """The model card's recipe: AutoTokenizer + AutoModel + average_pool + F.normalize."""
    import torch.nn.functional as F
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModel.from_pretrained(str(model_dir), torch_dtype=dtype).eval()
    # Batches of similar lengths (as sentence-transformers does): the mask makes padding irrelevant
    # to the result, and far less of it is computed.
    lengths = [len(ids) for ids in tok(texts, max_length=512, truncation=True)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    out = torch.empty(len(texts), model.config.hidden_size)
    for i in range(0, len(texts), batch_size):
        rows = order[i:i + batch_size]
        batch = tok([texts[r] for r in rows], max_length=512, padding=True, truncation=True, return_tensors="pt")
        with torch.inference_mode():
            last = model(**batch).last_hidden_state
        mask = batch["attention_mask"]
        last = last.masked_fill(~mask[..., None].bool(), 0.0)
        emb = last.sum(dim=1) / mask.sum(dim=1)[..., None]
        if normalize:
            emb = F.normalize(emb, p=2, dim=1)
        out[rows] = emb.float()
    return out.numpy()


def scifact_texts(scifact_dir: Path, n: int, prefix: str = "passage: ") -> list[str]:
    out = []
    with open(scifact_dir / "corpus.jsonl", encoding="utf-8") as f:
        for line in f:
            d = json.loads(line)
            out.append(prefix + f"{d.get('title', '')} {d['text']}".strip())
            if len(out) >= n:
                break
    return out


# Mixed-length inputs for parity: 1 token, empty after the prefix, unicode, and > 512 tokens.
PARITY_TEXTS = [
    "a",
    "query: ",
    "passage: ",
    "query: how much protein should a female eat",
    "passage: As a general guideline, the CDC's average requirement of protein for women ages 19 to 70 is 46 grams per day.",
    "query: 南瓜 é ü naïve café — “quotes” 🙂",
    "passage: " + " ".join(["the cell study of gene and cancer risk in patients"] * 80),
    "query: summit define",
    "",
]
