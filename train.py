"""train.py: LoRA fine-tuning of a Qwen2 / Qwen2.5 model, one visible loop from top to bottom.

    python train.py --model Qwen/Qwen2.5-7B-Instruct --dataset self_cognition.json \\
        --model_name swift-robot --model_author swift --num_train_epochs 10

takes the flags of ms-swift's `swift sft --train_type lora` with the same meaning. What happens:

1. Read and tokenize the datasets (data.py): only assistant answers carry labels.
2. Load the base model in bf16 (model.py), wrap its linear layers with LoRA (lora.py): the base
   stays frozen, only the float32 LoRA matrices A and B train (their matmuls run in bf16).
3. Each optimizer step runs `gradient_accumulation_steps` micro-batches. The loss of a step is
   the summed cross-entropy of its label tokens divided by the number of label tokens in the
   whole step (not a mean of per-batch means), so long and short answers weigh the same.
   On a GPU each micro-batch shape is recorded once as a CUDA graph and replayed after that
   (CUDAGraphMicroBatches): the same kernels and gradients, launched at once.
4. Clip the gradient norm, set the learning rate (linear warmup, then cosine) and step AdamW.
5. Every --eval_steps: validation loss. Every --save_steps and at the end: a checkpoint folder
   with the adapter in PEFT's format and everything needed to resume exactly.

Several GPUs: `torchrun --nproc_per_node N train.py ...` runs DistributedDataParallel; each
rank takes its share of every optimizer step's micro-batches and gradients are averaged once
per step.
"""

import argparse
import json
import math
import os
import random
import shutil
import signal
import sys
import time
import warnings
from contextlib import nullcontext
from datetime import datetime
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import data
import lora
import model as modeling
from data import DataError
from lora import LoraError
from model import ModelError, str2bool


class UsageError(Exception):
    """A flag value that cannot work, found before anything is loaded."""


# ----------------------------------------------------------------------------------------------
# Flags: ms-swift's names and defaults


def build_parser() -> argparse.ArgumentParser:
    p = modeling.FlagParser(description="LoRA fine-tuning of Qwen2 / Qwen2.5 (flags as in `swift sft`).",
                            formatter_class=modeling.DefaultsHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", required=True, help="base model: local folder, hub id (Qwen/Qwen2.5-7B-Instruct) or 'tiny' (built-in demo model)")
    g.add_argument("--model_type", default=None, help="accepted for ms-swift compatibility; only Qwen2 / Qwen2.5 exist here")
    g.add_argument("--train_type", default="lora", help="only 'lora' is supported")
    g.add_argument("--torch_dtype", default=None, help="dtype of the frozen base weights: bfloat16 | float16 | float32 (default: bfloat16 on GPU, float32 on CPU)")
    g.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if available)")
    g.add_argument("--cuda_graph", type=str2bool, default=None, help="on a GPU, record each micro-batch shape's forward and backward once as a CUDA graph and replay it: the same kernels and gradients, launched at once instead of one by one from Python, several times faster at short sequences; batches are padded to a multiple of 64 tokens (for --max_length 2048). With --torch_compile, the compiled layers are replayed instead. (default: true on a GPU, in one process; under torchrun only with --torch_compile)")
    g.add_argument("--torch_compile", type=str2bool, default=None, help="compile each decoder layer with torch.compile: fused kernels, same math; each sequence length compiles for a minute or two, which pays back only in long runs (default: false, except under torchrun or with --cuda_graph false, on a GPU, for runs with at least 500 micro-batches per length)")

    g = p.add_argument_group("data")
    g.add_argument("--dataset", nargs="+", required=True, help="training data: .json/.jsonl files or hub dataset ids; SOURCE#N samples N rows")
    g.add_argument("--val_dataset", nargs="*", default=[], help="validation data, same forms as --dataset")
    g.add_argument("--split_dataset_ratio", type=float, default=0.0, help="fraction of --dataset held out for validation")
    g.add_argument("--max_length", type=int, default=2048, help="longest row in tokens")
    g.add_argument("--truncation_strategy", default="delete", choices=["delete", "left", "right"], help="rows longer than --max_length: drop them, or cut from the left or right")
    g.add_argument("--packing", type=str2bool, default=False, help="pack several rows into each --max_length row (they do not attend to each other)")
    g.add_argument("--system", default=None, help="system prompt for rows without one (default: Qwen2.5's own); stored for infer.py")
    g.add_argument("--model_name", nargs="+", default=None, help="replaces {{NAME}} in the data: one value, or a Chinese and an English value")
    g.add_argument("--model_author", nargs="+", default=None, help="replaces {{AUTHOR}} in the data: one value, or a Chinese and an English value")
    g.add_argument("--dataloader_num_workers", type=int, default=0, help="accepted for ms-swift compatibility; data is tokenized up front, no workers needed")

    g = p.add_argument_group("LoRA")
    g.add_argument("--lora_rank", type=int, default=8, help="rank r of A (r x in) and B (out x r)")
    g.add_argument("--lora_alpha", type=float, default=32, help="scale alpha / r on the LoRA update")
    g.add_argument("--lora_dropout", type=float, default=0.05, help="dropout on the LoRA input")
    g.add_argument("--use_rslora", type=str2bool, default=False, help="scale alpha / sqrt(r) instead of alpha / r")
    g.add_argument("--target_modules", nargs="+", default=["all-linear"], help="'all-linear' or module names / suffixes such as q_proj v_proj")

    g = p.add_argument_group("optimisation")
    g.add_argument("--num_train_epochs", type=float, default=3, help="passes over the training data")
    g.add_argument("--max_steps", type=int, default=-1, help="optimizer steps; overrides --num_train_epochs when > 0")
    g.add_argument("--per_device_train_batch_size", type=int, default=1, help="rows per micro-batch")
    g.add_argument("--per_device_eval_batch_size", type=int, default=1, help="rows per evaluation batch")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--learning_rate", type=float, default=1e-4, help="peak learning rate")
    g.add_argument("--lr_scheduler_type", default="cosine", choices=["cosine", "linear", "constant", "constant_with_warmup"], help="decay after warmup")
    g.add_argument("--warmup_ratio", type=float, default=0.0, help="fraction of the steps spent warming up linearly")
    g.add_argument("--weight_decay", type=float, default=0.1, help="AdamW weight decay")
    g.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW beta1")
    g.add_argument("--adam_beta2", type=float, default=0.95, help="AdamW beta2")
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="clip the gradient norm to this (0 = off)")
    g.add_argument("--gradient_checkpointing", type=str2bool, default=True, help="recompute each layer in backward instead of storing its activations")
    g.add_argument("--seed", type=int, default=42, help="seed for sampling, shuffling, LoRA init and dropout")

    g = p.add_argument_group("evaluation, checkpoints, logging")
    g.add_argument("--eval_steps", type=int, default=500, help="evaluate every N optimizer steps (needs validation data)")
    g.add_argument("--save_steps", type=int, default=500, help="save a checkpoint every N optimizer steps (and always at the last)")
    g.add_argument("--save_total_limit", type=int, default=None, help="keep at most N checkpoints: the best by eval loss and the newest")
    g.add_argument("--logging_steps", type=int, default=5, help="print and log every N optimizer steps")
    g.add_argument("--output_dir", default="output", help="runs go to OUTPUT_DIR/vN-YYYYMMDD-HHMMSS/")
    g.add_argument("--add_version", type=str2bool, default=True, help="create the vN-YYYYMMDD-HHMMSS subfolder")
    g.add_argument("--resume_from_checkpoint", default=None, help="a checkpoint folder, or a run folder (its newest complete checkpoint)")
    g.add_argument("--eval_prompts", nargs="*", default=[], help="questions answered greedily before and after training, to see what changed")
    return p


def check_args(a):
    """Reject impossible flag values before anything slow happens."""
    if a.train_type != "lora":
        raise UsageError(f"--train_type {a.train_type}: only 'lora' is supported by this toolkit.")
    positive = ["max_length", "per_device_train_batch_size", "per_device_eval_batch_size",
                "gradient_accumulation_steps", "eval_steps", "save_steps", "logging_steps", "lora_rank"]
    for name in positive:
        if getattr(a, name) < 1:
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
    if a.dataloader_num_workers < 0:
        raise UsageError("--dataloader_num_workers cannot be negative.")
    for name in ("model_name", "model_author"):
        if getattr(a, name) and len(getattr(a, name)) > 2:
            raise UsageError(f"--{name} takes one value, or a Chinese and an English value; got {len(getattr(a, name))}.")
    if a.torch_dtype is not None:
        modeling.parse_dtype(a.torch_dtype)
    if a.device is not None and not (a.device == "cpu" or a.device.startswith("cuda")):
        raise UsageError(f"--device {a.device}: use cpu, cuda or cuda:N.")
    if a.device and a.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {a.device}: no CUDA GPU is visible to PyTorch here. Use --device cpu.")
    if a.cuda_graph and not a.torch_compile and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError("--cuda_graph true records whole micro-batches, which works in one process only, and this is a "
                         "torchrun run: add --torch_compile true (its compiled layers replay their own graphs) or drop --cuda_graph.")
    if a.cuda_graph and not (a.device or modeling.default_device()).startswith("cuda"):
        raise UsageError("--cuda_graph true needs a GPU, and this run is on the CPU: drop the flag or pass --device cuda.")
    for spec in a.dataset + a.val_dataset:
        path, _ = data.parse_source(spec)
        if path.endswith((".json", ".jsonl")) and not Path(path).exists():
            raise UsageError(f"--dataset {spec}: {path} does not exist.{data.shipped_hint(path)}")
    if a.resume_from_checkpoint and not Path(a.resume_from_checkpoint).is_dir():
        raise UsageError(f"--resume_from_checkpoint {a.resume_from_checkpoint}: no such folder.")


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
    """The model and its summed next-token cross-entropy, as one module so that DDP can wrap it.

    Only positions whose next token has a label go through lm_head, in chunks that are
    recomputed during backward: the (tokens x 152k-vocab) float32 logits never exist at once."""

    def __init__(self, model, chunk: int = 256):
        super().__init__()
        self.model, self.chunk = model, chunk

    def forward(self, input_ids, labels, attention_mask=None, position_ids=None, label_positions=None):
        """label_positions (N,): the flat positions b * T + t whose next token t + 1 has a label.
        make_batch finds them on the CPU; finding them here would make the CPU wait for the GPU."""
        h = self.model.model(input_ids, attention_mask, position_ids)  # (B, T, hidden)
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


def every_position(batch_size: int, length: int) -> torch.Tensor:
    """The flat positions b * T + t of every token but each row's last: all that can have a next token."""
    return torch.arange(batch_size * length).view(batch_size, length)[:, :-1].flatten()


def make_batch(rows, pad_id: int, device, pad_to: int = 1, fixed_shapes: bool = False) -> dict:
    """Rows -> a micro-batch on the device, right-padded to a multiple of pad_to tokens.

    Padding comes after each row's tokens, so causal attention alone already keeps every token from
    seeing it, and padding carries no labels: the attention mask is needed only to keep packed
    samples apart. Without one, attention runs as plain causal, its fastest kernel.
    fixed_shapes (CUDA graphs): the loss reads every position, not just those with a label (the
    others are IGNORE_INDEX and add nothing), so that every tensor's shape depends on (B, T) only."""
    batch = data.collate(rows, pad_id, pad_to)
    if not any("segment_ids" in r for r in rows):
        del batch["attention_mask"]
    if fixed_shapes:
        batch["label_positions"] = every_position(*batch["labels"].shape)
    else:
        batch["label_positions"] = label_positions_of(batch["labels"])
    if torch.device(device).type == "cuda":
        # From pinned memory the copy is queued behind the GPU work already there and the CPU goes
        # on to the next micro-batch; from ordinary memory the CPU would wait for it.
        return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
    return {k: v.to(device) for k, v in batch.items()}


def label_tokens(row) -> int:
    """Tokens that carry a loss in this row (labels shifted by one, as in the loss)."""
    return sum(1 for l in row["labels"][1:] if l != data.IGNORE_INDEX)


def epoch_windows(n_rows: int, batch_size: int, accum: int, epoch: int, seed: int) -> list[list[list[int]]]:
    """The epoch's optimizer steps: each a list of micro-batches, each a list of row indices.

    The order depends only on (seed, epoch), so a resumed run sees exactly the same batches."""
    g = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(n_rows, generator=g).tolist()
    micro = [order[i:i + batch_size] for i in range(0, n_rows, batch_size)]
    return [micro[i:i + accum] for i in range(0, len(micro), accum)]


# ----------------------------------------------------------------------------------------------
# Run folder, checkpoints, logs


def new_run_dir(output_dir: str, add_version: bool) -> Path:
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not add_version:
        return out
    versions = [int(p.name[1:].split("-")[0]) for p in out.glob("v*-*") if p.name[1:].split("-")[0].isdigit()]
    run = out / f"v{max(versions, default=-1) + 1}-{datetime.now():%Y%m%d-%H%M%S}"
    run.mkdir()
    return run


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """checkpoint-STEP folders of a run, oldest first. Half-written ones never carry this name."""
    ckpts = [p for p in run_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()
             and (p / "trainer_state.json").exists()]
    return sorted(ckpts, key=lambda p: int(p.name.split("-")[-1]))


def find_resume_checkpoint(path: str) -> Path:
    p = Path(path)
    if (p / "trainer_state.json").exists():
        return p
    ckpts = complete_checkpoints(p)
    if not ckpts:
        raise UsageError(f"--resume_from_checkpoint {path}: no complete checkpoint-STEP folder in it (a checkpoint holds trainer_state.json).")
    return ckpts[-1]


def save_checkpoint(run_dir: Path, model, optimizer, state: dict, args_dict: dict, rng: dict) -> Path:
    """Write checkpoint-STEP atomically: into a temporary folder, renamed into place when complete."""
    final = run_dir / f"checkpoint-{state['global_step']}"
    tmp = run_dir / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    lora.save_adapter(model, tmp, base_model_name_or_path=args_dict["model"])
    (tmp / "args.json").write_text(json.dumps(args_dict, indent=2, ensure_ascii=False) + "\n")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(rng, tmp / "rng_state.pt")
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")  # written last
    if final.exists():  # a checkpoint of the same step from an earlier attempt
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def prune_checkpoints(run_dir: Path, limit: int | None, best: str | None):
    """Keep the newest `limit` checkpoints, and always the best one by eval loss."""
    if limit is None:
        return
    ckpts = complete_checkpoints(run_dir)
    keep = ckpts[-limit:]
    if best is not None and run_dir / best not in keep:
        keep = [run_dir / best] + ckpts[-max(1, limit - 1):]
    for p in ckpts:
        if p not in keep:
            shutil.rmtree(p)


def rng_state(device) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def write_loss_svg(path: Path, series: dict[str, list[tuple[int, float]]]):
    """A loss-curve image as SVG: plain text, no plotting library needed."""
    pts = [p for s in series.values() for p in s]
    if not pts:
        return
    W, H, L, B = 640, 360, 60, 40  # size, left and bottom margins
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1e-6)
    sx = lambda x: L + (x - x0) / (x1 - x0) * (W - L - 20)
    sy = lambda y: 20 + (y1 - y) / (y1 - y0) * (H - B - 20)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<line x1="{L}" y1="{H - B}" x2="{W - 20}" y2="{H - B}" stroke="black"/>',
           f'<line x1="{L}" y1="20" x2="{L}" y2="{H - B}" stroke="black"/>']
    for i in range(5):
        y = y0 + (y1 - y0) * i / 4
        out.append(f'<text x="{L - 6}" y="{sy(y) + 4:.1f}" text-anchor="end">{y:.3g}</text>')
        x = x0 + (x1 - x0) * i / 4
        out.append(f'<text x="{sx(x):.1f}" y="{H - B + 16}" text-anchor="middle">{x:.0f}</text>')
    out.append(f'<text x="{(W + L) / 2}" y="{H - 6}" text-anchor="middle">step</text>')
    for (name, s), color, ly in zip(series.items(), ("#1f77b4", "#d62728"), (20, 36)):
        if s:
            line = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in s)
            out.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{line}"/>')
            out.append(f'<text x="{W - 30}" y="{ly}" text-anchor="end" fill="{color}">{name}</text>')
    out.append("</svg>")
    path.write_text("\n".join(out) + "\n")


def fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


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
        batch = make_batch(chunk, pad_id, device)  # no gradients: the eager layers, any length
        total += loss_fn(**batch).item()
        count += sum(label_tokens(r) for r in chunk)
    model.train(was_training)
    return total / max(1, count)


@torch.no_grad()
def answer_prompts(model, tok, prompts, system, stop_ids, max_new_tokens=64) -> list[str]:
    from infer import generate
    was_training = model.training
    model.eval()
    answers = []
    for q in prompts:
        ids, _ = data.encode_chat(tok, [{"role": "user", "content": q}], add_generation_prompt=True, system=system)
        out = [t for t in generate(model, ids, max_new_tokens, stop_ids) if t not in stop_ids]
        answers.append(tok.decode(out))
    model.train(was_training)
    return answers


# ----------------------------------------------------------------------------------------------
# Distributed setup (torchrun)


def fast_float32_matmul(device):
    """On GPUs, let float32 matmuls (a --torch_dtype float32 run) use TF32 tensor cores (10-bit
    mantissa); plain float32 runs them on the slow CUDA cores. bf16 runs do not use it."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True


class CUDAGraphMicroBatches:
    """Training micro-batches whose forward, loss and backward are recorded once per shape as a
    CUDA graph, and replayed for every later micro-batch of that shape.

    Eager layers are bound by the CPU at short sequences: a 64-token micro-batch of the 7B shape
    launches some 9,000 small kernels one by one from Python, about 300 ms on an H100 for 30 ms of
    GPU work. A replay launches them all at once: 39 ms (BENCHMARKS.md, run 15). Nothing is
    compiled: the first micro-batch of a shape runs eagerly, then the same code is recorded, in
    about a second. The graph holds the very kernels eager runs launch, so the gradients are eager's
    bit for bit, dropout and gradient checkpointing included: each replay draws fresh dropout masks,
    and the checkpoint's recomputation draws the same masks as its forward.

    A replay repeats fixed work on fixed memory, so: every shape depends only on the micro-batch's
    (B, T) (make_batch(fixed_shapes=True), batches padded to a few lengths); inputs are copied into
    the graph's own tensors; gradients are added into .grad tensors that never move (zeroed in place,
    never set to None); and the training runs on a side stream (the default stream cannot be
    recorded, and autograd must not reach back to it).
    """

    def __init__(self, loss_module, params):
        self.loss_module, self.params = loss_module, params
        self.graphs = {}  # shapes of the inputs -> (graph, its input tensors, its loss)
        self.pool = torch.cuda.graph_pool_handle()  # one memory pool for all: only one runs at a time

    def __call__(self, batch: dict, scale: float) -> torch.Tensor:
        """Add the gradient of scale * loss to each parameter's .grad; return the summed loss (a
        tensor that the next call overwrites)."""
        key = tuple((k, tuple(v.shape)) for k, v in sorted(batch.items()))
        if key not in self.graphs:
            inputs = dict(batch, scale=torch.full((), scale, device=batch["labels"].device))
            loss = self._run(inputs)  # a real micro-batch, and the warm-up that recording needs
            graph, static = torch.cuda.CUDAGraph(), {k: v.clone() for k, v in inputs.items()}
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
        graph, static, static_loss = self.graphs[key]
        for k, v in batch.items():
            static[k].copy_(v)
        static["scale"].fill_(scale)
        graph.replay()
        return static_loss

    def _run(self, inputs: dict) -> torch.Tensor:
        inputs = dict(inputs)
        scale = inputs.pop("scale")
        loss = self.loss_module(**inputs)
        # autograd.grad and an explicit add, not backward(): the sum stays in the .grad tensors,
        # whatever autograd would otherwise decide about accumulating in place.
        grads = torch.autograd.grad(loss, self.params, grad_outputs=scale)
        for p, g in zip(self.params, grads):
            p.grad.add_(g)
        return loss.detach()


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

    def unscale(self, params):
        if self.enabled:
            torch._foreach_mul_([p.grad for p in params], 1.0 / self.value)  # one kernel for all

    def update(self, grad_norm: torch.Tensor) -> bool:
        """After unscaling: whether to take this step, given its gradient norm (read only when
        enabled: reading it makes the CPU wait for the GPU)."""
        if not self.enabled:
            return True
        if not math.isfinite(grad_norm):
            self.value, self.good_steps = self.value / 2, 0
            return False
        self.good_steps += 1
        if self.good_steps == self.growth_interval:
            self.value, self.good_steps = self.value * 2, 0
        return True


# On the 7B shape on an H100 (BENCHMARKS.md, run 14), the first micro-batch of a new sequence
# length takes about two minutes while the layer compiles (from a cold cache), and each one after
# it 45 ms instead of the eager 300 ms at 64 tokens: compiling pays back after some 500
# micro-batches of a length. A short run (the self-cognition demo: 192 micro-batches over 3
# lengths) is several times faster eager.
COMPILE_PAYS_BACK = 500  # micro-batches per compiled sequence length


def use_compile(a, device, micro_batches: int, n_lengths: int, world: int = 1) -> tuple[bool, str]:
    """Whether to compile the layers and the reason to print ('' if --torch_compile was given).

    Not by default where whole micro-batches replay as CUDA graphs (a GPU, one process): that is
    as fast at short sequences, within about 20% at 2,048 tokens (BENCHMARKS.md, run 15), and costs
    a second a length instead of minutes. Elsewhere on a GPU only for a run long enough to pay back
    compiling each length."""
    if a.torch_compile is not None:
        return a.torch_compile, ""
    if device.type != "cuda":
        return False, ""
    if world == 1 and a.cuda_graph is not False:
        return False, ""
    per_length = micro_batches // max(n_lengths, 1)
    if per_length >= COMPILE_PAYS_BACK:
        return True, (f" (chosen because this run has {micro_batches} micro-batches over {n_lengths} lengths, "
                      f"{per_length} a length; --torch_compile false for eager layers)")
    return False, (f": this run has {micro_batches} micro-batches over {n_lengths} sequence lengths, {per_length} a "
                   f"length, and compiling (a minute or two a length) pays back only from about {COMPILE_PAYS_BACK} "
                   "a length; --torch_compile true compiles anyway")


def setup_distributed(device_flag):
    """(rank, world_size, device). Single process unless torchrun set WORLD_SIZE."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if device_flag:
        device = torch.device(device_flag)
    else:
        device = torch.device(modeling.default_device())
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def log0(rank, *a, **k):
    if rank == 0:
        print(*a, **k, flush=True)


# ----------------------------------------------------------------------------------------------
# The training run


def train(a):
    rank, world, device = setup_distributed(a.device)
    fast_float32_matmul(device)
    dtype = modeling.parse_dtype(a.torch_dtype) if a.torch_dtype else modeling.default_dtype(device)
    torch.manual_seed(a.seed)
    random.seed(a.seed)

    # 1. Data: read, substitute, sample, tokenize, split.
    model_dir = modeling.resolve_model_dir(a.model)
    tok = data.Tokenizer(model_dir)
    convs = data.load_conversations(a.dataset, seed=a.seed, model_name=a.model_name, model_author=a.model_author)
    rows = data.encode_dataset(tok, convs, a.max_length, a.truncation_strategy, system=a.system)
    train_rows, val_rows = data.split_dataset(rows, a.split_dataset_ratio, a.seed)
    if a.val_dataset:
        val_convs = data.load_conversations(a.val_dataset, seed=a.seed, model_name=a.model_name, model_author=a.model_author)
        val_rows += data.encode_dataset(tok, val_convs, a.max_length, a.truncation_strategy, system=a.system)
    if a.packing:
        train_rows = data.pack(train_rows, a.max_length)
    if not train_rows:
        raise DataError("no training rows are left after the validation split: lower --split_dataset_ratio or add data.")
    global_accum = a.gradient_accumulation_steps * world  # micro-batches per optimizer step, all ranks
    steps_per_epoch = math.ceil(math.ceil(len(train_rows) / a.per_device_train_batch_size) / global_accum)
    total_steps = a.max_steps if a.max_steps > 0 else math.ceil(a.num_train_epochs * steps_per_epoch)
    warmup = math.ceil(a.warmup_ratio * total_steps)
    log0(rank, f"data: {len(train_rows)} training rows, {len(val_rows)} validation rows; "
               f"{steps_per_epoch} optimizer steps per epoch, {total_steps} in all")

    # How the layers run on a GPU: by default each micro-batch shape is recorded once as a CUDA graph
    # and replayed (one process), or the layers are compiled (--torch_compile). Either way each
    # sequence length is recorded or compiled once, so batches are padded to at most 32 lengths
    # (64 tokens apart for --max_length 2048).
    compile_pad = max(64, -(-a.max_length // 32))
    lengths = sorted({data.padded_length(len(r["input_ids"]), compile_pad) for r in train_rows})
    compiled, why = use_compile(a, device, total_steps * a.gradient_accumulation_steps, len(lengths), world)
    batch_graphs = device.type == "cuda" and world == 1 and not compiled and a.cuda_graph is not False
    layer_graphs = compiled and device.type == "cuda" and a.cuda_graph is not False
    pad_to = compile_pad if compiled or batch_graphs else 1
    padding = (f"batches are padded to multiples of {pad_to} tokens, here at most {len(lengths)} lengths "
               f"({', '.join(map(str, lengths[:8]))}{', ...' if len(lengths) > 8 else ''})")
    if batch_graphs:
        log0(rank, f"CUDA graphs: each micro-batch shape runs eagerly once and is then replayed as one recorded graph; "
                   f"{padding}; --cuda_graph false runs every one eagerly")
        torch.cuda.set_stream(torch.cuda.Stream(device))  # see CUDAGraphMicroBatches
        # On this stream autograd's worker thread finds no CUDA context the first time it calls
        # cuBLAS, says so, and sets it itself: nothing for a user to act on.
        warnings.filterwarnings("ignore", message="Attempting to run cuBLAS, but there was no current CUDA context")
    elif compiled:
        log0(rank, f"compiled layers{' replayed as CUDA graphs' if layer_graphs else ''}: {padding}; "
                   f"each is compiled the first time it comes, so early steps are slow{why}")
    elif why:
        log0(rank, f"eager layers{why}")

    # 2. Model: bf16 base, float32 LoRA; only LoRA trains.
    model, _ = modeling.load_model(str(model_dir), dtype=dtype, device=device)
    torch.manual_seed(a.seed)  # the LoRA init does not depend on how many random numbers loading used
    targets = a.target_modules[0] if a.target_modules == ["all-linear"] else a.target_modules
    cfg = lora.LoraConfig(r=a.lora_rank, lora_alpha=a.lora_alpha, lora_dropout=a.lora_dropout,
                          target_modules=targets, use_rslora=a.use_rslora)
    lora.add_adapter(model, cfg)
    model.model.gradient_checkpointing = a.gradient_checkpointing
    if compiled:
        if device.type == "cpu" and torch.cuda.is_available():
            # torch.compile starts CUDA when it sees a GPU, even for a CPU model, and an activation
            # checkpoint refuses a device first started inside its forward: start it now.
            torch.cuda.init()
        model.model.compile_layers(cuda_graphs=layer_graphs)
    if rank == 0:
        lora.print_trainable_parameters(model)
    lora_params = lora.lora_parameters(model)
    # With CUDA graphs, gradients stay allocated and are zeroed in place: backward then adds into
    # them, never taking over a tensor that a graph will write again in the next micro-batch.
    keep_grads = layer_graphs or batch_graphs
    if keep_grads:
        for p_ in lora_params:
            p_.grad = torch.zeros_like(p_)
    # fused: on a GPU the whole update is one kernel (bench.py measures the step this way too).
    optimizer = torch.optim.AdamW(lora_params, lr=a.learning_rate, betas=(a.adam_beta1, a.adam_beta2),
                                  weight_decay=a.weight_decay, fused=device.type == "cuda")
    loss_module = CausalLMLoss(model)
    loss_scale = LossScale(enabled=dtype == torch.float16)
    graphed = CUDAGraphMicroBatches(loss_module, lora_params) if batch_graphs else None
    if world > 1:
        loss_module = nn.parallel.DistributedDataParallel(loss_module, device_ids=[device] if device.type == "cuda" else None)

    gen_cfg = modeling.load_generation_config(model_dir)
    eos = gen_cfg.get("eos_token_id", [tok.im_end_id])
    stop_ids = set(eos if isinstance(eos, list) else [eos]) | {tok.im_end_id}
    before = answer_prompts(model, tok, a.eval_prompts, a.system, stop_ids) if a.eval_prompts and rank == 0 else []

    # 3. Run folder, or the state of the run we resume.
    state = {"global_step": 0, "epoch": 0, "step_in_epoch": 0, "best_eval_loss": None, "best_checkpoint": None,
             "log_history": []}
    if a.resume_from_checkpoint:
        ckpt = find_resume_checkpoint(a.resume_from_checkpoint)
        run_dir = ckpt.parent
        from safetensors.torch import load_file
        lora.load_lora_state_dict(model, load_file(ckpt / "adapter_model.safetensors", device=str(device)))
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location=device, weights_only=True))
        state = json.loads((ckpt / "trainer_state.json").read_text())
        if "loss_scale" in state:
            loss_scale.value = state["loss_scale"]
        set_rng_state(torch.load(ckpt / "rng_state.pt", weights_only=True), device)
        log0(rank, f"resumed from {ckpt} at step {state['global_step']}")
    else:
        run_dir = new_run_dir(a.output_dir, a.add_version) if rank == 0 else None
    if world > 1:
        holder = [str(run_dir) if run_dir else None]
        dist.broadcast_object_list(holder, src=0)
        run_dir = Path(holder[0])
    args_dict = dict(vars(a))
    args_dict["model_dir"] = str(model_dir)
    if rank == 0:
        (run_dir / "images").mkdir(exist_ok=True)
        (run_dir / "args.json").write_text(json.dumps(args_dict, indent=2, ensure_ascii=False) + "\n")

    # 4. The loop.
    model.train()
    t0, tokens_seen, window = time.time(), 0, []
    last_good_rng = rng_state(device)
    interrupted = False

    def on_sigint(signum, frame):
        nonlocal interrupted
        if interrupted:
            raise KeyboardInterrupt
        interrupted = True
        log0(rank, "\ninterrupted: finishing this step, then saving a checkpoint (Ctrl-C again to stop at once)")

    previous_handler = signal.signal(signal.SIGINT, on_sigint)
    step, epoch = state["global_step"], state["epoch"]
    start_step = step
    done = step >= total_steps
    try:
        while not done:
            windows = epoch_windows(len(train_rows), a.per_device_train_batch_size, global_accum, epoch, a.seed)
            for w_index in range(state["step_in_epoch"], len(windows)):  # resume mid-epoch where we stopped
                micro = windows[w_index]
                n_tokens = sum(label_tokens(train_rows[i]) for mb in micro for i in mb)  # whole step, all ranks
                tokens_seen += sum(len(train_rows[i]["input_ids"]) for mb in micro for i in mb)
                # This rank's share of the step; a rank short of micro-batches runs one with weight 0
                # so that every rank takes part in the gradient all-reduce.
                mine = micro[rank::world]
                weights = [1.0] * len(mine)
                if not mine:
                    mine, weights = [micro[0]], [0.0]
                # Summed on the device and read once per step: reading it per micro-batch would make
                # the CPU wait for the GPU each time, instead of queueing the next micro-batch.
                loss_sum = torch.zeros(1, device=device, dtype=torch.float64)
                # Each micro-batch's gradient is scaled so that the step's is sum(token losses) / tokens
                # of the whole step. DDP averages gradients over ranks: multiply back by world.
                # float16: times the loss scale too, divided back below.
                grad_scale = world / max(1, n_tokens) * loss_scale.value
                for j, (mb, wgt) in enumerate(zip(mine, weights)):
                    batch = make_batch([train_rows[i] for i in mb], tok.endoftext_id, device, pad_to, fixed_shapes=batch_graphs)
                    if graphed:
                        loss_sum += graphed(batch, wgt * grad_scale) * wgt
                        continue
                    sync = j == len(mine) - 1 or world == 1
                    with (nullcontext() if sync else loss_module.no_sync()):
                        loss = loss_module(**batch)
                        (loss * (wgt * grad_scale)).backward()
                    loss_sum += loss.detach() * wgt
                if world > 1:
                    dist.all_reduce(loss_sum)
                step_loss = loss_sum.item() / max(1, n_tokens)
                if not math.isfinite(step_loss):
                    last = complete_checkpoints(run_dir)
                    raise FloatingPointError(
                        f"the loss became {step_loss} at step {step + 1}: training stopped and nothing more was saved. "
                        f"The last good checkpoint is {last[-1] if last else '(none yet)'}. Lower --learning_rate, "
                        "use --torch_dtype bfloat16 rather than float16, or check the data."
                    )
                loss_scale.unscale(lora_params)
                grad_norm = torch.nn.utils.clip_grad_norm_(lora_params, a.max_grad_norm if a.max_grad_norm > 0 else float("inf"))
                lr = lr_at(step, total_steps, warmup, a.learning_rate, a.lr_scheduler_type)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                if loss_scale.update(grad_norm):
                    optimizer.step()
                else:  # float16 gradients overflowed: the step counts, as in the HF Trainer, but changes nothing
                    log0(rank, f"[{step + 1}/{total_steps}] float16 gradients overflowed: step skipped, loss scale now {loss_scale.value:g}")
                optimizer.zero_grad(set_to_none=not keep_grads)
                step += 1
                last_good_rng = rng_state(device)
                state.update(global_step=step, epoch=epoch, step_in_epoch=w_index + 1)
                if loss_scale.enabled:
                    state["loss_scale"] = loss_scale.value
                window.append(step_loss)
                if world > 1:  # every rank must agree to stop at the same step
                    flag = torch.tensor([float(interrupted)], device=device)
                    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                    interrupted = bool(flag.item())

                # Logging, evaluation, checkpoints (rank 0 writes; all ranks agree on when).
                last_step = step >= total_steps
                if step % a.logging_steps == 0 or last_step:
                    elapsed = time.time() - t0
                    per_step = elapsed / max(1, step - start_step)
                    entry = {"step": step, "epoch": round(epoch + (w_index + 1) / len(windows), 4),
                             "loss": round(sum(window) / len(window), 6), "learning_rate": lr,
                             "grad_norm": round(float(grad_norm), 6), "tokens_per_s": round(tokens_seen / max(elapsed, 1e-9), 1),
                             "elapsed": fmt_time(elapsed), "remaining": fmt_time(per_step * (total_steps - step))}
                    if loss_scale.enabled:
                        entry["loss_scale"] = loss_scale.value
                    if device.type == "cuda":
                        entry["memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                    state["log_history"].append(entry)
                    window = []
                    if rank == 0:
                        with open(run_dir / "logging.jsonl", "a") as f:
                            f.write(json.dumps(entry) + "\n")
                        mem = f" | mem {entry['memory_gib']:.1f} GiB" if "memory_gib" in entry else ""
                        print(f"[{step}/{total_steps}] loss {entry['loss']:.4f} lr {lr:.2e} grad {entry['grad_norm']:.3f} "
                              f"| {entry['tokens_per_s']:.0f} tok/s | {entry['elapsed']} elapsed, {entry['remaining']} left{mem}", flush=True)
                if val_rows and (step % a.eval_steps == 0 or last_step):
                    if rank == 0:
                        eval_loss = evaluate(model, val_rows, a.per_device_eval_batch_size, tok.endoftext_id, device)
                        state["log_history"].append({"step": step, "eval_loss": round(eval_loss, 6)})
                        with open(run_dir / "logging.jsonl", "a") as f:
                            f.write(json.dumps(state["log_history"][-1]) + "\n")
                        print(f"[{step}/{total_steps}] eval_loss {eval_loss:.4f}", flush=True)
                        if state["best_eval_loss"] is None or eval_loss < state["best_eval_loss"]:
                            state.update(best_eval_loss=eval_loss, best_checkpoint=f"checkpoint-{step}")
                    if world > 1:
                        dist.barrier()
                if step % a.save_steps == 0 or last_step or interrupted:
                    if rank == 0:
                        save(run_dir, model, optimizer, state, args_dict, last_good_rng, a.save_total_limit)
                    if world > 1:
                        dist.barrier()
                if last_step:
                    done = True
                    break
                if interrupted:
                    break
            if interrupted:
                break
            if not done:
                epoch += 1
                state.update(epoch=epoch, step_in_epoch=0)
    except KeyboardInterrupt:
        # A second Ctrl-C: stop now. The last complete checkpoint is untouched.
        interrupted = True
    finally:
        signal.signal(signal.SIGINT, previous_handler)

    if rank == 0:
        hist = state["log_history"]
        write_loss_svg(run_dir / "images" / "loss.svg",
                       {"train_loss": [(e["step"], e["loss"]) for e in hist if "loss" in e],
                        "eval_loss": [(e["step"], e["eval_loss"]) for e in hist if "eval_loss" in e]})
        ckpts = complete_checkpoints(run_dir)
        if interrupted:
            print(f"\nstopped at step {step}. Resume with:\n  python train.py ... --resume_from_checkpoint {ckpts[-1] if ckpts else run_dir}")
        else:
            best = state["best_checkpoint"]
            print(f"\ndone: {step} steps in {fmt_time(time.time() - t0)}.")
            print(f"  run folder:      {run_dir}")
            print(f"  last checkpoint: {ckpts[-1] if ckpts else '-'}")
            if best:
                print(f"  best checkpoint: {run_dir / best} (eval_loss {state['best_eval_loss']:.4f})")
            print(f"  loss curve:      {run_dir / 'images' / 'loss.svg'}")
            print(f"  chat with it:    python infer.py --adapters {ckpts[-1] if ckpts else run_dir}")
        if a.eval_prompts and not interrupted:
            after = answer_prompts(model, tok, a.eval_prompts, a.system, stop_ids)
            print("\nanswers before -> after training:")
            for q, b, c in zip(a.eval_prompts, before, after):
                print(f"  Q: {q}\n     before: {b[:40]!r}\n     after:  {c[:160]!r}")
    if world > 1:
        dist.destroy_process_group()
    return 130 if interrupted else 0


def save(run_dir, model, optimizer, state, args_dict, rng, limit):
    # Ctrl-C must not cut a save in half: ignore it until the checkpoint is in place.
    handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        path = save_checkpoint(run_dir, model, optimizer, state, args_dict, rng)
        prune_checkpoints(run_dir, limit, state["best_checkpoint"])
    finally:
        signal.signal(signal.SIGINT, handler)
    return path


def main(argv=None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    try:
        check_args(a)
        return train(a)
    except (UsageError, DataError, ModelError, LoraError, FloatingPointError) as e:
        # Under torchrun every rank checks the same flags and data: rank 0 alone says what is wrong.
        if not (isinstance(e, (UsageError, DataError)) and int(os.environ.get("RANK", "0")) > 0):
            print(f"error: {e}", file=sys.stderr)
        return 2 if not isinstance(e, FloatingPointError) else 1
    except KeyboardInterrupt:
        print("\ninterrupted before training started; nothing was written.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
