"""checkpoints.py: the files of a model folder, for model.py: finding the folder (a local path or a
Hugging Face hub id), its generation config, its safetensors shards and their headers, and writing
weights in the same layout. model.py imports these names, and the rest of the project uses them
from there (model.resolve_model_dir, model.checkpoint_files, ...).

It also says what each JSON file read back must hold, checked as the file is read so that a broken
one is one paragraph and never a traceback or a silently different run: config.json, generation_config.json,
tokenizer_config.json's chat_template, and a checkpoint's adapter_config.json and args.json (ours or
ms-swift's). trainer_state.json's schema is in runs.py and merge_info.json's in merge.py, which write them."""

import json
import os
from pathlib import Path

from util import (check_fields, is_bool, is_number, is_text, is_texts, is_whole, read_json, save_safetensors,
                  short_list)


class ModelError(Exception):
    """A problem with a model folder, config or checkpoint that the user can fix."""


HUB_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
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
    "temperature": (lambda v: is_number(v) and 0 <= v <= 100, "a number from 0 to 100"),
    "top_p": (lambda v: is_number(v) and 0 < v <= 1, "a number over 0, at most 1"),
    "top_k": (lambda v: is_whole(v) and v >= 0, "a whole number of 0 or more"),
    "repetition_penalty": (lambda v: is_number(v) and 0 < v <= 100, "a number over 0, at most 100"),
    "max_new_tokens": (lambda v: is_whole(v) and v >= 1, "a whole number of 1 or more"),
    "do_sample": (is_bool, "true or false"),
    "eos_token_id": (lambda v: is_whole(v) or (isinstance(v, list) and all(map(is_whole, v))),
                     "a token id or a list of them"),
}

DTYPE_NAMES = ("bfloat16", "bf16", "float16", "fp16", "float32", "fp32")  # --torch_dtype's (cli.DTYPES)
# What inference and merge.py read from a checkpoint's args.json (ours or ms-swift's): lora.checkpoint_args
ARGS_FIELDS = {
    "model": (is_text, "a model id or folder"), "model_id_or_path": (is_text, "a model id or folder"),
    "system": (is_text, "a text"), "template": (is_text, "a template name"), "loss_scale": (is_text, "a name"),
    "enable_thinking": (is_bool, "true or false"), "preserve_thinking": (is_bool, "true or false"),
    "reasoning_effort": (lambda v: v in ("xhigh", "medium", "low"), "xhigh, medium or low"),
    "add_non_thinking_prefix": (is_bool, "true or false"),
    "model_name": (is_texts, "a text or a list of texts"), "model_author": (is_texts, "a text or a list of texts"),
    "dataset": (is_texts, "a list of dataset names"), "val_dataset": (is_texts, "a list of dataset names"),
    "max_length": (lambda v: is_whole(v) and v >= 1, "a whole number of 1 or more"),
    "data_seed": (is_whole, "a whole number"), "seed": (is_whole, "a whole number"),
    "truncation_strategy": (is_text, "delete, left or right"),
    "split_dataset_ratio": (lambda v: is_number(v) and 0 <= v < 1, "a number from 0 up to 1"),
    "torch_dtype": (lambda v: is_text(v) and v.removeprefix("torch.") in DTYPE_NAMES, "bfloat16, float16 or float32"),
}


# What model.Config reads from config.json (a vision-language one's text_config) before its numbers:
# each field's test and what it must be (null: unset)
is_texts_list = lambda v: isinstance(v, list) and all(map(is_text, v))
is_token_ids = lambda v: is_whole(v) and v >= 0 or isinstance(v, list) and all(is_whole(i) and i >= 0 for i in v)
CONFIG_FIELDS = {
    "model_type": (is_text, 'a model type such as "qwen2"'), "architectures": (is_texts_list, "a list of class names"),
    "rope_parameters": (lambda v: isinstance(v, dict), "an object of RoPE settings"),
    "rope_scaling": (lambda v: isinstance(v, dict), "an object of RoPE settings"),
    "layer_types": (is_texts_list, "a list of each layer's type"), "hidden_act": (is_text, '"silu"'),
    "use_sliding_window": (is_bool, "true or false"), "tie_word_embeddings": (is_bool, "true or false"),
    "attention_bias": (is_bool, "true or false"), "torch_dtype": (is_text, 'a dtype name such as "bfloat16"'),
    "dtype": (is_text, 'a dtype name such as "bfloat16"'), "bos_token_id": (is_token_ids, "a token id"),
    "eos_token_id": (is_token_ids, "a token id or a list of them"),
    "full_attention_interval": (lambda v: is_whole(v) and v >= 1, "a whole number of 1 or more"),
}
# ... and its numbers, once they are known to be numbers (check_config_numbers): sizes a Qwen model has
SIZES = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size")
CONFIG_NUMBERS = {
    "rms_norm_eps": (lambda v: is_number(v) and 0 < v < 1, "a number over 0 and under 1 (Qwen's: 1e-06)"),
    "rope_theta": (lambda v: is_number(v) and v > 0, "a number over 0 (Qwen's: 1000000.0)"),
    "partial_rotary_factor": (lambda v: is_number(v) and 0 < v <= 1, "a number over 0, at most 1"),
    "head_dim": (lambda v: 1 <= v <= 2**12, "a whole number from 1 to 4096"),
    "max_position_embeddings": (lambda v: 1 <= v <= 2**31, "a whole number from 1 to 2**31"),
    **{k: (lambda v: 1 <= v <= 2**12, "a whole number from 1 to 4096") for k in (
        "linear_conv_kernel_dim", "linear_key_head_dim", "linear_value_head_dim", "linear_num_key_heads",
        "linear_num_value_heads")},
}
CONFIG_FIX = "Correct that field from the model's own config.json, or fetch the model again."


def check_config(d: dict, where: str) -> None:
    """config.json's fields that are no numbers (CONFIG_FIELDS), checked before anything reads them."""
    check_fields(where, d, CONFIG_FIELDS, ModelError, CONFIG_FIX)


def check_config_numbers(d: dict, where: str, types: dict) -> None:
    """config.json's numbers ({name: int or float}, model.Config's fields): each a number of its type, and
    of a size a Qwen model has. Each layer is built before any weight is read: a broken count must stop
    here, not fill the memory."""
    for name, want in types.items():
        value = d.get(name)
        if value is not None and (not isinstance(value, {int: int, float: (int, float)}[want]) or is_bool(value)):
            raise ModelError(f"{where}: {name} is {value!r}, not a number; fix it (e.g. 128, not \"128\").")
    bad = next((k for k in SIZES if d.get(k) is not None and not 1 <= d[k] <= (2**10 if "layers" in k else 2**24)), None)
    if bad:
        raise ModelError(f"{where}: {bad} is {d[bad]}, which no Qwen model has: take the model's own config.json.")
    check_fields(where, d, CONFIG_NUMBERS, ModelError, CONFIG_FIX)
    layers, head = d.get("layer_types"), d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"]
    if layers is not None and len(layers) != d["num_hidden_layers"]:
        raise ModelError(f"{where}: layer_types names {len(layers)} layers, but num_hidden_layers is "
                         f"{d['num_hidden_layers']}. {CONFIG_FIX}")
    turned = int(head * d.get("partial_rotary_factor", 1.0))  # RoPE turns pairs of dims (model.Config.rotary_dim)
    if turned < 2 or turned % 2:
        raise ModelError(f"{where}: RoPE would turn {turned} dims of each head (head_dim {head} times "
                         f"partial_rotary_factor), which must be an even number of 2 or more. {CONFIG_FIX}")


# What lora.read_adapter reads from adapter_config.json (lora.save_adapter writes it as peft does), once
# r, lora_alpha and lora_dropout are known to be numbers: the sizes LoRA takes, and the base model
ADAPTER_FIELDS = {
    "r": (lambda v: 1 <= v <= 2**16, "a whole number from 1 to 65536"),
    "lora_alpha": (lambda v: is_number(v) and 0 < v <= 2**16, "a number over 0, at most 65536"),
    "lora_dropout": (lambda v: is_number(v) and 0 <= v < 1, "a number from 0 up to 1"),
    "base_model_name_or_path": (is_text, "a model id or folder"),
}


def check_adapter_config(path, d: dict, error: type) -> None:
    """adapter_config.json's fields that lora.read_adapter reads: r, lora_alpha and lora_dropout numbers
    of the sizes LoRA takes and the base model's name (ADAPTER_FIELDS), use_rslora true or false
    ("false" would read as true), target_modules module names; else `error` naming the file, the
    field and what to do."""
    for key, default in (("r", 8), ("lora_alpha", 8), ("lora_dropout", 0.0)):
        value = d.get(key, default)
        whole = is_number(value) and value == int(value)
        if not isinstance(value, (int, float)) or is_bool(value) or key == "r" and not whole:
            raise error(f"{path}: {key} is {value!r}, not a number; fix it (e.g. 16, not \"16\").")
    check_fields(path, d, ADAPTER_FIELDS, error, "The file was edited or damaged: correct that field, or use "
                 "another checkpoint.")
    if not is_bool(d.get("use_rslora", False)):
        raise error(f"{path}: use_rslora is {d['use_rslora']!r}, not true or false; fix it (false, not \"false\").")
    targets = d.get("target_modules")
    if targets is not None and not is_texts(targets):
        raise error(f"{path}: target_modules is {targets!r}; peft writes a list of module names (or a string).")


def load_generation_config(model_dir) -> dict:
    """generation_config.json, its decoding fields checked (GENERATION_FIELDS); {} where there is none."""
    path = Path(model_dir) / "generation_config.json"
    config = read_json(path, ModelError) if path.exists() else {}  # (read_json: a JSON object, else ModelError)
    check_fields(path, config, GENERATION_FIELDS, ModelError, "Correct or remove that field (without it, the flags' "
                 "defaults apply), or fetch the model again.")
    return config


def chat_template(model_dir, error: type) -> str:
    """The checkpoint's Jinja chat template ("" where there is none): chat_template.jinja, which wins
    as in transformers (Qwen3.8 ships its template so), else tokenizer_config.json's chat_template:
    a text, or the list of named templates ({"name", "template"}) of which "default" is taken."""
    if (Path(model_dir) / "chat_template.jinja").is_file():
        return (Path(model_dir) / "chat_template.jinja").read_text(encoding="utf-8")
    path = Path(model_dir) / "tokenizer_config.json"
    jinja = (read_json(path, error) if path.exists() else {}).get("chat_template")
    if isinstance(jinja, list) and all(isinstance(t, dict) and is_text(t.get("name")) and is_text(t.get("template"))
                                       for t in jinja):
        jinja = next((t["template"] for t in jinja if t["name"] == "default"), "")
    check_fields(path, {"chat_template": jinja}, {"chat_template": (is_text, "a text, the Jinja chat template")}, error,
                 "Correct or remove that field (without it, the template of the model's type is used), or fetch the "
                 "model again.")
    return jinja or ""


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint, single-file or sharded with an index."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index, ModelError).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise ModelError(f"{index} is not a valid index: it needs a \"weight_map\" of tensor name -> file.")
        files = sorted(set(weight_map.values()))
        outside = [f for f in files if Path(f).name != f or f in ("", "..")]  # a path, not a file of this folder
        if outside:
            raise ModelError(f"{index} names shard(s) outside {model_dir}: {short_list(outside)}. A model's index "
                             "names files of its own folder; this one is broken or hostile: fetch the model again.")
        absent = [f for f in files if not (model_dir / f).is_file()]
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
