"""Issue 34: state files that lie. A checkpoint's trainer_state.json is read before anything loads,
every field checked; whatever it says, pruning deletes only this toolkit's checkpoint-N folders
inside the run folder."""

import json
import shutil
from pathlib import Path

import pytest

import runs
import train


def write_rows(path: Path) -> Path:
    path.write_text("".join(json.dumps({"query": f"q{i}", "response": f"answer {i}"}) + "\n" for i in range(6)))
    return path


def argv(tmp_path, *extra):
    return ["--model", "tiny", "--dataset", str(write_rows(tmp_path / "d.jsonl")), "--output_dir", str(tmp_path / "out"),
            "--device", "cpu", "--gradient_accumulation_steps", "1", "--max_steps", "4", "--save_steps", "1",
            *map(str, extra)]


@pytest.fixture(scope="module")
def trained_once(tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    command = argv(root)[:-4] + ["--max_steps", "3", "--save_steps", "1"]
    assert train.main(command) == 0
    (run,) = (root / "out").glob("v0-*")
    return run, command


@pytest.fixture
def trained(tmp_path, trained_once):
    """A run of 3 steps with a checkpoint at each, copied for this test: (its run folder, the command
    that made it, writing into this test's out/)."""
    run, command = trained_once
    shutil.copytree(run, tmp_path / "out" / run.name)
    at = command.index("--output_dir") + 1
    return tmp_path / "out" / run.name, command[:at] + [str(tmp_path / "out")] + command[at + 1:]


def edit_json(path: Path, **fields):
    """The JSON object in `path` with these fields set (or replaced)."""
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


def tiny_copy(tmp_path, tiny_dir) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(tiny_dir, folder)
    return folder


@pytest.mark.parametrize("where", ["../../victim", "absolute"])
def test_rotation_never_deletes_what_a_checkpoint_names_outside_the_run(tmp_path, trained, where, capsys):
    run, _ = trained
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "trainer_state.json").write_text("{}")  # looks like a checkpoint: still not ours to delete
    name = str(victim) if where == "absolute" else "../../victim"
    edit_json(run / "checkpoint-3" / "trainer_state.json", checkpoints=[name, "checkpoint-3"])
    code = train.main(argv(tmp_path, "--save_total_limit", 1, "--resume_from_checkpoint", run / "checkpoint-3"))
    assert code == 2 and victim.is_dir()
    err = capsys.readouterr().err
    assert '"checkpoints" holds' in err and "Traceback" not in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [run.name]  # nothing written


def test_pruning_itself_deletes_only_checkpoint_folders_of_the_run(tmp_path):
    run = tmp_path / "run"
    outside = tmp_path / "outside"
    for folder in (run / "checkpoint-1", run / "checkpoint-2", outside):
        folder.mkdir(parents=True)
        (folder / "trainer_state.json").write_text("{}")
    (run / "checkpoint-9").symlink_to(outside)  # a link named like a checkpoint: the link is no checkpoint
    history = ["../outside", "checkpoint-9", "checkpoint-1", "checkpoint-2"]
    runs.prune_checkpoints(run, 1, None, history)
    assert history == ["checkpoint-2"] and outside.is_dir() and not (run / "checkpoint-1").exists()


BAD_FIELDS = {  # issue 34's cases: each a traceback before
    "checkpoints": "checkpoint-3", "elapsed": "12.5", "epoch": 0.5, "log_history": [1, 2], "loss_scale": "65536",
    "global_step": -3, "best_checkpoint": "../x", "best_eval_loss": "nan", "step_in_epoch": None,
}


@pytest.mark.parametrize("field", list(BAD_FIELDS))
def test_a_trainer_state_field_of_the_wrong_kind_is_one_paragraph_before_anything_loads(tmp_path, trained, field, capsys):
    run, command = trained
    edit_json(run / "checkpoint-3" / "trainer_state.json", **{field: BAD_FIELDS[field]})
    before = sorted(p.name for p in run.iterdir())
    assert train.main(command + ["--max_steps", "4", "--resume_from_checkpoint", str(run / "checkpoint-3")]) == 2
    err = capsys.readouterr().err
    assert f'"{field}" holds {json.dumps(BAD_FIELDS[field])}, where this toolkit writes' in err, err
    assert "Traceback" not in err and "loading" not in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [run.name] and sorted(p.name for p in run.iterdir()) == before


def test_a_trainer_state_that_is_not_an_object_is_refused(tmp_path, trained, capsys):
    run, command = trained
    (run / "checkpoint-3" / "trainer_state.json").write_text("[1, 2]")
    assert train.main(command + ["--resume_from_checkpoint", str(run / "checkpoint-3")]) == 2
    assert "trainer_state.json must hold a JSON object, not list" in capsys.readouterr().err


def test_resuming_a_run_folder_takes_its_furthest_checkpoint_whatever_the_file_times(tmp_path, trained):
    """A run folder copied without its timestamps (issue 34 item 6): the file times say nothing."""
    import os
    run, _ = trained
    for age, name in enumerate(["checkpoint-3", "checkpoint-2", "checkpoint-1"]):  # the newest looks oldest
        os.utime(run / name / "trainer_state.json", (1_000_000 + age, 1_000_000 + age))
    assert runs.find_resume_checkpoint(str(run)).name == "checkpoint-3"


@pytest.mark.parametrize("when", ["before training", "after training"])
def test_ctrl_c_during_the_eval_answers_says_what_is_on_disk(tmp_path, monkeypatch, capsys, when):
    """Issue 34 item 7: it said "interrupted before training started; nothing was written" although
    checkpoints existed, and an interrupted start left an empty vN folder."""
    def answers(label, *args):
        if label == when:
            raise KeyboardInterrupt

    monkeypatch.setattr(train, "show_answers", answers)
    assert train.main(argv(tmp_path, "--eval_prompts", "hi")) == 130
    err = capsys.readouterr().err
    if when == "before training":
        assert "interrupted before the first checkpoint; the new run folder was removed again." in err
        assert list((tmp_path / "out").iterdir()) == []
    else:
        (run,) = (tmp_path / "out").glob("v0-*")
        assert f"interrupted; the run is kept in {run} (last checkpoint: {run / 'checkpoint-4'})." in err
    assert "nothing was written" not in err


def test_ctrl_c_as_the_finished_run_writes_its_summary_says_what_is_kept(tmp_path, monkeypatch, capsys):
    """tests/soak.py: a SIGINT after the last step, while the summary and curves were written, said
    "interrupted before training started; nothing was written" of a complete run."""
    def finish(self, interrupted):
        raise KeyboardInterrupt

    monkeypatch.setattr(runs.Run, "finish", finish)
    assert train.main(argv(tmp_path)) == 130
    (run,) = (tmp_path / "out").glob("v0-*")
    err = capsys.readouterr().err
    assert f"interrupted; the run is kept in {run} (last checkpoint: {run / 'checkpoint-4'})." in err
    assert "nothing was written" not in err


def test_resuming_on_a_dataset_edited_since_is_refused_before_the_model_loads(tmp_path, capsys):
    """Issue 34 item 5: it went on, overshot --max_steps ([35/30]) and never saved the extra steps."""
    command = argv(tmp_path)[:-4] + ["--max_steps", "6", "--save_steps", "3"]
    assert train.main(command[:-4] + ["--max_steps", "3", "--save_steps", "3"]) == 0
    (run,) = (tmp_path / "out").glob("v0-*")
    assert json.loads((run / "checkpoint-3" / "args.json").read_text())["data_fingerprint"].startswith("6 rows, ")
    data = tmp_path / "d.jsonl"
    rows = data.read_text()
    resume = ["--resume_from_checkpoint", str(run / "checkpoint-3")]
    data.write_text(rows + json.dumps({"query": "one more", "response": "row"}) + "\n")
    capsys.readouterr()
    assert train.main(command + resume) == 2
    err = capsys.readouterr().err
    assert "was trained on other data: its run read 6 rows, " in err and "the datasets now give 7 rows, " in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [run.name]
    data.write_text(rows)  # put back: it resumes
    assert train.main(command + resume) == 0


@pytest.mark.parametrize("field,value,says", [
    ("use_rslora", "false", 'use_rslora is \'false\', not true or false; fix it (false, not "false")'),
    ("target_modules", [1, 2], "target_modules is [1, 2]; peft writes a list of module names"),
    ("r", "16", 'r is \'16\', not a number'),
])
def test_an_adapter_config_field_of_the_wrong_type_is_refused_not_misread(tmp_path, trained, field, value, says, capsys):
    """Issue 34 item 10: use_rslora "false" was read as true (rsLoRA's scale, silently)."""
    import infer
    run, _ = trained
    edit_json(run / "checkpoint-3" / "adapter_config.json", **{field: value})
    assert infer.main(["--adapters", str(run / "checkpoint-3"), "--prompt", "hi", "--max_new_tokens", "1"]) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err


def test_adapters_refuses_a_lora_flag_that_contradicts_the_adapter(tmp_path, trained, capsys):
    """Issue 34 item 10: --adapters CK silently ignored an explicit --lora_rank (the adapter's rank won)."""
    run, command = trained
    ckpt = str(run / "checkpoint-3")
    assert train.main(command + ["--adapters", ckpt, "--lora_rank", "16", "--output_dir", str(tmp_path / "o2")]) == 2
    assert "whose lora_rank is 8: --lora_rank 16 cannot change it" in capsys.readouterr().err
    assert train.main(command + ["--adapters", ckpt, "--lora_rank", "8", "--output_dir", str(tmp_path / "o3")]) == 0


def test_a_ctrl_c_that_lands_during_a_save_is_not_dropped(tmp_path, monkeypatch, capsys):
    """Issue 34 item 2: a signal during a checkpoint save was ignored, and training ran on."""
    import os
    import signal
    real, sent = runs.save_checkpoint, []

    def save_with_a_signal(*args):
        if not sent:
            sent.append(os.kill(os.getpid(), signal.SIGINT))  # lands mid-save
        return real(*args)

    monkeypatch.setattr(runs, "save_checkpoint", save_with_a_signal)
    assert train.main(argv(tmp_path, "--max_steps", 6)) == 130
    (run,) = (tmp_path / "out").glob("v0-*")
    assert [p.name for p in runs.complete_checkpoints(run)] == ["checkpoint-1", "checkpoint-2"]  # the next step, then stop
    assert "stopped at step 2. Resume with:" in capsys.readouterr().out


def test_a_full_disk_during_a_save_is_one_paragraph_naming_the_last_complete_checkpoint(tmp_path, monkeypatch, capsys):
    """Issue 34 item 3: a raw SafetensorError traceback, no resume hint."""
    import safetensors.torch
    from safetensors import SafetensorError
    real = safetensors.torch.save_file

    def full_disk(tensors, path, metadata=None):
        if ".checkpoint-2." in str(path):
            raise SafetensorError("No space left on device (os error 28)")
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    assert train.main(argv(tmp_path)) == 2
    err = capsys.readouterr().err
    (run,) = (tmp_path / "out").glob("v0-*")
    assert "checkpoint-2 could not be written (could not write " in err and "No space left on device" in err
    assert f"The last complete checkpoint is {run / 'checkpoint-1'}: free some space, then python train.py ... " \
           f"--resume_from_checkpoint {run / 'checkpoint-1'}" in err and "Traceback" not in err
    assert sorted(p.name for p in run.iterdir() if "checkpoint" in p.name) == ["checkpoint-1"]  # no half of checkpoint-2


def test_runs_started_together_each_get_their_own_version(tmp_path):
    """Issue 34 item 9: 7 of 80 concurrent creations failed (two runs computed the same vN)."""
    import threading
    start, made, failed = threading.Barrier(40), [], []

    def create():
        start.wait()
        try:
            made.append(runs.new_run_dir(str(tmp_path), True).name)
        except OSError as e:
            failed.append(e)

    threads = [threading.Thread(target=create) for _ in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    versions = sorted(int(name[1:].split("-")[0]) for name in made)
    assert not failed and versions == list(range(40)) and len(list(tmp_path.iterdir())) == 40


def test_a_second_run_into_a_folder_another_run_writes_into_is_refused(tmp_path, capsys):
    """Issue 34 item 9: two --add_version false runs into one folder interleaved their checkpoints."""
    folder = tmp_path / "out"
    import fcntl
    folder.mkdir()
    first = open(folder / ".train.lock", "a+")  # a first run, still going: its lock, as lock_folder takes it
    fcntl.flock(first, fcntl.LOCK_EX | fcntl.LOCK_NB)
    first.write("pid 12345")
    first.flush()
    try:
        assert train.main(argv(tmp_path, "--add_version", "false")) == 2
        err = capsys.readouterr().err
        assert f"--output_dir {folder}: another train.py (pid 12345) is writing" in err and "Traceback" not in err
        assert not list(folder.glob("checkpoint-*"))
    finally:
        first.close()
    assert train.main(argv(tmp_path, "--add_version", "false", "--max_steps", 1)) == 0  # once it is gone
    runs.LOCKS.pop().close()


@pytest.mark.parametrize("key,value", [("num_hidden_layers", 10**7), ("num_attention_heads", 0), ("vocab_size", -5)])
def test_a_config_json_with_an_impossible_size_stops_before_building_anything(tmp_path, tiny_dir, key, value, capsys):
    """Issue 34 item 10: a huge num_hidden_layers hung while memory grew (a layer object for each)."""
    import infer
    folder = tiny_copy(tmp_path, tiny_dir)
    edit_json(folder / "config.json", **{key: value})
    assert infer.main(["--model", str(folder), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert f"{key} is {value}, which no Qwen model has" in err and "Traceback" not in err


@pytest.mark.parametrize("key,value,expected", [
    ("temperature", "hot", "a number from 0 to 100"), ("top_p", 0, "a number over 0, at most 1"),
    ("top_k", 2.5, "a whole number of 0 or more"), ("max_new_tokens", -1, "a whole number of 1 or more"),
    ("do_sample", "yes", "true or false"), ("eos_token_id", ["x"], "a token id or a list of them"),
    ("repetition_penalty", True, "a number over 0, at most 100")])
def test_a_generation_config_field_of_the_wrong_kind_is_one_paragraph(tmp_path, tiny_dir, key, value, expected, capsys):
    """Issue 34 item 10: {"temperature": "hot"} in generation_config.json ended in a TypeError traceback
    at the first token; every field decoding reads is checked as the file is read (checkpoints.GENERATION_FIELDS)."""
    import infer
    folder = tiny_copy(tmp_path, tiny_dir)
    edit_json(folder / "generation_config.json", **{key: value})
    assert infer.main(["--model", str(folder), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert f'"{key}" is {json.dumps(value)}, but it must be {expected}' in err and "Traceback" not in err
    (folder / "generation_config.json").write_text("[1, 2]")
    assert infer.main(["--model", str(folder), "--prompt", "hi"]) == 2
    assert "generation_config.json must hold a JSON object, not list" in capsys.readouterr().err


@pytest.mark.parametrize("field,value,expected", [("model", 7, "a model id or folder"), ("system", 5, "a text"),
                                                  ("enable_thinking", "no", "true or false"),
                                                  ("split_dataset_ratio", 1.5, "a number from 0 up to 1")])
def test_an_args_json_field_of_the_wrong_kind_is_one_paragraph(tmp_path, trained, field, value, expected, capsys):
    """Issue 34 item 10: {"model": 7} in a checkpoint's args.json ended in a TypeError traceback, and
    {"system": 5} was used as the system prompt "5"; every field inference reads is checked (checkpoints.ARGS_FIELDS)."""
    import infer
    ckpt = trained[0] / "checkpoint-2"
    edit_json(ckpt / "args.json", **{field: value})
    assert infer.main(["--adapters", str(ckpt), "--prompt", "hi", "--max_new_tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert f'args.json: "{field}" is {json.dumps(value)}, but it must be {expected}' in err and "Traceback" not in err
