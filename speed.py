"""speed.py: how training runs faster, giving the plain path's results.

A first reading can skip this file. train.py is written the plain way: one micro-batch is
`micro_batch(loss_fn, batch, scale)` (forward, loss, backward). Each piece here replaces a plain
function from outside, names the plain function it replaces and the test that proves they agree,
and is chosen in one place:

    plan_training   how the decoder layers run in training (CUDA-graph micro-batches of fused
                    layers, compiled layers, or eager; for long rows each layer's checkpointed input
                    kept in host memory and the layer run in tiles: offload.py, tiles.py), how packed
                    rows attend (VarlenAttention on a GPU) and keep apart in Qwen3.5's DeltaNet
                    layers (packed_deltanet.py, for compiled or recorded layers) and where the input
                    embedding lives (HostEmbedding), printed at start-up with the reason

Decoding's fast paths are in fast_decode.py (plan_decoding, plan_batch_decoding: CUDA-graph
decoding, fused projections), and offloaded checkpoints with the plan for long rows in offload.py.
The imports go one way: fast_decode.py imports this file, this file imports offload.py.

Why: a micro-batch of short rows launches thousands of small kernels one by one from Python,
and the GPU waits for them; replayed as one CUDA graph, it does not. What each path gains is
measured by bench.py and recorded in BENCHMARKS.md (and docs/performance.md), not here.
"""

import functools
import inspect
import warnings
from dataclasses import dataclass, fields
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

import cli
import model as modeling
import packed_deltanet
import tiles
from model import ModelError
# By name: plan_training's own `offload` (whether to offload) would hide a module of that name.
from offload import long_rows, offloaded_layers, pass_tokens, use_offload
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
    (offload.offloaded_layers, around whichever layers run); never with graphs, whose tensors cannot move.

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
        tiles.tile_delta_rules(model)
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
    fused (deltanet_layers)."""
    packed_mask, how = packed_attention(a, device)
    eager = eager_only(a, device, config)
    if eager:
        return TrainingPlan(message="\n".join(m for m in (eager, how) if m), packed_mask=packed_mask)
    linear = config is not None and "linear_attention" in config.mixers  # Qwen3.5's DeltaNet layers
    offload, offloading = use_offload(a, device, config, row_lengths)
    pad = max(64, -(-a.max_length // 32))
    if a.padding_free:  # a step's rows packed: any length up to the budget, or a longer row alone
        row_lengths = range(pad, max(a.max_tokens_per_pass, max(row_lengths)) + 1, pad)
    lengths = sorted({round_up(n, pad) for n in row_lengths})
    compiled, why = use_compile(a, device, micro_batches, len(lengths))
    graphs = device.type == "cuda" and not compiled and a.cuda_graph is not False and not offload
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
    deltanets = deltanet_layers(device, graphs or compiled) if linear else ""
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


def deltanet_layers(device, fixed_shapes: bool) -> str:
    """What the start-up log says of a Qwen3.5 model's DeltaNet layers. With recorded or compiled
    layers (fixed_shapes), packed rows go through them as packed_deltanet.mix: the batch's own shape,
    samples kept apart by masks (the plain layer unpacks a row per sample, by lengths only the data
    knows); recorded, they trained the tiny Qwen3.5 as the eager layers on an H100 (run 26). On a GPU,
    no layer is fused: FusedLayer is written for Qwen2 / Qwen3 layers."""
    fixed = ("Qwen3.5's DeltaNet layers keep a packed row's samples apart by masks in the batch's own shape "
             "(packed_deltanet.py) instead of a row per sample, so that they are recorded or compiled like the "
             "attention layers") if fixed_shapes else ""
    gpu = "Qwen3.5's layers run unfused (fused layers are written for Qwen2 / Qwen3 layers)" if device.type == "cuda" else ""
    return "\n".join(m for m in (fixed, gpu) if m)


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

    The weights are those of the layer: q, k, v become views into their fused matrix (fuse_linears,
    which fast_decode.fuse_projections shares), so nothing is stored twice and nothing is copied
    per step. Gate and up stay apart: halves of one fused output would be strided, and SiLU and the
    product over strided halves took much longer than over whole tensors (an H200 profile)."""

    def __init__(self, layer, split_long_rows: bool = False):
        self.layer, self.split_long_rows = layer, split_long_rows
        attn = layer.self_attn
        self.qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
        with torch.no_grad():
            self.qkv_weight, self.qkv_bias = fuse_linears(self.qkv)

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

    def mixer_half(self, h, cos, sin, mask, is_causal, tile: int, segments=None):  # for tiles.split_layer
        return tiles.attention_in_tiles(self, h, cos, sin, mask, is_causal, tile)

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


def fuse_linears(linears, extra=()):
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
