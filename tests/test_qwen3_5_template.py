"""Qwen3.5 / 3.6 chat format (template.py's qwen3_5): prompts byte for byte what the checkpoints' Jinja
templates render (Qwen3.5's in tiny.py, Qwen3.6's in tests/templates/; rendered by transformers'
apply_chat_template), and training rows
as ms-swift 4.6.0 trains them. No real Qwen3.5 tokenizer is reachable offline: the ids are checked on the
tiny Qwen3 tokenizer, which has the same special tokens (<|im_start|>, <|im_end|>, <think>, </think>,
the vision tokens); the format itself does not depend on the vocabulary."""

from pathlib import Path

import pytest

import data
import sources
import template as T
import tiny
from conftest import marked_text, with_template
from test_qwen3 import FULL, R1
from test_qwen3 import ROWS as QWEN3_ROWS
from data import encode_chat, render_chat

HERE = Path(__file__).resolve().parent / "templates"  # where each Jinja text came from: its first lines
JINJA = {"Qwen3.5": tiny.QWEN35_CHAT_TEMPLATE, "Qwen3.6": (HERE / "Qwen3.6.jinja").read_text()}


@pytest.fixture(scope="module")
def tok(qwen3_dir):
    return data.Tokenizer(qwen3_dir)


@pytest.fixture(scope="module")
def hf_tok(qwen3_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(qwen3_dir)


PROMPTS = {
    "one question": [{"role": "user", "content": "你是谁？"}],
    "system": [{"role": "system", "content": "You are a bot."}, {"role": "user", "content": "hi"}],
    "spaces around every text": [{"role": "system", "content": "  Be brief.\n"}, {"role": "user", "content": "\n a \n"},
                                 {"role": "assistant", "content": " <think> r \n</think>\nA1 \n"},
                                 {"role": "user", "content": " b"}],
    "history without reasoning": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "A1"},
                                  {"role": "user", "content": "b"}],
    "history with reasoning in the content": [{"role": "user", "content": "a"}, {"role": "assistant", "content": R1},
                                              {"role": "user", "content": "b"}],
    "history with reasoning_content": [{"role": "user", "content": "a"},
                                       {"role": "assistant", "content": "Answer one.", "reasoning_content": " Hmm.\n"},
                                       {"role": "user", "content": "b"}],
}
SETTINGS = [("Qwen3.5", {}), ("Qwen3.5", {"enable_thinking": True}), ("Qwen3.5", {"enable_thinking": False}),
            ("Qwen3.6", {}), ("Qwen3.6", {"enable_thinking": False}), ("Qwen3.6", {"preserve_thinking": True}),
            ("Qwen3.6", {"preserve_thinking": False})]


@pytest.mark.parametrize("checkpoint,settings", SETTINGS)
@pytest.mark.parametrize("case", list(PROMPTS))
def test_prompts_equal_the_checkpoints_jinja_template(tok, hf_tok, checkpoint, settings, case):
    messages = PROMPTS[case]
    text = hf_tok.apply_chat_template(messages, chat_template=JINJA[checkpoint], tokenize=False,
                                      add_generation_prompt=True, **settings)
    template = T.choose_template("nowhere", "qwen3_5", **settings)
    assert render_chat(messages, add_generation_prompt=True, template=template) == text
    ids, _ = encode_chat(tok, messages, add_generation_prompt=True, template=template)
    assert ids == hf_tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("checkpoint,settings", [("Qwen3.5", {}), ("Qwen3.6", {}), ("Qwen3.6", {"preserve_thinking": True})])
@pytest.mark.parametrize("case", list(FULL))
def test_whole_conversations_render_as_the_jinja_template(hf_tok, checkpoint, settings, case):
    text = hf_tok.apply_chat_template(FULL[case], chat_template=JINJA[checkpoint], tokenize=False, **settings)
    assert render_chat(FULL[case], template=T.choose_template("nowhere", "qwen3_5", **settings)) == text


def test_thinking_is_in_the_prompt_by_default_and_false_prefills_the_empty_block():
    assert render_chat([{"role": "user", "content": "q"}], True, template=T.TEMPLATES["qwen3_5"]).endswith(
        "<|im_start|>assistant\n<think>\n")
    off = T.choose_template("nowhere", "qwen3_5", enable_thinking=False)
    assert render_chat([{"role": "user", "content": "q"}], True, template=off).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_the_qwen3_5_template_comes_from_the_jinja_template_or_the_model_type(qwen3_dir, tmp_path):
    for checkpoint, text in JINJA.items():
        assert T.template_name_of(with_template(qwen3_dir, tmp_path / checkpoint, text), "qwen3") == "qwen3_5"
    assert T.template_name_of(with_template(qwen3_dir, tmp_path / "none", None), "qwen3_5") == "qwen3_5"
    assert T.template_name_of(qwen3_dir, "qwen3") == "qwen3"  # Qwen3's own is still Qwen3's


def test_preserve_thinking_is_refused_where_the_template_has_no_such_setting():
    with pytest.raises(T.TemplateError, match="--preserve_thinking: the qwen3 template has no such setting"):
        T.choose_template("nowhere", "qwen3", "qwen3", preserve_thinking=True)


# ---------------------------------------------------------------------------------------------
# Training rows: as ms-swift 4.6.0 trains them (its swift_encode with --model_type qwen3_5 --template
# qwen3_5 on a tiny qwen3_5 checkpoint holding the tiny tokenizer; trained spans in ⟦ ⟧). ms-swift needs
# qwen_vl_utils for a qwen3_5 model: it was stubbed out, as no image is encoded.

ROWS = QWEN3_ROWS + [  # and one whose texts carry spaces, which qwen3_5 trims
    [{"role": "system", "content": " Be brief.\n"}, {"role": "user", "content": "  q \n"},
     {"role": "assistant", "content": "\n<think> why \n</think>\nA \n"}],
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
        f"{SYS}Be brief.{E}{U}q{E}{A}⟦<think>\nwhy\n</think>\n\nA{E}⟧"],
    (("add_non_thinking_prefix", False),): [
        f"{U}你是谁?{E}{A}⟦我是小黄,由魔搭开发的大语言模型。{E}⟧",
        f"{U}1+1?{E}{A}⟦<think>\nOne plus one.\n</think>\n\n2{E}⟧",
        f"{U}hi{E}{A}{EMPTY}⟦Hello!{E}⟧",
        f"{U}a{E}{A}⟦<think>\nr1\n</think>\n\nA1{E}⟧{U}b{E}{A}⟦<think>\nr2\n</think>\n\nA2{E}⟧",
        f"{U}1+1?{E}{A}⟦2{E}⟧",
        f"{SYS}You are a bot.{E}{U}x{E}{A}⟦y{E}⟧",
        f"{SYS}Be brief.{E}{U}q{E}{A}⟦<think>\nwhy\n</think>\n\nA{E}⟧"],
    (("loss_scale", "last_round"),): [
        f"{U}你是谁?{E}{A}{EMPTY}⟦我是小黄,由魔搭开发的大语言模型。{E}⟧",
        f"{U}1+1?{E}{A}⟦<think>\nOne plus one.\n</think>\n\n2{E}⟧",
        f"{U}hi{E}{A}{EMPTY}⟦Hello!{E}⟧",
        f"{U}a{E}{A}A1{E}{U}b{E}{A}⟦<think>\nr2\n</think>\n\nA2{E}⟧",
        f"{U}1+1?{E}{A}{EMPTY}⟦2{E}⟧",
        f"{SYS}You are a bot.{E}{U}x{E}{A}{EMPTY}⟦y{E}⟧",
        f"{SYS}Be brief.{E}{U}q{E}{A}⟦<think>\nwhy\n</think>\n\nA{E}⟧"],
}
S = "<|im_start|>⟦"
MS_SWIFT[(("loss_scale", "all"),)] = [  # ms-swift: all+ignore_empty_think
    f"{S}user\n你是谁?{E}{A}⟧{EMPTY}⟦我是小黄,由魔搭开发的大语言模型。{E}⟧",
    f"{S}user\n1+1?{E}{A}<think>\nOne plus one.\n</think>\n\n2{E}⟧",
    f"{S}user\nhi{E}{A}⟧{EMPTY}⟦Hello!{E}⟧",
    f"{S}user\na{E}{A}<think>\nr1\n</think>\n\nA1{E}{U}b{E}{A}<think>\nr2\n</think>\n\nA2{E}⟧",
    f"{S}user\n1+1?{E}{A}⟧{EMPTY}⟦2{E}⟧",
    f"{S}system\nYou are a bot.{E}{U}x{E}{A}⟧{EMPTY}⟦y{E}⟧",
    f"{S}system\nBe brief.{E}{U}q{E}{A}<think>\nwhy\n</think>\n\nA{E}⟧"]
MS_SWIFT[(("enable_thinking", False),)] = MS_SWIFT[()]  # training rows do not change with it
MS_SWIFT[(("enable_thinking", True),)] = MS_SWIFT[()]
# --preserve_thinking (ms-swift's Template._get_preserve_thinking): true keeps an earlier answer's reasoning
# where only the last round trains, as written; false drops it where every round trains, the answer then
# trained alone
MS_SWIFT[(("loss_scale", "last_round"), ("preserve_thinking", True))] = [
    row.replace(f"{A}A1{E}", f"{A}<think>\nr1\n</think>\n\nA1{E}") for row in MS_SWIFT[(("loss_scale", "last_round"),)]]
MS_SWIFT[(("preserve_thinking", False),)] = [row.replace(f"{A}⟦<think>\nr1\n</think>\n\nA1", f"{A}⟦A1")
                                            for row in MS_SWIFT[()]]
MS_SWIFT[(("loss_scale", "all"), ("preserve_thinking", False))] = [
    row.replace(f"{A}<think>\nr1\n</think>\n\nA1", f"{A}A1") for row in MS_SWIFT[(("loss_scale", "all"),)]]


@pytest.mark.parametrize("flags", list(MS_SWIFT))
def test_training_rows_are_ms_swifts(tok, flags):
    template = T.choose_template("nowhere", "qwen3_5", "qwen3_5", **dict(flags))
    conversations = [sources.row_to_messages({"messages": row}, "row") for row in ROWS]
    ours = [marked_text(tok, *encode_chat(tok, messages, template=template)) for messages in conversations]
    expected = list(MS_SWIFT[flags])
    # As for Qwen3 (tests/test_qwen3.py): ms-swift drops reasoning_content (its row 5 trains "2" alone);
    # we write it into the content, so row 5 trains as ms-swift trains row 2.
    expected[4] = expected[1]
    assert ours == expected
    batched = sources.encode_chats(tok, conversations, template=template)
    assert [marked_text(tok, r["input_ids"].tolist(), r["labels"].tolist()) for r in batched] == expected


def test_preserved_earlier_answers_are_context_as_written_where_only_the_last_round_trains(tok):
    """ms-swift 4.6.0, --loss_scale last_round --preserve_thinking true: an earlier answer without reasoning
    gets no empty think block (qwen3_8, whose template keeps reasoning itself, writes one)."""
    row = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "A1"},
           {"role": "user", "content": "b"}, {"role": "assistant", "content": "<think>\nr2\n</think>\n\nA2"}]
    template = T.choose_template("nowhere", "qwen3_5", "qwen3_5", loss_scale="last_round", preserve_thinking=True)
    assert marked_text(tok, *encode_chat(tok, row, template=template)) == (
        f"{U}a{E}{A}A1{E}{U}b{E}{A}⟦<think>\nr2\n</think>\n\nA2{E}⟧")


def test_the_built_in_tiny_qwen3_5_carries_qwen3_5s_template():
    """`--model tiny-qwen3_5` is chosen the qwen3_5 template from its own tokenizer_config.json, as a
    real Qwen3.5 checkpoint is (not Qwen3's, which it carried before)."""
    folder = tiny.tiny_model_dir("tiny-qwen3_5")
    assert T.template_name_of(folder, "qwen3_5") == "qwen3_5"
    assert (folder.name, tiny.TINY_VERSION["qwen3_5"]) == ("tiny-qwen3_5-v2", "tiny-qwen3_5-v2")


def test_preserve_thinking_reaches_train_and_infer_from_their_flags(tmp_path):
    """--preserve_thinking true: train.py's template keeps an earlier answer's reasoning (the rows above
    show what that renders), infer.py with an adapter trained so keeps it too unless told otherwise;
    on Qwen2.5 it is refused."""
    import flags
    import infer
    import train
    folder, config = tiny.tiny_model_dir("tiny-qwen3_5"), type("Config", (), {"model_type": "qwen3_5"})
    a = flags.train_parser().parse_args(["--model", "tiny-qwen3_5", "--dataset", "x.jsonl", "--preserve_thinking", "true"])
    assert train.chat_template(a, folder, config).preserve_thinking and a.template == "qwen3_5"
    trained = [{"template": "qwen3_5", "preserve_thinking": True}]  # the adapter's args.json
    i = flags.infer_parser().parse_args(["--model", "tiny-qwen3_5"])
    assert infer.chat_template(i, folder, config, trained).preserve_thinking
    i = flags.infer_parser().parse_args(["--model", "tiny-qwen3_5", "--preserve_thinking", "false"])
    assert not infer.chat_template(i, folder, config, trained).preserve_thinking
    a = flags.train_parser().parse_args(["--model", "tiny", "--dataset", "x.jsonl", "--preserve_thinking", "true"])
    with pytest.raises(T.TemplateError, match="--preserve_thinking: the qwen2_5 template has no such setting"):
        train.chat_template(a, tiny.tiny_model_dir("tiny"), type("C", (), {"model_type": "qwen2"}))
