"""Offloaded checkpoints (offload.offloaded_layers): each layer's checkpointed input waits in host
memory from its forward to its backward, and the gradients are the plain checkpointed path's.

On the CPU there is no host/device split, so offload.HostCopy fakes one: the "host" copy is a
tensor of its own and backward gets a new copy of it. The GPU tests run the real one (pinned
memory, a side stream) and are skipped without CUDA."""


import pytest
import torch

import data
import deltanet
import lora
import model as modeling
import offload
import speed
import tiles
import train
from conftest import lora_for_training, loss_and_gradients, random_rows, both_families

# both_families, and the tiny Qwen3.5 (three Gated DeltaNet layers, then gated attention)
all_families = pytest.mark.parametrize("tiny_dir", ["tiny", "tiny-qwen3", "tiny-qwen3_5"], indirect=True)

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="offloading to host memory needs a GPU: run on the GPU machine")


@pytest.fixture(autouse=True)
def _allocator_setting_restored(monkeypatch):
    """A plan for long rows reads PYTORCH_CUDA_ALLOC_CONF (offload.use_long_row_allocator): each test here
    starts without one and leaves the process's environment as it found it."""
    for name in offload.ALLOCATOR_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def dropout_model(tiny_dir, device="cpu"):
    """The tiny model in float32 with LoRA dropout 0.3 and B drawn (so the loss sees the masks)."""
    m, _ = modeling.load_model(str(tiny_dir), dtype=torch.float32, device=device)
    torch.manual_seed(0)  # A's init
    return lora_for_training(m, lora.LoraConfig(lora_dropout=0.3), 0.02, seed=0)


@pytest.mark.parametrize("packed", [False, True], ids=["one row", "packed rows"])
@all_families
def test_offloaded_layers_give_the_checkpointed_gradients(tiny_dir, packed):
    """With dropout: the recomputation from the host copy draws the forward's masks."""
    m = dropout_model(tiny_dir)
    rows = random_rows([40] * 3)
    batch = train.make_batch([data.concat_rows(rows)] if packed else rows[:1], 0, "cpu")
    assert ("cu_seqlens" in batch) == packed
    loss, plain = loss_and_gradients(m, batch, None, seed=7)
    offloaded_loss, offloaded = loss_and_gradients(m, batch, offload.offloaded_layers(m.model.layers), seed=7)
    assert torch.equal(offloaded_loss, loss)
    for g, ref in zip(offloaded, plain):
        torch.testing.assert_close(g, ref, rtol=1e-5, atol=0)
    _, other_masks = loss_and_gradients(m, batch, offload.offloaded_layers(m.model.layers), seed=8)
    assert not all(torch.equal(g, ref) for g, ref in zip(other_masks, plain))  # the masks do matter


def test_backward_recomputes_each_layer_from_its_host_copy(tiny_dir, monkeypatch):
    """One host copy a layer, holding no memory of the layer input it copies; backward brings each
    back once, the one before already on its way (prefetched) from the second on; and what it
    brings back is what the gradient is computed from (change a copy and the gradient changes)."""
    m = dropout_model(tiny_dir)
    batch = train.make_batch(random_rows([50]), 0, "cpu")
    copies, brought = [], []
    make, bring_back = offload.HostCopy.__init__, offload.HostCopy.bring_back

    def spy_make(self, t):
        make(self, t)
        copies.append(self)
        assert self.host.data_ptr() != t.data_ptr()

    def spy_bring_back(self):
        brought.append((copies.index(self), self.back is not None))
        return bring_back(self)

    monkeypatch.setattr(offload.HostCopy, "__init__", spy_make)
    monkeypatch.setattr(offload.HostCopy, "bring_back", spy_bring_back)
    n = m.config.num_hidden_layers
    _, plain = loss_and_gradients(m, batch, None, seed=3)
    _, offloaded = loss_and_gradients(m, batch, offload.offloaded_layers(m.model.layers), seed=3)
    assert len(copies) == n and brought == [(n - 1, False)] + [(i, True) for i in reversed(range(n - 1))]
    assert all(torch.equal(g, ref) for g, ref in zip(offloaded, plain))

    copies.clear()
    torch.manual_seed(3)
    loss = train.CausalLMLoss(m, layers=offload.offloaded_layers(m.model.layers))(**batch)
    copies[1].host.mul_(1.5)  # the second layer's input, as backward will see it
    changed = torch.autograd.grad(loss, lora.lora_parameters(m))
    in_layer1 = {id(p) for p in m.model.layers[1].parameters()}
    layer1 = [i for i, p in enumerate(lora.lora_parameters(m)) if id(p) in in_layer1]
    assert layer1 and not any(torch.allclose(changed[i], plain[i]) for i in layer1)


def test_nothing_but_the_host_copy_keeps_a_layer_input_alive(tiny_dir):
    """Offloading saves memory only if the device tensor is freed once copied. Autograd keeps the
    pack hook as long as what it packed, so a hook holding the input would keep it (as the first
    version's did: on the GPU its peak was no lower than without offloading)."""
    import gc
    import weakref
    m = dropout_model(tiny_dir)
    layer = offload.offloaded_layers(m.model.layers)[1]
    h = torch.randn(1, 16, m.config.hidden_size, requires_grad=True) * 2  # (1, T, hidden), not a leaf
    alive = weakref.ref(h)
    position_ids, mask, is_causal = modeling.attention_inputs(torch.zeros(1, 16, dtype=torch.long))
    cos, sin = modeling.rope_cos_sin(position_ids, m.config.head_dim, m.config.rope_theta, h.dtype)
    out = layer(h, cos, sin, mask, is_causal, None, 1, checkpoint=True)
    del h
    gc.collect()
    assert alive() is None and out.grad_fn is not None  # gone, while the graph that needs it lives
    out.sum().backward()  # recomputed from the host copy

def test_a_short_training_loop_with_offloading_ends_with_the_plain_adapter(tiny_dir):
    """Three AdamW steps of train.micro_batch over packed and single rows, dropout on: the adapter
    ends where the plain checkpointed loop's does."""
    rows = random_rows([30] * 4, seed=1)
    batches = [train.make_batch([data.concat_rows(rows[:3])], 0, "cpu"), train.make_batch(rows[3:], 0, "cpu")]
    adapters = []
    for offloading in (False, True):
        m = dropout_model(tiny_dir)
        params = lora.lora_parameters(m)
        loss_fn = train.CausalLMLoss(m, layers=offload.offloaded_layers(m.model.layers) if offloading else None)
        opt = torch.optim.AdamW(params, lr=1e-3)
        for step in range(3):
            torch.manual_seed(step)
            for batch in batches:
                train.micro_batch(loss_fn, batch, 0.01)
            opt.step()
            opt.zero_grad(set_to_none=True)
        adapters.append(torch.cat([p.detach().flatten() for p in params]))
    torch.testing.assert_close(adapters[1], adapters[0], rtol=1e-5, atol=1e-7)


SEVEN_B = modeling.Config(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                          num_attention_heads=28, num_key_value_heads=4)


def plan_flags(tokens: int, **flags):
    return speed.PlanFlags(**dict(dict(max_length=tokens, max_tokens_per_pass=tokens, padding_free=True), **flags))


def test_offload_is_planned_where_one_pass_saves_more_than_2_gib(tiny_dir, monkeypatch):
    """On a GPU by default from 2 GiB of saved inputs a pass (28 x 32,768 x 3,584 x 2 bytes on the
    7B shape is 6.1 GiB; 2,048 tokens are 0.4), without CUDA graphs then; the flag decides when given."""
    gpu = torch.device("cuda")
    monkeypatch.setattr(offload, "host_memory_gib", lambda: 100.0)
    plan = speed.plan_training(plan_flags(32768), gpu, [500], 100, SEVEN_B)
    assert plan.offload and not plan.graphs and not plan.compiled and plan.pad_to == 1
    assert ("offloaded checkpoints: each layer's saved input (28 layers x 32,768 tokens x 3,584 x 2 bytes = 6.1 GiB a "
            "pass, over 2 GiB; 12.2 GiB with each MLP's input, of the 100 GiB of host memory available)") in plan.message
    assert "CUDA graphs:" not in plan.message and "--activation_cpu_offload false" in plan.message
    plan = speed.plan_training(plan_flags(2048), gpu, [500], 100, SEVEN_B)
    assert not plan.offload and plan.graphs and "offloaded" not in plan.message
    # one row longer than the budget runs alone; without packing a micro-batch is its rows padded to the longest
    assert speed.plan_training(plan_flags(2048), gpu, [12000], 100, SEVEN_B).offload
    assert speed.plan_training(plan_flags(2048, padding_free=False, per_device_train_batch_size=8), gpu, [2000], 100, SEVEN_B).offload
    assert not speed.plan_training(plan_flags(32768, activation_cpu_offload=False), gpu, [500], 100, SEVEN_B).offload
    assert not speed.plan_training(plan_flags(32768, cuda_graph=True), gpu, [500], 100, SEVEN_B).offload
    assert not speed.plan_training(plan_flags(32768), torch.device("cpu"), [500], 100, SEVEN_B).offload
    forced = speed.plan_training(plan_flags(2048, activation_cpu_offload=True), gpu, [500], 100, SEVEN_B)
    assert forced.offload and not forced.graphs and "over 2 GiB" not in forced.message
    m, _ = modeling.load_model(str(tiny_dir), dtype=torch.float32)
    layers = forced.training_layers(m)  # offloading around the fused layers a GPU runs
    assert [layer.layer.layer for layer in layers] == list(m.model.layers)


@pytest.mark.parametrize("flags,needle", [
    ([], "this run is on the CPU: drop the flag or pass --device cuda"),
    (["--device", "cuda", "--gradient_checkpointing", "false"], "it needs --gradient_checkpointing true"),
    (["--device", "cuda", "--cuda_graph", "true"], "--activation_cpu_offload true and --cuda_graph true exclude each other"),
])
def test_offloading_where_it_cannot_run_stops_before_training(tmp_path, capsys, monkeypatch, flags, needle):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # --device cuda passes the device checks
    argv = ["--model", "tiny", "--dataset", str(tmp_path / "none.json"), "--activation_cpu_offload", "true", *flags]
    if not flags:
        argv += ["--device", "cpu"]
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def measured_step(m, batch, layers):
    """On a GPU: (loss, every LoRA gradient in float32 side by side, the peak allocated over what was
    allocated before) of one step of `layers`."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss, grads = loss_and_gradients(m, batch, layers, seed=5)
    torch.cuda.synchronize()
    return loss, torch.cat([g.float().flatten() for g in grads]), torch.cuda.max_memory_allocated() - base


@cuda_only
def test_offloading_on_a_gpu_gives_the_same_gradients_in_less_memory():
    """Pinned host memory and a side stream: the checkpointed path's gradients (float32, dropout
    on), and a lower peak for a row of 8,192 tokens, whose 16 saved inputs are 128 MiB."""
    cfg = modeling.Config(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=16,
                          num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    with torch.device("cuda"):
        m = modeling.QwenForCausalLM(cfg)
    lora_for_training(m, lora.LoraConfig(lora_dropout=0.1), 0.02, seed=0)
    ids = torch.randint(0, cfg.vocab_size, (1, 8192), device="cuda")
    batch = {"input_ids": ids, "labels": ids, "label_positions": torch.arange(8191, device="cuda")}
    saved = cfg.num_hidden_layers * 8192 * cfg.hidden_size * 4

    run = lambda layers: measured_step(m, batch, layers)

    offloaded = offload.offloaded_layers(m.model.layers)
    run(offloaded)  # the first pass allocates the pinned host buffers
    loss, plain, plain_peak = run(None)
    offloaded_loss, grads, offloaded_peak = run(offloaded)
    torch.testing.assert_close(offloaded_loss, loss, rtol=1e-5, atol=0)
    assert (grads - plain).norm() <= 1e-5 * plain.norm()
    assert offloaded_peak < plain_peak - saved // 2, (offloaded_peak, plain_peak, saved)


def test_offloading_more_than_the_host_can_pin_is_refused_before_anything_loads(monkeypatch):
    """Pinned host memory cannot be paged out: 131,072 tokens of the 7B shape (24.5 GiB of layer inputs
    a pass, 49.0 with each MLP's input, as a row in tiles keeps them) on a host with 16 GiB available
    is one paragraph at planning, not a machine that swaps or dies."""
    import cli
    available = offload.host_memory_gib()  # the real reading, on this machine
    assert available is None or available > 0
    monkeypatch.setattr(offload, "host_memory_gib", lambda: 16.0)
    with pytest.raises(cli.UsageError, match=r"takes 49\.0 GiB of pinned host memory a pass .* has 16\.0 GiB available"):
        speed.plan_training(plan_flags(131072), torch.device("cuda"), [500], 100, SEVEN_B)
    monkeypatch.setattr(offload, "host_memory_gib", lambda: None)  # unknown: planned as before, nothing said
    assert speed.plan_training(plan_flags(131072), torch.device("cuda"), [500], 100, SEVEN_B).offload


# ----------------------------------------------------------------------------------------------
# Long rows in tiles (tiles.py): what train.py runs with offloaded checkpoints on a plain or 4-bit base


def tiny_base(tiny_dir, base: str, dropout: float):
    """The tiny model (float32, or its projections in 4 bits) with LoRA (B drawn), checkpointed."""
    import quant
    if base == "4-bit":
        m, _ = quant.load_quantized(str(tiny_dir), quant.QuantConfig(), torch.float32, "cpu")
    else:
        m, _ = modeling.load_model(str(tiny_dir), dtype=torch.float32)
    torch.manual_seed(0)
    return lora_for_training(m, lora.LoraConfig(lora_dropout=dropout), 0.02, seed=0)


def loss_and_all_gradients(m, batch, layers, seed: int):
    """loss_and_gradients, plus the gradient of the input embeddings (the first layer's input)."""
    embeds = m.model.embed_tokens(batch["input_ids"]).detach().requires_grad_()
    loss, grads = loss_and_gradients(m, dict(batch, inputs_embeds=embeds), layers, seed)
    return loss, torch.cat([g.flatten() for g in grads]), embeds.grad


def long_batches():
    """One row of 70 tokens (tiles of 16: four, then 6) and rows of 30, 25 and 15 packed into one."""
    rows = random_rows([30, 25, 15], seed=4)
    return {"one row": train.make_batch(random_rows([70], seed=3), 0, "cpu"),
            "packed rows": train.make_batch([data.concat_rows(rows)], 0, "cpu")}


@pytest.mark.parametrize("base", ["float32", "4-bit"])
@all_families
def test_split_layers_give_the_checkpointed_gradients(tiny_dir, base, monkeypatch):
    """A row longer than the MLP's chunk (16 here) with offloaded checkpoints on a base without fused
    layers: each layer's attention half with its norm, projections and RoPE in tiles, attention by K/V
    head group, the MLP tile by tile, and the final norm in tiles. Loss, LoRA gradients and the input's
    gradient are the plain checkpointed model's; the host copies are each layer's input and each MLP
    tile's; the final norm keeps its weight and its name in the state dict."""
    monkeypatch.setattr(modeling.MLP, "chunk", 16)
    monkeypatch.setattr(tiles, "DELTA_RULE_PIECE", 64)  # Qwen3.5's DeltaNet layers: the rule in pieces of 64 and 6
    copies, make = [], offload.HostCopy.__init__

    def spy(self, t):
        make(self, t)
        copies.append(tuple(t.shape))
    monkeypatch.setattr(offload.HostCopy, "__init__", spy)
    m = tiny_base(tiny_dir, base, dropout=0.0)
    names, norm = list(m.state_dict()), m.model.norm
    plain = {name: loss_and_all_gradients(m, batch, None, seed=5) for name, batch in long_batches().items()}
    layers = speed.TrainingPlan(offload=True).training_layers(m)
    assert [type(layer.layer) for layer in layers] == [tiles.SplitLayer] * m.config.num_hidden_layers
    assert isinstance(m.model.norm, tiles.TiledNorm) and m.model.norm.weight is norm.weight and list(m.state_dict()) == names
    for name, batch in long_batches().items():
        copies.clear()
        loss, grads, embeds = loss_and_all_gradients(m, batch, layers, seed=5)
        want_loss, want, want_embeds = plain[name]
        assert loss.item() == pytest.approx(want_loss.item(), rel=1e-6), name
        assert want.abs().sum() > 0 and (grads - want).norm() / want.norm() < 1e-5, name
        assert (embeds - want_embeds).norm() / want_embeds.norm() < 1e-5, name
        D = m.config.hidden_size
        assert copies == ([(1, 70, D)] + [(1, 16, D)] * 4 + [(1, 6, D)]) * m.config.num_hidden_layers, name


def test_the_delta_rule_in_pieces_gives_the_whole_rows_results(monkeypatch):
    """tiles.delta_rule_in_pieces: a DeltaNet's chunked delta rule over 300 positions in checkpointed pieces
    of 128 (two, then 44), from a state of its own: the whole row's output, final state and gradients of
    every input, float32; its backward recomputes each piece once; short rows and no-grad calls run whole."""
    monkeypatch.setattr(tiles, "DELTA_RULE_PIECE", 128)
    torch.manual_seed(0)
    B, T, H, dk, dv = 2, 300, 3, 8, 6
    q, k = (torch.nn.functional.normalize(torch.randn(B, T, H, dk), dim=-1).requires_grad_() for _ in range(2))
    v = torch.randn(B, T, H, dv, requires_grad=True)
    g = (-torch.rand(B, T, H) * 0.3).requires_grad_()
    beta, state = torch.rand(B, T, H, requires_grad=True), torch.randn(B, H, dk, dv, requires_grad=True)
    inputs = (q, k, v, g, beta, state)
    runs = []
    monkeypatch.setattr(tiles, "chunked_delta_rule", lambda *a: runs.append(a[0].shape[1]) or deltanet.chunked_delta_rule(*a))
    results = {}
    for name, rule in (("whole", deltanet.chunked_delta_rule), ("pieces", tiles.delta_rule_in_pieces)):
        out, final = rule(*inputs)
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))  # not _like: strides differ
        results[name] = [out, final, *torch.autograd.grad((out * weights).sum() + final.sum(), inputs)]
    assert runs == [128, 128, 44] + [44, 128, 128]  # forward, then backward's recomputation, last piece first
    for got, want in zip(results["pieces"], results["whole"]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    runs.clear()
    with torch.no_grad():
        tiles.delta_rule_in_pieces(*inputs)
    tiles.delta_rule_in_pieces(*(x[:, :100] if x.dim() > 3 or x is g or x is beta else x for x in inputs))
    assert runs == [300, 100]


@pytest.mark.parametrize("kind", ["plain layers", "fused layers"])
def test_split_layers_recompute_the_masks_their_forward_drew(tiny_dir, kind, monkeypatch):
    """With LoRA dropout, tiles draw their masks in another order than the whole layer (so the plain
    path's gradients are another draw), but each tile's recomputation in backward draws the masks its
    forward drew: the same gradients as the same tiles run once, without checkpoints or offloading."""
    monkeypatch.setattr(modeling.MLP, "chunk", 16)
    m = tiny_base(tiny_dir, "float32", dropout=0.3)
    plan = speed.TrainingPlan(offload=True, fused=kind == "fused layers")
    batch = long_batches()["one row"]
    loss, grads, embeds = loss_and_all_gradients(m, batch, plan.training_layers(m), seed=9)
    with monkeypatch.context() as once:
        once.setattr(tiles, "recompute", lambda fn, *args: fn(*args))  # each tile run once, nothing recomputed
        layers = speed.fused_layers(m, split_long_rows=True) if plan.fused else tiles.split_layers(m)
        want_loss, want, want_embeds = loss_and_all_gradients(m, batch, layers, seed=9)
    assert loss.item() == pytest.approx(want_loss.item(), rel=1e-6)
    assert (grads - want).norm() / want.norm() < 1e-5 and (embeds - want_embeds).norm() / want_embeds.norm() < 1e-5
    _, other, _ = loss_and_all_gradients(m, batch, plan.training_layers(m), seed=10)
    assert (other - want).norm() / want.norm() > 1e-3  # the masks do matter


def test_a_100k_token_row_in_4_bits_is_planned_with_tiles_and_its_longest_row(tiny_dir, monkeypatch):
    """Issue 33's user: --quant_bits 4 --max_length 131072 and a 100,000-token row, on a 24 GB card. The
    plan offloads and tiles without being asked, names the allocator setting to try (or the user's), says
    how much host memory the pass pins, and estimates the longest row from the model's shape; train.py's
    layers are then the model's own in tiles, offloaded, and the final norm tiled."""
    import re
    import os
    import quant
    monkeypatch.setattr(offload, "host_memory_gib", lambda: 200.0)
    monkeypatch.setattr(offload, "card_gib", lambda device: 23.6)  # what a 24 GB card reports
    a = plan_flags(131072, quant_bits=4)
    plan = speed.plan_training(a, torch.device("cuda"), [100_000, 900], 10, SEVEN_B)
    assert plan.offload and not plan.graphs and not plan.fused and not plan.compiled
    assert plan.message.startswith("eager layers (a 4-bit base has no matrices to fuse)")
    assert ("(28 layers x 131,072 tokens x 3,584 x 2 bytes = 24.5 GiB a pass, over 2 GiB; 49.0 GiB with each MLP's "
            "input, of the 200 GiB of host memory available)") in plan.message
    assert "long rows in tiles: a row longer than 2,048 tokens" in plan.message
    assert "PYTORCH_CUDA_ALLOC_CONF" not in os.environ and "try PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True" in plan.message
    estimate = re.search(r"estimated: ([\d,]+) tokens \(23\.6 GiB: weights 4\.2 GiB, LoRA state 0\.3, fixed ([\d.]+),"
                         r".*host memory allows ([\d,]+)", plan.message)
    assert estimate, plan.message
    longest, host = (int(estimate.group(i).replace(",", "")) for i in (1, 3))
    per_token = (offload.LONG_ROW_STAGING_UNITS + offload.LONG_ROW_RECOMPUTE_UNITS) * 3584 * 2
    assert longest % 1024 == 0 and abs(longest - (23.6 - 4.2 - 0.3 - float(estimate.group(2))) * 2**30 / per_token) < 2048
    assert host == int(0.8 * 200 * 2**30 / (2 * 28 * 3584 * 2)) // 1024 * 1024
    assert offload.weights_gib(offload.decoder_sizes(SEVEN_B), None, 2) == pytest.approx(13.2, abs=0.05)  # bf16: lm_head and the projections
    assert "may run out of memory" not in plan.message
    monkeypatch.setattr(offload, "card_gib", lambda device: 16.0)  # bf16 on a 16 GB card: warned
    bf16 = speed.plan_training(plan_flags(131072), torch.device("cuda"), [100_000], 10, SEVEN_B).message
    assert "this run's passes reach 131,072 tokens and may run out of memory: lower --max_length" in bf16
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:512")  # a user's own setting stays
    again = speed.plan_training(a, torch.device("cuda"), [100_000], 10, SEVEN_B).message
    assert "the CUDA allocator as you set it (PYTORCH_CUDA_ALLOC_CONF=max_split_size_mb:512)" in again
    m4, _ = quant.load_quantized(str(tiny_dir), quant.QuantConfig(), torch.float32, "cpu")
    layers = plan.training_layers(m4)
    assert all(isinstance(layer, offload.OffloadedLayer) and isinstance(layer.layer, tiles.SplitLayer) for layer in layers)
    assert isinstance(m4.model.norm, tiles.TiledNorm)


def bf16_model_and_row(cfg, tokens: int = 8192):
    """On a GPU: a random bf16 model of cfg with LoRA (B drawn, no dropout), and one row of `tokens`
    random tokens as a batch that trains on every position."""
    torch.manual_seed(0)
    with torch.device("cuda"):
        m = modeling.QwenForCausalLM(cfg).to(torch.bfloat16)
    lora_for_training(m, lora.LoraConfig(lora_dropout=0.0), 0.02, seed=0)
    ids = torch.randint(0, cfg.vocab_size, (1, tokens), device="cuda")
    return m, {"input_ids": ids, "labels": ids, "label_positions": torch.arange(tokens - 1, device="cuda")}


@cuda_only
def test_split_layers_on_a_gpu_give_the_plain_gradients_in_less_memory(monkeypatch):
    """bf16 on a GPU, the model's own layers (as a 4-bit base runs them), a row of 8,192 tokens in tiles of 1,024:
    the checkpointed model's loss and gradients within bf16 rounding, and a lower peak than the same
    offloaded layers recomputed whole (one layer's backward held every MLP tile and the whole row's
    projections at once)."""
    monkeypatch.setattr(modeling.MLP, "chunk", 1024)
    m, batch = bf16_model_and_row(modeling.Config(vocab_size=1024, hidden_size=256, intermediate_size=1024,
                                                  num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2))

    run = lambda layers: measured_step(m, batch, layers)

    whole = offload.offloaded_layers(m.model.layers)
    run(whole)  # the pinned host buffers allocated
    loss, plain, whole_peak = run(whole)
    split = speed.TrainingPlan(offload=True).training_layers(m)
    run(split)
    split_loss, grads, split_peak = run(split)
    torch.testing.assert_close(split_loss, loss, rtol=2e-3, atol=1e-2)
    assert (grads - plain).norm() / plain.norm() < 2e-2
    assert split_peak < whole_peak, (split_peak, whole_peak)


@cuda_only
def test_qwen3_5_long_rows_on_a_gpu_give_the_plain_gradients_in_less_memory(monkeypatch):
    """A Qwen3.5 of small widths in bf16 on a GPU, one row of 8,192 tokens: offloaded checkpoints, the MLP in
    tiles of 1,024 and each DeltaNet's delta rule in pieces of 512 (TrainingPlan(offload=True)) give the
    checkpointed model's loss and gradients within bf16 rounding, at a lower peak than the checkpointed
    model's, whose DeltaNet backward holds the whole row's chunk-by-chunk decays, scores and states."""
    monkeypatch.setattr(modeling.MLP, "chunk", 1024)
    m, batch = bf16_model_and_row(modeling.Config(
        vocab_size=1024, hidden_size=256, intermediate_size=768, num_hidden_layers=8, model_type="qwen3_5",
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, partial_rotary_factor=0.25, linear_num_key_heads=2,
        linear_num_value_heads=4, linear_key_head_dim=64, linear_value_head_dim=64, linear_conv_kernel_dim=4))
    measured_step(m, batch, None)
    loss, plain, plain_peak = measured_step(m, batch, None)
    split = speed.TrainingPlan(offload=True).training_layers(m)
    measured_step(m, batch, split)  # the pinned host buffers allocated
    split_loss, grads, split_peak = measured_step(m, batch, split)
    torch.testing.assert_close(split_loss, loss, rtol=2e-3, atol=1e-2)
    assert (grads - plain).norm() / plain.norm() < 2e-2
    assert split_peak < 0.5 * plain_peak, (split_peak, plain_peak)
