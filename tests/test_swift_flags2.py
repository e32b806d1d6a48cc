"""ms-swift's flags, second pass (issue 31): the schedule (--warmup_steps, cosine_with_min_lr), the data
order (--data_seed), --resume_only_model going on from its step, --eval_strategy / --save_strategy
epoch, and the flags that argparse used to answer with a guess. The ms-swift figures below were
recorded with ms-swift 4.6.0 (transformers 5.19) on the CPU in float32, on a tiny Qwen3 checkpoint:

    swift sft --dataset a.jsonl b.jsonl (6 + 4 rows) --per_device_train_batch_size 1
        --gradient_accumulation_steps 2 --num_train_epochs 2 --learning_rate 1e-4 --warmup_ratio 0.3
        --save_steps 4 --lora_dropout 0 --torch_dtype float32          (10 steps)
    the same, --resume_from_checkpoint .../checkpoint-4 --resume_only_model true
"""

import json
import re
from pathlib import Path

import pytest
import torch

import data
import flags
import infer
import lora
import merge
import model as modeling
import sources
import train
from cli import UsageError
from data import DataError

TRAIN_REQUIRED = ["--model", "tiny", "--dataset", "x.json"]

# logging.jsonl's learning_rate of the 10-step run (logged after each step, rounded by ms-swift).
SWIFT_LOGGED_LR = [3.333e-05, 6.667e-05, 0.0001, 9.505e-05, 8.117e-05, 6.113e-05, 3.887e-05, 1.883e-05, 4.95e-06, 0.0]
# The same run, --resume_only_model from checkpoint-4: steps 5..10, the loss of step 5 equal to the
# uninterrupted run's (the same rows, the same adapter), later ones not (a fresh optimizer), and the
# learning rate from the schedule's step 0 again (ms-swift's scheduler is not restored either).
SWIFT_FULL_LOSS = {5: 13.1717701, 6: 13.13614082, 7: 13.45020676}
SWIFT_RESUMED = {5: (13.1717701, 3.333e-05), 6: (13.16563416, 6.667e-05), 7: (13.49032307, 0.0001),
                 10: (13.0245924, 6.113e-05)}
# BatchSamplerShard (ms-swift 4.6's training sampler, batch size 1, one GPU) after set_epoch(epoch):
# the row indices of epochs 0 and 1, by (data_seed, rows).
SWIFT_EPOCH_ORDER = {
    (42, 10): [[2, 6, 1, 8, 4, 5, 0, 9, 3, 7], [8, 4, 9, 0, 5, 1, 6, 7, 2, 3]],
    (42, 8): [[6, 3, 0, 7, 2, 1, 4, 5], [4, 5, 7, 1, 3, 2, 6, 0]],
    (42, 12): [[6, 8, 1, 7, 0, 2, 10, 11, 4, 3, 5, 9], [4, 6, 7, 2, 9, 8, 1, 5, 0, 10, 11, 3]],
    (7, 10): [[5, 0, 3, 4, 1, 7, 9, 6, 8, 2], [3, 5, 0, 1, 2, 6, 4, 7, 8, 9]],
    (7, 5): [[0, 1, 3, 2, 4], [3, 1, 2, 4, 0]],
}


def parsed(*argv):
    a = flags.train_parser().parse_args(TRAIN_REQUIRED + list(argv))
    flags.check_schedule(a)
    flags.set_derived_defaults(a)
    return a


# ----------------------------------------------------------------------------------------------
# The learning rate


def test_logged_learning_rates_are_ms_swifts():
    a = parsed("--warmup_ratio", "0.3", "--gradient_accumulation_steps", "2", "--num_train_epochs", "2")
    _, total, warmup = train.schedule(a, n_rows=10, world=1)
    assert (total, warmup) == (10, 3)
    ours = [train.lr_at(step, total, warmup, 1e-4, "cosine") for step in range(1, 11)]  # the rate after step k
    assert [round(lr, 8) for lr in ours] == SWIFT_LOGGED_LR  # ms-swift rounds logged figures to 8 decimals


@pytest.mark.parametrize("kwargs", [{"min_lr_rate": 0.1}, {"min_lr": 2e-5}, {"min_lr_rate": 0.1, "num_cycles": 0.3}])
def test_cosine_with_min_lr_equals_transformers_step_by_step(kwargs):
    from transformers import get_scheduler

    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
    sched = get_scheduler("cosine_with_min_lr", optimizer, num_warmup_steps=3, num_training_steps=20,
                          scheduler_specific_kwargs=kwargs)
    reference = []
    for _ in range(22):  # two steps past the end: the floor holds
        reference.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        sched.step()
    ours = [train.lr_at(step, 20, 3, 1e-4, "cosine_with_min_lr", kwargs) for step in range(22)]
    assert ours == pytest.approx(reference, rel=1e-12, abs=1e-18)


def test_cosine_num_cycles_equals_transformers():
    from transformers import get_cosine_schedule_with_warmup

    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = get_cosine_schedule_with_warmup(optimizer, 2, 12, num_cycles=1.5)
    reference = []
    for _ in range(12):
        reference.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        sched.step()
    assert [train.lr_at(s, 12, 2, 1.0, "cosine", {"num_cycles": 1.5}) for s in range(12)] == pytest.approx(reference)


@pytest.mark.parametrize("argv,warmup", [(["--warmup_steps", "4"], 4), (["--warmup_steps", "0.25"], 3),
                                         (["--warmup_ratio", "0.25"], 3), ([], 0)])
def test_warmup_steps_as_transformers_5_reads_them(argv, warmup):
    """An integer number of steps, or below 1 a fraction of all steps (ceil), as get_warmup_steps."""
    a = parsed("--max_steps", "10", *argv)
    assert train.schedule(a, n_rows=40, world=1) == (3, 10, warmup)  # 40 rows / 16 a step: 3 steps an epoch


@pytest.mark.parametrize("argv,message", [
    (["--warmup_ratio", "0.1", "--warmup_steps", "5"], "--warmup_ratio and --warmup_steps cannot be set at the same time"),
    (["--lr_scheduler_type", "cosine_with_min_lr"], "needs one of min_lr or min_lr_rate"),
    (["--lr_scheduler_type", "cosine_with_min_lr", "--lr_scheduler_kwargs", '{"min_lr": 1e-5, "min_lr_rate": 0.1}'],
     "needs one of min_lr or min_lr_rate"),
    (["--lr_scheduler_kwargs", '{"min_lr_rate": 0.1}'], "--lr_scheduler_kwargs min_lr_rate: --lr_scheduler_type cosine takes num_cycles."),
    (["--lr_scheduler_type", "linear", "--lr_scheduler_kwargs", '{"num_cycles": 1}'], "linear takes none."),
    (["--lr_scheduler_type", "cosine_with_min_lr", "--lr_scheduler_kwargs", '{"min_lr": "x"}'], "give a number"),
    (["--ignore_data_skip", "true"], "--ignore_data_skip true goes with --resume_only_model true"),
])
def test_schedule_flags_that_cannot_work_are_refused_before_loading(argv, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parsed(*argv)


def test_lr_scheduler_kwargs_must_be_a_json_object():
    with pytest.raises(UsageError, match="is not JSON"):
        flags.train_parser().parse_args(TRAIN_REQUIRED + ["--lr_scheduler_kwargs", "min_lr=1e-5"])
    with pytest.raises(UsageError, match="is not a JSON object"):
        flags.train_parser().parse_args(TRAIN_REQUIRED + ["--lr_scheduler_kwargs", "[1]"])


def test_epoch_strategy_evaluates_or_saves_at_the_end_of_each_epoch():
    a = parsed("--eval_strategy", "epoch", "--eval_steps", "50", "--save_steps", "50")
    assert train.schedule(a, n_rows=40, world=1)[0] == 3 and (a.eval_steps, a.save_steps) == (3, 50)
    a = parsed("--save_strategy", "epoch", "--eval_steps", "50", "--save_steps", "50")
    train.schedule(a, n_rows=40, world=1)  # unset, --eval_strategy is --save_strategy's, as in ms-swift
    assert (a.eval_strategy, a.eval_steps, a.save_steps) == ("epoch", 3, 3)


def test_strategy_no_never_evaluates_or_saves_as_ms_swift(tmp_path, tiny_dir, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("d.jsonl").write_text("".join(json.dumps({"query": f"q{i}", "response": "ok"}) + "\n" for i in range(8)))
    argv = ["--model", "tiny", "--dataset", "d.jsonl", "--device", "cpu", "--max_steps", "3", "--save_steps", "1",
            "--gradient_accumulation_steps", "1", "--split_dataset_ratio", "0.25"]
    assert train.main(argv + ["--output_dir", "no_eval", "--eval_strategy", "no", "--init_weights", "gaussian"]) == 0
    out = capsys.readouterr().out
    assert "setting split_dataset_ratio: 0.0" in out and "data: 8 training rows, 0 validation rows" in out
    (run,) = Path("no_eval").glob("v0-*")
    assert json.loads((run / "checkpoint-1" / "adapter_config.json").read_text())["init_lora_weights"] == "gaussian"
    assert not any("eval_loss" in line for line in (run / "logging.jsonl").read_text().splitlines())
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert train.main(argv + ["--output_dir", "no_save", "--save_strategy", "no"]) == 0  # and so no evaluation
    out = capsys.readouterr().out
    (run,) = Path("no_save").glob("v0-*")
    assert not list(run.glob("checkpoint-*")) and "no checkpoint was saved (--save_strategy no)" in out
    assert '"last_model_checkpoint": null' in (run / "logging.jsonl").read_text()


# ----------------------------------------------------------------------------------------------
# The data order


@pytest.mark.parametrize("seed,n_rows", list(SWIFT_EPOCH_ORDER))
def test_each_epochs_order_is_ms_swifts_sampler(seed, n_rows):
    for epoch, expected in enumerate(SWIFT_EPOCH_ORDER[(seed, n_rows)]):
        steps = train.epoch_windows(n_rows, 1, 1, epoch, seed)
        assert [i for step in steps for mb in step for i in mb] == expected


# ms-swift 4.6's load_dataset([a.jsonl (6 rows) b.jsonl (4 rows)], split_dataset_ratio, seed=data_seed,
# shuffle=True): the training and validation rows, in order, by (data_seed, ratio, each source's #N).
SWIFT_ROWS = {
    (42, 0.0, (None, None)): ('a5 a2 b3 b0 a0 a1 a3 b1 a4 b2', ''),
    (42, 0.0, (9, 3)): ('a2 a1 a4 b1 b3 a1 a3 a0 a0 b2 a5 a5', ''),
    (42, 0.2, (None, None)): ('a4 b0 a2 b2 b1 a3 a5 a1', 'b3 a0'),
    (42, 0.2, (9, 3)): ('b3 a5 a2 a3 a4 a4 a3 a1 a1 b0', 'b2 a0'),
    (42, 0.5, (None, None)): ('b1 b2 a4 a2 a5', 'a0 a1 b3 a3 b0'),
    (42, 0.5, (9, 3)): ('a4 a2 a4 a5 a2 b0 b2 a5', 'a3 a0 b3 a1'),
    (7, 0.0, (None, None)): ('a5 b1 a4 a1 b0 a0 a3 a2 b3 b2', ''),
    (7, 0.0, (9, 3)): ('a0 a5 b2 a2 a3 a0 a5 a4 b1 a3 a1 b0', ''),
    (7, 0.2, (None, None)): ('b0 a0 b2 a1 b3 a2 a4 a3', 'b1 a5'),
    (7, 0.2, (9, 3)): ('a1 a0 a4 b1 a4 a3 a1 b2 a3 a2', 'b0 a5'),
    (7, 0.5, (None, None)): ('a3 a0 a4 b0 b3', 'b1 a5 a1 b2 a2'),
    (7, 0.5, (9, 3)): ('b0 b3 a4 a3 a3 a4 a0 a0', 'a5 b1 a2 a1'),
}


@pytest.mark.parametrize("key", list(SWIFT_ROWS))
def test_the_split_and_mixture_are_ms_swifts_rows_in_its_order(key):
    seed, ratio, samples = key
    train_rows, val_rows = sources.pick_rows(list(zip((6, 4), samples)), ["a", "b"], seed, ratio)
    name = lambda rows: " ".join(f"{'ab'[i >= 6]}{i % 6 if i < 6 else i - 6}" for i in rows)
    assert (name(train_rows), name(val_rows)) == SWIFT_ROWS[key]


@pytest.mark.parametrize("key", [(42, 0.2, (None, None)), (7, 0.5, (9, 3)), (7, 0.0, (9, 3))])
def test_train_py_trains_and_evaluates_ms_swifts_rows(key, tmp_path, tiny_dir):
    """train.load_data, the whole way (read, sample, split, encode): ms-swift's rows, in its order."""
    seed, ratio, samples = key
    specs = []
    for (name, n), sample in zip((("a", 6), ("b", 4)), samples):
        Path(tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"query": f"question {name}{i}", "response": "ok"})
                                                            + "\n" for i in range(n)))
        specs.append(str(tmp_path / f"{name}.jsonl") + (f"#{sample}" if sample else ""))
    a = flags.train_parser().parse_args(["--model", "tiny", "--dataset", *specs, "--split_dataset_ratio", str(ratio),
                                         "--data_seed", str(seed), "--device", "cpu", "--output_dir", str(tmp_path / "o")])
    flags.check_train_args(a)
    tok = data.Tokenizer(tiny_dir)
    train_rows, val_rows = train.load_data(a, tok, train.chat_template(a, tiny_dir, modeling.Config.from_json(
        tiny_dir / "config.json")))
    name = lambda rows: " ".join(re.search(r"question (\w\d)", tok.decode(list(r["input_ids"]))).group(1) for r in rows)
    assert (name(train_rows), name(val_rows)) == SWIFT_ROWS[key]


def test_val_dataset_means_no_split_and_its_rows_in_file_order_as_ms_swift(tmp_path, tiny_dir, capsys):
    path = tmp_path / "v.jsonl"
    path.write_text("".join(json.dumps({"query": f"question v{i}", "response": "ok"}) + "\n" for i in range(5)))
    a = flags.train_parser().parse_args(["--model", "tiny", "--dataset", str(path), "--val_dataset", f"{path}#3",
                                         "--split_dataset_ratio", "0.2", "--device", "cpu", "--output_dir", str(tmp_path / "o")])
    flags.check_train_args(a)
    assert a.split_dataset_ratio == 0 and "setting split_dataset_ratio: 0.0" in capsys.readouterr().out
    tok = data.Tokenizer(tiny_dir)
    train_rows, val_rows = train.load_data(a, tok, train.chat_template(a, tiny_dir, modeling.Config.from_json(
        tiny_dir / "config.json")))
    name = lambda rows: [re.search(r"question (\w\d)", tok.decode(list(r["input_ids"]))).group(1) for r in rows]
    assert len(train_rows) == 5 and name(val_rows) == ["v0", "v1", "v2"]
    a.val_dataset = [f"{path}#6"]
    with pytest.raises(DataError, match=r"--val_dataset .*#6: 6 rows asked of a source of 5; validation rows are not "
                                        r"repeated"):
        train.load_data(a, tok, None)


def test_data_seed_is_its_own_flag_defaulting_to_42_as_ms_swift():
    a = flags.train_parser().parse_args(TRAIN_REQUIRED + ["--seed", "7"])
    assert (a.seed, a.data_seed) == (7, 42)
    a = parsed("--data_seed", "7", "--max_steps", "4", "--gradient_accumulation_steps", "1")
    steps = list(train.steps_to_run({"global_step": 0, "epoch": 0, "step_in_epoch": 0}, 10, a, 1, 4))
    assert [micro for *_, micro in steps] == [[[5]], [[0]], [[3]], [[4]]]  # SWIFT_EPOCH_ORDER[(7, 10)]


def test_a_run_going_on_from_a_step_skips_the_rows_already_trained():
    """--resume_only_model gives only the step: the epoch and the place in it follow, as the HF Trainer
    works them out (10 rows, 2 a step: 5 steps an epoch; step 4 done: epoch 0's last step is next)."""
    a = parsed("--gradient_accumulation_steps", "2", "--num_train_epochs", "2")
    whole = list(train.steps_to_run({"global_step": 0, "epoch": 0, "step_in_epoch": 0}, 10, a, 1, 10))
    went_on = list(train.steps_to_run({"global_step": 4, "epoch": None, "step_in_epoch": None}, 10, a, 1, 10))
    assert went_on == whole[4:] and went_on[0][:3] == (0, 5, 5)


# ----------------------------------------------------------------------------------------------
# --resume_only_model, end to end


def logged(run_dir: Path) -> dict:
    """step -> (loss, learning rate) of a run's logging.jsonl."""
    out = {}
    for line in (run_dir / "logging.jsonl").read_text().splitlines():
        e = json.loads(line)
        step = e.get("step") or int(str(e.get("global_step/max_steps", "0/0")).split("/")[0])
        if "loss" in e and step:
            out[step] = (e["loss"], e["learning_rate"])
    return out


def test_resume_only_model_goes_on_from_the_step_with_a_fresh_optimizer(tmp_path, tiny_dir, monkeypatch):
    rows = tmp_path / "qa.jsonl"
    rows.write_text("".join(json.dumps({"query": f"question {i}", "response": f"answer {i} " * (i + 1)}) + "\n"
                            for i in range(10)))
    monkeypatch.chdir(tmp_path)
    argv = ["--model", "tiny", "--dataset", str(rows), "--device", "cpu", "--torch_dtype", "float32",
            "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "2", "--num_train_epochs", "2",
            "--learning_rate", "1e-3", "--warmup_ratio", "0.3", "--logging_steps", "1", "--save_steps", "4",
            "--lora_dropout", "0", "--padding_free", "false"]
    assert train.main(argv + ["--output_dir", "full"]) == 0
    full_dir = next(Path("full").glob("v*"))
    assert train.main(argv + ["--output_dir", "went_on", "--resume_from_checkpoint", str(full_dir / "checkpoint-4"),
                              "--resume_only_model", "true"]) == 0
    full, went_on = logged(full_dir), logged(next(Path("went_on").glob("v*")))
    assert sorted(went_on) == list(range(5, 11))  # numbered on from the checkpoint's step, to the same end
    assert went_on[5][0] == full[5][0]  # the rows the uninterrupted run trained next, with the same adapter
    assert went_on[6][0] != full[6][0]  # then a fresh optimizer (no Adam moments): another step
    assert [went_on[s][1] for s in (5, 10)] == [full[5][1], full[10][1]]  # the schedule's own rate at each step
    assert SWIFT_RESUMED[5][0] == SWIFT_FULL_LOSS[5] and SWIFT_RESUMED[6][0] != SWIFT_FULL_LOSS[6]  # as ms-swift
    assert list(Path("went_on").glob("v*/checkpoint-10")) and not list(Path("went_on").glob("v*/checkpoint-4"))

    # --adapters CKPT (and --ignore_data_skip true) is a new training from step 0 with that adapter, as in ms-swift.
    assert train.main(argv + ["--output_dir", "fresh", "--adapters", str(full_dir / "checkpoint-4"), "--max_steps", "2"]) == 0
    assert sorted(logged(next(Path("fresh").glob("v*")))) == [1, 2]


# ----------------------------------------------------------------------------------------------
# The flags argparse used to guess at, and stale messages


@pytest.mark.parametrize("flag,value", [("init_weights", "pissa"), ("lora_dtype", "bfloat16"),
                                        ("dataset_shuffle", "false"), ("train_dataloader_shuffle", "false")])
def test_flags_taken_with_what_happens_here_refuse_other_values_with_the_reason(flag, value):
    with pytest.raises(UsageError) as e:
        flags.train_parser().parse_args(TRAIN_REQUIRED + [f"--{flag}", value])
    assert f"argument --{flag}: '{value}' is not supported here" in str(e.value) and "did you mean" not in str(e.value)


@pytest.mark.parametrize("flag", ["init_weights", "lora_dtype", "fp16", "bf16", "data_seed", "lr_scheduler_kwargs",
                                  "ignore_data_skip", "max_epochs", "dataset_shuffle", "train_dataloader_shuffle",
                                  "group_by_length", "warmup_steps"])
def test_no_ms_swift_flag_gets_a_spelling_guess(flag, capsys):
    value = """{"num_cycles": 0.5}""" if flag == "lr_scheduler_kwargs" else "true" if "shuffle" in flag or flag in (
        "init_weights", "fp16", "bf16", "group_by_length") else "float32" if flag == "lora_dtype" else "3"
    assert train.main(TRAIN_REQUIRED + [f"--{flag}", value]) == 2  # stops at the missing data, or refuses in one line
    assert "did you mean" not in capsys.readouterr().err


def test_merge_says_it_writes_the_training_dtype_not_bf16(tmp_path, capsys):
    assert merge.main(["--adapters", str(tmp_path / "none"), "--quant_bits", "4"]) == 2
    err = capsys.readouterr().err
    assert "unquantised, in the adapter's training dtype or --torch_dtype" in err and "bf16" not in err


def test_infer_says_which_of_several_adapters_answers(tmp_path, tiny_dir, capsys):
    base, _ = modeling.load_model(str(tiny_dir), dtype=torch.float32)
    for name in ("a", "b"):
        lora.add_adapter(base, lora.LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0), name)
        lora.save_adapter(base, tmp_path / name, name, base_model_name_or_path=str(tiny_dir))
    assert infer.main(["--adapters", str(tmp_path / "a"), str(tmp_path / "b"), "--device", "cpu", "--prompt", "hi",
                       "--max_new_tokens", "1"]) == 0
    assert ("answering with adapter a, the first of --adapters (swift infer answers with the last); switch with "
            "/adapter NAME in the chat, or give that one first") in capsys.readouterr().err
