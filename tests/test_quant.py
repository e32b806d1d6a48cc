"""quant.py: 4-bit weights in bitsandbytes' layout, a model whose decoder is 4-bit, and QLoRA
training end to end.

bitsandbytes (requirements-dev.txt) is the reference for the format: it quantises on the CPU, and
our codes, scales and dequantised weights are compared with its own. transformers + peft are the
reference for the adapter: trained here on the 4-bit base, it must give the same logits in peft on
the model built from the dequantised weights."""

import json

import pytest
import torch
import torch.nn as nn
from torch.testing import assert_close

import infer
import lora
import model as M
import quant
import train
from conftest import both_families, hf_families

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: run on the GPU machine")


def bnb():
    return pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is the reference: pip install -r requirements-dev.txt")


def weight(dtype=torch.float32, shape=(96, 768), seed=0):
    """Roughly normal, like real weights, with a few outliers: 1,152 blocks of 64, 4.5 blocks of 256."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02
    w.view(-1)[::997] *= 8
    return w.to(dtype)


def nibbles(packed):
    """(n / 2,) bytes -> (n,) codes, the first of each pair from the high nibble."""
    return torch.stack([packed >> 4, packed & 0xF], dim=-1).flatten()


# ----------------------------------------------------------------------------------------------
# The format, against bitsandbytes


def test_code_tables_and_the_dynamic_map_are_bitsandbytes_own():
    F = bnb()
    for quant_type in quant.QUANT_TYPES:
        assert torch.equal(quant.code_table(quant_type), F.get_4bit_type(quant_type, device="cpu"))
    assert torch.equal(quant.dynamic_map(), F.create_dynamic_map())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_codes_and_absmax_equal_bitsandbytes_quantize_4bit(quant_type, dtype):
    F = bnb()
    w = weight(dtype)
    ours = quant.quantize(w, quant_type, double_quant=False)
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=False)
    assert torch.equal(ours["absmax"], state.absmax)  # float32, one per block of 64
    assert ours["codes"].dtype == torch.uint8 and ours["codes"].shape == (w.numel() // 2,)
    assert torch.equal(ours["codes"], packed.flatten())
    # Two codes a byte, the first in the high nibble: the first weight's code is the top 4 bits.
    table = quant.code_table(quant_type)
    first = (table * state.absmax[0] - w.flatten()[0].float()).abs().argmin()
    assert ours["codes"][0] >> 4 == first


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_double_quantised_absmax_equals_bitsandbytes_compress_statistics(quant_type):
    F = bnb()
    w = weight(torch.bfloat16)
    ours = quant.quantize(w, quant_type, double_quant=True)
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=True)
    assert torch.equal(ours["absmax_offset"], state.offset)  # the mean of the 1,152 absmax values
    assert torch.equal(ours["absmax_scale"], state.state2.absmax)  # one per 256, the last block short
    assert state.state2.blocksize == quant.NESTED_BLOCKSIZE and torch.equal(quant.dynamic_map(), state.state2.code)
    # The 8-bit codes of (absmax - offset): ours round exactly to the nearest value of the map, as
    # bitsandbytes' CUDA kernel does (dQuantize). Its CPU kernel looks the code up in a table of
    # 65,536 steps over [-1, 1] (csrc/cpu_ops.cpp, quantize_cpu_impl), so a value within a step
    # of the midpoint between two codes can get the other one. Only those may differ.
    differ = ours["absmax"] != state.absmax
    assert differ.float().mean() < 0.01
    absmax = quant.quantize(w, quant_type, double_quant=False)["absmax"]
    scaled, _ = quant.scale_blocks(torch.nn.functional.pad(absmax - state.offset, (0, -absmax.numel() % 256)), 256)
    code = quant.dynamic_map()
    mine, theirs = ours["absmax"][differ].long(), state.absmax[differ].long()
    assert ((mine - theirs).abs() == 1).all()
    midpoint = (code[mine] + code[theirs]) / 2
    assert ((scaled.flatten()[:absmax.numel()][differ] - midpoint).abs() <= 2 / 65535).all()


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_dequantized_weights_equal_bitsandbytes_dequantize_4bit(quant_type, double_quant):
    """From bitsandbytes' own packed codes and scales, our dequantize gives its weights bit for bit."""
    F = bnb()
    for dtype in (torch.bfloat16, torch.float32):
        w = weight(dtype, seed=1)
        packed, state = F.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=double_quant)
        nested = [quant.dynamic_map(), state.state2.absmax, state.offset] if double_quant else []
        ours = quant.dequantize(w.shape, dtype, packed.flatten(), quant.code_table(quant_type), state.absmax, *nested)
        assert ours.dtype == dtype and torch.equal(ours, F.dequantize_4bit(packed, state))


# ----------------------------------------------------------------------------------------------
# The layer and the model


def test_the_dequantized_weight_is_not_kept_for_backward():
    """Autograd keeps only the packed tensors: W is dequantised again in backward, and dX is what
    nn.Linear with the dequantised weight gives."""
    linear = nn.Linear(128, 192)
    layer = quant.Linear4bit(linear, quant.QuantConfig(), torch.float32)
    x = torch.randn(3, 5, 128, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    big = [(t.dtype, t.numel()) for t in saved if t.numel() >= 128 * 192 // 2]
    assert big == [(torch.uint8, 128 * 192 // 2)]  # the packed codes: nothing the size of W in float
    y.square().sum().backward()
    x2 = x.detach().clone().requires_grad_()
    plain = nn.functional.linear(x2, layer.weight(), layer.bias)
    plain.square().sum().backward()
    assert torch.equal(y, plain) and torch.equal(x.grad, x2.grad)


@both_families
def test_a_4bit_model_gives_the_logits_of_the_model_built_from_its_dequantized_weights(tiny_dir):
    m4, _ = quant.load_quantized(str(tiny_dir), quant.QuantConfig(), torch.float32, "cpu")
    linears = [m for m in m4.modules() if isinstance(m, quant.Linear4bit)]
    assert len(linears) == 7 * m4.config.num_hidden_layers and isinstance(m4.lm_head, nn.Linear)
    plain, _ = M.load_model(str(tiny_dir), dtype=torch.float32)
    # Quantised while loading, tensor by tensor: the codes of quantising the loaded weight.
    assert torch.equal(m4.model.layers[1].mlp.down_proj.codes, quant.quantize(plain.model.layers[1].mlp.down_proj.weight)["codes"])
    with torch.device("meta"):
        dequantized = M.QwenForCausalLM(m4.config)
    dequantized.load_state_dict(quant.dequantized_state_dict(m4), strict=True, assign=True)
    x = torch.randint(0, m4.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(m4(x), dequantized(x))
        assert (m4(x) - plain(x)).abs().max() > 1e-3  # 4 bits are not the original weights


def test_merging_into_4bit_weights_and_bad_quant_flags_are_clear_errors(tiny_dir, capsys):
    m4, _ = quant.load_quantized(str(tiny_dir), quant.QuantConfig("fp4", False), torch.float32, "cpu")
    lora.add_adapter(m4, lora.LoraConfig(r=2))
    with pytest.raises(lora.LoraError, match="the base model is in 4 bits"):
        lora.merge_lora(m4)
    base = ["--model", str(tiny_dir), "--device", "cpu", "--prompt", "hi"]
    assert infer.main(base + ["--quant_bits", "4", "--merge_lora", "true", "--adapters", "x"]) == 2
    assert "merge it into the bf16 base with merge.py" in capsys.readouterr().err
    assert infer.main(base + ["--quant_method", "bnb"]) == 2
    assert "--quant_method bnb needs --quant_bits 4" in capsys.readouterr().err
    assert train.main(["--model", "tiny", "--dataset", "x.json", "--device", "cpu", "--quant_bits", "4",
                       "--bnb_4bit_compute_dtype", "bfloat16"]) == 2
    assert "set --torch_dtype bfloat16 instead" in capsys.readouterr().err


@hf_families
def test_qlora_training_learns_and_its_adapter_loads_in_peft_on_the_dequantized_model(tmp_path, hf_checkpoint, capsys, family):
    from peft import PeftModel
    folder, hf = hf_checkpoint(family=family)
    rows = [{"query": f"question {i}?", "response": f"answer number {i}."} for i in range(4)]
    (tmp_path / "qa.json").write_text(json.dumps(rows))
    argv = ["--model", str(folder), "--dataset", str(tmp_path / "qa.json"), "--output_dir", str(tmp_path / "out"),
            "--device", "cpu", "--torch_dtype", "float32", "--quant_bits", "4", "--learning_rate", "5e-3",
            "--lr_scheduler_type", "constant", "--lora_rank", "16", "--lora_dropout", "0", "--max_steps", "6",
            "--save_steps", "6", "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1",
            "--logging_steps", "1"]
    assert train.main(argv) == 0
    (run,) = (tmp_path / "out").glob("v*")
    losses = [e["loss"] for e in map(json.loads, (run / "logging.jsonl").read_text().splitlines()) if "loss" in e]
    assert len(losses) == 6
    assert losses[-1] < losses[0] - 0.4, losses  # every row in every step: 6.86 -> 6.27
    ckpt = run / "checkpoint-6"
    assert json.loads((ckpt / "args.json").read_text())["quant_bits"] == 4

    ours, _ = quant.load_quantized(str(folder), quant.QuantConfig(), torch.float32, "cpu")
    lora.load_adapter(ours, ckpt)
    dequantized = type(hf)(hf.config).eval()  # transformers' Qwen2ForCausalLM or Qwen3ForCausalLM
    dequantized.load_state_dict(quant.dequantized_state_dict(ours), strict=True)
    theirs = PeftModel.from_pretrained(dequantized, ckpt).eval()
    x = torch.randint(0, hf.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_close(ours(x), theirs(x).logits, rtol=1e-4, atol=1e-4)
    # infer.py answers with the adapter on the 4-bit base
    capsys.readouterr()
    assert infer.main(["--adapters", str(ckpt), "--quant_bits", "4", "--device", "cpu", "--prompt", "question 1?",
                       "--max_new_tokens", "8", "--temperature", "0"]) == 0
    assert "decoder layers in 4-bit nf4" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# On the GPU: the compiled dequantisation, and training under the speed paths


@needs_cuda
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_compiled_dequantize_equals_the_plain_one(quant_type, double_quant):
    w = weight(torch.bfloat16, shape=(512, 1024)).cuda()
    layer = quant.Linear4bit(nn.Linear(1024, 512, bias=False), quant.QuantConfig(quant_type, double_quant), torch.bfloat16)
    layer.set_weight(w)
    args = ((512, 1024), torch.bfloat16, *layer.packed())
    assert torch.equal(quant.dequantize_fast(*args), quant.dequantize(*args))
    # Quantised on the GPU: the CPU's 4-bit codes (the offset, a mean, may round otherwise there).
    assert torch.equal(layer.codes.cpu(), quant.quantize(w.cpu(), quant_type, double_quant)["codes"])


@needs_cuda
def test_4bit_training_on_the_gpu_gives_the_same_gradients_eager_and_replayed(tiny_dir):
    """A micro-batch on the 4-bit base replayed as a CUDA graph (the default on one GPU) gives the
    eager micro-batch's gradients; both dequantise with the compiled kernel."""
    import speed
    with torch.cuda.stream(torch.cuda.Stream()):  # as train.py: graphs are recorded off the default stream
        m4, _ = quant.load_quantized(str(tiny_dir), quant.QuantConfig(), torch.float32, "cuda")
        lora.add_adapter(m4, lora.LoraConfig(lora_dropout=0.0))
        m4.train()
        m4.model.gradient_checkpointing = True
        params = lora.lora_parameters(m4)
        with torch.no_grad():
            for p in params:
                p.normal_(std=0.05)
                p.grad = torch.zeros_like(p)
        x = torch.randint(10, 900, (2, 64), generator=torch.Generator().manual_seed(0)).cuda()
        batch = {"input_ids": x, "labels": x, "label_positions": speed.every_position(2, 64, device="cuda")}
        loss_fn = train.CausalLMLoss(m4)

        def grads_of(micro_batch):
            for p in params:
                p.grad.zero_()
            micro_batch(batch, 1.0)
            torch.cuda.synchronize()
            return [p.grad.clone() for p in params]

        eager = grads_of(lambda b, scale: train.micro_batch(loss_fn, b, scale))
        graphed = speed.CUDAGraphMicroBatches(loss_fn, params)
        grads_of(graphed)  # runs eagerly once, then records
        for a, b in zip(eager, grads_of(graphed)):  # a replay
            assert_close(a, b, rtol=1e-5, atol=1e-7)


@needs_cuda
def test_4bit_decoding_replayed_as_cuda_graphs_gives_the_eager_tokens(tiny_dir, capsys):
    """infer.py --quant_bits 4 on a GPU decodes each token as a replayed CUDA graph (the default),
    with the compiled dequantisation inside: the same greedy tokens as eager decoding."""
    answers = {}
    for graph in ("true", "false"):
        capsys.readouterr()
        assert infer.main(["--model", str(tiny_dir), "--quant_bits", "4", "--device", "cuda", "--cuda_graph", graph,
                           "--prompt", "你是谁？", "--max_new_tokens", "24", "--temperature", "0"]) == 0
        answers[graph] = capsys.readouterr().out
    assert answers["true"] == answers["false"]
