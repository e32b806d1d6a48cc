"""parallel.py: several processes under torchrun, as train.py uses them.

A first reading can skip this file: in one process it does nothing (rank 0 of 1, sums over one
rank return at once). Under `torchrun --nproc_per_node N train.py ...` each rank is one process:

    setup         join the process group (NCCL on GPUs, gloo on the CPU); each rank its own GPU
    Replicas      how the ranks share an optimizer step when each holds the whole model (data
                  parallelism): every world-th micro-batch (train.rank_passes), then the loss and
                  the LoRA gradients summed over the ranks in one all-reduce, once per step
    step_sharing  Replicas, or shard.Shards when --fsdp splits the model over the ranks
    decoder_for   decode.Decoder, or shard.RankZeroDecoder for a split model
    leave         the ranks leave together at the end

Proved equal by: tests/test_distributed.py (2 gloo ranks on the CPU train as one process does).
"""

import contextlib
import gc

import torch
import torch.distributed as dist

import cli
import runs
from decode import Decoder


def setup(device_flag):
    """(rank, world_size, device). One process unless torchrun set WORLD_SIZE."""
    rank, world = cli.rank_and_world()
    device = cli.pick_device(device_flag)
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", cli.rank_and_world(local=True)[0])
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def leave():
    """The end of a torchrun: every rank leaves once all are done, with the model and any pending
    collective work freed first (freed later, at interpreter exit, gloo's threads can abort the
    process: about one run in ten on the CPU)."""
    if dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


class Replicas:
    """How the ranks of a torchrun share an optimizer step when each holds the whole model (one
    process: rank 0 of 1): each runs every world-th micro-batch, then the loss and the LoRA gradients
    are summed over the ranks. shard.Shards is its twin for a model split over the ranks (--fsdp)."""

    lockstep = False  # ranks need not run as many passes as each other

    def __init__(self, rank: int = 0, world: int = 1):
        self.rank, self.world = rank, world
        self.states = runs.WholeState()  # what checkpoints save and restore

    def gradient_sync(self, last: bool):
        """Around each pass's backward: nothing to do here, the gradients are summed in reduce()."""
        return contextlib.nullcontext()

    def reduce(self, loss_sum, params):
        sum_over_ranks([loss_sum], self.world)
        sum_over_ranks([p.grad for p in params], self.world)


def sum_over_ranks(tensors: list, world: int):
    """Data parallelism: add up each tensor over the ranks, in place, in one all-reduce."""
    if world == 1:
        return
    flat = torch.cat([t.flatten() for t in tensors])
    dist.all_reduce(flat)
    for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(part.view_as(t))


def decoder_for(sharded: bool):
    """decode.Decoder, or for a model split over the ranks shard.RankZeroDecoder: every rank runs
    every forward, and all take rank 0's logits."""
    if not sharded:
        return Decoder
    import shard
    return shard.RankZeroDecoder


def step_sharing(rank: int, world: int, model, sharded: bool) -> Replicas:
    """How the ranks share each step: shard.Shards for a model split over them, else Replicas."""
    if not sharded:
        return Replicas(rank, world)
    import shard
    return shard.Shards(rank, world, model)
