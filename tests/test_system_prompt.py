"""--system '' end to end: train.py stores it, infer.py renders the same prompt (no system turn)."""

import json

import infer
import lora
import train


def test_a_run_trained_without_a_system_turn_is_prompted_without_one(tmp_path, tiny_dir, capsys):
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

    capsys.readouterr()
    code = infer.main(["--adapters", str(ckpt), "--prompt", "Who are you?", "--max_new_tokens", "1", "--temperature", "0",
                       "--show_prompt", "true"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "<|im_start|>user\nWho are you?<|im_end|>\n<|im_start|>assistant\n" in err
    assert "<|im_start|>system" not in err
