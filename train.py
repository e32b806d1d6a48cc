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
(Replicas). With --fsdp true the model is split over the ranks instead (shard.py); the loop is
the same.
"""

import math
import random
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import cli
import data
import flags
import lora
import parallel
import model as modeling
import quant
import runs
import sources
import speed
from data import DataError
from decode import Decoder, generate
from template import Template, choose_template, with_trained_thinking
from util import round_up

# ----------------------------------------------------------------------------------------------
# Learning rate, loss, batches


def lr_at(step: int, total: int, warmup: int, peak: float, kind: str, kwargs: dict | None = None) -> float:
    """Learning rate for optimizer step `step` (0-based), as transformers' schedulers compute it.
    kwargs: --lr_scheduler_kwargs (cosine: num_cycles; cosine_with_min_lr: min_lr or min_lr_rate, the
    floor that the cosine falls to, as a rate or as a fraction of the peak)."""
    kwargs = kwargs or {}
    if step < warmup:
        return peak * step / max(1, warmup)
    if kind in ("constant", "constant_with_warmup"):
        return peak
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "linear":
        return peak * max(0.0, 1.0 - progress)
    floor = kwargs["min_lr"] / peak if "min_lr" in kwargs else kwargs.get("min_lr_rate", 0.0)
    factor = 0.5 * (1.0 + math.cos(math.pi * kwargs.get("num_cycles", 0.5) * 2.0 * progress))
    return peak * max(0.0, factor * (1 - floor) + floor)


class CausalLMLoss(nn.Module):
    """The model and its summed next-token cross-entropy.

    Only positions whose next token has a label go through lm_head, in chunks that are
    recomputed during backward: the (tokens x 152k-vocab) float32 logits never exist at once.
    layers: the decoder layers to run (speed.TrainingPlan.training_layers); None: the model's own.
    packed_mask: how packed rows are kept apart (speed.TrainingPlan.packed_mask); None: model.block_mask.
    It also counts, for ms-swift's token_acc, the label tokens whose argmax prediction is right
    (take_accuracy): added in place on the device, so a replayed CUDA graph counts too."""

    def __init__(self, model, chunk: int = 256, layers=None, packed_mask=None):
        super().__init__()
        self.model, self.chunk, self.layers, self.packed_mask = model, chunk, layers, packed_mask
        self.counts = None  # (2,) float64: label tokens predicted right, label tokens

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
        total, right = h.new_zeros((), dtype=torch.float32), h.new_zeros((), dtype=torch.float64)
        for i in range(0, h.shape[0], self.chunk):
            # No randomness inside, so no random state to save and restore for the recomputation.
            loss, hits = torch.utils.checkpoint.checkpoint(
                chunk_loss, h[i:i + self.chunk], weight, targets[i:i + self.chunk], use_reentrant=False,
                preserve_rng_state=False)
            total, right = total + loss, right + hits
        if self.counts is None:
            self.counts = torch.zeros(2, dtype=torch.float64, device=h.device)
        self.counts.add_(torch.stack([right, (targets != data.IGNORE_INDEX).sum().double()]))
        return total

    def take_accuracy(self) -> float | None:
        """The share of label tokens predicted right (argmax) since the last call, over all ranks."""
        if self.counts is None:
            return None
        counts = self.counts.clone()
        if dist.is_initialized():
            dist.all_reduce(counts)
        self.counts.zero_()
        right, labelled = counts.tolist()
        return right / labelled if labelled else None


def chunk_loss(h, weight, targets):
    """(summed cross-entropy, label tokens whose argmax is the target) of a chunk of positions."""
    logits = F.linear(h, weight).float()  # (n, vocab)
    return F.cross_entropy(logits, targets, reduction="sum"), (logits.argmax(-1) == targets).sum().double()


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

    The order depends only on (--data_seed, epoch), so a resumed run sees exactly the same batches;
    it is ms-swift's (its BatchSamplerShard: torch.randperm seeded data_seed + epoch) on one GPU."""
    g = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(n_rows, generator=g).tolist()
    micro = [order[i:i + batch_size] for i in range(0, n_rows, batch_size)]
    return [micro[i:i + accum] for i in range(0, len(micro), accum)]


def steps_to_run(state: dict, n_rows: int, a, world: int, total_steps: int):
    """The optimizer steps left, from where `state` says the run stands (the middle of an epoch,
    after a resume): (epoch, steps of the epoch done after this one, the epoch's step count,
    this step's micro-batches of all ranks). A run that goes on from a checkpoint's adapter
    (--resume_only_model) knows only the step: the epoch and the place in it follow from it, as the
    HF Trainer works them out, so the rows already trained are skipped."""
    step, epoch, start = state["global_step"], state["epoch"], state["step_in_epoch"]
    if epoch is None:
        epoch, start = divmod(step, len(epoch_windows(n_rows, a.per_device_train_batch_size,
                                                      a.gradient_accumulation_steps * world, 0, a.data_seed)))
    while step < total_steps:
        windows = epoch_windows(n_rows, a.per_device_train_batch_size, a.gradient_accumulation_steps * world, epoch, a.data_seed)
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


@dataclass(kw_only=True)
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
    ranks: "parallel.Replicas"  # how the ranks share the step: parallel.Replicas, or shard.Shards
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
    passes = rank_passes(s.rows, micro, s.budget, s.ranks)
    for i, (rows, weight) in enumerate(passes):  # weight 0: a repeat that only keeps sharded ranks in step
        with s.ranks.gradient_sync(last=i == len(passes) - 1):
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


def rank_passes(rows: list, micro: list[list[int]], budget: int | None, ranks: "parallel.Replicas") -> list[tuple[list, float]]:
    """This rank's passes of a step, as (rows of the pass, weight of its loss): every world-th
    micro-batch, made into passes by step_passes. When the ranks must run in lockstep (a sharded
    model: every pass gathers each layer's weights from all of them), a rank with fewer passes than
    the busiest one repeats one at weight 0, which adds nothing to the loss or the gradients; each
    rank works out every rank's passes from the step's micro-batches, which they all hold."""
    def passes(share):
        return step_passes([[rows[i] for i in mb] for mb in share], budget)

    if not ranks.lockstep:
        return [(p, 1.0) for p in passes(micro[ranks.rank::ranks.world])]
    every = [passes(micro[r::ranks.world]) for r in range(ranks.world)]
    mine = [(p, 1.0) for p in every[ranks.rank]]
    return mine + [(passes(micro[:1])[0], 0.0)] * (max(map(len, every)) - len(mine))


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
def evaluate(model, rows, batch_size: int, pad_id: int, device) -> dict:
    """The validation figures, as ms-swift (the HF Trainer) computes them: eval_loss is the mean over
    batches of --per_device_eval_batch_size rows (the last one too, however few its rows) of each
    batch's loss per label token, so it depends on the batch size; eval_token_acc is over all label
    tokens. eval_loss_per_token weighs every label token alike (independent of the batch size)."""
    was_training = model.training
    model.eval()
    loss_fn = CausalLMLoss(model)
    batch_means, total, count = [], 0.0, 0
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        loss, n = loss_fn(**make_batch(chunk, pad_id, device)).item(), sum(label_tokens(r) for r in chunk)
        batch_means.append(loss / max(1, n))
        total, count = total + loss, count + n
    model.train(was_training)
    return {"eval_loss": sum(batch_means) / max(1, len(batch_means)), "eval_token_acc": loss_fn.take_accuracy(),
            "eval_loss_per_token": total / max(1, count)}


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


def chat_template(a, model_dir, config) -> Template:
    """The checkpoint's chat template (or --template) with this run's settings; a.template is set
    to its name, so that args.json records it for inference (ours and ms-swift's)."""
    template = choose_template(model_dir, config.model_type, a.template, a.system, a.enable_thinking, a.loss_scale,
                               a.add_non_thinking_prefix, a.preserve_thinking, a.reasoning_effort)
    # --eval_prompts are asked as the rows train (unless --enable_thinking says otherwise); args.json records it.
    template = with_trained_thinking(template, dict(vars(a), template=template.name))
    a.template, a.loss_scale = template.name, template.loss_scale
    a.enable_thinking = template.enable_thinking if template.thinks == "hybrid" else a.enable_thinking
    return template


def load_data(a, tok, template) -> tuple[list, list]:
    """Read, substitute, sample, split and tokenize (in the chat template): (training rows, validation
    rows), the rows ms-swift takes for the same --data_seed (sources.pick_rows)."""
    quiet = dist.is_initialized() and dist.get_rank() > 0  # every rank reads the data; one reports progress

    def rows_of(specs, ratio):
        return sources.load_dataset(tok, specs, a.max_length, a.truncation_strategy, seed=a.data_seed,
                                    model_name=a.model_name, model_author=a.model_author,
                                    progress_over=math.inf if quiet else sources.PROGRESS_OVER, template=template,
                                    columns=a.columns, ratio=ratio)

    train_rows, val_rows = rows_of(a.dataset, a.split_dataset_ratio)
    if a.val_dataset:  # flags.check_train_args: then no split, as ms-swift
        val_rows = rows_of(a.val_dataset, 1)[1]
    if a.packing:
        train_rows = data.pack(train_rows, a.max_length)
    if not train_rows:
        raise DataError("no training rows are left after the validation split: lower --split_dataset_ratio or add data.")
    return train_rows, val_rows


def schedule(a, n_rows: int, world: int) -> tuple[int, int, int]:
    """(optimizer steps per epoch, in all, of warmup). --warmup_steps below 1 is a fraction, as in
    transformers 5. --eval_strategy / --save_strategy epoch: --eval_steps / --save_steps become the
    steps of an epoch (written so into args.json)."""
    steps_per_epoch = math.ceil(math.ceil(n_rows / a.per_device_train_batch_size) / (a.gradient_accumulation_steps * world))
    total = a.max_steps if a.max_steps > 0 else math.ceil(a.num_train_epochs * steps_per_epoch)
    if a.eval_strategy == "epoch":
        a.eval_steps = steps_per_epoch
    if a.save_strategy == "epoch":
        a.save_steps = steps_per_epoch
    warmup = a.warmup_steps or a.warmup_ratio  # flags.check_schedule: not both
    return steps_per_epoch, total, int(warmup) if warmup >= 1 else math.ceil(warmup * total)


def load_lora_model(a, model_dir, dtype, device, rank: int, sharded: bool, quantize):
    """The base model with frozen weights and a fresh LoRA adapter: float32 A and B, the only
    parameters that train; their gradients allocated once, zeroed in place after each step.
    sharded: split over the ranks (shard.py, --fsdp); quantize: quant.settings (--quant_bits 4),
    the decoder's linear layers kept in 4 bits and dequantised for each matmul."""
    targets = a.target_modules[0] if a.target_modules == ["all-linear"] else a.target_modules
    cfg = lora.LoraConfig(r=a.lora_rank, lora_alpha=a.lora_alpha, lora_dropout=a.lora_dropout,
                          target_modules=targets, use_rslora=a.use_rslora,
                          init_lora_weights=lora.INIT_WEIGHTS[a.init_weights])
    if sharded:
        import shard  # only under --fsdp (see check_args)
        model = shard.load_lora_model(model_dir, cfg, a.seed, dtype, device)
    else:
        model = load_base_with_adapter(model_dir, cfg, a.seed, dtype, device, quantize)
    model.model.gradient_checkpointing = a.gradient_checkpointing
    if rank == 0:
        lora.print_trainable_parameters(model)
    params = lora.lora_parameters(model)
    for p in params:
        p.grad = torch.zeros_like(p)
    return model, params


def load_base_with_adapter(model_dir, cfg: lora.LoraConfig, seed: int, dtype, device, quantize=None):
    """The whole base model (in 4 bits with quantize) and a fresh adapter whose A and B depend only
    on the seed, as shard.load_lora_model gives them split over the ranks."""
    if quantize:
        model, _ = quant.load_quantized(str(model_dir), quantize, dtype, device)
    else:
        model, _ = modeling.load_model(str(model_dir), dtype=dtype, device=device)
    torch.manual_seed(seed)  # the LoRA init does not depend on how many random numbers loading used
    lora.add_adapter(model, cfg)
    return model


def log0(rank, *a):
    if rank == 0 and any(a):
        print(*a, flush=True)


# ----------------------------------------------------------------------------------------------
# The training run


def train(a) -> int:
    rank, world, device = parallel.setup(a.device)
    dtype = cli.pick_dtype(a.torch_dtype, device)
    torch.manual_seed(a.seed)
    random.seed(a.seed)
    model_dir = cli.model_dir(a.model)
    config = modeling.Config.from_json(model_dir / "config.json")
    tok, template = data.Tokenizer(model_dir), chat_template(a, model_dir, config)
    log0(rank, f"chat template: {template.name}" + (f" (loss_scale {template.loss_scale})" if template.loss_scale != "default" else ""))
    train_rows, val_rows = load_data(a, tok, template)
    steps_per_epoch, total_steps, warmup = schedule(a, len(train_rows), world)
    runs.check_same_data(a, train_rows, steps_per_epoch)  # a resume on data edited since: refused before the model loads
    log0(rank, f"data: {len(train_rows)} training rows, {len(val_rows)} validation rows; "
               f"{steps_per_epoch} optimizer steps per epoch, {total_steps} in all")
    plan = speed.plan_training(speed.PlanFlags.of(a), device, [len(r["input_ids"]) for r in train_rows],
                               total_steps * a.gradient_accumulation_steps, config)
    log0(rank, plan.message)
    plan.prepare(device)
    sharded = bool(a.fsdp) and world > 1
    model, params = load_lora_model(a, model_dir, dtype, device, rank, sharded, quant.settings(a))
    ranks = parallel.step_sharing(rank, world, model, sharded)
    optimizer = torch.optim.AdamW(params, lr=a.learning_rate, betas=(a.adam_beta1, a.adam_beta2),
                                  weight_decay=a.weight_decay, fused=device.type == "cuda")  # one kernel on a GPU
    loss_fn = CausalLMLoss(model, layers=plan.training_layers(model), packed_mask=plan.packed_mask)
    embed = plan.embedding(model)  # None, or the embedding moved to host memory (it looks up make_batch's rows)
    run = runs.open_run(a, model_dir, model, optimizer, total_steps, device, rank, world, ranks.states)
    loss_scale = LossScale(enabled=dtype == torch.float16)
    loss_scale.value = run.state.get("loss_scale", loss_scale.value)
    s = Step(rows=train_rows, pad_id=tok.endoftext_id, device=device, pad_to=plan.pad_to,
             micro_batch=plan.micro_batch_fn(loss_fn, params, micro_batch),
             budget=a.max_tokens_per_pass if a.padding_free else None, params=params, optimizer=optimizer,
             loss_scale=loss_scale, max_grad_norm=a.max_grad_norm, ranks=ranks, embed=embed)
    stop_ids = modeling.stop_ids(modeling.load_generation_config(model_dir), model.config, tok.im_end_id)
    answers = lambda: answer_prompts(model, tok, a.eval_prompts, template, stop_ids, parallel.decoder_for(sharded))
    if a.eval_prompts:
        run.said_on_ctrl_c(lambda: show_answers("before training", a.eval_prompts, answers(), rank))
    evals, saves = runs.due(a.eval_strategy, a.eval_steps), runs.due(a.save_strategy, a.save_steps)

    model.train()
    with runs.StopSignals(rank, world, device) as stop:
        for epoch, done_in_epoch, epoch_steps, micro in steps_to_run(run.state, len(train_rows), a, world, total_steps):
            step = run.state["global_step"] + 1
            lr = lr_at(step - 1, total_steps, warmup, a.learning_rate, a.lr_scheduler_type, a.lr_scheduler_kwargs)
            loss, grad_norm, tokens = optimizer_step(s, micro, lr)
            run.end_step(epoch, done_in_epoch, loss, tokens, loss_scale)
            last, stopping = step == total_steps, stop.agreed()
            if step % a.logging_steps == 0 or step == 1 or last:  # step 1: ms-swift's logging_first_step
                after = lr_at(step, total_steps, warmup, a.learning_rate, a.lr_scheduler_type, a.lr_scheduler_kwargs)
                run.log_progress(epoch + done_in_epoch / epoch_steps, after, grad_norm, loss_fn.take_accuracy())
            if val_rows and evals(step, last):
                run.log_eval(lambda: evaluate(model, val_rows, a.per_device_eval_batch_size, tok.endoftext_id, device))
            if saves(step, last or stopping):
                run.save(model, optimizer, a.save_total_limit)
            if stopping:
                break
    run.said_on_ctrl_c(lambda: run.finish(stop.requested))  # (its curves and summary: a Ctrl-C says what is kept)
    if a.eval_prompts and not stop.requested:
        run.said_on_ctrl_c(lambda: show_answers("after training", a.eval_prompts, answers(), rank))
    return 130 if stop.requested else 0


def main(argv=None) -> int:
    def checked_train():
        a = flags.train_parser().parse_args(argv)
        flags.check_train_args(a)
        code = train(a)
        parallel.leave()
        return code

    return cli.run_main(checked_train, "interrupted before training started; nothing was written.", term_as_ctrl_c=True)


if __name__ == "__main__":
    sys.exit(main())
