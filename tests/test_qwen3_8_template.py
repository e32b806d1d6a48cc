"""Qwen3.8 chat format (template.py's qwen3_8): prompts byte for byte what Qwen3.8's own Jinja template
renders (tests/templates/Qwen3.8.jinja, rendered by transformers' apply_chat_template) for every
reasoning_effort and thinking setting, and training rows as ms-swift 4.6.0's qwen3_8 template trains
them. As for Qwen3.5 (tests/test_qwen3_5_template.py), the ids are checked on the tiny Qwen3 tokenizer,
which has Qwen3.8's special tokens; the format itself does not depend on the vocabulary."""

import hashlib
from pathlib import Path

import pytest

import data
import sources
import template as T
from conftest import marked_text, with_template
from data import encode_chat, render_chat
from test_qwen3 import FULL
from test_qwen3_5_template import PROMPTS as QWEN35_PROMPTS
from test_qwen3_5_template import ROWS as QWEN35_ROWS

HERE = Path(__file__).resolve().parent / "templates"
JINJA = (HERE / "Qwen3.8.jinja").read_text()  # its first lines say where it came from
OFFICIAL_SHA256 = "c3cf9e34abf4f9e36c2d72165aa9c132d3e2a725b6c2586aaa3a8af9d7a81041"  # Qwen/Qwen3.8-27B's file
XHIGH, LOW = T.EFFORTS["xhigh"], T.EFFORTS["low"]


@pytest.fixture(scope="module")
def tok(qwen3_dir):
    return data.Tokenizer(qwen3_dir)


@pytest.fixture(scope="module")
def hf_tok(qwen3_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(qwen3_dir)


def test_the_vendored_jinja_is_qwens_own_file_byte_for_byte():
    """After its provenance comment, tests/templates/Qwen3.8.jinja is the official file: the SHA-256 that
    copies of Qwen/Qwen3.8-27B's chat_template.jinja are pinned by (the comment says where)."""
    comment, official = JINJA.split("-#}\n", 1)
    assert comment.startswith("{#- Qwen3.8") and hashlib.sha256(official.encode()).hexdigest() == OFFICIAL_SHA256


PROMPTS = {**QWEN35_PROMPTS,
           "a blank system prompt": [{"role": "system", "content": " \n"}, {"role": "user", "content": "q"}],
           "a think block in the content of the history": [
               {"role": "user", "content": "a"}, {"role": "assistant", "content": " <think> r \n</think>\nA1 "},
               {"role": "user", "content": "b"}]}
SETTINGS = [{}, {"enable_thinking": True}, {"enable_thinking": False},
            {"reasoning_effort": "xhigh"}, {"reasoning_effort": "medium"}, {"reasoning_effort": "low"},
            {"reasoning_effort": "low", "enable_thinking": False}, {"reasoning_effort": "medium", "enable_thinking": True},
            {"preserve_thinking": True}, {"preserve_thinking": False}, {"preserve_thinking": False, "reasoning_effort": "low"}]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "defaults")
@pytest.mark.parametrize("case", list(PROMPTS))
def test_prompts_equal_qwen3_8s_jinja_template(tok, hf_tok, settings, case):
    messages = PROMPTS[case]
    text = hf_tok.apply_chat_template(messages, chat_template=JINJA, tokenize=False, add_generation_prompt=True,
                                      **settings)
    template = T.choose_template("nowhere", "qwen3_5", "qwen3_8", **settings)
    assert render_chat(messages, add_generation_prompt=True, template=template) == text
    ids, _ = encode_chat(tok, messages, add_generation_prompt=True, template=template)
    assert ids == hf_tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("settings", [{}, {"reasoning_effort": "low"}, {"enable_thinking": False},
                                      {"preserve_thinking": False}])
@pytest.mark.parametrize("case", list(FULL))
def test_whole_conversations_render_as_the_jinja_template(hf_tok, settings, case):
    text = hf_tok.apply_chat_template(FULL[case], chat_template=JINJA, tokenize=False, **settings)
    assert render_chat(FULL[case], template=T.choose_template("nowhere", "qwen3_5", "qwen3_8", **settings)) == text


def test_the_effort_opens_the_system_turn_only_when_the_model_thinks():
    question = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "q"}]
    low = T.choose_template("nowhere", "qwen3_5", "qwen3_8", reasoning_effort="low")
    assert render_chat(question, True, template=low).startswith(f"<|im_start|>system\n{LOW}\n\nBe brief.<|im_end|>")
    assert render_chat(question[1:], True, template=T.TEMPLATES["qwen3_8"]).startswith(
        f"<|im_start|>system\n{XHIGH}<|im_end|>\n<|im_start|>user\nq")
    off = T.choose_template("nowhere", "qwen3_5", "qwen3_8", reasoning_effort="low", enable_thinking=False)
    assert render_chat(question, True, template=off) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_qwen3_8_is_recognised_by_its_jinja_template_in_either_file(qwen3_dir, tmp_path):
    """tokenizer_config.json's chat_template, or chat_template.jinja (which Qwen3.8 ships, and which wins
    as in transformers); without either its config.json, Qwen3.6's own, says qwen3_5."""
    assert T.template_name_of(with_template(qwen3_dir, tmp_path / "config", JINJA), "qwen3_5") == "qwen3_8"
    folder = with_template(qwen3_dir, tmp_path / "file", (HERE / "Qwen3.6.jinja").read_text())
    (folder / "chat_template.jinja").write_text(JINJA)
    assert T.template_name_of(folder, "qwen3_5") == "qwen3_8"
    assert T.template_name_of(with_template(qwen3_dir, tmp_path / "none", None), "qwen3_5") == "qwen3_5"


def test_a_reasoning_effort_the_template_cannot_take_is_refused():
    with pytest.raises(T.TemplateError, match="--reasoning_effort: the qwen3_5 template has no such setting"):
        T.choose_template("nowhere", "qwen3_5", "qwen3_5", reasoning_effort="low")
    with pytest.raises(T.TemplateError, match="--reasoning_effort high: Qwen3.8's template takes xhigh"):
        T.choose_template("nowhere", "qwen3_5", "qwen3_8", reasoning_effort="high")


# ---------------------------------------------------------------------------------------------
# Training rows: as ms-swift 4.6.0 trains them (its qwen3_8 template's encode in train mode, on the tiny
# tokenizer; --loss_scale gets +ignore_empty_think as its TemplateArguments adds it for a hybrid model;
# trained spans in ⟦ ⟧). Its enable_thinking is off unless --enable_thinking true, and so is ours for the
# rows (with_trained_thinking, as train.py asks): the effort's instruction is in the rows only then.

ROWS = QWEN35_ROWS + [
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "A1"},
     {"role": "user", "content": "b"}, {"role": "assistant", "content": "<think>\nr2\n</think>\n\nA2"}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
]
U, A, E = "<|im_start|>user\n", "<|im_start|>assistant\n", "<|im_end|>\n"
EMPTY, SYS = "<think>\n\n</think>\n\n", "<|im_start|>system\n"
MS_SWIFT = {
    (): [
        f"{U}你是谁?{E}{A}{EMPTY}⟦我是小黄,由魔搭开发的大语言模型。{E}⟧",
        f"{U}1+1?{E}{A}⟦<think>\nOne plus one.\n</think>\n\n2{E}⟧",
        f"{U}hi{E}{A}{EMPTY}⟦Hello!{E}⟧",
        f"{U}a{E}{A}⟦<think>\nr1\n</think>\n\nA1{E}⟧{U}b{E}{A}⟦<think>\nr2\n</think>\n\nA2{E}⟧",
        f"{U}1+1?{E}{A}{EMPTY}⟦2{E}⟧",
        f"{SYS}You are a bot.{E}{U}x{E}{A}{EMPTY}⟦y{E}⟧",
        f"{SYS}Be brief.{E}{U}q{E}{A}⟦<think>\nwhy\n</think>\n\nA{E}⟧",
        f"{U}a{E}{A}{EMPTY}⟦A1{E}⟧{U}b{E}{A}⟦<think>\nr2\n</think>\n\nA2{E}⟧",
        f"{U}q{E}{A}{EMPTY}⟦a{E}⟧"],
    (("enable_thinking", True),): [
        f"{SYS}{XHIGH}{E}{U}你是谁?{E}{A}{EMPTY}⟦我是小黄,由魔搭开发的大语言模型。{E}⟧",
        f"{SYS}{XHIGH}{E}{U}1+1?{E}{A}⟦<think>\nOne plus one.\n</think>\n\n2{E}⟧",
        f"{SYS}{XHIGH}{E}{U}hi{E}{A}{EMPTY}⟦Hello!{E}⟧",
        f"{SYS}{XHIGH}{E}{U}a{E}{A}⟦<think>\nr1\n</think>\n\nA1{E}⟧{U}b{E}{A}⟦<think>\nr2\n</think>\n\nA2{E}⟧",
        f"{SYS}{XHIGH}{E}{U}1+1?{E}{A}{EMPTY}⟦2{E}⟧",
        f"{SYS}{XHIGH}\n\nYou are a bot.{E}{U}x{E}{A}{EMPTY}⟦y{E}⟧",
        f"{SYS}{XHIGH}\n\nBe brief.{E}{U}q{E}{A}⟦<think>\nwhy\n</think>\n\nA{E}⟧",
        f"{SYS}{XHIGH}{E}{U}a{E}{A}{EMPTY}⟦A1{E}⟧{U}b{E}{A}⟦<think>\nr2\n</think>\n\nA2{E}⟧",
        f"{SYS}{XHIGH}{E}{U}q{E}{A}{EMPTY}⟦a{E}⟧"],
    # last_round: the earlier answers are context, their reasoning and empty block kept (as qwen3_5 does not)
    (("loss_scale", "last_round"),): [
        f"{U}你是谁?{E}{A}{EMPTY}⟦我是小黄,由魔搭开发的大语言模型。{E}⟧",
        f"{U}1+1?{E}{A}⟦<think>\nOne plus one.\n</think>\n\n2{E}⟧",
        f"{U}hi{E}{A}{EMPTY}⟦Hello!{E}⟧",
        f"{U}a{E}{A}<think>\nr1\n</think>\n\nA1{E}{U}b{E}{A}⟦<think>\nr2\n</think>\n\nA2{E}⟧",
        f"{U}1+1?{E}{A}{EMPTY}⟦2{E}⟧",
        f"{SYS}You are a bot.{E}{U}x{E}{A}{EMPTY}⟦y{E}⟧",
        f"{SYS}Be brief.{E}{U}q{E}{A}⟦<think>\nwhy\n</think>\n\nA{E}⟧",
        f"{U}a{E}{A}{EMPTY}A1{E}{U}b{E}{A}⟦<think>\nr2\n</think>\n\nA2{E}⟧",
        f"{U}q{E}{A}{EMPTY}⟦a{E}⟧"],
    (("preserve_thinking", False),): [
        f"{U}你是谁?{E}{A}{EMPTY}⟦我是小黄,由魔搭开发的大语言模型。{E}⟧",
        f"{U}1+1?{E}{A}⟦<think>\nOne plus one.\n</think>\n\n2{E}⟧",
        f"{U}hi{E}{A}{EMPTY}⟦Hello!{E}⟧",
        f"{U}a{E}{A}⟦A1{E}⟧{U}b{E}{A}⟦<think>\nr2\n</think>\n\nA2{E}⟧",
        f"{U}1+1?{E}{A}{EMPTY}⟦2{E}⟧",
        f"{SYS}You are a bot.{E}{U}x{E}{A}{EMPTY}⟦y{E}⟧",
        f"{SYS}Be brief.{E}{U}q{E}{A}⟦<think>\nwhy\n</think>\n\nA{E}⟧",
        f"{U}a{E}{A}⟦A1{E}⟧{U}b{E}{A}⟦<think>\nr2\n</think>\n\nA2{E}⟧",
        f"{U}q{E}{A}{EMPTY}⟦a{E}⟧"],
    (("add_non_thinking_prefix", False), ("enable_thinking", False)): [
        f"{U}你是谁?{E}{A}⟦我是小黄,由魔搭开发的大语言模型。{E}⟧",
        f"{U}1+1?{E}{A}⟦<think>\nOne plus one.\n</think>\n\n2{E}⟧",
        f"{U}hi{E}{A}{EMPTY}⟦Hello!{E}⟧",
        f"{U}a{E}{A}⟦<think>\nr1\n</think>\n\nA1{E}⟧{U}b{E}{A}⟦<think>\nr2\n</think>\n\nA2{E}⟧",
        f"{U}1+1?{E}{A}⟦2{E}⟧",
        f"{SYS}You are a bot.{E}{U}x{E}{A}⟦y{E}⟧",
        f"{SYS}Be brief.{E}{U}q{E}{A}⟦<think>\nwhy\n</think>\n\nA{E}⟧",
        f"{U}a{E}{A}⟦A1{E}⟧{U}b{E}{A}⟦<think>\nr2\n</think>\n\nA2{E}⟧",
        f"{U}q{E}{A}⟦a{E}⟧"],
}
S = "<|im_start|>⟦"
MS_SWIFT[(("loss_scale", "all"),)] = [  # ms-swift: all+ignore_empty_think
    f"{S}user\n你是谁?{E}{A}⟧{EMPTY}⟦我是小黄,由魔搭开发的大语言模型。{E}⟧",
    f"{S}user\n1+1?{E}{A}<think>\nOne plus one.\n</think>\n\n2{E}⟧",
    f"{S}user\nhi{E}{A}⟧{EMPTY}⟦Hello!{E}⟧",
    f"{S}user\na{E}{A}<think>\nr1\n</think>\n\nA1{E}{U}b{E}{A}<think>\nr2\n</think>\n\nA2{E}⟧",
    f"{S}user\n1+1?{E}{A}⟧{EMPTY}⟦2{E}⟧",
    f"{S}system\nYou are a bot.{E}{U}x{E}{A}⟧{EMPTY}⟦y{E}⟧",
    f"{S}system\nBe brief.{E}{U}q{E}{A}<think>\nwhy\n</think>\n\nA{E}⟧",
    f"{S}user\na{E}{A}⟧{EMPTY}⟦A1{E}{U}b{E}{A}<think>\nr2\n</think>\n\nA2{E}⟧",
    f"{S}user\nq{E}{A}⟧{EMPTY}⟦a{E}⟧"]
MS_SWIFT[(("loss_scale", "last_round"), ("preserve_thinking", False))] = [  # as qwen3_5's last_round rows
    row.replace(f"{A}<think>\nr1\n</think>\n\nA1", f"{A}A1").replace(f"{A}{EMPTY}A1", f"{A}A1")
    for row in MS_SWIFT[(("loss_scale", "last_round"),)]]
MS_SWIFT[(("enable_thinking", False),)] = MS_SWIFT[()]  # thinking off: no instruction, as by default
MS_SWIFT[(("enable_thinking", True), ("reasoning_effort", "low"))] = [  # low's instruction instead
    row.replace(XHIGH, LOW) for row in MS_SWIFT[(("enable_thinking", True),)]]
MS_SWIFT[(("enable_thinking", True), ("reasoning_effort", "medium"))] = MS_SWIFT[()]  # medium writes none


@pytest.mark.parametrize("flags", list(MS_SWIFT), ids=lambda f: ",".join(f"{k}={v}" for k, v in f) or "defaults")
def test_training_rows_are_ms_swifts(tok, flags):
    template = T.with_trained_thinking(T.choose_template("nowhere", "qwen3_5", "qwen3_8", **dict(flags)),
                                       {"template": "qwen3_8", **dict(flags)})  # as train.chat_template resolves it
    conversations = [sources.row_to_messages({"messages": row}, "row") for row in ROWS]
    ours = [marked_text(tok, *encode_chat(tok, messages, template=template)) for messages in conversations]
    expected = list(MS_SWIFT[flags])
    expected[4] = expected[1]  # ms-swift drops reasoning_content; we write it into the content (test_qwen3.py)
    assert ours == expected
    batched = sources.encode_chats(tok, conversations, template=template)
    assert [marked_text(tok, r["input_ids"].tolist(), r["labels"].tolist()) for r in batched] == expected


def test_without_the_empty_block_the_rows_think_and_carry_the_effort(tok):
    """The one place our rows differ from ms-swift's: --add_non_thinking_prefix false without
    --enable_thinking trains, and asks, thinking (with_trained_thinking), so the rows carry the effort's
    instruction as the model will be asked; ms-swift's enable_thinking stays off there and writes none."""
    flags = {"add_non_thinking_prefix": False}
    template = T.with_trained_thinking(T.choose_template("nowhere", "qwen3_5", "qwen3_8", **flags),
                                       {"template": "qwen3_8", **flags})
    ids, _ = encode_chat(tok, ROWS[5], template=template)
    assert template.enable_thinking and tok.decode(ids).startswith(f"{SYS}{XHIGH}\n\nYou are a bot.{E}")


def test_reasoning_effort_reaches_train_infer_and_args_json(qwen3_dir, tmp_path):
    """--reasoning_effort low: train.py's template writes low's instruction, infer.py with an adapter trained
    so asks with it unless told otherwise, and an args.json naming an effort it cannot hold is refused."""
    import flags
    import infer
    import train
    from checkpoints import ARGS_FIELDS
    folder = with_template(qwen3_dir, tmp_path / "m", JINJA)
    config = type("Config", (), {"model_type": "qwen3_5"})
    a = flags.train_parser().parse_args(["--model", str(folder), "--dataset", "x.jsonl", "--reasoning_effort", "low"])
    assert train.chat_template(a, folder, config).reasoning_effort == "low" and a.template == "qwen3_8"
    trained = [{"template": "qwen3_8", "reasoning_effort": "low", "enable_thinking": True}]  # the adapter's args.json
    i = flags.infer_parser().parse_args(["--model", str(folder)])
    assert render_chat([{"role": "user", "content": "q"}], True, template=infer.chat_template(i, folder, config, trained)
                       ).startswith(f"{SYS}{LOW}{E}")
    i = flags.infer_parser().parse_args(["--model", str(folder), "--reasoning_effort", "medium"])
    assert infer.chat_template(i, folder, config, trained).reasoning_effort == "medium"
    # the adapter's effort is its template's: under --template qwen3_5 it is left out (said), not an error
    i = flags.infer_parser().parse_args(["--model", str(folder), "--template", "qwen3_5"])
    assert infer.chat_template(i, folder, config, trained).name == "qwen3_5"
    i = flags.infer_parser().parse_args(["--model", str(folder), "--template", "qwen3_5", "--reasoning_effort", "low"])
    with pytest.raises(T.TemplateError, match="--reasoning_effort: the qwen3_5 template has no such setting"):
        infer.chat_template(i, folder, config, trained)  # but the flag itself is refused
    both = [{"template": "qwen3_5"}, *trained]  # --adapters a=<trained with qwen3_5> b=<with qwen3_8>: the first's
    i = flags.infer_parser().parse_args(["--model", str(folder)])
    assert infer.chat_template(i, folder, config, both).name == "qwen3_5"
    ok, _ = ARGS_FIELDS["reasoning_effort"]
    assert ok("xhigh") and not ok("high")
    from cli import UsageError
    with pytest.raises(UsageError, match="--reasoning_effort: invalid choice: 'max'"):
        flags.train_parser().parse_args(["--model", "tiny", "--dataset", "x.jsonl", "--reasoning_effort", "max"])
