"""Packed optimizer steps (train.step_passes, --padding_free): the rows of a step go through the
model packed into few sequences, each row attending only to itself, and the step's gradient is the
one of accumulating them one by one. Also proved elsewhere, on whole runs: with 2 gloo ranks
(tests/test_distributed.py, against one rank with --padding_free false), resumed mid-epoch
(tests/test_train.py::test_resumed_run_ends_with_the_same_adapter_bit_for_bit, packed by default)
and with compiled layers (tests/test_train.py::test_compiled_layers_train_padded_batches_like_the_eager_ones)."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import data
import lora
import model as modeling
import flags
import parallel
import speed
import train
from conftest import lora_for_training, random_rows, both_families

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parent.parent
LENGTHS = [5, 40, 17, 60, 9, 33]  # mixed, in the order of the step's micro-batches


@pytest.fixture(scope="module")
def lora_model(tiny_dir):
    """The tiny model in float32 with a LoRA adapter whose B is not zero (so every A has a gradient),
    dropout 0, checkpointed as train.py trains it."""
    m, _ = modeling.load_model(str(tiny_dir), dtype=torch.float32)
    return lora_for_training(m, lora.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0), 0.05, seed=0)


class GradientRecorder:
    """Stands in for AdamW in optimizer_step: keeps the gradient it is handed instead of stepping."""

    def __init__(self, params):
        self.params, self.param_groups, self.grads = params, [{}], None

    def step(self):
        self.grads = torch.cat([p.grad.flatten() for p in self.params]).clone()

    def zero_grad(self, set_to_none=False):
        for p in self.params:
            p.grad.zero_()


def step_gradient(m, rows, micro, budget):
    """The gradient optimizer_step hands the optimizer for one step of these micro-batches."""
    params = lora.lora_parameters(m)
    for p in params:
        p.grad = torch.zeros_like(p)
    recorder = GradientRecorder(params)
    fn = train.CausalLMLoss(m)
    s = train.Step(rows=rows, pad_id=0, device=torch.device("cpu"), pad_to=1, budget=budget, params=params,
                   micro_batch=lambda batch, scale: train.micro_batch(fn, batch, scale), optimizer=recorder,
                   loss_scale=train.LossScale(enabled=False), max_grad_norm=0.0, ranks=parallel.Replicas())
    loss, _, _ = train.optimizer_step(s, micro, lr=0.0)
    return recorder.grads, loss


@pytest.mark.parametrize("batch_size,budget,passes", [
    (1, 2048, 1),  # batch 1, accumulation 6: one pass
    (3, 2048, 1),  # batch 3, accumulation 2: the padding of each micro-batch is gone too
    (1, 64, 3),  # a budget that splits the step: 60, 40 + 17 + 5, 33 + 9 (best fit, longest first)
    (2, 48, 4),  # the row of 60 tokens, longer than the budget, runs alone
])
@both_families
def test_a_packed_step_gives_the_gradient_of_one_by_one_accumulation(lora_model, batch_size, budget, passes):
    rows = random_rows(LENGTHS)
    micro = [list(range(i, min(i + batch_size, len(rows)))) for i in range(0, len(rows), batch_size)]
    one_by_one = [[i] for mb in micro for i in mb]
    plain, plain_loss = step_gradient(lora_model, rows, one_by_one, None)
    packed, packed_loss = step_gradient(lora_model, rows, micro, budget)
    assert plain.abs().sum() > 0
    assert (packed - plain).norm() / plain.norm() < 1e-5
    torch.testing.assert_close(packed, plain, rtol=1e-4, atol=1e-7)
    assert packed_loss == pytest.approx(plain_loss, rel=1e-6)
    batches = [train.make_batch(r, 0, "cpu") for r in train.step_passes([[rows[i] for i in mb] for mb in micro], budget)]
    assert len(batches) == passes
    assert all(b["input_ids"].shape[1] <= budget or b["cu_seqlens"][1] > budget for b in batches)


@both_families
def test_a_packed_sequence_gives_each_row_its_own_logits(lora_model):
    """Rows packed into one sequence (padded, with empty rows at the end of cu_seqlens) give each
    row the logits it has alone: positions restart per row and no row sees another."""
    rows = random_rows([7, 30, 1, 12])
    rows.append(data.concat_rows(random_rows([6, 5], seed=1)))  # a --packing true row: its samples stay apart
    batch = train.make_batch([data.concat_rows(rows)], 0, "cpu", pad_to=64)
    assert batch["input_ids"].shape == (1, 64) and "attention_mask" not in batch
    # where the 6 rows start, where the padding starts, then empty rows: 16 + 1 offsets
    assert batch["cu_seqlens"].tolist() == [0, 7, 37, 38, 50, 56, 61] + [64] * 10
    m = lora_model.eval()
    with torch.no_grad():
        h = m.model(batch["input_ids"], position_ids=batch["position_ids"], cu_seqlens=batch["cu_seqlens"])
        packed = m.lm_head(h)[0]  # (T, vocab)
        start = 0
        for row in random_rows([7, 30, 1, 12]) + random_rows([6, 5], seed=1):
            n = len(row["input_ids"])
            alone = m(torch.tensor([row["input_ids"]]))[0]  # (n, vocab)
            torch.testing.assert_close(packed[start:start + n], alone, rtol=1e-5, atol=1e-5)
            start += n
    m.train()


def test_varlen_attention_reads_q_k_v_and_row_offsets_as_the_kernel_expects(lora_model, monkeypatch):
    """speed.VarlenAttention's plumbing on the CPU, with a stand-in for the GPU-only kernel that runs
    causal SDPA row by row on varlen_attn's (tokens, heads, head_dim) layout: the same hidden states
    as the block mask (the kernel itself is compared on a GPU, below)."""
    def kernel(q, k, v, cu_q, cu_k, max_q, max_k, window_size=(-1, -1), enable_gqa=False):
        assert window_size == (-1, 0) and q.shape[0] == max_q and torch.equal(cu_q, cu_k)
        out = torch.zeros_like(q)  # (T, nh, hd)
        for start, end in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
            heads = [x[start:end].transpose(0, 1)[None] for x in (q, k, v)]  # (1, heads, n, hd)
            out[start:end] = torch.nn.functional.scaled_dot_product_attention(
                *heads, is_causal=True, enable_gqa=True)[0].transpose(0, 1)
        return out

    _, keywords = speed.find_varlen()  # the keywords torch's varlen_attn takes for causal rows, from its signature
    monkeypatch.setattr(speed, "find_varlen", lambda: (kernel, keywords))
    (batch,) = [train.make_batch(r, 0, "cpu", 64) for r in train.step_passes([random_rows([7, 30, 1, 12, 20])], 2048)]
    inputs = dict(position_ids=batch["position_ids"], cu_seqlens=batch["cu_seqlens"])
    with torch.no_grad():
        varlen = lora_model.model(batch["input_ids"], **inputs, packed_mask=speed.VarlenAttention)
        torch.testing.assert_close(varlen, lora_model.model(batch["input_ids"], **inputs), rtol=1e-5, atol=1e-5)


def test_step_packing_takes_numpy_rows_and_keeps_the_label_count():
    """Rows may hold numpy arrays (data.encode_dataset's choice); a packed row masks each row's first
    label, which no row's loss uses, so the step's label-token count is unchanged."""
    import numpy as np
    rows = random_rows([8, 5])
    as_numpy = [{k: np.asarray(v, dtype=np.int32) for k, v in r.items()} for r in rows]
    packed = data.concat_rows(as_numpy)
    for key in ("input_ids", "labels", "segment_ids", "position_ids"):
        assert packed[key].tolist() == data.concat_rows(rows)[key].tolist()
    assert packed["segment_ids"].tolist() == [1] * 8 + [2] * 5
    assert packed["position_ids"].tolist() == list(range(8)) + list(range(5))
    assert data.concat_rows([packed, rows[0]])["segment_ids"].tolist() == [1] * 8 + [2] * 5 + [3] * 8
    assert train.label_tokens(packed) == sum(train.label_tokens(r) for r in rows)


def test_padding_free_is_on_by_default_where_varlen_attention_runs(tmp_path, tiny_dir):
    a = flags.train_parser().parse_args(["--model", "tiny", "--dataset", "x.json", "--device", "cpu"])
    assert a.padding_free is None and a.max_tokens_per_pass is None
    a.gradient_accumulation_steps = 1
    flags.set_derived_defaults(a)
    assert a.max_tokens_per_pass == a.max_length == 2048
    assert a.padding_free is False  # on the CPU packed rows need a T x T mask: micro-batches are faster
    assert speed.varlen_available(torch.device("cuda"), torch.bfloat16) == (speed.find_varlen() is not None)
    assert not speed.varlen_available(torch.device("cuda"), torch.float32)
    a = flags.train_parser().parse_args(["--model", "tiny", "--dataset", "x.json", "--padding_free", "true"])
    a.gradient_accumulation_steps = 1
    flags.set_derived_defaults(a)
    assert a.padding_free is True
    gpu = speed.PlanFlags(max_length=2048, padding_free=True, max_tokens_per_pass=1024, torch_dtype="bfloat16")
    plan = speed.plan_training(gpu, torch.device("cuda"), [40, 100, 70], 192)
    if speed.find_varlen() is not None:
        assert plan.packed_mask is speed.VarlenAttention and "varlen_attn (no T x T mask)" in plan.message
    assert "at most 1024 tokens" in plan.message and "here at most 16 lengths (64, 128," in plan.message
    plan = speed.plan_training(dataclasses.replace(gpu, torch_dtype="float32"), torch.device("cuda"), [40], 192)
    assert plan.packed_mask is None and "SDPA with a T x T block mask" in plan.message
    plan = speed.plan_training(gpu, torch.device("cpu"), [40], 192)
    assert plan.packed_mask is None and plan.message == ""


# ----------------------------------------------------------------------------------------------
# On a GPU: varlen_attn, and packed micro-batches replayed as CUDA graphs

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="varlen_attn needs a GPU: run on the GPU machine")


@cuda_only
def test_varlen_attention_equals_the_block_mask_path():
    """speed.VarlenAttention gives SDPA-with-model.block_mask's output and gradients (bf16 rounding),
    with grouped-query heads, padding as a row of its own, and empty rows at the end."""
    g = torch.Generator(device="cuda").manual_seed(0)
    T, cu = 256, torch.tensor([0, 40, 41, 140, 230, 256, 256, 256], dtype=torch.int32, device="cuda")
    q = torch.randn(1, 28, T, 128, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    k = torch.randn(1, 4, T, 128, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    v = torch.randn(1, 4, T, 128, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    out = torch.randn(1, 28, T, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    results = []
    for varlen in (True, False):
        if varlen:
            y = speed.VarlenAttention(cu, T)(q, k, v)
        else:
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=modeling.block_mask(cu, T),
                                                                 enable_gqa=True)
        results.append([y.float(), *(x.float() for x in torch.autograd.grad((y * out).sum(), (q, k, v)))])
    for got, want in zip(*results):
        # bf16 outputs of two kernels that sum in different orders: a few elements differ by a rounding step
        torch.testing.assert_close(got, want, rtol=2e-2, atol=4e-2)
        assert ((got - want).abs() > 2e-2).float().mean() < 1e-3


@cuda_only
@both_families
def test_packed_micro_batches_replayed_as_cuda_graphs_give_the_eager_gradients(tiny_dir):
    """Packed batches of a few shapes (length and cu_seqlens) replayed: the eager loss and gradients,
    through varlen_attn in bfloat16."""
    with torch.cuda.stream(torch.cuda.Stream()):  # as train.py: graphs are recorded off the default stream
        m, _ = modeling.load_model(str(tiny_dir), dtype=torch.bfloat16, device="cuda")
        lora_for_training(m, lora.LoraConfig(lora_dropout=0.0), 0.02)
        params = lora.lora_parameters(m)
        for p in params:
            p.grad = torch.zeros_like(p)
        loss_fn = train.CausalLMLoss(m, packed_mask=speed.VarlenAttention)
        graphed = speed.CUDAGraphMicroBatches(loss_fn, params)
        steps = [[20, 40, 3], [30, 33, 1], [90, 30, 2, 5], [25] * 17, [26] * 17]
        for k, lengths in enumerate(steps):
            rows = random_rows(lengths, seed=k)
            (batch,) = [train.make_batch(r, 0, "cuda", 64) for r in train.step_passes([rows], 2048)]
            scale = 1 / sum(train.label_tokens(r) for r in rows)
            ref_loss = loss_fn(**dict(batch, label_positions=speed.every_position(1, batch["labels"].shape[1], "cuda")))
            ref = torch.autograd.grad(ref_loss, params, grad_outputs=torch.full((), scale, device="cuda"))
            for p in params:
                p.grad.zero_()
            loss = graphed(batch, scale).clone()
            torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-3, atol=1e-3)
            got, want = torch.cat([p.grad.flatten() for p in params]), torch.cat([r.flatten() for r in ref])
            assert (got - want).norm() / want.norm() < 1e-2, k
        shapes = sorted((dict(key)["input_ids"], dict(key)["cu_seqlens"]) for key in graphed.graphs)
        assert shapes == [((1, 64), (17,)), ((1, 128), (17,)), ((1, 448), (33,))]  # one graph a shape


@cuda_only
def test_train_packs_on_a_gpu_like_micro_batches(tmp_path, tiny_dir, capsys):
    """train.py on a GPU in bfloat16: packed steps through varlen_attn and CUDA graphs (and with
    compiled layers) log the losses of --padding_free false within bf16 rounding."""
    common = ["--model", "tiny", "--dataset", str(ROOT / "data" / "self_cognition.json"), "--device", "cuda",
              "--lora_dropout", "0", "--max_steps", "3", "--gradient_accumulation_steps", "8", "--logging_steps", "1",
              "--model_name", "小黄", "Xiao Huang", "--model_author", "魔搭", "ModelScope"]
    losses = {}
    for name, extra in (("packed", []), ("plain", ["--padding_free", "false"]), ("compiled", ["--torch_compile", "true"])):
        assert train.main(common + ["--output_dir", str(tmp_path / name)] + extra) == 0
        out = capsys.readouterr().out
        assert ("varlen_attn (no T x T mask)" in out) == (name != "plain")
        (run,) = (tmp_path / name).glob("v*-*")
        losses[name] = [json.loads(line)["loss"] for line in (run / "logging.jsonl").read_text().splitlines()
                        if '"loss"' in line]
    assert len(losses["packed"]) == 3
    torch.testing.assert_close(losses["packed"], losses["plain"], rtol=2e-2, atol=0)
    torch.testing.assert_close(losses["compiled"], losses["plain"], rtol=2e-2, atol=0)
