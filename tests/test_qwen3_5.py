"""Qwen3.5 / 3.6 / 3.8 (model_type qwen3_5): the text model against transformers' Qwen3_5ForCausalLM
and Qwen3_5ForConditionalGeneration (float32, their PyTorch fallback for the delta rule and the
conv), the Gated DeltaNet's two forms against each other and against transformers' functions,
decoding with the recurrent state, packed rows, the vision-language checkpoint layout and the MoE
refusal. Tiny checkpoints: conftest.make_hf_checkpoint(family="qwen3_5" / "qwen3_5_vl")."""

import json

import pytest
import torch

import data
import decode
import deltanet
import model as modeling
import train
from conftest import assert_left_padded_decoding_matches_rows_alone, random_tokens as tokens
from model import Config, ModelError, load_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def qwen3_5(tmp_path_factory, tiny_dir):
    """(folder, transformers' Qwen3_5ForCausalLM, our model) of one tiny text-only checkpoint."""
    from conftest import make_hf_checkpoint
    folder = tmp_path_factory.mktemp("qwen3_5") / "hf"
    # weights drawn 5x wider than transformers' default, so that greedy decoding does not repeat one token
    hf = make_hf_checkpoint(folder, tiny_dir, family="qwen3_5", initializer_range=0.1)
    ours, _ = load_model(str(folder), dtype=torch.float32)
    return folder, hf, ours


# ---------------------------------------------------------------------------------------------
# The model against transformers


@pytest.mark.parametrize("tied", [False, True])
def test_logits_match_transformers_float32(hf_checkpoint, tied):
    folder, hf = hf_checkpoint(family="qwen3_5", tie_word_embeddings=tied, initializer_range=0.1)
    ours, _ = load_model(str(folder), dtype=torch.float32)
    assert [type(l.linear_attn if hasattr(l, "linear_attn") else l.self_attn).__name__ for l in ours.model.layers] == \
        ["GatedDeltaNet"] * 3 + ["Attention"]
    x = tokens(length=150)  # three chunks of the delta rule, the last one partial
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, rtol=1e-5, atol=1e-5)
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == tied


def test_logits_match_transformers_bfloat16(qwen3_5):
    """bf16 weights, float32 delta rule and recurrent state (as transformers' fallback keeps them)."""
    folder, hf, _ = qwen3_5
    import copy
    theirs = copy.deepcopy(hf).to(torch.bfloat16)
    ours, _ = load_model(str(folder), dtype=torch.bfloat16)
    x = tokens(length=100)
    with torch.no_grad():
        a, b = ours(x).float(), theirs(x).logits.float()
    # bf16 has 8 bits of mantissa: compare at that resolution, relative to the logits' scale.
    assert (a - b).abs().max() <= 0.02 * b.abs().max()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.95


def test_greedy_decoding_equals_transformers(qwen3_5):
    _, hf, ours = qwen3_5
    prompt = tokens(1, 9, seed=3)
    with torch.no_grad():
        theirs = hf.generate(prompt, max_new_tokens=12, do_sample=False, min_new_tokens=12)[0, 9:].tolist()
    mine = list(decode.generate(ours, prompt[0].tolist(), max_new_tokens=12, stop_ids=set()))
    assert mine == theirs and len(set(mine)) > 6


def test_cached_decoding_equals_the_full_forward(qwen3_5):
    """Prefill (two chunks of the delta rule), then 3 tokens at once, then one at a time with the
    recurrent and convolution states: the full forward's logits."""
    _, _, m = qwen3_5
    x = tokens(batch=2, length=75, seed=4)
    with torch.no_grad():
        full = m(x)
        cache = m.new_cache(2, 80)
        parts = [m(x[:, :67], cache=cache), m(x[:, 67:70], cache=cache)]
        parts += [m(x[:, t:t + 1], cache=cache) for t in range(70, 75)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.k[0] is None and cache.k[3] is not None  # keys and values for the attention layer only
    conv, state = cache.linear_state(0)
    assert conv.shape == (2, 2 * 2 * 16 + 4 * 8, 3) and state.shape == (2, 4, 16, 8) and state.dtype == torch.float32


def test_a_recurrent_state_is_not_rewound(qwen3_5):
    _, _, m = qwen3_5
    cache = m.new_cache(1, 32)
    with torch.no_grad():
        m(tokens(1, 10), cache=cache)
        cache.length = 5  # what reusing a chat's common beginning does with a KV cache
        with pytest.raises(ModelError, match="cannot be rewound"):
            m(tokens(1, 3), cache=cache)
        cache.length = 0  # a new text starts from fresh states
        torch.testing.assert_close(m(tokens(1, 10), cache=cache), m(tokens(1, 10)), rtol=1e-5, atol=1e-5)


def test_left_padded_cached_decoding_matches_rows_alone(qwen3_5):
    """Padding is zeroed before the DeltaNet: it writes nothing, so the state starts at the row."""
    _, _, m = qwen3_5
    assert_left_padded_decoding_matches_rows_alone(m)


# ---------------------------------------------------------------------------------------------
# Packed rows: no state and no convolution crosses a row's start


def rows_alone(m, rows):
    with torch.no_grad():
        return [m.model(torch.tensor(r["input_ids"])[None])[0] for r in rows]


def test_packed_rows_equal_each_row_alone(qwen3_5):
    """train.py's packing (data.concat_rows, train.make_batch: one sequence, cu_seqlens and
    position_ids restarting at 0) and a batch of packed rows with segment ids: each sample's
    hidden states are those of the sample alone."""
    _, _, m = qwen3_5
    rows = [{"input_ids": tokens(1, n, seed=n)[0].tolist(), "labels": tokens(1, n, seed=n)[0].tolist()}
            for n in (70, 9, 2, 30)]
    alone = rows_alone(m, rows)
    one = train.make_batch([data.concat_rows(rows)], pad_id=0, device="cpu", pad_to=16)
    assert "cu_seqlens" in one
    two = data.collate([data.concat_rows(rows[:2]), data.concat_rows(rows[2:])], pad_id=0)  # segment ids, padding
    with torch.no_grad():
        h1 = m.model(one["input_ids"], position_ids=one["position_ids"], cu_seqlens=one["cu_seqlens"])[0]
        h2 = m.model(two["input_ids"], two["attention_mask"], two["position_ids"])
    starts = [0, 70, 79, 81]
    for r, s, want in zip(rows, starts, alone):
        torch.testing.assert_close(h1[s:s + len(want)], want, rtol=1e-5, atol=1e-5)
    for (b, s), want in zip([(0, 0), (0, 70), (1, 0), (1, 2)], alone):
        torch.testing.assert_close(h2[b, s:s + len(want)], want, rtol=1e-5, atol=1e-5)


def test_packed_rows_train_with_gradients_through_the_chunked_rule(qwen3_5):
    """The loss of a packed pass is the summed loss of its rows, and so are the gradients."""
    _, _, m = qwen3_5
    rows = [{"input_ids": tokens(1, n, seed=n)[0].tolist(), "labels": tokens(1, n, seed=n)[0].tolist()}
            for n in (40, 30)]
    params = list(m.parameters())
    loss_fn = train.CausalLMLoss(m)

    def loss_and_grads(batches):
        total = sum(loss_fn(**b) for b in batches)
        return total.detach(), torch.autograd.grad(total, params)

    packed = loss_and_grads([train.make_batch([data.concat_rows(rows)], pad_id=0, device="cpu")])
    # concat_rows does not train a row's first label; alone, the first label is never predicted either
    each = loss_and_grads([train.make_batch([r], pad_id=0, device="cpu") for r in rows])
    torch.testing.assert_close(packed[0], each[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(packed[1], each[1]):
        # 1e-4: the loss sums 68 tokens' cross-entropies (about 470); each gradient is a float32 sum over
        # them, taken in another order when the rows run packed (unpacked rows of another length)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# The Gated DeltaNet's pieces


def random_rule_inputs(B=2, T=150, Hk=2, Hv=4, dk=16, dv=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(B, T, Hk, dk, generator=g), torch.randn(B, T, Hk, dk, generator=g)
    v = torch.randn(B, T, Hv, dv, generator=g)
    decay = -torch.rand(B, T, Hv, generator=g) * 0.2  # g <= 0
    beta = torch.rand(B, T, Hv, generator=g)
    state = torch.randn(B, Hv, dk, dv, generator=g)
    return q, k, v, decay, beta, state


def test_chunked_and_recurrent_rules_equal_each_other_and_transformers():
    from transformers.models.qwen3_5.modeling_qwen3_5 import (torch_chunk_gated_delta_rule,
                                                              torch_recurrent_gated_delta_rule)
    q, k, v, g, beta, state = random_rule_inputs()
    # ours take q and k normalised, q scaled, and heads already shared; transformers' do that inside
    qn = (deltanet.l2norm(q) * 16 ** -0.5).repeat_interleave(2, dim=2)
    kn = deltanet.l2norm(k).repeat_interleave(2, dim=2)
    chunked = deltanet.chunked_delta_rule(qn, kn, v, g, beta, state)
    recurrent = deltanet.recurrent_delta_rule(qn, kn, v, g, beta, state)
    kw = dict(initial_state=state, output_final_state=True, use_qk_l2norm_in_kernel=True)
    theirs_chunked = torch_chunk_gated_delta_rule(q, k, v, g, beta, **kw)
    theirs_recurrent = torch_recurrent_gated_delta_rule(q, k, v, g, beta, **kw)
    for ours, theirs in ((chunked, recurrent), (chunked, theirs_chunked), (recurrent, theirs_recurrent)):
        torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-5)  # outputs (B, T, H, dv)
        torch.testing.assert_close(ours[1], theirs[1], rtol=1e-5, atol=1e-5)  # final states (B, H, dk, dv)


@pytest.mark.parametrize("chunk", [64, 16, 7])
def test_the_chunk_size_changes_nothing(chunk):
    q, k, v, g, beta, state = random_rule_inputs(T=50, Hk=4)
    q, k = deltanet.l2norm(q) * 0.25, deltanet.l2norm(k)
    out, final = deltanet.chunked_delta_rule(q, k, v, g, beta, state, chunk=chunk)
    ref, ref_final = deltanet.recurrent_delta_rule(q, k, v, g, beta, state)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(final, ref_final, rtol=1e-5, atol=1e-5)


def test_causal_conv_equals_transformers_and_carries_its_state():
    from transformers.models.qwen3_5.modeling_qwen3_5 import causal_conv1d_fn
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 11, 6, generator=g), torch.randn(6, 1, 4, generator=g)
    whole, _ = deltanet.causal_conv(x, w)
    torch.testing.assert_close(whole, causal_conv1d_fn(x.transpose(1, 2), w.squeeze(1), activation="silu").transpose(1, 2))
    first, state = deltanet.causal_conv(x[:, :2], w)  # fewer tokens than the kernel: the state keeps zeros too
    second, state = deltanet.causal_conv(x[:, 2:7], w, state)
    third, _ = deltanet.causal_conv(x[:, 7:], w, state)
    torch.testing.assert_close(torch.cat([first, second, third], dim=1), whole)


def test_rows_of_unpacks_each_run_and_packed_back_restores_it():
    seg = torch.tensor([[1, 1, 2, 2, 2, 0], [1, 2, 3, 3, 0, 0]])
    index, valid = deltanet.rows_of(seg)
    assert valid.sum(1).tolist() == [2, 3, 1, 1, 1, 2, 2] and index.shape == (7, 3)
    x = torch.arange(12.0).view(2, 6)
    torch.testing.assert_close(deltanet.packed_back(x.flatten()[index], index, valid, 2, 6), x)


# ---------------------------------------------------------------------------------------------
# Checkpoints and configs


def test_official_vl_layout_loads_the_text_model_with_one_line(hf_checkpoint, capsys):
    """Qwen3_5ForConditionalGeneration's files: config.json with text_config, the text model under
    model.language_model., lm_head, the vision tower model.visual.*, and mtp.* weights."""
    folder, hf = hf_checkpoint(family="qwen3_5_vl", initializer_range=0.1)
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["Qwen3_5ForConditionalGeneration"] and "text_config" in config
    capsys.readouterr()
    ours, _ = load_model(str(folder), dtype=torch.float32)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.visual.*" in err[0] and "mtp.*" in err[0] and "2 tensors" in err[0]
    x = tokens(length=70)
    with torch.no_grad():  # text only: the VL model's positions are the token's in all three RoPE sections
        torch.testing.assert_close(ours(x), hf(x).logits, rtol=1e-5, atol=1e-5)


def test_vl_layout_is_checked_strictly(hf_checkpoint):
    from safetensors.torch import save_file
    folder, _ = hf_checkpoint(family="qwen3_5_vl")
    save_file({"model.language_model.layers.0.linear_attn.D": torch.zeros(4)}, folder / "extra.safetensors")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.language_model.layers.0.linear_attn.D"] = "extra.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelError, match=r"unexpected tensors: model\.layers\.0\.linear_attn\.D"):
        load_model(str(folder), dtype=torch.float32)


def official_text_config(**over) -> dict:
    """A Qwen3.5 config.json as the 9B's is laid out (vision_config left out: not read here)."""
    text = {"model_type": "qwen3_5_text", "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 32,
            "num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": 256, "vocab_size": 248320,
            "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128, "linear_value_head_dim": 128,
            "linear_num_key_heads": 16, "linear_num_value_heads": 32, "full_attention_interval": 4,
            "layer_types": ["full_attention" if i % 4 == 3 else "linear_attention" for i in range(32)],
            "attn_output_gate": True, "partial_rotary_factor": 0.25, "rms_norm_eps": 1e-6, "hidden_act": "silu",
            "max_position_embeddings": 262144, "mtp_num_hidden_layers": 1, "dtype": "bfloat16",
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000000, "partial_rotary_factor": 0.25,
                                "mrope_section": [11, 11, 10], "mrope_interleaved": True}}
    return {"architectures": ["Qwen3_5ForConditionalGeneration"], "model_type": "qwen3_5",
            "tie_word_embeddings": False, "text_config": {**text, **over}}


def test_official_config_gives_transformers_tensor_names_and_shapes():
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig
    d = official_text_config()
    cfg = Config.from_dict(d)
    assert cfg.model_type == "qwen3_5" and cfg.rotary_dim == 64 and cfg.rope_theta == 10000000
    assert cfg.mixers.count("full_attention") == 8 and cfg.qk_norm and not cfg.tie_word_embeddings
    with torch.device("meta"):
        ours = modeling.QwenForCausalLM(cfg)
        theirs = Qwen3_5ForCausalLM(Qwen3_5TextConfig(**{k: v for k, v in d["text_config"].items()
                                                        if k not in ("model_type", "full_attention_interval")}))
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    assert Config.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()  # the text model's config.json round trip


def test_qwen3_5_moe_is_refused_naming_what_is_supported():
    d = official_text_config(model_type="qwen3_5_moe_text", num_experts=256)
    d.update(model_type="qwen3_5_moe", architectures=["Qwen3_5MoeForConditionalGeneration"])
    with pytest.raises(ModelError) as e:
        Config.from_dict(d, "Qwen3.5-35B-A3B/config.json")
    assert "(a mixture-of-experts model)" in str(e.value)
    assert "Qwen3.5 / 3.6 / 3.8 dense (model_type 'qwen3_5'" in str(e.value)


def test_the_engine_keeps_each_slots_recurrent_state(qwen3_5):
    """Seven prompts (1 to 120 tokens, past one 64-token chunk) through 3 slots of engine.Engine:
    each slot keeps its own convolution and recurrent state, so every answer is the one decoding
    it alone gives, as rows finish and new prompts take their slots (each prefilled alone)."""
    import engine
    _, _, ours = qwen3_5
    ps = [tokens(1, n, seed=10 + n)[0].tolist() for n in (3, 40, 7, 120, 1, 15, 64)]
    want = [list(decode.generate(ours, p, 12, set())) for p in ps]
    e = engine.Engine(ours, max_batch_size=3)
    assert e.prefill_tokens == 0
    assert [r.tokens for r in e.run([engine.Request(p, n) for p, n in zip(ps, (12, 5, 12, 9, 12, 12, 12))])] == \
        [w[:n] for w, n in zip(want, (12, 5, 12, 9, 12, 12, 12))]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU: run on the GPU machine")
def test_the_engines_cuda_graphs_carry_the_recurrent_state(qwen3_5):
    """The engine's decode steps replayed as CUDA graphs (float32) give the eager engine's tokens:
    the DeltaNet states are read and written in place, inside the recorded step."""
    import copy
    import engine
    m = copy.deepcopy(qwen3_5[2]).cuda()
    with torch.no_grad():  # decisive logits: a graph attends over a longer masked span, summing in another order
        m.lm_head.weight.mul_(50)
    ps = [tokens(1, n, seed=20 + n)[0].tolist() for n in (3, 40, 7, 120, 1)]
    runs = [[r.tokens for r in engine.Engine(m, max_batch_size=3, cuda_graph=graph).run(
        [engine.Request(p, 10) for p in ps])] for graph in (False, True)]
    assert runs[0] == runs[1]
