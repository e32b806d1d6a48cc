"""speed.FusedLayer (the default training layer on a GPU) computes what model.DecoderLayer does:
the same loss and LoRA gradients, in float32 on the CPU, with dropout drawing the same masks."""

import pytest
import torch

import lora
import model as modeling
import offload
import speed
import train
from conftest import loss_and_gradients, lora_for_training, random_rows, both_families

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def fresh_model(tiny_dir, dropout):
    m, _ = modeling.load_model(str(tiny_dir), dtype=torch.float32)
    return lora_for_training(m, lora.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout), 0.05, seed=0)


def batches():
    """Rows padded side by side, rows packed into one sequence, and a sequence longer than the MLP's
    chunk (monkeypatched to 16 tokens below), as make_batch makes them."""
    padded = train.make_batch(random_rows([20, 33, 9]), 0, "cpu")
    (packed,) = [train.make_batch(r, 0, "cpu") for r in train.step_passes([random_rows([20, 33, 9], seed=1)], 2048)]
    return {"padded": padded, "packed": packed, "long": train.make_batch(random_rows([70], seed=2), 0, "cpu")}


@pytest.mark.parametrize("dropout,split", [(0.0, False), (0.1, False), (0.0, True)])
@both_families
def test_fused_layers_give_the_plain_gradients(tiny_dir, dropout, split, monkeypatch):
    """split: rows longer than the MLP's chunk checkpoint the attention half and each MLP piece apart,
    the attention half's per-position work in tiles (split_long_rows, as with offloaded checkpoints:
    tiles.py). In tiles dropout draws its masks in another order, so split is compared without
    dropout here; tests/test_offload.py::test_split_layers_recompute_the_masks_their_forward_drew
    proves that its recomputation draws the masks its forward drew."""
    monkeypatch.setattr(modeling.MLP, "chunk", 16)
    m = fresh_model(tiny_dir, dropout)
    fused = speed.fused_layers(m, split_long_rows=split)
    for name, batch in batches().items():
        loss, grads = loss_and_gradients(m, batch, None, seed=7)
        fused_loss, fused_grads = loss_and_gradients(m, batch, fused, seed=7)
        assert fused_loss.item() == pytest.approx(loss.item(), rel=1e-6), name
        got, want = torch.cat([g.flatten() for g in fused_grads]), torch.cat([g.flatten() for g in grads])
        assert want.abs().sum() > 0
        assert (got - want).norm() / want.norm() < 1e-5, name


@both_families
def test_fused_layers_evaluate_and_see_a_merged_adapter_like_the_plain_ones(tiny_dir):
    """Validation runs the same loss function in eval mode without gradients (no dropout), and a
    merge writes W0 + (alpha/r) B A into q/k/v, which the fused matrix sees: its rows are their views."""
    m = fresh_model(tiny_dir, 0.3)
    fused = speed.fused_layers(m)
    m.eval()
    batch = batches()["padded"]
    with torch.no_grad():
        assert train.CausalLMLoss(m, layers=fused)(**batch).item() == pytest.approx(
            train.CausalLMLoss(m)(**batch).item(), rel=1e-6)
        lora.merge_lora(m)
        assert m.model.layers[0].self_attn.q_proj.weight.data_ptr() == fused[0].qkv_weight.data_ptr()
        assert train.CausalLMLoss(m, layers=fused)(**batch).item() == pytest.approx(
            train.CausalLMLoss(m)(**batch).item(), rel=1e-6)


def test_fused_layers_with_offloaded_checkpoints_give_the_plain_gradients(tiny_dir, monkeypatch):
    """Long rows on a GPU run fused layers with their checkpointed inputs in host memory
    (offload.offloaded_layers around them), the attention half and each MLP piece checkpointed
    apart: every piece's input goes to host memory too, and the gradients stay the plain ones
    (without dropout, which tiles draw in another order: tests/test_offload.py has the masks)."""
    monkeypatch.setattr(modeling.MLP, "chunk", 16)
    copies = []
    make = offload.HostCopy.__init__

    def spy(self, t):
        make(self, t)
        copies.append(tuple(t.shape))
    monkeypatch.setattr(offload.HostCopy, "__init__", spy)
    m = fresh_model(tiny_dir, 0.0)
    batch = batches()["packed"]  # 62 tokens: MLP pieces of 16, 16, 16 and 14
    loss, grads = loss_and_gradients(m, batch, None, seed=7)
    offloaded = offload.offloaded_layers(speed.fused_layers(m, split_long_rows=True))
    got_loss, got = loss_and_gradients(m, batch, offloaded, seed=7)
    assert got_loss.item() == pytest.approx(loss.item(), rel=1e-6)
    got, want = torch.cat([g.flatten() for g in got]), torch.cat([g.flatten() for g in grads])
    assert (got - want).norm() / want.norm() < 1e-5
    D = m.config.hidden_size
    one_layer = [(1, 62, D), (1, 16, D), (1, 16, D), (1, 16, D), (1, 14, D)]
    assert copies == one_layer * m.config.num_hidden_layers


cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


@cuda_only
@both_families
def test_fused_layers_replayed_as_cuda_graphs_give_the_plain_gradients_on_the_gpu(tiny_dir):
    """In bfloat16 on a GPU, with dropout, recorded and replayed (train.py's default there): the
    plain layers' loss and gradients, up to bf16 rounding."""
    with torch.cuda.stream(torch.cuda.Stream()):  # as train.py: graphs are recorded off the default stream
        m, _ = modeling.load_model(str(tiny_dir), dtype=torch.bfloat16, device="cuda")
        lora_for_training(m, lora.LoraConfig(lora_dropout=0.1), 0.02, seed=0)
        params = lora.lora_parameters(m)
        for p in params:
            p.grad = torch.zeros_like(p)
        plain_fn = train.CausalLMLoss(m)
        graphed = speed.CUDAGraphMicroBatches(train.CausalLMLoss(m, layers=speed.fused_layers(m)), params)
        for k, lengths in enumerate([[20, 40, 3], [30, 33, 1], [20, 40, 3]]):
            batch = train.make_batch(random_rows(lengths, seed=k), 0, "cuda", 64)
            scale = 1 / sum(len(r["labels"]) for r in random_rows(lengths, seed=k))
            torch.manual_seed(k)
            ref_loss = plain_fn(**dict(batch, label_positions=speed.every_position(*batch["labels"].shape, "cuda")))
            ref = torch.autograd.grad(ref_loss, params, grad_outputs=torch.full((), scale, device="cuda"))
            for p in params:
                p.grad.zero_()
            torch.manual_seed(k)
            loss = graphed(batch, scale).clone()
            torch.testing.assert_close(loss, ref_loss.detach(), rtol=2e-3, atol=1e-2)
            got, want = torch.cat([p.grad.flatten() for p in params]), torch.cat([r.flatten() for r in ref])
            assert (got - want).norm() / want.norm() < 2e-2, k
