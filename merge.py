"""merge.py: fold a LoRA checkpoint into its base model and write a standard Hugging Face model folder.

    python merge.py --adapters output/v0-20250101-120000/checkpoint-100

Merging adds the adapter's update into each wrapped weight, W = W0 + (alpha / r) * B A, computed
in float32 and rounded once to the weight's dtype (lora.merge_lora). The result is an ordinary
model: no adapter files, no extra compute at inference, and any tool that reads Qwen2.5 (transformers,
vLLM, llama.cpp's converter) can load it. The output, `<checkpoint>-merged/` by default, holds
config.json, generation_config.json, the base model's tokenizer files, safetensors shards of at
most 5 GB with model.safetensors.index.json, the checkpoint's args.json (its training system prompt;
swift export keeps it too) and merge_info.json (what was merged into what, and that merge.py did it).
A Qwen3.5 base in its official vision-language layout stays in it: the text model is merged and
written back under its own names (model.language_model.*), the vision tower (model.visual.*) and
the multi-token-prediction weights (mtp.*) are copied unchanged, and config.json is the base's, so
the merged folder loads wherever the base does (Qwen3_5ForConditionalGeneration, vLLM, ms-swift).

Only one copy of the base is ever in memory: it is loaded, merged in place and saved. Everything is
written into a hidden sibling folder `.NAME.tmp-PID-XXXXXXXX` that is renamed into place at the end
(util.atomic_folder), so a crash or Ctrl-C never leaves a half-written model behind; one left by a
merge that was killed (its process is gone, and it holds only files merge.py writes) is removed by
the next merge into the same folder. Every merged folder holds merge_info.json, and --exist_ok
replaces only such a folder: never a file, a training run, a checkpoint, the base model, or a
folder holding either.
"""

import json
import os
import re
import shutil
import sys
from pathlib import Path

import torch

import cli
import lora
import model as M
from template import template_name_of
from util import atomic_folder, check_fields, is_text, read_json, remove_stale_temporaries, short_list

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json")
MARKER = "qwen-lora merge.py"  # merge_info.json's "written_by": how --exist_ok knows a folder is ours
# Every name merge.py writes into its folder; a folder holding anything else is not ours to delete.
MERGED_FILE = re.compile("|".join([r"model\.safetensors(\.index\.json)?", r"model-\d+-of-\d+\.safetensors",
                                   *map(re.escape, ("config.json", "generation_config.json", "args.json",
                                                    "merge_info.json", *TOKENIZER_FILES))]))


class MergeError(cli.UsageError):
    """A bad path or flag given to merge.py."""


def parse_size(text: str) -> int:
    """'5GB', '500MB', '100KB' or a number of bytes -> bytes (decimal units, as transformers uses)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB)?\s*", text, re.IGNORECASE)
    if not m:
        raise MergeError(f"--max_shard_size {text!r} is not a size; write it like 5GB, 500MB or 100KB.")
    return int(float(m[1]) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[(m[2] or "B").upper()])


def base_state_dict(model) -> dict:
    """The plain model's tensors: LoRA A/B dropped, lm_head dropped when tied (as transformers saves)."""
    sd = {k: v for k, v in model.state_dict().items() if ".lora_A." not in k and ".lora_B." not in k}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


def checkpoint_tensors(model, model_dir: Path) -> dict:
    """base_state_dict under the base checkpoint's own names. Qwen3.5's official checkpoints are
    vision-language: the text model goes back under model.language_model., and the vision tower and
    the multi-token-prediction tensors, which no adapter here touches, are copied from the base as
    they are (their dtype too), so that the merged folder is the official layout again."""
    from safetensors import safe_open

    sd, files = base_state_dict(model), M.checkpoint_files(model_dir)
    names = {M.text_name(k, model.config): k for f in files for k in M.shard_shapes(f)}  # ours -> the checkpoint's
    if all(ours == theirs for ours, theirs in names.items()):
        return sd
    out = {names.get(k, k): v for k, v in sd.items()}
    for f in files:
        with safe_open(f, framework="pt", device="cpu") as sf:
            out.update({k: sf.get_tensor(k) for k in sf.keys() if M.text_name(k, model.config) is None})
    return out


def config_json(config, model_dir: Path) -> dict:
    """The merged folder's config.json: a vision-language base's own (text_config, vision_config and
    the rest) with the merge's dtype; otherwise the text model's, as transformers writes it."""
    base = read_json(model_dir / "config.json", M.ModelError)  # (checked already, by Config.from_json)
    if not isinstance(base.get("text_config"), dict):
        return config.to_dict()
    for d in (base, base["text_config"]):
        d.update({key: config.torch_dtype for key in ("dtype", "torch_dtype") if key in d})
    return base


# merge_info.json as write_folder writes it: each field's test and what it must be
MERGE_INFO_FIELDS = {"written_by": (is_text, f'"{MARKER}"'), "adapters": (is_text, "the merged checkpoint's path"),
                     "base_model": (is_text, "the base model's id or folder"),
                     "torch_dtype": (lambda v: is_text(v) and v in cli.DTYPES, "bfloat16, float16 or float32")}
NOT_REPLACED = ("--exist_ok replaces only a folder whose merge_info.json says merge.py wrote it, so nothing was "
                "changed: choose another --output_dir, or delete that folder yourself if you are sure")


def written_by_merge(folder: Path) -> bool:
    """Whether merge_info.json says merge.py wrote `folder`; one that is damaged, or whose fields are
    not what merge.py writes (MERGE_INFO_FIELDS), is a MergeError: it vouches for nothing."""
    path = folder / "merge_info.json"
    if not path.is_file():
        return False
    info = read_json(path, MergeError, hint=NOT_REPLACED)
    check_fields(path, info, MERGE_INFO_FIELDS, MergeError, NOT_REPLACED[0].upper() + NOT_REPLACED[1:] + ".")
    return info.get("written_by") == MARKER


def holds_only_merged_files(folder: Path) -> bool:
    """Whether `folder` holds nothing but files merge.py writes: no folder, no link, no other name."""
    return all(f.is_file() and not f.is_symlink() and MERGED_FILE.fullmatch(f.name) for f in folder.iterdir())


def check_output(out: Path, exist_ok: bool, inputs: dict) -> None:
    """Refuse an --output_dir that cannot be written, or whose replacement could lose anything."""
    blocker = next((p for p in out.parents if p.exists() or p.is_symlink()), None)
    if blocker is not None and not blocker.is_dir():  # found now, not when writing after the long load
        raise MergeError(f"--output_dir {out} is inside {blocker}, which is a file, not a folder. Nothing was "
                         "changed; choose a folder path with --output_dir.")
    if not (out.exists() or out.is_symlink()):
        return
    if not out.is_dir():
        raise MergeError(f"--output_dir {out} is a file, not a folder, and merge.py writes a model folder there. "
                         "Nothing was changed; choose a folder path with --output_dir.")
    if not exist_ok:
        raise MergeError(f"the output folder {out} already exists. Pass --exist_ok to replace it, or choose "
                         "another folder with --output_dir.")
    check_replaceable(out, inputs)


def check_replaceable(out: Path, inputs: dict) -> None:
    """--exist_ok deletes the folder, so it may only be one that merge.py wrote, holding only files
    merge.py writes (no folder: a run's checkpoints or a model would be lost), and none of `inputs`
    ({"adapter": path, ...})."""
    if out.is_symlink():  # replacing would rename the link, not the folder it points to
        raise MergeError(f"--output_dir {out} is a symbolic link; --exist_ok replaces only a folder merge.py "
                         "wrote. Nothing was changed; pass the folder itself, or another --output_dir.")
    for what, path in inputs.items():
        if path.resolve() == out.resolve():
            raise MergeError(f"--output_dir {out} is the {what} folder of this merge; --exist_ok would delete it. "
                             "Nothing was changed; choose another --output_dir (by default merge.py writes "
                             "CHECKPOINT-merged beside the checkpoint).")
    folders = sorted(p.name for p in out.iterdir() if p.is_dir())
    if folders:
        held = [f"the {what} folder {path}" for what, path in inputs.items() if out.resolve() in path.resolve().parents]
        what = ("a training run folder" if any(n.startswith("checkpoint-") for n in folders) else
                f"the folder that holds {held[0]}" if held else "not a merged model")
        raise MergeError(f"--output_dir {out} holds folders ({short_list(folders, 4)}): it is {what}, and "
                         "--exist_ok replaces only a folder merge.py wrote, which holds none. Nothing was changed; "
                         "choose a new folder with --output_dir.")
    if not written_by_merge(out):
        raise MergeError(f"--output_dir {out} was not written by merge.py (it has no merge_info.json saying so), "
                         "so --exist_ok will not replace it: it may hold a model or files you need. Nothing was "
                         "changed; choose a new folder with --output_dir, or delete this one yourself if you are sure.")
    foreign = sorted(f.name for f in out.iterdir() if not MERGED_FILE.fullmatch(f.name))
    if foreign:  # added after the merge (a converted GGUF, notes): --exist_ok would delete them with it
        raise MergeError(f"--output_dir {out} holds files merge.py never writes ({short_list(foreign, 4)}), so "
                         "--exist_ok will not replace it. Nothing was changed; move them out, or choose a new "
                         "folder with --output_dir.")


def merge_dtype(flag, ckpt_args: dict, config) -> tuple:
    """--torch_dtype, else the dtype the adapter was trained in (args.json's torch_dtype), else the
    base config's; with the reason, for the log. Merging an adapter trained on float32 weights in
    bf16 rounds W0 + delta to 8 significant bits: an update under about 0.2% of its weight
    vanishes, and W0 is not what the adapter saw."""
    if flag is not None:
        return flag, "--torch_dtype"
    trained = ckpt_args.get("torch_dtype")  # train.py writes null when it chose by device
    if isinstance(trained, str) and trained.removeprefix("torch.") in cli.DTYPES:
        return cli.DTYPES[trained.removeprefix("torch.")], "the checkpoint's training dtype"
    return cli.DTYPES.get(config.torch_dtype, torch.bfloat16), "the base model's config.json"


def output_path(adapters, output_dir) -> Path:
    """--output_dir, else CHECKPOINT-merged beside the checkpoint. Absolute, because `.` or `..` has
    no name and no parent to put CHECKPOINT-merged and the hidden folders in."""
    where = Path(os.path.abspath(adapters))
    return Path(os.path.abspath(output_dir)) if output_dir else where.parent / f"{where.name}-merged"


def merge(adapters, base=None, output_dir=None, exist_ok=False, device="cpu", dtype=None,
          max_shard_bytes=5 * 10**9) -> Path:
    """Merge the adapter checkpoint `adapters` into `base` and write the model folder; returns its path."""
    ckpt = Path(adapters)
    ckpt_args = lora.checkpoint_args(ckpt)  # also checks that the folder exists
    base = base or ckpt_args["model"]
    if not base:
        raise MergeError(f"{ckpt} does not say which base model it was trained on (no \"model\" in args.json, "
                         "no base_model_name_or_path in adapter_config.json). Pass it with --model.")
    lora.read_adapter(ckpt)  # fail on a broken adapter now, not after loading gigabytes of base model
    out = output_path(ckpt, output_dir)
    local_base = {"base model": Path(base)} if Path(base).is_dir() else {}
    check_output(out, exist_ok, {"adapter": ckpt, **local_base})  # in a second, before the base is fetched
    device = cli.pick_device(device)
    for p in remove_stale_temporaries(out, is_ours=holds_only_merged_files):
        print(f"removed {p}, left by an earlier merge.py into {out} that was stopped", flush=True)

    model_dir = cli.model_dir(base)
    inputs = {"adapter": ckpt, "base model": model_dir}
    check_output(out, exist_ok, inputs)  # the base's folder is known only now (a hub id, tiny)
    config = M.Config.from_json(model_dir / "config.json")
    M.load_generation_config(model_dir)  # the files the merged folder copies, checked as loading it checks them:
    template_name_of(model_dir, config.model_type)  # a broken one is refused here, not passed on
    dtype, why = merge_dtype(dtype, ckpt_args, config)
    config.torch_dtype = str(dtype).removeprefix("torch.")
    print(f"loading {base} ({config.torch_dtype}, {why}) on {device}", flush=True)
    model, _ = M.load_model(str(model_dir), dtype=dtype, device=device)
    cfg = lora.load_adapter(model, ckpt, base_model_name_or_path=base)
    print(f"merging {ckpt} (r={cfg.r}, alpha={cfg.lora_alpha}{', rsLoRA' if cfg.use_rslora else ''})", flush=True)
    lora.merge_lora(model)

    info = {"written_by": MARKER, "adapters": str(ckpt.resolve()), "base_model": base,
            "torch_dtype": config.torch_dtype}
    with atomic_folder(out, replace=exist_ok) as tmp:  # an earlier merge is swapped out only at the end
        write_folder(tmp, model, config, model_dir, ckpt, info, max_shard_bytes)
        check_output(out, exist_ok, inputs)  # again: something may have appeared there meanwhile
    return out


def write_folder(folder: Path, model, config, model_dir: Path, ckpt: Path, info: dict, max_shard_bytes: int) -> None:
    """Everything the merged model folder holds, written into `folder` (the hidden temporary one)."""
    M.save_safetensors_sharded(checkpoint_tensors(model, model_dir), folder, max_shard_bytes)
    (folder / "config.json").write_text(json.dumps(config_json(config, model_dir), indent=2) + "\n")
    for name in ("generation_config.json",) + TOKENIZER_FILES:
        if (model_dir / name).exists():
            shutil.copyfile(model_dir / name, folder / name)
    # The training system prompt, for inference on the merged model (swift export keeps args.json too).
    if (ckpt / "args.json").is_file():
        shutil.copyfile(ckpt / "args.json", folder / "args.json")
    (folder / "merge_info.json").write_text(json.dumps(info, indent=2) + "\n")


def main(argv=None) -> int:
    p = cli.FlagParser(description="Merge a LoRA checkpoint into its base model and save a standard "
                                   "Hugging Face model folder (config, tokenizer, safetensors shards).")
    # What to merge
    p.add_argument("--adapters", required=True, help="checkpoint folder with adapter_config.json and "
                   "adapter_model.safetensors (a checkpoint-N folder of a training run, or any peft LoRA adapter)")
    p.add_argument("--merge_lora", type=cli.str2bool, default=True, help="true (the only choice): accepted so that "
                   "ms-swift's `swift export --adapters CKPT --merge_lora true` runs as written")
    p.add_argument("--model", default=None, help="base model folder, hub id or 'tiny' (default: the model named in "
                   "the checkpoint's args.json or adapter_config.json)")
    # Where to write it
    p.add_argument("--output_dir", default=None, help="folder to write (default: CHECKPOINT-merged beside the checkpoint)")
    p.add_argument("--exist_ok", nargs="?", const=True, default=False, type=cli.str2bool, help="replace an earlier merge.py's "
                   "output folder (never a run, a checkpoint or a base model)")
    p.add_argument("--max_shard_size", default="5GB", help="largest safetensors shard, e.g. 5GB or 500MB")
    # How to compute it
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available); holds one copy of the base")
    p.add_argument("--torch_dtype", default=None, help="bfloat16, float16 or float32 (default: the dtype the adapter "
                   "was trained in, torch_dtype in the checkpoint's args.json, else the base's config.json)")

    def merge_and_say():
        a = p.parse_args(argv)
        if not a.merge_lora:
            raise MergeError(f"--merge_lora false: merge.py only merges (it is `swift export --merge_lora true`). To "
                             f"use the adapter unmerged, load it at inference: python infer.py --adapters {a.adapters}")
        dtype = cli.parse_dtype(a.torch_dtype) if a.torch_dtype else None
        out = merge(a.adapters, a.model, a.output_dir, a.exist_ok, a.device, dtype, parse_size(a.max_shard_size))
        print(f"merged model written to {out}")
        return 0

    # A Ctrl-C once the new folder is in place says so itself (util.atomic_folder).
    return cli.run_main(merge_and_say, "interrupted: nothing was written, and the output folder is as it was.",
                        term_as_ctrl_c=True)


if __name__ == "__main__":
    sys.exit(main())
