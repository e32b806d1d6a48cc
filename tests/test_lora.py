"""lora.py: LoRA layers, adapters in PEFT's format both ways, several adapters, merge and unmerge.

transformers + peft are the reference: the same A and B must give the same logits in both."""

import json

import pytest
import torch
from torch.testing import assert_close

import lora
import model as M
from lora import LoraConfig, LoraError
from conftest import both_families, hf_families


def tiny_model(tiny_dir, dtype=torch.float32):
    m, _ = M.load_model(str(tiny_dir), dtype=dtype)
    return m


def randomize(m, name="default", std=0.05, seed=1):
    """Give adapter `name` random A and B, so it changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora.lora_parameters(m, name):
            p.copy_(torch.randn(p.shape, generator=g) * std)


def ids(vocab=500, seed=0):
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(m, x):
    return m(x).float()


# ----------------------------------------------------------------------------------------------
# The layer, parameters, merge


@both_families
def test_fresh_adapter_leaves_logits_unchanged(tiny_dir):
    m = tiny_model(tiny_dir)
    x = ids()
    base = logits(m, x)
    lora.add_adapter(m, LoraConfig())
    assert_close(logits(m, x), base, rtol=0, atol=0)


def test_all_linear_wraps_seven_projections_per_layer_and_never_lm_head(tiny_dir):
    m = tiny_model(tiny_dir)
    wrapped = lora.add_adapter(m, LoraConfig(target_modules="all-linear"))
    n = m.config.num_hidden_layers
    assert len(wrapped) == 7 * n
    assert {w.rsplit(".", 1)[-1] for w in wrapped} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                       "down_proj"}  # Qwen3.5's: tests/test_qwen3_5_lora.py
    assert not isinstance(m.lm_head, lora.LoRALinear)
    # Base state-dict keys are unchanged, so the checkpoint still loads with a strict key check.
    keys = m.state_dict().keys()
    assert "model.layers.0.self_attn.q_proj.weight" in keys and "model.layers.0.self_attn.q_proj.bias" in keys


def test_only_lora_parameters_require_grad_and_are_float32(tiny_dir):
    m = tiny_model(tiny_dir, torch.bfloat16)
    lora.add_adapter(m, LoraConfig(r=4))
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert all(p.dtype == torch.float32 for p in lora.lora_parameters(m))
    assert m.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert len(lora.lora_parameters(m)) == len(trainable)
    # PEFT's init: B is zero, A is not.
    layer = m.model.layers[0].mlp.down_proj
    assert layer.lora_B["default"].weight.abs().sum() == 0 and layer.lora_A["default"].weight.abs().sum() > 0
    # Gradients reach A and B only, and the output keeps the base dtype.
    m.train()
    randomize(m)
    out = m(ids())
    assert out.dtype == torch.bfloat16
    out.float().square().mean().backward()
    assert all(p.grad is not None for p in lora.lora_parameters(m))
    assert all(p.grad is None for n, p in m.named_parameters() if not p.requires_grad)


def test_lora_matmuls_run_in_the_input_dtype_as_peft_under_autocast():
    # A and B stay float32 parameters; in a bf16 model their matmuls run in bf16, exactly as peft's
    # float32 lora_A / lora_B do under torch.autocast (how the HF Trainer, and ms-swift, train bf16).
    # (Bit for bit with a power-of-two scale such as alpha / r = 32 / 8, as here with 2.)
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 24).to(torch.bfloat16)
    layer = lora.LoRALinear(base)
    layer.add("default", r=4, scale=2.0, dropout=0.0)
    layer.active = "default"
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    x = torch.randn(3, 16).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = layer.lora_A["default"], layer.lora_B["default"]  # float32 nn.Linear, as in peft
        expected = torch.nn.functional.linear(x, base.weight, base.bias) + b(a(x)) * 2.0
    out = layer(x)
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected)
    out.float().sum().backward()
    assert layer.lora_A["default"].weight.grad.dtype == torch.float32
    assert layer.lora_B["default"].weight.grad.dtype == torch.float32


def test_count_parameters(tiny_dir, capsys):
    m = tiny_model(tiny_dir)
    _, base_total = lora.count_parameters(m)
    c = m.config
    assert base_total == sum(t.numel() for t in M.QwenForCausalLM(c).state_dict().values()) - c.vocab_size * c.hidden_size  # tied once
    lora.add_adapter(m, LoraConfig(r=4, target_modules=["q_proj", "down_proj"]))
    q = 4 * (c.hidden_size + c.hidden_size)
    down = 4 * (c.intermediate_size + c.hidden_size)
    expected = (q + down) * c.num_hidden_layers
    assert lora.count_parameters(m) == (expected, base_total + expected)
    lora.print_trainable_parameters(m)
    assert capsys.readouterr().out == (f"trainable params: {expected:,} || all params: {base_total + expected:,} "
                                       f"|| trainable%: {100 * expected / (base_total + expected):.4f}\n")


def test_qwen25_7b_shape_has_20185088_lora_parameters_at_r8():
    cfg = M.Config(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                   num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False)
    with torch.device("meta"):
        m = M.QwenForCausalLM(cfg)
    assert lora.count_parameters(m) == (7_615_616_512, 7_615_616_512)  # nothing frozen yet: all trainable
    lora.add_adapter(m, LoraConfig(r=8, target_modules="all-linear"))
    assert lora.count_parameters(m) == (20_185_088, 7_635_801_600)


@both_families
def test_merged_model_matches_unmerged_and_merging_twice_is_a_no_op(tiny_dir):
    m = tiny_model(tiny_dir)
    lora.add_adapter(m, LoraConfig(r=8, lora_alpha=16))
    randomize(m)
    x = ids()
    unmerged = logits(m, x)
    lora.merge_lora(m)
    merged = logits(m, x)
    assert_close(merged, unmerged, rtol=1e-4, atol=1e-4)
    w = m.model.layers[1].mlp.up_proj.weight.clone()
    lora.merge_lora(m)
    assert torch.equal(m.model.layers[1].mlp.up_proj.weight, w)
    assert_close(logits(m, x), merged, rtol=0, atol=0)


def test_unmerge_restores_the_base_weights(tiny_dir):
    m = tiny_model(tiny_dir)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    lora.add_adapter(m, LoraConfig(use_rslora=True))
    randomize(m, std=0.2)
    lora.merge_lora(m)
    assert not torch.equal(m.model.layers[0].self_attn.q_proj.weight, before["model.layers.0.self_attn.q_proj.weight"])
    lora.unmerge_lora(m)
    for k, v in before.items():
        assert_close(m.state_dict()[k], v, rtol=0, atol=1e-6)


def test_merge_in_bf16_adds_the_float32_delta_and_rounds_once(tiny_dir):
    m = tiny_model(tiny_dir, torch.bfloat16)
    lora.add_adapter(m, LoraConfig())
    randomize(m, std=0.01)
    layer = m.model.layers[0].self_attn.o_proj
    w0 = layer.weight.clone()
    expected = (w0.float() + 32 / 8 * layer.lora_B["default"].weight @ layer.lora_A["default"].weight).bfloat16()
    lora.merge_lora(m)
    assert torch.equal(layer.weight, expected)
    lora.unmerge_lora(m)
    # Back within bf16 rounding: half a unit in the last place on merge, and again on unmerge.
    bound = 2**-7 * torch.maximum(expected.float().abs(), w0.float().abs())
    assert ((layer.weight.float() - w0.float()).abs() <= bound).all()


def test_switching_adapters_gives_each_adapters_own_logits(tiny_dir):
    x = ids()
    ref = {}
    for name, seed, cfg in (("a", 1, LoraConfig()), ("b", 2, LoraConfig(r=4, lora_alpha=8, target_modules=["v_proj"]))):
        single = tiny_model(tiny_dir)
        lora.add_adapter(single, cfg, name)
        randomize(single, name, seed=seed)
        ref[name] = logits(single, x)
    m = tiny_model(tiny_dir)
    base = logits(m, x)
    lora.add_adapter(m, LoraConfig(), "a")
    randomize(m, "a", seed=1)
    lora.add_adapter(m, LoraConfig(r=4, lora_alpha=8, target_modules=["v_proj"]), "b")
    randomize(m, "b", seed=2)
    assert lora.adapter_names(m) == ["a", "b"] and lora.active_adapter(m) == "b"
    assert_close(logits(m, x), ref["b"])
    lora.set_active_adapter(m, "a")
    assert_close(logits(m, x), ref["a"])
    lora.merge_lora(m)  # switching away from a merged adapter unmerges it first
    lora.set_active_adapter(m, "b")
    assert_close(logits(m, x), ref["b"], rtol=1e-4, atol=1e-4)
    lora.set_active_adapter(m, None)
    assert_close(logits(m, x), base, rtol=1e-4, atol=1e-4)
    with pytest.raises(LoraError, match=r"no adapter named 'c' is loaded \(loaded: 'a', 'b'\)"):
        lora.set_active_adapter(m, "c")


def test_lora_state_dict_round_trip_uses_peft_keys(tiny_dir):
    m = tiny_model(tiny_dir)
    lora.add_adapter(m, LoraConfig(r=4, target_modules=["q_proj"]))
    randomize(m)
    sd = {k: v.clone() for k, v in lora.lora_state_dict(m).items()}
    assert sorted(sd)[:2] == ["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
                              "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    assert sd["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, m.config.hidden_size)
    other = tiny_model(tiny_dir)
    lora.add_adapter(other, LoraConfig(r=4, target_modules=["q_proj"]))
    lora.load_lora_state_dict(other, sd)
    assert_close(logits(other, ids()), logits(m, ids()))


# ----------------------------------------------------------------------------------------------
# Against peft on transformers' Qwen2ForCausalLM


def peft_model(hf, r, alpha, targets, rslora=False):
    from peft import LoraConfig as PeftLoraConfig, get_peft_model
    cfg = PeftLoraConfig(r=r, lora_alpha=alpha, target_modules=targets, use_rslora=rslora, lora_dropout=0.0,
                         task_type="CAUSAL_LM")
    return get_peft_model(hf, cfg).eval()


@pytest.mark.parametrize("targets, r, alpha, rslora", [("all-linear", 8, 32, False), (["q_proj", "v_proj", "down_proj"], 4, 12, True)])
@hf_families
def test_logits_equal_peft_for_the_same_a_and_b(hf_checkpoint, targets, r, alpha, rslora, family):
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    folder, hf = hf_checkpoint(family=family)
    ours = M.load_model(str(folder), dtype=torch.float32)[0]
    x = ids(hf.config.vocab_size)
    lora.add_adapter(ours, LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, use_rslora=rslora))
    theirs = peft_model(hf, r, alpha, targets, rslora)
    # ours -> peft
    randomize(ours)
    set_peft_model_state_dict(theirs, lora.lora_state_dict(ours))
    with torch.no_grad():
        assert_close(logits(ours, x), theirs(x).logits, rtol=1e-4, atol=1e-4)
    # peft -> ours
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_" in n:
                p.normal_(std=0.05)
    lora.load_lora_state_dict(ours, get_peft_model_state_dict(theirs))
    with torch.no_grad():
        assert_close(logits(ours, x), theirs(x).logits, rtol=1e-4, atol=1e-4)


@hf_families
def test_our_saved_adapter_loads_in_peft_with_the_same_logits(hf_checkpoint, tmp_path, family):
    from peft import PeftModel
    folder, hf = hf_checkpoint(family=family)
    ours = M.load_model(str(folder), dtype=torch.float32)[0]
    lora.add_adapter(ours, LoraConfig(r=4, lora_alpha=12, target_modules=["k_proj", "o_proj", "up_proj"], use_rslora=True))
    randomize(ours)
    lora.save_adapter(ours, tmp_path / "ad", base_model_name_or_path=str(folder))
    saved = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["task_type"] == "CAUSAL_LM" and saved["r"] == 4
    assert saved["target_modules"] == ["k_proj", "o_proj", "up_proj"] and saved["use_rslora"] is True
    from safetensors import safe_open
    with safe_open(tmp_path / "ad" / "adapter_model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
    theirs = PeftModel.from_pretrained(hf, tmp_path / "ad").eval()
    x = ids(hf.config.vocab_size)
    with torch.no_grad():
        assert_close(logits(ours, x), theirs(x).logits, rtol=1e-4, atol=1e-4)


@hf_families
def test_peft_saved_adapter_loads_here_with_the_same_logits(hf_checkpoint, tmp_path, family):
    folder, hf = hf_checkpoint(family=family)
    theirs = peft_model(hf, 6, 20, ["gate_proj", "v_proj"], rslora=True)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_" in n:
                p.normal_(std=0.05)
    theirs.save_pretrained(tmp_path / "peft")
    ours = M.load_model(str(folder), dtype=torch.float32)[0]
    cfg = lora.load_adapter(ours, tmp_path / "peft")
    assert (cfg.r, cfg.lora_alpha, cfg.use_rslora) == (6, 20, True)
    assert lora.active_adapter(ours) == "default"
    assert sum(isinstance(mod, lora.LoRALinear) for mod in ours.modules()) == 2 * hf.config.num_hidden_layers
    x = ids(hf.config.vocab_size)
    with torch.no_grad():
        assert_close(logits(ours, x), theirs(x).logits, rtol=1e-4, atol=1e-4)


def test_ms_swift_checkpoint_folder_loads_and_gives_its_args(tiny_dir, tmp_path):
    m = tiny_model(tiny_dir)
    lora.add_adapter(m, LoraConfig())
    randomize(m)
    ckpt = tmp_path / "output" / "v0-20250101-000000" / "checkpoint-10"
    lora.save_adapter(m, ckpt, base_model_name_or_path="/root/.cache/modelscope/hub/Qwen/Qwen2___5-7B-Instruct")
    (ckpt / "args.json").write_text(json.dumps({"model": "Qwen/Qwen2.5-7B-Instruct", "system": "You are a cat.", "lora_rank": 8}))
    args = lora.checkpoint_args(ckpt)
    assert args["model"] == "Qwen/Qwen2.5-7B-Instruct" and args["system"] == "You are a cat." and args["lora_rank"] == 8
    (ckpt / "args.json").write_text(json.dumps({"model_id_or_path": "qwen/Qwen2-7B", "system": None}))
    assert lora.checkpoint_args(ckpt) == {"model_id_or_path": "qwen/Qwen2-7B", "model": "qwen/Qwen2-7B", "system": None}
    (ckpt / "args.json").unlink()
    assert lora.checkpoint_args(ckpt)["model"] == "/root/.cache/modelscope/hub/Qwen/Qwen2___5-7B-Instruct"
    other = tiny_model(tiny_dir)
    lora.load_adapter(other, ckpt, "sft")
    assert_close(logits(other, ids()), logits(m, ids()))


# ----------------------------------------------------------------------------------------------
# Errors a user can act on


def test_target_that_matches_nothing_lists_the_layers_that_exist(tiny_dir):
    m = tiny_model(tiny_dir)
    with pytest.raises(LoraError) as e:
        lora.add_adapter(m, LoraConfig(target_modules=["q_proj", "qkv_proj"]))
    msg = str(e.value)
    assert "'qkv_proj' match no linear layer" in msg
    assert "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj" in msg
    assert "model.layers.0.self_attn.q_proj" in msg
    assert lora.adapter_names(m) == []
    with pytest.raises(LoraError, match="'lm_head' match no linear layer"):  # tied to the embeddings here
        lora.add_adapter(m, LoraConfig(target_modules=["lm_head"]))


def test_adapter_of_another_shape_names_the_tensor_and_both_shapes(hf_checkpoint, tmp_path):
    small_dir, _ = hf_checkpoint("small")
    big_dir, _ = hf_checkpoint("big", hidden_size=96, intermediate_size=160)
    big = M.load_model(str(big_dir), dtype=torch.float32)[0]
    lora.add_adapter(big, LoraConfig(r=4, target_modules=["q_proj"]))
    lora.save_adapter(big, tmp_path / "ad")
    small = M.load_model(str(small_dir), dtype=torch.float32)[0]
    x = ids(960)
    base = logits(small, x)
    with pytest.raises(LoraError) as e:
        lora.load_adapter(small, tmp_path / "ad")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight has shape [4, 96], but this model needs [4, 64]" in str(e.value)
    assert str(tmp_path / "ad" / "adapter_model.safetensors") in str(e.value)
    assert lora.adapter_names(small) == []  # a failed load leaves the model as it was
    assert_close(logits(small, x), base, rtol=0, atol=0)


def test_adapter_keys_for_missing_layers_are_an_error(hf_checkpoint, tmp_path):
    deep_dir, _ = hf_checkpoint("deep", num_hidden_layers=3)
    shallow_dir, _ = hf_checkpoint("shallow")
    deep = M.load_model(str(deep_dir), dtype=torch.float32)[0]
    lora.add_adapter(deep, LoraConfig(r=2, target_modules=["o_proj"]))
    lora.save_adapter(deep, tmp_path / "ad")
    shallow = M.load_model(str(shallow_dir), dtype=torch.float32)[0]
    with pytest.raises(LoraError, match=r"LoRA weights for model\.layers\.2\.self_attn\.o_proj, which match no linear layer"):
        lora.load_adapter(shallow, tmp_path / "ad")


def test_base_model_mismatch_warns_on_one_line(tiny_dir, tmp_path, capsys):
    m = tiny_model(tiny_dir)
    lora.add_adapter(m, LoraConfig(r=2))
    lora.save_adapter(m, tmp_path / "ad", base_model_name_or_path="Qwen/Qwen2.5-7B-Instruct")
    lora.load_adapter(tiny_model(tiny_dir), tmp_path / "ad", base_model_name_or_path="/models/Qwen2.5-7B-Instruct/")
    assert capsys.readouterr().err == ""
    lora.load_adapter(tiny_model(tiny_dir), tmp_path / "ad", base_model_name_or_path="Qwen/Qwen2.5-0.5B-Instruct")
    err = capsys.readouterr().err
    assert err.startswith("warning:") and err.count("\n") == 1
    assert "'Qwen/Qwen2.5-7B-Instruct'" in err and "'Qwen/Qwen2.5-0.5B-Instruct'" in err


def test_bad_adapter_folders_say_what_is_wrong(tiny_dir, tmp_path):
    m = tiny_model(tiny_dir)
    with pytest.raises(LoraError, match="adapter folder .*nope does not exist"):
        lora.load_adapter(m, tmp_path / "nope")
    with pytest.raises(LoraError, match="checkpoint folder .*nope does not exist"):
        lora.checkpoint_args(tmp_path / "nope")
    run = tmp_path / "run"
    (run / "checkpoint-5").mkdir(parents=True)
    (run / "checkpoint-5" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(LoraError, match=r"no adapter_config.json.*\(checkpoint-5\): pass one of them"):
        lora.load_adapter(m, run)
    with pytest.raises(LoraError, match="has adapter_config.json but no adapter_model.safetensors"):
        lora.load_adapter(m, run / "checkpoint-5")
    (run / "checkpoint-5" / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(LoraError, match="peft_type 'IA3'; only LoRA adapters"):
        lora.load_adapter(m, run / "checkpoint-5")
    (run / "checkpoint-5" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "use_dora": True}))
    with pytest.raises(LoraError, match="sets use_dora, which this toolkit does not implement"):
        lora.load_adapter(m, run / "checkpoint-5")
    (run / "checkpoint-5" / "adapter_config.json").write_text("{\n  \"peft_type\": \"LORA\",\n}")
    with pytest.raises(LoraError, match=r"adapter_config.json is not valid JSON \(line 3"):
        lora.load_adapter(m, run / "checkpoint-5")
    assert lora.adapter_names(m) == []


def test_adapter_config_values_of_the_wrong_type_and_a_cut_short_adapter_are_named(tiny_dir, tmp_path):
    m = tiny_model(tiny_dir)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")  # cut short
    for key, value in (("lora_alpha", "16"), ("r", "eight"), ("r", 4.5)):
        (ckpt / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", key: value}))
        with pytest.raises(LoraError, match=f"{key} is {value!r}, not a number"):
            lora.load_adapter(m, ckpt)
    (ckpt / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    with pytest.raises(LoraError, match="adapter_model.safetensors is not a readable safetensors file"):
        lora.load_adapter(m, ckpt)


@pytest.mark.parametrize("init", [True, "gaussian", False])
def test_init_weights_draw_peft_s_a_and_b_for_the_same_seed(hf_checkpoint, init):
    """--init_weights true / gaussian / false: A and B as peft's init_lora_weights draws them, number for
    number from the same seed (and B zero unless false)."""
    from peft import LoraConfig as PeftLoraConfig, get_peft_model, get_peft_model_state_dict
    folder, hf = hf_checkpoint()
    ours = M.load_model(str(folder), dtype=torch.float32)[0]
    torch.manual_seed(3)
    lora.add_adapter(ours, LoraConfig(r=4, lora_alpha=8, init_lora_weights=init))
    torch.manual_seed(3)
    theirs = get_peft_model(hf, PeftLoraConfig(r=4, lora_alpha=8, target_modules=list(lora.ALL_LINEAR),
                                               init_lora_weights=init))
    want = get_peft_model_state_dict(theirs)
    for key, value in lora.lora_state_dict(ours).items():
        assert torch.equal(value, want[key]), key
        assert (key.endswith("lora_B.weight") and init is not False) == (not value.any())
    assert lora.INIT_WEIGHTS == {"true": True, "false": False, "gaussian": "gaussian"}
    with pytest.raises(lora.LoraError, match="init_lora_weights='pissa': only true, false, gaussian are here"):
        lora.add_adapter(ours, LoraConfig(init_lora_weights="pissa"), "other")
