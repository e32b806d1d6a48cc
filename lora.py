"""lora.py: LoRA adapters for the Qwen decoder, saved and loaded in PEFT's file format.

LoRA (Hu et al., 2021) freezes each chosen weight W0 (out, in) and learns a low-rank update:

    h = W0 x + (alpha / r) * B A x          A: (r, in), B: (out, r), r much smaller than in, out

Only A and B are trained: r * (in + out) numbers per layer instead of in * out. A starts random
and B at zero, so a fresh adapter leaves the model's output unchanged. rsLoRA scales by
alpha / sqrt(r) instead, which keeps the update's size stable as r grows. After training,
(alpha / r) B A can be added into W0 ("merged") so the model runs at base speed; subtracting it
again ("unmerging") gives the base back.

`LoRALinear` wraps an nn.Linear and keeps its `weight` and `bias` under the same names, so the
base model's state-dict keys (`model.layers.0.self_attn.q_proj.weight`) do not change; a 4-bit
base layer (quant.Linear4bit), which has no weight matrix, is kept whole as `base_layer`. It holds
any number of named adapters, of which one (or none: the plain base) is active. On disk an
adapter is exactly what peft writes: adapter_config.json + adapter_model.safetensors with keys
`base_model.model.<module path>.lora_A.weight` / `.lora_B.weight`, so peft, vLLM and ms-swift
read our adapters and we read theirs.
"""

import json
import math
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoints import ARGS_FIELDS, check_adapter_config
from model import TEXT_PREFIX
from util import check_fields, read_json, save_safetensors, short_list

# What `all-linear` means: every nn.Linear of every layer, never lm_head (peft's choice). Qwen2 / Qwen3: the
# seven projections; Qwen3.5 adds the Gated DeltaNet's five (in_proj_qkv, in_proj_z, in_proj_b, in_proj_a:
# beta's and the decay's, one output per value head, and out_proj); its conv1d, A_log and dt_bias are not linear.
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
              "in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj")
INIT_WEIGHTS = {"true": True, "false": False, "gaussian": "gaussian"}  # ms-swift's --init_weights -> peft's
KEY_PREFIX = "base_model.model."  # peft's prefix in front of the module path in saved keys


class LoraError(Exception):
    """A problem with an adapter, its files or its settings that the user can fix."""


@dataclass
class LoraConfig:
    r: int = 8
    lora_alpha: float = 32
    lora_dropout: float = 0.05
    target_modules: str | list[str] = "all-linear"  # "all-linear", or module names / name suffixes
    use_rslora: bool = False
    init_lora_weights: bool | str = True  # peft's: True (A kaiming-uniform), "gaussian" (A ~ N(0, 1/r)); B zeros.
    # False: B random too (nn.Linear's init), so the adapter changes the model from the start.

    @property
    def scale(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


# ----------------------------------------------------------------------------------------------
# The layer


class LoRALinear(nn.Module):
    """An nn.Linear plus named low-rank adapters: y = x W0^T + b + scale * B(A(dropout(x)))."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.base_layer = None  # a 4-bit base (quant.Linear4bit), which multiplies by its own dequantised weight
        if isinstance(base, nn.Linear):
            self.register_parameter("weight", base.weight)  # (out, in): the same Parameter, frozen
            self.register_parameter("bias", base.bias)  # (out,) or None
        else:
            self.base_layer = base
        self.lora_A = nn.ModuleDict()  # name -> Linear(in -> r)
        self.lora_B = nn.ModuleDict()  # name -> Linear(r -> out)
        self.lora_dropout = nn.ModuleDict()
        self.scale: dict[str, float] = {}
        self.active: str | None = None
        self.merged = False  # True while the active adapter's B A is added into `weight`
        self.rows = None  # several adapters in one batch: (A, B, owner, index) while set (set_row_adapters)

    def add(self, name: str, r: int, scale: float, dropout: float, init: bool | str = True):
        # Kept in float32 even when the base is bf16: tiny updates to A and B would round away.
        device = (self.weight if self.base_layer is None else next(self.base_layer.buffers())).device
        kw = dict(bias=False, device=device, dtype=torch.float32)
        self.lora_A[name] = nn.Linear(self.in_features, r, **kw)
        self.lora_B[name] = nn.Linear(r, self.out_features, **kw)
        if init is not False:  # as peft's reset_lora_parameters
            if init == "gaussian":
                nn.init.normal_(self.lora_A[name].weight, std=1 / r)
            else:
                nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))  # (nn.Linear's own)
            nn.init.zeros_(self.lora_B[name].weight)
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scale[name] = scale

    def delta_weight(self, name: str) -> torch.Tensor:
        """scale * B @ A in float32: (out, r) @ (r, in) -> (out, in)."""
        return self.scale[name] * (self.lora_B[name].weight @ self.lora_A[name].weight)

    def forward(self, x):
        out = F.linear(x, self.weight, self.bias) if self.base_layer is None else self.base_layer(x)
        if self.rows is not None:
            return out + self.per_row(x)
        name = self.active
        if name is None or self.merged or name not in self.lora_A:
            return out
        # A and B are float32 parameters, but their matmuls run in x's dtype (bf16 on a GPU), as
        # peft's do under torch.autocast, which the HF Trainer (and so ms-swift) trains bf16 with.
        # A float32 path would make float32 copies of x and of the (tokens x out_features) result:
        # 148 MiB each for gate, up and down at 2,048 tokens on the 7B shape, in forward and backward.
        # The scale goes into B (out x r), not onto the output: scaling the output would keep a
        # second (tokens x out_features) gradient alive in backward, the scaled one.
        a = self.lora_A[name].weight.to(x.dtype)  # (r, in)
        b = (self.lora_B[name].weight * self.scale[name]).to(x.dtype)  # (out, r)
        return out + F.linear(F.linear(self.lora_dropout[name](x), a), b)

    def per_row(self, x):
        """Row b of x (B, T, in) through its own adapter, index[b] (0: none), all in one batch: x through
        every loaded adapter's A at once (n x r columns), the other adapters' columns zeroed row by row,
        then through every B at once. A zeroed column adds exact zeros, so each row gets its own
        x A^T B^T. It costs n adapters' small matmuls and gathers or copies nothing per row (gathering
        each row's A and B would read ~5 GB a decode step at 128 rows of the 7B shape)."""
        A, B, owner, index = self.rows  # (n r, in), (out, n r) scale included, (n r,): column -> adapter, (B,)
        other = (owner[None, :] != index[:, None])[:, None, :]  # (B, 1, n r): another adapter's columns
        return F.linear(F.linear(x, A.to(x.dtype)).masked_fill(other, 0), B.to(x.dtype))  # (B, T, out)

    def stacked(self, names: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A (n r, in) and scale * B (out, n r) of the adapters `names` side by side, r the largest
        rank, and which adapter (1 .. n) each of the n r columns belongs to; a smaller rank, or an
        adapter that does not wrap this layer, is padded with zeros."""
        r = max([self.lora_A[n].out_features for n in names if n in self.lora_A] + [1])
        device = next(iter(self.lora_A.values())).weight.device
        A = torch.zeros(len(names) * r, self.in_features, device=device)
        B = torch.zeros(self.out_features, len(names) * r, device=device)
        for i, n in enumerate(names):
            if n in self.lora_A:
                k = self.lora_A[n].out_features
                A[i * r:i * r + k], B[:, i * r:i * r + k] = self.lora_A[n].weight, self.lora_B[n].weight * self.scale[n]
        owner = torch.arange(1, len(names) + 1, device=device).repeat_interleave(r)
        return A, B, owner

    @torch.no_grad()
    def merge(self):
        if self.merged or self.active not in self.lora_A:
            return
        if self.base_layer is not None:
            raise LoraError("the base model is in 4 bits (--quant_bits 4): W0 + (alpha/r) B A rounded back to 4 bits "
                            "would be another model. Merge into the bf16 base instead (merge.py), or run unmerged.")
        w = self.weight
        w.copy_((w.float() + self.delta_weight(self.active)).to(w.dtype))  # W0 += (alpha/r) B A
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if not self.merged:
            return
        w = self.weight
        w.copy_((w.float() - self.delta_weight(self.active)).to(w.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        ranks = {n: a.out_features for n, a in self.lora_A.items()}
        return f"in={self.in_features}, out={self.out_features}, ranks={ranks}, active={self.active!r}, merged={self.merged}"


# ----------------------------------------------------------------------------------------------
# Adding, choosing and merging adapters


def is_linear(m: nn.Module) -> bool:
    """A layer that computes x W^T (+ b): nn.Linear, a LoRALinear, or a 4-bit base (quant.Linear4bit,
    which keeps no weight matrix): what has in_features and out_features."""
    return hasattr(m, "in_features") and hasattr(m, "out_features")


def _lora_layers(model) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def _linear_names(model) -> list[str]:
    """Module paths that can carry LoRA; a tied lm_head cannot (merging would change embeddings)."""
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    return [n for n, m in model.named_modules()
            if is_linear(m) and not (tied and n == "lm_head")
            and ".lora_A." not in n and ".lora_B." not in n  # not the adapters' own A and B
            and not n.endswith(".base_layer")]  # nor the 4-bit layer inside a LoRALinear


def _describe_linears(names: list[str]) -> str:
    kinds = ", ".join(dict.fromkeys(n.rsplit(".", 1)[-1] for n in names))
    return f"{kinds} (full paths such as {names[0]})" if names else "none"


def find_targets(model, target_modules) -> list[str]:
    """Module paths chosen by `target_modules`, in model order.

    "all-linear" is every projection of every layer (ALL_LINEAR); a name matches a module path equal to it or ending in
    "." + name (as in peft); a single string other than "all-linear" may also be a regex that
    matches the whole path (peft's rule for strings)."""
    names = _linear_names(model)
    keys = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    chosen, unmatched = set(), []
    for key in keys:
        if key == "all-linear":
            hits = {n for n in names if n.rsplit(".", 1)[-1] in ALL_LINEAR}
        else:
            try:
                regex = isinstance(target_modules, str) and re.compile(key)
            except re.error:
                regex = None
            hits = {n for n in names if n == key or n.endswith("." + key) or (regex and regex.fullmatch(n))}
        if not hits:
            unmatched.append(key)
        chosen |= hits
    if unmatched:
        raise LoraError(
            f"LoRA target module(s) {', '.join(map(repr, unmatched))} match no linear layer of the model. "
            f"Its linear layers are {_describe_linears(names)}. Use 'all-linear', some of these names, "
            "or full module paths."
        )
    return [n for n in names if n in chosen]


def add_adapter(model, cfg: LoraConfig, name: str = "default") -> list[str]:
    """Wrap the target layers with a fresh adapter `name`, make it active, and freeze everything else.

    Returns the wrapped module paths. Afterwards only this adapter's A and B require grad."""
    if name in adapter_names(model):
        raise LoraError(f"an adapter named {name!r} is already loaded; choose another name or delete_adapter() it first.")
    if not isinstance(cfg.r, int) or cfg.r < 1:
        raise LoraError(f"LoRA rank r={cfg.r!r} must be a positive integer (8 is the usual default).")
    if not 0 <= cfg.lora_dropout < 1:
        raise LoraError(f"lora_dropout={cfg.lora_dropout} must be in [0, 1).")
    if cfg.init_lora_weights not in INIT_WEIGHTS.values():
        raise LoraError(f"init_lora_weights={cfg.init_lora_weights!r}: only {', '.join(INIT_WEIGHTS)} are here.")
    targets = find_targets(model, cfg.target_modules)
    for p in model.parameters():
        p.requires_grad_(False)
    modules = dict(model.named_modules())
    for path in targets:
        layer = modules[path]
        if not isinstance(layer, LoRALinear):
            parent, _, child = path.rpartition(".")
            layer = LoRALinear(layer)
            setattr(modules[parent] if parent else model, child, layer)
        layer.add(name, cfg.r, cfg.scale, cfg.lora_dropout, cfg.init_lora_weights)
        layer.train(model.training)  # new modules start in training mode; follow the model (dropout)
    if not hasattr(model, "lora_configs"):
        model.lora_configs = {}
    model.lora_configs[name] = replace(cfg)
    set_active_adapter(model, name)
    return targets


def adapter_names(model) -> list[str]:
    return list(getattr(model, "lora_configs", {}))


def active_adapter(model) -> str | None:
    return next((layer.active for layer in _lora_layers(model).values()), None)


def set_active_adapter(model, name: str | None):
    """Run the model with adapter `name`, or with the plain base (None). A merged adapter is unmerged first."""
    if name is not None:
        _check_name(model, name)
    if name == active_adapter(model):
        return
    unmerge_lora(model)  # the weights must hold the plain base before another adapter is used
    for layer in _lora_layers(model).values():
        layer.active = name


def delete_adapter(model, name: str):
    """Remove adapter `name` (unmerging it first); the wrapped layers stay and act as the base."""
    _check_name(model, name)
    if active_adapter(model) == name:
        set_active_adapter(model, None)
    for layer in _lora_layers(model).values():
        if name in layer.lora_A:
            del layer.lora_A[name], layer.lora_B[name], layer.lora_dropout[name], layer.scale[name]
    del model.lora_configs[name]


def merge_lora(model):
    """Add the active adapter into the base weights in place. Merging twice is a no-op."""
    if active_adapter(model) is None:
        raise LoraError("no adapter is active, so there is nothing to merge: load or activate an adapter first.")
    for layer in _lora_layers(model).values():
        layer.merge()


def unmerge_lora(model):
    """Subtract the merged adapter again, in float32 (the base comes back within dtype rounding)."""
    for layer in _lora_layers(model).values():
        layer.unmerge()


@torch.no_grad()
def set_row_adapters(model, names: list[str | None] | None, dtype=torch.float32):
    """Several adapters in one batch (the S-LoRA / Punica idea): until called with None, row b of
    every forward uses adapter names[b] (None: the base), none of them merged and none swapped.
    use_row_index(model, index) then changes the rows' adapters without rebuilding anything.
    dtype: the stacks', the activations' (so that no step casts them again)."""
    layers = _lora_layers(model).values()
    if names is None:
        for layer in layers:
            layer.rows = None
        return None
    unmerge_lora(model)
    for n in names:
        if n is not None:
            _check_name(model, n)
    loaded = adapter_names(model)
    index = row_index(model, names).to(next(iter(next(iter(layers)).lora_A.values())).weight.device)
    for layer in layers:
        A, B, owner = layer.stacked(loaded)
        layer.rows = (A.to(dtype), B.to(dtype), owner, index)
    return index


def row_index(model, names: list[str | None]) -> torch.Tensor:
    """Each row's adapter as its place in set_row_adapters' stack: 0 for the base, i + 1 for the i-th loaded."""
    loaded = adapter_names(model)
    return torch.tensor([0 if n is None else loaded.index(n) + 1 for n in names])


def use_row_index(model, index: torch.Tensor):
    """Rows take the adapters `index` names (row_index), with the stacks set_row_adapters built."""
    for layer in _lora_layers(model).values():
        layer.rows = (*layer.rows[:3], index)


def _check_name(model, name):
    if name not in adapter_names(model):
        loaded = ", ".join(map(repr, adapter_names(model))) or "none"
        raise LoraError(f"no adapter named {name!r} is loaded (loaded: {loaded}). Load it with load_adapter() first.")


# ----------------------------------------------------------------------------------------------
# Parameters and state dicts


def lora_parameters(model, name: str = "default") -> list[nn.Parameter]:
    """The parameters to hand to the optimizer: A and B of adapter `name` in every wrapped layer."""
    _check_name(model, name)
    return [p for layer in _lora_layers(model).values() if name in layer.lora_A
            for p in (layer.lora_A[name].weight, layer.lora_B[name].weight)]


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total); model.parameters() yields a tied weight once, so it is counted once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def print_trainable_parameters(model):
    trainable, total = count_parameters(model)
    print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")


def lora_state_dict(model, name: str = "default") -> dict[str, torch.Tensor]:
    """Adapter `name`'s tensors under peft's keys (no adapter name in the key), sharing storage."""
    _check_name(model, name)
    sd = {}
    for path, layer in _lora_layers(model).items():
        if name in layer.lora_A:
            sd[f"{KEY_PREFIX}{path}.lora_A.weight"] = layer.lora_A[name].weight.detach()  # (r, in)
            sd[f"{KEY_PREFIX}{path}.lora_B.weight"] = layer.lora_B[name].weight.detach()  # (out, r)
    return sd


def load_lora_state_dict(model, sd: dict, name: str = "default", where: str = "the adapter state dict"):
    """Copy tensors saved by lora_state_dict (or peft) into adapter `name`; every key must match."""
    own = lora_state_dict(model, name)
    for k in own:
        if k in sd and tuple(sd[k].shape) != tuple(own[k].shape):
            raise LoraError(
                f"{where}: tensor {k} has shape {list(sd[k].shape)}, but this model needs "
                f"{list(own[k].shape)}. The adapter was trained on a different base model or with a "
                "different rank r: load it onto the model it was trained for (adapter_config.json's "
                "base_model_name_or_path) and check r in adapter_config.json."
            )
    missing, unexpected = sorted(own.keys() - sd.keys()), sorted(sd.keys() - own.keys())
    if missing or unexpected:
        raise LoraError(
            f"{where} does not match adapter {name!r}: "
            + "; ".join(p for p in (missing and f"missing tensors: {short_list(missing)}",
                                    unexpected and f"unexpected tensors: {short_list(unexpected)}") if p)
            + ". It was saved from an adapter with other target modules; add the adapter with the same targets."
        )
    was_merged = any(layer.merged for layer in _lora_layers(model).values())
    unmerge_lora(model)  # the merged delta must be the one of the old A and B
    with torch.no_grad():
        for k, t in own.items():
            t.copy_(sd[k])
    if was_merged:
        merge_lora(model)


# ----------------------------------------------------------------------------------------------
# Adapter folders: PEFT's layout, as ms-swift checkpoints hold it too


def _saved_targets(model, name) -> list[str]:
    """target_modules for adapter_config.json: suffixes like peft's when they say exactly what was wrapped."""
    paths = [p for p, layer in _lora_layers(model).items() if name in layer.lora_A]
    suffixes = sorted({p.rsplit(".", 1)[-1] for p in paths})
    if set(find_targets(model, suffixes)) == set(paths):
        return suffixes
    return sorted(paths)


def save_adapter(model, out_dir, name: str = "default", base_model_name_or_path: str = ""):
    """Write adapter_config.json + adapter_model.safetensors exactly as peft's save_pretrained does."""
    _check_name(model, name)
    cfg = model.lora_configs[name]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path or None,
        "r": cfg.r, "lora_alpha": cfg.lora_alpha, "lora_dropout": cfg.lora_dropout,
        "target_modules": _saved_targets(model, name), "use_rslora": cfg.use_rslora, "bias": "none",
        "fan_in_fan_out": False, "use_dora": False, "modules_to_save": None, "init_lora_weights": cfg.init_lora_weights,
        "inference_mode": True, "rank_pattern": {}, "alpha_pattern": {},
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    sd = {k: t.to("cpu", torch.float32).contiguous() for k, t in lora_state_dict(model, name).items()}
    save_safetensors(sd, out / "adapter_model.safetensors", metadata={"format": "pt"})


def read_adapter(path) -> tuple[LoraConfig, dict, str | None]:
    """Check and read an adapter folder: (its LoraConfig, its tensors, the base model it names)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_dir():
        what = "is a file" if path.exists() else "does not exist"
        raise LoraError(f"adapter folder {path} {what}. Pass the checkpoint folder that holds adapter_config.json "
                        "and adapter_model.safetensors (for example output/v0-.../checkpoint-100).")
    cfg_file, weights = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not cfg_file.exists():
        inside = sorted(p.parent.name for p in path.glob("*/adapter_config.json"))
        hint = f" It contains checkpoint folders ({short_list(inside)}): pass one of them." if inside else ""
        raise LoraError(f"{path} has no adapter_config.json, so it is not a LoRA checkpoint folder.{hint}")
    d = read_json(cfg_file, LoraError)
    if d.get("peft_type") != "LORA":
        raise LoraError(f"{cfg_file} has peft_type {d.get('peft_type')!r}; only LoRA adapters (peft_type \"LORA\") can be loaded.")
    unsupported = [k for k in ("use_dora", "rank_pattern", "alpha_pattern", "modules_to_save", "fan_in_fan_out", "lora_bias")
                   if d.get(k)] + (["bias"] if d.get("bias", "none") != "none" else [])
    if unsupported:
        raise LoraError(f"{cfg_file} sets {', '.join(unsupported)}, which this toolkit does not implement (plain "
                        "LoRA and rsLoRA only). Load this adapter with peft instead.")
    if not weights.exists():
        pickled = " It holds adapter_model.bin, a pickle file, which is not loaded for safety: re-save it with " \
                  "peft's save_pretrained(safe_serialization=True)." if (path / "adapter_model.bin").exists() else ""
        raise LoraError(f"{path} has adapter_config.json but no adapter_model.safetensors.{pickled}")
    check_adapter_config(cfg_file, d, LoraError)  # r, lora_alpha, ...: their types and sizes
    cfg = LoraConfig(r=int(d.get("r", 8)), lora_alpha=d.get("lora_alpha", 8), lora_dropout=d.get("lora_dropout", 0.0),
                     target_modules=d.get("target_modules") or "all-linear", use_rslora=bool(d.get("use_rslora")))
    try:
        tensors = load_file(weights)
    except SafetensorError as e:
        raise LoraError(f"{weights} is not a readable safetensors file ({str(e).splitlines()[0]}): it was cut short "
                        "or is damaged. Use another checkpoint, or save the adapter again.") from None
    ranks = sorted({t.shape[0] for k, t in tensors.items() if k.endswith("lora_A.weight") and t.dim() == 2})
    if ranks and ranks != [cfg.r]:  # before the adapter's layers are built at the rank the file says
        raise LoraError(f"{cfg_file} says r {cfg.r}, but {weights.name} holds LoRA weights of rank "
                        f"{short_list(ranks)}. The file was edited or belongs to another adapter: correct r.")
    return cfg, tensors, d.get("base_model_name_or_path")


def _same_model(a: str, b: str) -> bool:
    # "Qwen/Qwen2.5-7B-Instruct" and a local or ModelScope download of it ("Qwen2___5-7B-Instruct").
    def norm(s):
        return Path(str(s).rstrip("/\\")).name.lower().replace("___", ".")
    return str(a) == str(b) or norm(a) == norm(b)


def load_adapter(model, path, name: str = "default", base_model_name_or_path: str | None = None) -> LoraConfig:
    """Add adapter `name` from a peft / ms-swift checkpoint folder, load its weights, and make it active."""
    cfg, sd, saved_base = read_adapter(path)
    # One trained on Qwen3.5's vision-language model (ms-swift's, or peft's on Qwen3_5ForConditionalGeneration)
    # names the text model's layers as that checkpoint does: model.language_model.layers.N...
    sd = {k.replace(KEY_PREFIX + TEXT_PREFIX, KEY_PREFIX + "model.", 1): t for k, t in sd.items()}
    weights = Path(path) / "adapter_model.safetensors"
    targets, bad = {}, []
    for k in sd:
        m = re.fullmatch(re.escape(KEY_PREFIX) + r"(.+)\.lora_[AB]\.weight", k)
        if m:
            targets[m[1]] = True
        else:
            bad.append(k)
    if bad:
        raise LoraError(f"{weights} holds tensors that are not plain LoRA A/B weights ({short_list(bad)}); embedding "
                        "LoRA, DoRA and modules_to_save are not supported.")
    names = _linear_names(model)
    unknown = [t for t in targets if t not in names]
    if unknown:
        raise LoraError(f"{weights} has LoRA weights for {short_list(unknown)}, which match no linear layer of this model "
                        f"(its linear layers are {_describe_linears(names)}). The adapter belongs to a different "
                        "model: load it onto the base model it was trained for.")
    if base_model_name_or_path and saved_base and not _same_model(saved_base, base_model_name_or_path):
        print(f"warning: adapter {path} was trained on {saved_base!r} (adapter_config.json) but is loaded onto "
              f"{base_model_name_or_path!r}; its outputs are only right if these are the same model.", file=sys.stderr)
    previous = active_adapter(model)
    add_adapter(model, replace(cfg, target_modules=list(targets)), name)
    try:
        load_lora_state_dict(model, sd, name, where=str(weights))
    except LoraError:
        delete_adapter(model, name)
        set_active_adapter(model, previous)
        raise
    return cfg


def checkpoint_args(path) -> dict:
    """A checkpoint folder's args.json (ms-swift's or ours) with "model" and "system" filled in.

    "model" is args.json's model (older ms-swift: model_id_or_path), else adapter_config.json's
    base_model_name_or_path, else None; "system" is the training system prompt: None when none was
    given (the template's default), "" when training wrote no system turn (--system '')."""
    path = Path(path)
    if not path.is_dir():
        raise LoraError(f"checkpoint folder {path} {'is a file' if path.exists() else 'does not exist'}. Pass the "
                        "folder that holds adapter_config.json (for example output/v0-.../checkpoint-100).")
    args_file, adapter_file = path / "args.json", path / "adapter_config.json"
    if not args_file.exists() and not adapter_file.exists():
        raise LoraError(f"{path} has neither args.json nor adapter_config.json, so it is not a training checkpoint.")
    args = read_json(args_file, LoraError) if args_file.exists() else {}
    check_fields(args_file, args, ARGS_FIELDS, LoraError, "The file was edited or damaged: correct that field (the "
                 "run's own command line says what it was), or remove it to let the flags decide.")
    adapter = read_json(adapter_file, LoraError) if adapter_file.exists() else {}
    check_adapter_config(adapter_file, adapter, LoraError)
    out = dict(args)
    out["model"] = args.get("model") or args.get("model_id_or_path") or adapter.get("base_model_name_or_path") or None
    out["system"] = args.get("system")  # "" stays "": inference must also leave the system turn out
    return out
