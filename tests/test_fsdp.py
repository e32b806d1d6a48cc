"""--fsdp: the model split over the torchrun ranks (shard.py, FSDP2), on the CPU with gloo.

fully_shard runs on the CPU with gloo (torch 2.13), so the whole path is tested here: 2 ranks
train the adapter of one process with double accumulation, and their checkpoint resumes in one
process. Which rows each rank reads is checked in this process, as rank 2 of 3 (rows that do not
divide evenly), under torch's fake process group (no other processes: no collective runs)."""

import json
from contextlib import contextmanager
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.distributed.tensor import DTensor

import lora
import model as modeling
import runs
import shard
import speed
import flags
import train

from conftest import lora_for_training, loss_and_gradients, random_rows, hf_families

ROOT = Path(__file__).resolve().parent.parent
QA = [("你是谁？", "我是小黄。"), ("Who are you?", "I am Xiao Huang."), ("你能上网吗？", "不能。"),
      ("Are you ChatGPT?", "No, I am not."), ("hi", "hello there"), ("What can you do?", "Chat."), ("谢谢", "不客气"),
      ("1+1?", "2"), ("Say yes", "yes")]


def common(model, data, out, accum, *extra):
    # 9 rows, 2 held out: 7 rows with batch 1, so the last step of the epoch is partial and a rank
    # runs a weight-0 repeat there to keep in step with the other.
    return [str(x) for x in ["--model", model, "--dataset", data, "--output_dir", out, "--torch_dtype", "float32",
            "--device", "cpu", "--max_steps", 4, "--save_steps", 2, "--per_device_train_batch_size", 1,
            "--gradient_accumulation_steps", accum, "--lora_dropout", 0, "--learning_rate", 1e-3, "--logging_steps", 1,
            "--split_dataset_ratio", 0.2, "--eval_steps", 2, *extra]]


def two_ranks(args):
    """train.py as torchrun starts it on 2 ranks (the same environment variables), without
    torchrun's own process: one fewer start of Python and torch."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    procs = [subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=dict(env, RANK=str(r), LOCAL_RANK=str(r))) for r in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    return outs[0][0]  # rank 0's stdout


def run_dir(out) -> Path:
    (d,) = Path(out).glob("v*-*")
    return d


def assert_same_adapter(a: Path, b: Path):
    x, y = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert x.keys() == y.keys()
    for k in x:
        torch.testing.assert_close(x[k], y[k], rtol=0, atol=1e-5)


def eval_losses(run: Path) -> list:
    lines = [json.loads(l) for l in (run / "logging.jsonl").read_text().splitlines()]
    return [e["eval_loss"] for e in lines if "eval_loss" in e]


@hf_families
def test_two_ranks_with_fsdp_train_like_one_process_and_their_checkpoint_resumes_in_one(tmp_path, hf_checkpoint, family):
    """An untied checkpoint in several files: the embedding is split (the root unit), lm_head whole."""
    folder, _ = hf_checkpoint("untied", family=family)
    data = tmp_path / "qa.json"
    data.write_text(json.dumps([{"query": q, "response": r} for q, r in QA], ensure_ascii=False))
    two = two_ranks(common(folder, data, tmp_path / "two", 2, "--fsdp", "full_shard auto_wrap", "--eval_prompts", "hi"))
    assert "eager layers: under --fsdp" in two and "answers after training:" in two
    assert train.main(common(folder, data, tmp_path / "one", 4)) == 0
    fsdp_run, one_run = run_dir(tmp_path / "two"), run_dir(tmp_path / "one")
    assert_same_adapter(fsdp_run / "checkpoint-4", one_run / "checkpoint-4")
    assert eval_losses(fsdp_run) == pytest.approx(eval_losses(one_run), abs=1e-6) and len(eval_losses(one_run)) == 2
    # the optimizer state was gathered into one process's form: it resumes there, to the same end
    saved = torch.load(fsdp_run / "checkpoint-2" / "optimizer.pt", weights_only=True)
    assert not any(isinstance(v, DTensor) for s in saved["state"].values() for v in s.values())
    assert train.main(common(folder, data, tmp_path / "resumed", 4, "--resume_from_checkpoint", fsdp_run / "checkpoint-2")) == 0
    assert_same_adapter(run_dir(tmp_path / "resumed") / "checkpoint-4", one_run / "checkpoint-4")  # a new run folder


@contextmanager
def as_rank(rank: int, world: int):
    """This process as one rank of several under torch's fake process group: sharding decides the
    rank's rows without the other ranks; collectives do nothing. (Once per process: a second
    fake group in the same process gets the first one's rank.)"""
    from torch.testing._internal.distributed.fake_pg import FakeStore
    dist.init_process_group("fake", rank=rank, world_size=world, store=FakeStore())
    try:
        yield
    finally:
        dist.destroy_process_group()


def graph_nodes(loss) -> int:
    """How many autograd nodes the forward that gave `loss` recorded."""
    nodes, todo = set(), [loss.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and node not in nodes:
            nodes.add(node)
            todo += [f for f, _ in node.next_functions]
    return len(nodes)


def test_sharded_layers_recompute_without_a_graph_to_the_same_gradients(tiny_dir):
    """shard.recompute_without_graph, which shard.shard gives every layer: with dropout, the loss
    and every LoRA gradient (the first layer's too) are those of model.recompute, and the forward
    records no graph inside the layers (what makes it cheaper for the CPU)."""
    m, _ = modeling.load_model(str(tiny_dir), dtype=torch.float32, device="cpu")
    torch.manual_seed(0)
    m = lora_for_training(m, lora.LoraConfig(lora_dropout=0.3), 0.02, seed=0)
    batch = train.make_batch(random_rows([40, 30]), 0, "cpu")
    loss, grads = loss_and_gradients(m, batch, None, seed=7)
    graph = graph_nodes(train.CausalLMLoss(m)(**batch))
    for layer in m.model.layers:
        layer.recompute = shard.recompute_without_graph
    got_loss, got = loss_and_gradients(m, batch, None, seed=7)
    smaller_graph = graph_nodes(train.CausalLMLoss(m)(**batch))
    assert torch.equal(got_loss, loss)
    assert all(g.abs().sum() > 0 for g in grads)
    for g, ref in zip(got, grads):
        torch.testing.assert_close(g, ref, rtol=1e-5, atol=0)
    layers = len(m.model.layers)
    assert smaller_graph < graph - 20 * layers, (smaller_graph, graph)  # each layer one node, not dozens


def test_each_rank_reads_exactly_its_rows_and_a_checkpoint_loads_into_them(hf_checkpoint):
    folder, _ = hf_checkpoint("untied", intermediate_size=100)  # 100 rows on 3 ranks: 34, 34, 32
    cfg = lora.LoraConfig(r=8)  # A (8, in): rows 3, 3, 2
    whole = train.load_base_with_adapter(folder, cfg, 7, torch.float32, torch.device("cpu"))
    with as_rank(2, 3):
        check_rank_2_of_3(folder, cfg, whole)


def check_rank_2_of_3(folder, cfg, whole):
    sharded = shard.load_lora_model(folder, cfg, 7, torch.float32, torch.device("cpu"))
    full = dict(whole.named_parameters())
    rows = {}
    for name, p in sharded.named_parameters():
        if isinstance(p, DTensor):
            rows[name] = shard.own_rows(p)
            torch.testing.assert_close(p.to_local(), full[name][rows[name]], rtol=0, atol=0)
        else:  # lm_head stays whole
            assert name == "lm_head.weight"
            torch.testing.assert_close(p, full[name], rtol=0, atol=0)
    assert rows["model.layers.0.mlp.up_proj.weight"] == slice(68, 100)
    assert rows["model.layers.1.mlp.down_proj.lora_A.default.weight"] == slice(6, 8)  # LoRA A: the same values
    assert rows["model.embed_tokens.weight"] == slice(640, 960)
    # a checkpoint's whole adapter and optimizer state, read back into this rank's rows
    adapter = {k: torch.randn_like(v) for k, v in lora.lora_state_dict(whole).items()}
    params = lora.lora_parameters(sharded)
    optimizer = torch.optim.AdamW(params)
    moments = {i: {"step": torch.tensor(3.0), "exp_avg": torch.randn(p.shape), "exp_avg_sq": torch.rand(p.shape)}
               for i, p in enumerate(params)}
    state = {"state": dict(moments), "param_groups": optimizer.state_dict()["param_groups"]}
    shard.ShardedState().load(sharded, optimizer, adapter, state)
    for key, p in lora.lora_state_dict(sharded).items():
        torch.testing.assert_close(p.to_local(), adapter[key][shard.own_rows(p)], rtol=0, atol=0)
    first = optimizer.state[params[0]]
    assert float(first["step"]) == 3.0
    torch.testing.assert_close(first["exp_avg"].to_local(), moments[0]["exp_avg"][shard.own_rows(params[0])])


@pytest.mark.parametrize("flags,needle", [
    (["--fsdp", "offload"], "only full sharding of every decoder layer"),
    (["--fsdp", "true", "--torch_compile", "true"], "--torch_compile true cannot go with --fsdp true"),
    (["--deepspeed", "zero3"], "--fsdp true` splits the model over the GPUs"),
])
def test_fsdp_values_it_cannot_do_are_refused(tmp_path, tiny_dir, capsys, flags, needle):
    data = tmp_path / "qa.json"
    data.write_text(json.dumps([{"query": "q", "response": "r"}]))
    assert train.main(["--model", "tiny", "--dataset", str(data), "--output_dir", str(tmp_path / "o"), *flags]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_fsdp_spellings_and_the_plan_under_it():
    parse = lambda *v: flags.train_parser().parse_args(["--model", "m", "--dataset", "d", "--fsdp", *v])
    for spelling in (["true"], ["full_shard auto_wrap"], ["full_shard", "auto_wrap"], ["fsdp2"]):
        a = parse(*spelling)
        shard.check_flags(a)
        assert a.fsdp is True
    a = parse("false")
    shard.check_flags(a)
    assert a.fsdp is False
    a = parse("true")
    a.cuda_graph = a.torch_compile = None
    shard.check_flags(a)
    plan = speed.plan_training(speed.PlanFlags.of(a), torch.device("cuda"), [40, 100], 10_000)  # graphs by default, not here
    assert not plan.graphs and not plan.compiled and plan.pad_to == 1 and "eager layers: under --fsdp" in plan.message


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs: run on the GPU machine (nvidia-h200-x2)")
@hf_families
def test_two_gpus_with_fsdp_train_like_one_gpu_in_bfloat16(tmp_path, hf_checkpoint, family):
    """NCCL, bf16 base weights and float32 A and B in one unit, fused AdamW on DTensors."""
    folder, _ = hf_checkpoint("untied", family=family)
    data = tmp_path / "qa.json"
    data.write_text(json.dumps([{"query": q, "response": r} for q, r in QA], ensure_ascii=False))
    gpu = lambda args: [x if x not in ("cpu", "float32") else {"cpu": "cuda", "float32": "bfloat16"}[x] for x in args]
    two = two_ranks(gpu(common(folder, data, tmp_path / "two", 2, "--fsdp", "true", "--eval_prompts", "hi")))
    assert "eager layers: under --fsdp" in two
    assert train.main(gpu(common(folder, data, tmp_path / "one", 4, "--cuda_graph", "false"))) == 0
    x = load_file(run_dir(tmp_path / "two") / "checkpoint-4" / "adapter_model.safetensors")
    y = load_file(run_dir(tmp_path / "one") / "checkpoint-4" / "adapter_model.safetensors")
    # bf16 matmuls give slightly different gradients when summed in another order, and AdamW turns
    # a gradient near zero into a full-size step of either sign: compare each tensor as a whole.
    # Measured on 2 x H200 (docs/benchmark-runs.md, run 20): 0.5% for the median tensor, 6.9% at worst, the same
    # with either checkpointing of the sharded layers; a layer whose gradient were lost or counted
    # twice would be off by half or more, and so would the gradient norm.
    diff = sorted(float((x[k] - y[k]).norm() / y[k].norm()) for k in x)
    assert diff[len(diff) // 2] <= 0.02 and diff[-1] <= 0.15, diff
    logged = lambda run: [(e["loss"], e["grad_norm"]) for e in map(json.loads, (run / "logging.jsonl").read_text().splitlines())
                          if "loss" in e]
    two, one = logged(run_dir(tmp_path / "two")), logged(run_dir(tmp_path / "one"))
    assert len(two) == len(one) == 4
    for (loss, norm), (ref_loss, ref_norm) in zip(two, one):
        assert loss == pytest.approx(ref_loss, rel=1e-3) and norm == pytest.approx(ref_norm, rel=1e-2)
