"""swift_flags.py: the common flags of ms-swift's `swift sft`, `swift infer` and `swift export`, and
what each one does here. This one table answers every ms-swift flag a user types:

- taken: the scripts named in `scripts` have the flag, with ms-swift's meaning (train.py, infer.py
  and merge.py define these themselves; `note` names any difference);
- ignored: those scripts accept it so that an ms-swift command line runs, and it changes nothing
  here (`note` says why, in --help and in a note when it is given);
- only: those scripts accept these values, which say what this toolkit always does; others fail;
- refused: a script that does not take it stops with one line saying so and, in `instead`, what to
  use instead (cli.FlagParser.explain), rather than with argparse's nearest-spelling guess.

`python swift_flags.py` prints the table as the README's "Coming from ms-swift" section has it.
"""

from dataclasses import dataclass

SCRIPTS = {"train": "swift sft", "infer": "swift infer", "merge": "swift export"}


@dataclass(frozen=True)
class SwiftFlag:
    example: str  # a typical value, quoted for the shell ("" for a flag that takes none)
    scripts: tuple = ()  # the scripts here that take it: "train", "infer", "merge"
    note: str = ""  # how it differs from ms-swift here, or why it is ignored
    instead: str = ""  # for a script that does not take it: what to use instead
    ignored: bool = False  # taken but without effect
    only: tuple = ()  # taken with these values only
    many: bool = False  # takes several values


def refused(example: str, instead: str) -> SwiftFlag:
    return SwiftFlag(example, instead=instead)


TRAIN, INFER, MERGE = ("train",), ("infer",), ("merge",)
TRAIN_INFER, ALL = ("train", "infer"), ("train", "infer", "merge")
USE_FSDP = ("DeepSpeed is not used here: `torchrun --nproc_per_node N train.py ... --fsdp true` splits the model "
            "over the GPUs (ZeRO-3's job) with PyTorch's FSDP2")
NO_QUANTIZED_EXPORT = ("merge.py writes the merged model unquantised, in the adapter's training dtype or --torch_dtype "
                       "(GPTQ / AWQ / bnb export are not here); "
                       "`infer.py --model MERGED --quant_bits 4` quantises it as it loads")
NO_VLLM = "infer.py decodes in PyTorch (one CUDA graph per token on a GPU); vLLM is not used"
NO_UPLOAD = "upload the merged folder yourself: `huggingface-cli upload REPO FOLDER`"

FLAGS = {
    # Model
    "model": SwiftFlag("Qwen/Qwen3-4B-Instruct-2507", ALL, "dense Qwen2 / Qwen2.5 / Qwen3 (0.6B-32B, 2507 Instruct and Thinking)"),
    "model_type": SwiftFlag("qwen2", TRAIN_INFER, "config.json says the architecture", ignored=True),
    "template": SwiftFlag("qwen3", TRAIN_INFER, "qwen2_5, qwen3, qwen3_nothinking, qwen3_thinking, qwen3_5 or qwen3_8; unset: the "
                          "checkpoint's own (its Jinja chat template), then the adapter's args.json"),
    "enable_thinking": SwiftFlag("false", TRAIN_INFER, "hybrid Qwen3: think before answering (default true, as the model's "
                                 "template); train.py: for --eval_prompts, the rows train as written (Qwen3.8's: "
                                 "with its effort's instruction when true)"),
    "add_non_thinking_prefix": SwiftFlag("true", TRAIN, "hybrid Qwen3: an empty think block before each answer without one"),
    "train_type": SwiftFlag("lora", TRAIN, "lora only"),
    "tuner_type": SwiftFlag("lora", TRAIN, "ms-swift 4.x's name for --train_type; lora only"),
    "tuner_backend": SwiftFlag("peft", TRAIN, "LoRA is lora.py here, saved in PEFT's format", only=("peft",)),
    "adapters": SwiftFlag("output/vN-.../checkpoint-N", ALL,
                          "train.py: a new run from step 0 that goes on training that adapter, with its rank and "
                          "targets; infer.py: the first of several answers, /adapter NAME switches (swift infer: the last)"),
    "ckpt_dir": refused("output/vN-.../checkpoint-N", "it is ms-swift 2.x's name for --adapters CHECKPOINT"),
    "torch_dtype": SwiftFlag("bfloat16", ALL, "unset: bfloat16 on a GPU, float32 on the CPU (ms-swift: config.json's); "
                             "merge.py: the adapter's training dtype, else config.json's"),
    "use_hf": SwiftFlag("true", TRAIN_INFER, "models and datasets always come from the Hugging Face hub", ignored=True),
    "attn_impl": SwiftFlag("flash_attn", TRAIN_INFER, "attention is torch's SDPA, which picks a flash kernel itself",
                           ignored=True),
    "device_map": refused("auto", "the model sits on one device, --device cuda:N (torchrun trains on several)"),
    "quant_bits": SwiftFlag("4", TRAIN_INFER, "4 only: QLoRA, the decoder's linear layers in bitsandbytes' 4-bit "
                            "format, made here (ms-swift also needs --quant_method bnb); infer.py: give it again, a "
                            "checkpoint's args.json does not turn it on", instead=NO_QUANTIZED_EXPORT),
    "quant_method": SwiftFlag("bnb", TRAIN_INFER, "bnb only", instead=NO_QUANTIZED_EXPORT),
    "bnb_4bit_quant_type": SwiftFlag("nf4", TRAIN_INFER, "nf4 or fp4"),
    "bnb_4bit_use_double_quant": SwiftFlag("true", TRAIN_INFER),
    "bnb_4bit_compute_dtype": SwiftFlag("bfloat16", TRAIN_INFER, "only --torch_dtype's (ms-swift: float32 under "
                                        "--torch_dtype float16)"),
    "bnb_4bit_quant_storage": SwiftFlag("uint8", TRAIN_INFER, "two 4-bit codes a byte", only=("uint8",)),
    # Data
    "dataset": SwiftFlag("data/self_cognition.json#500", TRAIN, ".json, .jsonl and .csv files, folders, Hugging Face ids, and the "
                         "ModelScope ids of ms-swift's registry from their Hugging Face mirrors (sources.MODELSCOPE_DATASETS); "
                         "swift/self-cognition is the shipped data/self_cognition.json"),
    "val_dataset": SwiftFlag("val.jsonl", TRAIN_INFER, "file order, SOURCE#N its first N rows; train.py: then no "
                             "--split_dataset_ratio; infer.py: answers every row into --result_path, in order"),
    "split_dataset_ratio": SwiftFlag("0.01", TRAIN, "max(1, int(rows x ratio)) of each --dataset source held out: "
                                     "ms-swift's rows for the same --data_seed; 0 with --val_dataset"),
    "max_length": SwiftFlag("2048", TRAIN, "unset: 2048 (ms-swift: the model's context, 32,768 for Qwen2.5-7B)"),
    "truncation_strategy": SwiftFlag("delete", TRAIN, "delete, left or right ('split' is not here)"),
    "packing": SwiftFlag("true", TRAIN),
    "padding_free": SwiftFlag("true", TRAIN, "unset: true on a GPU in bf16 (ms-swift: false); it packs all the rows of each optimizer "
                              "step, not of each batch, into passes of --max_tokens_per_pass tokens: the same gradient"),
    "streaming": refused("true", "the datasets are read and tokenized before training; sample a large one with "
                                 "--dataset FILE#N"),
    "system": SwiftFlag("'You are a helpful assistant.'", TRAIN_INFER, "train.py stores it in args.json; infer.py reads it"),
    "model_name": SwiftFlag("小黄 'Xiao Huang'", TRAIN_INFER, "replaces {{NAME}} in every dataset, not only ms-swift's own; "
                            "infer.py, unset: the adapter's args.json value"),
    "model_author": SwiftFlag("魔搭 ModelScope", TRAIN_INFER, "replaces {{AUTHOR}} in every dataset; infer.py, unset: the "
                              "adapter's args.json value"),
    "columns": SwiftFlag("""'{"question":"query"}'""", TRAIN, "also a .json file; question/answer, prompt/completion, "
                         "problem/solution ... are read without it, as in ms-swift"),
    "loss_scale": SwiftFlag("ignore_empty_think", TRAIN, "default (every answer), last_round (only the answers after the last "
                            "question), all (every token but the first) or ignore_empty_think (no "
                            "loss on an empty think block; always on for hybrid Qwen3, as in ms-swift >= 4.3.1)"),
    "dataloader_num_workers": SwiftFlag("4", TRAIN, "the data are tokenized before training starts", ignored=True),
    "dataset_num_proc": SwiftFlag("4", TRAIN, "tokenizing runs in one process", ignored=True),
    "load_from_cache_file": SwiftFlag("true", TRAIN, "nothing is cached; the data are tokenized at each start",
                                      ignored=True),
    "lazy_tokenize": SwiftFlag("false", TRAIN, "the data are tokenized before training starts", ignored=True),
    # LoRA
    "lora_rank": SwiftFlag("8", TRAIN),
    "lora_alpha": SwiftFlag("32", TRAIN),
    "lora_dropout": SwiftFlag("0.05", TRAIN),
    "use_rslora": SwiftFlag("true", TRAIN),
    "init_weights": SwiftFlag("gaussian", TRAIN, "true, false or gaussian, as peft; pissa, olora, loftq and the other "
                              "data-driven ones are not here"),
    "lora_dtype": SwiftFlag("float32", TRAIN, "A and B are float32 whatever --torch_dtype is, as peft keeps them (ms-swift's "
                            "unset)", only=("float32",)),
    "target_modules": SwiftFlag("all-linear", TRAIN),
    "lora_bias": SwiftFlag("none", TRAIN, "LoRA layers have no bias here", only=("none",)),
    "target_regex": refused("'.*q_proj'", "name the modules, --target_modules q_proj v_proj (or all-linear)"),
    "modules_to_save": refused("embed_tokens", "only LoRA's A and B train here"),
    "use_dora": refused("true", "DoRA is not implemented; plain LoRA, or rsLoRA's scale with --use_rslora true"),
    "lorap_lr_ratio": refused("16", "LoRA+ is not implemented; A and B share one learning rate"),
    "neftune_noise_alpha": refused("5", "NEFTune is not implemented"),
    # Optimisation
    "num_train_epochs": SwiftFlag("3", TRAIN),
    "max_epochs": refused("3", "give the number of epochs as --num_train_epochs"),
    "max_steps": SwiftFlag("-1", TRAIN),
    "per_device_train_batch_size": SwiftFlag("1", TRAIN),
    "per_device_eval_batch_size": SwiftFlag("1", TRAIN),
    "gradient_accumulation_steps": SwiftFlag("16", TRAIN, "unset: ceil(16 / (batch size x GPUs)), as in ms-swift"),
    "learning_rate": SwiftFlag("1e-4", TRAIN),
    "lr_scheduler_type": SwiftFlag("cosine", TRAIN, "cosine, cosine_with_min_lr, linear, constant or constant_with_warmup"),
    "lr_scheduler_kwargs": SwiftFlag("""'{"min_lr_rate": 0.1}'""", TRAIN, "cosine_with_min_lr: min_lr or min_lr_rate; "
                                     "cosine: num_cycles (transformers' names and rates)"),
    "warmup_ratio": SwiftFlag("0.05", TRAIN),
    "warmup_steps": SwiftFlag("10", TRAIN, "below 1: a fraction of all steps (transformers 5); not with --warmup_ratio"),
    "weight_decay": SwiftFlag("0.1", TRAIN),
    "adam_beta1": SwiftFlag("0.9", TRAIN),
    "adam_beta2": SwiftFlag("0.95", TRAIN),
    "max_grad_norm": SwiftFlag("1.0", TRAIN),
    "optim": SwiftFlag("adamw_torch", TRAIN, "the optimizer is torch's AdamW (fused on a GPU)",
                       only=("adamw_torch", "adamw_torch_fused")),
    "gradient_checkpointing": SwiftFlag("true", TRAIN),
    "bf16": SwiftFlag("true", TRAIN, "training runs in --torch_dtype (ms-swift derives --bf16 / --fp16 from it)", ignored=True),
    "fp16": SwiftFlag("true", TRAIN, "training runs in --torch_dtype (ms-swift derives --bf16 / --fp16 from it)", ignored=True),
    "group_by_length": refused("true", "rows are taken in random order; --padding_free true packs each step's rows "
                                       "without padding instead"),
    "gradient_checkpointing_kwargs": SwiftFlag("""'{"use_reentrant":false}'""", TRAIN, "checkpointing is non-reentrant here (reentrant under --fsdp: the same gradients)",
                                               ignored=True),
    "use_liger_kernel": SwiftFlag("true", TRAIN, "no Liger kernels; the loss never holds all logits at once anyway",
                                  ignored=True),
    "seed": SwiftFlag("42", TRAIN_INFER, "train.py: LoRA's init and dropout; the data follow --data_seed, as in ms-swift"),
    "data_seed": SwiftFlag("42", TRAIN_INFER, "the rows of SOURCE#N, the validation split, the mixture and each epoch's "
                           "order, all ms-swift's for the same seed; default 42 whatever --seed is; infer.py: accepted, "
                           "and changes nothing (--val_dataset is read in file order)"),
    "dataset_shuffle": SwiftFlag("true", TRAIN, "the --dataset sources are mixed in one shuffle", only=("true",)),
    "train_dataloader_shuffle": SwiftFlag("true", TRAIN, "each epoch takes the rows in a new random order",
                                          only=("true",)),
    # Evaluation, checkpoints, logging
    "eval_steps": SwiftFlag("50", TRAIN, "unset: --save_steps, as in ms-swift"),
    "save_steps": SwiftFlag("50", TRAIN),
    "eval_strategy": SwiftFlag("epoch", TRAIN, "steps (every --eval_steps), epoch (at the end of each), and at the last step; "
                               "or no (never, and no --split_dataset_ratio); unset: --save_strategy's, as in ms-swift"),
    "save_strategy": SwiftFlag("epoch", TRAIN, "steps (every --save_steps), epoch (at the end of each), and at the last step; "
                               "or no (no checkpoint at all, also on Ctrl-C)"),
    "save_total_limit": SwiftFlag("2", TRAIN),
    "save_only_model": SwiftFlag("true", TRAIN, "checkpoints always hold the optimizer state, so each resumes",
                                 ignored=True),
    "logging_steps": SwiftFlag("5", TRAIN),
    "report_to": SwiftFlag("tensorboard", TRAIN, "unset: tensorboard, as in ms-swift (event files in RUN/runs/)",
                           only=("tensorboard", "none"), many=True),
    "output_dir": SwiftFlag("output", ("train", "merge"), "train.py, unset: output/MODEL_NAME, as in ms-swift"),
    "add_version": SwiftFlag("true", TRAIN),
    "resume_from_checkpoint": SwiftFlag("output/vN-.../checkpoint-N", TRAIN, "resumes checkpoints of this toolkit"),
    "resume_only_model": SwiftFlag("true", TRAIN, "only the checkpoint's adapter, into a new run that goes on from its step "
                                   "with a fresh optimizer, skipping the rows already trained; the learning rate is the "
                                   "schedule's at that step (ms-swift 4.6 starts the schedule again from its step 0)"),
    "ignore_data_skip": SwiftFlag("true", TRAIN, "with --resume_only_model: from step 0 and the first rows instead"),
    # Several GPUs
    "deepspeed": refused("zero3", USE_FSDP),
    "fsdp": SwiftFlag("'full_shard auto_wrap'", TRAIN, "FSDP2, each decoder layer one unit: true, fsdp2 or "
                      "'full_shard auto_wrap'; no offload"),
    "sequence_parallel_size": refused("2", "sequence parallelism is not implemented; each row trains on one GPU"),
    "ddp_backend": SwiftFlag("nccl", TRAIN, "torchrun uses NCCL on GPUs, gloo on the CPU", ignored=True),
    "ddp_timeout": SwiftFlag("1800", TRAIN, "torch.distributed's default timeout applies", ignored=True),
    "ddp_find_unused_parameters": SwiftFlag("false", TRAIN, "no DDP wrapper; LoRA gradients are summed in one all-reduce",
                                            ignored=True),
    # Inference
    "infer_backend": SwiftFlag("pt", INFER, "pt (ms-swift 4.x: transformers) only; vllm, sglang, lmdeploy are not here"),
    "stream": SwiftFlag("true", INFER, "changes nothing with --val_dataset: answers go to the result file"),
    "temperature": SwiftFlag("0", INFER),
    "top_k": SwiftFlag("20", INFER),
    "top_p": SwiftFlag("0.8", INFER),
    "repetition_penalty": SwiftFlag("1.05", INFER),
    "max_new_tokens": SwiftFlag("2048", INFER),
    "merge_lora": SwiftFlag("true", ("infer", "merge"), "merge.py: true only, it always merges",
                            instead="merge.py writes a merged model, `python merge.py --adapters CKPT`"),
    "num_beams": refused("4", "there is no beam search; decoding is greedy (--temperature 0) or sampled"),
    "stop_words": refused("Observation:", "decoding stops at the model's end tokens or at --max_new_tokens"),
    "max_batch_size": SwiftFlag("8", INFER, "rows decoded together (engine.py); unset: 32 (ms-swift: 1); -1: all; on a "
                                "GPU fewer when their KV cache does not fit"),
    "result_path": SwiftFlag("result.jsonl", INFER, "unset: CKPT/infer_result/TIME.jsonl, else "
                             "result/MODEL/infer_result/TIME.jsonl, as ms-swift; an existing file is continued, not "
                             "appended to again"),
    "load_data_args": SwiftFlag("true", INFER, "answers the validation rows train.py held out, rebuilt from the "
                                "checkpoint's args.json (a run of this toolkit's train.py)"),
    "write_batch_size": SwiftFlag("1000", INFER, "each row is written as soon as every row before it is",
                                  ignored=True),
    "vllm_gpu_memory_utilization": refused("0.9", NO_VLLM),
    "vllm_max_model_len": refused("8192", NO_VLLM),
    "gpu_memory_utilization": refused("0.9", NO_VLLM),
    # Export
    "exist_ok": SwiftFlag("true", MERGE),
    "max_shard_size": SwiftFlag("5GB", MERGE),
    "push_to_hub": refused("true", NO_UPLOAD),
    "hub_model_id": refused("me/qwen-robot", NO_UPLOAD),
}


def is_accepted_without_effect(flag: SwiftFlag) -> bool:
    """Flags that the scripts add from this table (cli.FlagParser.add_swift_flags); the scripts
    define the others themselves."""
    return flag.ignored or bool(flag.only)


def refusal(name: str) -> str:
    """The one line for --name given to a script that does not take it."""
    flag = FLAGS[name]
    if not flag.scripts:
        return f"--{name} is an ms-swift flag this toolkit does not support: {flag.instead}."
    where = " and ".join(f"{s}.py" for s in flag.scripts)
    ms_swift = " and ".join(SCRIPTS[s] for s in flag.scripts)
    return f"--{name} is a flag of {where} here ({ms_swift}), not of this script" + (
        f": {flag.instead}." if flag.instead else ".")


def markdown_table() -> str:
    """The README's table: each flag with its example, which scripts take it and how, and the note."""
    rows = ["| ms-swift flag | here | note |", "|---|---|---|"]
    for name, flag in FLAGS.items():
        scripts = ", ".join(f"{s}.py" for s in flag.scripts)
        how = ("ignored" if flag.ignored else "only " + " / ".join(f"`{v}`" for v in flag.only) if flag.only
               else "")
        here = f"{scripts}: {how}" if scripts and how else scripts or "**refused**"
        example = f" {flag.example}" if flag.example else ""
        note = "; ".join(text for text in (flag.note, flag.instead) if text)
        rows.append(f"| `--{name}{example}` | {here} | {note} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
