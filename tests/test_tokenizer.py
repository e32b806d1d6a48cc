"""The tokenizer, Qwen2.5's chat rendering and streaming decode, against transformers."""

import json

import pytest

import data
import template
from data import DataError, Tokenizer, encode_chat, render_chat
from infer import StreamDecoder

TEXTS = ["Hello! Who are you?", "你好，我是由 swift 开发的大语言模型。", "  spaces\n\nand\ttabs 123456 ",
         "emoji 🙂 and café (NFC: cafe\u0301)", "<|im_start|>user\nhi<|im_end|>\n"]

CONVERSATIONS = {
    "single turn": [{"role": "user", "content": "你是谁?"}, {"role": "assistant", "content": "我是小助手。"}],
    "with system": [{"role": "system", "content": "You are a helpful assistant."},
                    {"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "I am a robot."}],
    "multi turn": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                   {"role": "assistant", "content": "hello"}, {"role": "user", "content": "你能上网吗"},
                   {"role": "assistant", "content": "不能。"}],
    "question only": [{"role": "user", "content": "What can you do?"}],
}


@pytest.fixture(scope="module")
def hf_tok(tiny_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def tok(tiny_dir):
    return Tokenizer(tiny_dir)


@pytest.mark.parametrize("text", TEXTS)
def test_encoding_equals_transformers(tok, hf_tok, text):
    assert tok.encode(text) == hf_tok.encode(text, add_special_tokens=False)
    assert tok.decode(tok.encode(text)) == hf_tok.decode(hf_tok.encode(text, add_special_tokens=False))


def test_special_tokens_are_found_by_name(tok, tiny_dir):
    added = json.loads((tiny_dir / "tokenizer.json").read_text())["added_tokens"]
    ids = {t["content"]: t["id"] for t in added}
    assert (tok.endoftext_id, tok.im_start_id, tok.im_end_id) == (
        ids["<|endoftext|>"], ids["<|im_start|>"], ids["<|im_end|>"])
    assert tok.im_start_id == tok.endoftext_id + 1 == tok.im_end_id - 1  # Qwen's order
    assert tok.encode("<|im_end|>") == [tok.im_end_id]


@pytest.mark.parametrize("name", list(CONVERSATIONS))
@pytest.mark.parametrize("gen", [False, True])
def test_chat_rendering_equals_the_qwen25_template(hf_tok, name, gen):
    msgs = CONVERSATIONS[name]
    expected = hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    assert render_chat(msgs, add_generation_prompt=gen) == expected


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_piecewise_ids_equal_encoding_the_rendered_text(tok, name):
    msgs = CONVERSATIONS[name]
    ids, labels = encode_chat(tok, msgs, add_generation_prompt=True)
    assert ids == tok.encode(render_chat(msgs, add_generation_prompt=True))
    assert len(labels) == len(ids)


def test_default_system_prompt_and_override():
    msgs = CONVERSATIONS["single turn"]
    assert render_chat(msgs).startswith(f"<|im_start|>system\n{template.QWEN25_SYSTEM}<|im_end|>\n")
    assert render_chat(msgs, system="Be terse.").startswith("<|im_start|>system\nBe terse.<|im_end|>\n")
    own = CONVERSATIONS["with system"]
    assert render_chat(own, system="ignored") == render_chat(own)


def test_labels_cover_each_assistant_answer_its_im_end_and_newline(tok):
    ids, labels = encode_chat(tok, CONVERSATIONS["multi turn"])
    trained = [i for i, l in zip(ids, labels) if l != data.IGNORE_INDEX]
    assert tok.decode(trained) == "hello<|im_end|>\n不能。<|im_end|>\n"
    assert all(l in (i, data.IGNORE_INDEX) for i, l in zip(ids, labels))


def test_stream_decoder_never_emits_half_a_character(tok):
    text = "我是由魔搭社区开发的大语言模型，很高兴为您服务！🙂 done"
    ids = tok.encode(text)
    dec = StreamDecoder(tok)
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert len(ids) > len(text) // 3  # the text really was split inside characters


def test_stream_decoder_skips_special_tokens(tok):
    dec = StreamDecoder(tok)
    out = "".join(dec.push(i) for i in tok.encode("ok") + [tok.im_end_id]) + dec.flush()
    assert out == "ok"


def test_tokenizer_errors(tmp_path, tiny_dir):
    with pytest.raises(DataError, match="tokenizer.json"):
        Tokenizer(tmp_path)
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="could not be read as a tokenizer"):
        Tokenizer(bad)
    d = json.loads((tiny_dir / "tokenizer.json").read_text())
    d["added_tokens"] = [t for t in d["added_tokens"] if t["content"] != "<|im_start|>"]
    bad.write_text(json.dumps(d))
    with pytest.raises(DataError, match="no <\\|im_start\\|> token"):
        Tokenizer(bad)
