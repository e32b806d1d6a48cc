"""flags.py: the command lines of train.py and infer.py: every flag with ms-swift's name, default
and help, the checks that run before anything slow (a wrong value is one clear error, exit 2,
before a model loads), and the defaults ms-swift derives from other flags.

A first reading can skip this file: train() and load_chat() read the parsed flags by name, and
`python train.py --help` lists them. What the command lines share (the parser that knows
ms-swift's other flags, --device, the dtypes, the error exit) is in cli.py.
"""

import argparse
import json
import math
import sys
from pathlib import Path

import torch

import cli
import data
import lora
import offload
import quant
import runs
import sources
import speed
from cli import UsageError, str2bool
from template import EFFORTS, LOSS_SCALES, TEMPLATES

DEFAULT_MAX_NEW_TOKENS = 32768  # infer.py's longest answer when --max_new_tokens is not given: room for Qwen3's reasoning


def device_flags(g):
    """--torch_dtype and --device, the same in train.py and infer.py."""
    g.add_argument("--torch_dtype", default=None, help="bfloat16 | float16 | float32 (default: bfloat16 on GPU, float32 on CPU)")
    g.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if available)")


# ----------------------------------------------------------------------------------------------
# train.py


def json_object(text: str) -> dict:
    """An argparse type: a JSON object given on the command line, such as --lr_scheduler_kwargs."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not JSON ({e.msg}); write an object such as "
                                         """'{"min_lr_rate": 0.1}'""") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} is not a JSON object; write one such as " """'{"min_lr_rate": 0.1}'""")
    return value


def train_parser() -> argparse.ArgumentParser:
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
    g.add_argument("--model", required=True, help="folder, hub id (Qwen/Qwen3-4B-Instruct-2507) or a built-in demo (tiny, tiny-qwen3, tiny-qwen3_5)")
    g.add_argument("--train_type", "--tuner_type", default="lora", help="only 'lora' (--tuner_type: ms-swift 4.x's name)")
    device_flags(g)
    g.add_argument("--cuda_graph", type=str2bool, default=None, help="replay each micro-batch as a CUDA graph (default: true on a GPU)")
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
    g.add_argument("--preserve_thinking", type=str2bool, default=None,
                   help="Qwen3.6 / 3.8: keep earlier answers' reasoning in multi-turn rows (default: the template's)")
    g.add_argument("--reasoning_effort", default=None, choices=list(EFFORTS),
                   help="Qwen3.8: how hard to think, an instruction in the rows trained thinking (default: xhigh)")
    g.add_argument("--model_name", nargs="+", default=None, help="replaces {{NAME}}: one value, or a Chinese and an English one")
    g.add_argument("--model_author", nargs="+", default=None, help="replaces {{AUTHOR}}: one value, or a Chinese and an English one")
    g.add_argument("--columns", default=None,
                   help="""rename dataset columns first: a JSON object '{"old": "new"}', or a .json file of one""")


def lora_flags(p):
    g = p.add_argument_group("LoRA")
    g.add_argument("--lora_rank", type=int, default=8, help="rank r of A (r x in) and B (out x r)")
    g.add_argument("--lora_alpha", type=float, default=32, help="scale alpha / r on the LoRA update")
    g.add_argument("--lora_dropout", type=float, default=0.05, help="dropout on the LoRA input")
    g.add_argument("--use_rslora", type=str2bool, default=False, help="scale alpha / sqrt(r) instead of alpha / r")
    g.add_argument("--init_weights", default="true", type=cli.only_values(tuple(lora.INIT_WEIGHTS), "pissa, olora, loftq "
                   "and the other data-driven inits are not here"),
                   help="A kaiming-uniform (true) or ~ N(0, 1/r) (gaussian), B zeros; false: B random too, as peft")
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
    g.add_argument("--lr_scheduler_type", default="cosine", choices=["cosine", "cosine_with_min_lr", "linear", "constant", "constant_with_warmup"], help="decay after warmup")
    g.add_argument("--lr_scheduler_kwargs", type=json_object, default=None,
                   help="""cosine_with_min_lr: '{"min_lr_rate": 0.1}' or '{"min_lr": 1e-5}' (transformers' names)""")
    g.add_argument("--warmup_ratio", type=float, default=0.0, help="fraction of the steps spent warming up linearly")
    g.add_argument("--warmup_steps", type=float, default=0.0, help="warmup steps (below 1: a fraction of the steps, as --warmup_ratio)")
    g.add_argument("--weight_decay", type=float, default=0.1, help="AdamW weight decay")
    g.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW beta1")
    g.add_argument("--adam_beta2", type=float, default=0.95, help="AdamW beta2")
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="clip the gradient norm to this (0 = off)")
    g.add_argument("--gradient_checkpointing", type=str2bool, default=True, help="recompute each layer in backward instead of storing it")
    g.add_argument("--activation_cpu_offload", type=str2bool, default=None,
                   help="keep each layer's checkpointed input in host memory (default: on a GPU for long rows)")
    g.add_argument("--seed", type=int, default=42, help="seed for LoRA init and dropout")
    g.add_argument("--data_seed", type=int, default=42, help="seed for sampling (SOURCE#N), the validation split and the data order, as ms-swift")


def run_flags(p):
    g = p.add_argument_group("evaluation, checkpoints, logging")
    g.add_argument("--eval_steps", type=int, default=None, help="evaluate every N optimizer steps (default: --save_steps)")
    g.add_argument("--save_steps", type=int, default=500, help="save a checkpoint every N optimizer steps (and at the last)")
    g.add_argument("--eval_strategy", default=None, choices=["steps", "epoch", "no"],
                   help="evaluate every --eval_steps, at the end of each epoch, or never (default: --save_strategy)")
    g.add_argument("--save_strategy", default="steps", choices=["steps", "epoch", "no"],
                   help="save every --save_steps, at the end of each epoch, or never (no checkpoint at all)")
    g.add_argument("--save_total_limit", type=int, default=None, help="keep at most N checkpoints: the best by eval loss and the newest")
    g.add_argument("--logging_steps", type=int, default=5, help="print and log every N optimizer steps")
    g.add_argument("--output_dir", default=None, help="runs go to OUTPUT_DIR/vN-YYYYMMDD-HHMMSS/ (default: output/MODEL_NAME)")
    g.add_argument("--add_version", type=str2bool, default=True, help="create the vN-YYYYMMDD-HHMMSS subfolder")
    g.add_argument("--resume_from_checkpoint", default=None, help="a checkpoint folder, or a run folder (its newest checkpoint)")
    g.add_argument("--resume_only_model", type=str2bool, default=False,
                   help="only the checkpoint's adapter, into a new run from its step (fresh optimizer)")
    g.add_argument("--ignore_data_skip", type=str2bool, default=False,
                   help="with --resume_only_model: start again at step 0 and the first rows instead")
    g.add_argument("--adapters", default=None, help="go on training this LoRA adapter (its rank and targets) in a new run")
    g.add_argument("--eval_prompts", nargs="*", default=[], help="questions answered greedily before and after training")


def scale_flags(p):
    g = p.add_argument_group("several GPUs (torchrun)")
    g.add_argument("--fsdp", nargs="+", default=None, metavar="VALUE",
                   help="true (or 'full_shard auto_wrap'): split the model over the ranks (FSDP2), not DDP")


def check_train_args(a):
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
    check_schedule(a)
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
    problem = offload.offload_problem(speed.PlanFlags.of(a), cli.pick_device(a.device))
    if problem:
        raise UsageError(problem)
    for spec in a.dataset + a.val_dataset:
        path, _ = sources.parse_source(spec)
        if path.endswith((".json", ".jsonl")) and not Path(path).exists():
            raise UsageError(f"--dataset {spec}: {path} does not exist.{sources.shipped_hint(path)}")
    if a.resume_from_checkpoint and not Path(a.resume_from_checkpoint).is_dir():
        raise UsageError(f"--resume_from_checkpoint {a.resume_from_checkpoint}: no such folder.")
    set_derived_defaults(a)  # before the resume check, which compares them with the checkpoint's
    runs.check_resume(a, cli.rank_and_world()[1])


SCHEDULER_KWARGS = {"cosine": ("num_cycles",), "cosine_with_min_lr": ("num_cycles", "min_lr", "min_lr_rate")}


def check_schedule(a):
    """--warmup_steps and --lr_scheduler_kwargs as ms-swift 4.x and transformers take them (train.lr_at
    computes the rate)."""
    if a.warmup_ratio and a.warmup_steps:
        raise UsageError("--warmup_ratio and --warmup_steps cannot be set at the same time (ms-swift refuses it too): give one.")
    if a.warmup_steps < 0:
        raise UsageError(f"--warmup_steps must be 0 or more, got {a.warmup_steps:g}.")
    kwargs, allowed = a.lr_scheduler_kwargs or {}, SCHEDULER_KWARGS.get(a.lr_scheduler_type, ())
    for key, value in kwargs.items():
        if key not in allowed:
            takes = ", ".join(allowed) or "none"
            raise UsageError(f"--lr_scheduler_kwargs {key}: --lr_scheduler_type {a.lr_scheduler_type} takes {takes}.")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise UsageError(f"--lr_scheduler_kwargs {key}: give a number of 0 or more, not {value!r}.")
    if a.lr_scheduler_type == "cosine_with_min_lr" and ("min_lr" in kwargs) == ("min_lr_rate" in kwargs):
        raise UsageError("--lr_scheduler_type cosine_with_min_lr needs one of min_lr or min_lr_rate, as transformers: "
                         """--lr_scheduler_kwargs '{"min_lr_rate": 0.1}' (a tenth of --learning_rate at the end).""")
    if a.ignore_data_skip and not a.resume_only_model:
        raise UsageError("--ignore_data_skip true goes with --resume_only_model true (a new run from a checkpoint's "
                         "adapter, at step 0); a full resume always goes on where the checkpoint stopped.")


def set_derived_defaults(a):
    """ms-swift's defaults that depend on other flags, written into `a` (and so into args.json)."""
    if a.gradient_accumulation_steps is None:  # at least 16 rows per optimizer step over all GPUs
        rank, world = cli.rank_and_world()
        a.gradient_accumulation_steps = math.ceil(16 / (a.per_device_train_batch_size * world))
        if rank == 0:
            print(f"Setting args.gradient_accumulation_steps: {a.gradient_accumulation_steps}", flush=True)
    if a.eval_steps is None:
        a.eval_steps = a.save_steps
    if a.eval_strategy is None:
        a.eval_strategy = a.save_strategy
    # As ms-swift: no rows held out that are never evaluated, or where --val_dataset's rows evaluate.
    no_split = ("--eval_strategy is no" if a.eval_strategy == "no" else "--val_dataset is given (every --dataset "
                "row trains, and --val_dataset's rows evaluate)" if a.val_dataset else None)
    if no_split and a.split_dataset_ratio:
        a.split_dataset_ratio = 0.0
        if cli.rank_and_world()[0] == 0:
            print(f"Because {no_split}, setting split_dataset_ratio: 0.0", flush=True)
    if a.max_tokens_per_pass is None:  # packed passes need no more memory than one row of --max_length
        a.max_tokens_per_pass = a.max_length
    if a.output_dir is None:
        a.output_dir = str(Path("output") / Path(a.model.rstrip("/")).name)
    if a.adapters:  # ms-swift's --adapters: a new run from that adapter, with its LoRA shape
        cfg, _, _ = lora.read_adapter(a.adapters)
        targets = cfg.target_modules
        shape = {"lora_rank": cfg.r, "lora_alpha": cfg.lora_alpha, "use_rslora": cfg.use_rslora,
                 "target_modules": [targets] if isinstance(targets, str) else list(targets)}
        defaults = train_parser()
        for name, value in shape.items():  # a flag given that the adapter contradicts is not dropped in silence
            given = sorted(getattr(a, name)) if name == "target_modules" else getattr(a, name)
            if given not in (defaults.get_default(name), sorted(value) if name == "target_modules" else value):
                raise UsageError(f"--adapters {a.adapters} goes on training that adapter, whose {name} is {value}: "
                                 f"--{name} {getattr(a, name)} cannot change it. Leave --{name} out, or train a new "
                                 "adapter without --adapters.")
            setattr(a, name, value)
        a.resume_from_checkpoint, a.resume_only_model = a.adapters, True
    if a.torch_dtype is None:  # the dtype it trains in, for merge.py and for reading args.json
        a.torch_dtype = str(cli.pick_dtype(None, cli.pick_device(a.device))).removeprefix("torch.")
    if a.padding_free is None:  # packed where rows attend without a T x T mask: faster there, slower elsewhere
        device = cli.pick_device(a.device)
        a.padding_free = speed.varlen_available(device, cli.pick_dtype(a.torch_dtype, device))


# ----------------------------------------------------------------------------------------------
# infer.py


def infer_parser() -> argparse.ArgumentParser:
    p = cli.FlagParser(description="Chat with a Qwen2 / Qwen2.5 / Qwen3 model and its LoRA adapters (flags as in `swift infer`).")
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, help="local folder, hub id or 'tiny' (default: the base the adapter was trained on)")
    g.add_argument("--adapters", nargs="+", default=[], metavar="[NAME=]PATH", help="LoRA checkpoint folder(s); NAME=PATH names one for /adapter; the first is active")
    g.add_argument("--merge_lora", type=str2bool, default=False, help="merge the (single) adapter into the weights at load: base speed, no switching")
    device_flags(g)
    g.add_argument("--infer_backend", default="pt", help="pt (ms-swift 4.x: transformers): PyTorch, the one backend here")
    g.add_argument("--cuda_graph", type=str2bool, default=None, help="decode each token as one CUDA graph replay (default: true on a GPU)")
    g.add_argument("--torch_compile", type=str2bool, default=False, help="with --cuda_graph: compile the decode step first (a minute to compile)")

    cli.quant_flags(p)

    g = p.add_argument_group("decoding (a flag not given takes the model's generation_config.json value, as in ms-swift)")
    g.add_argument("--temperature", type=float, default=None, help="0 = greedy: always the most likely token")
    g.add_argument("--top_p", type=float, default=None, help="sample only from the most likely tokens whose probabilities add up to this")
    g.add_argument("--top_k", type=int, default=None, help="sample only from the k most likely tokens (0 = all)")
    g.add_argument("--repetition_penalty", type=float, default=None, help="> 1 makes tokens already in the text less likely (1 = off)")
    g.add_argument("--max_new_tokens", type=int, default=None, help=f"longest answer in tokens, reasoning included (default: {DEFAULT_MAX_NEW_TOKENS:,})")
    g.add_argument("--seed", type=int, default=42, help="seed for sampling")
    g.add_argument("--data_seed", type=int, default=42, help="accepted as swift infer takes it; --val_dataset is read in file order, so it changes nothing")

    g = p.add_argument_group("conversation")
    g.add_argument("--system", default=None, help="system prompt (default: the adapter's training one, else the template's; Qwen3: none)")
    g.add_argument("--template", default=None, choices=list(TEMPLATES), help="chat template (default: the adapter's, else the checkpoint's own)")
    g.add_argument("--enable_thinking", type=str2bool, default=None, help="hybrid Qwen3: reason before answering (default: true, as the model's template)")
    g.add_argument("--preserve_thinking", type=str2bool, default=None,
                   help="Qwen3.6 / 3.8: keep earlier answers' reasoning (default: as trained, else the template's)")
    g.add_argument("--reasoning_effort", default=None, choices=list(EFFORTS),
                   help="Qwen3.8: how hard to think, said in the system turn (default: as trained, else xhigh)")
    g.add_argument("--show_thinking", type=str2bool, default=None, help="print the reasoning before the answer (default: in the REPL only; piped: a 'reasoning' field)")
    g.add_argument("--stream", type=str2bool, default=None, help="print the answer as it is generated (default: true; not with --val_dataset)")
    g.add_argument("--prompt", default=None, help="answer this one question and exit")
    g.add_argument("--show_prompt", type=str2bool, default=False, help="print the whole rendered prompt (system prompt, history) to stderr before each answer")

    g = p.add_argument_group("a dataset: every row answered into --result_path, one JSON line each (predict.py)")
    g.add_argument("--val_dataset", nargs="+", default=[], metavar="SOURCE", help="rows to answer: .json/.jsonl files or hub ids; SOURCE#N samples N rows")
    g.add_argument("--load_data_args", type=str2bool, default=False, help="answer the validation rows the adapter's training held out")
    g.add_argument("--result_path", default=None, help="the answers, a JSONL file (default: CKPT/infer_result/TIME.jsonl); continued if it exists")
    g.add_argument("--max_batch_size", type=int, default=32, help="rows decoded at once (-1: all; on a GPU fewer if their KV cache does not fit)")
    g.add_argument("--model_name", nargs="+", default=None, help="replaces {{NAME}} in the rows (default: the adapter's training value)")
    g.add_argument("--model_author", nargs="+", default=None, help="replaces {{AUTHOR}} in the rows (default: the adapter's training value)")
    p.add_swift_flags("infer")
    return p


def parse_adapters(specs: list[str]) -> list[tuple[str, str]]:
    """[NAME=]PATH strings -> (name, path) pairs; an unnamed adapter is named after its folder."""
    pairs = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or Path(spec).exists():  # a path that itself holds '='
            # A folder name may hold dots (robot-v1.2); an adapter name may not (module names).
            name, path = Path(spec.rstrip("/\\")).name.replace(".", "_"), spec
        if not name or not path:
            raise UsageError(f"--adapters {spec!r}: write PATH or NAME=PATH.")
        if "." in name:
            raise UsageError(f"--adapters {spec!r}: an adapter name cannot hold a dot; write it as {name.replace('.', '_')}=PATH.")
        pairs.append((name, path))
    names = [n for n, _ in pairs]
    for n in names:
        if n == "base" or names.count(n) > 1:
            why = "'base' means the model without adapter" if n == "base" else "two adapters have this name"
            raise UsageError(f"--adapters: the name {n!r} cannot be used ({why}); give each one a name with NAME=PATH.")
    return pairs


def check_infer_args(args, device):
    if args.system and data.LONE_SURROGATE.search(args.system):
        raise UsageError("--system holds bytes that are not UTF-8 text; give it as UTF-8.")
    if args.infer_backend not in ("pt", "transformers"):
        raise UsageError(f"--infer_backend {args.infer_backend}: only the PyTorch backend exists here (--infer_backend pt, "
                         "ms-swift 4.x's transformers); infer.py has no vllm, sglang or lmdeploy.")
    for flag in ("temperature", "top_p", "repetition_penalty"):
        if getattr(args, flag) is not None and getattr(args, flag) != getattr(args, flag):
            raise UsageError(f"--{flag} nan: give a number.")
    if args.temperature is not None and args.temperature < 0:
        raise UsageError(f"--temperature {args.temperature}: must be 0 (greedy) or more.")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UsageError(f"--top_p {args.top_p}: must be in (0, 1].")
    if args.top_k is not None and args.top_k < 0:
        raise UsageError(f"--top_k {args.top_k}: must be 0 (off) or more.")
    if args.repetition_penalty is not None and args.repetition_penalty <= 0:
        raise UsageError(f"--repetition_penalty {args.repetition_penalty}: must be more than 0 (1 = off).")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise UsageError(f"--max_new_tokens {args.max_new_tokens}: must be 1 or more.")
    if args.merge_lora and len(args.adapters) != 1:
        raise UsageError(f"--merge_lora true needs exactly one adapter in --adapters (got {len(args.adapters)}).")
    if args.merge_lora and args.quant_bits:
        raise UsageError("--merge_lora true with --quant_bits 4: the adapter would be rounded into 4-bit weights, another "
                         "model than the one trained. Run it unmerged (drop --merge_lora), or merge it into the bf16 "
                         "base with merge.py and load the merged folder with --quant_bits 4.")
    problem = quant.flag_problem(args, cli.pick_dtype(args.torch_dtype, device))
    if problem:
        raise UsageError(problem)
    if args.torch_compile and args.cuda_graph is False:
        raise UsageError("--torch_compile true compiles the CUDA graph step: it cannot go with --cuda_graph false.")
    if device.type != "cuda" and (args.cuda_graph or args.torch_compile):
        flag = "--cuda_graph true" if args.cuda_graph else "--torch_compile true (which compiles the CUDA graph step)"
        raise UsageError(f"{flag} needs a GPU (--device cuda); on the CPU decoding runs eagerly.")
    if not args.model and not args.adapters:
        raise UsageError("give --model (a base model) or --adapters (a checkpoint folder, whose args.json names its base).")
    if args.stream is None:
        args.stream = True


def check_dataset_args(args):
    """--val_dataset / --load_data_args (predict.py): the checks before any row is read."""
    if args.load_data_args and args.val_dataset:
        raise UsageError("--load_data_args true answers the validation rows of the adapter's own training run, and "
                         "--val_dataset names other rows: give one of them.")
    if args.load_data_args and not args.adapters:
        raise UsageError("--load_data_args true reads the training run's datasets from the checkpoint's args.json: "
                         "give the checkpoint with --adapters CKPT.")
    if args.prompt is not None:
        raise UsageError("--prompt answers one question and --val_dataset a dataset: give one of them.")
    if args.max_batch_size == 0 or args.max_batch_size < -1:
        raise UsageError(f"--max_batch_size {args.max_batch_size}: must be 1 or more (-1: every row at once).")
    for name in ("model_name", "model_author"):
        if getattr(args, name) and len(getattr(args, name)) > 2:
            raise UsageError(f"--{name} takes one value, or a Chinese and an English value; got {len(getattr(args, name))}.")
    for spec in args.val_dataset:
        path, _ = sources.parse_source(spec)
        if path.endswith((".json", ".jsonl")) and not Path(path).exists():
            raise UsageError(f"--val_dataset {spec}: {path} does not exist.{sources.shipped_hint(path)}")
    if args.stream is not None:
        print(f"note: --stream {str(args.stream).lower()} changes nothing with a dataset: each answer goes to the "
              "result file when it is complete.", file=sys.stderr)
