"""model.py against transformers' Qwen2ForCausalLM and Qwen3ForCausalLM, and every loading error."""

import json
import shutil

import pytest
import torch

import fast_decode
import model
import speed
from conftest import (assert_left_padded_decoding_matches_rows_alone, compile_without_inductor, make_hf_checkpoint,
                      both_families, hf_families, random_tokens as tokens)
from model import Config, ModelError, load_model


def compiled_layers(m, checkpoint_inside=False):
    """speed.compiled_layers without CUDA graphs (CPU inductor), the checkpoint inside or outside."""
    return [speed.CompiledLayer(layer.compiled, checkpoint_inside) for layer in speed.compiled_layers(m)]


@pytest.mark.parametrize("family,tied,kv_heads", [("qwen2", False, 2), ("qwen2", True, 2), ("qwen2", False, 4),
                                                  ("qwen2", True, 1), ("qwen3", False, 2), ("qwen3", True, 1)])
def test_logits_match_transformers_float32(hf_checkpoint, family, tied, kv_heads):
    folder, hf = hf_checkpoint(family=family, tie_word_embeddings=tied, num_key_value_heads=kv_heads, num_hidden_layers=3)
    assert (folder / "model.safetensors.index.json").exists()  # the sharded path is exercised
    ours, _ = load_model(str(folder), dtype=torch.float32)
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, rtol=1e-5, atol=1e-5)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight if tied else True


def test_logits_match_transformers_bfloat16(hf_checkpoint):
    folder, hf = hf_checkpoint()
    hf = hf.to(torch.bfloat16)
    ours, _ = load_model(str(folder), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in ours.parameters())
    x = tokens()
    with torch.no_grad():
        a, b = ours(x).float(), hf(x).logits.float()
    # bf16 has 8 bits of mantissa: compare at that resolution, relative to the logits' scale.
    assert (a - b).abs().max() <= 0.02 * b.abs().max()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.95


def test_cached_incremental_logits_equal_full_forward(hf_checkpoint):
    folder, _ = hf_checkpoint(num_hidden_layers=2)
    m, _ = load_model(str(folder), dtype=torch.float32)
    x = tokens(batch=1, length=12)
    with torch.no_grad():
        full = m(x)
        cache = m.new_cache(1, 32)
        parts = [m(x[:, :5], cache=cache)]  # prefill 5, then 3 more at once, then one at a time
        parts.append(m(x[:, 5:8], cache=cache))
        parts += [m(x[:, t:t + 1], cache=cache) for t in range(8, 12)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.length == 12


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_equals_each_row_alone(hf_checkpoint, side):
    folder, hf = hf_checkpoint()
    m, _ = load_model(str(folder), dtype=torch.float32)
    rows = [tokens(1, n, seed=n)[0] for n in (9, 5, 7)]
    T = max(len(r) for r in rows)
    ids = torch.full((3, T), 7)
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(0, len(r)) if side == "right" else slice(T - len(r), T)
        ids[i, sl], mask[i, sl] = r, 1
    with torch.no_grad():
        batched = m(ids, attention_mask=mask)
        for i, r in enumerate(rows):
            alone = m(r[None])
            sl = slice(0, len(r)) if side == "right" else slice(T - len(r), T)
            torch.testing.assert_close(batched[i, sl], alone[0], rtol=1e-5, atol=1e-5)
            # transformers agrees on the same row alone
            torch.testing.assert_close(alone[0], hf(r[None]).logits[0], rtol=1e-5, atol=1e-5)


def test_left_padded_cached_decoding_matches_rows_alone(hf_checkpoint):
    folder, _ = hf_checkpoint()
    m, _ = load_model(str(folder), dtype=torch.float32)
    assert_left_padded_decoding_matches_rows_alone(m)


def test_tiny_model_loads_through_the_official_layout(tiny_dir):
    names = {p.name for p in tiny_dir.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "vocab.json", "merges.txt", "model.safetensors.index.json"} <= names
    import cli
    assert cli.model_dir("tiny") == tiny_dir  # --model tiny
    m, d = load_model(str(tiny_dir), dtype=torch.float32)
    assert m.config.tie_word_embeddings and m.config.num_key_value_heads < m.config.num_attention_heads
    assert not any(p.is_meta for p in m.parameters())


def test_tiny_model_is_deterministic(tmp_path, tiny_dir):
    import tiny
    tiny.make_tiny_checkpoint(tmp_path / "again")
    for f in ("tokenizer.json", "config.json", "model.safetensors.index.json"):
        assert (tmp_path / "again" / f).read_text() == (tiny_dir / f).read_text()
    a, _ = load_model(str(tmp_path / "again"), dtype=torch.float32)
    b, _ = load_model(str(tiny_dir), dtype=torch.float32)
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), n


def test_tiny_model_loads_in_transformers(tiny_dir):
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    ours, _ = load_model(str(tiny_dir), dtype=torch.float32)
    x = tokens(vocab=900)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, rtol=1e-5, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients(hf_checkpoint):
    folder, _ = hf_checkpoint()
    x = tokens()
    grads = []
    for ckpt in (False, True):
        m, _ = load_model(str(folder), dtype=torch.float32)
        m.train()
        m.model.gradient_checkpointing = ckpt
        m(x).logsumexp(-1).mean().backward()
        grads.append(m.model.layers[0].self_attn.q_proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


@hf_families
def test_compiled_checkpointed_layers_give_the_eager_gradients(hf_checkpoint, monkeypatch, family):
    """speed.compiled_layers, checkpointed from outside (no graphs; traced without inductor's code:
    conftest.compile_without_inductor) and from inside the compiled layer (as with CUDA graphs,
    which bench.py runs on a GPU; CPU inductor here, for Qwen2: a clean machine's gcc compiles it for
    a minute, and Qwen3's q/k norms change what is traced, not what inductor does with it). Two
    lengths: one static compile each."""
    folder, _ = hf_checkpoint(family=family, num_hidden_layers=2)
    grads = []
    for compiled, inside in ((False, False), (True, False), (True, True)):
        m, _ = load_model(str(folder), dtype=torch.float32)
        m.train()
        m.model.gradient_checkpointing = True
        with monkeypatch.context() as patch:
            if not inside or family == "qwen3":
                compile_without_inductor(patch)
            layers = compiled_layers(m, inside) if compiled else None
        for length in (16, 8):
            m.lm_head(m.model(tokens(length=length), layers=layers)).logsumexp(-1).mean().backward()
        grads.append([p.grad.clone() for p in m.parameters() if p.grad is not None])
        with torch.no_grad():  # forwards without gradients run the eager layers
            assert torch.equal(m(tokens()), m.lm_head(m.model.norm(run_eager_layers(m, tokens()))))
    assert len(grads[0]) == len(grads[1]) == len(grads[2]) > 0
    for eager, outside, inside in zip(*grads):
        torch.testing.assert_close(outside, eager, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(inside, eager, rtol=1e-4, atol=1e-5)


def test_compiled_lora_layers_compile_once_per_length(hf_checkpoint, without_inductor):
    """With frozen embeddings, the first layer's input would not require grad and the later ones'
    would: two compiles of every length. The model makes them one (counted by dynamo, whatever
    the backend)."""
    import lora
    from torch._dynamo.utils import counters
    folder, _ = hf_checkpoint(num_hidden_layers=2)
    m, _ = load_model(str(folder), dtype=torch.float32)
    lora.add_adapter(m, lora.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0))
    m.train()
    m.model.gradient_checkpointing = True
    layers = compiled_layers(m)
    torch._dynamo.reset()
    counters.clear()
    for length in (16, 8, 16):
        m.lm_head(m.model(tokens(length=length), layers=layers)).logsumexp(-1).mean().backward()
    assert counters["stats"]["unique_graphs"] == 2
    assert m.model.embed_tokens.weight.grad is None


def test_long_sequences_go_through_the_mlp_in_pieces_with_the_same_result(hf_checkpoint, monkeypatch, without_inductor):
    """MLP.chunk tokens at a time (2,048 for real; 5 here, so 16 tokens are 5 + 5 + 5 + 1):
    transformers' logits, and the unchunked gradients, eager and compiled with the checkpoint inside."""
    folder, hf = hf_checkpoint(num_hidden_layers=2)
    x = tokens(length=16)
    grads = []
    for chunk, compiled in ((2048, False), (5, False), (5, True)):
        monkeypatch.setattr(model.MLP, "chunk", chunk)
        m, _ = load_model(str(folder), dtype=torch.float32)
        if chunk == 5 and not compiled:
            pieces = []
            forward = model.MLP._forward
            monkeypatch.setattr(model.MLP, "_forward", lambda self, p: pieces.append(p.shape[1]) or forward(self, p))
            with torch.no_grad():
                torch.testing.assert_close(m(x), hf(x).logits, rtol=1e-5, atol=1e-5)
            assert pieces == [5, 5, 5, 1] * 2  # two layers
            monkeypatch.setattr(model.MLP, "_forward", forward)
        m.train()
        m.model.gradient_checkpointing = True
        # with the checkpoint inside the compiled layer, as with CUDA graphs
        layers = compiled_layers(m, checkpoint_inside=True) if compiled else None
        m.lm_head(m.model(x, layers=layers)).logsumexp(-1).mean().backward()
        grads.append([p.grad.clone() for p in m.parameters() if p.grad is not None])
    for whole, pieces, compiled in zip(*grads):
        torch.testing.assert_close(pieces, whole, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(compiled, whole, rtol=1e-4, atol=1e-5)


def run_eager_layers(m, x):
    cos, sin = model.rope_cos_sin(torch.arange(x.shape[1]).expand_as(x), m.config.head_dim, m.config.rope_theta, torch.float32)
    h = m.model.embed_tokens(x)
    for layer in m.model.layers:
        h = layer(h, cos, sin, None, True)
    return h


@hf_families
def test_fused_projections_change_neither_logits_nor_state_dict(hf_checkpoint, family):
    import lora
    folder, _ = hf_checkpoint(family=family, num_key_value_heads=2)
    m, _ = load_model(str(folder), dtype=torch.float32)
    lora.add_adapter(m, lora.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for p in lora.lora_parameters(m):
            p.normal_(0, 0.05)
    x = tokens()
    with torch.no_grad():
        live = m(x)  # one adapter active, unmerged: each fused projection runs its LoRALinears
        fast_decode.fuse_projections(m)
        torch.testing.assert_close(m(x), live, rtol=1e-5, atol=1e-5)
    lora.merge_lora(m)
    with torch.no_grad():
        before, sd = m(x), {k: v.clone() for k, v in m.state_dict().items()}
        fast_decode.fuse_projections(m)
        after = m(x)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    attn = m.model.layers[0].self_attn
    assert attn.fused_qkv is not None and m.model.layers[0].mlp.fused_gate_up is not None
    assert attn.q_proj.weight.data_ptr() == attn.fused_qkv.weight.data_ptr()  # views: nothing stored twice
    assert sd.keys() == m.state_dict().keys()
    assert all(torch.equal(sd[k], v) for k, v in m.state_dict().items())


# ---------------------------------------------------------------------------------------------
# Config reading


def qwen_config(**over):
    d = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584,
         "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
         "num_key_value_heads": 4, "vocab_size": 152064, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
         "tie_word_embeddings": False, "use_sliding_window": False, "sliding_window": 131072,
         "max_window_layers": 28, "hidden_act": "silu", "torch_dtype": "bfloat16"}
    d.update(over)
    return d


def test_config_reads_the_7b_config_and_rope_parameters():
    cfg = Config.from_dict(qwen_config())
    assert (cfg.head_dim, cfg.num_key_value_heads, cfg.rope_theta) == (128, 4, 1e6)
    d = qwen_config(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, dtype="bfloat16")
    del d["rope_theta"], d["torch_dtype"]
    cfg = Config.from_dict(d)
    assert cfg.rope_theta == 10000.0 and cfg.torch_dtype == "bfloat16"
    assert cfg.to_dict()["sliding_window"] == 131072  # unknown keys survive a round trip


def test_7b_shape_has_the_published_parameter_count():
    with torch.device("meta"):
        m = model.QwenForCausalLM(Config.from_dict(qwen_config()))
    assert sum(p.numel() for p in m.parameters()) == 7_615_616_512


@pytest.mark.parametrize("over,needle", [
    ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, "model_type='llama'"),
    ({"use_sliding_window": True}, "sliding-window attention"),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "RoPE scaling of type 'yarn'"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"layer_types": ["full_attention", "sliding_attention"]}, "sliding-window"),
    ({"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"]}, "'qwen3_moe' (a mixture-of-experts model)"),
    ({"model_type": "qwen3_5_moe", "architectures": ["Qwen3_5MoeForConditionalGeneration"]},
     "'qwen3_5_moe' (a mixture-of-experts model)"),
])
def test_config_refuses_what_it_cannot_reproduce(over, needle):
    with pytest.raises(ModelError, match=__import__("re").escape(needle)):
        Config.from_dict(qwen_config(**over))


def test_config_missing_key_is_named():
    d = qwen_config()
    del d["hidden_size"]
    with pytest.raises(ModelError, match="hidden_size"):
        Config.from_dict(d)


# ---------------------------------------------------------------------------------------------
# Loading errors


def copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_unexpected_and_misshaped_tensors_are_named(tmp_path, tiny_dir):
    from safetensors.torch import load_file, save_file
    folder = copy_model(tiny_dir, tmp_path / "m")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    key = "model.layers.1.self_attn.o_proj.weight"
    for name, change in (("model.norm.weight", "drop"), (key, "reshape")):
        shard = folder / index["weight_map"][name]
        sd = load_file(shard)
        if change == "drop":
            del sd[name]
            sd["model.extra.weight"] = torch.zeros(3)
            index["weight_map"]["model.extra.weight"] = shard.name
        else:
            sd[name] = torch.zeros(5, 5)
        save_file(sd, shard)
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelError) as e:
        load_model(str(folder))
    msg = str(e.value)
    assert "missing tensors: model.norm.weight" in msg
    assert "unexpected tensors: model.extra.weight" in msg
    assert f"{key} (5, 5) (expected (128, 128))" in msg


def test_pickle_checkpoints_are_refused(tmp_path, tiny_dir):
    folder = tmp_path / "m"
    folder.mkdir()
    shutil.copy(tiny_dir / "config.json", folder)
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ModelError, match="pickle weights.*safetensors only"):
        load_model(str(folder))


def test_incomplete_sharded_download_is_named(tmp_path, tiny_dir):
    folder = copy_model(tiny_dir, tmp_path / "m")
    victim = sorted(folder.glob("model-0000*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(ModelError, match=f"not in .*{victim.name}.*incomplete"):
        load_model(str(folder))


def test_missing_folder_and_file_instead_of_folder(tmp_path):
    with pytest.raises(ModelError, match="no such folder"):
        load_model(str(tmp_path / "nope"))
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ModelError, match="is a file"):
        load_model(str(f))


def test_hub_ids_are_fetched_with_only_the_needed_files(monkeypatch, tiny_dir):
    import huggingface_hub
    seen = {}

    def fake_snapshot_download(repo_id, allow_patterns=None, **kw):
        seen["repo_id"], seen["patterns"] = repo_id, allow_patterns
        return str(tiny_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    m, d = load_model("Qwen2.5-7B-Instruct", dtype=torch.float32)  # the tutorial's spelling
    assert seen["repo_id"] == "Qwen/Qwen2.5-7B-Instruct"
    assert "*.safetensors" in seen["patterns"] and not any(p.endswith(".bin") for p in seen["patterns"])
    assert d == tiny_dir


def test_hub_failure_is_a_clear_error(monkeypatch):
    import huggingface_hub

    def offline(repo_id, **kw):
        raise OSError("We have no connection")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ModelError, match="fetching Qwen/Qwen2.5-0.5B-Instruct from the Hugging Face hub failed.*HF_HUB_OFFLINE"):
        load_model("Qwen/Qwen2.5-0.5B-Instruct")


def test_kv_cache_overflow_is_an_error(tiny_dir):
    m, _ = load_model(str(tiny_dir), dtype=torch.float32)
    cache = m.new_cache(1, 4)
    with pytest.raises(ModelError, match="KV cache holds 4"):
        m(tokens(1, 5), cache=cache)


@pytest.mark.parametrize("tiny_dir", ["tiny", "tiny-qwen3", "tiny-qwen3_5"], indirect=True)
def test_static_cache_decoding_equals_full_forward(tiny_dir):
    """The fixed-shape cache behind CUDA-graph decoding computes the same logits as the eager path
    (Qwen3.5's DeltaNet states carried in its fixed buffers)."""
    m, _ = load_model(str(tiny_dir), dtype=torch.float32)
    x = tokens(1, 12, vocab=900)
    with torch.no_grad():
        full = m(x)
        cache = fast_decode.StaticKVCache(m.config, 1, 32)
        parts = [m(x[:, :4], cache=cache)]  # a prefill: positions 0..3
        parts += [m(x[:, 4:7], position_ids=torch.arange(4, 7)[None], cache=cache)]  # a later turn's: 4..6
        parts += [m(x[:, t:t + 1], position_ids=torch.tensor([[t]]), cache=cache) for t in range(7, 12)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)


def test_single_file_checkpoint_loads(tmp_path, tiny_dir):
    from transformers import Qwen2ForCausalLM as HF
    make_hf_checkpoint(tmp_path / "sharded", tiny_dir)
    hf = HF.from_pretrained(tmp_path / "sharded", dtype=torch.float32).eval()
    hf.save_pretrained(tmp_path / "single", max_shard_size="1GB")
    for f in ("tokenizer.json", "generation_config.json"):
        shutil.copy(tmp_path / "sharded" / f, tmp_path / "single" / f)
    assert (tmp_path / "single" / "model.safetensors").exists()
    assert not (tmp_path / "single" / "model.safetensors.index.json").exists()
    ours, _ = load_model(str(tmp_path / "single"), dtype=torch.float32)
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, rtol=1e-5, atol=1e-5)


def test_cut_short_shards_hostile_indexes_and_wrong_types_are_named(tmp_path, tiny_dir):
    folder = copy_model(tiny_dir, tmp_path / "m")
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:1000])  # a download cut short
    with pytest.raises(ModelError, match=f"{shard.name} is not a readable safetensors file.*fetch the model again"):
        load_model(str(folder))
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: "../../x.safetensors" for k in index["weight_map"]}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelError, match=r"names shard\(s\) outside"):
        load_model(str(folder))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, hidden_size="128")))
    with pytest.raises(ModelError, match="hidden_size is '128', not a number"):
        load_model(str(folder))
    (folder / "config.json").write_text(json.dumps([config]))
    with pytest.raises(ModelError, match="must hold a JSON object, not list"):
        load_model(str(folder))


def test_a_damaged_tiny_model_says_to_delete_it(tmp_path, monkeypatch):
    import cli
    import tiny
    monkeypatch.setenv("QWEN_LORA_HOME", str(tmp_path))
    folder = cli.model_dir("tiny")
    assert folder == tmp_path / tiny.TINY_VERSION["qwen2"]
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ModelError, match=f"the built-in tiny model in {folder} is damaged .* Delete that folder"):
        cli.model_dir("tiny")
    monkeypatch.setenv("QWEN_LORA_HOME", str(shard / "home"))  # under a file: cannot be written
    with pytest.raises(ModelError, match="could not be written .* Set QWEN_LORA_HOME"):
        cli.model_dir("tiny")
