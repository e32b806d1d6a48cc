"""merge.py: the merged folder is a standard model that transformers loads, with base + adapter logits."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

import lora
import merge
import model as M
from lora import LoraConfig

ROOT = Path(__file__).resolve().parent.parent


def make_checkpoint(base_dir, ckpt, base_name, targets="all-linear", args_json=True):
    """Train-free stand-in for a training run: a random adapter saved like a checkpoint-N folder.

    Returns the base model with the adapter active (unmerged), the reference for the merged folder."""
    m = M.load_model(str(base_dir), dtype=torch.float32)[0]
    lora.add_adapter(m, LoraConfig(r=4, lora_alpha=16, target_modules=targets))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in lora.lora_parameters(m):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    lora.save_adapter(m, ckpt, base_model_name_or_path=base_name)
    if args_json:
        (ckpt / "args.json").write_text(json.dumps({"model": base_name, "system": "Be brief."}))
    return m


def run_merge(*args):
    return subprocess.run([sys.executable, "merge.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True)


def hf_logits(folder, x):
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(x).logits


def test_merged_folder_loads_in_transformers_and_matches_base_plus_adapter(hf_checkpoint, tmp_path):
    base_dir, _ = hf_checkpoint()
    ckpt = tmp_path / "output" / "v0" / "checkpoint-3"
    ref = make_checkpoint(base_dir, ckpt, str(base_dir))
    r = run_merge("--adapters", ckpt, "--device", "cpu")  # base model from args.json
    assert r.returncode == 0, r.stderr
    out = ckpt.parent / "checkpoint-3-merged"
    assert f"merged model written to {out}" in r.stdout
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", "vocab.json", "merges.txt"} <= files
    assert not any(name.startswith("adapter") for name in files)
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []  # no temporary folder left
    x = torch.randint(0, 960, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ref(x)
    assert_close(hf_logits(out, x), expected, rtol=1e-4, atol=1e-4)


def test_sharded_merge_of_a_tied_model_writes_an_index_and_no_lm_head(tiny_dir, tmp_path):
    ckpt = tmp_path / "ckpt"
    ref = make_checkpoint(tiny_dir, ckpt, "tiny", targets=["q_proj", "up_proj"], args_json=False)
    out = tmp_path / "merged"
    r = run_merge("--adapters", ckpt, "--model", "tiny", "--output_dir", out, "--max_shard_size", "200KB", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    per_shard = {s: [k for k, v in index["weight_map"].items() if v == s] for s in shards}
    assert len(shards) > 1
    assert all((out / s).stat().st_size <= 200_000 + 2_000 for s, names in per_shard.items() if len(names) > 1)
    assert "lm_head.weight" not in index["weight_map"]
    assert not any(".lora_" in k for k in index["weight_map"])
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    x = torch.randint(0, 500, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ref(x)
    assert_close(hf_logits(out, x), expected, rtol=1e-4, atol=1e-4)
    ours = M.load_model(str(out), dtype=torch.float32)[0]  # and our own loader reads it back
    with torch.no_grad():
        assert_close(ours(x), expected, rtol=1e-4, atol=1e-4)


def test_merge_writes_the_requested_dtype(tiny_dir, tmp_path):
    ckpt = tmp_path / "ckpt"
    ref = make_checkpoint(tiny_dir, ckpt, "tiny", targets=["o_proj"])
    out = merge.merge(ckpt, output_dir=tmp_path / "m", device="cpu", dtype=torch.bfloat16)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    merged = M.load_model(str(out), dtype=torch.bfloat16)[0]
    w = merged.model.layers[0].self_attn.o_proj.weight
    layer = ref.model.layers[0].self_attn.o_proj
    base = M.load_model(str(tiny_dir), dtype=torch.bfloat16)[0].model.layers[0].self_attn.o_proj.weight
    assert torch.equal(w, (base.float() + layer.delta_weight("default")).bfloat16())  # rounded once


# ----------------------------------------------------------------------------------------------
# Errors: one paragraph on stderr, exit status 2, no traceback


def merge_error(capsys, *argv):
    assert merge.main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


def test_existing_output_folder_is_refused_without_exist_ok(tiny_dir, tmp_path, capsys):
    ckpt = tmp_path / "checkpoint-1"
    make_checkpoint(tiny_dir, ckpt, "tiny", targets=["v_proj"])
    out = tmp_path / "checkpoint-1-merged"
    out.mkdir()
    (out / "old.txt").write_text("keep me")
    err = merge_error(capsys, "--adapters", ckpt, "--device", "cpu")
    assert f"the output folder {out} already exists. Pass --exist_ok" in err
    assert (out / "old.txt").exists()
    merge.main(["--adapters", str(ckpt), "--exist_ok", "--device", "cpu"])
    assert not (out / "old.txt").exists() and (out / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1", "checkpoint-1-merged"]


def test_missing_checkpoint_folder_is_a_clear_error(tmp_path):
    r = run_merge("--adapters", tmp_path / "checkpoint-9", "--model", "tiny")
    assert r.returncode == 2
    assert r.stderr.startswith(f"error: checkpoint folder {tmp_path / 'checkpoint-9'} does not exist.")
    assert "Traceback" not in r.stderr


def test_unknown_base_model_and_broken_adapter_are_errors(tiny_dir, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    make_checkpoint(tiny_dir, ckpt, "", targets=["k_proj"], args_json=False)
    err = merge_error(capsys, "--adapters", ckpt)
    assert "does not say which base model it was trained on" in err and "--model" in err
    (ckpt / "adapter_model.safetensors").unlink()
    err = merge_error(capsys, "--adapters", ckpt, "--model", "tiny")
    assert "has adapter_config.json but no adapter_model.safetensors" in err
    assert not (tmp_path / "ckpt-merged").exists()


def test_a_crash_while_saving_leaves_no_output_folder(tiny_dir, tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpt"
    make_checkpoint(tiny_dir, ckpt, "tiny", targets=["k_proj"])

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(M, "save_safetensors_sharded", disk_full)
    assert merge.main(["--adapters", str(ckpt), "--device", "cpu"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_misspelt_flag_names_the_right_one(capsys):
    err = merge_error(capsys, "--adapters", "x", "--ouput_dir", "y")
    assert "unrecognized arguments: --ouput_dir y (did you mean --output_dir?)" in err


def test_every_flag_has_help(capsys):
    with pytest.raises(SystemExit) as e:
        merge.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--adapters", "--model", "--output_dir", "--exist_ok", "--max_shard_size", "--device", "--torch_dtype"):
        assert flag in text
