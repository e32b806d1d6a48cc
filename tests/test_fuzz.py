"""Issue 34: the state files a run reads, fuzzed. Whatever a file says, the command that reads it
answers with a run, an answer or one paragraph, never a traceback, and writes nothing outside its folder.

Each file a resume, a chat, a merge or a model's load reads back (trainer_state.json, args.json, ours
and ms-swift's, adapter_config.json, config.json, generation_config.json, tokenizer_config.json,
model.safetensors.index.json and merge_info.json) is mutated, seeded, as a hand edit, another tool, a
full disk or a hostile download would: a field of another type, a field deleted, a huge or a negative
number, NaN or Infinity, a path out of its folder ("../victim", an absolute path), the file cut short,
a UTF-8 BOM, an empty file, a value that is no object (a field inside a list or an object now and
then). The mutated copy goes through a command that reads it, in-process (TARGETS says which):
resume (train.main --resume_from_checkpoint, also --resume_only_model true), a run on the adapter
(train.main --adapters), infer (infer.main --adapters), merge (merge.main, also onto a model folder
and over an earlier merge with --exist_ok) and loading a model folder (infer.main --model). A case
fails on:

- a traceback: an exception out of main(), or "Traceback" printed;
- an exit code README does not document (0, 1, 2 or 130), or a 2 that prints no `error:` paragraph;
- a refusal (exit 2) that wrote anything, even into the case's own folder;
- any change outside the case's folder: a sibling "victim" folder that looks like a run, a model and
  a merged folder, the built-in tiny model and the training data keep their files and file times.

The suite runs seeds 0-39, each file with each of its commands at least once (about 10 s on two slow
cores, with the cases below). For a soak, FUZZ_CASES sets how many seeds and FUZZ_FIRST the first:

    FUZZ_CASES=2000 python -m pytest tests/test_fuzz.py -q -x      # about 3 minutes

A failure names its seed, file, mutation and command; run it alone by its id, with the FUZZ_FIRST /
FUZZ_CASES that included it: `tests/test_fuzz.py::test_fuzz_a_state_file_never_ends_in_a_traceback_or_a_write_outside[seed_123]`.
What fuzzing found (each a traceback or a silently different run before) stays as a named case of
test_the_state_file_bugs_fuzzing_found_stay_fixed.
"""

import json
import math
import os
import random
import shutil
import traceback
from pathlib import Path

import pytest

import infer
import merge
import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FIRST, CASES = int(os.environ.get("FUZZ_FIRST", "0")), int(os.environ.get("FUZZ_CASES", "40"))
EXIT_CODES = {0, 1, 2, 130}  # README: done, training diverged / a piped line failed, a refusal, Ctrl-C
ANSWER = ["--prompt", "hi", "--max_new_tokens", "2", "--device", "cpu"]

# An ms-swift 3.x checkpoint's args.json, the keys inference reads (and some it does not)
SWIFT_ARGS = {"model": "tiny", "model_type": "qwen2_5", "model_revision": None, "task_type": "causal_lm",
              "torch_dtype": "bfloat16", "template": "qwen2_5", "system": "You are a helpful assistant.",
              "max_length": 2048, "truncation_strategy": "delete", "dataset": ["AI-ModelScope/alpaca-gpt4-data-zh#500"],
              "val_dataset": [], "split_dataset_ratio": 0.01, "data_seed": 42, "seed": 42, "train_type": "lora",
              "lora_rank": 8, "lora_alpha": 32, "target_modules": ["all-linear"], "model_name": ["小黄"],
              "model_author": ["魔搭"], "output_dir": "/root/output/v0-20250101-120000", "adapters": [],
              "swift_version": "3.4.1"}

# Each file fuzzed: (its name, where it lies in a case's folder, the commands that read it)
TARGETS = [
    ("trainer_state.json", "run/checkpoint-2/trainer_state.json", ("resume", "resume adapter")),
    ("args.json", "run/checkpoint-2/args.json", ("infer", "resume", "merge")),
    ("ms-swift args.json", "run/checkpoint-2/args.json", ("infer", "merge")),
    ("adapter_config.json", "run/checkpoint-2/adapter_config.json", ("infer", "merge", "train on")),
    ("config.json", "model/config.json", ("load", "merge onto")),
    ("generation_config.json", "model/generation_config.json", ("load", "merge onto")),
    ("tokenizer_config.json", "model/tokenizer_config.json", ("load", "merge onto")),
    ("model.safetensors.index.json", "model/model.safetensors.index.json", ("load", "merge onto")),
    ("merge_info.json", "merged/merge_info.json", ("remerge",)),
]


# ----------------------------------------------------------------------------------------------
# What is fuzzed: a trained run, its merge and a model folder, copied for each case


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_dir):
    """Once per module: root/ holding run/ (a tiny run of 2 steps, a checkpoint at each), model/ (the
    tiny model's folder) and merged/ (checkpoint-2 merged into tiny); and the training flags."""
    root = tmp_path_factory.mktemp("fuzzed")
    data = root / "d.jsonl"
    data.write_text("".join(json.dumps({"query": f"q{i}", "response": f"answer {i}"}) + "\n" for i in range(6)))
    flags = ["--model", "tiny", "--dataset", str(data), "--device", "cpu", "--gradient_accumulation_steps", "1",
             "--max_steps", "2", "--save_steps", "1"]
    assert train.main(flags + ["--output_dir", str(root / "out")]) == 0
    next((root / "out").glob("v0-*")).rename(root / "run")
    shutil.copytree(tiny_dir, root / "model")
    merge.merge(root / "run" / "checkpoint-2", output_dir=root / "merged", device="cpu")
    return root, flags


def make_victim(folder: Path) -> Path:
    """A folder outside the case that looks like a run, a model and a merged folder: what a path
    in a state file might reach."""
    (folder / "checkpoint-1").mkdir(parents=True)
    (folder / "checkpoint-1" / "trainer_state.json").write_text('{"global_step": 1, "log_history": []}')
    (folder / "config.json").write_text("{}")
    (folder / "merge_info.json").write_text(json.dumps({"written_by": merge.MARKER}))
    (folder / "x").write_text("keep me")
    return folder


def snapshot(*folders: Path) -> dict:
    """Every file and folder under `folders`: a file's size and modification time (a folder's own
    time changes with a temporary folder made and removed again, which leaves nothing behind)."""
    return {str(p): (p.lstat().st_size, p.lstat().st_mtime_ns) if not p.is_dir() else "folder"
            for folder in folders if folder.exists() for p in [folder, *folder.rglob("*")]}


def run_command(name: str, case: Path, flags: list) -> int:
    """A command that reads the case's files, in-process: its exit code."""
    ckpt, out, cpu = str(case / "run" / "checkpoint-2"), ["--output_dir", str(case / "out")], ["--device", "cpu"]
    commands = {
        "resume": (train.main, flags + out + ["--resume_from_checkpoint", ckpt]),
        "resume adapter": (train.main, flags + out + ["--resume_from_checkpoint", ckpt, "--resume_only_model", "true"]),
        "train on": (train.main, flags + out + ["--adapters", ckpt]),
        "infer": (infer.main, ["--adapters", ckpt, *ANSWER]),
        "load": (infer.main, ["--model", str(case / "model"), *ANSWER]),
        "merge": (merge.main, ["--adapters", ckpt, "--output_dir", str(case / "merged2"), *cpu]),
        "merge onto": (merge.main, ["--adapters", ckpt, "--model", str(case / "model"), "--output_dir",
                                    str(case / "merged2"), *cpu]),
        "remerge": (merge.main, ["--adapters", ckpt, "--output_dir", str(case / "merged"), "--exist_ok", *cpu]),
    }
    main, argv = commands[name]
    return main(argv)


# ----------------------------------------------------------------------------------------------
# Mutations


OTHER_VALUES = ["7", 7, 7.5, True, None, [], {}, [1, "x"], {"a": 1}, "text", 0]
PATHS = ["../victim", "../../victim", "../../../victim", "VICTIM", "VICTIM/x", "/", "", ".", "..", "~",
         "checkpoint-1/../../../victim", "model-00001-of-00003.safetensors/..", "/dev/null"]
KINDS = ["type", "type", "delete", "delete", "huge", "negative", "nan", "path", "path", "cut", "bom", "empty",
         "not an object"]


def pick(value, rng, depth=0):
    """A place in a JSON value, as (the container, its key or index); descends now and then."""
    keys = list(value) if isinstance(value, dict) else list(range(len(value)))
    key = rng.choice(keys)
    inner = value[key]
    if depth < 2 and isinstance(inner, (dict, list)) and inner and rng.random() < 0.35:
        return pick(inner, rng, depth + 1)
    return value, key


def new_value(kind: str, old, rng, victim: Path):
    if kind == "type":
        return rng.choice([v for v in OTHER_VALUES if type(v) is not type(old)])
    if kind == "huge":
        return rng.choice([10**30, 1e308, 2**63, 10**7, 2**31])
    if kind == "negative":
        return rng.choice([-1, -10**9, -0.5, -(2**63)])
    if kind == "nan":
        return rng.choice([math.nan, math.inf, -math.inf])
    return rng.choice(PATHS).replace("VICTIM", str(victim))


def mutate(text: str, rng: random.Random, victim: Path) -> tuple[str, str]:
    """`text` (a JSON object) mutated one way: (the new text, what was done)."""
    kind = rng.choice(KINDS)
    if kind == "cut":
        n = rng.randrange(len(text))
        return text[:n], f"cut to its first {n} characters"
    if kind == "bom":
        return "\ufeff" + text, "a UTF-8 BOM put in front"
    if kind == "empty":
        return "", "emptied"
    if kind == "not an object":
        value = rng.choice([[], [1, 2], "text", 7, None, True])
        return json.dumps(value), f"replaced by {json.dumps(value)}"
    value = json.loads(text)
    container, key = pick(value, rng)
    if kind == "delete":
        del container[key]
        return json.dumps(value), f"{key!r} deleted"
    container[key] = new_value(kind, container[key], rng, victim)
    return json.dumps(value), f"{key!r} set to {json.dumps(container[key])[:80]}"


# ----------------------------------------------------------------------------------------------
# One case


def prepare(tmp_path: Path, built) -> tuple[Path, Path]:
    """A copy of the built folders as case/, and a victim/ beside it."""
    root, _ = built
    case = tmp_path / "case"
    case.mkdir()
    for name in ("run", "model", "merged"):
        shutil.copytree(root / name, case / name)
    return case, make_victim(tmp_path / "victim")


def check_case(case: Path, victim: Path, built, command: str, what: str, capsys, monkeypatch):
    """Run `command` in `case` (its current folder: relative paths stay near it) and check every rule."""
    root, flags = built
    monkeypatch.chdir(case)
    outside = [victim, root, Path(os.environ["QWEN_LORA_HOME"])]
    before, inside = snapshot(*outside), snapshot(case)
    capsys.readouterr()
    try:
        code = run_command(command, case, flags)
    except BaseException:  # noqa: B036 (SystemExit and KeyboardInterrupt escaping main() are bugs too)
        pytest.fail(f"{what}: an exception escaped main():\n{traceback.format_exc()}")
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err, f"{what}: printed a traceback:\n{err}"
    assert code in EXIT_CODES, f"{what}: exit code {code}, which README does not document\n{err}"
    assert code != 2 or "error: " in err, f"{what}: exit 2 without an error paragraph\n{err}"
    assert code != 2 or snapshot(case) == inside, f"{what}: refused, but wrote into {case}:\n{err}"
    assert snapshot(*outside) == before, f"{what}: changed files outside {case}\n{err}"
    return code, err


@pytest.mark.parametrize("command", sorted({c for _, _, commands in TARGETS for c in commands}))
def test_each_command_runs_on_the_files_as_written(tmp_path, built, command, capsys, monkeypatch):
    """The harness itself: unmutated, every command succeeds, so a refusal below is the mutation's."""
    case, victim = prepare(tmp_path, built)
    assert check_case(case, victim, built, command, f"{command} unmutated", capsys, monkeypatch)[0] == 0


@pytest.mark.parametrize("seed", range(FIRST, FIRST + CASES), ids=lambda s: f"seed_{s}")
def test_fuzz_a_state_file_never_ends_in_a_traceback_or_a_write_outside(tmp_path, built, seed, capsys, monkeypatch):
    rng = random.Random(seed)
    name, where, commands = TARGETS[seed % len(TARGETS)]
    command = commands[seed // len(TARGETS) % len(commands)]
    case, victim = prepare(tmp_path, built)
    path = case / where
    if name == "ms-swift args.json":
        path.write_text(json.dumps(SWIFT_ARGS, ensure_ascii=False))
    text, done = mutate(path.read_text(encoding="utf-8"), rng, victim)
    path.write_text(text, encoding="utf-8")
    check_case(case, victim, built, command, f"seed {seed}: {name} {done}, then {command}", capsys, monkeypatch)


# ----------------------------------------------------------------------------------------------
# What fuzzing found: each a traceback or a silently different run before


def without(key):
    return lambda d: {k: v for k, v in d.items() if k != key}


def setting(**fields):
    return lambda d: {**d, **fields}


FOUND = [  # (id, command, {file: the edit of its JSON value}, what the one paragraph says); before: what happened
    ("epoch-deleted", "resume", {"trainer_state.json": without("epoch")}, '"epoch" holds nothing, where'),  # KeyError
    ("best-deleted", "resume", {"trainer_state.json": without("best_checkpoint")},  # KeyError
     '"best_checkpoint" holds nothing, where'),
    ("step-past-int64", "resume", {"trainer_state.json": setting(global_step=10**30)},  # TensorBoard's ValueError
     '"global_step" holds 1000000000000000000000000000000, where'),
    ("place-past-the-epoch", "resume", {"trainer_state.json": setting(step_in_epoch=100)},  # trained [98/4] steps
     '"step_in_epoch" holds 100, but an epoch of this run has 6 steps'),
    ("step-not-the-folders", "resume", {"trainer_state.json": setting(global_step=1)},  # went on from step 1
     '"global_step" holds 1, but the folder is checkpoint-2'),
    ("adapter-only-step-deleted", "resume adapter", {"trainer_state.json": without("global_step")},  # from step 0
     '"global_step" holds nothing, where a trainer_state.json holds a whole number of steps'),
    ("args-strings-multiplied", "resume", {"args.json": setting(gradient_accumulation_steps="1", world_size="2")},
     '"gradient_accumulation_steps" is "1", but it must be a whole number of 1 or more'),  # "1" * "2": TypeError
    ("merge-dtype-unknown", "merge", {"args.json": setting(torch_dtype="float8")},  # merged in the base's dtype
     '"torch_dtype" is "float8", but it must be bfloat16, float16 or float32'),
    ("alpha-infinite", "infer", {"adapter_config.json": setting(lora_alpha=math.inf)},  # NaN logits: RuntimeError
     '"lora_alpha" is Infinity, but it must be a number over 0, at most 65536'),
    ("rank-past-int64", "merge", {"adapter_config.json": setting(r=10**30)},  # torch.empty's TypeError
     '"r" is 1000000000000000000000000000000, but it must be a whole number from 1 to 65536'),
    ("rank-not-the-weights", "infer", {"adapter_config.json": setting(r=16)},  # refused once layers of r 16 were built
     "says r 16, but adapter_model.safetensors holds LoRA weights of rank 8"),
    ("base-a-number", "infer", {"args.json": without("model"), "adapter_config.json": setting(base_model_name_or_path=5)},
     '"base_model_name_or_path" is 5, but it must be a model id or folder'),  # Path(5): TypeError
    ("eps-negative", "load", {"config.json": setting(rms_norm_eps=-1)},  # NaN logits: RuntimeError
     '"rms_norm_eps" is -1, but it must be a number over 0 and under 1'),
    ("heads-null", "merge onto", {"config.json": setting(num_attention_heads=None)},  # Config(...)'s TypeError
     "lacks the key(s) num_attention_heads"),
    ("model-type-a-list", "load", {"config.json": setting(model_type=["qwen2"])},  # unhashable: TypeError
     '"model_type" is ["qwen2"], but it must be a model type'),
    ("rope-a-number", "load", {"config.json": setting(rope_scaling=5)},  # AttributeError
     '"rope_scaling" is 5, but it must be an object'),
    ("tied-a-string", "load", {"config.json": setting(tie_word_embeddings="false")},  # read as true
     '"tie_word_embeddings" is "false", but it must be true or false'),
    ("penalty-past-int64", "load", {"generation_config.json": setting(repetition_penalty=10**30)},  # OverflowError
     '"repetition_penalty" is 1000000000000000000000000000000, but it must be a number over 0, at most 100'),
    ("generation-copied-broken", "merge onto", {"generation_config.json": setting(top_p=5)},  # into the merged folder
     '"top_p" is 5, but it must be a number over 0, at most 1'),
    ("template-a-number", "load", {"tokenizer_config.json": setting(chat_template=5)},  # the model type's, silently
     '"chat_template" is 5, but it must be a text'),
    ("shard-the-parent", "load", {"model.safetensors.index.json": lambda d: {**d, "weight_map": {k: ".." for k in d["weight_map"]}}},
     "names shard(s) outside"),  # "not a readable safetensors file", the model folder
    ("merge-info-cut", "remerge", {"merge_info.json": lambda d: json.dumps(d)[:20]},  # "has no merge_info.json"
     "merge_info.json is not valid JSON"),
]


@pytest.mark.parametrize("command,edits,says", [pytest.param(*case[1:], id=case[0]) for case in FOUND])
def test_the_state_file_bugs_fuzzing_found_stay_fixed(tmp_path, built, command, edits, says, capsys, monkeypatch):
    case, victim = prepare(tmp_path, built)
    for name, edit in edits.items():
        path = case / next(where for n, where, _ in TARGETS if n == name)
        value = edit(json.loads(path.read_text()))
        path.write_text(value if isinstance(value, str) else json.dumps(value))
    code, err = check_case(case, victim, built, command, f"{', '.join(edits)} edited, then {command}", capsys, monkeypatch)
    assert code == 2 and says in err, err
