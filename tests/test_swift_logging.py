"""What a run logs and where it writes it, against ms-swift 4.6.0 run on the same tiny checkpoint.

The ms-swift figures below were recorded on the CPU in float32 (/work/venvs/swift4: ms-swift 4.6.0,
transformers 5.19) with `--model TINY --model_type qwen2 --template qwen2_5` on the built-in tiny
model (`--model tiny`) and the rows of `rows()` below, `--tuner_type lora --lora_dropout 0
--torch_dtype float32 --seed 42 --learning_rate 1e-3 --per_device_train_batch_size 2`, and:

- FIRST_STEP: `--gradient_accumulation_steps 12` (all 24 rows in one step, so nothing depends on the
  data order) `--max_steps 2 --logging_steps 1 --eval_on_start true --warmup_ratio 0`, once with
  `--per_device_eval_batch_size 2` and once with 1. Evaluation at step 0 is the base model's.
- SIX_STEPS: `--gradient_accumulation_steps 2 --max_steps 6 --logging_steps 2 --eval_steps 3
  --save_steps 3 --warmup_ratio 0.2 --report_to tensorboard --per_device_eval_batch_size 2`, then the
  same line with `--resume_from_checkpoint v0-.../checkpoint-3`.
"""

import json
import random
import zlib
from pathlib import Path

import pytest

import runs
import train

# FIRST_STEP (logging.jsonl): step 1 = the base model over all 24 rows (a fresh adapter changes nothing).
SWIFT_STEP_1 = {"loss": 11.78570938, "grad_norm": 5.49572515, "learning_rate": 0.0005, "token_acc": 0.00678733}
# Evaluation of the base model on the 5 validation rows, by --per_device_eval_batch_size.
SWIFT_EVAL_LOSS = {2: 12.08889389, 1: 12.08400154}
SWIFT_EVAL_TOKEN_ACC = 0.00952381
# ms-swift 4.6 evaluates the --val_dataset rows in file order (val_dataset_shuffle false): with batches
# of 2 its eval_loss above is the mean of the three batch means [0, 1], [2, 3], [4].

# SIX_STEPS: the steps logged (step 1 by logging_first_step, then every 2nd), the learning rate logged
# with each (the rate after the step), and the keys of its summary line and of its last line.
SWIFT_LOGGED = {1: 0.0005, 2: 0.001, 4: 0.0005, 6: 0.0}
SWIFT_SUMMARY_KEYS = {"train_runtime", "train_samples_per_second", "train_steps_per_second", "total_flos", "train_loss",
                      "epoch"}
SWIFT_LAST_KEYS = {"last_model_checkpoint", "best_model_checkpoint", "best_metric", "global_step"}  # and more
# Its TensorBoard scalars (runs/events.out.tfevents.*); the ones it writes that are not here: eval/runtime,
# eval/samples_per_second, eval/steps_per_second, train/total_flos.
SWIFT_TENSORBOARD = {"train/loss", "train/grad_norm", "train/learning_rate", "train/token_acc", "train/epoch",
                     "eval/loss", "eval/token_acc", "train/train_runtime", "train/train_samples_per_second",
                     "train/train_steps_per_second", "train/train_loss"}
# Its images/*.png, of those curves (it also draws the eval/train timings, total_flos and epoch).
SWIFT_IMAGES = {"train_loss", "train_learning_rate", "train_grad_norm", "train_token_acc", "eval_loss", "eval_token_acc"}
# The resume from checkpoint-3 wrote v1-.../ next to v0-.../, with only checkpoint-6; every file of v0
# kept its md5. Its logging.jsonl: steps 4 and 6; its train_loss the mean of steps 4 to 6 alone.
SWIFT_RESUMED_STEPS = [4, 6]


def rows() -> tuple[list[dict], list[dict]]:
    """The rows both ran on: 24 training rows (shapes 0..23), then 5 validation rows (shapes 100..104),
    drawn one after another from one generator."""
    rng = random.Random(0)
    words = "the cat sat on a mat and then it ran far away from home to see the big red sun".split()

    def row(i):
        q = " ".join(rng.choice(words) for _ in range(3 + i % 5))
        a = " ".join(rng.choice(words) for _ in range(2 + (i * 7) % 13))
        return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
    return [row(i) for i in range(24)], [row(i) for i in range(100, 105)]


@pytest.fixture
def files(tmp_path):
    train_file, val_file = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    for path, part in zip((train_file, val_file), rows()):
        path.write_text("".join(json.dumps(r) + "\n" for r in part))
    return train_file, val_file


def run_args(files, out, *extra):
    return ["--model", "tiny", "--dataset", str(files[0]), "--val_dataset", str(files[1]), "--output_dir", str(out),
            "--torch_dtype", "float32", "--device", "cpu", "--lora_dropout", "0", "--per_device_train_batch_size", "2",
            "--seed", "42", *map(str, extra)]


def log_of(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "logging.jsonl").read_text().splitlines()]


def test_step_1_and_evaluation_log_what_ms_swift_logs(tmp_path, tiny_dir, files):
    """Step 1 is logged with ms-swift's loss, grad_norm, learning rate (after the step) and token_acc;
    eval_loss is the mean of batch means, so it depends on --per_device_eval_batch_size as ms-swift's
    does; eval_token_acc too. (A learning rate of 1e-30 keeps the adapter at zero: evaluation after
    step 1 is the base model's, which ms-swift evaluated at step 0.)"""
    for eval_batch in (1, 2):
        out = tmp_path / f"eb{eval_batch}"
        assert train.main(run_args(files, out, "--gradient_accumulation_steps", 12, "--max_steps", 1, "--eval_steps", 1,
                                   "--learning_rate", 1e-30, "--per_device_eval_batch_size", eval_batch)) == 0
        (run,) = out.glob("v0-*")
        step, evaluation = log_of(run)[:2]
        assert step["step"] == 1 and step["loss"] == pytest.approx(SWIFT_STEP_1["loss"], rel=1e-6)
        assert step["grad_norm"] == pytest.approx(SWIFT_STEP_1["grad_norm"], rel=1e-5)
        assert step["token_acc"] == pytest.approx(SWIFT_STEP_1["token_acc"], abs=1e-6)
        assert evaluation["eval_token_acc"] == pytest.approx(SWIFT_EVAL_TOKEN_ACC, abs=1e-6)
        assert evaluation["eval_loss"] == pytest.approx(SWIFT_EVAL_LOSS[eval_batch], rel=1e-6)
        assert evaluation["eval_loss_per_token"] != pytest.approx(evaluation["eval_loss"], rel=1e-4)


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) of a PNG, after checking its signature and each chunk's CRC."""
    raw = path.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    i = 8
    while i < len(raw):
        n = int.from_bytes(raw[i:i + 4], "big")
        assert zlib.crc32(raw[i + 4:i + 8 + n]) == int.from_bytes(raw[i + 8 + n:i + 12 + n], "big")
        i += 12 + n
    return int.from_bytes(raw[16:20], "big"), int.from_bytes(raw[20:24], "big")


def test_a_run_logs_and_resumes_into_a_new_folder_as_ms_swift(tmp_path, tiny_dir, files):
    """Six steps as ms-swift's SIX_STEPS: the steps and learning rates logged, the summary line, the
    last/best line, TensorBoard's scalars and the PNG curves; then a resume from checkpoint-3 writes a
    new run folder beside the first, whose every file stays as it was."""
    out = tmp_path / "out"
    six = run_args(files, out, "--gradient_accumulation_steps", 2, "--max_steps", 6, "--logging_steps", 2,
                   "--eval_steps", 3, "--save_steps", 3, "--learning_rate", 1e-3, "--warmup_ratio", 0.2,
                   "--per_device_eval_batch_size", 2)
    assert train.main(six) == 0
    (first,) = out.glob("v0-*")
    log = log_of(first)
    steps = {e["step"]: e for e in log if "loss" in e}
    assert {s: e["learning_rate"] for s, e in steps.items()} == pytest.approx(SWIFT_LOGGED, abs=1e-12)
    summary, last = log[-2:]
    assert SWIFT_SUMMARY_KEYS - {"total_flos"} <= set(summary) and SWIFT_LAST_KEYS == set(last)
    # train_loss: the mean of the six step losses (each logged loss is the mean of the steps since the line before)
    assert summary["train_loss"] == pytest.approx((steps[1]["loss"] + steps[2]["loss"] + 2 * steps[4]["loss"]
                                                   + 2 * steps[6]["loss"]) / 6, rel=1e-5)
    assert summary["train_samples_per_second"] / summary["train_steps_per_second"] == pytest.approx(4, rel=0.01)
    assert last["last_model_checkpoint"] == str(first / "checkpoint-6") and last["global_step"] == 6
    best = min((e for e in log if "eval_loss" in e), key=lambda e: e["eval_loss"])
    assert last["best_model_checkpoint"] == str(first / f"checkpoint-{best['step']}")
    for name in SWIFT_IMAGES:
        assert png_size(first / "images" / f"{name}.png") == (640, 400)
    tensorboard = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    events = tensorboard.EventAccumulator(str(first / "runs"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == SWIFT_TENSORBOARD
    logged = {e.step: e.value for e in events.Scalars("train/learning_rate")}
    assert logged.keys() == SWIFT_LOGGED.keys() and list(logged.values()) == pytest.approx(list(SWIFT_LOGGED.values()))

    before = {p: p.read_bytes() for p in first.rglob("*") if p.is_file()}
    assert train.main(six + ["--resume_from_checkpoint", str(first / "checkpoint-3")]) == 0
    assert {p: p.read_bytes() for p in first.rglob("*") if p.is_file()} == before
    (second,) = out.glob("v1-*")
    assert [p.name for p in runs.complete_checkpoints(second)] == ["checkpoint-6"]
    log = log_of(second)
    assert [e["step"] for e in log if "loss" in e] == SWIFT_RESUMED_STEPS
    resumed = {e["step"]: e["loss"] for e in log if "loss" in e}
    assert log[-2]["train_loss"] == pytest.approx((resumed[4] + 2 * resumed[6]) / 3, rel=1e-5)
    assert log[-1]["last_model_checkpoint"] == str(second / "checkpoint-6")


def test_a_run_never_writes_into_a_folder_with_another_runs_checkpoints(tmp_path, tiny_dir, files, capsys):
    """--add_version false into the folder of a run: a resume would write over or prune its
    checkpoints, so it is refused before anything loads (ms-swift would write into it)."""
    out = tmp_path / "out"
    args = run_args(files, out, "--max_steps", 2, "--save_steps", 1, "--gradient_accumulation_steps", 1,
                    "--add_version", "false")
    assert train.main(args) == 0
    capsys.readouterr()
    assert train.main(args + ["--resume_from_checkpoint", str(out / "checkpoint-1")]) == 2
    assert "already holds checkpoints of a run" in capsys.readouterr().err
    assert train.main(args + ["--resume_from_checkpoint", str(out / "checkpoint-1"), "--add_version", "true"]) == 0


def test_without_tensorboard_a_run_says_so_and_goes_on(tmp_path, monkeypatch, capsys):
    """The tensorboard package is optional: without it, one note, no runs/ folder; --report_to none: nothing."""
    import builtins
    real_import = builtins.__import__

    def no_tensorboard(name, *a, **k):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    board = runs.TensorBoard(tmp_path / "runs", None)
    board.write({"loss": 1.0}, 1)
    board.close()
    assert "the tensorboard package is not installed" in capsys.readouterr().out and not (tmp_path / "runs").exists()
    monkeypatch.setattr(builtins, "__import__", real_import)
    assert runs.TensorBoard(tmp_path / "runs", ["none"]).writer is None and not (tmp_path / "runs").exists()


def test_the_args_json_of_a_checkpoint_is_read_by_ms_swift_4():
    """ms-swift 4.x's load_args_from_ckpt takes model_type from args.json only when swift_version is
    4.0 or later; without it, `swift infer --adapters OUR_CKPT` on a local tiny base failed ("Multiple
    possible types found: ['qwen2', 'qwen2_gte']"), with it 4.6.0 and 3.12.6 both answered the 5
    validation rows (run here on a checkpoint of this toolkit, no other flag: `swift infer --adapters
    CKPT --val_dataset val.jsonl --infer_backend transformers|pt --max_new_tokens 4 --temperature 0`)."""
    major = int(runs.SWIFT_ARGS_VERSION.split(".")[0])
    assert major >= 4
