"""quant.py: a 4-bit base model (QLoRA): each linear layer of the decoder held as packed 4-bit codes
and block scales, dequantised just in time for its matmul.

A first reading can skip this file: LoRA trains the same on a 4-bit base as on a bf16 one. QLoRA
(Dettmers et al., 2023) freezes the base in 4 bits, so a model takes about a quarter of its bf16
memory, and trains the float32 LoRA matrices A and B on top exactly as lora.py does. The weights
are stored as bitsandbytes' `quantize_4bit` (blocksize 64) stores them, bit for bit as its PyTorch
code computes them (`nearest` says where its CUDA kernels may round a borderline value otherwise):

    W (out, in), read row by row as one flat vector, cut into blocks of 64 values
    absmax_b = max |w| over block b                              one float32 per block
    code_i   = the entry of a 16-value table nearest to w_i / absmax_b   (4 bits)
    byte     = code_2k << 4 | code_2k+1                          two codes a byte, the first high
    w_i     ~= table[code_i] * absmax_b                          in float32, then cast (bf16)

NF4's table holds quantiles of a normal distribution scaled to [-1, 1] (weights are roughly
normal: each code is used about equally often); FP4's is a 4-bit float (sign, 2 exponent bits,
1 mantissa bit). Double quantisation stores the absmax values themselves in 8 bits: minus their
mean (the offset), in blocks of 256, each block scaled by its own absmax and rounded to the
nearest of the 256 values of bitsandbytes' "dynamic" 8-bit map. That takes a weight's storage
from 4 + 32/64 = 4.5 bits to 4 + 8/64 + 32/(64*256) = 4.127.

Where it goes:
- load_quantized reads the official bf16 safetensors one tensor at a time and quantises each on
  the device as it arrives: neither host nor GPU ever holds the whole bf16 model.
- Linear4bit replaces each projection of every decoder layer (all-linear's: a Qwen3.5 DeltaNet's
  in_proj_* and out_proj too; its conv1d, A_log and dt_bias stay); embeddings and lm_head stay in
  the compute dtype. A LoRALinear wraps a Linear4bit as it wraps an nn.Linear.
- The base is frozen, so its weight needs no gradient; backward only needs dX = dY W. So W is
  dequantised again in backward instead of being kept (DequantizedMatmul): autograd holds the
  packed codes, never a dequantised weight, with or without gradient checkpointing, and at most
  one weight matrix exists in bf16 at a time.
- A LoRA adapter trained on this base is an ordinary PEFT adapter: it loads on the bf16 base
  (infer.py, merge.py, peft). Merging into 4-bit weights is refused (lora.LoRALinear.merge):
  rounding W0 + BA back to 4 bits would change the model; merge.py merges into the bf16 base.

Speed: `dequantize` is the plain path (several PyTorch kernels and float32 temporaries);
`dequantize_fast` chooses, in one place, the same function compiled into one kernel on a GPU.
Proved equal by tests/test_quant.py::test_compiled_dequantize_equals_the_plain_one (GPU).
"""

from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import lora
import model as modeling
from model import ModelError

BLOCKSIZE = 64  # weights per absmax, bitsandbytes' default for 4-bit
NESTED_BLOCKSIZE = 256  # absmax values per nested scale under double quantisation
QUANT_TYPES = ("nf4", "fp4")

# NF4, code 0..15 (bitsandbytes' get_4bit_type("nf4"); QLoRA, appendix E): sorted, with an exact 0.
NF4 = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
       0.7229568362236023, 1.0)
# FP4 magnitudes of codes 0..7 (bit patterns 000..111) before scaling to [-1, 1] by the largest,
# 12; codes 8..15 are the same with the sign bit set.
FP4_MAGNITUDES = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0)


@dataclass(frozen=True)
class QuantConfig:
    """How the base is quantised: ms-swift's --bnb_4bit_quant_type and --bnb_4bit_use_double_quant,
    with its defaults."""

    quant_type: str = "nf4"
    double_quant: bool = True


def settings(a) -> QuantConfig | None:
    """The QuantConfig that a script's flags ask for; None without --quant_bits."""
    return QuantConfig(a.bnb_4bit_quant_type, a.bnb_4bit_use_double_quant) if a.quant_bits else None


def flag_problem(a, dtype: torch.dtype) -> str | None:
    """What is wrong with the --quant_* / --bnb_4bit_* flags (a script raises it as a UsageError)."""
    if a.quant_method and not a.quant_bits:
        return f"--quant_method {a.quant_method} needs --quant_bits 4 (as in ms-swift); or drop it for a bf16 base."
    compute = a.bnb_4bit_compute_dtype
    if a.quant_bits and compute and compute.removeprefix("torch.") != str(dtype).removeprefix("torch."):
        return (f"--bnb_4bit_compute_dtype {compute}: here the 4-bit weights are dequantised to the model's dtype, "
                f"{str(dtype).removeprefix('torch.')}; set --torch_dtype {compute} instead.")
    return None


# ----------------------------------------------------------------------------------------------
# The code tables


def code_table(quant_type: str, device=None) -> torch.Tensor:
    """The value of each 4-bit code (16,) float32, as bitsandbytes computes it."""
    if quant_type == "nf4":
        return torch.tensor(NF4, dtype=torch.float32, device=device)
    magnitudes = torch.tensor(FP4_MAGNITUDES, dtype=torch.float32, device=device)
    return torch.cat([magnitudes, -magnitudes]) / 12.0


def dynamic_map(device=None) -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (create_dynamic_map()): 256 sorted values in [-1, 1].

    For each exponent e = 0..6, 2**e values spread evenly over [0.1, 1) times 10**(e - 6), with
    both signs (127 a side), then 0 and 1: fine steps near zero, coarse ones near 1, like a float."""
    values = [0.0, 1.0]
    for e in range(7):
        bounds = torch.linspace(0.1, 1, 2**e + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0  # (2**e,) the midpoints of the steps
        values += ((10 ** (e - 6)) * means).tolist() + ((-(10 ** (e - 6))) * means).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32, device=device)


def nearest(x, sorted_values) -> torch.Tensor:
    """Index of the nearest of `sorted_values` to each x (int32): the midpoints between neighbours
    in float32, a value on one going to the lower neighbour, as bitsandbytes' PyTorch code rounds.
    (Its CUDA kernels compare with decimal constants a few float32 steps from these midpoints, and
    give FP4's zero the sign of x: a value that close to a midpoint can get the other, equally
    near, code there. Its CPU kernel for 8 bits rounds through a table of 65,536 steps.)"""
    midpoints = (sorted_values[:-1] + sorted_values[1:]) / 2
    return torch.bucketize(x, midpoints, out_int32=True)


# ----------------------------------------------------------------------------------------------
# Quantising


def scale_blocks(x, blocksize: int):
    """x flat, a multiple of blocksize long -> (x / each block's absmax: (blocks, blocksize) in
    [-1, 1], the absmax of each block (blocks,)), in float32."""
    blocks = x.float().view(-1, blocksize)  # (blocks, blocksize)
    absmax = blocks.abs().amax(dim=1)  # (blocks,)
    # Times the reciprocal, not divided: bitsandbytes does so, and the two can round differently.
    scaled = blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]
    return scaled.clamp(-1, 1), absmax


def encode_4bit(scaled, quant_type: str) -> torch.Tensor:
    """Values in [-1, 1] -> the codes of the nearest table values (uint8, one a value)."""
    table = code_table(quant_type, scaled.device)
    order = torch.argsort(table, stable=True)  # codes in order of value (FP4's are not; NF4's are)
    return order[nearest(scaled, table[order])].to(torch.uint8)


def quantize_8bit(x, blocksize: int = NESTED_BLOCKSIZE):
    """bitsandbytes' quantize_blockwise with the dynamic map: x (n,) -> (codes uint8 (n,), absmax
    float32 (ceil(n / blocksize),)). A last, shorter block is padded with zeros, which change
    neither its absmax nor its other codes."""
    n = x.numel()
    padded = F.pad(x.float(), (0, -n % blocksize))
    scaled, absmax = scale_blocks(padded, blocksize)
    codes = nearest(scaled.flatten(), dynamic_map(x.device)).to(torch.uint8)
    return codes[:n], absmax


def quantize(w, quant_type: str = "nf4", double_quant: bool = True) -> dict:
    """A weight (any shape, size a multiple of 64) -> the tensors that Linear4bit keeps:

    codes          uint8 (numel / 2,)  two 4-bit codes a byte, the first in the high nibble
    absmax         float32 (numel / 64,), or with double_quant uint8 codes of (absmax - offset)
    absmax_scale   float32 (ceil(numel / 64 / 256),)  double_quant: absmax of each block of 256
    absmax_offset  float32 ()                          double_quant: the mean of the absmax values

    Equal to bitsandbytes' quantize_4bit(w, blocksize=64, compress_statistics=double_quant) on
    the same device (tests/test_quant.py)."""
    scaled, absmax = scale_blocks(w.flatten(), BLOCKSIZE)
    codes = encode_4bit(scaled.flatten(), quant_type)  # (numel,)
    packed = {"codes": codes[0::2] << 4 | codes[1::2]}  # (numel / 2,)
    if not double_quant:
        return dict(packed, absmax=absmax)
    offset = absmax.mean()
    absmax_codes, absmax_scale = quantize_8bit(absmax - offset)
    return dict(packed, absmax=absmax_codes, absmax_scale=absmax_scale, absmax_offset=offset)


# ----------------------------------------------------------------------------------------------
# Dequantising. dequantize is the plain path; dequantize_fast picks the speed path.


def block_absmax(absmax, absmax_table=None, absmax_scale=None, absmax_offset=None):
    """The absmax of each block of 64 (float32): kept as it is, or with double quantisation
    dequantised from its 8-bit codes (absmax_table: dynamic_map()) as bitsandbytes does."""
    if absmax_table is None:
        return absmax
    nested = absmax_table[absmax.int()]  # (blocks,)
    padded = F.pad(nested, (0, -nested.numel() % NESTED_BLOCKSIZE)).view(-1, NESTED_BLOCKSIZE)
    return (padded * absmax_scale[:, None]).flatten()[:nested.numel()] + absmax_offset  # (blocks,)


def dequantize(shape, dtype, codes, table, *scales):
    """The weight back from quantize()'s tensors, as bitsandbytes' dequantize_4bit computes it:
    table value times block absmax in float32, then cast to `dtype`. table: code_table();
    scales: block_absmax()'s arguments."""
    absmax = block_absmax(*scales)  # (numel / 64,)
    pairs = torch.stack([codes >> 4, codes & 0xF], dim=-1)  # (numel / 2, 2): the first code is the high nibble
    values = table[pairs.flatten().int()]  # (numel,) in [-1, 1]
    return (values.view(-1, BLOCKSIZE) * absmax[:, None]).view(shape).to(dtype)


@cache
def compiled_dequantize():
    # One kernel per weight shape (a model has four or five): a kernel compiled for any shape
    # (dynamic=None's choice from the second shape on) ran at a fifth of the speed on an H200.
    return torch.compile(dequantize, dynamic=False)


def dequantize_fast(shape, dtype, codes, table, *scales):
    """dequantize, chosen here: on a GPU compiled into one kernel that reads the packed codes and
    writes the weight (the plain path makes int32 and float32 temporaries: some 10 bytes a weight
    moved instead of 2.5). The double-quantised scales (1/64 of the work) are dequantised first,
    outside it: compiled, their multiply and add could fuse into one rounding (an FMA) and so
    differ from bitsandbytes' in the last bit. Plain on the CPU, and inside code that is being
    compiled already (a compiled layer, speed.compiled_layers, fuses it into its own kernels)."""
    if codes.device.type != "cuda" or torch.compiler.is_compiling():
        return dequantize(shape, dtype, codes, table, *scales)
    return compiled_dequantize()(shape, dtype, codes, table, block_absmax(*scales))


class DequantizedMatmul(torch.autograd.Function):
    """y = x W^T + b, with W dequantised from the packed tensors in forward and again in backward.

    nn.Linear would keep W for backward (dX = dY W): a whole model of dequantised weights held
    until backward without checkpointing, and a layer's worth with it. Dequantising again costs a
    pass over 0.5 bytes a weight instead. W and b are frozen: no gradient for them."""

    @staticmethod
    def forward(ctx, x, bias, shape, dtype, *packed):
        ctx.shape, ctx.dtype = shape, dtype
        ctx.save_for_backward(*packed)
        return F.linear(x, dequantize_fast(shape, dtype, *packed), bias)

    @staticmethod
    def backward(ctx, grad_y):
        packed = ctx.saved_tensors  # read once: under checkpointing each read unpacks again
        w = dequantize_fast(ctx.shape, ctx.dtype, *packed)  # (out, in)
        return grad_y @ w, None, None, None, *(None for _ in packed)


# ----------------------------------------------------------------------------------------------
# The layer


class Linear4bit(nn.Module):
    """A frozen nn.Linear whose weight is kept as quantize()'s tensors (buffers) and dequantised
    to `dtype` for each matmul; the bias stays a `dtype` parameter. Made from an nn.Linear; one
    still on the meta device gets its weight later, from set_weight (load_quantized)."""

    def __init__(self, linear: nn.Linear, config: QuantConfig, dtype):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.config, self.dtype = config, dtype
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(dtype), requires_grad=False)
        self.names = ()  # the buffers that hold the weight, in dequantize()'s order
        if linear.weight.device.type != "meta":
            self.set_weight(linear.weight.detach())

    def set_weight(self, w):
        """Quantise w (out, in) on its device and keep only the result."""
        if w.numel() % BLOCKSIZE:
            raise ModelError(f"a {self.out_features} x {self.in_features} weight cannot be quantised in blocks of "
                             f"{BLOCKSIZE}: its size is not a multiple of {BLOCKSIZE}. Load this model without --quant_bits.")
        packed = quantize(w, self.config.quant_type, self.config.double_quant)
        packed["table"] = code_table(self.config.quant_type, w.device)
        if self.config.double_quant:
            packed["absmax_table"] = dynamic_map(w.device)
        self.names = tuple(k for k in ("codes", "table", "absmax", "absmax_table", "absmax_scale", "absmax_offset")
                           if k in packed)
        for name in self.names:
            self.register_buffer(name, packed[name])

    def packed(self) -> list:
        return [getattr(self, name) for name in self.names]

    def weight(self) -> torch.Tensor:
        """The dequantised weight (out, in), as the bf16 model built from it would hold it."""
        return dequantize((self.out_features, self.in_features), self.dtype, *self.packed())

    def forward(self, x):
        return DequantizedMatmul.apply(x, self.bias, (self.out_features, self.in_features), self.dtype, *self.packed())

    def extra_repr(self) -> str:
        double = ", double quantised" if self.config.double_quant else ""
        return f"in={self.in_features}, out={self.out_features}, {self.config.quant_type}{double}, dtype={self.dtype}"


def quantize_decoder(model, config: QuantConfig, dtype):
    """Replace every linear layer that LoRA's all-linear targets (lora.find_targets: the seven
    projections of each layer, and a Qwen3.5 DeltaNet layer's five) by a Linear4bit, quantising its
    weight now unless it is on the meta device."""
    for path in lora.find_targets(model, "all-linear"):
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent), name, Linear4bit(model.get_submodule(path), config, dtype))


# ----------------------------------------------------------------------------------------------
# Loading: quantised tensor by tensor as the shards are read


def place(model, name: str, tensor, dtype):
    """Put one checkpoint tensor into a model from quantize_decoder: a 4-bit layer's weight is
    quantised on the tensor's device, anything else becomes a frozen `dtype` parameter."""
    path, _, leaf = name.rpartition(".")
    module = model.get_submodule(path)
    if isinstance(module, Linear4bit) and leaf == "weight":
        module.set_weight(tensor)
    else:
        setattr(module, leaf, nn.Parameter(tensor.to(dtype), requires_grad=False))


def load_quantized(name_or_path: str, config: QuantConfig, dtype=torch.bfloat16, device="cpu"):
    """model.load_model with the decoder's linear layers in 4 bits. Returns (model, model_dir).

    Each tensor is read from its shard straight onto `device` and, if it is a decoder weight,
    quantised there before the next is read: the bf16 model never exists whole, in host or GPU
    memory (a 32B model loads where its 64 GB of bf16 weights would not fit)."""
    from safetensors import safe_open

    model_dir = modeling.resolve_model_dir(name_or_path)
    cfg = modeling.Config.from_json(Path(model_dir) / "config.json")
    with torch.device("meta"):
        model = modeling.QwenForCausalLM(cfg)
    files, expected = modeling.check_weights(model, model_dir)  # by the checkpoint's names, before the swap
    quantize_decoder(model, config, dtype)
    for f in files:
        with safe_open(f, framework="pt", device=str(device)) as sf:
            for name in sf.keys():
                if modeling.text_name(name, cfg) in expected:  # Qwen3.5's VL layout: the text model's name
                    place(model, modeling.text_name(name, cfg), sf.get_tensor(name), dtype)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval(), model_dir


def dequantized_state_dict(model) -> dict:
    """The model's base weights under the checkpoint's names, each 4-bit weight dequantised: what
    the bf16 (or float32) model built from the 4-bit one holds. LoRA's A and B are left out."""
    sd = {k: v for k, v in model.state_dict().items() if ".lora_" not in k}
    for path, module in model.named_modules():
        if isinstance(module, Linear4bit):
            for name in module.names:
                del sd[f"{path}.{name}"]
            sd[f"{path.removesuffix('.base_layer')}.weight"] = module.weight()
            if module.bias is not None:
                sd[f"{path.removesuffix('.base_layer')}.bias"] = sd.pop(f"{path}.bias")
    return sd
