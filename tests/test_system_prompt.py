"""--system '' end to end: train.py stores it, infer.py renders the same prompt (no system turn)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import lora
import train

ROOT = Path(__file__).resolve().parent.parent


def test_a_run_trained_without_a_system_turn_is_prompted_without_one(tmp_path, tiny_dir):
    """ms-swift's --system '' writes no system block. A run trained that way must store "" (not
    drop it), and infer.py must then leave the system turn out too: with Qwen's default prompt in
    front, the trained identity would not come back."""
    rows = tmp_path / "qa.json"
    rows.write_text(json.dumps([{"query": "Who are you?", "response": "I am Robo."}]))
    out = tmp_path / "out"
    assert train.main(["--model", "tiny", "--dataset", str(rows), "--output_dir", str(out), "--system", "",
                       "--max_steps", "1", "--torch_dtype", "float32", "--device", "cpu"]) == 0
    [ckpt] = out.glob("v*-*/checkpoint-1")
    assert json.loads((ckpt.parent / "args.json").read_text())["system"] == ""
    assert lora.checkpoint_args(ckpt)["system"] == ""

    p = subprocess.run([sys.executable, str(ROOT / "infer.py"), "--adapters", str(ckpt), "--prompt", "Who are you?",
                        "--max_new_tokens", "1", "--temperature", "0", "--show_prompt", "true"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr
    assert "<|im_start|>user\nWho are you?<|im_end|>\n<|im_start|>assistant\n" in p.stderr
    assert "<|im_start|>system" not in p.stderr
