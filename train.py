"""train.py: LoRA fine-tuning of a Qwen2 / Qwen2.5 / Qwen3 model, one visible loop from top to bottom.

    python train.py --model Qwen/Qwen3-4B-Instruct-2507 --dataset data/self_cognition.json \\
        --model_name swift-robot --model_author swift --num_train_epochs 10

takes the flags of ms-swift's `swift sft --train_type lora` with the same meaning. What happens:

1. Read and tokenize the datasets in the model's chat template (data.py, template.py): only
   assistant answers carry labels.
2. Load the base model in bf16 (model.py; with --quant_bits 4 its decoder layers in 4 bits,
   quant.py), wrap its linear layers with LoRA (lora.py): the base stays frozen, only the float32
   LoRA matrices A and B train (their matmuls run in bf16).
3. Each optimizer step runs `gradient_accumulation_steps` micro-batches. The loss of a step is
   the summed cross-entropy of its label tokens divided by the number of label tokens in the
   whole step (not a mean of per-batch means), so long and short answers weigh the same.
4. Clip the gradient norm, set the learning rate (linear warmup, then cosine) and step AdamW.
5. Every --eval_steps: validation loss. Every --save_steps and at the end: a checkpoint folder
   with the adapter in PEFT's format and everything needed to resume exactly (runs.py).

How the layers run on a GPU (CUDA graphs, compiled layers) is decided in speed.py and plugs in
as the function that runs one micro-batch; the loop below is the same whichever it is.

Several GPUs: `torchrun --nproc_per_node N train.py ...` is data parallelism: each rank runs its
share of every optimizer step's micro-batches, and their gradients are summed once per step
(DataParallel). With --fsdp true the model is split over the ranks instead (shard.py); the loop is
the same.
"""

import argparse
import gc
import math
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import cli
import data
import lora
import model as modeling
import quant
import runs
import speed
from cli import UsageError, str2bool
from data import DataError
from decode import Decoder, generate
from template import LOSS_SCALES, TEMPLATES, Template, choose_template, with_trained_thinking
from util import round_up

# ----------------------------------------------------------------------------------------------
# Flags: ms-swift's names and defaults


def build_parser() -> argparse.ArgumentParser:
    p = cli.FlagParser(description="LoRA fine-tuning of Qwen2 / Qwen2.5 / Qwen3 (flags as in `swift sft`).")
    model_flags(p)
    data_flags(p)
    lora_flags(p)
    cli.quant_flags(p)
    optimisation_flags(p)
    run_flags(p)
    scale_flags(p)
    p.add_swift_flags("train")
    return p


def model_flags(p):
    g = p.add_argument_group("model")
    g.add_argument("--model", required=True, help="local folder, hub id (Qwen/Qwen3-4B-Instruct-2507) or 'tiny' / 'tiny-qwen3' (built-in demos)")
    g.add_argument("--train_type", "--tuner_type", default="lora", help="only 'lora' (--tuner_type: ms-swift 4.x's name)")
    g.add_argument("--torch_dtype", default=None, help="bfloat16 | float16 | float32 (default: bfloat16 on GPU, float32 on CPU)")
    g.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if available)")
    g.add_argument("--cuda_graph", type=str2bool, default=None, help="replay each micro-batch as a CUDA graph (default: true on one GPU)")
    g.add_argument("--torch_compile", type=str2bool, default=None, help="compile the decoder layers (default: only long runs without graphs)")


def data_flags(p):
    g = p.add_argument_group("data")
    g.add_argument("--dataset", nargs="+", required=True, help="training data: .json/.jsonl files or hub ids; SOURCE#N samples N rows")
    g.add_argument("--val_dataset", nargs="*", default=[], help="validation data, same forms as --dataset")
    g.add_argument("--split_dataset_ratio", type=float, default=0.0, help="fraction of --dataset held out for validation")
    g.add_argument("--max_length", type=int, default=2048, help="longest row in tokens")
    g.add_argument("--truncation_strategy", default="delete", choices=["delete", "left", "right"], help="rows over --max_length: drop, or cut left or right")
    g.add_argument("--packing", type=str2bool, default=False, help="pack several rows into each --max_length row")
    g.add_argument("--padding_free", type=str2bool, default=None,
                   help="run each step's rows packed together, same gradient (default: true on a GPU in bf16)")
    g.add_argument("--max_tokens_per_pass", type=int, default=None,
                   help="most tokens in one packed forward/backward (default: --max_length)")
    g.add_argument("--system", default=None, help="system prompt for rows without one (default: the template's; Qwen3: none)")
    g.add_argument("--template", default=None, choices=list(TEMPLATES), help="chat template (default: the checkpoint's own, from tokenizer_config.json)")
    g.add_argument("--loss_scale", default=None, choices=LOSS_SCALES,
                   help="ignore_empty_think: no loss on an empty think block (default for hybrid Qwen3, as ms-swift)")
    g.add_argument("--enable_thinking", type=str2bool, default=None,
                   help="hybrid Qwen3: think before the --eval_prompts answers (rows train as written)")
    g.add_argument("--add_non_thinking_prefix", type=str2bool, default=True,
                   help="hybrid Qwen3: an empty think block before each answer without one, as ms-swift")
    g.add_argument("--model_name", nargs="+", default=None, help="replaces {{NAME}}: one value, or a Chinese and an English one")
    g.add_argument("--model_author", nargs="+", default=None, help="replaces {{AUTHOR}}: one value, or a Chinese and an English one")


def lora_flags(p):
    g = p.add_argument_group("LoRA")
    g.add_argument("--lora_rank", type=int, default=8, help="rank r of A (r x in) and B (out x r)")
    g.add_argument("--lora_alpha", type=float, default=32, help="scale alpha / r on the LoRA update")
    g.add_argument("--lora_dropout", type=float, default=0.05, help="dropout on the LoRA input")
    g.add_argument("--use_rslora", type=str2bool, default=False, help="scale alpha / sqrt(r) instead of alpha / r")
    g.add_argument("--target_modules", nargs="+", default=["all-linear"], help="'all-linear' or module names such as q_proj v_proj")


def optimisation_flags(p):
    g = p.add_argument_group("optimisation")
    g.add_argument("--num_train_epochs", type=float, default=3, help="passes over the training data")
    g.add_argument("--max_steps", type=int, default=-1, help="optimizer steps; overrides --num_train_epochs when > 0")
    g.add_argument("--per_device_train_batch_size", type=int, default=1, help="rows per micro-batch")
    g.add_argument("--per_device_eval_batch_size", type=int, default=1, help="rows per evaluation batch")
    g.add_argument("--gradient_accumulation_steps", type=int, default=None,
                   help="micro-batches per optimizer step (default: ceil(16 / (batch size x GPUs)), as ms-swift)")
    g.add_argument("--learning_rate", type=float, default=1e-4, help="peak learning rate")
    g.add_argument("--lr_scheduler_type", default="cosine", choices=["cosine", "linear", "constant", "constant_with_warmup"], help="decay after warmup")
    g.add_argument("--warmup_ratio", type=float, default=0.0, help="fraction of the steps spent warming up linearly")
    g.add_argument("--weight_decay", type=float, default=0.1, help="AdamW weight decay")
    g.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW beta1")
    g.add_argument("--adam_beta2", type=float, default=0.95, help="AdamW beta2")
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="clip the gradient norm to this (0 = off)")
    g.add_argument("--gradient_checkpointing", type=str2bool, default=True, help="recompute each layer in backward instead of storing it")
    g.add_argument("--activation_cpu_offload", type=str2bool, default=None,
                   help="keep each layer's checkpointed input in host memory (default: on a GPU for long rows)")
    g.add_argument("--seed", type=int, default=42, help="seed for sampling, shuffling, LoRA init and dropout")


def run_flags(p):
    g = p.add_argument_group("evaluation, checkpoints, logging")
    g.add_argument("--eval_steps", type=int, default=None, help="evaluate every N optimizer steps (default: --save_steps)")
    g.add_argument("--save_steps", type=int, default=500, help="save a checkpoint every N optimizer steps (and at the last)")
    g.add_argument("--save_total_limit", type=int, default=None, help="keep at most N checkpoints: the best by eval loss and the newest")
    g.add_argument("--logging_steps", type=int, default=5, help="print and log every N optimizer steps")
    g.add_argument("--output_dir", default=None, help="runs go to OUTPUT_DIR/vN-YYYYMMDD-HHMMSS/ (default: output/MODEL_NAME)")
    g.add_argument("--add_version", type=str2bool, default=True, help="create the vN-YYYYMMDD-HHMMSS subfolder")
    g.add_argument("--resume_from_checkpoint", default=None, help="a checkpoint folder, or a run folder (its newest checkpoint)")
    g.add_argument("--resume_only_model", type=str2bool, default=False, help="load only the checkpoint's adapter, into a new run")
    g.add_argument("--adapters", default=None, help="go on training this LoRA adapter (its rank and targets) in a new run")
    g.add_argument("--eval_prompts", nargs="*", default=[], help="questions answered greedily before and after training")


def scale_flags(p):
    g = p.add_argument_group("several GPUs (torchrun)")
    g.add_argument("--fsdp", nargs="+", default=None, metavar="VALUE",
                   help="true (or 'full_shard auto_wrap'): split the model over the ranks (FSDP2), not DDP")


def check_args(a):
    """Reject impossible flag values before anything slow happens; fill in the unset ones that
    ms-swift derives from others (set_derived_defaults)."""
    if a.train_type != "lora":
        raise UsageError(f"--train_type {a.train_type}: only 'lora' is supported by this toolkit.")
    positive = ["max_length", "max_tokens_per_pass", "per_device_train_batch_size", "per_device_eval_batch_size",
                "gradient_accumulation_steps", "eval_steps", "save_steps", "logging_steps", "lora_rank"]
    for name in positive:
        if getattr(a, name) is not None and getattr(a, name) < 1:  # None: set_derived_defaults below
            raise UsageError(f"--{name} must be at least 1, got {getattr(a, name)}.")
    if a.learning_rate <= 0:
        raise UsageError(f"--learning_rate must be positive, got {a.learning_rate}.")
    if a.num_train_epochs <= 0 and a.max_steps <= 0:
        raise UsageError("--num_train_epochs must be positive (or set --max_steps).")
    for name in ("split_dataset_ratio", "warmup_ratio", "lora_dropout"):
        if not 0 <= getattr(a, name) < 1:
            raise UsageError(f"--{name} must be in [0, 1), got {getattr(a, name)}.")
    if a.save_total_limit is not None and a.save_total_limit < 1:
        raise UsageError(f"--save_total_limit must be at least 1, got {a.save_total_limit}.")
    texts = [a.system or ""] + (a.model_name or []) + (a.model_author or [])
    if any(data.LONE_SURROGATE.search(text) for text in texts):
        raise UsageError("--system, --model_name or --model_author holds bytes that are not UTF-8 text; give them as UTF-8.")
    for name in ("model_name", "model_author"):
        if getattr(a, name) and len(getattr(a, name)) > 2:
            raise UsageError(f"--{name} takes one value, or a Chinese and an English value; got {len(getattr(a, name))}.")
    cli.pick_dtype(a.torch_dtype, torch.device("cpu"))  # a bad name fails here
    if a.fsdp:  # shard.py checks it, imported only when named: torch's FSDP takes a second to import
        import shard
        shard.check_flags(a)
    a.fsdp = bool(a.fsdp)
    problem = quant.flag_problem(a, cli.pick_dtype(a.torch_dtype, cli.pick_device(a.device)))
    if problem:
        raise UsageError(problem)
    if a.cuda_graph and cli.pick_device(a.device).type != "cuda":
        raise UsageError("--cuda_graph true needs a GPU, and this run is on the CPU: drop the flag or pass --device cuda.")
    problem = speed.offload_problem(a, cli.pick_device(a.device))
    if problem:
        raise UsageError(problem)
    for spec in a.dataset + a.val_dataset:
        path, _ = data.parse_source(spec)
        if path.endswith((".json", ".jsonl")) and not Path(path).exists():
            raise UsageError(f"--dataset {spec}: {path} does not exist.{data.shipped_hint(path)}")
    if a.resume_from_checkpoint and not Path(a.resume_from_checkpoint).is_dir():
        raise UsageError(f"--resume_from_checkpoint {a.resume_from_checkpoint}: no such folder.")
    set_derived_defaults(a)  # before the resume check, which compares them with the checkpoint's
    runs.check_resume(a, int(os.environ.get("WORLD_SIZE", "1")))


def set_derived_defaults(a):
    """ms-swift's defaults that depend on other flags, written into `a` (and so into args.json)."""
    if a.gradient_accumulation_steps is None:  # at least 16 rows per optimizer step over all GPUs
        world = int(os.environ.get("WORLD_SIZE", "1"))
        a.gradient_accumulation_steps = math.ceil(16 / (a.per_device_train_batch_size * world))
        log0(int(os.environ.get("RANK", "0")), f"Setting args.gradient_accumulation_steps: {a.gradient_accumulation_steps}")
    if a.eval_steps is None:
        a.eval_steps = a.save_steps
    if a.max_tokens_per_pass is None:  # packed passes need no more memory than one row of --max_length
        a.max_tokens_per_pass = a.max_length
    if a.output_dir is None:
        a.output_dir = str(Path("output") / Path(a.model.rstrip("/")).name)
    if a.adapters:  # ms-swift's --adapters: a new run from that adapter, with its LoRA shape
        cfg, _, _ = lora.read_adapter(a.adapters)
        a.lora_rank, a.lora_alpha, a.use_rslora = cfg.r, cfg.lora_alpha, cfg.use_rslora
        targets = cfg.target_modules
        a.target_modules = [targets] if isinstance(targets, str) else list(targets)
        a.resume_from_checkpoint, a.resume_only_model = a.adapters, True
    if a.torch_dtype is None:  # the dtype it trains in, for merge.py and for reading args.json
        a.torch_dtype = str(cli.pick_dtype(None, cli.pick_device(a.device))).removeprefix("torch.")
    if a.padding_free is None:  # packed where rows attend without a T x T mask: faster there, slower elsewhere
        device = cli.pick_device(a.device)
        a.padding_free = speed.varlen_available(device, cli.pick_dtype(a.torch_dtype, device))


# ----------------------------------------------------------------------------------------------
# Learning rate, loss, batches


def lr_at(step: int, total: int, warmup: int, peak: float, kind: str) -> float:
    """Learning rate for optimizer step `step` (0-based), as transformers' schedulers compute it."""
    if step < warmup:
        return peak * step / max(1, warmup)
    if kind in ("constant", "constant_with_warmup"):
        return peak
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "linear":
        return peak * max(0.0, 1.0 - progress)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


class CausalLMLoss(nn.Module):
    """The model and its summed next-token cross-entropy.

    Only positions whose next token has a label go through lm_head, in chunks that are
    recomputed during backward: the (tokens x 152k-vocab) float32 logits never exist at once.
    layers: the decoder layers to run (speed.TrainingPlan.training_layers); None: the model's own.
    packed_mask: how packed rows are kept apart (speed.TrainingPlan.packed_mask); None: model.block_mask."""

    def __init__(self, model, chunk: int = 256, layers=None, packed_mask=None):
        super().__init__()
        self.model, self.chunk, self.layers, self.packed_mask = model, chunk, layers, packed_mask

    def forward(self, input_ids, labels, attention_mask=None, position_ids=None, label_positions=None, cu_seqlens=None,
                inputs_embeds=None):
        """label_positions (N,): the flat positions b * T + t whose next token t + 1 has a label.
        make_batch finds them on the CPU; finding them here would make the CPU wait for the GPU.
        cu_seqlens: rows packed into one sequence start at these offsets (make_batch).
        inputs_embeds: input_ids' embeddings, when make_batch looked them up (its embed)."""
        h = self.model.model(input_ids, attention_mask, position_ids, layers=self.layers, cu_seqlens=cu_seqlens,
                             packed_mask=self.packed_mask, inputs_embeds=inputs_embeds)  # (B, T, hidden)
        if label_positions is None:
            label_positions = label_positions_of(labels)
        h = h.flatten(0, 1).index_select(0, label_positions)  # (N, hidden): position t predicts t + 1
        targets = labels.flatten().index_select(0, label_positions + 1)  # (N,)
        weight = self.model.lm_head.weight
        total = h.new_zeros((), dtype=torch.float32)
        for i in range(0, h.shape[0], self.chunk):
            # No randomness inside, so no random state to save and restore for the recomputation.
            total = total + torch.utils.checkpoint.checkpoint(
                chunk_loss, h[i:i + self.chunk], weight, targets[i:i + self.chunk], use_reentrant=False,
                preserve_rng_state=False)
        return total


def chunk_loss(h, weight, targets):
    logits = F.linear(h, weight).float()  # (n, vocab)
    return F.cross_entropy(logits, targets, reduction="sum")


def label_positions_of(labels):
    """(B, T) labels -> the flat positions b * T + t whose next token (t + 1) carries a label."""
    has_next = torch.zeros_like(labels, dtype=torch.bool)
    has_next[:, :-1] = labels[:, 1:] != data.IGNORE_INDEX
    return has_next.flatten().nonzero().squeeze(1)  # (N,)


def make_batch(rows, pad_id: int, device, pad_to: int = 1, embed=None) -> dict:
    """Rows -> a micro-batch on the device, right-padded to a multiple of pad_to tokens.

    Padding comes after each row's tokens, so causal attention alone already keeps every token from
    seeing it, and padding carries no labels: the attention mask is needed only to keep packed
    samples apart. Without one, attention runs as plain causal, its fastest kernel. One row of
    packed samples says where each starts (cu_seqlens) instead: no (B, T) mask.
    embed: token ids on the CPU -> their embeddings, when the embedding table is kept in host
    memory (speed.TrainingPlan.embedding): the batch brings them along as inputs_embeds."""
    batch = data.collate(rows, pad_id, pad_to)
    if len(rows) == 1 and "segment_ids" in rows[0]:
        batch["cu_seqlens"] = row_offsets(rows[0]["segment_ids"], batch["input_ids"].shape[1])
    if "cu_seqlens" in batch or not any("segment_ids" in r for r in rows):
        del batch["attention_mask"]
    batch["label_positions"] = label_positions_of(batch["labels"])
    if embed is not None:
        batch["inputs_embeds"] = embed(batch["input_ids"])
    if torch.device(device).type == "cuda":
        # From pinned memory the copy is queued behind the GPU work already there and the CPU goes
        # on to the next micro-batch; from ordinary memory the CPU would wait for it.
        return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
    return {k: v.to(device) for k, v in batch.items()}


def row_offsets(segment_ids, T: int) -> torch.Tensor:
    """cu_seqlens (int32) of one packed row padded to T tokens: where each sample starts, where the
    padding starts (the padding is a row of its own), then T. Its length is rounded up to a multiple
    of 16, plus one, by empty rows at the end (T repeated): replayed CUDA graphs need fixed shapes,
    and so rows of 1 to 15 samples share one shape, 16 to 31 another."""
    seg = torch.as_tensor(segment_ids)
    starts = ((seg[1:] != seg[:-1]).nonzero().squeeze(1) + 1).tolist()
    offsets = [0, *starts, len(seg)]
    return torch.tensor(offsets + [T] * (round_up(len(offsets), 16) + 1 - len(offsets)), dtype=torch.int32)


def step_passes(micro: list[list[dict]], budget: int | None) -> list[list[dict]]:
    """One rank's rows of an optimizer step, micro-batch by micro-batch -> the rows of each pass
    (one forward and backward) that runs.

    budget None: each micro-batch as it is (padded by make_batch). A budget (--padding_free, the
    default): all the step's rows packed into as few sequences of at most `budget` tokens as fit
    (data.pack_bins; a longer row runs alone), each row seeing only itself. The loss is summed over
    label tokens and divided by the whole step's count, so the gradient is the same either way: a
    micro-batch is a unit of memory, not of math. Without padding, no padding tokens are computed."""
    if budget is None:
        return micro
    rows = [r for mb in micro for r in mb]
    return [[data.concat_rows([rows[i] for i in members])]
            for members in data.pack_bins([len(r["input_ids"]) for r in rows], budget)]


def label_tokens(row) -> int:
    """Tokens that carry a loss in this row (labels shifted by one, as in the loss)."""
    return int((torch.as_tensor(row["labels"][1:]) != data.IGNORE_INDEX).sum())


def epoch_windows(n_rows: int, batch_size: int, accum: int, epoch: int, seed: int) -> list[list[list[int]]]:
    """The epoch's optimizer steps: each a list of micro-batches, each a list of row indices.

    The order depends only on (seed, epoch), so a resumed run sees exactly the same batches."""
    g = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(n_rows, generator=g).tolist()
    micro = [order[i:i + batch_size] for i in range(0, n_rows, batch_size)]
    return [micro[i:i + accum] for i in range(0, len(micro), accum)]


def steps_to_run(state: dict, n_rows: int, a, world: int, total_steps: int):
    """The optimizer steps left, from where `state` says the run stands (the middle of an epoch,
    after a resume): (epoch, steps of the epoch done after this one, the epoch's step count,
    this step's micro-batches of all ranks)."""
    step, epoch, start = state["global_step"], state["epoch"], state["step_in_epoch"]
    while step < total_steps:
        windows = epoch_windows(n_rows, a.per_device_train_batch_size, a.gradient_accumulation_steps * world, epoch, a.seed)
        for index in range(start, min(len(windows), start + total_steps - step)):
            yield epoch, index + 1, len(windows), windows[index]
        step += len(windows) - start
        epoch, start = epoch + 1, 0


# ----------------------------------------------------------------------------------------------
# One optimizer step


def micro_batch(loss_fn, batch: dict, scale: float) -> torch.Tensor:
    """Forward and backward of one micro-batch: adds the gradient of scale * loss to each
    parameter's .grad; returns the loss (summed over its label tokens). speed.CUDAGraphMicroBatches
    does the same as a replayed CUDA graph."""
    loss = loss_fn(**batch)
    (loss * scale).backward()
    return loss.detach()


@dataclass
class Step:
    """What every optimizer step uses, built once by train()."""

    rows: list  # the training rows: token ids and labels
    pad_id: int
    device: torch.device
    pad_to: int  # batches are padded to a multiple of this many tokens (speed.TrainingPlan)
    micro_batch: object  # (batch, scale) -> loss: micro_batch above, or its faster twin
    budget: int | None  # --max_tokens_per_pass for step_passes; None (--padding_free false): as they are
    params: list  # the LoRA parameters: the only ones that train
    optimizer: torch.optim.Optimizer
    loss_scale: "LossScale"
    max_grad_norm: float
    ranks: "DataParallel"  # how the ranks share the step: DataParallel below, or shard.FullyShard
    embed: object = None  # make_batch's embed: the plan's embedding in host memory, or None


def optimizer_step(s: Step, micro: list[list[int]], lr: float):
    """Run this rank's share of the step's micro-batches (as step_passes packs them), then clip
    and step. The step's gradient is sum(token losses) / (label tokens of the whole step, all
    ranks). Returns (loss per label token, gradient norm, tokens of the step)."""
    n_tokens = sum(label_tokens(s.rows[i]) for mb in micro for i in mb)
    scale = s.loss_scale.value / max(1, n_tokens)  # float16: times the loss scale, divided back below
    # Summed on the device and read once per step: reading it per micro-batch would make the CPU
    # wait for the GPU each time, instead of queueing the next micro-batch.
    loss_sum = torch.zeros(1, device=s.device, dtype=torch.float64)
    passes = lambda share: step_passes([[s.rows[i] for i in mb] for mb in share], s.budget)
    for rows, weight in s.ranks.share(micro, passes):  # weight 0: a repeat that only keeps sharded ranks in step
        loss_sum += weight * s.micro_batch(make_batch(rows, s.pad_id, s.device, s.pad_to, s.embed), weight * scale)
    s.ranks.reduce(loss_sum, s.params)
    s.loss_scale.unscale(s.params)
    grad_norm = torch.nn.utils.clip_grad_norm_(s.params, s.max_grad_norm if s.max_grad_norm > 0 else float("inf"))
    for group in s.optimizer.param_groups:
        group["lr"] = lr
    if s.loss_scale.update(grad_norm):  # False when float16 gradients overflowed: the step is skipped
        s.optimizer.step()
    # Gradients stay allocated and are zeroed in place (a recorded CUDA graph adds into them).
    s.optimizer.zero_grad(set_to_none=False)
    tokens = sum(len(s.rows[i]["input_ids"]) for mb in micro for i in mb)
    return loss_sum.item() / max(1, n_tokens), grad_norm, tokens


def step_sharing(a, rank: int, world: int, quantize) -> "DataParallel":
    """How the ranks share each optimizer step: shard.FullyShard under --fsdp true on several
    ranks, else DataParallel below (shard.py imported only then: see check_args)."""
    if not (a.fsdp and world > 1):
        return DataParallel(rank, world, quantize)
    import shard
    return shard.FullyShard(rank, world)


class DataParallel:
    """How the ranks of a torchrun share an optimizer step (one process: rank 0 of 1). Each holds
    the whole model and runs every world-th micro-batch; then the loss and the LoRA gradients are
    summed over the ranks. shard.FullyShard is its twin for a model split over the ranks (--fsdp)."""

    def __init__(self, rank: int = 0, world: int = 1, quantize=None):
        self.rank, self.world = rank, world
        self.states = runs.WholeState()  # what checkpoints save and restore
        # quant.settings of --quant_bits 4 (QLoRA): the decoder's linear layers kept in 4 bits,
        # dequantised for each matmul; None: the model as the checkpoint holds it
        self.quantize = quantize

    def load_lora_model(self, model_dir, cfg: lora.LoraConfig, seed: int, dtype, device):
        if self.quantize:
            model, _ = quant.load_quantized(str(model_dir), self.quantize, dtype, device)
        else:
            model, _ = modeling.load_model(str(model_dir), dtype=dtype, device=device)
        torch.manual_seed(seed)  # the LoRA init does not depend on how many random numbers loading used
        lora.add_adapter(model, cfg)
        return model

    def share(self, micro: list, passes) -> list:
        """(rows of a pass, weight of its loss) for each pass of the step this rank runs: every
        world-th micro-batch, made into passes by passes(micro-batches) (train.step_passes)."""
        return [(rows, 1.0) for rows in passes(micro[self.rank::self.world])]

    def reduce(self, loss_sum, params):
        sum_over_ranks([loss_sum], self.world)
        sum_over_ranks([p.grad for p in params], self.world)

    def new_decoder(self, model, max_len: int):
        return Decoder(model, max_len)


def sum_over_ranks(tensors: list, world: int):
    """Data parallelism: add up each tensor over the ranks, in place, in one all-reduce."""
    if world == 1:
        return
    flat = torch.cat([t.flatten() for t in tensors])
    dist.all_reduce(flat)
    for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(part.view_as(t))


class LossScale:
    """Dynamic loss scaling for float16 weights, as torch.amp.GradScaler does it.

    float16 keeps 5 exponent bits: gradients below about 6e-5 lose precision on their way back
    through float16 activations, and below 6e-8 they become zero. So the loss is multiplied by
    `value` before backward and the gradients are divided back before clipping. A step whose
    gradients overflowed (inf or NaN) is skipped and the scale halved; after `growth_interval` good
    steps in a row it doubles. bfloat16 and float32 have float32's range and need none of this:
    disabled, the scale is 1 and every step is taken."""

    def __init__(self, enabled: bool, value: float = 2.0**16, growth_interval: int = 2000):
        self.enabled, self.growth_interval, self.good_steps = enabled, growth_interval, 0
        self.value = value if enabled else 1.0
        self.skipped = False  # the last step was skipped

    def unscale(self, params):
        if self.enabled:
            torch._foreach_mul_([p.grad for p in params], 1.0 / self.value)  # one kernel for all

    def update(self, grad_norm: torch.Tensor) -> bool:
        """After unscaling: whether to take this step, given its gradient norm (read only when
        enabled: reading it makes the CPU wait for the GPU)."""
        if not self.enabled:
            return True
        self.skipped = not math.isfinite(grad_norm)
        if self.skipped:
            self.value, self.good_steps = self.value / 2, 0
            return False
        self.good_steps += 1
        if self.good_steps == self.growth_interval:
            self.value, self.good_steps = self.value * 2, 0
        return True


# ----------------------------------------------------------------------------------------------
# Evaluation and sample answers


@torch.no_grad()
def evaluate(model, rows, batch_size: int, pad_id: int, device) -> float:
    """Mean cross-entropy per label token over the validation rows."""
    was_training = model.training
    model.eval()
    loss_fn = CausalLMLoss(model)
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        total += loss_fn(**make_batch(chunk, pad_id, device)).item()
        count += sum(label_tokens(r) for r in chunk)
    model.train(was_training)
    return total / max(1, count)


@torch.no_grad()
def answer_prompts(model, tok, prompts, template, stop_ids, new_decoder=Decoder,
                   max_new_tokens=64) -> list[str]:
    """Greedy answers. new_decoder(model, max_len): a decode.Decoder, or a twin for a sharded model."""
    was_training = model.training
    model.eval()
    answers = []
    for q in prompts:
        ids, _ = data.encode_chat(tok, [{"role": "user", "content": q}], add_generation_prompt=True, template=template)
        decoder = new_decoder(model, len(ids) + max_new_tokens)
        out = [t for t in generate(model, ids, max_new_tokens, stop_ids, decoder=decoder) if t not in stop_ids]
        answers.append(tok.decode(out))
    model.train(was_training)
    return answers


def show_answers(title: str, prompts: list, answers: list, rank: int = 0):
    if rank != 0:
        return
    print(f"\nanswers {title}:")
    for q, answer in zip(prompts, answers):
        print(f"  Q: {q}\n  A: {answer[:160]!r}", flush=True)


# ----------------------------------------------------------------------------------------------
# Setting up: processes, data, model


def setup_distributed(device_flag):
    """(rank, world_size, device). One process unless torchrun set WORLD_SIZE."""
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    device = cli.pick_device(device_flag)
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def chat_template(a, model_dir, config) -> Template:
    """The checkpoint's chat template (or --template) with this run's settings; a.template is set
    to its name, so that args.json records it for inference (ours and ms-swift's)."""
    template = choose_template(model_dir, config.model_type, a.template, a.system, a.enable_thinking, a.loss_scale,
                               a.add_non_thinking_prefix)
    # --eval_prompts are asked as the rows train (unless --enable_thinking says otherwise); args.json records it.
    template = with_trained_thinking(template, dict(vars(a), template=template.name))
    a.template, a.loss_scale = template.name, template.loss_scale
    a.enable_thinking = template.enable_thinking if template.thinks == "hybrid" else a.enable_thinking
    return template


def load_data(a, tok, template) -> tuple[list, list]:
    """Read, substitute, sample, tokenize (in the chat template) and split: (training rows, validation rows)."""
    quiet = dist.is_initialized() and dist.get_rank() > 0  # every rank reads the data; one reports progress

    def rows_of(specs):
        return data.load_dataset(tok, specs, a.max_length, a.truncation_strategy, seed=a.seed,
                                 model_name=a.model_name, model_author=a.model_author,
                                 progress_over=math.inf if quiet else data.PROGRESS_OVER, template=template)

    train_rows, val_rows = data.split_dataset(rows_of(a.dataset), a.split_dataset_ratio, a.seed)
    val_rows += rows_of(a.val_dataset) if a.val_dataset else []
    if a.packing:
        train_rows = data.pack(train_rows, a.max_length)
    if not train_rows:
        raise DataError("no training rows are left after the validation split: lower --split_dataset_ratio or add data.")
    return train_rows, val_rows


def schedule(a, n_rows: int, world: int) -> tuple[int, int, int]:
    """(optimizer steps per epoch, in all, of warmup)."""
    steps_per_epoch = math.ceil(math.ceil(n_rows / a.per_device_train_batch_size) / (a.gradient_accumulation_steps * world))
    total = a.max_steps if a.max_steps > 0 else math.ceil(a.num_train_epochs * steps_per_epoch)
    return steps_per_epoch, total, math.ceil(a.warmup_ratio * total)


def load_lora_model(a, model_dir, dtype, device, ranks: DataParallel):
    """The base model with frozen weights and a fresh LoRA adapter: float32 A and B, the only
    parameters that train; their gradients allocated once, zeroed in place after each step."""
    targets = a.target_modules[0] if a.target_modules == ["all-linear"] else a.target_modules
    cfg = lora.LoraConfig(r=a.lora_rank, lora_alpha=a.lora_alpha, lora_dropout=a.lora_dropout,
                          target_modules=targets, use_rslora=a.use_rslora)
    model = ranks.load_lora_model(model_dir, cfg, a.seed, dtype, device)
    model.model.gradient_checkpointing = a.gradient_checkpointing
    if ranks.rank == 0:
        lora.print_trainable_parameters(model)
    params = lora.lora_parameters(model)
    for p in params:
        p.grad = torch.zeros_like(p)
    return model, params


def log0(rank, *a):
    if rank == 0 and any(a):
        print(*a, flush=True)


# ----------------------------------------------------------------------------------------------
# The training run


def train(a) -> int:
    rank, world, device = setup_distributed(a.device)
    dtype = cli.pick_dtype(a.torch_dtype, device)
    torch.manual_seed(a.seed)
    random.seed(a.seed)
    model_dir = cli.model_dir(a.model)
    config = modeling.Config.from_json(model_dir / "config.json")
    tok, template = data.Tokenizer(model_dir), chat_template(a, model_dir, config)
    log0(rank, f"chat template: {template.name}" + (f" (loss_scale {template.loss_scale})" if template.thinks != "never" else ""))
    train_rows, val_rows = load_data(a, tok, template)
    steps_per_epoch, total_steps, warmup = schedule(a, len(train_rows), world)
    log0(rank, f"data: {len(train_rows)} training rows, {len(val_rows)} validation rows; "
               f"{steps_per_epoch} optimizer steps per epoch, {total_steps} in all")
    plan = speed.plan_training(a, device, [len(r["input_ids"]) for r in train_rows],
                               total_steps * a.gradient_accumulation_steps, config)
    log0(rank, plan.message)
    plan.prepare(device)
    quantize = quant.settings(a)  # None without --quant_bits
    ranks = step_sharing(a, rank, world, quantize)
    model, params = load_lora_model(a, model_dir, dtype, device, ranks)
    optimizer = torch.optim.AdamW(params, lr=a.learning_rate, betas=(a.adam_beta1, a.adam_beta2),
                                  weight_decay=a.weight_decay, fused=device.type == "cuda")  # one kernel on a GPU
    loss_fn = CausalLMLoss(model, layers=plan.training_layers(model), packed_mask=plan.packed_mask)
    embed = plan.embedding(model)  # None, or the embedding moved to host memory (it looks up make_batch's rows)
    run = runs.open_run(a, model_dir, model, optimizer, total_steps, device, rank, world, ranks.states)
    loss_scale = LossScale(enabled=dtype == torch.float16)
    loss_scale.value = run.state.get("loss_scale", loss_scale.value)
    s = Step(train_rows, tok.endoftext_id, device, plan.pad_to, plan.micro_batch_fn(loss_fn, params, micro_batch),
             a.max_tokens_per_pass if a.padding_free else None, params, optimizer, loss_scale, a.max_grad_norm, ranks,
             embed)
    stop_ids = modeling.stop_ids(modeling.load_generation_config(model_dir), model.config, tok.im_end_id)
    answers = lambda: answer_prompts(model, tok, a.eval_prompts, template, stop_ids, ranks.new_decoder)  # on every rank
    if a.eval_prompts:
        show_answers("before training", a.eval_prompts, answers(), rank)

    model.train()
    with runs.StopSignals(rank, world, device) as stop:
        for epoch, done_in_epoch, epoch_steps, micro in steps_to_run(run.state, len(train_rows), a, world, total_steps):
            step = run.state["global_step"] + 1
            lr = lr_at(step - 1, total_steps, warmup, a.learning_rate, a.lr_scheduler_type)
            loss, grad_norm, tokens = optimizer_step(s, micro, lr)
            run.end_step(epoch, done_in_epoch, loss, tokens, loss_scale)
            last, stopping = step == total_steps, stop.agreed()
            if step % a.logging_steps == 0 or last:
                run.log_progress(epoch + done_in_epoch / epoch_steps, lr, grad_norm)
            if val_rows and (step % a.eval_steps == 0 or last):
                run.log_eval(lambda: evaluate(model, val_rows, a.per_device_eval_batch_size, tok.endoftext_id, device))
            if step % a.save_steps == 0 or last or stopping:
                run.save(model, optimizer, a.save_total_limit)
            if stopping:
                break
    run.finish(stop.requested)
    if a.eval_prompts and not stop.requested:
        show_answers("after training", a.eval_prompts, answers(), rank)
    return 130 if stop.requested else 0


def main(argv=None) -> int:
    def checked_train():
        a = build_parser().parse_args(argv)
        check_args(a)
        code = train(a)
        if dist.is_initialized():  # torchrun: leave together, with the model and its pending work freed first
            gc.collect()
            dist.barrier()
            dist.destroy_process_group()
        return code

    return cli.run_main(checked_train, "interrupted before training started; nothing was written.")


if __name__ == "__main__":
    sys.exit(main())
