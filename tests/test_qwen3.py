"""Qwen3: the official configs against transformers, the chat templates against the checkpoints' own
Jinja templates (rendered by transformers) and against ms-swift's training rows, thinking at
inference, and the refusals. The decoder paths themselves (peft, merge, resume, packing, fused
layers, offload, 4-bit, DDP, FSDP, CUDA graphs) run on Qwen3 in their own test files
(@both_families, @hf_families)."""

import json
import shutil
from pathlib import Path

import pytest
import torch

import data
import flags
import infer
import model as modeling
import sources
import template as T
import train
from conftest import marked_text, with_template
from data import encode_chat, render_chat

HERE = Path(__file__).resolve().parent / "qwen3"  # official files: config.json of each size, 2507 chat templates
DENSE = ["Qwen3-0.6B", "Qwen3-1.7B", "Qwen3-4B", "Qwen3-8B", "Qwen3-14B", "Qwen3-32B", "Qwen3-4B-Instruct-2507"]


@pytest.fixture(scope="module")
def tok(qwen3_dir):
    return data.Tokenizer(qwen3_dir)


@pytest.fixture(scope="module")
def hf_tok(qwen3_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(qwen3_dir)


def jinja(name: str) -> str:
    """The chat template of a checkpoint: the hybrid one is the tiny Qwen3's own (Qwen3-8B's)."""
    import tiny
    return tiny.QWEN3_CHAT_TEMPLATE if name == "qwen3" else (HERE / {
        "qwen3_nothinking": "Qwen3-4B-Instruct-2507.jinja", "qwen3_thinking": "Qwen3-4B-Thinking-2507.jinja"}[name]).read_text()


# ---------------------------------------------------------------------------------------------
# The model: every official dense config builds transformers' tensors


@pytest.mark.parametrize("name", DENSE)
def test_official_configs_give_transformers_tensor_names_and_shapes(name):
    from transformers import Qwen3Config, Qwen3ForCausalLM
    d = json.loads((HERE / f"{name}.config.json").read_text())
    cfg = modeling.Config.from_dict(d)
    assert cfg.model_type == "qwen3" and cfg.head_dim == 128 and not cfg.qkv_bias and cfg.qk_norm
    with torch.device("meta"):
        ours = modeling.QwenForCausalLM(cfg)
        theirs = Qwen3ForCausalLM(Qwen3Config(**d))
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    q = ours.model.layers[0].self_attn.q_proj
    assert q.out_features == cfg.num_attention_heads * 128  # 0.6B: 1024 -> 2048, not hidden / heads
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == (name in ("Qwen3-0.6B", "Qwen3-1.7B", "Qwen3-4B",
                                                                            "Qwen3-4B-Instruct-2507"))
    assert cfg.to_dict()["architectures"] == ["Qwen3ForCausalLM"] and cfg.to_dict()["head_dim"] == 128


def test_a_head_dim_that_is_not_a_number_is_named():
    d = json.loads((HERE / "Qwen3-8B.config.json").read_text())
    with pytest.raises(modeling.ModelError, match='head_dim is \'128\', not a number'):
        modeling.Config.from_dict(dict(d, head_dim="128"))


def test_qwen3_moe_is_refused_naming_what_is_supported():
    d = json.loads((HERE / "Qwen3-30B-A3B-Instruct-2507.config.json").read_text())
    with pytest.raises(modeling.ModelError) as e:
        modeling.Config.from_dict(d, "Qwen3-30B-A3B/config.json")
    assert "model_type='qwen3_moe' (a mixture-of-experts model)" in str(e.value)
    assert "Qwen2 / Qwen2.5 (model_type 'qwen2'), Qwen3 (model_type 'qwen3'" in str(e.value)
    assert "Qwen3.5 / 3.6 / 3.8 dense (model_type 'qwen3_5'" in str(e.value)


def test_tiny_qwen3_is_a_qwen3_transformers_loads(qwen3_dir):
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(qwen3_dir, dtype=torch.float32).eval()
    ours, _ = modeling.load_model(str(qwen3_dir), dtype=torch.float32)
    assert type(hf).__name__ == "Qwen3ForCausalLM" and ours.config.head_dim == 48 != 128 // 4
    assert not torch.equal(ours.model.layers[0].self_attn.q_norm.weight, torch.ones(48))
    x = torch.randint(0, 900, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Prompts: byte for byte what the checkpoint's Jinja template renders

R1 = "<think>\nFirst I think.\n</think>\n\nAnswer one."
PROMPTS = {
    "one question": [{"role": "user", "content": "你是谁？"}],
    "system": [{"role": "system", "content": "You are a bot."}, {"role": "user", "content": "hi"}],
    "history without reasoning": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "A1"},
                                  {"role": "user", "content": "b"}],
    "history with reasoning in the content": [{"role": "user", "content": "a"}, {"role": "assistant", "content": R1},
                                              {"role": "user", "content": "b"}],
    "history with reasoning_content": [{"role": "user", "content": "a"},
                                       {"role": "assistant", "content": "Answer one.", "reasoning_content": "Hmm."},
                                       {"role": "user", "content": "b"}],
}
FULL = {  # whole conversations, as the template renders them without a generation prompt
    "answer with reasoning": [{"role": "user", "content": "a"}, {"role": "assistant", "content": R1}],
    "answer without": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "A"}],
    "reasoning_content, two turns": [{"role": "user", "content": "a"}, {"role": "assistant", "content": R1},
                                     {"role": "user", "content": "b"},
                                     {"role": "assistant", "content": "\nB", "reasoning_content": "\nWhy.\n"}],
}
SETTINGS = [("qwen3", None), ("qwen3", True), ("qwen3", False), ("qwen3_nothinking", None), ("qwen3_thinking", None)]


@pytest.mark.parametrize("name,thinking", SETTINGS)
@pytest.mark.parametrize("case", list(PROMPTS))
def test_prompts_equal_the_checkpoints_jinja_template(tok, hf_tok, name, thinking, case):
    messages = PROMPTS[case]
    kwargs = {} if thinking is None else {"enable_thinking": thinking}
    text = hf_tok.apply_chat_template(messages, chat_template=jinja(name), tokenize=False, add_generation_prompt=True,
                                      **kwargs)
    template = T.choose_template("nowhere", "qwen3", name, enable_thinking=thinking)
    assert render_chat(messages, add_generation_prompt=True, template=template) == text
    ids, _ = encode_chat(tok, messages, add_generation_prompt=True, template=template)
    assert ids == hf_tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("name", ["qwen3", "qwen3_nothinking", "qwen3_thinking"])
@pytest.mark.parametrize("case", list(FULL))
def test_whole_conversations_render_as_the_jinja_template(hf_tok, name, case):
    text = hf_tok.apply_chat_template(FULL[case], chat_template=jinja(name), tokenize=False)
    assert render_chat(FULL[case], template=T.TEMPLATES[name]) == text


def test_think_tokens_are_single_tokens_and_kept_when_decoding(tok):
    ids = tok.encode_text("<think>\n\n</think>\n\n")
    think, end = tok.tok.token_to_id("<think>"), tok.tok.token_to_id("</think>")
    assert ids[0] == think and ids.count(think) == ids.count(end) == 1 and tok.decode(ids[1:ids.index(end)]) == "\n\n"
    assert tok.decode(ids, skip_special_tokens=True) == "<think>\n\n</think>\n\n"  # not special, as in Qwen3


# ---------------------------------------------------------------------------------------------
# Choosing the template from the checkpoint's files


def test_the_template_comes_from_the_checkpoints_chat_template(qwen3_dir, tiny_dir, tmp_path):
    assert T.template_name_of(qwen3_dir, "qwen3") == "qwen3"
    assert T.template_name_of(tiny_dir, "qwen2") == "qwen2_5"
    for name, text in (("qwen3_nothinking", jinja("qwen3_nothinking")), ("qwen3_thinking", jinja("qwen3_thinking")),
                       ("qwen3_nothinking", (HERE / "Qwen3-4B-Instruct-2507.2025-07.jinja").read_text()),
                       ("qwen3", None)):  # no chat template: the model_type's
        folder = with_template(qwen3_dir, tmp_path / f"{name}-{text is None}-{len(text or '')}", text)
        assert T.template_name_of(folder, "qwen3") == name
    assert T.choose_template(tiny_dir, "qwen2", "qwen3").name == "qwen3"  # --template wins


@pytest.mark.parametrize("name,flags,needle", [
    ("qwen2_5", {"enable_thinking": True}, "--enable_thinking true: the qwen2_5 template never thinks"),
    ("qwen3_nothinking", {"enable_thinking": True}, "the qwen3_nothinking template never thinks"),
    ("qwen3_thinking", {"enable_thinking": False}, "(Qwen3-*-Thinking-2507) always thinks"),
    ("qwen4", {}, "--template qwen4: no such template. The templates here are qwen2_5, qwen3, qwen3_nothinking, "
                  "qwen3_thinking"),
    ("qwen3", {"loss_scale": "every"}, "--loss_scale every: the loss scales here are default, ignore_empty_think, last_round, all"),
])
def test_settings_a_template_cannot_take_are_refused(name, flags, needle):
    with pytest.raises(T.TemplateError) as e:
        T.choose_template("nowhere", "qwen3", name, **flags)
    assert needle in str(e.value)


def test_hybrid_qwen3_ignores_the_empty_think_block_whatever_loss_scale_says():
    """ms-swift >= 4.3.1 adds ignore_empty_think to the loss scale of hybrid-thinking models."""
    for given in (None, "default", "ignore_empty_think"):
        assert T.choose_template("nowhere", "qwen3", "qwen3", loss_scale=given).loss_scale == "ignore_empty_think"
    assert T.choose_template("nowhere", "qwen3", "qwen3_thinking").loss_scale == "default"


# ---------------------------------------------------------------------------------------------
# Training rows: as ms-swift 4.6.0 trains them (its swift_encode of the same rows, text with the
# trained spans in ⟦ ⟧, on a real-vocabulary Qwen3 tokenizer; CPU, float32)

ROWS = [
    [{"role": "user", "content": "你是谁?"}, {"role": "assistant", "content": "我是小黄,由魔搭开发的大语言模型。"}],
    [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "<think>\nOne plus one.\n</think>\n\n2"}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<think>\n\n</think>\n\nHello!"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "<think>\nr1\n</think>\n\nA1"},
     {"role": "user", "content": "b"}, {"role": "assistant", "content": "<think>\nr2\n</think>\n\nA2"}],
    [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2", "reasoning_content": "One plus one."}],
    [{"role": "system", "content": "You are a bot."}, {"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
]
U, A, E = "<|im_start|>user\n", "<|im_start|>assistant\n", "<|im_end|>\n"
EMPTY = "<think>\n\n</think>\n\n"
MS_SWIFT = {  # template, flags -> the rows as ms-swift trains them
    ("qwen3", ()): [
        f"{U}你是谁?{E}{A}{EMPTY}⟦我是小黄,由魔搭开发的大语言模型。{E}⟧",
        f"{U}1+1?{E}{A}⟦<think>\nOne plus one.\n</think>\n\n2{E}⟧",
        f"{U}hi{E}{A}{EMPTY}⟦Hello!{E}⟧",
        f"{U}a{E}{A}⟦<think>\nr1\n</think>\n\nA1{E}⟧{U}b{E}{A}⟦<think>\nr2\n</think>\n\nA2{E}⟧",
        f"{U}1+1?{E}{A}{EMPTY}⟦2{E}⟧",
        f"<|im_start|>system\nYou are a bot.{E}{U}x{E}{A}{EMPTY}⟦y{E}⟧"],
    ("qwen3", (("add_non_thinking_prefix", False),)): [
        f"{U}你是谁?{E}{A}⟦我是小黄,由魔搭开发的大语言模型。{E}⟧",
        f"{U}1+1?{E}{A}⟦<think>\nOne plus one.\n</think>\n\n2{E}⟧",
        f"{U}hi{E}{A}{EMPTY}⟦Hello!{E}⟧",
        f"{U}a{E}{A}⟦<think>\nr1\n</think>\n\nA1{E}⟧{U}b{E}{A}⟦<think>\nr2\n</think>\n\nA2{E}⟧",
        f"{U}1+1?{E}{A}⟦2{E}⟧",
        f"<|im_start|>system\nYou are a bot.{E}{U}x{E}{A}⟦y{E}⟧"],
    ("qwen3_nothinking", ()): [
        f"{U}你是谁?{E}{A}⟦我是小黄,由魔搭开发的大语言模型。{E}⟧",
        f"{U}1+1?{E}{A}⟦<think>\nOne plus one.\n</think>\n\n2{E}⟧",
        f"{U}hi{E}{A}⟦{EMPTY}Hello!{E}⟧",
        f"{U}a{E}{A}⟦<think>\nr1\n</think>\n\nA1{E}⟧{U}b{E}{A}⟦<think>\nr2\n</think>\n\nA2{E}⟧",
        f"{U}1+1?{E}{A}⟦2{E}⟧",
        f"<|im_start|>system\nYou are a bot.{E}{U}x{E}{A}⟦y{E}⟧"],
}
S = "<|im_start|>⟦"  # --loss_scale all: every token trained but the first (no one's target)
MS_SWIFT[("qwen3", (("loss_scale", "all"),))] = [  # ms-swift: all+ignore_empty_think
    f"{S}user\n你是谁?{E}{A}⟧{EMPTY}⟦我是小黄,由魔搭开发的大语言模型。{E}⟧",
    f"{S}user\n1+1?{E}{A}<think>\nOne plus one.\n</think>\n\n2{E}⟧",
    f"{S}user\nhi{E}{A}⟧{EMPTY}⟦Hello!{E}⟧",
    f"{S}user\na{E}{A}<think>\nr1\n</think>\n\nA1{E}{U}b{E}{A}<think>\nr2\n</think>\n\nA2{E}⟧",
    f"{S}user\n1+1?{E}{A}⟧{EMPTY}⟦2{E}⟧",
    f"{S}system\nYou are a bot.{E}{U}x{E}{A}⟧{EMPTY}⟦y{E}⟧"]
MS_SWIFT[("qwen3_thinking", (("loss_scale", "all"),))] = [
    f"{S}user\n你是谁?{E}{A}我是小黄,由魔搭开发的大语言模型。{E}⟧",
    f"{S}user\n1+1?{E}{A}<think>\nOne plus one.\n</think>\n\n2{E}⟧",
    f"{S}user\nhi{E}{A}{EMPTY}Hello!{E}⟧",
    f"{S}user\na{E}{A}<think>\nr1\n</think>\n\nA1{E}{U}b{E}{A}<think>\nr2\n</think>\n\nA2{E}⟧",
    f"{S}user\n1+1?{E}{A}2{E}⟧",
    f"{S}system\nYou are a bot.{E}{U}x{E}{A}y{E}⟧"]
MS_SWIFT[("qwen3", (("loss_scale", "last_round"),))] = [  # ms-swift 4.6: earlier answers lose their reasoning
    "<|im_start|>user\n你是谁?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n⟦我是小黄,由魔搭开发的大语言模型。<|im_end|>\n⟧",
    "<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n⟦<think>\nOne plus one.\n</think>\n\n2<|im_end|>\n⟧",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n⟦Hello!<|im_end|>\n⟧",
    "<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n<|im_start|>user\nb<|im_end|>\n<|im_start|>assistant\n⟦<think>\nr2\n</think>\n\nA2<|im_end|>\n⟧",
    "<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n⟦<think>\nOne plus one.\n</think>\n\n2<|im_end|>\n⟧",
    "<|im_start|>system\nYou are a bot.<|im_end|>\n<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n⟦y<|im_end|>\n⟧",
]
MS_SWIFT[("qwen3_thinking", (("loss_scale", "last_round"),))] = [  # ms-swift 4.6: earlier answers lose their reasoning
    "<|im_start|>user\n你是谁?<|im_end|>\n<|im_start|>assistant\n⟦我是小黄,由魔搭开发的大语言模型。<|im_end|>\n⟧",
    "<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n⟦<think>\nOne plus one.\n</think>\n\n2<|im_end|>\n⟧",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n⟦<think>\n\n</think>\n\nHello!<|im_end|>\n⟧",
    "<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n<|im_start|>user\nb<|im_end|>\n<|im_start|>assistant\n⟦<think>\nr2\n</think>\n\nA2<|im_end|>\n⟧",
    "<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n⟦<think>\nOne plus one.\n</think>\n\n2<|im_end|>\n⟧",
    "<|im_start|>system\nYou are a bot.<|im_end|>\n<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n⟦y<|im_end|>\n⟧",
]
MS_SWIFT[("qwen3_thinking", ())] = MS_SWIFT[("qwen3_nothinking", ())]  # the same rows, as written
MS_SWIFT[("qwen3", (("enable_thinking", False),))] = MS_SWIFT[("qwen3", ())]  # training rows do not change


@pytest.mark.parametrize("name,flags", list(MS_SWIFT))
def test_training_rows_are_ms_swifts(tok, name, flags):
    template = T.choose_template("nowhere", "qwen3", name, **dict(flags))
    conversations = [sources.row_to_messages({"messages": row}, "row") for row in ROWS]  # as read from a file
    ours = [marked_text(tok, *encode_chat(tok, messages, template=template)) for messages in conversations]
    expected = list(MS_SWIFT[(name, flags)])
    # Where we differ on purpose: ms-swift drops reasoning_content (its row 5 trains "2" alone); we write
    # it into the content, so row 5 trains as ms-swift trains row 2, the same row with the reasoning there.
    expected[4] = expected[1]
    assert ours == expected
    batched = sources.encode_chats(tok, conversations, template=template)  # the batched encoder lays them out alike
    assert [marked_text(tok, r["input_ids"].tolist(), r["labels"].tolist()) for r in batched] == expected


# ---------------------------------------------------------------------------------------------
# Thinking at inference: the reasoning apart from the answer

REPLY = "<think>\nLet me see.\n</think>\n\nI am a bot."


class Out:
    """A stream that says whether it is a terminal."""

    def __init__(self, tty: bool):
        self.tty, self.text = tty, ""

    def write(self, s):
        self.text += s

    def flush(self):
        pass

    def isatty(self):
        return self.tty


@pytest.mark.parametrize("tty,show,stream,printed", [
    (True, True, True, "\033[2mLet me see.\n\033[0mI am a bot.\n"),
    (False, True, True, "<think>\nLet me see.\n</think>\nI am a bot.\n"),
    (False, False, True, "I am a bot.\n"),
    (True, False, True, "I am a bot.\n"),
    (False, True, False, "<think>\nLet me see.\n</think>\nI am a bot.\n"),
    (True, True, False, "\033[2mLet me see.\033[0m\nI am a bot.\n"),
])
def test_reasoning_is_printed_apart_from_the_answer_or_not_at_all(tok, tty, show, stream, printed):
    out = Out(tty)
    s = infer.ThinkingStream(tok, out, stream, show)
    for t in tok.encode(REPLY):
        s.push(t)
    s.close()
    assert out.text == printed
    assert s.result() == infer.Reply("I am a bot.", "Let me see.")


def test_thinking_2507_reasoning_starts_without_a_think_token_and_plain_answers_are_kept_whole(tok):
    out = Out(False)
    s = infer.ThinkingStream(tok, out, True, False, thinking=True)  # its prompt opened the block
    for t in tok.encode("Hmm.\n</think>\n\nYes."):
        s.push(t)
    s.close()
    assert s.result() == infer.Reply("Yes.", "Hmm.") and out.text == "Yes.\n"
    s = infer.ThinkingStream(tok, Out(False), True, True)
    for t in tok.encode("\nno think block"):  # a model that does not think: its answer exactly as written
        s.push(t)
    s.close()
    assert s.result() == infer.Reply("\nno think block", None)


@pytest.fixture
def thinking_model(monkeypatch, tok):
    """infer.generate stands in for a model that thinks, then answers REPLY."""
    def generate(model, ids, max_new_tokens, stop_ids, **kwargs):
        yield from tok.encode(REPLY) + [tok.im_end_id]
    monkeypatch.setattr(infer, "generate", generate)


def test_prompt_and_piped_answers_carry_the_answer_and_the_reasoning_behind_a_flag(qwen3_dir, thinking_model, capsys):
    base = ["--model", str(qwen3_dir), "--device", "cpu", "--temperature", "0"]
    assert infer.main(base + ["--prompt", "你是谁？"]) == 0
    out, err = capsys.readouterr()
    assert out == "I am a bot.\n" and "chat template: qwen3, thinks first" in err
    assert infer.main(base + ["--prompt", "你是谁？", "--show_thinking", "true"]) == 0
    assert capsys.readouterr().out == "<think>\nLet me see.\n</think>\nI am a bot.\n"
    for show, fields in (("false", {}), ("true", {"reasoning": "Let me see."})):
        chat = infer.load_chat(flags.infer_parser().parse_args(base + ["--show_thinking", show]))
        assert infer.answer_lines(chat, ["hi\n"]) == 0
        assert json.loads(capsys.readouterr().out) == {"line": 1, "query": "hi", **fields, "response": "I am a bot."}


def test_the_repl_switches_thinking_and_keeps_only_answers_in_the_history(qwen3_dir, tiny_dir, tok):
    chat = infer.load_chat(flags.infer_parser().parse_args(["--model", str(qwen3_dir), "--device", "cpu"]))
    history = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "A1", "reasoning_content": "r1"},
               {"role": "user", "content": "b"}]
    assert chat.prompt_ids(history) == tok.encode(f"{U}a{E}{A}A1{E}{U}b{E}{A}")  # reasoning of earlier turns dropped
    infer.run_command(chat, "/think off")
    assert chat.prompt_ids(history[-1:]) == tok.encode(f"{U}b{E}{A}{EMPTY}")
    infer.run_command(chat, "/think on")
    assert chat.prompt_ids(history[-1:]) == tok.encode(f"{U}b{E}{A}")
    plain = infer.load_chat(flags.infer_parser().parse_args(["--model", str(tiny_dir), "--device", "cpu"]))
    with pytest.raises(T.TemplateError, match="the qwen2_5 template never thinks"):
        infer.run_command(plain, "/think on")
    off = infer.load_chat(flags.infer_parser().parse_args(["--model", str(qwen3_dir), "--device", "cpu",
                                                           "--enable_thinking", "false"]))
    assert off.prompt_ids(history[-1:]) == tok.encode(f"{U}b{E}{A}{EMPTY}")


# ---------------------------------------------------------------------------------------------
# train.py and infer.py on Qwen3: what a run records, what is refused


def qa_file(tmp_path) -> str:
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in
            (("你是谁?", "我是小黄。"), ("1+1?", "<think>\nOne plus one.\n</think>\n\n2"))]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return str(tmp_path / "qa.jsonl")


def test_a_qwen3_run_records_its_template_and_infer_uses_it(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--model", "tiny-qwen3", "--dataset", qa_file(tmp_path), "--device", "cpu", "--max_steps", "1",
            "--output_dir", str(out), "--template", "qwen3_nothinking"]
    assert train.main(argv) == 0
    assert "chat template: qwen3_nothinking" in capsys.readouterr().out
    (ckpt,) = out.glob("v*/checkpoint-1")
    args = json.loads((ckpt / "args.json").read_text())
    assert (args["template"], args["model_type"], args["model"]) == ("qwen3_nothinking", "qwen3", "tiny-qwen3")
    assert infer.main(["--adapters", str(ckpt), "--device", "cpu", "--prompt", "hi", "--max_new_tokens", "2"]) == 0
    assert "chat template: qwen3_nothinking (as trained)" in capsys.readouterr().err


@pytest.mark.parametrize("script,flags,needle", [
    ("train", ["--model", "tiny", "--enable_thinking", "true"], "--enable_thinking true: the qwen2_5 template never thinks"),
    ("train", ["--model", "tiny-qwen3", "--template", "qwen3_thinking", "--enable_thinking", "false"],
     "--enable_thinking false: the qwen3_thinking template (Qwen3-*-Thinking-2507) always thinks"),
    ("infer", ["--model", "tiny", "--enable_thinking", "true"], "--enable_thinking true: the qwen2_5 template never thinks"),
])
def test_thinking_a_model_cannot_do_is_one_paragraph_and_exit_2_with_nothing_written(tmp_path, capsys, script, flags, needle):
    if script == "train":
        code = train.main(flags + ["--dataset", qa_file(tmp_path), "--device", "cpu", "--output_dir", str(tmp_path / "out")])
    else:
        code = infer.main(flags + ["--device", "cpu", "--prompt", "hi"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"error: {needle}") and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_qwen3_checkpoint_without_its_q_norm_is_named_and_nothing_is_written(qwen3_dir, tmp_path, capsys):
    from safetensors.torch import load_file, save_file
    folder = tmp_path / "broken"
    shutil.copytree(qwen3_dir, folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    name = "model.layers.2.self_attn.q_norm.weight"
    shard = folder / index.pop("weight_map")[name] if False else folder / index["weight_map"].pop(name)
    save_file({k: v for k, v in load_file(shard).items() if k != name}, shard, metadata={"format": "pt"})
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    code = train.main(["--model", str(folder), "--dataset", qa_file(tmp_path), "--device", "cpu",
                       "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and f"missing tensors: {name}" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


# ms-swift 4.6.0's first logged loss (`swift sft` on the CPU in float32, LoRA all-linear, dropout 0,
# batch 1, accumulation over all six ROWS: one optimizer step) on the tiny Qwen3 of this suite,
# with row 5's reasoning written in its content (ms-swift drops the field; we keep it).
MS_SWIFT_FIRST_LOSS = {
    ("qwen3", ()): 10.747187614440918,
    ("qwen3", ("--add_non_thinking_prefix", "false")): 10.784554481506348,
    ("qwen3_nothinking", ()): 10.567492485046387,
    ("qwen3_thinking", ()): 10.567492485046387,
}


@pytest.mark.parametrize("name,flags", list(MS_SWIFT_FIRST_LOSS))
def test_the_first_step_loss_equals_ms_swifts(tmp_path, name, flags):
    data_file = tmp_path / "rows.jsonl"
    data_file.write_text("".join(json.dumps({"messages": r}, ensure_ascii=False) + "\n" for r in ROWS))
    out = tmp_path / "out"
    assert train.main(["--model", "tiny-qwen3", "--dataset", str(data_file), "--template", name, *flags,
                       "--device", "cpu", "--torch_dtype", "float32", "--lora_dropout", "0",
                       "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "6", "--max_steps", "1",
                       "--padding_free", "false", "--output_dir", str(out)]) == 0
    (log,) = out.glob("v*/logging.jsonl")
    loss = next(e["loss"] for e in map(json.loads, log.read_text().splitlines()) if "loss" in e)
    assert loss == pytest.approx(MS_SWIFT_FIRST_LOSS[(name, flags)], rel=1e-5)


# ---------------------------------------------------------------------------------------------
# ms-swift's quick start (README, since March 2026), verbatim after swapping the program name

QUICK_START_TRAIN = """
    --model Qwen/Qwen3-4B-Instruct-2507
    --tuner_type lora
    --dataset 'AI-ModelScope/alpaca-gpt4-data-zh#500'
              'AI-ModelScope/alpaca-gpt4-data-en#500'
              'swift/self-cognition#500'
    --torch_dtype bfloat16 --num_train_epochs 1 --per_device_train_batch_size 1 --per_device_eval_batch_size 1
    --learning_rate 1e-4 --lora_rank 8 --lora_alpha 32 --target_modules all-linear --gradient_accumulation_steps 16
    --eval_steps 50 --save_steps 50 --save_total_limit 2 --logging_steps 5 --max_length 2048 --output_dir output
    --warmup_ratio 0.05 --dataloader_num_workers 4 --model_author swift --model_name swift-robot"""
QUICK_START_INFER = "--adapters output/vx-xxx/checkpoint-xxx --stream true --temperature 0 --max_new_tokens 2048"


def test_ms_swift_quick_start_lines_run_as_written(tmp_path, monkeypatch, capsys):
    """Both lines through train.main and infer.main in this process (a process start costs seconds
    here); the question comes on stdin as bytes, as through a pipe (tests/test_infer.py pipes lines
    into infer.py's own process)."""
    import io
    import shlex
    import sys
    monkeypatch.chdir(tmp_path)
    argv = shlex.split(QUICK_START_TRAIN)
    assert train.main(argv) == 2  # offline: the model cannot be fetched, and nothing is written
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("error: --model Qwen/Qwen3-4B-Instruct-2507: not a local folder, and fetching") and not Path("output").exists()
    local = lambda flag, value: [value if i and argv[i - 1] == flag else a for i, a in enumerate(argv)]
    assert train.main(local("--model", "tiny-qwen3")) == 2  # the model here: the ModelScope ids go to their HF mirrors
    err = capsys.readouterr().err  # (offline here: the download fails, named)
    assert "could not download 'llm-wizard/alpaca-gpt4-data-zh' (the Hugging Face mirror of the ModelScope dataset" in err
    argv = local("--model", "tiny-qwen3")
    start = argv.index("--dataset")
    argv[start + 1:start + 4] = [str(Path(__file__).parent.parent / "data" / "self_cognition.json") + "#500"]  # a local copy
    assert train.main(argv + ["--device", "cpu", "--max_steps", "1"]) == 0  # (a bfloat16 step of 16 rows: seconds here)
    (ckpt,) = Path("output").glob("v0-*/checkpoint-1")
    # the line as written but 64 new tokens, not 2,048: a tiny model trained 1 step answers up to its limit
    infer_argv = shlex.split(QUICK_START_INFER.replace("output/vx-xxx/checkpoint-xxx", str(ckpt)).replace("2048", "64"))
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("你是谁？\n".encode())))
    capsys.readouterr()
    code = infer.main(infer_argv + ["--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads(out)["query"] == "你是谁？" and "chat template: qwen3" in err


@pytest.mark.parametrize("prefix,recorded", [("true", False), ("false", True)])
def test_an_adapter_is_asked_as_it_was_trained_thinking_or_not(tmp_path, tok, capsys, prefix, recorded):
    """A hybrid model's rows trained with the empty think block before each answer (ms-swift's default)
    teach answers after that block: train.py's --eval_prompts and infer.py ask so unless told otherwise."""
    out = tmp_path / "out"
    assert train.main(["--model", "tiny-qwen3", "--dataset", qa_file(tmp_path), "--device", "cpu", "--max_steps", "1",
                       "--output_dir", str(out), "--add_non_thinking_prefix", prefix]) == 0
    (ckpt,) = out.glob("v*/checkpoint-1")
    assert json.loads((ckpt / "args.json").read_text())["enable_thinking"] is recorded
    question = [{"role": "user", "content": "hi"}]
    for given, thinks in (([], recorded), (["--enable_thinking", "true"], True), (["--enable_thinking", "false"], False)):
        chat = infer.load_chat(flags.infer_parser().parse_args(["--adapters", str(ckpt), "--device", "cpu", *given]))
        assert chat.prompt_ids(question) == tok.encode(f"{U}hi{E}{A}" + ("" if thinks else EMPTY))
    assert "thinking off: --enable_thinking true (or /think on in the chat) lets it reason first" in capsys.readouterr().err
    swift_args = {"template": "qwen3", "model": "tiny-qwen3"}  # ms-swift's args.json records neither flag
    assert not T.with_trained_thinking(T.TEMPLATES["qwen3"], swift_args).enable_thinking
    assert T.TEMPLATES["qwen3"].enable_thinking  # the base model thinks, as its template says


def test_a_resume_keeps_the_template_the_run_was_trained_in(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--model", "tiny-qwen3", "--dataset", qa_file(tmp_path), "--device", "cpu", "--output_dir", str(out),
            "--max_steps", "2", "--save_steps", "1"]
    assert train.main(argv + ["--template", "qwen3_nothinking"]) == 0
    (run,) = out.glob("v*")
    capsys.readouterr()
    assert train.main(argv + ["--resume_from_checkpoint", str(run / "checkpoint-1")]) == 0  # no --template
    assert "chat template: qwen3_nothinking" in capsys.readouterr().out
    assert train.main(argv + ["--resume_from_checkpoint", str(run / "checkpoint-1"), "--template", "qwen3"]) == 2
    assert "--template 'qwen3_nothinking' -> 'qwen3'" in capsys.readouterr().err
