"""ms-swift's command lines: every flag of swift_flags.FLAGS is taken or refused as the table says,
unset flags get ms-swift's derived defaults (stored in args.json), and the README shows the table."""

import json
import math
import shlex
from pathlib import Path

import pytest

import flags

import infer
import merge
import swift_flags
import train
from cli import UsageError

ROOT = Path(__file__).resolve().parent.parent
TRAIN_REQUIRED = ["--model", "tiny", "--dataset", "x.json"]


def run_script(script: str, argv: list, tmp_path) -> int:
    """The script's main on argv (merge.py: on a checkpoint that does not exist, so that it stops
    right after parsing)."""
    if script == "train":
        return train.main(TRAIN_REQUIRED + argv)
    if script == "infer":
        return infer.main(argv + ["--device", "cpu", "--adapters", str(tmp_path / "no-checkpoint")])
    return merge.main(["--adapters", str(tmp_path / "no-checkpoint")] + argv)


CASES = [(name, script) for name in swift_flags.FLAGS for script in swift_flags.SCRIPTS]


@pytest.mark.parametrize("name,script", CASES, ids=[f"{s}-{n}" for n, s in CASES])
def test_every_flag_in_the_table_is_taken_or_refused_with_its_message(name, script, tmp_path, capsys):
    flag = swift_flags.FLAGS[name]
    argv = [f"--{name}", *shlex.split(flag.example)]
    code = run_script(script, argv, tmp_path)
    err = capsys.readouterr().err
    assert code == 2  # taken: stops later, at the missing data or checkpoint
    if script in flag.scripts:
        assert "unrecognized arguments" not in err and "not of this script" not in err and "does not support" not in err, err
    else:
        assert err == f"error: {swift_flags.refusal(name)}\n"  # one line, the table's, no spelling guess


@pytest.mark.parametrize("argv,instead", [
    ("--deepspeed zero3", "`torchrun --nproc_per_node N train.py ... --fsdp true` splits the model over the GPUs"),
    ("--streaming true", "sample a large one with --dataset FILE#N"),
    ("--use_dora true", "DoRA is not implemented"),
])
def test_unsupported_ms_swift_flags_say_so_in_one_line(argv, instead, capfd):
    """The issue's examples, on the command line a user types: no 'did you mean --seed?'. (train.main in
    this process, all it writes to stderr captured; tests/test_train.py's
    test_flag_typo_is_an_argparse_error shows that train.py as a process writes nothing else.)"""
    code = train.main([*TRAIN_REQUIRED, *argv.split()])
    stderr = capfd.readouterr().err
    name = argv.split()[0]
    assert code == 2 and stderr.count("\n") == 1, stderr
    assert stderr.startswith(f"error: {name} is an ms-swift flag this toolkit does not support: ")
    assert instead in stderr and "did you mean" not in stderr


def test_flags_of_another_script_name_it():
    with pytest.raises(UsageError, match=r"^--temperature is a flag of infer.py here \(swift infer\), not of this script\.$"):
        flags.train_parser().parse_args(TRAIN_REQUIRED + ["--temperature", "0"])
    with pytest.raises(UsageError, match="--merge_lora is a flag of infer.py and merge.py here "
                                         ".*`python merge.py --adapters CKPT`"):
        flags.train_parser().parse_args(TRAIN_REQUIRED + ["--merge_lora", "true"])


def test_a_misspelt_flag_still_gets_the_nearest_one_and_a_bad_value_no_guess():
    with pytest.raises(UsageError, match=r"--lora_rnak 8 \(did you mean --lora_rank\?\)"):
        flags.train_parser().parse_args(TRAIN_REQUIRED + ["--lora_rnak", "8"])
    with pytest.raises(UsageError) as e:
        flags.train_parser().parse_args(TRAIN_REQUIRED + ["--lora_rank", "x"])
    assert "invalid int value: 'x'" in str(e.value) and "did you mean" not in str(e.value)


def test_ignored_flags_are_noted_and_limited_ones_take_only_their_values(capsys):
    a = flags.train_parser().parse_args(TRAIN_REQUIRED + ["--dataloader_num_workers", "4", "--template", "qwen2_5",
                                                          "--report_to", "tensorboard"])
    assert a.dataloader_num_workers == "4" and a.template == "qwen2_5" and a.report_to == ["tensorboard"]
    err = capsys.readouterr().err.splitlines()
    assert err == ["note: --dataloader_num_workers 4 changes nothing here: the data are tokenized before training starts."]
    with pytest.raises(UsageError, match=r"argument --report_to: 'wandb' is not supported here, only tensorboard or none"):
        flags.train_parser().parse_args(TRAIN_REQUIRED + ["--report_to", "tensorboard", "wandb"])
    with pytest.raises(UsageError, match=r"argument --bnb_4bit_quant_storage: 'bfloat16' is not supported here, only uint8 "
                                         r"\(two 4-bit codes a byte\)"):
        flags.train_parser().parse_args(TRAIN_REQUIRED + ["--bnb_4bit_quant_storage", "bfloat16"])
    with pytest.raises(UsageError, match=r"argument --template: invalid choice: 'qwen4' \(choose from 'qwen2_5', 'qwen3', "
                                         r"'qwen3_nothinking', 'qwen3_thinking', 'qwen3_5', 'qwen3_8'\)"):
        flags.train_parser().parse_args(TRAIN_REQUIRED + ["--template", "qwen4"])


def test_tuner_type_is_ms_swift_4s_name_for_train_type(tmp_path, capsys):
    assert flags.train_parser().parse_args(TRAIN_REQUIRED + ["--tuner_type", "lora"]).train_type == "lora"
    assert train.main(TRAIN_REQUIRED + ["--tuner_type", "full"]) == 2
    assert "--train_type full: only 'lora' is supported" in capsys.readouterr().err


@pytest.mark.parametrize("backend", ["pt", "transformers"])
def test_infer_backend_pt_is_the_pytorch_backend(backend):
    assert flags.infer_parser().parse_args(["--infer_backend", backend]).infer_backend == backend


def test_infer_backend_other_than_pytorch_is_a_clear_error(capsys):
    assert infer.main(["--model", "/no/such/model", "--infer_backend", "vllm"]) == 2  # before any model is looked for
    assert capsys.readouterr().err == ("error: --infer_backend vllm: only the PyTorch backend exists here "
                                       "(--infer_backend pt, ms-swift 4.x's transformers); infer.py has no vllm, "
                                       "sglang or lmdeploy.\n")


@pytest.mark.parametrize("batch,world,expected", [(1, 1, 16), (2, 1, 8), (3, 1, 6), (16, 1, 1), (64, 1, 1),
                                                  (1, 2, 8), (3, 2, 3), (1, 32, 1)])
def test_unset_accumulation_is_ms_swifts_ceil_16_over_batch_times_gpus(batch, world, expected, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    a = flags.train_parser().parse_args(TRAIN_REQUIRED + ["--per_device_train_batch_size", str(batch)])
    flags.set_derived_defaults(a)
    assert a.gradient_accumulation_steps == expected == max(1, math.ceil(16 / batch / world))
    assert capsys.readouterr().out == f"Setting args.gradient_accumulation_steps: {expected}\n"  # as ms-swift logs it


def test_given_values_are_kept_and_only_rank_0_logs(monkeypatch, capsys):
    a = flags.train_parser().parse_args(TRAIN_REQUIRED + ["--gradient_accumulation_steps", "3", "--eval_steps", "7",
                                                          "--output_dir", "runs"])
    flags.set_derived_defaults(a)
    assert (a.gradient_accumulation_steps, a.eval_steps, a.output_dir) == (3, 7, "runs")
    monkeypatch.setenv("RANK", "1")
    flags.set_derived_defaults(flags.train_parser().parse_args(TRAIN_REQUIRED))
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("model,expected", [("tiny", "output/tiny"), ("Qwen/Qwen2.5-7B-Instruct/", "output/Qwen2.5-7B-Instruct"),
                                            ("/models/qwen-0.5b", "output/qwen-0.5b")])
def test_unset_output_dir_is_output_slash_model_name_as_ms_swift(model, expected):
    a = flags.train_parser().parse_args(["--model", model, "--dataset", "x.json", "--save_steps", "20"])
    flags.set_derived_defaults(a)
    assert Path(a.output_dir) == Path(expected) and a.eval_steps == 20  # eval_steps follows save_steps


def test_args_json_stores_the_derived_defaults_and_a_resume_derives_the_same(tmp_path, tiny_dir, monkeypatch, capsys):
    rows = tmp_path / "qa.json"
    rows.write_text(json.dumps([{"query": f"q{i}", "response": f"a{i}"} for i in range(6)]))
    monkeypatch.chdir(tmp_path)
    argv = ["--model", "tiny", "--dataset", str(rows), "--device", "cpu", "--torch_dtype", "float32",
            "--per_device_train_batch_size", "2", "--max_steps", "2", "--save_steps", "1"]
    assert train.main(argv) == 0
    out = capsys.readouterr().out
    assert "Setting args.gradient_accumulation_steps: 8\n" in out
    assert "1 optimizer steps per epoch" in out  # 3 micro-batches of 2 rows, 8 to a step: one step
    [run] = (tmp_path / "output" / "tiny").glob("v0-*")
    for args_file in (run / "args.json", run / "checkpoint-1" / "args.json"):
        args = json.loads(args_file.read_text())
        assert (args["gradient_accumulation_steps"], args["eval_steps"], args["output_dir"]) == (8, 1, "output/tiny")
        assert args["max_length"] == 2048
    # The resume check compares the derived values, not the unset ones, with the checkpoint's.
    assert train.main(argv + ["--resume_from_checkpoint", str(run / "checkpoint-1")]) == 0
    assert "resumed from" in capsys.readouterr().out


@pytest.mark.parametrize("parser", [flags.train_parser, flags.infer_parser])
def test_flag_help_fits_one_line(parser):
    for action in parser()._actions:
        assert len(action.help or "") < 100, action.option_strings


def test_readme_shows_the_table():
    readme = (ROOT / "README.md").read_text()
    assert swift_flags.markdown_table() in readme, "paste the output of `python swift_flags.py` into README.md"


def test_adapters_goes_on_training_an_adapter_and_a_merged_model_keeps_its_system_prompt(tmp_path, tiny_dir, capsys):
    """train.py --adapters CKPT (swift sft --adapters): a new run from that adapter, with its rank;
    merge.py keeps the training system prompt, and infer.py --model MERGED uses it."""
    import infer
    import merge
    import train
    data_file = tmp_path / "qa.json"
    data_file.write_text(json.dumps([{"query": "hi", "response": "hello"}, {"query": "who", "response": "me"}]))
    common = ["--model", "tiny", "--dataset", str(data_file), "--torch_dtype", "float32", "--device", "cpu",
              "--max_steps", "2", "--save_steps", "2", "--gradient_accumulation_steps", "1"]
    assert train.main(common + ["--output_dir", str(tmp_path / "a"), "--lora_rank", "4", "--system", "Be brief."]) == 0
    (first,) = (tmp_path / "a").glob("v*/checkpoint-2")
    assert train.main(common + ["--output_dir", str(tmp_path / "b"), "--adapters", str(first), "--system", "Be brief."]) == 0
    (second,) = (tmp_path / "b").glob("v*/checkpoint-2")
    assert json.loads((second / "adapter_config.json").read_text())["r"] == 4  # the adapter's rank, not the default 8
    assert "the adapter only: a new run" in capsys.readouterr().out
    assert merge.main(["--adapters", str(second), "--device", "cpu"]) == 0
    capsys.readouterr()
    merged = second.parent / "checkpoint-2-merged"
    assert infer.main(["--model", str(merged), "--device", "cpu", "--prompt", "hi", "--max_new_tokens", "2",
                       "--temperature", "0", "--show_prompt", "true"]) == 0
    assert "<|im_start|>system\nBe brief.<|im_end|>" in capsys.readouterr().err


def test_a_base_that_only_args_json_model_dir_finds_is_loaded_from_there(tmp_path, tiny_dir, capsys):
    """ms-swift's args.json names the hub id and, as model_dir, the folder it downloaded it to
    (from ModelScope, which this toolkit does not fetch): infer.py loads the base from there."""
    import shutil

    import infer
    import lora
    import model as modeling
    m, _ = modeling.load_model(str(tiny_dir))
    lora.add_adapter(m, lora.LoraConfig(r=2, lora_alpha=4))
    ckpt = tmp_path / "checkpoint-10"
    lora.save_adapter(m, ckpt, base_model_name_or_path="Qwen/Qwen2.5-0.5B-Instruct")
    local = tmp_path / "modelscope" / "Qwen2.5-0.5B-Instruct"
    shutil.copytree(tiny_dir, local)
    (ckpt / "args.json").write_text(json.dumps({"model": "Qwen/Qwen2.5-0.5B-Instruct", "model_dir": str(local)}))
    assert infer.main(["--adapters", str(ckpt), "--device", "cpu", "--prompt", "hi", "--max_new_tokens", "2"]) == 0
    assert f"loading {local}, where its training found it" in capsys.readouterr().err
