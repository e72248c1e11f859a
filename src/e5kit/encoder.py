"""The BERT / XLM-RoBERTa encoder that every E5 checkpoint uses, in plain PyTorch.

The network runs on *packed* tokens: a batch of sequences of different lengths is one tensor of
shape (total_tokens, hidden) plus ``cu_seqlens`` (the offsets where each sequence starts). The
embedding, every linear layer, the feed-forward block and the layer norms (well over 80% of the
FLOPs at E5 lengths) touch real tokens only. Attention, the one place sequences must not mix, uses
flash-attention's variable-length kernel when it is installed (CUDA) and otherwise scatters the
packed rows into a (batch, max_len) block for PyTorch's scaled_dot_product_attention; the engine
sorts inputs by length, so that block carries little padding.

Weights load from Hugging Face ``BertModel`` / ``XLMRobertaModel`` state dicts (see
:meth:`Encoder.load_hf_state_dict`) and save back to the same names.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

try:  # optional: CUDA variable-length attention
    from flash_attn import flash_attn_varlen_qkvpacked_func  # type: ignore
except Exception:  # pragma: no cover - not installed on CPU machines
    flash_attn_varlen_qkvpacked_func = None

SUPPORTED_MODEL_TYPES = ("bert", "xlm-roberta")


def _onednn_linear_dtypes() -> tuple[torch.dtype, ...]:
    try:
        if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
            return ()
        return (torch.float32, torch.bfloat16) if torch.ops.mkldnn._is_mkldnn_bf16_supported() else (torch.float32,)
    except Exception:  # pragma: no cover - exotic builds
        return ()


# On CPU in inference, oneDNN's linear (with GELU fused into the first feed-forward layer) computes
# the same sums as F.linear, faster on these shapes (BENCHMARKS.md, "CPU kernels"). bf16 only where
# the CPU has native bf16 instructions.
ONEDNN_LINEAR_DTYPES = _onednn_linear_dtypes()

# oneDNN post-op (attr, algorithm) meaning "none"
NO_POST_OP = ("none", "")


@dataclass(frozen=True)
class Activation:
    """A feed-forward activation: the PyTorch function, and the oneDNN post-op that applies the same
    function inside a GEMM."""

    fn: Callable[[torch.Tensor], torch.Tensor]
    post_op: tuple[str, str]


ACTIVATIONS = {
    "gelu": Activation(F.gelu, ("gelu", "none")),
    "gelu_new": Activation(partial(F.gelu, approximate="tanh"), ("gelu", "tanh")),
    "gelu_pytorch_tanh": Activation(partial(F.gelu, approximate="tanh"), ("gelu", "tanh")),
    "relu": Activation(F.relu, ("relu", "")),
}


class Linear(nn.Linear):
    """``nn.Linear``, then an optional activation (the first feed-forward layer's). In CPU inference
    in a dtype oneDNN runs natively, one oneDNN call computes both; otherwise F.linear, then the
    activation. Same weights and state-dict names as ``nn.Linear``."""

    def __init__(self, in_features: int, out_features: int, activation: str | None = None):
        super().__init__(in_features, out_features)
        self.activation = activation
        self.act = ACTIVATIONS[activation] if activation else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The direct oneDNN op bypasses autocast: under autocast (training's no-grad GradCache pass) a
        # bf16 activation would meet an fp32 weight and oneDNN finds no primitive, so F.linear there.
        if (x.device.type == "cpu" and x.dtype in ONEDNN_LINEAR_DTYPES and x.dtype == self.weight.dtype
                and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")):
            attr, algorithm = self.act.post_op if self.act else NO_POST_OP
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, attr, [], algorithm)
        y = F.linear(x, self.weight, self.bias)
        return self.act.fn(y) if self.act else y

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", activation={self.activation}" if self.activation else "")


class PackedLinear(nn.Module):
    """Inference-only CPU :class:`Linear` whose weight is packed once into oneDNN's blocked layout.

    A plain linear through oneDNN re-lays out its weight on every call; packing once saves that,
    most for short queries (figures: BENCHMARKS.md, "CPU kernels"). The activation, if any, is
    fused into the GEMM. Build with :func:`pack_linears`.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.activation = linear.activation if isinstance(linear, Linear) else None
        self.post_op = ACTIVATIONS[self.activation].post_op if self.activation else NO_POST_OP
        # Plain attributes, not parameters: the packed tensor is opaque to state_dict() and .to().
        self._weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach())
        self._bias = linear.bias.detach() if linear.bias is not None else None
        self.dtype = linear.weight.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attr, algorithm = self.post_op
        return torch.ops.mkldnn._linear_pointwise(x, self._weight, self._bias, attr, [], algorithm)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, dtype={self.dtype}"
                + (f", activation={self.activation}" if self.activation else ""))


def pack_linears(model: nn.Module) -> nn.Module:
    """Replace, in place, every CPU :class:`Linear` of ``model`` whose dtype oneDNN runs natively by a
    :class:`PackedLinear`; the model is inference-only afterwards. Returns ``model``."""
    for mod in list(model.modules()):
        for name, child in list(mod.named_children()):
            if (isinstance(child, nn.Linear) and child.weight.device.type == "cpu"
                    and child.weight.dtype in ONEDNN_LINEAR_DTYPES):
                setattr(mod, name, PackedLinear(child))
    return model


@dataclass
class EncoderConfig:
    vocab_size: int
    hidden_size: int = 384
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    pad_token_id: int = 0
    model_type: str = "bert"
    hidden_dropout: float = 0.0  # applied only in training mode (inference never drops)
    attention_dropout: float = 0.0

    @property
    def position_offset(self) -> int:
        # XLM-R numbers positions from padding_idx + 1 (RoBERTa's convention); BERT from 0.
        return self.pad_token_id + 1 if self.model_type == "xlm-roberta" else 0

    @property
    def max_tokens(self) -> int:
        return self.max_position_embeddings - self.position_offset

    @classmethod
    def from_hf(cls, cfg: dict) -> "EncoderConfig":
        """Build from a Hugging Face config.json dict."""
        model_type = cfg.get("model_type", "bert")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type {model_type!r} is not an E5 encoder (expected one of {SUPPORTED_MODEL_TYPES})")
        if cfg.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"position_embedding_type {cfg['position_embedding_type']!r} is not supported")
        act = cfg.get("hidden_act", "gelu")
        if act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {act!r} is not supported (expected one of {sorted(ACTIVATIONS)})")
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=cfg["num_attention_heads"],
            intermediate_size=cfg["intermediate_size"],
            max_position_embeddings=cfg.get("max_position_embeddings", 512),
            type_vocab_size=cfg.get("type_vocab_size", 2),
            layer_norm_eps=cfg.get("layer_norm_eps", 1e-12),
            hidden_act=act,
            pad_token_id=cfg.get("pad_token_id", 0 if model_type == "bert" else 1),
            model_type=model_type,
            hidden_dropout=float(cfg.get("hidden_dropout_prob", 0.0) or 0.0),
            attention_dropout=float(cfg.get("attention_probs_dropout_prob", 0.0) or 0.0),
        )


def bucket_rows(n: int) -> int:
    """``n`` rounded up to a coarse bucket (multiples of 16, or of 1/16 of n's power of two when
    larger): at most ~6% more rows, but few distinct GEMM shapes. oneDNN builds a kernel per shape
    (milliseconds each on CPU), so with exact sizes every new batch would pay that again."""
    step = max(16, (1 << (n.bit_length() - 1)) // 16)
    return -(-n // step) * step


@dataclass
class Packed:
    """A batch of sequences laid end to end.

    input_ids, positions: (rows,) long; cu_seqlens: (batch + 1,) int32 offsets; max_len: longest
    sequence; pad_index: for each real token, its row in a (batch * max_len) block. ``rows`` may
    exceed the real token count ``n_tokens`` (see :func:`bucket_rows`): the extra rows are exact
    copies of real tokens (``source`` maps each row to its token), so they leave every value range
    (int8's dynamic scales included) unchanged; attention and pooling read real tokens only.
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    cu_seqlens: torch.Tensor
    max_len: int
    pad_index: torch.Tensor
    seq_index: torch.Tensor  # (n_tokens,) which sequence each token belongs to
    lengths: torch.Tensor  # (batch,)
    source: torch.Tensor | None = None  # (rows,) the real token each row copies; None: no filler
    block_index: torch.Tensor | None = None  # (rows,) pad_index[source]

    @property
    def batch_size(self) -> int:
        return self.lengths.numel()

    @property
    def rows(self) -> int:
        return self.input_ids.numel()

    @property
    def n_tokens(self) -> int:
        """Real tokens (rows without the filler)."""
        return self.seq_index.numel()

    @classmethod
    def from_ids(cls, seqs: list[list[int]], position_offset: int = 0, device: torch.device | str = "cpu",
                 bucket: bool = False) -> "Packed":
        lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
        if (lengths == 0).any():
            raise ValueError("every sequence needs at least one token")
        max_len = int(lengths.max())
        flat = torch.tensor([t for s in seqs for t in s], dtype=torch.long)
        seq_index = torch.repeat_interleave(torch.arange(len(seqs)), lengths)
        starts = torch.cumsum(lengths, 0) - lengths
        positions = torch.arange(flat.numel()) - starts[seq_index]
        cu = torch.zeros(len(seqs) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(lengths, 0)
        n = flat.numel()
        rows = bucket_rows(n) if bucket else n
        pad_index = seq_index * max_len + positions
        source = block_index = None
        if rows > n:
            source = torch.cat([torch.arange(n), torch.arange(rows - n) % n])
            flat, positions, block_index = flat[source], positions[source], pad_index[source].to(device)
            source = source.to(device)
        return cls(
            input_ids=flat.to(device),
            positions=(positions + position_offset).to(device),
            cu_seqlens=cu.to(device),
            max_len=max_len,
            pad_index=pad_index.to(device),
            seq_index=seq_index.to(device),
            lengths=lengths.to(device),
            source=source,
            block_index=block_index,
        )


class Embeddings(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.word = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = cfg.hidden_dropout

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # E5 embeds single segments: token type 0 everywhere.
        x = self.word(input_ids) + self.position(positions) + self.token_type.weight[0]
        return F.dropout(self.norm(x), self.dropout, self.training)


class Layer(nn.Module):
    """One post-norm transformer layer: x = LN(x + Attn(x)); x = LN(x + FFN(x))."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.hidden_size // cfg.num_heads
        self.qkv = Linear(cfg.hidden_size, 3 * cfg.hidden_size)  # fused q, k, v
        self.attn_out = Linear(cfg.hidden_size, cfg.hidden_size)
        self.attn_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.fc1 = Linear(cfg.hidden_size, cfg.intermediate_size, activation=cfg.hidden_act)
        self.fc2 = Linear(cfg.intermediate_size, cfg.hidden_size)
        self.ffn_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout, self.attn_dropout = cfg.hidden_dropout, cfg.attention_dropout

    def attention(self, qkv: torch.Tensor, p: Packed, mask: torch.Tensor | None) -> torch.Tensor:
        T, H = p.n_tokens, qkv.shape[1] // 3
        nh, hd = self.num_heads, self.head_dim
        drop = self.attn_dropout if self.training else 0.0
        qkv = qkv[:T]  # filler rows take no part; they get their source token's result back
        if flash_attn_varlen_qkvpacked_func is not None and qkv.is_cuda and qkv.dtype in (torch.float16, torch.bfloat16):
            out = flash_attn_varlen_qkvpacked_func(qkv.view(T, 3, nh, hd), p.cu_seqlens, p.max_len, dropout_p=drop)
            out = out.reshape(T, H)
            return out if p.source is None else out[p.source]
        B, L = p.batch_size, p.max_len
        if mask is None:  # all sequences have the same length: the packed rows already form the block
            block = qkv.view(B, L, 3, nh, hd)
        else:
            block = qkv.new_zeros(B * L, 3 * H)
            block[p.pad_index] = qkv
            block = block.view(B, L, 3, nh, hd)
        q, k, v = block.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, nh, L, hd)
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)
        ctx = ctx.transpose(1, 2).reshape(B * L, H)
        if p.block_index is not None:
            return ctx[p.block_index]
        return ctx if mask is None else ctx[p.pad_index]

    def forward(self, x: torch.Tensor, p: Packed, mask: torch.Tensor | None) -> torch.Tensor:
        d, t = self.dropout, self.training
        x = self.attn_norm(x + F.dropout(self.attn_out(self.attention(self.qkv(x), p, mask)), d, t))
        return self.ffn_norm(x + F.dropout(self.fc2(self.fc1(x)), d, t))


class Encoder(nn.Module):
    """BERT / XLM-R encoder returning the last hidden state of every (packed) token."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = Embeddings(cfg)
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_layers))
        self.gradient_checkpointing = False

    def key_mask(self, p: Packed) -> torch.Tensor | None:
        """(B, 1, 1, L) boolean mask of real keys, or None when no sequence is padded."""
        if bool((p.lengths == p.max_len).all()):
            return None
        ar = torch.arange(p.max_len, device=p.lengths.device)
        return (ar[None, :] < p.lengths[:, None])[:, None, None, :]

    def forward(self, p: Packed) -> torch.Tensor:
        x = self.embeddings(p.input_ids, p.positions)
        mask = self.key_mask(p)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, p, mask, use_reentrant=False)
            else:
                x = layer(x, p, mask)
        return x

    # ---- Hugging Face state dicts -------------------------------------------------------------

    def load_hf_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Load a ``BertModel`` / ``XLMRobertaModel`` state dict (with or without a
        ``bert.`` / ``roberta.`` / ``model.`` prefix; pooler and heads are ignored)."""
        sd = _strip_prefix(sd)
        ours = {}
        ours["embeddings.word.weight"] = sd.pop("embeddings.word_embeddings.weight")
        ours["embeddings.position.weight"] = sd.pop("embeddings.position_embeddings.weight")
        ours["embeddings.token_type.weight"] = sd.pop("embeddings.token_type_embeddings.weight")
        for n in ("weight", "bias"):
            ours[f"embeddings.norm.{n}"] = sd.pop(f"embeddings.LayerNorm.{n}")
        for i in range(self.cfg.num_layers):
            h = f"encoder.layer.{i}."
            for n in ("weight", "bias"):
                ours[f"layers.{i}.qkv.{n}"] = torch.cat(
                    [sd.pop(f"{h}attention.self.{m}.{n}") for m in ("query", "key", "value")]
                )
                ours[f"layers.{i}.attn_out.{n}"] = sd.pop(f"{h}attention.output.dense.{n}")
                ours[f"layers.{i}.attn_norm.{n}"] = sd.pop(f"{h}attention.output.LayerNorm.{n}")
                ours[f"layers.{i}.fc1.{n}"] = sd.pop(f"{h}intermediate.dense.{n}")
                ours[f"layers.{i}.fc2.{n}"] = sd.pop(f"{h}output.dense.{n}")
                ours[f"layers.{i}.ffn_norm.{n}"] = sd.pop(f"{h}output.LayerNorm.{n}")
        expected = self.state_dict()
        for k, v in ours.items():
            if tuple(v.shape) != tuple(expected[k].shape):
                raise ValueError(f"weight {k} has shape {tuple(v.shape)}, config expects {tuple(expected[k].shape)}")
        # A module built on the meta device (see loading.load_encoder) takes the tensors as they are,
        # so a checkpoint is held in memory once, not twice.
        self.load_state_dict(ours, strict=True, assign=any(p.is_meta for p in self.parameters()))

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """Our weights under Hugging Face ``BertModel`` / ``XLMRobertaModel`` names."""
        sd = {k: v.detach() for k, v in self.state_dict().items()}
        out = {
            "embeddings.word_embeddings.weight": sd["embeddings.word.weight"],
            "embeddings.position_embeddings.weight": sd["embeddings.position.weight"],
            "embeddings.token_type_embeddings.weight": sd["embeddings.token_type.weight"],
        }
        for n in ("weight", "bias"):
            out[f"embeddings.LayerNorm.{n}"] = sd[f"embeddings.norm.{n}"]
        for i in range(self.cfg.num_layers):
            h = f"encoder.layer.{i}."
            for n in ("weight", "bias"):
                for m, part in zip(("query", "key", "value"), sd[f"layers.{i}.qkv.{n}"].chunk(3)):
                    out[f"{h}attention.self.{m}.{n}"] = part
                out[f"{h}attention.output.dense.{n}"] = sd[f"layers.{i}.attn_out.{n}"]
                out[f"{h}attention.output.LayerNorm.{n}"] = sd[f"layers.{i}.attn_norm.{n}"]
                out[f"{h}intermediate.dense.{n}"] = sd[f"layers.{i}.fc1.{n}"]
                out[f"{h}output.dense.{n}"] = sd[f"layers.{i}.fc2.{n}"]
                out[f"{h}output.LayerNorm.{n}"] = sd[f"layers.{i}.ffn_norm.{n}"]
        return {k: v.contiguous() for k, v in out.items()}


def _strip_prefix(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    sd = dict(sd)
    for prefix in ("bert.", "roberta.", "model.", "0.auto_model."):
        if any(k.startswith(prefix + "embeddings.") for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            break
    missing = [k for k in ("embeddings.word_embeddings.weight", "encoder.layer.0.attention.self.query.weight") if k not in sd]
    if missing:
        raise KeyError(f"not a BERT/XLM-R state dict: missing {missing}")
    return sd


def mean_pool(hidden: torch.Tensor, p: Packed) -> torch.Tensor:
    """Mean of each sequence's token states (the E5 model cards' ``average_pool``), in fp32
    (fp64 for an fp64 model)."""
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    out = torch.zeros(p.batch_size, hidden.shape[1], dtype=dtype, device=hidden.device)
    out.index_add_(0, p.seq_index, hidden[: p.n_tokens].to(dtype))
    return out / p.lengths[:, None].to(out.dtype)


def embed_batch(model: nn.Module, seqs: list[list[int]], device: torch.device | str | None = None,
                normalize: bool = True, position_offset: int | None = None, bucket: bool = False) -> torch.Tensor:
    """Token ids -> mean-pooled (optionally L2-normalised) float32 vectors for one batch.

    Differentiable: the engine calls it under ``inference_mode``, training calls it with autograd on.
    ``model`` maps a :class:`Packed` batch to per-token states (an :class:`Encoder` or a stand-in).
    ``bucket`` rounds the row count up (:func:`bucket_rows`; the vectors do not change).
    """
    if device is None:
        device = next(model.parameters()).device
    if position_offset is None:
        position_offset = model.cfg.position_offset
    packed = Packed.from_ids([list(s) for s in seqs], position_offset, device, bucket)
    pooled = mean_pool(model(packed), packed)
    return F.normalize(pooled, p=2, dim=-1) if normalize else pooled


def flops_per_token(cfg: EncoderConfig, seq_len: int) -> float:
    """Forward FLOPs per token (matmuls only), for MFU figures."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    per_layer = 2 * (3 * h * h + h * h + 2 * h * i) + 2 * 2 * seq_len * h
    return cfg.num_layers * per_layer


__all__ = ["ACTIVATIONS", "EncoderConfig", "Encoder", "Linear", "Packed", "PackedLinear", "bucket_rows", "pack_linears",
           "mean_pool", "embed_batch", "flops_per_token"]
