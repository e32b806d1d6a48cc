"""speed.py: everything that exists only to be faster, and gives the plain path's results.

A first reading can skip this file. train.py and infer.py are written the plain way: one
micro-batch is `micro_batch(loss_fn, batch, scale)` (forward, loss, backward), one decode step is
`decode.Decoder.decode_one`. Each piece here replaces one of them from outside, names the plain
function it replaces and the test that proves they agree, and is chosen in one place:

    plan_training   how the decoder layers run in training (CUDA-graph micro-batches of fused
                    layers, compiled layers, or eager; for long rows each layer's checkpointed input
                    kept in host memory and the layer run in tiles: tiles.py), how packed rows
                    attend (VarlenAttention on a GPU) and keep apart in Qwen3.5's DeltaNet layers
                    (packed_deltanet.py, for compiled or recorded layers) and where the input
                    embedding lives (HostEmbedding), printed at start-up with the reason
    plan_decoding   how a token is decoded (a CUDA graph replay, or eager)

Why: a micro-batch of short rows launches thousands of small kernels one by one from Python,
and the GPU waits for them; replayed as one CUDA graph, it does not. What each path gains is
measured by bench.py and recorded in BENCHMARKS.md (and docs/performance.md), not here.
"""

import contextlib
import functools
import inspect
import os
import warnings
import weakref
from dataclasses import dataclass, fields
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

import cli
import decode
import deltanet
import model as modeling
import packed_deltanet
import tiles
from model import ModelError
from util import round_up

# ----------------------------------------------------------------------------------------------
# How training runs


def fast_float32_matmul(device):
    """On GPUs, let float32 matmuls (a --torch_dtype float32 run) use TF32 tensor cores (10-bit
    mantissa); plain float32 runs them on the slow CUDA cores. bf16 runs do not use it."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True


# The first micro-batch of a new sequence length waits minutes while the layer compiles; each
# one after it is several times faster than eager. Measured on the 7B shape (docs/benchmark-runs.md,
# run 14), compiling pays back after some 500 micro-batches of a length, so a short run such as
# the self-cognition demo stays eager.
COMPILE_PAYS_BACK = 500  # micro-batches per compiled sequence length


@dataclass
class TrainingPlan:
    """How the decoder layers run in training. At most one of:

    graphs    each micro-batch shape's forward, loss and backward recorded once as a CUDA graph
              and replayed (CUDAGraphMicroBatches): the default on a GPU
    compiled  each decoder layer compiled with torch.compile (compiled_layers); with
              layer_graphs, its forward and backward replayed as CUDA graphs
    neither   eager layers, exactly the plain path

    Recorded or compiled code has fixed shapes, so batches are then padded to a multiple of
    `pad_to` tokens: a few lengths, each recorded or compiled once.

    packed_mask: how rows packed into one sequence (train.step_passes) are kept apart, for
    model.attention_inputs: None for model.block_mask (a T x T mask for SDPA), or VarlenAttention.

    offload: each layer's checkpointed input waits in host memory from its forward to its backward
    (offloaded_layers, around whichever layers run); never with graphs, whose tensors cannot move.

    host_embedding: the input embedding table lives in pinned host memory (HostEmbedding), and
    batches carry their rows of it (train.make_batch's embed): the GPU keeps 1 GiB less on the 7B.

    packed_deltanet: Qwen3.5's DeltaNet layers keep a packed row's samples apart by masks on the
    batch's own (B, T) shape (packed_deltanet.mix, set as each one's packed_mix) instead of a row per
    sample, whose shapes come from the data: with graphs or compiled layers, which replay fixed shapes."""

    graphs: bool = False
    compiled: bool = False
    layer_graphs: bool = False
    pad_to: int = 1
    message: str = ""  # what was chosen and why, for the start-up log
    packed_mask: object = None
    fused: bool = False  # eager layers as FusedLayer: fewer kernels (the default on a GPU)
    offload: bool = False
    host_embedding: bool = False
    packed_deltanet: bool = False

    def training_layers(self, model):
        """The layers for CausalLMLoss: compiled ones, fused ones, or None for the model's own;
        offloaded ones around whichever with offload, rows longer than the MLP's chunk then run in
        tiles (the model's own layers as tiles.SplitLayer; and the model's final norm is replaced
        by tiles.TiledNorm here, the same weight). With packed_deltanet, the model's DeltaNet layers
        mix packed rows in fixed shapes from here on (evaluation too: the same results)."""
        if self.packed_deltanet:
            for layer in model.model.layers:
                if hasattr(layer, "linear_attn"):
                    layer.linear_attn.packed_mix = packed_deltanet.mix
        if self.compiled:
            layers = compiled_layers(model, self.layer_graphs)
        else:
            layers = fused_layers(model, split_long_rows=self.offload) if self.fused else None
        if not self.offload:
            return layers
        tiles.tile_final_norm(model)
        return offloaded_layers(layers or tiles.split_layers(model))

    def embedding(self, model):
        """With host_embedding, model's input embedding moved to host memory (a HostEmbedding,
        which is also train.make_batch's embed); else None."""
        if not self.host_embedding:
            return None
        model.model.embed_tokens = HostEmbedding(model.model.embed_tokens.weight)
        return model.model.embed_tokens

    def prepare(self, device):
        """What this plan needs set before the model loads: TF32 for float32 matmuls on GPUs, and
        with graphs a side stream for everything (the default stream cannot be recorded, and
        autograd must not reach back to it). Weights loaded on the stream that records and
        replays the graphs replay faster than weights from another stream: 37.2 against 40.6 ms
        a 128-token micro-batch of the 7B shape on an H200."""
        fast_float32_matmul(device)
        if self.graphs:
            torch.cuda.set_stream(torch.cuda.Stream(device))
            # On this stream autograd's worker thread finds no CUDA context the first time it
            # calls cuBLAS, says so, and sets it itself: nothing for a user to act on.
            warnings.filterwarnings("ignore", message="Attempting to run cuBLAS, but there was no current CUDA context")

    def micro_batch_fn(self, loss_fn, params, plain):
        """The function the loop calls for each micro-batch: (batch, scale) -> loss. `plain` is
        train.micro_batch; with graphs, CUDAGraphMicroBatches does what it does, replayed."""
        return CUDAGraphMicroBatches(loss_fn, params) if self.graphs else partial(plain, loss_fn)


@dataclass(frozen=True)
class PlanFlags:
    """The flags of train.py that the plan reads, with train.py's defaults (built from its parsed
    flags by PlanFlags.of, once)."""

    max_length: int = 2048
    max_tokens_per_pass: int | None = None  # None: --max_length (flags.set_derived_defaults)
    padding_free: bool = False
    packing: bool = False
    per_device_train_batch_size: int = 1
    gradient_checkpointing: bool = True
    torch_dtype: str | None = None
    cuda_graph: bool | None = None
    torch_compile: bool | None = None
    activation_cpu_offload: bool | None = None
    fsdp: bool = False
    quant_bits: int | None = None
    lora_rank: int = 8

    @classmethod
    def of(cls, a) -> "PlanFlags":
        return cls(**{f.name: getattr(a, f.name) for f in fields(cls)})


def plan_training(a: PlanFlags, device, row_lengths: list[int], micro_batches: int, config=None) -> TrainingPlan:
    """Choose how the layers run from the flags (--cuda_graph, --torch_compile,
    --activation_cpu_offload), the device, the run's length and the model's shape (config, a
    model.Config), and how packed rows attend (packed_attention). Batches of recorded or compiled
    layers are padded to at most 32 lengths (64 tokens apart for --max_length 2048). A Qwen3.5
    model's layers are recorded or compiled with packed_deltanet.py's fixed-shape DeltaNet, never
    fused or offloaded (deltanet_layers)."""
    packed_mask, how = packed_attention(a, device)
    eager = eager_only(a, device, config)
    if eager:
        return TrainingPlan(message="\n".join(m for m in (eager, how) if m), packed_mask=packed_mask)
    linear = config is not None and "linear_attention" in config.mixers  # Qwen3.5's DeltaNet layers
    offload, offloading = use_offload(a, device, config, row_lengths) if not linear else (False, "")
    pad = max(64, -(-a.max_length // 32))
    if a.padding_free:  # a step's rows packed: any length up to the budget, or a longer row alone
        row_lengths = range(pad, max(a.max_tokens_per_pass, max(row_lengths)) + 1, pad)
    lengths = sorted({round_up(n, pad) for n in row_lengths})
    compiled, why = use_compile(a, device, micro_batches, len(lengths))
    asked = a.cuda_graph is True if linear else a.cuda_graph is not False  # Qwen3.5: when asked (deltanet_layers)
    graphs = device.type == "cuda" and not compiled and asked and not offload
    layer_graphs = compiled and device.type == "cuda" and a.cuda_graph is not False and not offload
    fused = device.type == "cuda" and not compiled and not a.quant_bits and not linear  # 4 bits: no matrices to fuse
    shown = ", ".join(map(str, lengths[:8])) + (", ..." if len(lengths) > 8 else "")
    padding = f"batches are padded to multiples of {pad} tokens, here at most {len(lengths)} lengths ({shown})"
    if graphs:
        message = (f"CUDA graphs{' of fused layers' if fused else ''}: each micro-batch shape runs eagerly once and is "
                   f"then replayed as one recorded graph; {padding}; --cuda_graph false runs every one eagerly")
    elif compiled:
        message = (f"compiled layers{' replayed as CUDA graphs' if layer_graphs else ''}: {padding}; "
                   f"each is compiled the first time it comes, so early steps are slow{why}")
    else:
        unfused = " (a 4-bit base has no matrices to fuse)" if a.quant_bits and offload else ""
        message = f"eager{' fused' if fused else ''} layers{unfused}{why}" if why or fused or offload else ""
    host, hosting = use_host_embedding(device, config)
    longer = long_rows(a, device, config, pass_tokens(a, row_lengths)) if offload else ""
    deltanets = deltanet_layers(device, graphs or compiled, a.cuda_graph) if linear else ""
    message = "\n".join(m for m in (message, deltanets, offloading, longer, hosting, how) if m)
    return TrainingPlan(graphs, compiled, layer_graphs, pad if graphs or compiled else 1, message, packed_mask,
                        fused=fused, offload=offload, host_embedding=host, packed_deltanet=linear and (graphs or compiled))


def eager_only(a: PlanFlags, device, config) -> str:
    """Why the layers must run as they are written ('' where a faster path applies): under --fsdp
    each layer gathers its weights from all ranks as it runs, which neither a recorded CUDA graph
    nor a compiled layer can replay. (A Qwen3.5 DeltaNet layer's packed rows, unpacked by lengths
    known only from the data, no longer force eager layers: deltanet_layers.)"""
    if a.fsdp:  # train.py's --fsdp true: the model is split over the ranks (shard.py)
        return ("eager layers: under --fsdp each layer gathers its weights from all ranks as it runs, which a "
                "recorded CUDA graph or a compiled layer cannot replay")
    return ""


def deltanet_layers(device, fixed_shapes: bool, cuda_graph) -> str:
    """What the start-up log says of a Qwen3.5 model's DeltaNet layers. With recorded or compiled
    layers (fixed_shapes), packed rows go through them as packed_deltanet.mix: the batch's own shape,
    samples kept apart by masks (the plain layer unpacks a row per sample, by lengths only the data
    knows). On a GPU, no layer is fused and no checkpoint offloaded: FusedLayer and the offloaded
    checkpoints' long-row tiles (tiles.py) are written for Qwen2 / Qwen3 layers. Recorded only when
    --cuda_graph true asks (cuda_graph None: not given): their graphs are proven on the CPU's
    stand-in, not yet on a card."""
    fixed = ("Qwen3.5's DeltaNet layers keep a packed row's samples apart by masks in the batch's own shape "
             "(packed_deltanet.py) instead of a row per sample, so that they are recorded or compiled like the "
             "attention layers") if fixed_shapes else ""
    gpu = ("Qwen3.5's layers run unfused and keep their checkpointed inputs on the GPU (fused layers and the offloaded "
           "checkpoints' long-row tiles are written for Qwen2 / Qwen3 layers)") if device.type == "cuda" else ""
    unproven = ("Qwen3.5's layers run eagerly unless --cuda_graph true or --torch_compile true asks: recorded or "
                "compiled, they are tested on the CPU but not yet on a card") if device.type == "cuda" and not (
                    fixed_shapes or cuda_graph is False) else ""
    return "\n".join(m for m in (fixed, gpu, unproven) if m)


def use_host_embedding(device, config) -> tuple[bool, str]:
    """Whether to keep the input embedding in host memory, and what to print. On a GPU, for a model
    whose lm_head is a matrix of its own: a tied one (Qwen2.5 0.5B to 3B) is lm_head too, which
    the loss multiplies on the GPU. Not under --fsdp (plan_training returns before this)."""
    if device.type != "cuda" or config is None or config.tie_word_embeddings:
        return False, ""
    gib = config.vocab_size * config.hidden_size * 2 / 2**30
    return True, (f"the input embedding ({config.vocab_size:,} x {config.hidden_size:,}, {gib:.2f} GiB in bf16) stays "
                  "in host memory: each batch looks its rows up there and brings them along")


# ----------------------------------------------------------------------------------------------
# The input embedding in host memory. Replaces: model.QwenModel.embed_tokens's lookup on the GPU.
# Proved equal by: tests/test_train.py::test_host_embedding_trains_like_the_embedding_on_the_gpu


class HostEmbedding(nn.Module):
    """nn.Embedding whose table is in pinned host memory. The embedding does not train (LoRA
    adapts linear layers only) and a step reads a few thousand of its 152,064 rows, so the GPU need
    not hold it: train.make_batch calls it with a batch's ids on the CPU, where they are made, and
    gets the rows there, so the copy to the GPU is (T, hidden) instead of T ids (14 MB at 2,048
    tokens of the 7B). Called with ids on the GPU (evaluation, sample answers), it copies them to the
    host first, which makes the CPU wait for the GPU: fine there, not in a training step."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.pinned = torch.cuda.is_available()  # pinned memory needs CUDA; the CPU tests run without
        host = weight.detach().cpu()
        self.weight = nn.Parameter(host.pin_memory() if self.pinned else host, requires_grad=False)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids on the CPU (B, T) -> their rows (B, T, hidden), in pinned host memory."""
        out = torch.empty((*ids.shape, self.weight.shape[1]), dtype=self.weight.dtype, pin_memory=self.pinned)
        torch.index_select(self.weight, 0, ids.flatten(), out=out.view(-1, self.weight.shape[1]))
        return out

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # ids on the CPU: lookup's rows as they are
        return self.lookup(ids.cpu()).to(ids.device, non_blocking=True)


def varlen_available(device, dtype) -> bool:
    """Whether rows packed into one sequence can attend through varlen_attn (flash attention, told
    where each row starts): on a GPU, in bfloat16 or float16, with torch >= 2.9. Elsewhere packed
    rows need SDPA with a T x T block mask, which on the CPU is slower than padded micro-batches
    (the README demo, timed in issue 29): so --padding_free is on by default only where this holds."""
    return device.type == "cuda" and dtype in (torch.bfloat16, torch.float16) and find_varlen() is not None


def packed_attention(a: PlanFlags, device) -> tuple[object, str]:
    """How packed rows attend (TrainingPlan.packed_mask) and what to print about it. On a GPU in
    bfloat16 or float16 (flash attention's dtypes): VarlenAttention. Elsewhere the plain path,
    SDPA with a block mask: all there is on the CPU. On the CPU the plan says why it does not pack
    a step's rows by default: through a T x T mask it is slower than micro-batches as they are."""
    if device.type != "cuda" and not a.padding_free:
        return None, ("each micro-batch runs as it is: packing a step's rows (--padding_free true) would attend through "
                      "a T x T mask here, slower on the CPU than padded micro-batches")
    if device.type != "cuda" or not (a.padding_free or a.packing):
        return None, ""
    packing = (f"each optimizer step's rows run packed into sequences of at most {a.max_tokens_per_pass} tokens, "
               "the step's gradient unchanged (--padding_free false: one micro-batch at a time)"
               if a.padding_free else "--packing true rows")
    if varlen_available(device, cli.pick_dtype(a.torch_dtype, device)):
        return VarlenAttention, f"{packing}; rows attend through torch's varlen_attn (no T x T mask)"
    need = "bfloat16 or float16" + ("" if find_varlen() is not None else " and torch >= 2.9")
    return None, f"{packing}; rows attend through SDPA with a T x T block mask (varlen_attn needs {need})"


def use_compile(a: PlanFlags, device, micro_batches: int, n_lengths: int) -> tuple[bool, str]:
    """Whether to compile the layers and the reason to print ('' if --torch_compile was given).

    Not by default where whole micro-batches replay as CUDA graphs (on a GPU, unless --cuda_graph
    false): that is as fast at short sequences and close at 2,048 tokens (BENCHMARKS.md), and
    costs a second a length instead of minutes. With --cuda_graph false on a GPU,
    only for a run long enough to pay back compiling each length."""
    if a.torch_compile is not None:
        return a.torch_compile, ""
    if device.type != "cuda":
        return False, ""
    if a.cuda_graph is not False:
        return False, ""
    per_length = micro_batches // max(n_lengths, 1)
    if per_length >= COMPILE_PAYS_BACK:
        return True, (f" (chosen because this run has {micro_batches} micro-batches over {n_lengths} lengths, "
                      f"{per_length} a length; --torch_compile false for eager layers)")
    return False, (f": this run has {micro_batches} micro-batches over {n_lengths} sequence lengths, {per_length} a "
                   f"length, and compiling (a minute or two a length) pays back only from about {COMPILE_PAYS_BACK} "
                   "a length; --torch_compile true compiles anyway")


# ----------------------------------------------------------------------------------------------
# Compiled layers. Replaces: model.QwenModel's own layers in training steps.
# Proved equal by: tests/test_train.py::test_compiled_layers_train_padded_batches_like_the_eager_ones
# (Qwen3.5's, with packed_deltanet.py: tests/test_packed_deltanet.py::test_the_plan_compiles_qwen3_5_layers_with_the_fixed_shape_mix)


def compiled_layers(model, cuda_graphs: bool = False) -> list:
    """Each decoder layer compiled with torch.compile, as callables for QwenModel(layers=...).

    A compiled layer fuses the norms, RoPE, SiLU and LoRA's element-wise work into a few kernels.
    With cuda_graphs, each layer is compiled together with its checkpointing (one forward, and one
    backward that recomputes it) and both are recorded as CUDA graphs and replayed (torch.compile's
    "reduce-overhead" mode). Without graphs, the compiled layer is checkpointed from outside (its
    compiled forward runs again in backward), which needs less memory and runs a little slower
    (docs/benchmark-runs.md, run 10).

    Shapes are static (LoRA dropout inside a checkpointed layer does not compile with dynamic
    shapes on CUDA): each sequence length gets its own compiled code. The model keeps its eager
    layers for everything without gradients (evaluation, decoding); parameter names do not change.
    """
    if model.lm_head.weight.device.type == "cpu" and torch.cuda.is_available():
        # torch.compile starts CUDA when it sees a GPU, even for a CPU model, and an activation
        # checkpoint refuses a device first started inside its forward: start it now.
        torch.cuda.init()
    # One compiled version per sequence length: allow more than the default 8.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    mode = "reduce-overhead" if cuda_graphs else None
    return [CompiledLayer(torch.compile(layer, mode=mode, dynamic=False), checkpoint_inside=cuda_graphs)
            for layer in model.model.layers]


class CompiledLayer:
    """A compiled decoder layer, called like the layer itself."""

    def __init__(self, compiled, checkpoint_inside: bool):
        self.compiled, self.checkpoint_inside = compiled, checkpoint_inside

    def __call__(self, h, cos, sin, mask, is_causal, cache, i, checkpoint=False, segments=None):
        if not h.requires_grad:
            # The embeddings are frozen, so the first layer's input would not require grad while
            # every later layer's does: torch.compile would compile each length twice. One version
            # for all layers costs the first layer the gradient of its input, a few matmuls that
            # nothing uses (peft does the same under checkpointing: enable_input_require_grads).
            h.requires_grad_()
        if checkpoint and not self.checkpoint_inside:
            return torch.utils.checkpoint.checkpoint(self.compiled, h, cos, sin, mask, is_causal, cache, i,
                                                     segments=segments, use_reentrant=False)
        return self.compiled(h, cos, sin, mask, is_causal, cache, i, checkpoint=checkpoint, segments=segments)


# ----------------------------------------------------------------------------------------------
# Fused training layers. Replaces: model.DecoderLayer._forward in training steps.
# Proved equal by: tests/test_fused.py::test_fused_layers_give_the_plain_gradients


class LoRAProjection(torch.autograd.Function):
    """out = residual + x W^T + bias + sum over adapters i of s_i * dropout_i(x) A_i^T B_i^T, each
    adapter i adding into its own block of columns of out (q, k and v share one fused W).

    What autograd would do with lora.LoRALinear, written out so that nothing is done twice: the
    LoRA products and the residual are added inside the matmuls (cuBLAS's C += A B), instead of
    separate add kernels over the (tokens x out) output, each gradient that reaches x is added into
    one buffer the same way, and dropout's backward is fused into that addition. The base weight
    is frozen: its gradient is never computed. x (N, in), W (out, in), residual (N, out) or None;
    adapters: (start, stop, scale, p) per adapter, with its A (r, in) and B (out_i, r) in `ab`."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, adapters, *ab):
        out = F.linear(x, weight, bias) if residual is None else torch.addmm(residual, x, weight.t())  # (N, out)
        saved = []
        for (start, stop, scale, p), a, b in zip(adapters, ab[0::2], ab[1::2]):
            xd, keep = torch.native_dropout(x, p, True) if p > 0 else (x, None)  # keep: (N, in) bool
            u = xd @ a.to(x.dtype).t()  # (N, r)
            out[:, start:stop].addmm_(u, b.to(x.dtype).t(), alpha=scale)
            saved += [xd, keep, u]
        ctx.adapters, ctx.has_residual = adapters, residual is not None
        ctx.save_for_backward(weight, *ab, *saved)
        return out

    @staticmethod
    def backward(ctx, grad):  # grad (N, out)
        weight, *rest = ctx.saved_tensors
        n = len(ctx.adapters)
        ab, saved = rest[:2 * n], rest[2 * n:]
        dx = grad @ weight if ctx.needs_input_grad[0] else None  # (N, in)
        dab = []
        for i, (start, stop, scale, p) in enumerate(ctx.adapters):
            a, b, (xd, keep, u) = ab[2 * i], ab[2 * i + 1], saved[3 * i:3 * i + 3]
            g = grad[:, start:stop]  # (N, out_i)
            du = (g @ b.to(g.dtype)).mul_(scale)  # (N, r)
            dab += [(du.t() @ xd).float(), (g.t() @ u).float().mul_(scale)]  # dA (r, in), dB (out_i, r)
            if dx is None:
                continue
            if keep is None:
                dx.addmm_(du, a.to(du.dtype))
            else:  # dropout's backward: only kept positions, scaled by 1 / (1 - p)
                dx += torch.ops.aten.native_dropout_backward(du @ a.to(du.dtype), keep, 1 / (1 - p))
        return dx, None, None, grad if ctx.has_residual else None, None, *dab


def lora_terms(linears) -> tuple[list, list]:
    """The live adapters of LoRALinears whose outputs lie side by side: ((start, stop, scale,
    dropout p), ...) and [A, B, A, B, ...]. An inactive or merged adapter adds nothing."""
    adapters, ab, start = [], [], 0
    for lin in linears:
        name, stop = lin.active, start + lin.out_features
        if name is not None and not lin.merged and name in lin.lora_A:
            drop = lin.lora_dropout[name]
            p = drop.p if isinstance(drop, nn.Dropout) and drop.training else 0.0
            adapters.append((start, stop, lin.scale[name], p))
            ab += [lin.lora_A[name].weight, lin.lora_B[name].weight]
        start = stop
    return tuple(adapters), ab


class FusedLayer:
    """A decoder layer for training steps, called like the layer itself, computing what
    model.DecoderLayer computes in fewer kernels on the same weights:

    - q, k and v in one matmul over a fused matrix, LoRA inside every matmul (LoRAProjection)
    - the residual additions inside the o and down matmuls
    - RMSNorm as torch's one fused kernel (F.rms_norm), which rounds once where Qwen2's rounds twice
    - RoPE on q and k together, before their heads are transposed (after Qwen3's q_norm and
      k_norm, as F.rms_norm over each head)

    The weights are those of the layer: q, k, v become views into their fused matrix
    (fuse_projections' _fuse), so nothing is stored twice and nothing is copied per step. Gate and
    up stay apart: halves of one fused output would be strided, and SiLU and the product over
    strided halves took much longer than over whole tensors (an H200 profile)."""

    def __init__(self, layer, split_long_rows: bool = False):
        self.layer, self.split_long_rows = layer, split_long_rows
        attn = layer.self_attn
        self.qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
        with torch.no_grad():
            self.qkv_weight, self.qkv_bias = _fuse(self.qkv)

    def __call__(self, h, cos, sin, mask, is_causal, cache, i, checkpoint=False):
        if not checkpoint:
            return self.forward(h, cos, sin, mask, is_causal)
        chunk = self.layer.mlp.chunk
        if not self.split_long_rows or h.shape[1] <= chunk:
            return torch.utils.checkpoint.checkpoint(self.forward, h, cos, sin, mask, is_causal, use_reentrant=False)
        # split_long_rows (with offloaded checkpoints): the attention half and each MLP piece are
        # checkpointed apart, and the attention half's per-position work runs in tiles, so that
        # backward recomputes and holds one piece at a time (tiles.py says what that saves). A whole
        # layer's recomputation holds every MLP piece's activations at once, about 430 MB a piece
        # of 2,048 tokens on the 7B shape (6.9 GB at 32,768 tokens); the pieces' inputs are
        # checkpoints like the layer's input, which offloading keeps in host memory too.
        return tiles.split_layer(self, h, cos, sin, mask, is_causal, chunk)

    def forward(self, h, cos, sin, mask, is_causal):  # h (B, T, hidden)
        h = self.attention(h, cos, sin, mask, is_causal)
        # As model.MLP: a long sequence goes through the MLP mlp.chunk positions at a time.
        pieces = [self.mlp_piece(piece) for piece in h.split(self.layer.mlp.chunk, dim=1)]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)

    def attention(self, h, cos, sin, mask, is_causal):  # (B, T, hidden) -> h + attention(norm(h))
        B, T, _ = h.shape
        y = modeling.attend(*self.heads(h, cos, sin), mask, is_causal)  # (B, nh, T, hd)
        return self.out(y.transpose(1, 2).reshape(B, T, -1), h)

    def heads(self, h, cos, sin):  # (B, T, hidden) -> q (B, nh, T, hd), k and v (B, nkv, T, hd)
        B, T, D = h.shape
        attn = self.layer.self_attn
        nh, nkv, hd = attn.n_head, attn.n_kv, attn.head_dim
        x = rms_norm(self.layer.input_layernorm, h).reshape(B * T, D)
        qkv = project(self.qkv, x, self.qkv_weight, self.qkv_bias).view(B, T, nh + 2 * nkv, hd)
        qk = qkv[:, :, :nh + nkv]
        if isinstance(attn.q_norm, modeling.RMSNorm):  # Qwen3: each head of q and of k normalised first
            qk = torch.cat([rms_norm(attn.q_norm, qk[:, :, :nh]), rms_norm(attn.k_norm, qk[:, :, nh:])], dim=2)
        qk = rope_heads(qk, cos, sin)  # (B, T, nh + nkv, hd)
        return qk[:, :, :nh].transpose(1, 2), qk[:, :, nh:].transpose(1, 2), qkv[:, :, nh + nkv:].transpose(1, 2)

    def out(self, y, h):  # y (B, T, nh * hd), h (B, T, hidden) -> h + o(y), the residual added inside the matmul
        B, T, D = h.shape
        o = self.layer.self_attn.o_proj
        return project([o], y.reshape(B * T, -1), o.weight, o.bias, residual=h.reshape(B * T, D)).view(B, T, D)

    def mlp_piece(self, h):  # (B, n, hidden) -> h + down(silu(gate(x)) * up(x)), x = norm(h)
        B, n, D = h.shape
        mlp = self.layer.mlp
        x = rms_norm(self.layer.post_attention_layernorm, h).reshape(B * n, D)
        gate, up = (project([lin], x, lin.weight) for lin in (mlp.gate_proj, mlp.up_proj))  # 2 x (B*n, intermediate)
        return project([mlp.down_proj], F.silu(gate) * up, mlp.down_proj.weight, residual=h.reshape(B * n, D)).view(B, n, D)


def project(linears, x, weight, bias=None, residual=None):
    """residual + x W^T + bias + the LoRA terms of `linears`, whose weights are W's rows side by side."""
    adapters, ab = lora_terms(linears)
    return LoRAProjection.apply(x, weight, bias, residual, adapters, *ab)


def rms_norm(norm, x):
    return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.eps)


def rope_heads(x, cos, sin):
    """RoPE on x (B, T, heads, hd), cos and sin (B, T, hd): model.apply_rope with the heads after
    the positions, so one pass covers q and k. x * cos + rotate(x) * sin, where rotate(x) =
    (-x2, x1) is written as the halves swapped, (x2, x1), times sin with its first half negated."""
    half = x.shape[-1] // 2
    signed_sin = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)[:, :, None]  # (B, T, 1, hd)
    swapped = torch.cat([x[..., half:], x[..., :half]], dim=-1)
    return torch.addcmul(x * cos[:, :, None], swapped, signed_sin)


def fused_layers(model, split_long_rows: bool = False) -> list | None:
    """FusedLayer for every decoder layer, or None where they do not apply: a 4-bit base (its
    weights are not matrices to fuse)."""
    if any(getattr(m, "base_layer", None) is not None for m in model.modules()):
        return None
    return [FusedLayer(layer, split_long_rows) for layer in model.model.layers]


# ----------------------------------------------------------------------------------------------
# Packed rows through flash attention. Replaces: model.block_mask and SDPA over it.
# Proved equal by: tests/test_packing.py::test_varlen_attention_equals_the_block_mask_path (GPU)

@functools.cache
def find_varlen():
    """(torch's varlen_attn, the keywords it takes for causal attention within each row), or None
    before torch 2.9. Imported at the first call rather than with this file: the import brings
    torch._dynamo with it, 1.5 s that every start of train.py and infer.py would pay. The keywords
    are read from its signature, once (torch.compile cannot trace inspect.signature): causal is
    `window_size=(-1, 0)` in torch 2.11 (the GPU machine) and 2.13, `is_causal=True` in 2.9; 2.13
    takes grouped-query K/V with `enable_gqa=True`, 2.11 without a word."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # torch < 2.9
        return None
    params = inspect.signature(varlen_attn).parameters
    causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    return varlen_attn, causal | ({"enable_gqa": True} if "enable_gqa" in params else {})


class VarlenAttention:
    """Attention over rows packed into one sequence, each row causal and alone, with torch's
    varlen_attn (flash attention told where each row starts): no T x T mask is built, and no work
    is spent on pairs of tokens from different rows. It goes to the layers in place of the mask
    (model.attention_inputs calls VarlenAttention(cu_seqlens, T)), and model.Attention calls it.

    max_len bounds the longest row: T itself, as a recorded CUDA graph bakes this Python int in,
    so it must depend on nothing but the shapes (the graph's key)."""

    def __init__(self, cu_seqlens, max_len: int):
        self.cu_seqlens, self.max_len = cu_seqlens, max_len
        self.kernel, self.keywords = find_varlen()

    def __call__(self, q, k, v):
        """q (1, nh, T, hd), k and v (1, nkv, T, hd) -> (1, nh, T, hd)."""
        q, k, v = (x[0].transpose(0, 1).contiguous() for x in (q, k, v))  # (T, heads, hd)
        y = self.kernel(q, k, v, self.cu_seqlens, self.cu_seqlens, self.max_len, self.max_len, **self.keywords)
        return y.transpose(0, 1)[None]  # (1, nh, T, hd)


# ----------------------------------------------------------------------------------------------
# CUDA-graph micro-batches. Replaces: train.micro_batch.
# Proved equal by: tests/test_train.py::test_cuda_graph_micro_batches_give_the_eager_gradients (GPU)


def every_position(batch_size: int, length: int, device=None) -> torch.Tensor:
    """The flat positions b * T + t of every token but each row's last: all that can have a next token."""
    return torch.arange(batch_size * length, device=device).view(batch_size, length)[:, :-1].flatten()


class CUDAGraphMicroBatches:
    """Training micro-batches whose forward, loss and backward are recorded once per shape as a
    CUDA graph, and replayed for every later micro-batch of that shape.

    Nothing is compiled: the first micro-batch of a shape runs eagerly, then the same code is
    recorded, in about a second. The graph holds the very kernels eager runs launch, so the
    gradients are eager's bit for bit, dropout and gradient checkpointing included: each replay
    draws fresh dropout masks, and the checkpoint's recomputation draws the same masks as its forward.

    A replay repeats fixed work on fixed memory, so: every shape depends only on the micro-batch's
    (B, T) (the loss reads every position: the unlabelled ones are -100 and add nothing); inputs are
    copied into tensors at fixed addresses (views into one buffer per input that all the graphs
    share: only one runs at a time); gradients are added into .grad tensors that never move
    (allocated before the first step and zeroed in place); and the training runs on a side stream
    (TrainingPlan.prepare).
    """

    def __init__(self, loss_fn, params):
        self.loss_fn, self.params = loss_fn, params
        self.graphs = {}  # shapes of the inputs -> (graph, its input tensors, its loss)
        self.pool = torch.cuda.graph_pool_handle()  # one memory pool for all: only one runs at a time
        self.buffers = {}  # input name -> the flat tensor that every graph's input of that name views

    def __call__(self, batch: dict, scale: float) -> torch.Tensor:
        """Add the gradient of scale * loss to each parameter's .grad; return the summed loss (a
        tensor that the next call overwrites)."""
        batch = dict(batch, label_positions=every_position(*batch["labels"].shape, device=batch["labels"].device))
        key = tuple((k, tuple(v.shape)) for k, v in sorted(batch.items()))
        if key not in self.graphs:
            return self._record(key, batch, scale)
        graph, static, static_loss = self.graphs[key]
        for k, v in batch.items():
            static[k].copy_(v)
        static["scale"].fill_(scale)
        graph.replay()
        return static_loss

    def _record(self, key, batch: dict, scale: float) -> torch.Tensor:
        inputs = dict(batch, scale=torch.full((), scale, device=batch["labels"].device))
        loss = self._run(inputs)  # a real micro-batch, and the warm-up that recording needs
        graph, static = torch.cuda.CUDAGraph(), {k: self._fixed(k, v) for k, v in inputs.items()}
        try:
            with torch.cuda.graph(graph, pool=self.pool, stream=torch.cuda.current_stream()):
                static_loss = self._run(static)  # recorded, not run
        except RuntimeError as e:
            shape = " x ".join(map(str, batch["input_ids"].shape))
            raise ModelError(f"recording a micro-batch of {shape} tokens as a CUDA graph failed ({str(e).splitlines()[0]}). "
                             "Run again with --cuda_graph false to train without graphs (slower at short sequences); "
                             "checkpoints already saved are untouched.") from None
        self.graphs[key] = graph, static, static_loss
        return loss

    def _fixed(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """A copy of value at a fixed address: the front of the buffer for `name`. An input larger
        than the buffer gets a new one, at least twice the size; graphs recorded before keep the
        old one, so all of them together hold at most about twice the largest input (with the
        embedding in host memory, inputs_embeds is T x hidden: 14 MB at 2,048 tokens of the 7B)."""
        old = self.buffers.get(name)
        if old is None or old.numel() < value.numel():
            size = max(value.numel(), 2 * old.numel() if old is not None else 0)
            self.buffers[name] = torch.empty(size, dtype=value.dtype, device=value.device)
        return self.buffers[name][:value.numel()].view(value.shape).copy_(value)

    def _run(self, inputs: dict) -> torch.Tensor:
        inputs = dict(inputs)
        scale = inputs.pop("scale")
        loss = self.loss_fn(**inputs)
        # autograd.grad and an explicit add, not backward(): the sum stays in the .grad tensors,
        # whatever autograd would otherwise decide about accumulating in place.
        grads = torch.autograd.grad(loss, self.params, grad_outputs=scale)
        for p, g in zip(self.params, grads):
            p.grad.add_(g)
        return loss.detach()


# ----------------------------------------------------------------------------------------------
# How decoding runs


@dataclass
class DecodePlan:
    """How infer.py decodes: each token as one CUDA graph replay (CUDAGraphDecoder), or eagerly
    (decode.Decoder); on plain weights, with q/k/v and gate/up fused (fuse_projections). Chosen by
    plan_decoding."""

    cuda_graph: bool = False
    compile: bool = False  # torch.compile the step before recording it
    fuse: bool = False  # one matrix for q, k, v and one for gate, up

    def prepare(self, model):
        if self.fuse:
            fuse_projections(model)
        return model

    def new_decoder(self, model, max_len: int):
        if self.cuda_graph:
            return CUDAGraphDecoder(model, max_len, compile=self.compile)
        return decode.Decoder(model, max_len)


def plan_decoding(cuda_graph: bool | None, compile: bool, device, model=None) -> DecodePlan:
    """--cuda_graph: given, or else on whenever decoding runs on a GPU (eager decoding there is
    launch-bound: BENCHMARKS.md, decode rows). Projections are fused where the model's weights are
    plain (plain_weights): no adapter, or one merged, and no 4-bit base."""
    if cuda_graph is None and model is not None and "linear_attention" in model.config.mixers:
        # Qwen3.5: its recorded step (DeltaNet states written in place: StaticKVCache) equals the plain
        # step on the CPU, but has not run on a card yet; until it has, only --cuda_graph true records it.
        cuda_graph = False
    return DecodePlan(cuda_graph=device.type == "cuda" if cuda_graph is None else cuda_graph, compile=compile,
                      fuse=model is not None and plain_weights(model))


# ----------------------------------------------------------------------------------------------
# CUDA-graph decoding. Replaces: decode.Decoder.decode_one.
# Proved equal by: tests/test_infer.py::test_cuda_graph_decoding_gives_the_eager_logits (GPU) and, the step
# run without recording on a Qwen3.5 model over a chat, tests/test_qwen3_5_lora.py::
# test_the_static_decoder_gives_the_plain_logits_across_a_chat


class StaticKVCache(modeling.KVCache):
    """A KV cache whose tensors never move, for decoding as one CUDA graph replay (batch 1).

    New keys and values are written at `positions` (a tensor, so the graph can be replayed for
    any position) and attention always spans the whole buffer, masked after each query's own
    position, so stale entries are never seen.

    A Qwen3.5 DeltaNet layer's convolution and recurrent states live in fixed buffers too
    (deltanet.state_buffers), and its new states are copied into them (set_linear_state), where
    KVCache takes the new tensors in their place: a graph reads and writes the memory it was
    recorded with, so a state that moved would be left behind at the next replay. Zeros there are
    what KVCache's None is, the start of a text. `linear_length` is the caller's to keep
    (CUDAGraphDecoder): a replayed graph runs no Python."""

    positions = None  # (T,) set by attention_inputs before each forward

    def __init__(self, config, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        super().__init__(config, batch_size, max_len, device=device, dtype=dtype)
        self.linear = deltanet.state_buffers(config, batch_size, device, dtype)

    def attention_inputs(self, input_ids, attention_mask=None, position_ids=None):
        if position_ids is None:  # a prefill from position 0
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        self.positions = position_ids[0]  # (T,)
        keys = torch.arange(self.max_len, device=input_ids.device)
        mask = (keys[None, :] <= self.positions[:, None])[None, None]  # (1, 1, T, S)
        return position_ids, mask, False

    def update(self, layer: int, k, v):
        self.k[layer].index_copy_(2, self.positions, k)
        self.v[layer].index_copy_(2, self.positions, v)
        return self.k[layer], self.v[layer]

    def linear_state(self, layer: int):
        return self.linear[layer]

    def set_linear_state(self, layer: int, conv, state):
        self.linear[layer][0].copy_(conv)
        self.linear[layer][1].copy_(state)

    def copies(self) -> list:
        """Copies of the DeltaNet states as they stand (None for an attention layer): the buffers
        themselves are overwritten by the next token."""
        return [None if s is None else (s[0].clone(), s[1].clone()) for s in self.linear]

    def put(self, states: list):
        """Copy states (as copies() gives them) into the buffers."""
        for buffers, kept in zip(self.linear, states):
            if buffers is not None:
                buffers[0].copy_(kept[0])
                buffers[1].copy_(kept[1])

    def zero_linear(self):
        """Zero the DeltaNet states: a text's start (KVCache's None)."""
        for buffers in self.linear:
            for t in buffers or ():
                t.zero_()


def coordinate_descent_tuning():
    import torch._inductor.config  # with torch._dynamo: 1.5 s, paid only when compiling
    return torch._inductor.config.patch(coordinate_descent_tuning=True)


class CUDAGraphDecoder(decode.Decoder):
    """decode.Decoder with decode_one replayed as a single CUDA graph: the ~600 kernel launches of
    one token become one.

    A graph replays fixed work on fixed memory, so the cache is a StaticKVCache of `max_len`
    positions and the token and its position live in fixed buffers that are filled before each
    replay. The prefill runs eagerly, into the same buffers. A Qwen3.5 model's snapshots (for going
    back in a chat: decode.Decoder.resume_point) are copies, put back by copying. The graph holds
    whatever adapter was active at capture: make a new one after switching. record=False runs the
    step eagerly instead, on the same memory (the CPU tests' way to check it)."""

    def __init__(self, model, max_len: int, compile: bool = False, record: bool = True):
        p = model.lm_head.weight
        self.model, self.max_len = model, max_len
        # torch.compile fuses the many small element-wise kernels (norms, RoPE, SiLU, LoRA's
        # casts) before capture: a quarter of the kernels per token (BENCHMARKS.md, Qwen3 decode).
        # Coordinate-descent tuning (as gpt-fast) then tries each kernel's block sizes: faster
        # replays, for more seconds of compiling.
        self.step_fn = torch.compile(self._step, dynamic=False) if compile else self._step
        self.cache = StaticKVCache(model.config, 1, max_len, device=p.device, dtype=p.dtype)
        self.snapshots = {}  # decode.Decoder.resume_point's (a DeltaNet model's recurrent states)
        self.token = torch.zeros(1, 1, dtype=torch.long, device=p.device)
        self.position = torch.zeros(1, 1, dtype=torch.long, device=p.device)
        tuning = coordinate_descent_tuning() if compile else contextlib.nullcontext()
        self.graph = self.record(tuning) if record else None

    def record(self, tuning) -> torch.cuda.CUDAGraph:
        """The step, recorded. Two warm-up runs first, outside the default stream as capture requires
        (a compiled step compiles in them). They really run: they write keys and values at position
        0 (the prefill writes them again) and would advance the DeltaNet states two tokens, so those
        are put back as they were (as CUDAGraphBatchDecoding.record does)."""
        states = self.cache.copies()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.no_grad(), tuning:
            for _ in range(2):
                self.step_fn()
        torch.cuda.current_stream().wait_stream(stream)
        self.cache.put(states)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.no_grad():
            self.logits = self.step_fn()
        return graph

    def _step(self):
        h = self.model.model(self.token, position_ids=self.position, cache=self.cache)  # (1, 1, hidden)
        return self.model.lm_head(h[0, -1])

    def prefill(self, input_ids, start: int = 0):
        """decode.Decoder.prefill, eagerly, on the fixed buffers. From position 0 the DeltaNet states
        are zeroed (a KVCache drops them); from a later one they hold `start` positions already
        (decode.Decoder.resume_point chose it). The count is kept here and in decode_one."""
        if start == 0:
            self.cache.zero_linear()
        logits = super().prefill(input_ids, start)
        self.cache.linear_length = start + input_ids.shape[1]
        return logits

    def decode_one(self, token, position: int):
        self.token.copy_(token.view(1, 1))
        self.position.fill_(position)
        if self.graph is None:
            self.logits = self.step_fn()
        else:
            self.graph.replay()
        self.cache.linear_length = position + 1
        return self.logits

    def states(self) -> list:
        return self.cache.copies()  # the buffers are written in place by every later token

    def put_back(self, position: int):
        self.cache.put(self.snapshots[position])
        self.cache.linear_length = position


# ----------------------------------------------------------------------------------------------
# CUDA-graph batched decoding. Replaces: engine.Engine.eager_forward.
# Proved equal by: tests/test_engine.py::test_cuda_graph_batches_give_the_eager_tokens (GPU: recorded, and
# compiled first) and ::test_bucketed_steps_give_the_eager_tokens_on_the_cpu (buckets without capture)


class CUDAGraphBatchDecoding:
    """engine.Engine's decode step (one token for each of B rows) replayed as a CUDA graph, one
    recorded per bucket of batch size and of span, as CUDAGraphDecoder does for one prompt.

    A graph's shapes cannot depend on the data, so a step runs in the smallest recorded shape that
    holds it: B rows in the next power of two (the spare rows harmless dummies), and a span (the
    positions each row attends over) in the next power of two from 256, masked after each row's own
    position. A step then reads at most twice the cache it needs; attending over every slot's whole
    length instead read all of a 32,768-position cache each step however short the answers.
    The tokens, positions and adapter rows live in fixed buffers filled before each replay. Graphs
    are recorded as buckets are first needed, on a side stream, sharing one memory pool."""

    def __init__(self, engine, compile: bool = False, capture: bool = True):
        self.engine, slots, device, self.capture = engine, engine.slots, engine.device, capture
        # torch.compile fuses the step's element-wise kernels (norms, RoPE, SiLU, the row adapters'
        # masks) before capture, as CUDAGraphDecoder's compile does. One compiled graph for every
        # bucket: the batch size and span are symbolic (dynamic=True), so a new bucket only records.
        self.logits_of = torch.compile(engine.logits, dynamic=True) if compile else engine.logits
        # and no size taken as equal to another because they were equal once (the largest bucket's
        # rows and the cache's slots: "duck sizing" would compile again for every smaller bucket)
        self.symbolic = torch.fx.experimental._config.patch(use_duck_shape=False)
        self.tokens = torch.zeros(slots, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(slots, dtype=torch.long, device=device)
        self.adapters = torch.zeros(slots, dtype=torch.long, device=device)
        self.graphs, self.logits, self.pool = {}, {}, torch.cuda.graph_pool_handle() if capture else None

    def bucket(self, B: int, span: int) -> tuple[int, int]:
        # Two rows at least: compiled, a step of one row would be compiled again (size 1 is never symbolic)
        return (min(self.engine.slots, 1 << max(1, (B - 1).bit_length())),
                min(self.engine.max_len, max(256, 1 << (span - 1).bit_length())))

    def __call__(self, tokens, positions, adapters, span: int):
        B, key = tokens.shape[0], self.bucket(tokens.shape[0], span)
        b = key[0]
        for buffer, values in ((self.tokens, tokens), (self.positions, positions), (self.adapters, adapters)):
            if values is not None:
                buffer[B:b] = 0  # dummy rows: position 0 of their own slot, no adapter
                buffer[:B] = values
        if key not in self.graphs:
            self.record(*key)
        self.graphs[key].replay()
        return self.logits[key][:B]

    def record_buckets(self):
        """Record now the graph of every batch-size bucket at the shortest span (a server's first
        clients then wait for none of them; the graph of a longer span is recorded when first needed)."""
        span = self.bucket(1, 1)[1]
        for b in sorted({self.bucket(B, 1)[0] for B in range(1, self.engine.slots + 1)}):
            if (b, span) not in self.graphs:
                self.record(b, span)

    def record(self, b: int, span: int):
        e = self.engine

        def step():
            e.set_rows(self.positions[:b], self.adapters[:b] if e.adapters else None, span)
            with self.symbolic:
                return self.logits_of(self.tokens[:b])
        if not self.capture:  # capture=False: the same step on the same buffers, run instead of replayed (CPU tests)
            self.graphs[b, span] = Rerun(lambda: self.logits.__setitem__((b, span), step()))
            return
        # The warm-up step really runs: it writes the keys and values of each row's position again
        # (the same values), but it would advance a DeltaNet layer's recurrent state one token too far
        # (the replay advances it again), so those states are put back as they were.
        states = [t for pair in e.cache.linear if pair is not None for t in pair]
        saved = [t.clone() for t in states]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.no_grad():
            step()  # warm up outside the default stream, as capture requires (compiled: compiles)
        torch.cuda.current_stream().wait_stream(stream)
        for t, before in zip(states, saved):
            t.copy_(before)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool), torch.no_grad():
            self.logits[b, span] = step()
        self.graphs[b, span] = graph


class Rerun:
    """CUDAGraphBatchDecoding's stand-in for a recorded graph where nothing is captured: replay() runs the step."""

    def __init__(self, step):
        self.replay = step


def plan_batch_decoding(engine, cuda_graph: bool | None, compile: bool = False):
    """--cuda_graph for the engine: given, or else on whenever it runs on a GPU; --torch_compile:
    the step compiled before its graphs are recorded (CUDAGraphBatchDecoding). Projections fused
    (fuse_projections) on every base but a 4-bit one. Prompts prefilled together attend through
    varlen_attn where it runs (no (T, T) mask, so 8,192 tokens at once)."""
    if cuda_graph is None:
        cuda_graph = engine.device.type == "cuda"
    if plain_base(engine.model):  # q/k/v and gate/up one matmul each, the row adapters inside them
        fuse_projections(engine.model)  # built for this engine's adapter stacks now, outside any graph
    if cuda_graph:
        engine.forward = CUDAGraphBatchDecoding(engine, compile)
    if engine.prefill_tokens and varlen_available(engine.device, engine.model.lm_head.weight.dtype):
        engine.cache.packed_mask, engine.prefill_tokens = VarlenAttention, 8192
    return engine


# ----------------------------------------------------------------------------------------------
# Fused projections. Replaces: three q, k, v matmuls (and two gate, up) with one, for decoding, the
# row adapters' (lora.LoRALinear.per_row) inside it.
# Proved equal by: tests/test_model.py::test_fused_projections_change_neither_logits_nor_state_dict
# and tests/test_engine.py::test_several_adapters_in_one_batch_equal_each_adapter_alone


@torch.no_grad()
def fuse_projections(model):
    """Put q, k, v (and gate, up), which all read the same input, into one matmul each, for decoding.

    A decode step reads every weight once for a single token, so its speed is memory bandwidth: one
    matmul over the fused matrix reads it at a better rate than three separate ones (the small k and
    v matrices especially) and launches fewer kernels. The separate weights become views into the
    fused ones, so nothing is stored twice and state_dict() is unchanged. Not on a 4-bit base, which
    keeps codes instead of a weight (plain_base).
    """
    if not plain_base(model):
        raise ModelError("fuse_projections needs the base weights as matrices, and this base is in 4 bits.")
    qkv, gate_up = _projections(model)
    for attn, q_k_v in zip(_attention_layers(model), qkv):
        attn.fused_qkv = attn.fused_qkv or FusedProjection(q_k_v)
        attn.fused_qkv.refresh()  # for the adapter stacks set now (set_row_adapters), not inside a later step
    for layer, g_u in zip(model.model.layers, gate_up):
        layer.mlp.fused_gate_up = layer.mlp.fused_gate_up or FusedProjection(g_u)
        layer.mlp.fused_gate_up.refresh()


class FusedProjection:
    """x through projections that all read it (q, k, v; or gate, up) in one matmul, their outputs
    side by side (B, T, sum of outs).

    With adapters in rows (lora.set_row_adapters), each projection's stacked A sits below the
    weights in the same matrix, so that one matmul also gives x A^T (B, T, R); each row keeps its
    own adapter's columns (the others zeroed, as LoRALinear.per_row does), and the B's, one
    block-diagonal (R, sum of outs) matrix, add their product into the outputs in place: two matmuls
    for the group where each projection alone takes three, and no element-wise adds. With one
    adapter active and unmerged (no rows), each projection runs as its LoRALinear does."""

    def __init__(self, linears):
        self.linears, self.out = linears, sum(lin.out_features for lin in linears)
        self.build([None] * len(linears))

    def build(self, rows):
        """The fused matrix (the weights, then each projection's stacked A from its rows, if any)."""
        self.weight, self.bias = _fuse(self.linears, [r[0] for r in rows if r is not None])
        R = self.weight.shape[0] - self.out
        self.lora_b = self.weight.new_zeros(R, self.out)  # each B^T in its own block
        self.owner = torch.zeros(R, dtype=torch.long, device=self.weight.device)  # each column's adapter
        col = row = 0
        for lin, r in zip(self.linears, rows):
            if r is not None:  # r: (A (n r, in), B (out, n r), owner (n r,), index) of set_row_adapters
                self.lora_b[col:col + len(r[0]), row:row + lin.out_features] = r[1].t()
                self.owner[col:col + len(r[0])] = r[2]
                col += len(r[0])
            row += lin.out_features
        self.stacks = [r[0] if r is not None else None for r in rows]

    def refresh(self, rows=None):
        """Rebuild after new adapter stacks (set_row_adapters): once, before any step runs. Before a
        step is compiled or recorded too (fuse_projections, which plan_batch_decoding calls), or the
        rebuild would be in the graph."""
        rows = rows or [getattr(lin, "rows", None) for lin in self.linears]
        if any((r[0] if r is not None else None) is not s for r, s in zip(rows, self.stacks)):
            self.build(rows)

    def __call__(self, x):  # (B, T, in) -> (B, T, sum of outs)
        rows = [getattr(lin, "rows", None) for lin in self.linears]
        if all(r is None for r in rows):
            if any(_live_adapter(lin) for lin in self.linears):
                return torch.cat([lin(x) for lin in self.linears], dim=-1)
            bias = None if self.bias is None else self.bias[:self.out]
            return F.linear(x, self.weight[:self.out], bias)
        self.refresh(rows)
        index = next(r[3] for r in rows if r is not None)  # (B,): each row's adapter
        y = F.linear(x, self.weight, self.bias)  # (B, T, out + R): the projections, then x A^T
        xa = y[..., self.out:].masked_fill(self.owner != index[:, None, None], 0)  # (B, T, R)
        out = y[..., :self.out]
        out.view(-1, self.out).addmm_(xa.reshape(-1, xa.shape[-1]), self.lora_b)
        return out


def plain_base(model) -> bool:
    """Whether every q/k/v and gate/up projection keeps a weight matrix (a 4-bit base keeps codes)."""
    qkv, gate_up = _projections(model)
    return all(isinstance(getattr(lin, "weight", None), torch.Tensor) for group in qkv + gate_up for lin in group)


def plain_weights(model) -> bool:
    """Whether every q/k/v and gate/up projection is a plain matrix: a plain base (plain_base) and no
    live (unmerged) adapter."""
    qkv, gate_up = _projections(model)
    return plain_base(model) and not any(_live_adapter(lin) for group in qkv + gate_up for lin in group)


def _attention_layers(model) -> list:
    """Each layer's attention; a Qwen3.5 Gated DeltaNet layer has none (its projections stay apart)."""
    return [layer.self_attn for layer in model.model.layers if hasattr(layer, "self_attn")]


def _projections(model):
    return ([[attn.q_proj, attn.k_proj, attn.v_proj] for attn in _attention_layers(model)],
            [[layer.mlp.gate_proj, layer.mlp.up_proj] for layer in model.model.layers])


def _live_adapter(lin) -> bool:
    return getattr(lin, "active", None) in getattr(lin, "lora_A", {}) and not lin.merged


def _fuse(linears, extra=()):
    """One (sum of outs + extra's rows, in) matrix for nn.Linear-like modules and then the `extra`
    matrices; the modules' weights become views into it (a bias: zeros for extra's rows)."""
    weight = torch.cat([lin.weight for lin in linears] + [e.to(linears[0].weight.dtype) for e in extra])
    bias = None
    if linears[0].bias is not None:
        bias = torch.cat([lin.bias for lin in linears] + [linears[0].bias.new_zeros(sum(map(len, extra)))])
    start = 0
    for lin in linears:
        n = lin.weight.shape[0]
        lin.weight = nn.Parameter(weight[start:start + n], requires_grad=False)
        if bias is not None:
            lin.bias = nn.Parameter(bias[start:start + n], requires_grad=False)
        start += n
    return weight, bias


# ----------------------------------------------------------------------------------------------
# Offloaded checkpoints. Replaces: keeping each checkpointed layer's input on the GPU (model.DecoderLayer
# with checkpoint=True) from its forward to its backward.
# Proved equal by: tests/test_offload.py::test_offloaded_layers_give_the_checkpointed_gradients (CPU, a
# fake host/device split) and ::test_offloading_on_a_gpu_gives_the_same_gradients_in_less_memory (GPU)

# What offloading frees is layers x tokens x hidden x 2 bytes a pass (bf16): 196 KiB a token on the
# 7B shape, 6.1 GiB at 32,768 tokens: what grows with the row once for every layer (the working
# memory of the one layer being computed grows too, but once; the MLP and the loss run in chunks
# of fixed size). What it costs is two copies of that over PCIe a
# step, on a side stream behind the layers' compute, as much pinned host memory, and the CUDA
# graphs of the default path (a recorded graph cannot move its tensors). Under 2 GiB (10,700
# tokens on the 7B shape) the inputs are under a tenth of a 24 GB card and the default path stays;
# past it they decide what fits, and a row that long keeps the GPU busy enough to hide the copies
# (bench.py's `longest` workload measures both).
OFFLOAD_OVER_GIB = 2.0


def use_offload(a: PlanFlags, device, config, row_lengths: list[int]) -> tuple[bool, str]:
    """Whether the layers' checkpointed inputs wait in host memory (offloaded_layers), and what to
    print. --activation_cpu_offload true or false when given (offload_problem refuses what cannot
    run); by default on a GPU when one pass's inputs (its tokens: --max_tokens_per_pass or the
    longest row packed; else a micro-batch of the longest rows) would pass OFFLOAD_OVER_GIB, unless
    --cuda_graph true or --gradient_checkpointing false. The CPU has no host/device split."""
    flag = a.activation_cpu_offload
    if flag is False or device.type != "cuda" or (flag is None and config is None):
        return False, ""
    saved = ""
    if config is not None:
        tokens = pass_tokens(a, row_lengths)
        size = cli.pick_dtype(a.torch_dtype, device).itemsize
        gib = config.num_hidden_layers * tokens * config.hidden_size * size / 2**30
        if flag is None and (gib <= OFFLOAD_OVER_GIB or a.cuda_graph or not a.gradient_checkpointing):
            return False, ""
        # A row in tiles (longer than the MLP's chunk) keeps each MLP's input in host memory too.
        host = gib * (2 if tokens > modeling.MLP.chunk else 1)
        pinned = f"; {host:.1f} GiB with each MLP's input" if host > gib else ""
        saved = (f" ({config.num_hidden_layers} layers x {tokens:,} tokens x {config.hidden_size:,} x {size} bytes = "
                 f"{gib:.1f} GiB a pass{', over ' + format(OFFLOAD_OVER_GIB, 'g') + ' GiB' if flag is None else ''}"
                 f"{pinned}{check_host_memory(host)})")
    return True, (f"offloaded checkpoints: each layer's saved input{saved} waits in pinned host memory from its "
                  "forward to its backward, copied on a side stream while the layers compute; no CUDA graphs (a "
                  "recorded graph keeps its tensors where they are, and a long row keeps the GPU busy without one); "
                  "--activation_cpu_offload false keeps the inputs on the GPU")


def pass_tokens(a: PlanFlags, row_lengths: list[int]) -> int:
    """Tokens of the run's largest pass: --max_tokens_per_pass or the longest row packed; else a
    micro-batch of the longest rows."""
    if a.padding_free:
        return max(a.max_tokens_per_pass, max(row_lengths))
    return a.per_device_train_batch_size * max(row_lengths)


def host_memory_gib() -> float | None:
    """Host memory available now (MemAvailable of /proc/meminfo), in GiB; None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) / 2**20  # kB
    except (OSError, KeyError, ValueError):
        return None


def check_host_memory(gib: float) -> str:
    """', of X GiB available' for the start-up line; a UsageError, before anything loads, where the
    offloaded inputs (pinned: the system cannot page them out) would take more than 80% of it."""
    available = host_memory_gib()
    if available is None:
        return ""
    if gib > 0.8 * available:
        raise cli.UsageError(f"offloading this run's checkpoints takes {gib:.1f} GiB of pinned host memory a pass (each "
                             f"layer's input, and its MLP's for a row in tiles, for the longest pass) and this machine has "
                             f"{available:.1f} GiB available: lower --max_length (or --max_tokens_per_pass), free host "
                             "memory, or pass --activation_cpu_offload false to keep the inputs on the GPU.")
    return f", of the {available:.0f} GiB of host memory available"


def offload_problem(a: PlanFlags, device) -> str | None:
    """Why --activation_cpu_offload true cannot run as asked (for flags.check_train_args), or None."""
    if a.activation_cpu_offload is not True:
        return None
    flag = "--activation_cpu_offload true"
    if device.type != "cuda":
        return (f"{flag} moves each layer's saved input from the GPU to host memory, and this run is on the CPU: "
                "drop the flag or pass --device cuda.")
    if not a.gradient_checkpointing:
        return f"{flag} offloads the layer inputs that gradient checkpointing keeps: it needs --gradient_checkpointing true."
    if a.cuda_graph:
        return (f"{flag} and --cuda_graph true exclude each other: a recorded graph keeps its tensors where they are. "
                "Drop one of them.")
    if a.fsdp:
        return f"{flag} is not available with --fsdp (its layers gather their weights as they run): drop one of them."
    return None


# ----------------------------------------------------------------------------------------------
# Long rows: with offloaded checkpoints, a row longer than the MLP's chunk runs in tiles (tiles.py),
# the CUDA allocator grows its segments instead of cutting them (LONG_ROW_ALLOCATOR), and the
# start-up log estimates the longest row this card would train so (longest_row).

# A long row's step makes and frees tensors from a tile's few MB to a whole row's GBs, their sizes
# changing from phase to phase. The caching allocator cuts a free block of one segment to serve a
# smaller request, and a later larger one may find only pieces: memory reserved, free, and not
# usable under the card's limit. Expandable segments (LONG_ROW_ALLOCATOR) map pages into one growing
# range instead. The plan does not set it yet: with it, run 18's offloaded search failed at once
# (docs/benchmark-runs.md), which nobody has looked into. The start-up log names it, and
# bench.py --memory_table --alloc_conf compares a step with and without it (its "reserve" row:
# reserved but not allocated). PyTorch reads the setting when CUDA starts: set it before the run.
LONG_ROW_ALLOCATOR = "expandable_segments:True"
ALLOCATOR_VARIABLES = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")  # torch >= 2.9 reads either

# What a long row's step holds on the GPU besides weights, LoRA state and tile-sized work, in units
# of one (tokens x hidden) tensor of the compute dtype (0.88 GiB at 131,072 tokens on the 7B shape
# in bf16). ESTIMATES until bench.py --memory_table measures them on a GPU (replace them with its
# figures): every tensor of one layer's recomputation and backward tracked on the CPU at the 7B's
# proportions, plus flash attention's backward workspace for one K/V head group as its code allocates it.
LONG_ROW_STAGING_UNITS = 2.0  # the batch's embeddings, and one layer input on its way to or from host memory
LONG_ROW_RECOMPUTE_UNITS = 7.0  # one layer's backward at its peak, in attention's: its output's gradient, q, k,
#                                 v, attention's output and their gradients, one head group's flash workspace
LONG_ROW_FIXED_GIB = 1.5  # not growing with the row: a loss chunk's logits, the CUDA context, the allocator's reserve
MLP_TILE_TENSORS = 8  # (tile x intermediate) tensors a recomputed MLP tile holds: gate, up, their product, gradients


def long_rows(a: PlanFlags, device, config, tokens: int) -> str:
    """What the start-up log says of a run with offloaded checkpoints besides them: the tiles, the
    allocator setting, and the longest row this card would train so (against the run's longest
    pass, `tokens`)."""
    chunk = modeling.MLP.chunk
    tiled = (f"long rows in tiles: a row longer than {chunk:,} tokens runs each layer's norms, projections, RoPE and "
             f"MLP {chunk:,} positions at a time and attention one K/V head group at a time, each tile recomputed alone "
             "in backward, so that a layer's backward holds a few (tokens x hidden) tensors, not dozens (tiles.py)")
    allocator = use_long_row_allocator()  # before card_gib, which starts CUDA
    return "\n".join(m for m in (tiled, allocator, longest_row(a, device, config, tokens) if config else "") if m)


def use_long_row_allocator() -> str:
    """What the start-up log says of the CUDA allocator for a long row: the user's setting, or
    PyTorch's own and the one to try (LONG_ROW_ALLOCATOR: not set by the plan until measured)."""
    mine = [f"{name}={os.environ[name]}" for name in ALLOCATOR_VARIABLES if name in os.environ]
    if mine:
        return f"the CUDA allocator as you set it ({', '.join(mine)})"
    return (f"the CUDA allocator as PyTorch sets it; if a long row runs out of memory with much reserved but free, "
            f"try PYTORCH_CUDA_ALLOC_CONF={LONG_ROW_ALLOCATOR} (not yet measured with offloading)")


def longest_row(a: PlanFlags, device, config, needed: int) -> str:
    """The start-up line that estimates the longest row this card trains with offloaded checkpoints and
    tiles (longest_tokens); what host memory allows (two pinned copies a layer, 80% of what is
    available); and a warning where the run's longest pass (`needed` tokens) is longer."""
    itemsize = cli.pick_dtype(a.torch_dtype, device).itemsize
    budget = long_row_budget(config, a.quant_bits, itemsize, a.lora_rank)
    card, host = card_gib(device), host_memory_gib()
    if card is None:
        return ""
    tokens = longest_tokens(budget, card)
    host_line = ""
    if host is not None:
        pinned = 2 * config.num_hidden_layers * config.hidden_size * itemsize  # bytes a token
        host_line = f"; host memory allows {round_down(0.8 * host * 2**30 / pinned, 1024):,}"
    warn = (f"; this run's passes reach {needed:,} tokens and may run out of memory: lower --max_length "
            "(or --max_tokens_per_pass)") if tokens < needed else ""
    return (f"longest row on this card with this plan, estimated: {tokens:,} tokens ({card:.1f} GiB: weights "
            f"{budget['weights']:.1f} GiB, LoRA state {budget['lora']:.1f}, fixed {budget['fixed']:.1f}, then "
            f"{LONG_ROW_STAGING_UNITS + LONG_ROW_RECOMPUTE_UNITS:g} x {config.hidden_size:,} x {itemsize} bytes a token; "
            f"per-token estimates until bench.py --memory_table measures them){host_line}{warn}")


def long_row_budget(config, quant_bits: int | None, itemsize: int, rank: int) -> dict:
    """What a long row's step needs on the GPU besides its per-token cost (GiB: weights, lora, fixed),
    and that cost (per_token, bytes): LONG_ROW_* and a tile's MLP, in the compute dtype."""
    fixed = LONG_ROW_FIXED_GIB + modeling.MLP.chunk * config.intermediate_size * MLP_TILE_TENSORS * itemsize / 2**30
    if quant_bits:  # the largest weight dequantised, in forward and in backward
        fixed += 2 * config.hidden_size * config.intermediate_size * itemsize / 2**30
    return {"weights": weights_gib(config, quant_bits, itemsize), "lora": lora_state_gib(config, rank), "fixed": fixed,
            "per_token": (LONG_ROW_STAGING_UNITS + LONG_ROW_RECOMPUTE_UNITS) * config.hidden_size * itemsize}


def longest_tokens(budget: dict, card_gib: float) -> int:
    """The longest row (a multiple of 1,024 tokens) whose step fits card_gib, by long_row_budget."""
    left = card_gib - budget["weights"] - budget["lora"] - budget["fixed"]
    return max(0, round_down(left * 2**30 / budget["per_token"], 1024))


def round_down(x: float, multiple: int) -> int:
    return int(x // multiple) * multiple


def card_gib(device) -> float | None:
    """The GPU's memory in GiB, None without one. It starts CUDA: the allocator's setting comes first."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(device).total_memory / 2**30


def weights_gib(config, quant_bits: int | None, itemsize: int) -> float:
    """The weights a training step keeps on the GPU: the decoder's projections (4-bit: NF4 codes and
    double-quantised scales, 4.127 bits a weight; else the compute dtype), norms, biases and lm_head;
    an untied input embedding stays in host memory (use_host_embedding)."""
    D, L = config.hidden_size, config.num_hidden_layers
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    linear = L * (D * (q + 2 * kv) + q * D + 3 * D * config.intermediate_size)
    per_weight = (0.5 + 1 / 64 + 4 / (64 * 256)) if quant_bits else itemsize
    rest = L * (2 * D + q + 2 * kv) + D + config.vocab_size * D  # norms, q/k/v biases, the final norm, lm_head
    return (linear * per_weight + rest * itemsize) / 2**30


def lora_state_gib(config, rank: int) -> float:
    """An all-linear adapter of this rank: float32 A and B, their gradients and AdamW's two moments."""
    D, I = config.hidden_size, config.intermediate_size
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    per_layer = rank * (2 * (D + q) + 2 * (D + kv) + 3 * (D + I))  # q, o; k, v; gate, up, down
    return config.num_hidden_layers * per_layer * 4 * 4 / 2**30


def offloaded_layers(layers) -> list:
    """Decoder layer callables (the model's own, compiled_layers, or any with their arguments) whose
    checkpointed input is kept in host memory between forward and backward, for QwenModel(layers=...)."""
    offloader = Offloader()
    return [OffloadedLayer(layer, offloader) for layer in layers]


class OffloadedLayer:
    """A layer that checkpoints as it does (its recomputation in backward, dropout's masks drawn
    again from the saved random state: torch.utils.checkpoint), with one change: the inputs that
    its checkpoints keep for backward (the layer's input; with FusedLayer's split_long_rows, each
    MLP piece's input too) are handed to the Offloader, which keeps them in host memory.
    What a checkpoint saves goes through the saved-tensor hooks around it; what the layer saves
    inside is the checkpoint's own business (its hooks come later and win)."""

    def __init__(self, layer, offloader):
        self.layer, self.offloader = layer, offloader

    def __call__(self, h, cos, sin, mask, is_causal, cache, i, checkpoint=False):
        if not checkpoint:  # evaluation, or no checkpointing: no input is kept for a backward
            return self.layer(h, cos, sin, mask, is_causal, cache, i, checkpoint=False)
        # The hook is told where cos, sin and the mask lie, not given them: autograd keeps a pack
        # hook as long as what it packed, and a hook holding a tensor keeps it on the device.
        shared = {t.data_ptr() for t in (cos, sin, mask) if isinstance(t, torch.Tensor)}
        if i == 0:
            self.offloader.last = None  # a new pass: layer 0's first copy has none before it
        with torch.autograd.graph.saved_tensors_hooks(partial(self.offloader.pack, shared), self.offloader.unpack):
            return self.layer(h, cos, sin, mask, is_causal, cache, i, checkpoint=True)


class Offloader:
    """Moves the layer inputs that checkpoints save to host memory and back (saved-tensor hooks).

    Backward runs the layers last to first: when one layer's input is brought back, the copy of
    the layer before it starts, so that it crosses while this layer's backward computes. cos, sin
    and a mask, the same tensors for every layer, stay where they are."""

    def __init__(self):
        self.streams = {}  # device -> the side stream of its copies
        self.last = None  # the latest layer's HostCopy (a weak reference): the one before the next

    def pack(self, shared: set, t):
        if t.data_ptr() in shared or t.numel() == 0:  # cos, sin, the mask; or torch 2.11's checkpoint's empty marker
            return t
        if t.device.type == "cuda":
            if t.device not in self.streams:
                self.streams[t.device] = torch.cuda.Stream(t.device)
            copy = PinnedHostCopy(t, self.streams[t.device])
        else:
            copy = HostCopy(t)
        copy.previous = self.last
        self.last = weakref.ref(copy)
        return copy

    def unpack(self, saved):
        if not isinstance(saved, HostCopy):
            return saved
        t = saved.bring_back()
        previous = saved.previous and saved.previous()
        if previous is not None:
            previous.start_bringing_back()
        return t


class HostCopy:
    """A layer input kept away from the device until its backward. This class is the CPU's
    stand-in (the tests' fake host/device split): the "host" copy is a tensor of its own and the
    "device" one a new copy of it, so backward can only use what was brought back."""

    previous = None  # the layer before's HostCopy (a weak reference), brought back next

    def __init__(self, t):
        self.host, self.back = t.detach().clone(), None

    def start_bringing_back(self):
        if self.back is None:
            self.back = self.host.clone()

    def bring_back(self):
        self.start_bringing_back()
        back, self.back = self.back, None
        return back


class PinnedHostCopy(HostCopy):
    """A GPU tensor copied to pinned host memory on a side stream, and back on it.

    Out: the side stream waits for the compute stream (t is computed), and t.record_stream tells
    the allocator that t's memory is read there, so it is not given to another tensor before the
    copy has read it. Back: the device tensor is allocated on the compute stream, which the side
    stream first waits for (the memory may have been freed by work still queued there); the
    compute stream waits for the copy's event before using it."""

    def __init__(self, t, stream):
        self.stream, self.back, self.device = stream, None, t.device
        stream.wait_stream(torch.cuda.current_stream(t.device))
        with torch.cuda.stream(stream):
            self.host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            self.host.copy_(t.detach(), non_blocking=True)
        t.record_stream(stream)

    def start_bringing_back(self):
        if self.back is not None:
            return
        compute = torch.cuda.current_stream(self.device)
        self.back = torch.empty(self.host.shape, dtype=self.host.dtype, device=self.device)
        self.stream.wait_stream(compute)
        with torch.cuda.stream(self.stream):
            self.back.copy_(self.host, non_blocking=True)
        self.back.record_stream(self.stream)  # should it be dropped unused, its memory waits for the copy
        self.ready = self.stream.record_event()

    def bring_back(self):
        self.start_bringing_back()
        torch.cuda.current_stream(self.device).wait_event(self.ready)
        back, self.back = self.back, None
        return back
