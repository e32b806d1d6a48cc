"""model.py: the Qwen2 / Qwen2.5 / Qwen3 decoder in plain PyTorch, and loading of official checkpoints.

The network is a stack of pre-norm decoder layers:

    h = h + attn(input_layernorm(h))          # grouped-query attention with RoPE
    h = h + mlp(post_attention_layernorm(h))  # down(silu(gate(x)) * up(x))
    logits = lm_head(norm(h))

The families differ only inside attention, and config.json says how (Config.FAMILIES):

    Qwen2 / Qwen2.5 (model_type qwen2)  q, k, v projections with a bias; head_dim = hidden / heads
    Qwen3 (model_type qwen3)            no bias (unless attention_bias); head_dim from config.json
                                        (128, not hidden / heads); q_norm and k_norm, an RMSNorm
                                        over head_dim, applied to each head of q and k before RoPE

Modules are named exactly as the checkpoint's tensors (`model.layers.3.self_attn.q_proj.weight`),
so loading is a strict state-dict load with no renaming table. Weights are read shard by shard
straight into the requested dtype and device onto a model built on the `meta` device, so a 7B
checkpoint never needs a second, randomly initialised copy in memory.
"""

import json
import os
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from util import read_json, short_list


class ModelError(Exception):
    """A problem with a model folder, config or checkpoint that the user can fix."""


# ----------------------------------------------------------------------------------------------
# Config


@dataclass
class Config:
    """The fields of a Qwen2 or Qwen3 config.json that change the computation."""

    # model_type -> the architecture transformers names it with. Everything else is refused.
    FAMILIES = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}

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
    extra: dict = field(default_factory=dict, repr=False)  # every other key, written back unchanged

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads

    @property
    def qkv_bias(self) -> bool:  # Qwen2 always has biases on q, k and v
        return self.model_type == "qwen2" or self.attention_bias

    @property
    def o_bias(self) -> bool:
        return self.model_type == "qwen3" and self.attention_bias

    @property
    def qk_norm(self) -> bool:  # Qwen3 normalises each head of q and k
        return self.model_type == "qwen3"

    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> "Config":
        d = dict(d)
        where = source
        d["model_type"] = cls.family(d, where)
        sliding = d.get("use_sliding_window") or any(t != "full_attention" for t in d.get("layer_types") or [])
        if sliding:
            raise ModelError(
                f"{where} turns on sliding-window attention. Every released Qwen2.5 and Qwen3 model uses full "
                "attention and this decoder implements only that, so it refuses to run an "
                "approximation. Set use_sliding_window to false if the checkpoint was trained "
                "without it."
            )
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ModelError(f"{where} sets hidden_act={act!r}; Qwen uses 'silu' and nothing else is implemented.")
        # Newer transformers write RoPE settings under rope_parameters; older ones at the top level.
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
        if "torch_dtype" not in d and "dtype" in d:
            d["torch_dtype"] = d["dtype"]
        if d.get("num_key_value_heads") is None and "num_attention_heads" in d:
            d["num_key_value_heads"] = d["num_attention_heads"]
        names = [f.name for f in fields(cls) if f.name != "extra"]
        required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
        missing = [k for k in required if k not in d]
        if missing:
            raise ModelError(f"{where} lacks the key(s) {', '.join(missing)} that every Qwen config has.")
        for f in fields(cls):
            want = {int: int, float: (int, float)}.get(int if f.name == "head_dim" else f.type if isinstance(f.type, type) else None)
            if want and d.get(f.name) is not None and (not isinstance(d[f.name], want) or isinstance(d[f.name], bool)):
                raise ModelError(f"{where}: {f.name} is {d[f.name]!r}, not a number; fix it (e.g. 128, not \"128\").")
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
        known = [t for t, arch in cls.FAMILIES.items() if t == model_type or model_type is None and arch in archs]
        if known:
            return known[0]
        kind = " (a mixture-of-experts model)" if "moe" in str(model_type).lower() else ""
        raise ModelError(
            f"{where} describes model_type={model_type!r}{kind} (architectures {archs}), but this toolkit "
            "implements the dense Qwen decoders only: Qwen2 / Qwen2.5 (model_type 'qwen2') and Qwen3 "
            "(model_type 'qwen3': 0.6B to 32B and the 2507 Instruct / Thinking models). Point --model at "
            "one of those, such as Qwen/Qwen3-4B-Instruct-2507 or Qwen/Qwen2.5-7B-Instruct."
        )

    @classmethod
    def from_json(cls, path) -> "Config":
        if not Path(path).exists():
            raise ModelError(f"{path} does not exist: a model folder needs a config.json.")
        return cls.from_dict(read_json(path, ModelError), source=str(path))

    def to_dict(self) -> dict:
        """config.json as transformers writes it for Qwen2ForCausalLM or Qwen3ForCausalLM."""
        d = {"architectures": [self.FAMILIES[self.model_type]], "hidden_act": "silu",
             "use_sliding_window": False, "attention_dropout": 0.0, "initializer_range": 0.02,
             "use_cache": True}
        d.update(self.extra)
        d.update({f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"})
        if self.model_type == "qwen2":  # keys a Qwen2 config.json does not have, at their Qwen2 values
            for key, default in (("head_dim", self.hidden_size // self.num_attention_heads), ("attention_bias", False)):
                if d[key] == default:
                    del d[key]
        d.pop("rope_parameters", None)
        d.pop("rope_scaling", None)
        d.pop("dtype", None)
        return d


# ----------------------------------------------------------------------------------------------
# The decoder


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # Normalise in float32 for accuracy, then cast back before scaling (as Qwen2 does).
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_cos_sin(position_ids, head_dim: int, theta: float, dtype):
    """cos and sin of the rotary angles for each position: (B, T) -> two (B, T, head_dim)."""
    # Computed in float32 on every call so that casting the model to bf16 never touches it.
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim)
    freqs = position_ids.float()[..., None] * inv_freq  # (B, T, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (B, T, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    """Rotate the two halves of each head: x (B, nh, T, hd), cos/sin (B, T, hd)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


class Attention(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_head * self.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, cfg.hidden_size, bias=cfg.o_bias)
        # Qwen3 normalises each head of q and k (over head_dim) before RoPE; Qwen2 does not.
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else nn.Identity()
        self.qkv_weight = self.qkv_bias = None  # q, k and v in one matrix, for decoding: speed.fuse_projections

    def forward(self, x, cos, sin, mask, is_causal, cache=None, layer=0):
        B, T, _ = x.shape
        if self.qkv_weight is not None:
            sizes = [self.n_head * self.head_dim, self.n_kv * self.head_dim, self.n_kv * self.head_dim]
            q, k, v = F.linear(x, self.qkv_weight, self.qkv_bias).split(sizes, dim=-1)  # (B, T, nh*hd), 2 x (B, T, nkv*hd)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = self.q_norm(q.view(B, T, self.n_head, self.head_dim)).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_norm(k.view(B, T, self.n_kv, self.head_dim)).transpose(1, 2)  # (B, nkv, T, hd)
        v = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, nkv, S, hd), S = cached + T
        y = attend(q, k, v, mask, is_causal).transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.o_proj(y)


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
    # The MLP works on each token alone, so a long sequence goes through it this many tokens at a
    # time: its (tokens x intermediate) tensors, 74 MiB each at 2,048 tokens on the 7B shape, stay
    # that size however long the sequence. In a compiled layer's backward (speed.compiled_layers)
    # each piece's recomputation is then used and freed before the next one's.
    chunk = 2048

    def __init__(self, cfg: Config):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.gate_up_weight = None  # gate and up in one matrix, for decoding: speed.fuse_projections

    def forward(self, x):  # (B, T, hidden)
        if x.shape[1] > self.chunk:
            return torch.cat([self._forward(piece) for piece in x.split(self.chunk, dim=1)], dim=1)
        return self._forward(x)

    def _forward(self, x):
        if self.gate_up_weight is not None:
            gate, up = F.linear(x, self.gate_up_weight).chunk(2, dim=-1)  # 2 x (B, T, intermediate)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


def recompute(fn, *args):
    """Gradient checkpointing: fn(*args) keeps only its inputs for backward, which runs it again to
    get what it needs (torch's non-reentrant checkpoint: the forward records autograd's graph)."""
    return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.recompute = recompute  # how checkpointing runs it again (shard.py has its own for FSDP)

    def forward(self, h, cos, sin, mask, is_causal, cache=None, layer=0, checkpoint=False):
        if checkpoint:
            # Keep only the layer's input; recompute its insides during backward. Done here, inside
            # the layer, so that a compiled layer (speed.compiled_layers) compiles the recomputation
            # together with the backward: one fused forward and one backward per layer.
            return self.recompute(self._forward, h, cos, sin, mask, is_causal, cache, layer)
        return self._forward(h, cos, sin, mask, is_causal, cache, layer)

    def _forward(self, h, cos, sin, mask, is_causal, cache, layer):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, mask, is_causal, cache, layer)
        return h + self.mlp(self.post_attention_layernorm(h))


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
    """

    def __init__(self, config: Config, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.seg = torch.zeros(batch_size, max_len, device=device, dtype=torch.long)
        self.max_len = max_len
        self.length = 0
        self.start = 0  # where the forward in progress writes its keys and values

    def attention_inputs(self, input_ids, attention_mask=None, position_ids=None):
        """(position_ids, mask, is_causal) for T new tokens after the `length` cached ones, which
        this reserves: the forward's layers write their keys and values at start .. start + T."""
        B, T = input_ids.shape
        start = self.start = self.length
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
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.gradient_checkpointing = False

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
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, h.dtype)
        checkpoint = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for i, layer in enumerate(self.layers if layers is None else layers):
            h = layer(h, cos, sin, mask, is_causal, cache, i, checkpoint=checkpoint)
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
# Finding a model folder: a local path or a Hugging Face hub id

HUB_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "vocab.json", "merges.txt", "*.safetensors", "model.safetensors.index.json"]


def resolve_model_dir(name_or_path: str) -> Path:
    """A local folder, or a hub id such as Qwen/Qwen2.5-7B-Instruct (downloaded once into the HF cache)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelError(f"--model {name_or_path} is a file; it must be a model folder (with config.json and *.safetensors) or a hub id.")
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1 or os.sep != "/" and os.sep in name_or_path
    if looks_local:
        raise ModelError(f"--model {name_or_path}: no such folder. Check the path, or give a hub id such as Qwen/Qwen2.5-7B-Instruct.")
    # The tutorial writes `--model Qwen2.5-7B-Instruct`; on the hub that model lives under Qwen/.
    repo_id = name_or_path if "/" in name_or_path else f"Qwen/{name_or_path}"
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except Exception as e:
        raise ModelError(
            f"--model {name_or_path}: not a local folder, and fetching {repo_id} from the Hugging Face "
            f"hub failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Check the "
            "name and your network, or download the model once and pass its folder; with "
            "HF_HUB_OFFLINE=1 only models already in your HF cache are found."
        ) from None


def load_generation_config(model_dir) -> dict:
    path = Path(model_dir) / "generation_config.json"
    return read_json(path, ModelError) if path.exists() else {}


def stop_ids(generation_config: dict, config: Config, im_end_id: int) -> set[int]:
    """Token ids that end an answer: generation_config.json's eos_token_id (else config.json's), and
    always <|im_end|>, which closes every assistant turn of the chat format."""
    eos = generation_config.get("eos_token_id", config.eos_token_id)
    return set(eos if isinstance(eos, list) else [] if eos is None else [eos]) | {im_end_id}


# ----------------------------------------------------------------------------------------------
# Loading and saving safetensors weights


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint, single-file or sharded with an index."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index, ModelError).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise ModelError(f"{index} is not a valid index: it needs a \"weight_map\" of tensor name -> file.")
        files = sorted(set(weight_map.values()))
        outside = [f for f in files if Path(f).name != f]  # a path, not a file of this folder
        if outside:
            raise ModelError(f"{index} names shard(s) outside {model_dir}: {short_list(outside)}. A model's index "
                             "names files of its own folder; this one is broken or hostile: fetch the model again.")
        absent = [f for f in files if not (model_dir / f).exists()]
        if absent:
            raise ModelError(f"{index} names shard(s) that are not in {model_dir}: {', '.join(absent)}. The download is incomplete; fetch the model again.")
        return [model_dir / f for f in files]
    if (model_dir / "model.safetensors").exists():
        return [model_dir / "model.safetensors"]
    pickles = sorted(p.name for p in model_dir.glob("*.bin")) + sorted(p.name for p in model_dir.glob("*.pt*"))
    if pickles:
        raise ModelError(
            f"{model_dir} holds only pickle weights ({', '.join(pickles[:3])}). This toolkit loads "
            "safetensors only: pickle files can run arbitrary code when loaded. Convert them once "
            "(e.g. load with transformers and save_pretrained(safe_serialization=True)) or download "
            "the safetensors version of the model."
        )
    raise ModelError(f"{model_dir} has no model.safetensors or model.safetensors.index.json: it is not a model folder.")


def shard_shapes(path: Path) -> dict:
    """{tensor name: shape} from a safetensors file's header; a truncated or corrupt file is a
    ModelError naming it (safetensors says only "incomplete metadata")."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as sf:
            shapes = {k: tuple(sf.get_slice(k).get_shape()) for k in sf.keys()}
    except (SafetensorError, OSError) as e:
        raise ModelError(f"{path} is not a readable safetensors file ({str(e).splitlines()[0]}): the download was "
                         "cut short or the file is damaged. Delete it and fetch the model again.") from None
    return shapes


def check_weights(model: QwenForCausalLM, model_dir: Path) -> tuple[list[Path], dict]:
    """Check, from the shard headers only, that the checkpoint holds every tensor the model needs
    in the right shape. Returns (the shard files, {name: shape} of the tensors to load)."""
    files = checkpoint_files(model_dir)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)  # shares model.embed_tokens.weight
    found = {}
    for f in files:
        for k, shape in shard_shapes(f).items():
            found[k] = (shape, f)
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
                if k in expected:
                    shard[k] = sf.get_tensor(k).to(dtype)
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


def save_safetensors_sharded(state_dict: dict, out_dir, max_shard_bytes: int = 5 * 1024**3):
    """Write `model.safetensors` or `model-0000K-of-0000N.safetensors` + index, as transformers does."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    shards, current, size = [], {}, 0
    for name, t in state_dict.items():
        n = t.numel() * t.element_size()
        if current and size + n > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t.contiguous()
        size += n
    shards.append(current)
    total = sum(t.numel() * t.element_size() for t in state_dict.values())
    if len(shards) == 1:
        save_file(shards[0], out_dir / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out_dir / fname, metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
