"""Qwen3.5 (model_type qwen3_5) beyond the forward: LoRA's all-linear as peft chooses it, PEFT adapters
both ways against transformers' Qwen3_5ForCausalLM, merge (the text layout and the official
vision-language one), resume, the chat's recurrent-state cache across turns, a 4-bit base, and two
DDP ranks. Tiny checkpoints: conftest.make_hf_checkpoint(family="qwen3_5" / "qwen3_5_vl") and the
built-in `tiny-qwen3_5`."""

import json

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

import data
import decode
import fast_decode
import infer
import lora
import merge
import model as modeling
import quant
import speed
import tiny
import train
from conftest import chat_logits, random_tokens

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tokens(batch=2, length=40, seed=0):
    return random_tokens(batch, length, seed)


def randomize(m, name="default", seed=0, std=0.2):
    """A (B, A) pair that changes the model: B drawn instead of zeros."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora.lora_parameters(m, name):
            p.copy_(torch.randn(p.shape, generator=g) * std)


@pytest.fixture(scope="module")
def qwen3_5(tmp_path_factory, tiny_dir):
    """(folder, transformers' Qwen3_5ForCausalLM) of one tiny text-only checkpoint."""
    from conftest import make_hf_checkpoint
    folder = tmp_path_factory.mktemp("qwen3_5_lora") / "hf"
    return folder, make_hf_checkpoint(folder, tiny_dir, family="qwen3_5", initializer_range=0.1)


@pytest.fixture(scope="module")
def our_adapter(qwen3_5, tmp_path_factory):
    """(model with a random all-linear adapter, its folder)."""
    folder, _ = qwen3_5
    m, _ = modeling.load_model(str(folder), dtype=torch.float32)
    lora.add_adapter(m, lora.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0))
    randomize(m)
    out = tmp_path_factory.mktemp("adapter") / "ours"
    lora.save_adapter(m, out, base_model_name_or_path=str(folder))
    return m, out


def peft_model(hf, adapter=None):
    import copy
    from peft import LoraConfig, PeftModel, get_peft_model
    base = copy.deepcopy(hf)
    if adapter is not None:
        return PeftModel.from_pretrained(base, adapter).eval()
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))


# ---------------------------------------------------------------------------------------------
# LoRA and PEFT adapters


def test_all_linear_wraps_what_peft_wraps(our_adapter, qwen3_5):
    """peft's all-linear on Qwen3_5ForCausalLM: every nn.Linear but lm_head. That is q/k/v/o of the gated
    attention, the DeltaNet's in_proj_qkv, in_proj_z, in_proj_b, in_proj_a and out_proj, and the MLP."""
    m, _ = our_adapter
    theirs = {n.removeprefix("base_model.model.") for n, mod in peft_model(qwen3_5[1]).named_modules()
              if hasattr(mod, "lora_A") and hasattr(mod, "base_layer")}
    ours = set(lora.find_targets(m, "all-linear"))
    assert ours == theirs
    kinds = {n.rsplit(".", 1)[-1] for n in ours}
    assert kinds == set(lora.ALL_LINEAR) and "model.layers.0.linear_attn.in_proj_b" in ours


def test_our_adapter_loads_in_peft_with_the_same_logits(our_adapter, qwen3_5):
    m, folder = our_adapter
    theirs = peft_model(qwen3_5[1], folder)
    x = tokens()
    with torch.no_grad():
        assert_close(m(x), theirs(x).logits, rtol=1e-5, atol=1e-5)
        assert (m(x) - qwen3_5[1](x).logits).abs().max() > 1e-2  # the adapter changes the model


def test_peft_adapter_loads_in_ours_with_the_same_logits(qwen3_5, tmp_path):
    folder, hf = qwen3_5
    theirs = peft_model(hf)  # init_lora_weights=False: B random too
    theirs.save_pretrained(tmp_path / "peft")
    m, _ = modeling.load_model(str(folder), dtype=torch.float32)
    lora.load_adapter(m, tmp_path / "peft")
    x = tokens()
    with torch.no_grad():
        assert_close(m(x), theirs.eval()(x).logits, rtol=1e-5, atol=1e-5)


def test_an_adapter_of_the_vision_language_model_loads_on_its_text_model(hf_checkpoint, tmp_path):
    """peft on Qwen3_5ForConditionalGeneration (as ms-swift trains Qwen3.5) names the layers
    model.language_model.layers.N...: they load onto ours, with the same logits."""
    from peft import LoraConfig, get_peft_model
    folder, hf = hf_checkpoint(family="qwen3_5_vl", initializer_range=0.1)
    theirs = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, target_modules=list(lora.ALL_LINEAR),
                                           init_lora_weights=False)).eval()
    theirs.save_pretrained(tmp_path / "peft")
    assert any(".language_model.layers.0.linear_attn.in_proj_a." in k for k in load_file(
        tmp_path / "peft" / "adapter_model.safetensors"))
    m, _ = modeling.load_model(str(folder), dtype=torch.float32)
    lora.load_adapter(m, tmp_path / "peft")
    x = tokens()
    with torch.no_grad():
        assert_close(m(x), theirs(input_ids=x).logits, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Merging


def test_merged_folder_loads_in_transformers_like_base_plus_adapter(our_adapter, qwen3_5, tmp_path):
    from transformers import Qwen3_5ForCausalLM
    folder, hf = qwen3_5
    m, adapter = our_adapter
    out = merge.merge(adapter, base=str(folder), output_dir=tmp_path / "merged", dtype=torch.float32)
    merged = Qwen3_5ForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    x = tokens()
    with torch.no_grad():  # 1e-4, as tests/test_merge.py: W0 + B A rounds once where the unmerged sum rounds twice
        assert_close(merged(x).logits, peft_model(hf, adapter)(x).logits, rtol=1e-4, atol=1e-4)


def test_merging_a_vision_language_checkpoint_keeps_its_layout(hf_checkpoint, tmp_path):
    """The text model merged under model.language_model.*, the vision tower and MTP tensors copied as
    they are, the base's config.json: transformers' Qwen3_5ForConditionalGeneration loads it."""
    from transformers import Qwen3_5ForConditionalGeneration
    folder, _ = hf_checkpoint(family="qwen3_5_vl", initializer_range=0.1)
    m, _ = modeling.load_model(str(folder), dtype=torch.float32)
    lora.add_adapter(m, lora.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0))
    randomize(m)
    lora.save_adapter(m, tmp_path / "adapter", base_model_name_or_path=str(folder))
    out = merge.merge(tmp_path / "adapter", base=str(folder), output_dir=tmp_path / "merged", dtype=torch.float32)
    config, base_config = (json.loads((f / "config.json").read_text()) for f in (out, folder))
    assert config == base_config and config["architectures"] == ["Qwen3_5ForConditionalGeneration"]
    written = {k: v for f in out.glob("*.safetensors") for k, v in load_file(f).items()}
    base = {k: v for f in folder.glob("*.safetensors") for k, v in load_file(f).items()}
    assert written.keys() == base.keys()
    assert all(torch.equal(written[k], base[k]) for k in base if k.startswith(("model.visual.", "mtp.")))
    merged = Qwen3_5ForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    x = tokens()
    with torch.no_grad():
        assert_close(merged(input_ids=x).logits, m(x), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Training: resume, a 4-bit base


def qa_file(path, n=5):
    rows = [{"query": f"question {i}?", "response": f"answer number {i}."} for i in range(n)]
    path.write_text(json.dumps(rows))
    return path


def train_argv(model, dataset, out, steps, *extra):
    return ["--model", str(model), "--dataset", str(dataset), "--output_dir", str(out), "--torch_dtype", "float32",
            "--device", "cpu", "--max_steps", str(steps), "--per_device_train_batch_size", "1",
            "--gradient_accumulation_steps", "2", "--learning_rate", "1e-3", "--logging_steps", "1",
            "--template", "qwen3_nothinking", *map(str, extra)]


def test_resumed_run_ends_with_the_same_adapter_bit_for_bit(tmp_path):
    """The built-in tiny-qwen3_5, dropout on, packed steps; resumed mid-epoch from step 2 of 4."""
    dataset = qa_file(tmp_path / "qa.json")
    argv = train_argv("tiny-qwen3_5", dataset, tmp_path / "out", 4, "--save_steps", 2, "--lora_dropout", 0.1,
                      "--padding_free", "true")
    assert train.main(argv) == 0
    (run,) = (tmp_path / "out").glob("v*")
    full = load_file(run / "checkpoint-4" / "adapter_model.safetensors")
    assert train.main(argv + ["--resume_from_checkpoint", str(run / "checkpoint-2")]) == 0
    (resumed,) = set((tmp_path / "out").glob("v*")) - {run}
    again = load_file(resumed / "checkpoint-4" / "adapter_model.safetensors")
    assert full.keys() == again.keys() and any("in_proj_qkv" in k for k in full)
    assert all(torch.equal(full[k], again[k]) for k in full)


def test_on_a_gpu_the_plan_records_qwen3_5_layers_with_the_fixed_shape_deltanet(qwen3_5):
    """A DeltaNet layer unpacks packed rows by their lengths, which no recorded graph or compiled
    layer can replay: on a GPU, Qwen3.5's layers keep packed samples apart in fixed shapes instead
    (packed_deltanet.py), recorded as CUDA graphs by default (as the other families', since run 26) and
    compiled with --torch_compile true; never fused (written for attention layers); offloaded when
    asked, eagerly; eager under --fsdp and with --cuda_graph false. It says so."""
    parse = __import__("flags").train_parser().parse_args
    config = modeling.Config.from_json(qwen3_5[0] / "config.json")

    def plan(*argv):
        flags = speed.PlanFlags.of(parse(["--model", "m", "--dataset", "x.json", *argv]))
        return speed.plan_training(flags, torch.device("cuda"), [40, 100], 10_000, config)

    default = plan()
    assert default.graphs and default.packed_deltanet and not (default.compiled or default.fused or default.offload)
    graphs = plan("--cuda_graph", "true")
    assert graphs.graphs and graphs.packed_deltanet and not (graphs.compiled or graphs.fused or graphs.offload)
    assert "CUDA graphs: each micro-batch" in graphs.message and "(packed_deltanet.py)" in graphs.message
    assert "run unfused (fused layers are written for Qwen2 / Qwen3 layers)" in graphs.message
    compiled = plan("--torch_compile", "true", "--max_length", "65536")
    assert compiled.compiled and compiled.layer_graphs and compiled.packed_deltanet and not compiled.offload
    offloaded = plan("--activation_cpu_offload", "true", "--max_length", "65536")
    assert offloaded.offload and not (offloaded.graphs or offloaded.compiled or offloaded.packed_deltanet)
    assert "offloaded checkpoints: each layer's saved input (4 layers x 100 tokens" in offloaded.message
    assert "runs each layer's norms, projections, RoPE and MLP 2,048 positions at a time" in offloaded.message
    assert "Qwen3.5's DeltaNet layers run 512 positions at a time" in offloaded.message
    assert "compiled layers replayed as CUDA graphs" in compiled.message
    eager = plan("--cuda_graph", "false", "--torch_compile", "false")
    assert not (eager.graphs or eager.compiled or eager.packed_deltanet or eager.fused)
    fsdp = plan("--fsdp", "true")
    assert not (fsdp.graphs or fsdp.compiled or fsdp.packed_deltanet) and "eager layers: under --fsdp" in fsdp.message
    qwen2 = modeling.Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2)
    qwen2_plan = speed.plan_training(speed.PlanFlags.of(parse(["--model", "m", "--dataset", "x.json"])),
                                     torch.device("cuda"), [40, 100], 10_000, qwen2)
    assert qwen2_plan.graphs and qwen2_plan.fused and not qwen2_plan.packed_deltanet  # Qwen2: fused layers, as before


def test_train_py_with_the_embedding_in_host_memory_runs_as_without(tmp_path, monkeypatch):
    """speed.use_host_embedding, chosen on a GPU for a model with an lm_head of its own, forced on for
    the tiny Qwen3.5 on the CPU: packed steps through the DeltaNet layers from the host table's rows
    give the same losses and the same adapter."""
    dataset = qa_file(tmp_path / "qa.json", 8)
    run = lambda out: train.main(train_argv("tiny-qwen3_5", dataset, tmp_path / out, 3, "--padding_free", "true"))
    assert run("plain") == 0
    looked_up = []
    lookup = speed.HostEmbedding.lookup
    monkeypatch.setattr(speed.HostEmbedding, "lookup", lambda self, ids: looked_up.append(ids.shape) or lookup(self, ids))
    monkeypatch.setattr(speed, "use_host_embedding", lambda device, config: (True, "embedding in host memory"))
    assert run("hosted") == 0 and len(looked_up) >= 3
    runs = [next((tmp_path / out).glob("v*")) for out in ("plain", "hosted")]
    losses = [[r["loss"] for r in map(json.loads, (run / "logging.jsonl").read_text().splitlines()) if "loss" in r]
              for run in runs]
    assert losses[0] == losses[1] and len(losses[0]) == 3
    adapters = [load_file(sorted(run.glob("checkpoint-*"))[-1] / "adapter_model.safetensors") for run in runs]
    assert all(torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: run on the GPU machine")
@pytest.mark.parametrize("plan", [[], ["--cuda_graph", "true"], ["--torch_compile", "true"]], ids=["eager", "graphs", "compiled"])
def test_train_py_trains_the_tiny_qwen3_5_on_a_gpu(tmp_path, plan):
    """The whole of train.py on a card, bf16, packed steps, eager (the default), recorded and
    compiled: it runs and the loss falls."""
    out = tmp_path / "out"
    argv = train_argv("tiny-qwen3_5", qa_file(tmp_path / "qa.json", 16), out, 6, "--padding_free", "true", *plan)
    argv[argv.index("--device") + 1], argv[argv.index("--torch_dtype") + 1] = "cuda", "bfloat16"
    assert train.main(argv) == 0
    (run,) = out.glob("v*")
    losses = [r["loss"] for r in map(json.loads, (run / "logging.jsonl").read_text().splitlines()) if "loss" in r]
    assert losses[-1] < losses[0]


def test_a_4bit_base_runs_trains_and_its_adapter_loads_in_peft(qwen3_5, tmp_path):
    """The DeltaNet's projections in NF4 too; the model equals the one built from its dequantised
    weights exactly, training lowers the loss, and peft on those weights gives our logits."""
    from peft import PeftModel
    folder, hf = qwen3_5
    m4, _ = quant.load_quantized(str(folder), quant.QuantConfig(), torch.float32, "cpu")
    four_bit = {n.rsplit(".", 1)[-1] for n, mod in m4.named_modules() if isinstance(mod, quant.Linear4bit)}
    assert four_bit == set(lora.ALL_LINEAR)
    argv = train_argv(folder, qa_file(tmp_path / "qa.json", 4), tmp_path / "out", 6, "--quant_bits", 4,
                      "--learning_rate", 5e-3, "--lora_rank", 16, "--lora_dropout", 0, "--save_steps", 6,
                      "--per_device_train_batch_size", 4, "--gradient_accumulation_steps", 1,
                      "--lr_scheduler_type", "constant")
    assert train.main(argv) == 0
    (run,) = (tmp_path / "out").glob("v*")
    losses = [e["loss"] for e in map(json.loads, (run / "logging.jsonl").read_text().splitlines()) if "loss" in e]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.3, losses
    lora.load_adapter(m4, run / "checkpoint-6")
    dequantized = type(hf)(hf.config).eval()
    dequantized.load_state_dict(quant.dequantized_state_dict(m4), strict=True)
    theirs = PeftModel.from_pretrained(dequantized, run / "checkpoint-6").eval()
    x = tokens()
    with torch.no_grad():  # 1e-4, as tests/test_quant.py: peft adds B A x in another order
        assert_close(m4(x), theirs(x).logits, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# The chat: the recurrent state kept across turns


def test_a_repl_conversation_reuses_the_recurrent_state_and_answers_as_from_scratch(monkeypatch, capsys, tmp_path):
    """infer.py's REPL on tiny-qwen3_5 with a random adapter (so that answers differ): each turn's answer
    equals decoding the whole conversation afresh, and each prefill runs only the new tokens."""
    from conftest import random_adapter
    adapter = random_adapter(tiny.tiny_model_dir("tiny-qwen3_5"), tmp_path / "adapter", seed=0)
    chat = infer.load_chat(infer.flags.infer_parser().parse_args(
        ["--model", "tiny-qwen3_5", "--adapters", str(adapter), "--device", "cpu", "--temperature", "0",
         "--max_new_tokens", "10", "--template", "qwen3_nothinking", "--stream", "false"]))
    prompts, prefilled, real_prefill = [], [], decode.Decoder.prefill
    monkeypatch.setattr(decode.Decoder, "prefill", lambda self, ids, start=0: (
        prefilled.append((start, ids.shape[1])), real_prefill(self, ids, start))[1])
    real_answer = chat.answer
    monkeypatch.setattr(chat, "answer", lambda ids, out: (prompts.append(ids), real_answer(ids, out))[1])
    lines = iter(["hello", "who are you?", "and then?", "exit"])
    monkeypatch.setattr("builtins.input", lambda _: next(lines))
    infer.repl(chat)
    answers = capsys.readouterr().out.splitlines()
    assert len(prompts) == 3 and len(set(answers)) == 3
    for ids, (start, n), answer in zip(prompts, prefilled, answers):
        assert start + n == len(ids) and (start > 0) == (ids is not prompts[0])  # only the new tokens
        fresh = decode.generate(chat.model, ids, 10, chat.stop_ids)  # a new cache, the whole prompt
        assert data.Tokenizer(tiny.tiny_model_dir("tiny-qwen3_5")).decode(list(fresh), skip_special_tokens=True) == answer


def test_a_stopped_answer_goes_back_to_the_last_snapshot(qwen3_5):
    """The recurrent state cannot be rewound: after an answer stopped early (Ctrl-C), or a prompt that
    leaves the last answer's tokens, decoding goes on from the state kept at the end of an earlier
    prompt or answer, and answers as a fresh cache does."""
    folder, _ = qwen3_5
    m, _ = modeling.load_model(str(folder), dtype=torch.float32)
    decoder, cached, stop = decode.Decoder(m, 256), [], set()
    first = tokens(1, 20, seed=1)[0].tolist()
    answer = list(decode.generate(m, first, 6, stop, decoder=decoder, cached=cached))
    second = first + answer + tokens(1, 7, seed=2)[0].tolist()
    for i, _ in enumerate(decode.generate(m, second, 6, stop, decoder=decoder, cached=cached)):
        if i == 2:
            break  # stopped: the state holds second's prompt and two tokens
    assert set(decoder.snapshots) == {20, 25, 33}  # first's end, its answer's (less the last token), second's
    third = first + answer[:3] + tokens(1, 5, seed=3)[0].tolist()  # leaves the first answer after 3 tokens
    assert list(decode.generate(m, third, 6, stop, decoder=decoder, cached=cached)) == \
        list(decode.generate(m, third, 6, stop))
    assert set(decoder.snapshots) == {20, 28}  # went back to 20: the later ones are gone, third's end is new


def test_the_static_decoder_gives_the_plain_logits_across_a_chat(qwen3_5):
    """fast_decode.CUDAGraphDecoder's step run without recording it (record=False): its StaticKVCache, the
    DeltaNet states copied into fixed buffers each token, its snapshots copies put back by copying.
    It gives decode.Decoder's logits at every prefill and token of a chat that goes on from an answer,
    stops one, goes back to a snapshot and starts a new text (conftest.chat_logits): float32, 1e-5."""
    folder, _ = qwen3_5
    m, _ = modeling.load_model(str(folder), dtype=torch.float32)
    decoder = fast_decode.CUDAGraphDecoder(m, 64, record=False)
    buffers = lambda: [t.data_ptr() for states in decoder.cache.linear if states is not None for t in states]
    before = buffers()
    plain, plain_turns = chat_logits(m, decode.Decoder(m, 64))
    static, static_turns = chat_logits(m, decoder)
    assert static_turns == plain_turns == [[20], [20, 25, 33], [20, 28], [10]]
    assert len(static) == len(plain) == 6 + 3 + 6 + 6  # each turn: a prefill, then each token but the last run
    assert buffers() == before  # the states never moved: where a recorded graph reads and writes them
    for a, b in zip(plain, static):
        assert_close(b, a, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Two ranks


def test_two_ranks_train_the_same_adapter_as_one_rank_with_double_accumulation(tmp_path):
    """Two ranks on the CPU (gloo), as torchrun starts them (tests/test_fsdp.py's two_ranks), tiny-qwen3_5:
    2 ranks x accumulation 1, each packing its share, equal 1 rank x accumulation 2 one micro-batch at a
    time, here in this process (tests/test_distributed.py's tolerance)."""
    from test_distributed import assert_same_adapter
    from test_fsdp import two_ranks
    dataset = qa_file(tmp_path / "qa.json", 7)
    argv = lambda out, accum: train_argv("tiny-qwen3_5", dataset, out, 4, "--save_steps", 4, "--lora_dropout", 0,
                                         "--gradient_accumulation_steps", accum)
    two_ranks(argv(tmp_path / "two", 1) + ["--padding_free", "true"])
    assert train.main(argv(tmp_path / "one", 2) + ["--padding_free", "false"]) == 0
    (two,), (one,) = (tmp_path / "two").glob("v*"), (tmp_path / "one").glob("v*")
    assert_same_adapter(load_file(two / "checkpoint-4" / "adapter_model.safetensors"),
                        load_file(one / "checkpoint-4" / "adapter_model.safetensors"))
