"""train.py end to end on the tiny model: the tutorial's command, learning, resume, Ctrl-C, errors."""

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import runs
import speed
import train
from conftest import lora_for_training, loss_and_gradients, random_rows, single_torch_thread, both_families

ROOT = Path(__file__).resolve().parent.parent

TUTORIAL = ("--model tiny --train_type lora --dataset {data} --torch_dtype bfloat16 --num_train_epochs 10 "
            "--per_device_train_batch_size 1 --per_device_eval_batch_size 1 --learning_rate 1e-4 --lora_rank 8 "
            "--lora_alpha 32 --target_modules all-linear --gradient_accumulation_steps 16 --eval_steps 50 "
            "--save_steps 50 --save_total_limit 2 --logging_steps 5 --max_length 2048 --output_dir {out} "
            "--system 'You are a helpful assistant.' --warmup_ratio 0.05 --dataloader_num_workers 4 "
            "--model_author swift --model_name swift-robot")

QA = [("你是谁？", "我是小黄，由魔搭开发。"), ("Who are you?", "I am Xiao Huang, made by ModelScope."),
      ("你能上网吗？", "不能，我无法上网。"), ("Are you ChatGPT?", "No, I am Xiao Huang.")]


def write_qa(path, pairs=QA):
    path.write_text(json.dumps([{"query": q, "response": r} for q, r in pairs], ensure_ascii=False))
    return path


def run_dir_of(out, resumed=0):
    """The run folder under --output_dir out; after `resumed` resumes (each a new folder, as in ms-swift), the newest."""
    runs = sorted(Path(out).glob("v*-*"), key=lambda p: int(p.name[1:].split("-")[0]))
    assert len(runs) == 1 + resumed, runs
    return runs[-1]


def adapter(ckpt):
    return load_file(Path(ckpt) / "adapter_model.safetensors")


def base_args(data, out, *extra):
    # One micro-batch a step unless a test says otherwise (ms-swift's default would be 16).
    return ["--model", "tiny", "--dataset", str(data), "--output_dir", str(out), "--torch_dtype", "float32",
            "--device", "cpu", "--logging_steps", "1", "--gradient_accumulation_steps", "1", *map(str, extra)]


def test_tutorial_command_runs_and_writes_the_run_folder(tmp_path, tiny_dir):
    import shlex
    argv = shlex.split(TUTORIAL.format(data=ROOT / "data" / "self_cognition.json", out=tmp_path / "output"))
    argv += ["--max_steps", "3", "--split_dataset_ratio", "0.05", "--eval_steps", "2", "--save_steps", "1"]
    assert train.main(argv) == 0
    run = run_dir_of(tmp_path / "output")
    assert run.name.startswith("v0-")
    args = json.loads((run / "args.json").read_text())
    assert args["model"] == "tiny" and args["system"] == "You are a helpful assistant."
    assert (args["model_type"], args["template"]) == ("qwen2", "qwen2_5")  # what swift infer --adapters reads
    log = [json.loads(l) for l in (run / "logging.jsonl").read_text().splitlines()]
    train_entries = [e for e in log if "loss" in e]
    assert {"step", "epoch", "loss", "learning_rate", "grad_norm", "tokens_per_s", "elapsed", "remaining"} <= set(train_entries[-1])
    assert [e["step"] for e in log if "eval_loss" in e] == [2, 3]
    assert (run / "images" / "loss.svg").read_text().startswith("<svg")
    # save_total_limit 2 keeps the best by eval loss and the last (here: the two newest)
    ckpts = sorted(p.name for p in run.glob("checkpoint-*"))
    state = json.loads((run / "checkpoint-3" / "trainer_state.json").read_text())
    assert ckpts == ["checkpoint-2", "checkpoint-3"] and state["best_checkpoint"] in ckpts
    for f in ("adapter_config.json", "adapter_model.safetensors", "args.json", "optimizer.pt", "rng_state.pt", "trainer_state.json"):
        assert (run / "checkpoint-3" / f).exists(), f
    cfg = json.loads((run / "checkpoint-3" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["peft_type"]) == (8, 32, "LORA")
    assert adapter(run / "checkpoint-3")["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].dtype == torch.float32


def test_tiny_model_learns_self_cognition_answers_exactly(tmp_path, tiny_dir):
    from decode import generate
    import data
    import lora
    import model as modeling

    data_file = write_qa(tmp_path / "qa.json")
    argv = base_args(data_file, tmp_path / "out", "--num_train_epochs", 60, "--per_device_train_batch_size", 4,
                     "--learning_rate", 5e-3, "--lora_rank", 16, "--lora_alpha", 32, "--lora_dropout", 0,
                     "--gradient_checkpointing", "false", "--save_steps", 1000, "--logging_steps", 20)
    assert train.main(argv) == 0
    ckpt = sorted(run_dir_of(tmp_path / "out").glob("checkpoint-*"))[-1]
    m, d = modeling.load_model(str(tiny_dir), dtype=torch.float32)
    tok = data.Tokenizer(d)
    lora.load_adapter(m, ckpt)
    for q, a in QA:
        ids, _ = data.encode_chat(tok, [{"role": "user", "content": q}], add_generation_prompt=True)
        out = list(generate(m, ids, 40, {tok.im_end_id}))
        assert tok.decode(out, skip_special_tokens=True) == a


def train_args(data_file, out, steps=6, save_steps=3, *extra):
    # dropout on, so the restored random state matters; 2 epochs of 3 steps, so resume crosses an epoch
    return base_args(data_file, out, "--max_steps", steps, "--save_steps", save_steps, "--per_device_train_batch_size", 1,
                     "--gradient_accumulation_steps", 2, "--learning_rate", 1e-3, "--lora_dropout", 0.1,
                     "--warmup_ratio", 0.2, *extra)


@both_families
def test_resumed_run_ends_with_the_same_adapter_bit_for_bit(tmp_path, tiny_dir):
    """Each step's rows run packed (--padding_free true, the default on a GPU): a resume packs the same rows."""
    data_file = write_qa(tmp_path / "qa.json", QA + QA[:1])  # 5 rows, 3 steps per epoch
    assert train.main(train_args(data_file, tmp_path / "a", 6, 2, "--padding_free", "true")) == 0
    run = run_dir_of(tmp_path / "a")
    full = adapter(run / "checkpoint-6")
    (run / "checkpoint-6" / "adapter_model.safetensors").unlink()
    # resume mid-epoch from step 4 (of 6): a new run folder, with its own checkpoint-6
    assert train.main(train_args(data_file, tmp_path / "a", 6, 2, "--padding_free", "true",
                                 "--resume_from_checkpoint", run / "checkpoint-4")) == 0
    resumed = adapter(run_dir_of(tmp_path / "a", resumed=1) / "checkpoint-6")
    assert full.keys() == resumed.keys()
    for k in full:
        assert torch.equal(full[k], resumed[k]), k


@pytest.fixture
def one_thread():
    """Bit-for-bit comparisons across processes need one thread: with several, a busy machine can
    change how a float32 sum is split between threads, and so its last bit. Yields the subprocess's env."""
    with single_torch_thread():
        yield dict(os.environ, OMP_NUM_THREADS="1")


def test_ctrl_c_saves_a_resumable_checkpoint(tmp_path, tiny_dir, one_thread):
    """Ctrl-C at step 2 of 12 (10 steps an epoch: the resume crosses into the second epoch)."""
    data_file = write_qa(tmp_path / "qa.json", QA * 5)
    out = tmp_path / "out"
    args = train_args(data_file, out, 12, 1000)
    proc = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=one_thread)
    for line in proc.stdout:
        if line.startswith("[2/12]"):
            proc.send_signal(signal.SIGINT)
            break
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    run = run_dir_of(out)
    ckpts = sorted(run.glob("checkpoint-*"))
    assert len(ckpts) == 1 and "--resume_from_checkpoint" in stdout
    step = json.loads((ckpts[0] / "trainer_state.json").read_text())["global_step"]
    assert 2 <= step < 10
    # resuming reaches the same adapter as a run that was never interrupted
    assert train.main(train_args(data_file, out, 12, 1000, "--resume_from_checkpoint", ckpts[0])) == 0
    assert train.main(train_args(data_file, tmp_path / "ref", 12, 1000)) == 0
    a, b = adapter(run_dir_of(out, resumed=1) / "checkpoint-12"), adapter(run_dir_of(tmp_path / "ref") / "checkpoint-12")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_before_training_starts_is_said_like_ctrl_c(capsys):
    """Before the loop takes over the signals (loading data or the model), SIGTERM killed train.py at
    once with no word (exit -15: tests/soak.py); now it is Ctrl-C's: one line, exit 130."""
    import os
    import time

    import cli

    def loading():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # (the signal arrives here)
        return 0

    before = signal.getsignal(signal.SIGTERM)
    try:
        assert cli.run_main(loading, "interrupted before training started; nothing was written.", term_as_ctrl_c=True) == 130
    finally:
        signal.signal(signal.SIGTERM, before)
    assert "interrupted before training started; nothing was written." in capsys.readouterr().err


def test_sigterm_saves_a_checkpoint_like_ctrl_c(tmp_path, tiny_dir, one_thread):
    """Batch schedulers and containers send SIGTERM before they kill: the step finishes and is saved."""
    data_file = write_qa(tmp_path / "qa.json", QA * 5)
    proc = subprocess.Popen([sys.executable, "train.py", *train_args(data_file, tmp_path / "out", 40, 1000)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=one_thread)
    for line in proc.stdout:
        if line.startswith("[2/40]"):
            proc.send_signal(signal.SIGTERM)
            break
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    (ckpt,) = run_dir_of(tmp_path / "out").glob("checkpoint-*")
    assert 2 <= json.loads((ckpt / "trainer_state.json").read_text())["global_step"] < 40
    assert f"--resume_from_checkpoint {ckpt}" in stdout


def test_crash_during_save_leaves_the_previous_checkpoint_whole(tmp_path, tiny_dir, monkeypatch):
    data_file = write_qa(tmp_path / "qa.json")
    real_save = torch.save

    def dying_save(obj, path, *a, **k):
        if "checkpoint-4" in str(path) and str(path).endswith("rng_state.pt"):
            raise SystemExit("killed mid-save")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(SystemExit):
        train.main(train_args(data_file, tmp_path / "out", 4, 2))
    run = run_dir_of(tmp_path / "out")
    assert [p.name for p in runs.complete_checkpoints(run)] == ["checkpoint-2"]
    assert not (run / "checkpoint-4").exists() and not list(run.glob(".checkpoint-4.tmp-*"))  # removed on the way out
    (run / ".checkpoint-4.tmp-999999999-abcdefgh").mkdir()  # what a kill -9 mid-save leaves (a pid gone)
    monkeypatch.setattr(torch, "save", real_save)
    assert runs.find_resume_checkpoint(str(run)).name == "checkpoint-2"
    assert train.main(train_args(data_file, tmp_path / "out", 4, 2, "--resume_from_checkpoint", run)) == 0
    assert (run_dir_of(tmp_path / "out", resumed=1) / "checkpoint-4" / "trainer_state.json").exists()


def test_save_total_limit_keeps_best_and_newest(tmp_path):
    for s in (10, 20, 30, 40):
        (tmp_path / f"checkpoint-{s}").mkdir()
        (tmp_path / f"checkpoint-{s}" / "trainer_state.json").write_text("{}")
    history = [f"checkpoint-{s}" for s in (10, 20, 30, 40)]
    runs.prune_checkpoints(tmp_path, 2, "checkpoint-20", history)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-20", "checkpoint-40"]
    runs.prune_checkpoints(tmp_path, 1, None, history)
    assert [p.name for p in tmp_path.glob("checkpoint-*")] == ["checkpoint-40"] and history == ["checkpoint-40"]


def test_a_resume_from_an_earlier_step_leaves_the_earlier_run_untouched(tmp_path, tiny_dir, capsys):
    """As ms-swift 4.6 (tests/test_swift_logging.py): resuming checkpoint-2 of a 6-step run with
    --max_steps 3 writes a new run folder under --output_dir; every file of the earlier run stays as it
    was, even with --save_total_limit 1. The new logging.jsonl holds the steps after the checkpoint;
    trainer_state.json the whole history, and elapsed goes on from the checkpoint's."""
    data_file = write_qa(tmp_path / "qa.json")
    assert train.main(train_args(data_file, tmp_path / "out", 6, 2)) == 0
    run = run_dir_of(tmp_path / "out")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    capsys.readouterr()
    args = train_args(data_file, tmp_path / "out", 3, 1, "--save_total_limit", 1, "--resume_from_checkpoint", run / "checkpoint-2")
    assert train.main(args) == 0
    out = capsys.readouterr().out
    new = run_dir_of(tmp_path / "out", resumed=1)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    assert [p.name for p in runs.complete_checkpoints(new)] == ["checkpoint-3"] and f"last checkpoint: {new / 'checkpoint-3'}" in out
    steps = [json.loads(line).get("step") for line in (new / "logging.jsonl").read_text().splitlines()]
    assert steps == [3, 3, None]  # the step, the summary line, and last/best checkpoint
    state = json.loads((new / "checkpoint-3" / "trainer_state.json").read_text())
    assert [e["step"] for e in state["log_history"] if "loss" in e] == [1, 2, 3]
    assert state["checkpoints"] == ["checkpoint-3"] and state["elapsed"] >= json.loads(
        (run / "checkpoint-2" / "trainer_state.json").read_text())["elapsed"]


@pytest.mark.parametrize("flags,needle", [
    (["--lora_alpha", 16], "--lora_alpha 32 -> 16.0"),
    (["--seed", 7], "--seed 42 -> 7"),
    (["--gradient_accumulation_steps", 4], "accumulation_x_ranks 2 -> 4"),
    (["--quant_bits", 4], "--quant_bits None -> 4"),  # a 4-bit base is another base
])
def test_a_resume_that_changes_what_is_trained_is_refused(tmp_path, tiny_dir, capsys, flags, needle):
    data_file = write_qa(tmp_path / "qa.json")
    assert train.main(train_args(data_file, tmp_path / "out", 2, 2)) == 0
    ckpt = run_dir_of(tmp_path / "out") / "checkpoint-2"
    capsys.readouterr()
    args = train_args(data_file, tmp_path / "out", 4, 2, "--resume_from_checkpoint", ckpt, *flags)
    assert train.main(args) == 2
    err = capsys.readouterr().err
    assert needle in err and "--resume_only_model true" in err and "Traceback" not in err
    assert not (ckpt.parent / "checkpoint-4").exists()
    # --resume_only_model: a deliberate change, a new run from the adapter's weights
    assert train.main(args + ["--resume_only_model", "true"]) == 0
    assert len(list((tmp_path / "out").glob("v*-*"))) == 2


def test_incomplete_checkpoints_and_used_folders_are_refused_before_loading(tmp_path, tiny_dir, capsys):
    data_file = write_qa(tmp_path / "qa.json")
    out = tmp_path / "out"
    assert train.main(train_args(data_file, out, 2, 2, "--add_version", "false")) == 0
    capsys.readouterr()
    # a fresh run into a folder that holds a run's checkpoints would mix the two
    assert train.main(train_args(data_file, out, 2, 2, "--add_version", "false")) == 2
    assert "already holds checkpoints" in capsys.readouterr().err
    (out / "checkpoint-2" / "rng_state.pt").rename(out / "checkpoint-2" / "rng_state.pth")  # as ms-swift names it
    assert train.main(train_args(data_file, out, 4, 2, "--add_version", "false", "--resume_from_checkpoint", out)) == 2
    err = capsys.readouterr().err
    assert "cannot be resumed: it has no rng_state.pt" in err and "Traceback" not in err
    (out / "checkpoint-2" / "rng_state.pth").rename(out / "checkpoint-2" / "rng_state.pt")
    # a resume is a new run, and never into the folder of the one it resumes
    assert train.main(train_args(data_file, out, 4, 2, "--add_version", "false", "--resume_from_checkpoint", out)) == 2
    assert "already holds checkpoints" in capsys.readouterr().err
    (out / "checkpoint-2" / "optimizer.pt").write_bytes(b"not a torch file")
    assert train.main(train_args(data_file, out, 4, 2, "--resume_from_checkpoint", out)) == 2
    err = capsys.readouterr().err
    assert "cannot be resumed" in err and "Traceback" not in err


def test_layers_are_compiled_by_default_only_where_it_pays_back():
    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    unset = speed.PlanFlags()
    # On a GPU: CUDA graphs of eager micro-batches, never compiled unless asked (any number of ranks).
    assert speed.use_compile(unset, gpu, 10**6, 1) == (False, "")
    # Without those graphs (--cuda_graph false): only where compiling pays back.
    no_graphs = speed.PlanFlags(cuda_graph=False)
    compiled, why = speed.use_compile(no_graphs, gpu, 192, 3)  # the self-cognition demo: 12 steps x 16
    assert not compiled and "192 micro-batches over 3 sequence lengths, 64 a length" in why
    assert "--torch_compile true compiles anyway" in why
    compiled, why = speed.use_compile(no_graphs, gpu, 20 * speed.COMPILE_PAYS_BACK, 20)
    assert compiled and "--torch_compile false" in why
    assert speed.use_compile(unset, cpu, 10**6, 1) == (False, "")
    for flag in (True, False):
        assert speed.use_compile(speed.PlanFlags(torch_compile=flag), gpu, 10, 3) == (flag, "")


def test_the_plan_says_how_the_layers_run():
    """speed.plan_training: graphs on a GPU by default, in one process or several (gradients are
    summed after the recorded micro-batches, outside the graphs); eager on the CPU."""
    a = speed.PlanFlags(max_length=2048)
    plan = speed.plan_training(a, torch.device("cuda"), [40, 100, 70], 192)
    assert plan.graphs and not plan.compiled and plan.pad_to == 64
    assert "here at most 2 lengths (64, 128)" in plan.message and "--cuda_graph false" in plan.message
    plan = speed.plan_training(a, torch.device("cpu"), [40, 100, 70], 192)
    assert not plan.graphs and not plan.compiled and plan.pad_to == 1
    assert plan.message.startswith("each micro-batch runs as it is: packing a step's rows (--padding_free true)")


def test_the_plan_keeps_an_untied_embedding_in_host_memory_on_a_gpu():
    """speed.use_host_embedding: on a GPU, for a model with an lm_head of its own (Qwen2.5-7B and up);
    not for a tied one (0.5B to 3B: the loss multiplies by it on the GPU), nor on the CPU."""
    import dataclasses
    import model as modeling
    a = speed.PlanFlags(max_length=2048, activation_cpu_offload=False)
    seven = modeling.Config(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                            num_attention_heads=28, num_key_value_heads=4)
    plan = speed.plan_training(a, torch.device("cuda"), [40, 100], 192, seven)
    assert plan.host_embedding and "input embedding (152,064 x 3,584, 1.02 GiB in bf16) stays in host memory" in plan.message
    tied = dataclasses.replace(seven, tie_word_embeddings=True)
    assert not speed.plan_training(a, torch.device("cuda"), [40, 100], 192, tied).host_embedding
    assert not speed.plan_training(a, torch.device("cpu"), [40, 100], 192, seven).host_embedding


def test_host_embedding_trains_like_the_embedding_on_the_gpu(tiny_dir):
    """speed.HostEmbedding: batches bring their rows of a table kept in host memory (make_batch's
    embed), and the loss and LoRA gradients are the plain path's, dropout included; a call with ids
    where the model runs (evaluation, sample answers) gives the same rows."""
    import lora
    import model as modeling
    m, _ = modeling.load_model(str(tiny_dir), dtype=torch.float32)
    m.lm_head.weight = torch.nn.Parameter(m.model.embed_tokens.weight.detach().clone())  # untied, as the 7B
    lora_for_training(m, lora.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1), b_std=0.02, seed=1)
    rows = random_rows([30, 17, 45])
    plain = train.make_batch(rows, 0, "cpu")
    want_loss, want = loss_and_gradients(m, plain, None, seed=3)
    embed = speed.TrainingPlan(host_embedding=True).embedding(m)
    assert isinstance(embed, speed.HostEmbedding) and m.model.embed_tokens is embed
    hosted = train.make_batch(rows, 0, "cpu", embed=embed)
    assert hosted["inputs_embeds"].shape == (3, 45, m.config.hidden_size)
    assert torch.equal(m.model.embed_tokens(plain["input_ids"]), hosted["inputs_embeds"])
    m.model.embed_tokens.forward = lambda ids: pytest.fail("a training batch looked its rows up again")
    loss, got = loss_and_gradients(m, hosted, None, seed=3)
    assert torch.equal(loss, want_loss)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=0)


def test_fixed_shape_batches_give_the_same_loss(tiny_dir):
    """For CUDA graphs the loss reads every position (speed.every_position); the unlabelled ones
    add nothing, so the loss is that of the labelled positions alone."""
    import model as modeling
    m, _ = modeling.load_model(str(tiny_dir), dtype=torch.float32)
    loss_fn = train.CausalLMLoss(m)
    rows = [{"input_ids": list(range(5, 17)), "labels": [-100] * 6 + list(range(11, 17))},
            {"input_ids": list(range(30, 37)), "labels": [-100] * 3 + list(range(33, 37))}]
    exact = train.make_batch(rows, 0, "cpu", pad_to=8)
    fixed = dict(exact, label_positions=speed.every_position(2, 16))
    assert exact["label_positions"].tolist() == [5, 6, 7, 8, 9, 10, 18, 19, 20, 21]
    assert fixed["label_positions"].tolist() == [t for b in (0, 16) for t in range(b, b + 15)]  # (2, 16): all but each row's last
    with torch.no_grad():
        torch.testing.assert_close(loss_fn(**fixed), loss_fn(**exact))


def test_compiled_layers_train_padded_batches_like_the_eager_ones(tmp_path, tiny_dir, capsys, without_inductor):
    """--torch_compile true (on a GPU the default for long runs; here traced, without inductor's C++ code):
    batches padded to a multiple of 64 tokens, one compile per length, announced at the start; the
    adapter matches eager training. The steps run
    packed (--padding_free true, the default on a GPU), so packed rows train through compiled layers too."""
    data = write_qa(tmp_path / "qa.json", QA + [("讲一个很长的故事" * 12, "从前有座山，山里有座庙。" * 12)])
    adapters = []
    for compiled in ("false", "true"):
        out = tmp_path / compiled
        assert train.main(base_args(data, out, "--torch_compile", compiled, "--max_steps", 3, "--padding_free", "true",
                                    "--per_device_train_batch_size", 2, "--lora_dropout", 0, "--seed", 3)) == 0
        adapters.append(load_file(run_dir_of(out) / "checkpoint-3" / "adapter_model.safetensors"))
    log = capsys.readouterr().out
    assert ("compiled layers: batches are padded to multiples of 64 tokens, here at most 32 lengths "
            "(64, 128, 192, 256, 320, 384, 448, 512, ...); each is compiled the first time it comes") in log
    for k in adapters[0]:
        torch.testing.assert_close(adapters[1][k], adapters[0][k], rtol=1e-4, atol=1e-6)


def test_nan_loss_stops_with_a_message_keeping_the_last_good_checkpoint(tmp_path, tiny_dir, capsys):
    data_file = write_qa(tmp_path / "qa.json")
    code = train.main(base_args(data_file, tmp_path / "out", "--max_steps", 20, "--save_steps", 1,
                                "--learning_rate", 1e30, "--max_grad_norm", 0, "--lora_dropout", 0,
                                "--weight_decay", 0))
    err = capsys.readouterr().err
    assert code == 1
    import re
    step = int(re.search(r"the loss became \S+ at step (\d+)", err).group(1))
    run = run_dir_of(tmp_path / "out")
    saved = [int(p.name.split("-")[1]) for p in runs.complete_checkpoints(run)]
    # The checkpoint of the step before holds the weights that gave the bad loss (issue 34: resuming it met
    # NaN again): the one named is older, the newest whose next step was finite.
    assert saved[-1] == step - 1
    named = max((s for s in saved if s <= step - 2), default=None)
    assert f"is {run / f'checkpoint-{named}'}. Lower" in err if named else "is (none). Lower" in err
    if named:
        assert all(torch.isfinite(t).all() for t in adapter(run / f"checkpoint-{named}").values())


def test_batches_drop_the_mask_only_where_causal_attention_alone_is_exact(tiny_dir):
    """Right padding needs no attention mask (causal attention never looks ahead), so make_batch
    drops it and the loss is unchanged; packed rows keep their segment ids."""
    import data
    import lora
    import model as modeling
    m, folder = modeling.load_model(str(tiny_dir), dtype=torch.float32)
    lora.add_adapter(m, lora.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    tok = data.Tokenizer(folder)
    convs = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in QA]
    rows = data.encode_dataset(tok, convs, 2048, "delete")
    batch = train.make_batch(rows, tok.endoftext_id, "cpu", pad_to=64)
    longest = max(len(r["input_ids"]) for r in rows)
    assert "attention_mask" not in batch and batch["input_ids"].shape == (len(QA), -(-longest // 64) * 64)
    masked = {k: v for k, v in data.collate(rows, tok.endoftext_id).items()}  # unpadded, with the mask
    loss = train.CausalLMLoss(m).eval()
    with torch.no_grad():
        torch.testing.assert_close(loss(**batch), loss(**masked), rtol=1e-5, atol=1e-5)
    packed = train.make_batch(data.pack(rows, 256), tok.endoftext_id, "cpu")
    assert packed["attention_mask"].max() > 1  # segment ids survive
    one = train.make_batch(data.pack(rows, 1024), tok.endoftext_id, "cpu")  # one row: where each sample starts
    assert "attention_mask" not in one and one["cu_seqlens"][len(QA)] == one["input_ids"].shape[1]


def test_loss_is_the_summed_cross_entropy_of_the_labelled_next_tokens(tiny_dir):
    import model as modeling
    m, _ = modeling.load_model(str(tiny_dir), dtype=torch.float32)
    ids = torch.randint(0, 500, (2, 9), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt
    labels[1, 6:] = -100  # padding
    # position t predicts token t + 1: flat positions b * 9 + t with labels[b, t + 1] set
    assert train.label_positions_of(labels).tolist() == [3, 4, 5, 6, 7] + [9 + t for t in range(5)]
    with torch.no_grad():
        logits = m(ids)[:, :-1]
        expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), reduction="sum")
        torch.testing.assert_close(train.CausalLMLoss(m)(ids, labels), expected)


def test_lr_schedule_warmup_then_cosine():
    lrs = [train.lr_at(s, 10, 2, 1.0, "cosine") for s in range(10)]
    assert lrs[:3] == [0.0, 0.5, 1.0] and lrs[-1] < 0.05
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))
    assert train.lr_at(5, 10, 0, 1.0, "linear") == 0.5
    assert train.lr_at(9, 10, 2, 1.0, "constant_with_warmup") == 1.0


@pytest.mark.parametrize("flags,needle", [
    (["--lora_rank", "0"], "--lora_rank must be at least 1"),
    (["--train_type", "full"], "only 'lora' is supported"),
    (["--warmup_ratio", "1.5"], "--warmup_ratio must be in [0, 1)"),
    (["--torch_dtype", "bf32"], "--torch_dtype 'bf32'"),
    (["--model_name", "a", "b", "c"], "--model_name takes one value"),
    (["--dataset", "nope.json"], "nope.json does not exist."),
    (["--dataset", "self_cognition.json"], "self_cognition.json does not exist. This project ships it: pass --dataset "),
    (["--dataset", "x.json#abc"], "#abc"),
    (["--model", "/no/such/model"], "no such folder"),
    (["--device", "tpu"], "--device tpu"),
    (["--cuda_graph", "true"], "--cuda_graph true needs a GPU"),
    (["--cuda_graph", "true", "--torch_compile", "false"], "--cuda_graph true needs a GPU"),
    (["--system", "a\udcffb"], "not UTF-8 text"),  # a byte that is not UTF-8 on the command line
])
def test_bad_flags_stop_before_training(tmp_path, tiny_dir, capsys, flags, needle):
    data_file = write_qa(tmp_path / "qa.json")
    args = base_args(data_file, tmp_path / "out") + flags
    assert train.main(args) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # nothing written


def test_an_output_folder_that_cannot_be_written_stops_before_loading(tmp_path, tiny_dir, capsys):
    data_file = write_qa(tmp_path / "qa.json")
    assert train.main(base_args(data_file, tmp_path / "qa.json" / "out")) == 2
    err = capsys.readouterr().err
    assert f"{data_file} is a file, not a folder" in err and "Traceback" not in err


def test_flag_typo_is_an_argparse_error(tmp_path):
    r = subprocess.run([sys.executable, "train.py", "--model", "tiny", "--dataset", "x.json", "--lora_rnak", "8"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    # One paragraph, not argparse's usage text: the flag, the nearest real one, where the list is.
    assert r.stderr.strip() == ("error: unrecognized arguments: --lora_rnak 8 (did you mean --lora_rank?). "
                                "See python train.py --help for every flag.")


@pytest.mark.parametrize("content,needle", [
    ("[{\"query\": \"hi\", \"response\": \"yo\"}, ", "invalid JSON at line 1"),
    ("[{\"question\": \"hi\"}]", "row 1"),
    ("[]", "empty"),
    ("[{\"query\": \"{{NAME}}?\", \"response\": \"I am {{NAME}}\"}]", "--model_name"),
])
def test_bad_data_stops_before_training(tmp_path, tiny_dir, capsys, content, needle):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    assert train.main(base_args(bad, tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert needle in err and str(bad) in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU: run on the GPU machine")


@cuda_only
@both_families
def test_cuda_graph_micro_batches_give_the_eager_gradients(tiny_dir):
    """Replayed micro-batches give eager's loss and gradients bit for bit, with dropout and gradient
    checkpointing: the same seed draws the same masks, and the recomputation draws the forward's."""
    import lora
    import model as modeling
    with torch.cuda.stream(torch.cuda.Stream()):  # as train.py: graphs are recorded off the default stream
        m, _ = modeling.load_model(str(tiny_dir), dtype=torch.float32, device="cuda")
        lora_for_training(m, lora.LoraConfig(lora_dropout=0.3), 0.02)  # B = 0: blind to the dropout masks
        params = lora.lora_parameters(m)
        for p in params:
            p.grad = torch.zeros_like(p)
        loss_fn = train.CausalLMLoss(m)
        graphed = speed.CUDAGraphMicroBatches(loss_fn, params)
        g = torch.Generator().manual_seed(0)
        lengths = [20, 40, 90, 30, 100, 50]  # padded: 64, 64, 128, 64, 128, 64
        for k, n in enumerate(lengths):
            ids = torch.randint(10, 900, (n,), generator=g).tolist()
            row = {"input_ids": ids, "labels": [-100] * (n // 2) + ids[n // 2:]}
            batch = train.make_batch([row], 0, "cuda", pad_to=64)
            scale = 1 / train.label_tokens(row)
            torch.cuda.manual_seed(k)
            # as the graph reads it: every position (the same sum, in the same order)
            ref_loss = loss_fn(**dict(batch, label_positions=speed.every_position(1, batch["labels"].shape[1], "cuda")))
            ref = torch.autograd.grad(ref_loss, params, grad_outputs=torch.full((), scale, device="cuda"))
            for p in params:
                p.grad.zero_()
            torch.cuda.manual_seed(k)
            loss = graphed(batch, scale).clone()
            assert torch.equal(loss, ref_loss.detach()), (k, loss, ref_loss)
            assert all(torch.equal(p.grad, r) for p, r in zip(params, ref)), k
        assert sorted(dict(key)["input_ids"] for key in graphed.graphs) == [(1, 64), (1, 128)]  # one graph a shape
        inputs = {dict(key)["input_ids"]: g[1] for key, g in graphed.graphs.items()}
        # The later, larger shape's inputs sit at the front of the shared buffers (the 64-token one keeps the old ones).
        assert inputs[(1, 128)]["input_ids"].data_ptr() == graphed.buffers["input_ids"].data_ptr()
        # Without reseeding, each replay draws fresh masks.
        grads = []
        for _ in range(2):
            for p in params:
                p.grad.zero_()
            graphed(batch, scale)
            grads.append(torch.cat([p.grad.flatten() for p in params]))
        assert not torch.equal(grads[0], grads[1])


@cuda_only
def test_train_with_cuda_graphs_on_a_gpu(tmp_path, tiny_dir, capsys):
    """train.py on a GPU replays micro-batches by default, with the losses of --cuda_graph false."""
    data_file = ROOT / "data" / "self_cognition.json"
    common = ["--model", "tiny", "--dataset", str(data_file), "--torch_dtype", "float32", "--device", "cuda",
              "--lora_dropout", "0", "--max_steps", "3", "--gradient_accumulation_steps", "8", "--logging_steps", "1",
              "--model_name", "小黄", "Xiao Huang", "--model_author", "魔搭", "ModelScope"]
    losses = {}
    for name, extra in (("graphs", []), ("eager", ["--cuda_graph", "false"])):
        assert train.main(common + ["--output_dir", str(tmp_path / name)] + extra) == 0
        out = capsys.readouterr().out
        assert ("CUDA graphs of fused layers: each micro-batch shape" in out) == (name == "graphs")
        log = (run_dir_of(tmp_path / name) / "logging.jsonl").read_text().splitlines()
        losses[name] = [json.loads(line)["loss"] for line in log if '"loss"' in line]
    assert len(losses["graphs"]) == 3
    torch.testing.assert_close(losses["graphs"], losses["eager"], rtol=1e-4, atol=0)


def test_a_failed_cuda_graph_recording_is_a_clear_error(tiny_dir, monkeypatch):
    """Should recording ever fail, the user gets the way out (--cuda_graph false), not a traceback.
    Faked on the CPU: the eager micro-batch runs, then the recording raises as CUDA would."""
    import contextlib

    import lora
    import model as modeling

    @contextlib.contextmanager
    def failing_graph(*args, **kwargs):
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore")
        yield

    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: None)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: None)
    monkeypatch.setattr(torch.cuda, "graph", failing_graph)
    m, _ = modeling.load_model(str(tiny_dir), dtype=torch.float32)
    lora.add_adapter(m, lora.LoraConfig())
    params = lora.lora_parameters(m)
    for p in params:
        p.grad = torch.zeros_like(p)
    graphed = speed.CUDAGraphMicroBatches(train.CausalLMLoss(m), params)
    row = {"input_ids": list(range(5, 25)), "labels": [-100] * 10 + list(range(15, 25))}
    batch = train.make_batch([row], 0, "cpu", pad_to=64)
    with pytest.raises(modeling.ModelError, match=r"1 x 64 tokens as a CUDA graph failed \(CUDA error: operation not permitted when stream is capturing\)\. Run again with --cuda_graph false"):
        graphed(batch, 0.1)
    assert any(p.grad.abs().sum() > 0 for p in params)  # the eager micro-batch before it did run


def test_loss_scale_skips_overflowed_steps_and_grows_back():
    scale = train.LossScale(enabled=True, value=8.0, growth_interval=3)
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([8.0, 16.0])
    scale.unscale([p])
    assert p.grad.tolist() == [1.0, 2.0]
    assert scale.update(torch.tensor(float("inf"))) is False and scale.value == 4.0  # overflow: skip, halve
    assert scale.update(torch.tensor(float("nan"))) is False and scale.value == 2.0
    assert all(scale.update(torch.tensor(1.0)) for _ in range(2)) and scale.value == 2.0
    assert scale.update(torch.tensor(1.0)) and scale.value == 4.0  # 3 good steps in a row: double
    off = train.LossScale(enabled=False)
    p.grad = torch.tensor([8.0, 16.0])
    off.unscale([p])
    assert off.value == 1.0 and p.grad.tolist() == [8.0, 16.0] and off.update(torch.tensor(float("inf")))


def test_float16_training_scales_the_loss(tmp_path, tiny_dir, capsys, monkeypatch):
    """--torch_dtype float16: small gradients survive the float16 activations (scaled, then divided
    back), the scale is logged and resumed, and a step whose gradients overflow is skipped."""
    import model as modeling
    # Why: a gradient as small as a long step's (3e-6 of the tiny model's) comes out 16% off in
    # float16 unscaled; scaled by 2**16 it is within 0.1% of float32.
    row = {"input_ids": list(range(5, 60)), "labels": [-100] * 20 + list(range(25, 60))}
    batch = train.make_batch([row], 0, "cpu")

    def grads(dtype, scale):
        import lora
        m, _ = modeling.load_model(str(tiny_dir), dtype=dtype)
        torch.manual_seed(0)
        lora.add_adapter(m, lora.LoraConfig(lora_dropout=0.0))
        with torch.no_grad():
            for name, p in m.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
        loss = train.CausalLMLoss(m)(**batch)
        g = torch.autograd.grad(loss, lora.lora_parameters(m), grad_outputs=torch.tensor(3e-6 * scale))
        return torch.cat([x.flatten() for x in g]) / scale

    ref = grads(torch.float32, 1.0)
    rel = {s: ((grads(torch.float16, s) - ref).norm() / ref.norm()).item() for s in (1.0, 2.0**16)}
    assert rel[2.0**16] < 0.01 and rel[1.0] > 0.1, rel

    data = ROOT / "data" / "self_cognition.json"  # 2 rows a step: float16 matmuls are slow on the CPU
    args = base_args(data, tmp_path / "out", "--torch_dtype", "float16", "--max_steps", 3, "--per_device_train_batch_size", 2,
                     "--model_name", "小黄", "--model_author", "魔搭")
    assert train.main(args) == 0
    run = run_dir_of(tmp_path / "out")
    log = [e for line in (run / "logging.jsonl").read_text().splitlines() if "loss" in (e := json.loads(line))]
    assert [e["loss_scale"] for e in log] == [65536.0] * 3 and all(math.isfinite(e["loss"]) for e in log)
    assert json.loads((run / "checkpoint-3" / "trainer_state.json").read_text())["loss_scale"] == 65536.0

    # A scale so large that the float16 gradients overflow: every step is skipped and says so.
    class Huge(train.LossScale):
        def __init__(self, enabled):
            super().__init__(enabled, value=2.0**40)

    monkeypatch.setattr(train, "LossScale", Huge)
    capsys.readouterr()
    args = base_args(data, tmp_path / "huge", "--torch_dtype", "float16", "--max_steps", 2, "--per_device_train_batch_size", 2,
                     "--model_name", "小黄", "--model_author", "魔搭")
    assert train.main(args) == 0
    out = capsys.readouterr().out
    assert "[1/2] float16 gradients overflowed: step skipped, loss scale now 5.49756e+11" in out
    assert "[2/2] float16 gradients overflowed: step skipped, loss scale now 2.74878e+11" in out
    b = {k: v for k, v in adapter(run_dir_of(tmp_path / "huge") / "checkpoint-2").items() if "lora_B" in k}
    assert b and all(not v.any() for v in b.values())  # B starts at zero and no step changed it


def test_train_py_with_the_embedding_in_host_memory_runs_as_without(tmp_path, hf_checkpoint, monkeypatch):
    """train.py end to end with speed.use_host_embedding forced on (it is chosen on GPUs only): the
    same training and evaluation losses and the same adapter as with the embedding where the model
    runs; sample answers (--eval_prompts) and evaluation call the host table with the device's ids."""
    folder, _ = hf_checkpoint()  # an lm_head of its own, as the 7B has
    data_file = write_qa(tmp_path / "qa.json")
    run = lambda out: train.main(base_args(data_file, tmp_path / out, "--model", folder, "--max_steps", 3,
                                           "--split_dataset_ratio", 0.25, "--eval_steps", 2, "--lora_dropout", 0.1,
                                           "--eval_prompts", "Who are you?"))
    assert run("plain") == 0
    looked_up = []
    lookup = speed.HostEmbedding.lookup
    monkeypatch.setattr(speed.HostEmbedding, "lookup", lambda self, ids: looked_up.append(ids.shape) or lookup(self, ids))
    monkeypatch.setattr(speed, "use_host_embedding", lambda device, config: (True, "embedding in host memory"))
    assert run("hosted") == 0
    assert len(looked_up) >= 3  # the training batches at least
    logs = [[json.loads(line) for line in (run_dir_of(tmp_path / out) / "logging.jsonl").read_text().splitlines()]
            for out in ("plain", "hosted")]
    strip = lambda log: [{k: v for k, v in e.items() if k not in ("elapsed", "remaining", "tokens_per_s")} for e in log
                         if "step" in e and "train_runtime" not in e]  # not the summary lines: times, folders
    assert strip(logs[0]) == strip(logs[1]) and any("eval_loss" in e for e in logs[0])
    last = lambda out: sorted(run_dir_of(tmp_path / out).glob("checkpoint-*"))[-1]
    assert all(torch.equal(a, b) for a, b in zip(adapter(last("plain")).values(), adapter(last("hosted")).values()))
