"""torchrun data parallelism on CPU (gloo): 2 ranks x accumulation k == 1 rank x accumulation 2k, and each
rank's packed passes (--padding_free) == one micro-batch at a time. The runs on one rank are train.main in
this process, on one thread (as a process with OMP_NUM_THREADS=1): a process start costs seconds here."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train
from conftest import both_families, single_torch_thread

ROOT = Path(__file__).resolve().parent.parent
QA = [("你是谁？", "我是小黄。"), ("Who are you?", "I am Xiao Huang."), ("你能上网吗？", "不能。"),
      ("Are you ChatGPT?", "No, I am not."), ("hi", "hello there"), ("What can you do?", "Chat."), ("谢谢", "不客气")]


def run(args, nproc=1):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] if nproc > 1 else [sys.executable]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(launcher + ["train.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def run_here(args):
    """train.py on one rank, as train.main in this process on one thread."""
    with single_torch_thread():
        assert train.main([str(a) for a in args]) == 0


def common(data, out, accum, steps=4):
    # 7 rows with batch 1: the last step of the epoch is partial, so a rank runs short there too.
    return ["--model", "tiny", "--dataset", data, "--output_dir", out, "--torch_dtype", "float32", "--device", "cpu",
            "--max_steps", steps, "--save_steps", 2, "--per_device_train_batch_size", 1, "--gradient_accumulation_steps",
            accum, "--lora_dropout", 0, "--learning_rate", 1e-3, "--logging_steps", 1]


def only_checkpoint(out, step):
    (run_dir,) = Path(out).glob("v*-*")
    return run_dir, load_file(run_dir / f"checkpoint-{step}" / "adapter_model.safetensors")


def assert_same_adapter(a: dict, b: dict, lr: float = 1e-3, steps: int = 4):
    """Equal to float32 rounding, but for at most 1 element in 10,000: packed and unpacked passes sum in
    other orders, and where a gradient is near zero Adam's m / sqrt(v) turns that rounding into up to a
    whole step of the learning rate (one rank packed against unpacked moves 2 of 77,824 elements so)."""
    off = {k: (a[k] - b[k]).abs() > 1e-6 + 1e-4 * b[k].abs() for k in a}
    assert sum(int(o.sum()) for o in off.values()) <= sum(v.numel() for v in a.values()) // 10_000
    assert all(float((a[k] - b[k]).abs().max()) <= lr * steps for k in a)


# tiny only: how rows are dealt to the ranks and their gradients summed does not depend on the family
# (Qwen3 under 2 ranks: test_fsdp's qwen3 case; Qwen3.5: tests/test_qwen3_5_lora.py), and each case costs 12 s.
@pytest.mark.parametrize("tiny_dir", ["tiny"], indirect=True)
def test_two_ranks_train_the_same_adapter_as_one_rank_with_double_accumulation(tmp_path, tiny_dir):
    data = tmp_path / "qa.json"
    data.write_text(json.dumps([{"query": q, "response": r} for q, r in QA], ensure_ascii=False))
    two = run(common(data, tmp_path / "two", 2) + ["--padding_free", "true"], nproc=2)  # each rank packs its share
    run_here(common(data, tmp_path / "one", 4) + ["--padding_free", "false"])  # one micro-batch at a time
    run_dir, a = only_checkpoint(tmp_path / "two", 4)
    _, b = only_checkpoint(tmp_path / "one", 4)
    assert_same_adapter(a, b)
    # only rank 0 printed and wrote: one progress line per step, one run folder
    assert two.stdout.count("[4/4] loss") == 1
    assert len(list((tmp_path / "two").glob("v*-*"))) == 1
    # a 2-rank checkpoint resumes on 1 rank
    run_here(common(data, tmp_path / "resumed", 4, steps=6) + ["--resume_from_checkpoint", run_dir / "checkpoint-4"])
    assert only_checkpoint(tmp_path / "resumed", 6)[1]  # a new run folder, as in ms-swift


@both_families
def test_two_gpus_replay_micro_batches_and_train_the_same_adapter(tmp_path, tiny_dir):
    """torchrun on two GPUs: micro-batches replayed as CUDA graphs by default (the gradient sum runs
    after them, outside the graphs), the same adapter as one GPU with double accumulation."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs: run on the GPU machine (nvidia-h200-x2)")
    data = tmp_path / "qa.json"
    data.write_text(json.dumps([{"query": q, "response": r} for q, r in QA], ensure_ascii=False))
    gpu = lambda args: [a if a != "cpu" else "cuda" for a in args]
    # One micro-batch at a time on both (packing across ranks is proved in float32 on the CPU above): with
    # TF32 matmuls, other packings sum in other orders, and Adam's first steps turn the tiny gradients'
    # rounding into whole steps of the learning rate.
    two = run(gpu(common(data, tmp_path / "two", 2)) + ["--padding_free", "false"], nproc=2)
    assert "CUDA graphs of fused layers: each micro-batch shape" in two.stdout
    run(gpu(common(data, tmp_path / "one", 4)) + ["--padding_free", "false"])
    _, a = only_checkpoint(tmp_path / "two", 4)
    _, b = only_checkpoint(tmp_path / "one", 4)
    for k in a:  # float32 matmuls run as TF32 on GPUs (speed.fast_float32_matmul)
        torch.testing.assert_close(a[k], b[k], rtol=1e-2, atol=1e-4)
