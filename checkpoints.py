"""checkpoints.py: the files of a model folder, for model.py: finding the folder (a local path or a
Hugging Face hub id), its generation config, its safetensors shards and their headers, and writing
weights in the same layout. model.py imports these names, and the rest of the project uses them
from there (model.resolve_model_dir, model.checkpoint_files, ...)."""

import json
import os
from pathlib import Path

from util import (check_fields, is_bool, is_number, is_text, is_texts, is_whole, read_json, save_safetensors,
                  short_list)


class ModelError(Exception):
    """A problem with a model folder, config or checkpoint that the user can fix."""


HUB_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "vocab.json", "merges.txt", "*.safetensors", "model.safetensors.index.json"]


def resolve_model_dir(name_or_path: str) -> Path:
    """A local folder, or a hub id such as Qwen/Qwen2.5-7B-Instruct (downloaded once into the HF cache)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelError(f"--model {name_or_path} is a file; it must be a model folder (with config.json and *.safetensors) or a hub id.")
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1 or os.sep != "/" and os.sep in name_or_path
    if looks_local:
        raise ModelError(f"--model {name_or_path}: no such folder. Check the path, or give a hub id such as Qwen/Qwen2.5-7B-Instruct.")
    # The tutorial writes `--model Qwen2.5-7B-Instruct`; on the hub that model lives under Qwen/.
    repo_id = name_or_path if "/" in name_or_path else f"Qwen/{name_or_path}"
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except Exception as e:
        raise ModelError(
            f"--model {name_or_path}: not a local folder, and fetching {repo_id} from the Hugging Face "
            f"hub failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Check the "
            "name and your network, or download the model once and pass its folder; with "
            "HF_HUB_OFFLINE=1 only models already in your HF cache are found."
        ) from None


# What decoding reads from generation_config.json: each field's test and what it must be (null: unset)
GENERATION_FIELDS = {
    "temperature": (lambda v: is_number(v) and v >= 0, "a number of 0 or more"),
    "top_p": (lambda v: is_number(v) and 0 < v <= 1, "a number over 0, at most 1"),
    "top_k": (lambda v: is_whole(v) and v >= 0, "a whole number of 0 or more"),
    "repetition_penalty": (lambda v: is_number(v) and v > 0, "a number over 0"),
    "max_new_tokens": (lambda v: is_whole(v) and v >= 1, "a whole number of 1 or more"),
    "do_sample": (is_bool, "true or false"),
    "eos_token_id": (lambda v: is_whole(v) or (isinstance(v, list) and all(map(is_whole, v))),
                     "a token id or a list of them"),
}

# What inference reads from an adapter checkpoint's args.json (ours or ms-swift's): lora.checkpoint_args
ARGS_FIELDS = {
    "model": (is_text, "a model id or folder"), "model_id_or_path": (is_text, "a model id or folder"),
    "system": (is_text, "a text"), "template": (is_text, "a template name"), "loss_scale": (is_text, "a name"),
    "enable_thinking": (is_bool, "true or false"), "preserve_thinking": (is_bool, "true or false"),
    "add_non_thinking_prefix": (is_bool, "true or false"),
    "model_name": (is_texts, "a text or a list of texts"), "model_author": (is_texts, "a text or a list of texts"),
    "dataset": (is_texts, "a list of dataset names"), "val_dataset": (is_texts, "a list of dataset names"),
    "max_length": (lambda v: is_whole(v) and v >= 1, "a whole number of 1 or more"),
    "data_seed": (is_whole, "a whole number"), "seed": (is_whole, "a whole number"),
    "truncation_strategy": (is_text, "delete, left or right"),
    "split_dataset_ratio": (lambda v: is_number(v) and 0 <= v < 1, "a number from 0 up to 1"),
}


def load_generation_config(model_dir) -> dict:
    """generation_config.json, its decoding fields checked (GENERATION_FIELDS); {} where there is none."""
    path = Path(model_dir) / "generation_config.json"
    config = read_json(path, ModelError) if path.exists() else {}  # (read_json: a JSON object, else ModelError)
    check_fields(path, config, GENERATION_FIELDS, ModelError, "Correct or remove that field (without it, the flags' "
                 "defaults apply), or fetch the model again.")
    return config


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint, single-file or sharded with an index."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index, ModelError).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise ModelError(f"{index} is not a valid index: it needs a \"weight_map\" of tensor name -> file.")
        files = sorted(set(weight_map.values()))
        outside = [f for f in files if Path(f).name != f]  # a path, not a file of this folder
        if outside:
            raise ModelError(f"{index} names shard(s) outside {model_dir}: {short_list(outside)}. A model's index "
                             "names files of its own folder; this one is broken or hostile: fetch the model again.")
        absent = [f for f in files if not (model_dir / f).exists()]
        if absent:
            raise ModelError(f"{index} names shard(s) that are not in {model_dir}: {', '.join(absent)}. The download is incomplete; fetch the model again.")
        return [model_dir / f for f in files]
    if (model_dir / "model.safetensors").exists():
        return [model_dir / "model.safetensors"]
    pickles = sorted(p.name for p in model_dir.glob("*.bin")) + sorted(p.name for p in model_dir.glob("*.pt*"))
    if pickles:
        raise ModelError(
            f"{model_dir} holds only pickle weights ({', '.join(pickles[:3])}). This toolkit loads "
            "safetensors only: pickle files can run arbitrary code when loaded. Convert them once "
            "(e.g. load with transformers and save_pretrained(safe_serialization=True)) or download "
            "the safetensors version of the model."
        )
    raise ModelError(f"{model_dir} has no model.safetensors or model.safetensors.index.json: it is not a model folder.")


def shard_shapes(path: Path) -> dict:
    """{tensor name: shape} from a safetensors file's header; a truncated or corrupt file is a
    ModelError naming it (safetensors says only "incomplete metadata")."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as sf:
            shapes = {k: tuple(sf.get_slice(k).get_shape()) for k in sf.keys()}
    except (SafetensorError, OSError) as e:
        raise ModelError(f"{path} is not a readable safetensors file ({str(e).splitlines()[0]}): the download was "
                         "cut short or the file is damaged. Delete it and fetch the model again.") from None
    return shapes


def save_safetensors_sharded(state_dict: dict, out_dir, max_shard_bytes: int = 5 * 1024**3):
    """Write `model.safetensors` or `model-0000K-of-0000N.safetensors` + index, as transformers does."""

    out_dir = Path(out_dir)
    shards, current, size = [], {}, 0
    for name, t in state_dict.items():
        n = t.numel() * t.element_size()
        if current and size + n > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t.contiguous()
        size += n
    shards.append(current)
    total = sum(t.numel() * t.element_size() for t in state_dict.values())
    if len(shards) == 1:
        save_safetensors(shards[0], out_dir / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_safetensors(shard, out_dir / fname, metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
