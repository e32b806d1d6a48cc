"""merge.py: fold a LoRA checkpoint into its base model and write a standard Hugging Face model folder.

    python merge.py --adapters output/v0-20250101-120000/checkpoint-100

Merging adds the adapter's update into each wrapped weight, W = W0 + (alpha / r) * B A, computed
in float32 and rounded once to the weight's dtype (lora.merge_lora). The result is an ordinary
model: no adapter files, no extra compute at inference, and any tool that reads Qwen2.5 (transformers,
vLLM, llama.cpp's converter) can load it. The output, `<checkpoint>-merged/` by default, holds
config.json, generation_config.json, the base model's tokenizer files and safetensors shards of at
most 5 GB with model.safetensors.index.json.

Only one copy of the base is ever in memory: it is loaded, merged in place and saved. Everything is
written into a hidden sibling folder that is renamed into place at the end, so a crash or Ctrl-C
never leaves a half-written model behind.
"""

import json
import re
import shutil
import sys
from pathlib import Path

import torch

import cli
import lora
import model as M
from util import atomic_folder

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json")


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


def merge(adapters, base=None, output_dir=None, exist_ok=False, device="cpu", dtype=None,
          max_shard_bytes=5 * 10**9) -> Path:
    """Merge the adapter checkpoint `adapters` into `base` and write the model folder; returns its path."""
    ckpt = Path(adapters)
    saved_base = lora.checkpoint_args(ckpt)["model"]  # also checks that the folder exists
    base = base or saved_base
    if not base:
        raise MergeError(f"{ckpt} does not say which base model it was trained on (no \"model\" in args.json, "
                         "no base_model_name_or_path in adapter_config.json). Pass it with --model.")
    lora.read_adapter(ckpt)  # fail on a broken adapter now, not after loading gigabytes of base model
    out = Path(output_dir) if output_dir else ckpt.parent / f"{ckpt.name}-merged"
    if out.exists() and not exist_ok:
        raise MergeError(f"the output folder {out} already exists. Pass --exist_ok to replace it, or choose "
                         "another folder with --output_dir.")
    device = cli.pick_device(device)
    model_dir = cli.model_dir(base)
    config = M.Config.from_json(model_dir / "config.json")
    dtype = dtype or cli.DTYPES.get(config.torch_dtype, torch.bfloat16)
    print(f"loading {base} ({dtype}) on {device}", flush=True)
    model, _ = M.load_model(str(model_dir), dtype=dtype, device=device)
    cfg = lora.load_adapter(model, ckpt, base_model_name_or_path=base)
    print(f"merging {ckpt} (r={cfg.r}, alpha={cfg.lora_alpha}{', rsLoRA' if cfg.use_rslora else ''})", flush=True)
    lora.merge_lora(model)

    with atomic_folder(out, replace=exist_ok) as tmp:  # the old folder is swapped out only at the end
        M.save_safetensors_sharded(base_state_dict(model), tmp, max_shard_bytes)
        config.torch_dtype = str(dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        for name in ("generation_config.json",) + TOKENIZER_FILES:
            if (model_dir / name).exists():
                shutil.copy(model_dir / name, tmp / name)
    return out


def main(argv=None) -> int:
    p = cli.FlagParser(description="Merge a LoRA checkpoint into its base model and save a standard "
                                   "Hugging Face model folder (config, tokenizer, safetensors shards).")
    # What to merge
    p.add_argument("--adapters", required=True, help="a checkpoint folder (adapter_config.json and adapter_model.safetensors)")
    p.add_argument("--model", default=None, help="base model folder, hub id or 'tiny' (default: the one the adapter names)")
    # Where to write it
    p.add_argument("--output_dir", default=None, help="folder to write (default: CHECKPOINT-merged beside the checkpoint)")
    p.add_argument("--exist_ok", action="store_true", help="replace the output folder if it already exists")
    p.add_argument("--max_shard_size", default="5GB", help="largest safetensors shard, e.g. 5GB or 500MB")
    # How to compute it
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available); holds one copy of the base")
    p.add_argument("--torch_dtype", default=None, help="bfloat16, float16 or float32 (default: the base's config.json)")

    def merge_and_say():
        a = p.parse_args(argv)
        dtype = cli.parse_dtype(a.torch_dtype) if a.torch_dtype else None
        out = merge(a.adapters, a.model, a.output_dir, a.exist_ok, a.device, dtype, parse_size(a.max_shard_size))
        print(f"merged model written to {out}")
        return 0

    return cli.run_main(merge_and_say)


if __name__ == "__main__":
    sys.exit(main())
