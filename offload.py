"""offload.py: offloaded checkpoints, and the plan for long rows.

A first reading can skip this file. With gradient checkpointing each decoder layer keeps its
input from its forward to its backward: layers x tokens x hidden numbers on the GPU, what grows
with the row once for every layer. Here those inputs wait in host memory instead, and a row
longer than the MLP's chunk runs through each layer in tiles (tiles.py). speed.plan_training
chooses it and says so at start-up:

    use_offload       whether the layers' checkpointed inputs wait in host memory, and why
                      (offload_problem: why --activation_cpu_offload true cannot run as asked)
    long_rows         what the start-up log says of a long row: its tiles, the CUDA allocator's
                      setting, and the longest row this card would train so (longest_row)
    offloaded_layers  the layers whose checkpoints' inputs go to host memory and back (Offloader)

speed.py imports this file, never the reverse: the flags `a` these functions read are a
speed.PlanFlags, named in quotes.
"""

import os
import weakref
from functools import partial

import torch
import torch.nn as nn

import cli
import model as modeling
import tiles

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


def use_offload(a: "speed.PlanFlags", device, config, row_lengths: list[int]) -> tuple[bool, str]:
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


def pass_tokens(a: "speed.PlanFlags", row_lengths: list[int]) -> int:
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


def offload_problem(a: "speed.PlanFlags", device) -> str | None:
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
# in bf16). Estimated from every tensor of one layer's recomputation and backward tracked on the CPU
# at the 7B's proportions, plus flash attention's backward workspace for one K/V head group as its
# code allocates it; bench.py --memory_table on an H100 (run 26) measured 7.7 units above the weights
# at 98,304 and 131,072 tokens, where these give 9: the rest is left for the allocator's reserve,
# which grows with the row (the longest-row estimate, 106,496 bf16 tokens in 22 GiB, sits just past
# the measured 98,304 in 20.7 GiB reserved).
LONG_ROW_STAGING_UNITS = 2.0  # the batch's embeddings, and one layer input on its way to or from host memory
LONG_ROW_RECOMPUTE_UNITS = 7.0  # one layer's backward at its peak, in attention's: its output's gradient, q, k,
#                                 v, attention's output and their gradients, one head group's flash workspace
LONG_ROW_FIXED_GIB = 1.5  # not growing with the row: a loss chunk's logits, the CUDA context, the allocator's reserve
MLP_TILE_TENSORS = 8  # (tile x intermediate) tensors a recomputed MLP tile holds: gate, up, their product, gradients
# Qwen3.5's layers: a DeltaNet's mixer in pieces (tiles.DeltaNetParts), gated attention in tiles
# (tiles.GatedParts). ESTIMATES until bench.py --memory_table measures them on a GPU: tracked tensor
# by tensor on the CPU at Qwen3.5-4B's proportions, the widest mixers for their hidden size of the
# three shapes (attention's kernel counted as flash attention holds it, no T x T matrix, plus a head
# group's workspace as for the 7B): what one layer's backward holds a token of the row, and what one
# piece or tile holds a token of it.
LONG_ROW_DELTANET_UNITS = 3.8  # a DeltaNet layer: its input and output, their gradients, the pieces' states
LONG_ROW_GATED_ATTENTION_UNITS = 9.0  # a gated attention layer: q, its gate, k, v, attention's output, gradients
LONG_ROW_PIECE_UNITS = 176.0  # a DeltaNet piece's recomputation: projections, conv, decays, scores, solved values
LONG_ROW_GATED_TILE_UNITS = 84.0  # a gated attention tile's: norms, projections, RoPE, their gradients

def long_rows(a: "speed.PlanFlags", device, config, tokens: int) -> str:
    """What the start-up log says of a run with offloaded checkpoints besides them: the tiles, the
    allocator setting, and the longest row this card would train so (against the run's longest
    pass, `tokens`)."""
    chunk = modeling.MLP.chunk
    tiled = (f"long rows in tiles: a row longer than {chunk:,} tokens runs each layer's norms, projections, RoPE and "
             f"MLP {chunk:,} positions at a time and attention one K/V head group at a time, each tile recomputed alone "
             "in backward, so that a layer's backward holds a few (tokens x hidden) tensors, not dozens (tiles.py)")
    if config is not None and "linear_attention" in config.mixers:
        tiled += (f"; Qwen3.5's DeltaNet layers run {tiles.DELTA_RULE_PIECE} positions at a time, each piece starting "
                  "from the states the one before left (tiles.DeltaNetParts)")
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


def longest_row(a: "speed.PlanFlags", device, config, needed: int) -> str:
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
            f"{budget['units']:g} x {config.hidden_size:,} x {itemsize} bytes a token; "
            f"per-token estimates until bench.py --memory_table measures them){host_line}{warn}")


def long_row_budget(config, quant_bits: int | None, itemsize: int, rank: int) -> dict:
    """What a long row's step needs on the GPU besides its per-token cost (GiB: weights, lora, fixed),
    and that cost (per_token bytes; units of hidden x itemsize): LONG_ROW_* and a tile's MLP, in the
    compute dtype; for Qwen3.5, its layers' whole mixers and a delta-rule piece."""
    D = config.hidden_size
    fixed = LONG_ROW_FIXED_GIB + modeling.MLP.chunk * config.intermediate_size * MLP_TILE_TENSORS * itemsize / 2**30
    if quant_bits:  # the largest weight dequantised, in forward and in backward
        fixed += 2 * D * config.intermediate_size * itemsize / 2**30
    recompute = LONG_ROW_RECOMPUTE_UNITS
    if "linear_attention" in config.mixers:  # the larger of a DeltaNet layer's and a gated attention layer's
        recompute = max(LONG_ROW_DELTANET_UNITS, LONG_ROW_GATED_ATTENTION_UNITS)
        piece = max(LONG_ROW_PIECE_UNITS * tiles.DELTA_RULE_PIECE, LONG_ROW_GATED_TILE_UNITS * modeling.MLP.chunk)
        fixed += piece * D * itemsize / 2**30
    units, sizes = LONG_ROW_STAGING_UNITS + recompute, decoder_sizes(config)
    return {"weights": weights_gib(sizes, quant_bits, itemsize), "lora": lora_state_gib(sizes, rank), "fixed": fixed,
            "units": units, "per_token": units * D * itemsize}


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


def weights_gib(sizes: dict, quant_bits: int | None, itemsize: int) -> float:
    """The weights a training step keeps on the GPU (sizes: decoder_sizes'): the decoder layers'
    linear layers (4-bit: NF4 codes and double-quantised scales, 4.127 bits a weight; else the
    compute dtype), their other weights (norms, biases, a DeltaNet's conv), the final norm and
    lm_head; an untied input embedding stays in host memory (speed.use_host_embedding)."""
    per_weight = (0.5 + 1 / 64 + 4 / (64 * 256)) if quant_bits else itemsize
    rest = sizes["other"] + sizes["hidden"] + sizes["vocab"] * sizes["hidden"]  # + final norm, lm_head
    return (sizes["linear"] * per_weight + rest * itemsize) / 2**30


def lora_state_gib(sizes: dict, rank: int) -> float:
    """An all-linear adapter of this rank: float32 A and B, their gradients and AdamW's two moments."""
    return rank * sizes["lora_per_rank"] * 4 * 4 / 2**30


def decoder_sizes(config) -> dict:
    """What weights_gib and lora_state_gib count of a model, from its decoder layers built on the meta
    device (one count for every family's layers): the weights of their linear layers (what an
    all-linear adapter wraps and a 4-bit base quantises), an adapter's parameters per unit of rank,
    their other parameters; the hidden size and the vocabulary."""
    with torch.device("meta"):
        layers = [modeling.DecoderLayer(config, i) for i in range(config.num_hidden_layers)]
    linears = [m for layer in layers for m in layer.modules() if isinstance(m, nn.Linear)]
    linear = sum(m.in_features * m.out_features for m in linears)
    return {"linear": linear, "lora_per_rank": sum(m.in_features + m.out_features for m in linears),
            "other": sum(p.numel() for layer in layers for p in layer.parameters()) - linear,
            "hidden": config.hidden_size, "vocab": config.vocab_size}


def offloaded_layers(layers) -> list:
    """Decoder layer callables (the model's own, speed.compiled_layers, or any with their arguments) whose
    checkpointed input is kept in host memory between forward and backward, for QwenModel(layers=...)."""
    offloader = Offloader()
    return [OffloadedLayer(layer, offloader) for layer in layers]


class OffloadedLayer:
    """A layer that checkpoints as it does (its recomputation in backward, dropout's masks drawn
    again from the saved random state: torch.utils.checkpoint), with one change: the inputs that
    its checkpoints keep for backward (the layer's input; with speed.FusedLayer's split_long_rows, each
    MLP piece's input too) are handed to the Offloader, which keeps them in host memory.
    What a checkpoint saves goes through the saved-tensor hooks around it; what the layer saves
    inside is the checkpoint's own business (its hooks come later and win)."""

    def __init__(self, layer, offloader):
        self.layer, self.offloader = layer, offloader

    def __call__(self, h, cos, sin, mask, is_causal, cache, i, checkpoint=False, **rows):
        if not checkpoint:  # evaluation, or no checkpointing: no input is kept for a backward
            return self.layer(h, cos, sin, mask, is_causal, cache, i, checkpoint=False, **rows)
        # The hook is told where cos, sin, the mask and the DeltaNet layers' segment ids (rows) lie, not
        # given them: autograd keeps a pack hook as long as what it packed, and a hook holding a tensor
        # keeps it on the device.
        shared = {t.data_ptr() for t in (cos, sin, mask, *rows.values()) if isinstance(t, torch.Tensor)}
        if i == 0:
            self.offloader.last = None  # a new pass: layer 0's first copy has none before it
        with torch.autograd.graph.saved_tensors_hooks(partial(self.offloader.pack, shared), self.offloader.unpack):
            return self.layer(h, cos, sin, mask, is_causal, cache, i, checkpoint=True, **rows)


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
