"""model.py: the Qwen2 / Qwen2.5 / Qwen3 / Qwen3.5 decoder in plain PyTorch, and loading of official checkpoints.

The network is a stack of pre-norm decoder layers:

    h = h + attn(input_layernorm(h))          # grouped-query attention with RoPE (or Gated DeltaNet)
    h = h + mlp(post_attention_layernorm(h))  # down(silu(gate(x)) * up(x))
    logits = lm_head(norm(h))

The families differ inside the token mixer, and config.json says how (Config.FAMILIES):

    Qwen2 / Qwen2.5 (model_type qwen2)  q, k, v projections with a bias; head_dim = hidden / heads
    Qwen3 (model_type qwen3)            no bias (unless attention_bias); head_dim from config.json
                                        (128, not hidden / heads); q_norm and k_norm, an RMSNorm
                                        over head_dim, applied to each head of q and k before RoPE
    Qwen3.5 / 3.6 / 3.8 (qwen3_5)       layer_types: three of four layers Gated DeltaNet
                                        (deltanet.py), every fourth attention as Qwen3's plus a
                                        sigmoid output gate from q_proj, RoPE on a quarter of each
                                        head; RMSNorm weights zero-centred (x * (1 + w))

Modules are named exactly as the checkpoint's tensors (`model.layers.3.self_attn.q_proj.weight`),
so loading is a strict state-dict load with no renaming table. Weights are read shard by shard
straight into the requested dtype and device onto a model built on the `meta` device, so a 7B
checkpoint never needs a second, randomly initialised copy in memory.
"""

import sys
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from checkpoints import (ModelError, check_config, check_config_numbers, checkpoint_files,  # noqa: F401
                         load_generation_config, resolve_model_dir, save_safetensors_sharded,
                         shard_shapes)  # the folder's files; used as model.X elsewhere
from deltanet import GatedDeltaNet, segments_of
from util import read_json, short_list


# ----------------------------------------------------------------------------------------------
# Config


@dataclass
class Config:
    """The fields of a Qwen2, Qwen3 or Qwen3.5 config.json that change the computation (Qwen3.5's
    vision-language config.json: those of its text_config)."""

    # model_type -> the architecture transformers names it with. Everything else is refused.
    FAMILIES = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "qwen3_5": "Qwen3_5ForCausalLM"}
    # Qwen3.5's keys, dropped from the other families' config.json (to_dict)
    QWEN3_5_KEYS = ("layer_types", "linear_conv_kernel_dim", "linear_key_head_dim", "linear_value_head_dim",
                    "linear_num_key_heads", "linear_num_value_heads", "partial_rotary_factor")

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int = 32768
    rope_theta: float = 1000000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    torch_dtype: str = "bfloat16"
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    model_type: str = "qwen2"
    head_dim: int | None = None  # Qwen3 sets it; Qwen2 computes it: hidden_size // num_attention_heads
    attention_bias: bool = False  # Qwen3's switch for biases on q, k, v and o (off in every release)
    # Qwen3.5: each layer's token mixer, "linear_attention" (Gated DeltaNet) or "full_attention", and
    # the DeltaNet's sizes: a causal conv of this kernel, query / key heads of key_head_dim, value heads
    layer_types: list | None = None
    linear_conv_kernel_dim: int = 4
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 32
    partial_rotary_factor: float = 1.0  # RoPE turns the first head_dim * this dims of each head (Qwen3.5: 0.25)
    extra: dict = field(default_factory=dict, repr=False)  # every other key, written back unchanged

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.layer_types is None and self.model_type == "qwen3_5":  # as transformers derives them
            every = self.extra.get("full_attention_interval", 4)
            self.layer_types = ["full_attention" if (i + 1) % every == 0 else "linear_attention"
                                for i in range(self.num_hidden_layers)]

    @property
    def mixers(self) -> list[str]:  # each layer's token mixer
        return self.layer_types or ["full_attention"] * self.num_hidden_layers

    @property
    def rotary_dim(self) -> int:  # how many dims of each head RoPE turns
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def qwen3_5(self) -> bool:  # zero-centred norms, gated attention (and DeltaNet layers, by layer_types)
        return self.model_type == "qwen3_5"

    @property
    def qkv_bias(self) -> bool:  # Qwen2 always has biases on q, k and v
        return self.model_type == "qwen2" or self.attention_bias

    @property
    def o_bias(self) -> bool:
        return self.model_type != "qwen2" and self.attention_bias

    @property
    def qk_norm(self) -> bool:  # Qwen3 and Qwen3.5 normalise each head of q and k
        return self.model_type != "qwen2"

    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> "Config":
        d = text_config_of(d)
        where = source
        check_config(d, where)  # its texts, flags and objects, before they are read (checkpoints.CONFIG_FIELDS)
        d["model_type"] = cls.family(d, where)
        mixers = {"full_attention", "linear_attention"} if d["model_type"] == "qwen3_5" else {"full_attention"}
        sliding = d.get("use_sliding_window") or any(t not in mixers for t in d.get("layer_types") or [])
        if sliding:
            raise ModelError(f"{where} turns on sliding-window attention. Every released Qwen2.5 and Qwen3 model uses full "
                             "attention and this decoder implements only that, so it refuses to run an approximation. "
                             "Set use_sliding_window to false if the checkpoint was trained without it.")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ModelError(f"{where} sets hidden_act={act!r}; Qwen uses 'silu' and nothing else is implemented.")
        read_rope(d, where)
        if "torch_dtype" not in d and "dtype" in d:
            d["torch_dtype"] = d["dtype"]
        if d.get("num_key_value_heads") is None and "num_attention_heads" in d:
            d["num_key_value_heads"] = d["num_attention_heads"]
        names = [f.name for f in fields(cls) if f.name != "extra"]
        required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
        missing = [k for k in required if d.get(k) is None]
        if missing:
            raise ModelError(f"{where} lacks the key(s) {', '.join(missing)} that every Qwen config has.")
        check_config_numbers(d, where, {"head_dim": int, **{f.name: f.type for f in fields(cls) if f.type in (int, float)}})
        cfg = cls(**{k: d[k] for k in names if k in d and d[k] is not None},
                  extra={k: v for k, v in d.items() if k not in names})
        if cfg.num_attention_heads % cfg.num_key_value_heads or "head_dim" not in d and cfg.hidden_size % cfg.num_attention_heads:
            raise ModelError(
                f"{where}: hidden_size {cfg.hidden_size}, num_attention_heads {cfg.num_attention_heads} "
                f"and num_key_value_heads {cfg.num_key_value_heads} do not divide evenly."
            )
        return cfg

    @classmethod
    def family(cls, d: dict, where: str) -> str:
        """config.json's model_type, if this decoder implements it; else a ModelError naming what it does."""
        model_type, archs = d.get("model_type"), d.get("architectures") or []
        model_type = {"qwen3_5_text": "qwen3_5"}.get(model_type, model_type)  # Qwen3_5ForCausalLM's config
        known = [t for t, arch in cls.FAMILIES.items() if t == model_type or model_type is None and arch in archs]
        if known:
            return known[0]
        kind = " (a mixture-of-experts model)" if "moe" in str(model_type).lower() else ""
        raise ModelError(
            f"{where} describes model_type={model_type!r}{kind} (architectures {archs}), but this toolkit "
            "implements the dense Qwen decoders only: Qwen2 / Qwen2.5 (model_type 'qwen2'), Qwen3 "
            "(model_type 'qwen3': 0.6B to 32B and the 2507 Instruct / Thinking models) and Qwen3.5 / 3.6 / 3.8 "
            "dense (model_type 'qwen3_5': 0.8B to 27B; the text model). Point --model at one of those, such "
            "as Qwen/Qwen3-4B-Instruct-2507 or Qwen/Qwen2.5-7B-Instruct."
        )

    @classmethod
    def from_json(cls, path) -> "Config":
        if not Path(path).exists():
            raise ModelError(f"{path} does not exist: a model folder needs a config.json.")
        return cls.from_dict(read_json(path, ModelError), source=str(path))

    def to_dict(self) -> dict:
        """config.json as transformers writes it for Qwen2ForCausalLM, Qwen3ForCausalLM or Qwen3_5ForCausalLM."""
        d = {"architectures": [self.FAMILIES[self.model_type]], "hidden_act": "silu",
             "use_sliding_window": False, "attention_dropout": 0.0, "initializer_range": 0.02,
             "use_cache": True}
        d.update(self.extra)
        d.update({f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"})
        if self.model_type == "qwen2":  # keys a Qwen2 config.json does not have, at their Qwen2 values
            for key, default in (("head_dim", self.hidden_size // self.num_attention_heads), ("attention_bias", False)):
                if d[key] == default:
                    del d[key]
        rope = {**(d.pop("rope_parameters", None) or {}), "rope_type": "default", "rope_theta": self.rope_theta}
        d.pop("rope_scaling", None)
        d.pop("dtype", None)
        if self.qwen3_5:  # the text model's config.json: RoPE's settings under rope_parameters
            d.update(model_type="qwen3_5_text", rope_parameters={**rope, "partial_rotary_factor": self.partial_rotary_factor})
        for key in self.QWEN3_5_KEYS if not self.qwen3_5 else ("partial_rotary_factor",):
            d.pop(key, None)
        return d



def text_config_of(d: dict) -> dict:
    """config.json's keys for the text model: a Qwen3.5 vision-language config.json keeps them under
    text_config (its tie_word_embeddings at the top, which transformers' VL model ties by)."""
    if not isinstance(d.get("text_config"), dict):
        return dict(d)
    text = dict(d["text_config"])
    if "tie_word_embeddings" in d:
        text["tie_word_embeddings"] = d["tie_word_embeddings"]
    text.setdefault("model_type", d.get("model_type"))
    return text


def read_rope(d: dict, where: str):
    """RoPE's settings into d's own keys: newer transformers write them under rope_parameters, older
    ones at the top level. Qwen3.5's mrope_section places a picture's rows and columns; for text all
    three positions are the token's, so its RoPE is the plain one (on partial_rotary_factor of each head)."""
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ModelError(
            f"{where} asks for RoPE scaling of type {rope_type!r}, which this decoder does not "
            "implement; it would compute different logits from the reference. Remove the "
            "rope_scaling entry to run at the model's native context length."
        )
    if "rope_theta" in rope:
        d["rope_theta"] = rope["rope_theta"]
    if d["model_type"] == "qwen3_5":  # transformers: rope_parameters' value, else the top level's, else 0.25
        d["partial_rotary_factor"] = rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 0.25))
    else:
        d.pop("partial_rotary_factor", None)


# ----------------------------------------------------------------------------------------------
# The decoder


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, zero_centred: bool = False):
        super().__init__()
        # Qwen3.5 stores w - 1 (zero-centred: its checkpoints hold values near 0) and scales by 1 + w.
        self.weight = nn.Parameter(torch.zeros(dim) if zero_centred else torch.ones(dim))
        self.eps, self.zero_centred = eps, zero_centred

    def forward(self, x):
        # Normalise in float32 for accuracy, then cast back before scaling (as Qwen2 does; Qwen3.5 after).
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.zero_centred:
            return (x * (1.0 + self.weight.float())).to(dtype)
        return self.weight * x.to(dtype)


def rope_cos_sin(position_ids, head_dim: int, theta: float, dtype):
    """cos and sin of the rotary angles for each position: (B, T) -> two (B, T, head_dim).
    (Qwen3.5 passes the rotary part of head_dim only: Config.rotary_dim.)"""
    # Computed in float32 on every call so that casting the model to bf16 never touches it.
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim)
    freqs = position_ids.float()[..., None] * inv_freq  # (B, T, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (B, T, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    """Rotate the two halves of each head: x (B, nh, T, hd), cos/sin (B, T, hd); with cos and sin
    narrower than the head (B, T, rd), only its first rd dims, the rest passing unchanged (Qwen3.5)."""
    rd = cos.shape[-1]
    if rd < x.shape[-1]:
        return torch.cat([apply_rope(x[..., :rd], cos, sin), x[..., rd:]], dim=-1)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


class Attention(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        # Qwen3.5's q_proj gives each head its query and then as many output-gate logits
        self.gated = cfg.qwen3_5
        q_size = self.n_head * self.head_dim * (2 if self.gated else 1)
        self.q_proj = nn.Linear(cfg.hidden_size, q_size, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, cfg.hidden_size, bias=cfg.o_bias)
        # Qwen3 normalises each head of q and k (over head_dim) before RoPE; Qwen2 does not.
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, cfg.qwen3_5) if cfg.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, cfg.qwen3_5) if cfg.qk_norm else nn.Identity()
        self.fused_qkv = None  # q, k and v in one matmul, for decoding: fast_decode.fuse_projections

    def forward(self, x, cos, sin, mask, is_causal, cache=None, layer=0):
        B, T, _ = x.shape
        q, k, v, gate = self.heads(x, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, nkv, S, hd), S = cached + T
        y = attend(q, k, v, mask, is_causal).transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.o_proj(y * torch.sigmoid(gate) if self.gated else y)

    def heads(self, x, cos, sin):  # each position alone (tiles.SplitLayer runs a long row through it in tiles)
        B, T, _ = x.shape
        if self.fused_qkv is not None:
            sizes = [self.q_proj.out_features, self.n_kv * self.head_dim, self.n_kv * self.head_dim]
            q, k, v = self.fused_qkv(x).split(sizes, dim=-1)  # (B, T, nh*hd), 2 x (B, T, nkv*hd)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.gated:  # (B, T, nh * 2hd): each head's query, then its gate
            q, gate = q.view(B, T, self.n_head, 2 * self.head_dim).chunk(2, dim=-1)  # 2 x (B, T, nh, hd)
            q, gate = q.reshape(B, T, -1), gate.reshape(B, T, -1)
        q = self.q_norm(q.view(B, T, self.n_head, self.head_dim)).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_norm(k.view(B, T, self.n_kv, self.head_dim)).transpose(1, 2)  # (B, nkv, T, hd)
        v = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, gate if self.gated else None


def attend(q, k, v, mask, is_causal):
    """q (B, nh, T, hd), k and v (B, nkv, S, hd) -> (B, nh, T, hd)."""
    if callable(mask):  # packed rows attended without a (T, T) mask: speed.VarlenAttention on a GPU
        return mask(q, k, v)
    B, nh, T, hd = q.shape
    if T == 1 and k.shape[1] != nh:  # decoding one token a row: each K/V head's query heads become its queries,
        # so that a masked batch runs a fused kernel (a mask with enable_gqa runs the unfused one, K/V copied per head)
        out = F.scaled_dot_product_attention(q.reshape(B, k.shape[1], nh // k.shape[1], hd), k, v, attn_mask=mask)
        return out.reshape(B, nh, 1, hd)
    # enable_gqa lets each K/V head serve its group of query heads without copying K/V.
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                          enable_gqa=k.shape[1] != q.shape[1])


class MLP(nn.Module):
    # The MLP works on each token alone, so a long sequence goes through it this many tokens at a time: its
    # (tokens x intermediate) tensors, 74 MiB each at 2,048 tokens on the 7B shape, stay that size however long
    # the sequence. In a compiled layer's backward (speed.compiled_layers) each piece's is freed before the next.
    chunk = 2048

    def __init__(self, cfg: Config):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.fused_gate_up = None  # gate and up in one matmul, for decoding: fast_decode.fuse_projections

    def forward(self, x):  # (B, T, hidden)
        if x.shape[1] > self.chunk:
            return torch.cat([self._forward(piece) for piece in x.split(self.chunk, dim=1)], dim=1)
        return self._forward(x)

    def _forward(self, x):
        if self.fused_gate_up is not None:
            gate, up = self.fused_gate_up(x).chunk(2, dim=-1)  # 2 x (B, T, intermediate)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


def recompute(fn, *args):
    """Gradient checkpointing: fn(*args) keeps only its inputs for backward, which runs it again to
    get what it needs (torch's non-reentrant checkpoint: the forward records autograd's graph)."""
    return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Config, index: int = 0):
        super().__init__()
        if cfg.mixers[index] == "linear_attention":  # Qwen3.5's Gated DeltaNet (deltanet.py)
            self.linear_attn = GatedDeltaNet(cfg.hidden_size, cfg.linear_num_key_heads, cfg.linear_num_value_heads,
                                             cfg.linear_key_head_dim, cfg.linear_value_head_dim,
                                             cfg.linear_conv_kernel_dim, cfg.rms_norm_eps)
        else:
            self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.qwen3_5)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.qwen3_5)
        self.recompute = recompute  # how checkpointing runs it again (shard.py has its own for FSDP)

    def forward(self, h, cos, sin, mask, is_causal, cache=None, layer=0, checkpoint=False, segments=None):
        """segments (B, T): the rows of a padded or packed batch, for a DeltaNet layer (QwenModel.forward)."""
        if checkpoint:
            # Keep only the layer's input; recompute its insides during backward. Done here, inside the layer, so
            # that a compiled layer (speed.compiled_layers) compiles the recomputation together with the backward.
            return self.recompute(self._forward, h, cos, sin, mask, is_causal, cache, layer, segments)
        return self._forward(h, cos, sin, mask, is_causal, cache, layer, segments)

    def _forward(self, h, cos, sin, mask, is_causal, cache, layer, segments=None):
        h = self.mix(h, cos, sin, mask, is_causal, cache, layer, segments)
        return h + self.mlp(self.post_attention_layernorm(h))

    def mix(self, h, cos, sin, mask, is_causal, cache=None, layer=0, segments=None):
        """h + the token mixer of norm(h): attention, or a DeltaNet (tiles.py runs it apart from the MLP)."""
        x = self.input_layernorm(h)
        if hasattr(self, "linear_attn"):
            return h + self.linear_attn(x, segments, cache, layer)
        return h + self.self_attn(x, cos, sin, mask, is_causal, cache, layer)


def attention_mask_4d(q_seg, k_seg, start: int):
    """Boolean (B, 1, T, S) mask: a query sees keys at or before its position with its own segment id.

    q_seg (B, T) and k_seg (B, S) hold 0 for padding and a segment id otherwise (1 for ordinary rows;
    1, 2, 3, ... for samples packed into one row). A query always sees itself, so padding rows are
    never fully masked (which would give NaN) and their outputs are simply ignored.
    """
    T, S = q_seg.shape[1], k_seg.shape[1]
    q_pos = torch.arange(start, start + T, device=q_seg.device)[:, None]  # (T, 1)
    k_pos = torch.arange(S, device=q_seg.device)[None, :]  # (1, S)
    same = (q_seg[:, :, None] == k_seg[:, None, :]) & (k_seg[:, None, :] != 0)  # (B, T, S)
    return ((same & (k_pos <= q_pos)) | (k_pos == q_pos))[:, None]


def block_mask(cu_seqlens, T: int):
    """Boolean (1, 1, T, T) mask of rows packed into one sequence: a token sees the tokens at or
    before it in its own row. cu_seqlens (N + 1,): where each row starts, then T (repeated: empty rows)."""
    tokens = torch.arange(T, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    row = torch.searchsorted(cu_seqlens, tokens, right=True)  # (T,): 1, 1, 2, ... the row of each token, from 1
    return attention_mask_4d(row[None], row[None], 0)


def attention_inputs(input_ids, attention_mask=None, position_ids=None, cu_seqlens=None, packed_mask=None):
    """(position_ids, mask, is_causal) for a forward without a cache.

    Without a mask attention is plain causal, its fastest exact kernel (is_causal, no mask tensor).
    With one, positions are counted over the tokens (0 on padding) unless given, and the 4-d mask
    keeps padding and packed samples apart. With cu_seqlens, the input is rows packed one after
    another into one sequence, with their position_ids: packed_mask(cu_seqlens, T) keeps them
    apart, block_mask by default (speed.VarlenAttention on a GPU needs no mask tensor)."""
    B, T = input_ids.shape
    if cu_seqlens is not None:
        return position_ids, (packed_mask or block_mask)(cu_seqlens, T), False
    if attention_mask is None:
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
        return position_ids, None, T > 1
    seg = attention_mask.long()  # (B, T)
    if position_ids is None:
        position_ids = ((seg != 0).long().cumsum(-1) - 1).clamp(min=0)
    return position_ids, attention_mask_4d(seg, seg, 0), False


class KVCache:
    """Keys and values of every layer, preallocated for max_len positions and written by position.

    `seg` remembers, for each cached position, the attention-mask value it came with (0 = padding),
    so later tokens never attend to padding. `length` is how many positions are filled.
    A Qwen3.5 DeltaNet layer keeps no keys and values but its convolution's last inputs and its
    recurrent state (linear_state): they hold the text so far and cannot be rewound.
    """

    def __init__(self, config: Config, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)
        full = [t == "full_attention" for t in config.mixers]
        self.k = [torch.zeros(shape, device=device, dtype=dtype) if f else None for f in full]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) if f else None for f in full]
        self.linear = [None] * len(full)  # per DeltaNet layer: (conv state, recurrent state), None at a text's start
        self.linear_length = 0  # the positions the DeltaNet states hold
        self.seg = torch.zeros(batch_size, max_len, device=device, dtype=torch.long)
        self.max_len = max_len
        self.length = 0
        self.start = 0  # where the forward in progress writes its keys and values

    def attention_inputs(self, input_ids, attention_mask=None, position_ids=None):
        """(position_ids, mask, is_causal) for T new tokens after the `length` cached ones, which
        this reserves: the forward's layers write their keys and values at start .. start + T."""
        B, T = input_ids.shape
        start = self.start = self.length
        if start == 0:
            self.linear = [None] * len(self.linear)
        elif any(s is not None for s in self.linear) and start != self.linear_length:
            raise ModelError(f"a recurrent (DeltaNet) state holds {self.linear_length} positions and cannot be "
                             f"rewound to {start}: run the text again from position 0.")
        self.linear_length = start + T
        if start + T > self.max_len:
            raise ModelError(f"the sequence needs {start + T} positions but the KV cache holds {self.max_len}.")
        self.length = start + T
        seg = attention_mask.long() if attention_mask is not None else None
        self.seg[:, start:start + T] = seg if seg is not None else 1
        k_seg = self.seg[:, :start + T]  # (B, S)
        unmasked = seg is None and bool((k_seg[:, :start] != 0).all())
        if position_ids is None:
            if unmasked:
                position_ids = torch.arange(start, start + T, device=input_ids.device).expand(B, T)
            else:
                position_ids = ((k_seg != 0).long().cumsum(-1) - 1).clamp(min=0)[:, start:]
        if unmasked and start == 0:
            return position_ids, None, T > 1
        if unmasked:  # one new token sees everything cached: no mask at all
            mask = attention_mask_4d(torch.ones_like(input_ids), k_seg.clamp(max=1), start) if T > 1 else None
            return position_ids, mask, False
        return position_ids, attention_mask_4d(seg if seg is not None else torch.ones_like(input_ids), k_seg, start), False

    def linear_state(self, layer: int):
        """(conv state (B, C, K - 1), recurrent state (B, H, dk, dv) float32) of a DeltaNet layer, or Nones."""
        return self.linear[layer] or (None, None)

    def set_linear_state(self, layer: int, conv, state):
        self.linear[layer] = (conv, state)

    def update(self, layer: int, k, v):
        """Store k, v (B, nkv, T, hd) at the reserved positions; return all keys and values so far."""
        end = self.start + k.shape[2]
        self.k[layer][:, :, self.start:end] = k
        self.v[layer][:, :, self.start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class QwenModel(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.config = cfg
        # randn: nn.Embedding's own draw, but its normal_ on meta imports torch._dynamo (2 s a start)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                         _weight=torch.randn(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.qwen3_5)
        self.gradient_checkpointing = False
        self.linear = "linear_attention" in cfg.mixers  # Qwen3.5: some layers are Gated DeltaNet

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, layers=None,
                cu_seqlens=None, packed_mask=None, inputs_embeds=None):
        """input_ids (B, T) -> final hidden states (B, T, hidden).

        attention_mask (B, T): 1 for tokens, 0 for padding, or segment ids 1, 2, ... for packed rows.
        position_ids (B, T): by default counted over the non-padding tokens (so left padding works).
        cache: a KVCache; the new tokens go after its `length` cached positions.
        layers: callables to run instead of self.layers, with the same arguments: the same layers
        compiled, for training steps (speed.compiled_layers).
        cu_seqlens (N + 1,): rows packed into one sequence (B = 1) start at these offsets; with
        position_ids restarting at 0 for each. packed_mask: how attention keeps them apart
        (attention_inputs).
        inputs_embeds (B, T, hidden): input_ids' embeddings, looked up already (a training batch
        whose embedding table is in host memory: speed.HostEmbedding).
        """
        if cache is not None:
            position_ids, mask, is_causal = cache.attention_inputs(input_ids, attention_mask, position_ids)
        else:
            position_ids, mask, is_causal = attention_inputs(input_ids, attention_mask, position_ids, cu_seqlens,
                                                             packed_mask)
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, hidden)
        cos, sin = rope_cos_sin(position_ids, self.config.rotary_dim, self.config.rope_theta, h.dtype)
        checkpoint = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        # DeltaNet layers see the batch's rows as segment ids; attention layers only as the mask
        rows = {"segments": segments_of(attention_mask, cu_seqlens, input_ids.shape[1])} if self.linear else {}
        for i, layer in enumerate(self.layers if layers is None else layers):
            h = layer(h, cos, sin, mask, is_causal, cache, i, checkpoint=checkpoint, **rows)
        return self.norm(h)


class QwenForCausalLM(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.config = cfg
        self.model = QwenModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None):
        """input_ids (B, T) -> logits (B, T, vocab)."""
        return self.lm_head(self.model(input_ids, attention_mask, position_ids, cache))

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        p = self.lm_head.weight
        return KVCache(self.config, batch_size, max_len, device=p.device, dtype=p.dtype)


# ----------------------------------------------------------------------------------------------
# Loading safetensors weights (finding the folder and its files: checkpoints.py)


def stop_ids(generation_config: dict, config: Config, im_end_id: int) -> set[int]:
    """Token ids that end an answer: generation_config.json's eos_token_id (else config.json's), and
    always <|im_end|>, which closes every assistant turn of the chat format."""
    eos = generation_config.get("eos_token_id", config.eos_token_id)
    return set(eos if isinstance(eos, list) else [] if eos is None else [eos]) | {im_end_id}


# Qwen3.5's official checkpoints are vision-language (Qwen3_5ForConditionalGeneration): the text
# model's tensors under model.language_model. (transformers' conversion mapping turns that prefix
# into model.), lm_head as it is, then the vision tower and multi-token prediction, not loaded here.
TEXT_PREFIX, NOT_LOADED = "model.language_model.", {"model.visual.": "vision tower", "mtp.": "multi-token prediction"}


def text_name(name: str, config: Config) -> str | None:
    """The model's name for a checkpoint tensor; None for Qwen3.5's vision tower and MTP weights."""
    if not config.qwen3_5:
        return name
    if name.startswith(tuple(NOT_LOADED)):
        return None
    return "model." + name.removeprefix(TEXT_PREFIX) if name.startswith(TEXT_PREFIX) else name


def check_weights(model: QwenForCausalLM, model_dir: Path) -> tuple[list[Path], dict]:
    """Check, from the shard headers only, that the checkpoint holds every tensor the model needs
    in the right shape. Returns (the shard files, {name: shape} of the tensors to load)."""
    files = checkpoint_files(model_dir)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)  # shares model.embed_tokens.weight
    found, skipped = {}, []
    for f in files:
        for k, shape in shard_shapes(f).items():
            name = text_name(k, model.config)
            if name is None:
                skipped.append(k)
            else:
                found[name] = (shape, f)
    if model.config.tie_word_embeddings:
        found.pop("lm_head.weight", None)  # some tied checkpoints store it anyway; it is the same tensor
    missing = expected.keys() - found.keys()
    unexpected = found.keys() - expected.keys()
    wrong = [f"{k} {found[k][0]} (expected {expected[k]})" for k in expected.keys() & found.keys() if found[k][0] != expected[k]]
    problems = []
    if missing:
        problems.append(f"missing tensors: {short_list(sorted(missing))}")
    if unexpected:
        problems.append(f"unexpected tensors: {short_list(sorted(unexpected))}")
    if wrong:
        problems.append(f"tensors of the wrong shape: {short_list(sorted(wrong))}")
    if problems:
        raise ModelError(
            f"the weights in {model_dir} do not match its config.json ({'; '.join(problems)}). "
            "The checkpoint is incomplete or belongs to another model: download it again or fix config.json."
        )
    if skipped:  # one line: what a text-only fine-tune leaves out
        parts = [f"the {what} ({n} tensors {prefix}*)" for prefix, what in NOT_LOADED.items()
                 if (n := sum(k.startswith(prefix) for k in skipped))]
        print(f"note: {model_dir} is a vision-language checkpoint; its text model loads, {' and '.join(parts)} "
              "not (text-only training and chat do not use them).", file=sys.stderr)
    return files, expected


def load_weights(model: QwenForCausalLM, model_dir: Path, dtype, device):
    """Read every tensor straight into `dtype` on `device`, replacing the model's (meta) parameters,
    one shard at a time."""
    from safetensors import safe_open

    files, expected = check_weights(model, model_dir)
    for f in files:
        shard = {}
        with safe_open(f, framework="pt", device=str(device)) as sf:
            for k in sf.keys():
                if text_name(k, model.config) in expected:  # under the model's name
                    shard[text_name(k, model.config)] = sf.get_tensor(k).to(dtype)
        model.load_state_dict(shard, strict=False, assign=True)
        del shard
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight


def load_model(name_or_path: str, dtype=torch.bfloat16, device="cpu"):
    """Build the decoder from a checkpoint folder or hub id. Returns (model, model_dir)."""
    model_dir = resolve_model_dir(name_or_path)
    cfg = Config.from_json(model_dir / "config.json")
    with torch.device("meta"):
        model = QwenForCausalLM(cfg)
    load_weights(model, model_dir, dtype, device)
    return model.eval(), model_dir
