"""merge.py: the merged folder is a standard model that transformers loads, with base + adapter logits."""

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

import lora
import merge
import model as M
from lora import LoraConfig
from conftest import hf_families


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


def merged(capsys, *args) -> str:
    """merge.py as merge.main in this process (a process start costs seconds here; the tests that need a
    process of its own, to kill it, start one): what it printed, after checking that it exited 0."""
    capsys.readouterr()
    code = merge.main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def hf_logits(folder, x):
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(x).logits


@hf_families
def test_merged_folder_loads_in_transformers_and_matches_base_plus_adapter(hf_checkpoint, tmp_path, capsys, family):
    base_dir, _ = hf_checkpoint(family=family)
    ckpt = tmp_path / "output" / "v0" / "checkpoint-3"
    ref = make_checkpoint(base_dir, ckpt, str(base_dir))
    said = merged(capsys, "--adapters", ckpt, "--device", "cpu")  # base model from args.json
    out = ckpt.parent / "checkpoint-3-merged"
    assert f"merged model written to {out}" in said
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", "vocab.json", "merges.txt"} <= files
    assert not any(name.startswith("adapter") for name in files)
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []  # no temporary folder left
    x = torch.randint(0, 960, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ref(x)
    assert_close(hf_logits(out, x), expected, rtol=1e-4, atol=1e-4)


def test_sharded_merge_of_a_tied_model_writes_an_index_and_no_lm_head(tiny_dir, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    ref = make_checkpoint(tiny_dir, ckpt, "tiny", targets=["q_proj", "up_proj"], args_json=False)
    out = tmp_path / "merged"
    merged(capsys, "--adapters", ckpt, "--model", "tiny", "--output_dir", out, "--max_shard_size", "200KB", "--device", "cpu")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    per_shard = {s: [k for k, v in index["weight_map"].items() if v == s] for s in shards}
    assert len(shards) > 1
    assert all((out / s).stat().st_size <= 200_000 + 2_000 for s, names in per_shard.items() if len(names) > 1)
    assert "lm_head.weight" not in index["weight_map"]
    assert not any(".lora_" in k for k in index["weight_map"])
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    assert not (out / "args.json").exists()  # the checkpoint has none, and none is invented
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


def test_merged_folder_keeps_the_checkpoints_args_json_and_its_system_prompt(tiny_dir, tmp_path):
    """As swift export does, so that inference on the merged model can use the training system prompt."""
    ckpt = tmp_path / "ckpt"
    make_checkpoint(tiny_dir, ckpt, "tiny", targets=["q_proj"])
    swift_args = {"model": "tiny", "model_type": "qwen2_5", "template": "qwen2_5", "system": "你是小黄。",
                  "train_type": "lora", "torch_dtype": "float32"}  # the keys an ms-swift checkpoint's args.json has
    (ckpt / "args.json").write_text(json.dumps(swift_args, ensure_ascii=False, indent=2))
    out = merge.merge(ckpt, output_dir=tmp_path / "m", device="cpu")
    assert (out / "args.json").read_bytes() == (ckpt / "args.json").read_bytes()
    assert lora.checkpoint_args(out)["system"] == "你是小黄。"


def test_merge_uses_the_checkpoints_training_dtype_unless_torch_dtype_is_given(tiny_dir, tmp_path):
    base = tmp_path / "base"  # a base whose config.json says bfloat16, as Qwen2.5's do
    shutil.copytree(tiny_dir, base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "torch_dtype": "bfloat16"}))
    ckpt = tmp_path / "ckpt"
    ref = make_checkpoint(base, ckpt, str(base), targets=["o_proj"])
    (ckpt / "args.json").write_text(json.dumps({"model": str(base), "torch_dtype": "float32"}))

    out = merge.merge(ckpt, output_dir=tmp_path / "m", device="cpu")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"
    merged = M.load_model(str(out), dtype=torch.float32)[0].model.layers[0].self_attn.o_proj.weight
    layer = ref.model.layers[0].self_attn.o_proj
    assert torch.equal(merged, layer.weight + layer.delta_weight("default"))  # no rounding to bf16

    out = merge.merge(ckpt, output_dir=tmp_path / "m", exist_ok=True, device="cpu", dtype=torch.bfloat16)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"  # --torch_dtype wins
    # train.py stores null when --torch_dtype was not given; then the base's config.json decides
    (ckpt / "args.json").write_text(json.dumps({"model": str(base), "torch_dtype": None}))
    out = merge.merge(ckpt, output_dir=tmp_path / "m", exist_ok=True, device="cpu")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def modes(folder) -> dict:
    return {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in [Path(folder), *Path(folder).iterdir()]}


def merge_under_umask(umask, *args, **kwargs):
    old = os.umask(umask)
    try:
        return merge.merge(*args, **kwargs)
    finally:
        os.umask(old)


def test_merged_folder_and_files_follow_the_umask(tiny_dir, tmp_path):
    """Not owner-only (mkdtemp's 0o700) under umask 022, so another account can load the model."""
    base = tmp_path / "base"
    shutil.copytree(tiny_dir, base)
    (base / "tokenizer.json").chmod(0o600)  # a private source file must not make the copy private
    ckpt = tmp_path / "ckpt"
    make_checkpoint(base, ckpt, str(base), targets=["q_proj"])
    out = merge_under_umask(0o022, ckpt, output_dir=tmp_path / "m", device="cpu")
    assert modes(out) == {"m": "0o755", **{f.name: "0o644" for f in out.iterdir()}}
    out = merge_under_umask(0o077, ckpt, output_dir=tmp_path / "m", exist_ok=True, device="cpu")
    assert modes(out) == {"m": "0o700", **{f.name: "0o600" for f in out.iterdir()}}


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
    merge.main(["--adapters", str(ckpt), "--max_shard_size", "200KB", "--device", "cpu"])
    out = tmp_path / "checkpoint-1-merged"
    before = snapshot(out)
    for flag in ([], ["--exist_ok", "false"]):
        err = merge_error(capsys, "--adapters", ckpt, "--device", "cpu", *flag)
        assert f"the output folder {out} already exists. Pass --exist_ok" in err
    assert snapshot(out) == before
    assert merge.main(["--adapters", str(ckpt), "--exist_ok", "true", "--device", "cpu"]) == 0  # as ms-swift writes it
    merge.main(["--adapters", str(ckpt), "--exist_ok", "--device", "cpu"])  # an earlier merge is replaced
    assert (out / "model.safetensors").exists() and not (out / "model.safetensors.index.json").exists()
    assert not list(out.glob("model-*-of-*.safetensors"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1", "checkpoint-1-merged"]


# ----------------------------------------------------------------------------------------------
# --exist_ok replaces only a folder merge.py wrote: never a run, a checkpoint, a base model or a file


def snapshot(folder) -> dict:
    """Every folder and every file's bytes under `folder`, hidden ones included: equal snapshots
    mean nothing was deleted, added or changed."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else "dir" for p in [folder, *folder.rglob("*")]}


def make_run(base_dir, run, base_name):
    """A training run folder as train.py leaves it: args.json, logging.jsonl, two checkpoints."""
    for step in (1, 2):
        make_checkpoint(base_dir, run / f"checkpoint-{step}", base_name, targets=["q_proj"])
        (run / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (run / "args.json").write_text(json.dumps({"model": base_name}))
    (run / "logging.jsonl").write_text('{"step": 1, "loss": 2.5}\n')
    return run


def test_exist_ok_refuses_a_training_run_folder(tiny_dir, tmp_path, capsys):
    run = make_run(tiny_dir, tmp_path / "output" / "v0-20250101-120000", "tiny")
    before = snapshot(tmp_path)
    err = merge_error(capsys, "--adapters", run / "checkpoint-2", "--output_dir", run, "--exist_ok", "--device", "cpu")
    assert f"--output_dir {run} holds folders (checkpoint-1, checkpoint-2): it is a training run folder" in err
    assert snapshot(tmp_path) == before  # every checkpoint still there, byte for byte


def test_exist_ok_refuses_the_adapter_folder(tiny_dir, tmp_path, capsys):
    ckpt = tmp_path / "adapters" / "self-cognition"
    make_checkpoint(tiny_dir, ckpt, "tiny", targets=["k_proj"])
    before = snapshot(tmp_path)
    err = merge_error(capsys, "--adapters", ckpt, "--output_dir", ckpt, "--exist_ok", "--device", "cpu")
    assert f"--output_dir {ckpt} is the adapter folder" in err
    err = merge_error(capsys, "--adapters", ckpt, "--output_dir", ckpt.parent, "--exist_ok", "--device", "cpu")
    assert (f"--output_dir {ckpt.parent} holds folders (self-cognition): it is the folder that holds the adapter "
            f"folder {ckpt}") in err
    assert snapshot(tmp_path) == before


def test_exist_ok_refuses_the_base_model_folder_and_one_holding_it(tiny_dir, tmp_path, capsys):
    base = tmp_path / "models" / "base"
    shutil.copytree(tiny_dir, base)
    ckpt = tmp_path / "ckpt"
    make_checkpoint(base, ckpt, str(base), targets=["up_proj"])
    before = snapshot(tmp_path)
    err = merge_error(capsys, "--adapters", ckpt, "--output_dir", base, "--exist_ok", "--device", "cpu")
    assert f"--output_dir {base} is the base model folder" in err
    err = merge_error(capsys, "--adapters", ckpt, "--output_dir", base.parent, "--exist_ok", "--device", "cpu")
    assert (f"--output_dir {base.parent} holds folders (base): it is the folder that holds the base model "
            f"folder {base}") in err
    assert snapshot(tmp_path) == before


def test_exist_ok_refuses_a_merged_folder_that_is_also_the_base(tiny_dir, tmp_path, capsys):
    """A merged model can be the base of a second adapter: written by merge.py, yet not replaceable."""
    first, second = tmp_path / "first", tmp_path / "second"
    make_checkpoint(tiny_dir, first, "tiny", targets=["q_proj"])
    merged = merge.merge(first, output_dir=tmp_path / "merged", device="cpu")
    make_checkpoint(merged, second, str(merged), targets=["v_proj"])
    before = snapshot(tmp_path)
    err = merge_error(capsys, "--adapters", second, "--output_dir", merged, "--exist_ok", "--device", "cpu")
    assert f"--output_dir {merged} is the base model folder" in err
    assert snapshot(tmp_path) == before


def test_exist_ok_refuses_a_folder_merge_py_did_not_write(tiny_dir, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    make_checkpoint(tiny_dir, ckpt, "tiny", targets=["v_proj"])
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text("{}")
    (mine / "thesis.txt").write_text("keep me")
    before = snapshot(tmp_path)
    err = merge_error(capsys, "--adapters", ckpt, "--output_dir", mine, "--exist_ok", "--device", "cpu")
    assert f"--output_dir {mine} was not written by merge.py" in err and "merge_info.json" in err
    assert snapshot(tmp_path) == before


def test_exist_ok_refuses_a_merged_folder_holding_files_merge_py_never_writes(tiny_dir, tmp_path, capsys):
    """Such as the GGUF file llama.cpp's converter was asked to write next to the merged weights."""
    ckpt = tmp_path / "ckpt"
    make_checkpoint(tiny_dir, ckpt, "tiny", targets=["v_proj"])
    merged = merge.merge(ckpt, output_dir=tmp_path / "merged", device="cpu")
    (merged / "model-q4_k_m.gguf").write_bytes(b"GGUF hours of converting")
    before = snapshot(tmp_path)
    err = merge_error(capsys, "--adapters", ckpt, "--output_dir", merged, "--exist_ok", "--device", "cpu")
    assert f"--output_dir {merged} holds files merge.py never writes (model-q4_k_m.gguf)" in err
    assert snapshot(tmp_path) == before


def test_a_file_as_output_dir_is_refused_before_loading(tiny_dir, tmp_path, capsys, monkeypatch):
    ckpt = tmp_path / "ckpt"
    make_checkpoint(tiny_dir, ckpt, "tiny", targets=["v_proj"])
    f = tmp_path / "model.txt"
    f.write_text("not a folder")
    before = snapshot(tmp_path)

    def no_loading(*a, **k):
        raise AssertionError("the base model was loaded")
    monkeypatch.setattr(M, "load_model", no_loading)
    for flags in ([], ["--exist_ok"]):
        err = merge_error(capsys, "--adapters", ckpt, "--output_dir", f, "--device", "cpu", *flags)
        assert f"--output_dir {f} is a file, not a folder" in err
    err = merge_error(capsys, "--adapters", ckpt, "--output_dir", f / "merged", "--device", "cpu")
    assert f"--output_dir {f / 'merged'} is inside {f}, which is a file, not a folder" in err
    assert snapshot(tmp_path) == before  # the file kept, no hidden .model.txt.old


def test_an_output_folder_that_appears_during_the_merge_is_kept(tiny_dir, tmp_path, capsys, monkeypatch):
    ckpt = tmp_path / "ckpt"
    make_checkpoint(tiny_dir, ckpt, "tiny", targets=["v_proj"])
    out = tmp_path / "ckpt-merged"
    save = M.save_safetensors_sharded

    def save_while_someone_writes_out(*a, **k):
        save(*a, **k)
        out.mkdir()
        (out / "theirs.txt").write_text("written meanwhile")
    monkeypatch.setattr(M, "save_safetensors_sharded", save_while_someone_writes_out)
    err = merge_error(capsys, "--adapters", ckpt, "--device", "cpu")
    assert f"the output folder {out} already exists" in err
    assert (out / "theirs.txt").read_text() == "written meanwhile"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "ckpt-merged"]


def test_exist_ok_refuses_a_link_to_a_merged_folder(tiny_dir, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    make_checkpoint(tiny_dir, ckpt, "tiny", targets=["v_proj"])
    merged = merge.merge(ckpt, output_dir=tmp_path / "merged", device="cpu")
    (tmp_path / "link").symlink_to(merged)
    before = snapshot(tmp_path)
    err = merge_error(capsys, "--adapters", ckpt, "--output_dir", tmp_path / "link", "--exist_ok", "--device", "cpu")
    assert f"--output_dir {tmp_path / 'link'} is a symbolic link" in err
    assert snapshot(tmp_path) == before


KILLED_MERGE = """
import os, signal, sys
import merge, model as M
save = M.save_safetensors_sharded
def save_then_die(*a, **k):
    save(*a, **k)
    os.kill(os.getpid(), signal.SIGKILL)  # as kill -9 or the out-of-memory killer would
M.save_safetensors_sharded = save_then_die
merge.main(sys.argv[1:])
"""


def test_a_killed_merges_hidden_folder_is_removed_by_the_next_and_nothing_else(tiny_dir, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    make_checkpoint(tiny_dir, ckpt, "tiny", targets=["o_proj"])
    out = tmp_path / "m"
    r = subprocess.run([sys.executable, "-c", KILLED_MERGE, "--adapters", ckpt, "--output_dir", out, "--device", "cpu"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == -signal.SIGKILL, r.stderr
    killed = [p.name for p in tmp_path.iterdir() if p.name.startswith(".m.tmp-")]
    assert len(killed) == 1 and (tmp_path / killed[0] / "model.safetensors").exists()
    # Hidden folders with similar names that are not clearly a stopped merge's must survive:
    running = tmp_path / f".m.tmp-{os.getpid()}-abcdefgh"  # a merge still running (this process)
    users = tmp_path / ".m.tmp-1-notes"  # the user's own
    odd = tmp_path / f".m.tmp-{dead_pid()}-abcdefgh"  # a dead pid, but with a file merge.py never writes
    for d, name in ((running, "config.json"), (users, "notes.txt"), (odd, "diary.txt")):
        d.mkdir()
        (d / name).write_text("keep")
    other = tmp_path / ".n.tmp-abcdefgh"  # another output's
    other.mkdir()
    reused = tmp_path / f".m.tmp-{os.getpid()}-reused00"  # written a day ago by a merge whose id this process has now
    reused.mkdir()
    (reused / "config.json").write_text("{}")
    os.utime(reused, (time.time() - 86400,) * 2)  # (tests/soak.py met it: ids wrap around at 32,768)
    legacy = tmp_path / ".m.tmp-k3j2h1g0"  # killed merge.py from before the pid was in the name
    legacy.mkdir()
    (legacy / "config.json").write_text("{}")
    before = {d.name: snapshot(d) for d in (running, users, odd, other)}
    assert f"removed {tmp_path / killed[0]}" in merged(capsys, "--adapters", ckpt, "--output_dir", out, "--device", "cpu")
    assert not (tmp_path / killed[0]).exists() and not legacy.exists() and (out / "model.safetensors").exists()
    assert not reused.exists()
    assert {d.name: snapshot(d) for d in (running, users, odd, other)} == before


def dead_pid() -> int:
    """The id of a process that has exited (and been waited for)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_swift_exports_merge_lora_true_is_accepted(tiny_dir, tmp_path, capsys):
    """The tutorials' `swift export --adapters CKPT --merge_lora true` works after swapping the program."""
    ckpt = tmp_path / "checkpoint-2"
    make_checkpoint(tiny_dir, ckpt, "tiny", targets=["gate_proj"])
    merged(capsys, "--adapters", ckpt, "--merge_lora", "true", "--device", "cpu")
    assert (tmp_path / "checkpoint-2-merged" / "model.safetensors").exists()


def test_merge_lora_false_is_a_clear_error_before_loading(tiny_dir, tmp_path, capsys, monkeypatch):
    ckpt = tmp_path / "ckpt"
    make_checkpoint(tiny_dir, ckpt, "tiny", targets=["gate_proj"])

    def no_loading(*a, **k):
        raise AssertionError("the base model was loaded")
    monkeypatch.setattr(M, "load_model", no_loading)
    err = merge_error(capsys, "--adapters", ckpt, "--merge_lora", "false")
    assert "--merge_lora false: merge.py only merges" in err and f"python infer.py --adapters {ckpt}" in err
    err = merge_error(capsys, "--adapters", ckpt, "--merge_lora", "maybe")
    assert "argument --merge_lora: expected true or false, got 'maybe'" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_merging_the_current_folder_writes_beside_it(tiny_dir, tmp_path, capsys, monkeypatch):
    """`--adapters .` from inside the checkpoint: CHECKPOINT-merged goes beside it, not into it."""
    ckpt = tmp_path / "checkpoint-4"
    make_checkpoint(tiny_dir, ckpt, "tiny", targets=["v_proj"])
    before = snapshot(ckpt)
    monkeypatch.chdir(ckpt)
    merged(capsys, "--adapters", ".", "--device", "cpu")
    assert (tmp_path / "checkpoint-4-merged" / "model.safetensors").exists()
    assert snapshot(ckpt) == before


def test_missing_checkpoint_folder_is_a_clear_error(tmp_path, capsys):
    assert merge.main(["--adapters", str(tmp_path / "checkpoint-9"), "--model", "tiny"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: checkpoint folder {tmp_path / 'checkpoint-9'} does not exist.")
    assert "Traceback" not in err


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


def test_ctrl_c_while_saving_is_one_line_and_keeps_the_earlier_merge(tiny_dir, tmp_path, capsys, monkeypatch):
    ckpt = tmp_path / "ckpt"
    make_checkpoint(tiny_dir, ckpt, "tiny", targets=["k_proj"])
    merge.merge(ckpt, device="cpu")
    before = snapshot(tmp_path)

    def ctrl_c(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(M, "save_safetensors_sharded", ctrl_c)
    assert merge.main(["--adapters", str(ckpt), "--exist_ok", "--device", "cpu"]) == 130
    err = capsys.readouterr().err
    assert err == "\ninterrupted: nothing was written, and the output folder is as it was.\n"
    assert snapshot(tmp_path) == before


def test_ctrl_c_while_swapping_puts_the_earlier_merge_back(tiny_dir, tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpt"
    make_checkpoint(tiny_dir, ckpt, "tiny", targets=["k_proj"])
    out = merge.merge(ckpt, device="cpu")
    before = snapshot(tmp_path)
    rename = Path.rename

    def ctrl_c_on_second_rename(self, target):
        if self.name.startswith(".ckpt-merged.tmp-"):  # the earlier merge was just moved aside
            raise KeyboardInterrupt
        return rename(self, target)
    monkeypatch.setattr(Path, "rename", ctrl_c_on_second_rename)
    with pytest.raises(KeyboardInterrupt):
        merge.merge(ckpt, exist_ok=True, device="cpu")
    assert snapshot(tmp_path) == before


CTRL_C_WHILE_DELETING = """
import os, shutil, signal, sys
from pathlib import Path
import merge
rmtree = shutil.rmtree
def ctrl_c_while_deleting(path, *a, **k):
    if ".old-" not in Path(path).name:
        return rmtree(path, *a, **k)
    for name in ("merge_info.json", "config.json"):  # the marker first: the next merge must not need it
        (Path(path) / name).unlink()
    os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C once two files of the replaced merge are deleted
shutil.rmtree = ctrl_c_while_deleting
sys.exit(merge.main(sys.argv[1:]))
"""


def test_ctrl_c_while_deleting_the_replaced_merge_says_so_and_the_next_merge_finishes(tiny_dir, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    make_checkpoint(tiny_dir, ckpt, "tiny", targets=["k_proj"])
    out = merge.merge(ckpt, device="cpu")
    r = subprocess.run([sys.executable, "-c", CTRL_C_WHILE_DELETING, "--adapters", ckpt, "--exist_ok", "--device",
                        "cpu"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 130, r.stderr
    assert r.stderr.startswith(f"\ninterrupted: {out} is complete; what is left of the folder it replaced, ")
    assert r.stderr.count("\n") == 2 and (out / "model.safetensors").exists() and written_by_us(out)
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".ckpt-merged.old-")]
    assert len(left) == 1 and f"{left[0]}, may be deleted." in r.stderr
    assert not (left[0] / "merge_info.json").exists() and (left[0] / "model.safetensors").exists()  # half deleted
    assert f"removed {left[0]}" in merged(capsys, "--adapters", ckpt, "--exist_ok", "--device", "cpu")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "ckpt-merged"]


def written_by_us(folder) -> bool:
    return json.loads((Path(folder) / "merge_info.json").read_text())["written_by"] == "qwen-lora merge.py"


def test_misspelt_flag_names_the_right_one(capsys):
    err = merge_error(capsys, "--adapters", "x", "--ouput_dir", "y")
    assert "unrecognized arguments: --ouput_dir y (did you mean --output_dir?)" in err


def test_every_flag_has_help(capsys):
    with pytest.raises(SystemExit) as e:
        merge.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--adapters", "--model", "--output_dir", "--exist_ok", "--max_shard_size", "--device", "--torch_dtype",
                 "--merge_lora"):
        assert flag in text


def test_a_killed_replacement_leaves_an_old_folder_that_the_next_merge_removes(tiny_dir, tmp_path, capsys):
    """Killed between moving the earlier merge aside and deleting it: .NAME.old-PID-XXXXXXXX stays."""
    ckpt = tmp_path / "ckpt"
    make_checkpoint(tiny_dir, ckpt, "tiny", targets=["o_proj"])
    merge.merge(ckpt, output_dir=tmp_path / "m", device="cpu")
    stale = tmp_path / f".m.old-{dead_pid()}-0a1b2c3d"
    (tmp_path / "m").rename(stale)
    unmarked = tmp_path / f".m.old-{dead_pid()}-4e5f6a7b"  # same name pattern, but a file merge.py never writes
    shutil.copytree(tiny_dir, unmarked)
    (unmarked / "notes.txt").write_text("keep")
    legacy = tmp_path / ".m.old-4e5f6a7b"  # no pid: util.atomic_folder always writes one into a .old name
    shutil.copytree(tiny_dir, legacy)
    before = snapshot(unmarked), snapshot(legacy)
    merged(capsys, "--adapters", ckpt, "--output_dir", tmp_path / "m", "--device", "cpu")
    assert not stale.exists() and (tmp_path / "m" / "merge_info.json").exists()
    assert (snapshot(unmarked), snapshot(legacy)) == before


def test_a_full_disk_while_merging_is_one_line_and_leaves_no_folder(tiny_dir, tmp_path, capsys, monkeypatch):
    """Issue 34 item 3: a raw SafetensorError traceback."""
    import safetensors.torch
    from safetensors import SafetensorError
    ckpt = tmp_path / "ckpt"
    make_checkpoint(tiny_dir, ckpt, "tiny", targets=["o_proj"])

    def full_disk(*args, **kwargs):
        raise SafetensorError("No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    err = merge_error(capsys, "--adapters", ckpt, "--output_dir", tmp_path / "m", "--device", "cpu")
    assert "No space left on device" in err and "that the disk has room" in err
    assert not (tmp_path / "m").exists() and not list(tmp_path.glob(".m.tmp-*"))
