"""shard.py: models larger than one GPU: the base model split over the torchrun ranks (FSDP2).

A first reading can skip this file. Without it, `torchrun --nproc_per_node N train.py ...` is data
parallelism: every GPU holds the whole bf16 model (parallel.Replicas). With `--fsdp true` each
rank holds 1/N of every weight instead, as PyTorch's own engine does it,
`torch.distributed.fsdp.fully_shard` (FSDP2, the idea of ZeRO-3):

    each decoder layer is one unit: its weights are split by rows (dim 0) over the ranks; just
    before the layer runs, the ranks all-gather its full weights, and free them after it ran
    (in backward, again: the checkpointed layer is recomputed with the gathered weights)
    LoRA's A and B are split the same way, and so are their gradients (each rank receives the
    sum of its rows only: a reduce-scatter, once per optimizer step) and AdamW's state
    the embedding and the final norm make the root unit (QwenModel), gathered once per step;
    lm_head stays whole on every rank, as does a tied embedding, which is lm_head too
    (CausalLMLoss reads lm_head's weight directly, outside any module call FSDP could hook)

Nothing else changes: the same layers run (eagerly: a recorded CUDA graph cannot replay the
all-gathers), in the same dtypes as the plain path (bf16 base, float32 A and B whose matmuls run
in bf16), so the loss and gradients are the plain path's. What this file adds, each in one place:

    load_lora_model  build on the meta device, shard, then each rank reads only its own rows of
                     each tensor from the safetensors files: no rank, and no host, ever holds the
                     whole model; A and B get the values one process would give them
    Shards           the parallel.Replicas twin: the ranks in lockstep, and the gradient sync on
                     the last pass of a step only
    ShardedState     the runs.WholeState twin: checkpoints gathered into the one full form, so a
                     checkpoint of N ranks resumes on M ranks, with DDP, or in one process
    RankZeroDecoder  generation: every rank runs every forward, all take rank 0's logits
    recompute_without_graph  each layer's checkpointing, as cheap for the CPU as it can be: the CPU
                     also issues the all-gathers, and must keep ahead of the GPU

Proved equal by: tests/test_fsdp.py (2 gloo ranks on the CPU train the adapter of one process).
"""

import contextlib
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.utils.checkpoint
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

import decode
import lora
import model as modeling
import cli
from cli import UsageError

# --fsdp's values that mean "shard": ours, ms-swift's preset name, and transformers' spelling.
ON = {"true", "1", "yes", "fsdp2", "full_shard", "full_shard auto_wrap", "auto_wrap full_shard"}
OFF = {"false", "0", "no", ""}


def check_flags(a):
    """--fsdp VALUE ... becomes True or False; values and flags that cannot go with it are refused."""
    given = " ".join(a.fsdp or ["false"])
    if given.strip().lower() not in ON | OFF:
        raise UsageError(f"--fsdp {given}: only full sharding of every decoder layer is implemented here: pass "
                         "--fsdp true (or 'full_shard auto_wrap'); offload, shard_grad_op, hybrid_shard and FSDP "
                         "config files are not.")
    a.fsdp = given.strip().lower() in ON
    flag = "--cuda_graph" if a.cuda_graph else "--torch_compile" if a.torch_compile else None
    if a.fsdp and flag:
        raise UsageError(f"{flag} true cannot go with --fsdp true: the layers gather their weights from all "
                         "ranks as they run, which a recorded or compiled layer cannot replay. Drop one of them.")
    if a.fsdp and a.quant_bits:
        raise UsageError("--quant_bits 4 cannot go with --fsdp true yet: a 4-bit layer's packed codes are not split "
                         "over the ranks. Use one of them: --quant_bits 4 fits Qwen2.5-32B on one 24 GB GPU.")
    if a.fsdp and cli.rank_and_world() == (0, 1):
        print("note: --fsdp true in one process: there is nothing to split the model over, so it trains whole. "
              "Start several with torchrun --nproc_per_node N train.py ...", file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# Loading: each rank reads its own rows


def load_lora_model(model_dir: Path, cfg: lora.LoraConfig, seed: int, dtype, device):
    """The base model sharded over the ranks, with a fresh LoRA adapter whose A and B hold the
    values that lora.add_adapter gives them in one process seeded with `seed`."""
    config = modeling.Config.from_json(Path(model_dir) / "config.json")
    with torch.device("meta"):  # shapes and dtypes only: nothing is allocated
        model = modeling.QwenForCausalLM(config).to(dtype)
    files, expected = modeling.check_weights(model, Path(model_dir))  # before LoRA adds its own names
    lora.add_adapter(model, cfg)  # A and B in float32, on meta too
    shard(model, device)
    model.to_empty(device=device)  # each rank's rows, not yet filled
    if config.tie_word_embeddings:  # to_empty made the two a parameter each
        model.lm_head.weight = model.model.embed_tokens.weight
    read_own_rows(model, files, expected)
    init_lora(model, seed, device)
    return model


def shard(model, device):
    """Each decoder layer its own FSDP unit, checkpointed by recompute_without_graph, the rest of
    QwenModel the root unit. Gradients are summed over the ranks, not averaged: the loss is
    already divided by the label tokens of the whole step on all ranks (train.optimizer_step), as
    DDP's sum does."""
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    # A tied lm_head shares the embedding; it is used outside any module call, so it stays whole.
    whole = {model.model.embed_tokens.weight} if model.config.tie_word_embeddings else set()
    for layer in model.model.layers:
        layer.recompute = recompute_without_graph
    units = [fully_shard(layer, mesh=mesh) for layer in model.model.layers]
    units.append(fully_shard(model.model, mesh=mesh, ignored_params=whole))
    for unit in units:
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)  # a plain SUM: gloo has no pre-multiplied sum


def recompute_without_graph(fn, h, *args):
    """Gradient checkpointing as model.recompute does it, but the forward runs without recording
    autograd's graph (torch's reentrant checkpoint); backward runs fn again with it. The same
    gradients, and half the CPU time of a layer's forward: under FSDP the CPU, which also issues
    each layer's all-gather, would otherwise fall behind the GPU in the forward (docs/benchmark-runs.md, run 20).
    A reentrant checkpoint gives gradients only if an input requires grad: the first layer's, the
    frozen embedding's output, is made to (its unused gradient costs a few matmuls of one layer)."""
    if not h.requires_grad:
        h = h.detach().requires_grad_()
    return torch.utils.checkpoint.checkpoint(fn, h, *args, use_reentrant=True)


def own_rows(p: DTensor) -> slice:
    """The rows of dim 0 that this rank holds of the sharded parameter p: the row numbers split as
    p's own placement splits p (FSDP2 gives the last ranks fewer rows, or none, when the rows do not
    divide evenly)."""
    rows = distribute_tensor(torch.arange(p.shape[0]), p.device_mesh, p.placements, src_data_rank=None).to_local()
    assert rows.numel() == p.to_local().shape[0], "a sharded parameter is not split along dim 0"
    return slice(int(rows[0]), int(rows[-1]) + 1) if rows.numel() else slice(0, 0)


@torch.no_grad()
def read_own_rows(model, files: list[Path], expected: dict):
    """Fill each parameter from the safetensors files: a sharded one with this rank's rows only
    (get_slice reads just those bytes), a whole one (lm_head, a tied embedding) entirely."""
    from safetensors import safe_open

    params = dict(model.named_parameters())
    for f in files:
        with safe_open(f, framework="pt") as sf:
            for key in sf.keys():
                name = modeling.text_name(key, model.config)  # Qwen3.5's VL layout: the text model's name
                if name not in expected:
                    continue
                p = params[name]
                if isinstance(p, DTensor):
                    p.to_local().copy_(sf.get_slice(key)[own_rows(p)])  # (own rows, ...), cast to p's dtype
                else:
                    p.copy_(sf.get_tensor(key))


@torch.no_grad()
def init_lora(model, seed: int, device):
    """A and B as lora.add_adapter makes them after torch.manual_seed(seed) in one process: each
    wrapped layer in turn, on a stand-in layer whose base weight takes no memory, so that the same
    random numbers come in the same order; each rank keeps its rows."""
    torch.manual_seed(seed)
    for layer in lora_layers(model):
        base = nn.Linear(layer.in_features, layer.out_features, bias=False, device="meta")
        base.weight = nn.Parameter(torch.empty_strided((layer.out_features, layer.in_features), (0, 0), device=device),
                                   requires_grad=False)  # one element, seen as (out, in)
        stand_in = lora.LoRALinear(base)
        for name in layer.lora_A:
            stand_in.add(name, layer.lora_A[name].weight.shape[0], layer.scale[name], 0.0)
            copy_rows(layer.lora_A[name].weight, stand_in.lora_A[name].weight)  # (r, in)
            copy_rows(layer.lora_B[name].weight, stand_in.lora_B[name].weight)  # (out, r)


def lora_layers(model) -> list:
    return [m for m in model.modules() if isinstance(m, lora.LoRALinear)]


def copy_rows(p, full: torch.Tensor):
    """Copy a whole tensor into p: into a sharded p, only this rank's rows."""
    if isinstance(p, DTensor):
        p.to_local().copy_(full[own_rows(p)])
    else:
        p.copy_(full)


# ----------------------------------------------------------------------------------------------
# The optimizer step


class Shards:
    """How the ranks share an optimizer step when the model is split over them (parallel.Replicas'
    twin). Every rank must run every forward and backward: each gathers the layers' weights from
    all of them, so the ranks run in lockstep (train.rank_passes evens out their passes). The
    gradients of all passes but the last are kept whole on each rank; in the last one's backward
    FSDP reduce-scatters their sum, once per step."""

    lockstep = True

    def __init__(self, rank: int, world: int, model):
        self.rank, self.world, self.model = rank, world, model
        self.states = ShardedState()

    @contextlib.contextmanager
    def gradient_sync(self, last: bool):
        """Around each pass: FSDP reduce-scatters the gradients in the last pass's backward only."""
        self.model.model.set_requires_gradient_sync(last)
        yield

    def reduce(self, loss_sum, params):
        """The gradients were reduce-scattered in the last backward; the loss is summed here."""
        dist.all_reduce(loss_sum)


class RankZeroDecoder(decode.Decoder):
    """Decoding a sharded model: every rank runs every forward (each gathers the layers' weights
    from all), and every rank takes rank 0's logits, so all choose the same tokens and stop at the
    same one, whatever rounding differences their kernels might have."""

    def prefill(self, input_ids, start: int = 0):
        return rank_zeros(super().prefill(input_ids, start))

    def decode_one(self, token, position: int):
        return rank_zeros(super().decode_one(token, position))


def rank_zeros(t: torch.Tensor) -> torch.Tensor:
    t = t.contiguous()
    dist.broadcast(t, src=0)
    return t


# ----------------------------------------------------------------------------------------------
# Checkpoints: the same full form as one process writes


class ShardedState:
    """runs.WholeState for a sharded model: gathers the adapter and the optimizer state into the
    tensors one process would hold (every rank takes part; rank 0 writes them), and reads a
    checkpoint back by keeping this rank's rows of each tensor."""

    def gather(self, model, optimizer) -> tuple:
        """(a meta-device twin of the model holding the whole adapter, the optimizer's state dict)."""
        whole = {n: p.full_tensor().cpu() for n, p in model.named_parameters() if isinstance(p, DTensor) and p.requires_grad}
        twin = meta_twin(model)
        twin.load_state_dict(whole, strict=False, assign=True)
        state = optimizer.state_dict()  # its per-parameter dicts are the optimizer's own: not changed here
        state["state"] = {i: {k: v.full_tensor().cpu() if isinstance(v, DTensor) else v for k, v in s.items()}
                          for i, s in state["state"].items()}
        return twin, state

    def load(self, model, optimizer, adapter: dict, optimizer_state: dict | None = None):
        """Load a checkpoint's full adapter (checked as lora.load_lora_state_dict checks it) and
        optimizer state into this rank's rows."""
        lora.load_lora_state_dict(meta_twin(model), adapter)  # keys and shapes; the copy is a no-op on meta
        with torch.no_grad():
            for key, p in lora.lora_state_dict(model).items():
                copy_rows(p, adapter[key].to(p.device, p.dtype))
        if optimizer_state is None:
            return
        params = optimizer.param_groups[0]["params"]
        optimizer_state["state"] = {i: {k: own_part(v, params[i]) if k != "step" else v for k, v in s.items()}
                                    for i, s in optimizer_state["state"].items()}
        optimizer.load_state_dict(optimizer_state)


def own_part(full: torch.Tensor, like):
    """A whole tensor as a DTensor split as `like` is (a sharded parameter); only the local rows are kept."""
    if not isinstance(like, DTensor):
        return full
    return distribute_tensor(full.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


def meta_twin(model):
    """The model rebuilt on the meta device with the same adapter (shapes, names, LoRA config):
    what lora.save_adapter and lora.load_lora_state_dict need, without its sharded tensors."""
    with torch.device("meta"):
        twin = modeling.QwenForCausalLM(model.config)
    for name, cfg in model.lora_configs.items():
        lora.add_adapter(twin, cfg, name)
    return twin
