"""Datasets: every format, sources, sampling, placeholders, exact labels, packing, and bad input."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data
import template
import lora
import sources
from data import IGNORE_INDEX, DataError, Tokenizer, encode_chat, render_chat
from infer import StreamDecoder

ROOT = Path(__file__).resolve().parent.parent

# One two-turn conversation with a system prompt, written in each supported format.
SYSTEM, Q1, A1, Q2, A2 = "Be brief.", "Who are you?", "I am a small model.", "用一句话回答：\n你能上网吗？", "不能，我不能上网。"
CONVERSATION = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": Q1},
                {"role": "assistant", "content": A1}, {"role": "user", "content": Q2},
                {"role": "assistant", "content": A2}]
SAME_ROW_IN_EVERY_FORMAT = {
    "messages": {"messages": CONVERSATION},
    "messages + system field": {"system": SYSTEM, "messages": CONVERSATION[1:]},
    "sharegpt": {"conversations": [{"from": "system", "value": SYSTEM}, {"from": "human", "value": Q1},
                                   {"from": "gpt", "value": A1}, {"from": "human", "value": Q2},
                                   {"from": "gpt", "value": A2}]},
    "alpaca": {"system": SYSTEM, "history": [[Q1, A1]], "instruction": Q2, "input": "", "output": A2},
    "alpaca, instruction + input": {"system": SYSTEM, "history": [[Q1, A1]], "instruction": "用一句话回答：",
                                    "input": "你能上网吗？", "output": A2},
    "query/response": {"system": SYSTEM, "history": [[Q1, A1]], "query": Q2, "response": A2},
    "query/response, history as a string": {"system": SYSTEM, "history": str([[Q1, A1]]), "query": Q2,
                                            "response": A2},
}


@pytest.fixture(scope="module")
def tok(tiny_dir):
    return Tokenizer(tiny_dir)


@pytest.fixture(scope="module")
def hf_tok(tiny_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_dir)


def write(path: Path, rows, jsonl=None) -> str:
    """Rows as a .jsonl file (one per line) or a .json array, chosen by the file name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if jsonl if jsonl is not None else path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    else:
        path.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    return str(path)


def trained_spans(tok, ids, labels) -> list[str]:
    """The text of each run of consecutive labelled tokens."""
    spans, run = [], []
    for i, label in zip(ids + [None], labels + [IGNORE_INDEX]):
        if label != IGNORE_INDEX:
            assert label == i  # labels are aligned with input_ids; the trainer shifts them
            run.append(i)
        elif run:
            spans.append(tok.decode(run))
            run = []
    return spans


# ----------------------------------------------------------------------------------------------
# Formats and exact labels

@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_every_format_gives_the_same_ids_and_labels(tmp_path, tok, suffix):
    expected = encode_chat(tok, CONVERSATION)
    for name, row in SAME_ROW_IN_EVERY_FORMAT.items():
        path = write(tmp_path / f"{name}{suffix}", [row])
        [conversation] = sources.load_conversations([path])
        assert conversation == CONVERSATION, name
        [encoded] = data.encode_dataset(tok, [conversation], max_length=4096)
        assert (encoded["input_ids"].tolist(), encoded["labels"].tolist()) == expected, name


def test_a_file_may_mix_formats(tmp_path):
    path = write(tmp_path / "mixed.jsonl", list(SAME_ROW_IN_EVERY_FORMAT.values()))
    assert sources.load_conversations([path]) == [CONVERSATION] * len(SAME_ROW_IN_EVERY_FORMAT)


def test_labels_are_exactly_each_answer_its_im_end_and_the_newline_after_it(tok):
    """ms-swift's layout (>= 3.10.3), token by token: in each assistant turn the content, <|im_end|>
    and the "\\n" after it are trained; system and user turns and the assistant headers are not."""
    def masked(text):  # (id, label) pairs of a turn or header not trained on
        return [(i, IGNORE_INDEX) for i in [tok.im_start_id] + tok.encode(text)]

    def trained(answer):
        return [(i, i) for i in tok.encode(answer) + [tok.im_end_id] + tok.encode("\n")]

    end = "<|im_end|>\n"
    expected = (masked(f"system\n{SYSTEM}{end}") + masked(f"user\n{Q1}{end}") + masked("assistant\n") + trained(A1)
                + masked(f"user\n{Q2}{end}") + masked("assistant\n") + trained(A2))
    ids, labels = encode_chat(tok, CONVERSATION)
    assert list(zip(ids, labels)) == expected
    assert ids == tok.encode(render_chat(CONVERSATION))
    assert trained_spans(tok, ids, labels) == [A1 + "<|im_end|>\n", A2 + "<|im_end|>\n"]


def test_an_inference_prompt_is_the_rendered_prompt_up_to_the_assistant_header(tok):
    """The generation-prompt path is unchanged: the ids of the rendered prompt, history included
    (each earlier answer followed by <|im_end|> and "\\n"), ending with <|im_start|>assistant\\n."""
    header = [tok.im_start_id] + tok.encode("assistant\n")
    for messages in (CONVERSATION[:2], CONVERSATION[:4]):
        ids, labels = encode_chat(tok, messages, add_generation_prompt=True)
        assert ids == tok.encode(render_chat(messages, add_generation_prompt=True))
        assert ids[-len(header):] == header and labels[-len(header):] == [IGNORE_INDEX] * len(header)
    history, _ = encode_chat(tok, CONVERSATION[:3])
    prompt, _ = encode_chat(tok, CONVERSATION[:4], add_generation_prompt=True)
    assert prompt[:len(history)] == history  # a conversation's prompt extends its history's training ids


def test_system_prompt_priority_row_then_flag_then_default(tok):
    own, plain = CONVERSATION, CONVERSATION[1:]
    assert encode_chat(tok, own, system="Other.") == encode_chat(tok, own)
    assert encode_chat(tok, own, system="") == encode_chat(tok, own)  # '' only means: none of the flag's own
    [row] = data.encode_dataset(tok, [plain], 4096, system="Other.")
    assert tok.decode(row["input_ids"]).startswith("<|im_start|>system\nOther.<|im_end|>\n")
    [row] = data.encode_dataset(tok, [plain], 4096)
    assert tok.decode(row["input_ids"]).startswith(f"<|im_start|>system\n{template.QWEN25_SYSTEM}<|im_end|>\n")


@pytest.mark.parametrize("system, system_turn", [(None, f"<|im_start|>system\n{template.QWEN25_SYSTEM}<|im_end|>\n"),
                                                  ("", ""),  # no system turn at all, as ms-swift writes it
                                                  ("Be brief.", "<|im_start|>system\nBe brief.<|im_end|>\n")])
def test_system_flag_unset_empty_or_text_is_the_same_in_training_and_inference(tok, tmp_path, system, system_turn):
    """--system as train.py passes it to encode_dataset, stored in args.json, read back by
    lora.checkpoint_args and passed to encode_chat for the inference prompt, as infer.py does: the
    prompt is the training row's ids up to the answer. Unset is Qwen's default, not ''."""
    conversation = CONVERSATION[1:3]  # a question and its answer, no system prompt of their own
    [row] = data.encode_dataset(tok, [conversation], 4096, system=system)
    ckpt = tmp_path / "checkpoint-1"
    ckpt.mkdir()
    args = {"model": "tiny"} if system is None else {"model": "tiny", "system": system}  # unset: no key
    (ckpt / "args.json").write_text(json.dumps(args))
    stored = lora.checkpoint_args(ckpt)["system"]
    assert stored == system
    prompt, _ = encode_chat(tok, conversation[:1], add_generation_prompt=True, system=stored)
    assert tok.decode(prompt) == f"{system_turn}<|im_start|>user\n{Q1}<|im_end|>\n<|im_start|>assistant\n"
    ids = row["input_ids"].tolist()
    assert ids == prompt + tok.encode(A1) + [tok.im_end_id] + tok.encode("\n")
    assert row["labels"].tolist() == [IGNORE_INDEX] * len(prompt) + ids[len(prompt):]


CHATS = {
    "single turn, no system": [{"role": "user", "content": "What can you do?"},
                               {"role": "assistant", "content": "I can help you write and translate."}],
    "single turn, system": [{"role": "system", "content": "You are a helpful assistant."},
                            {"role": "user", "content": "你是谁？"}, {"role": "assistant", "content": "我是小助手。"}],
    "multi turn, no system": CONVERSATION[1:],
    "multi turn, system": CONVERSATION,
    "question starting with newlines": [{"role": "user", "content": "\n\n  indented question\n"},
                                        {"role": "assistant", "content": "ok"}],
}


@pytest.mark.parametrize("name", list(CHATS))
@pytest.mark.parametrize("generation_prompt", [False, True])
def test_rendering_and_ids_equal_transformers_qwen25_template(tok, hf_tok, name, generation_prompt):
    messages = CHATS[name]
    if generation_prompt:
        messages = messages[:-1]  # a prompt ends with the question
    text = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    assert render_chat(messages, add_generation_prompt=generation_prompt) == text
    ids, labels = encode_chat(tok, messages, add_generation_prompt=generation_prompt)
    assert ids == hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    assert len(labels) == len(ids)


def test_an_answer_is_tokenized_as_it_is_generated(tok):
    """An answer starting with a newline: the whole-text tokenizer would merge it with the header's
    newline; we keep the answer's own tokens, the ones generation produces after the prompt."""
    answer = "\n\nfirst line"
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": answer}]
    ids, labels = encode_chat(tok, messages)
    prompt, _ = encode_chat(tok, messages[:1], add_generation_prompt=True)
    assert ids[:len(prompt)] == prompt
    assert ids[len(prompt):] == tok.encode(answer) + [tok.im_end_id] + tok.encode("\n")
    assert tok.decode(ids) == render_chat(messages)
    assert trained_spans(tok, ids, labels) == [answer + "<|im_end|>\n"]


# ----------------------------------------------------------------------------------------------
# Sources, sampling and mixing

def numbered_rows(n, lang="en"):
    return [{"query": f"question {i}", "response": f"answer {i}", "tag": lang} for i in range(n)]


def answers(conversations):
    return [c[-1]["content"] for c in conversations]


def test_parse_source():
    assert sources.parse_source("alpaca-zh.jsonl#500") == ("alpaca-zh.jsonl", 500)
    assert sources.parse_source(" data/self_cognition.json ") == ("data/self_cognition.json", None)
    assert sources.parse_source("owner/name#3") == ("owner/name", 3)


def test_a_file_whose_name_contains_a_hash_is_read_whole(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "v#2.jsonl", numbered_rows(5))
    assert sources.parse_source("v#2.jsonl") == ("v#2.jsonl", None)
    assert len(sources.load_conversations(["v#2.jsonl"])) == 5


def test_sample_fewer_than_the_rows_gives_distinct_rows(tmp_path):
    path = write(tmp_path / "d.jsonl", numbered_rows(10))
    got = answers(sources.load_conversations([path + "#4"], seed=1))
    assert len(got) == len(set(got)) == 4


def test_sample_more_than_the_rows_gives_whole_copies_plus_a_random_remainder(tmp_path):
    path = write(tmp_path / "d.jsonl", numbered_rows(10))
    got = answers(sources.load_conversations([path + "#23"], seed=1))
    counts = sorted(got.count(f"answer {i}") for i in range(10))
    assert len(got) == 23 and counts == [2] * 7 + [3] * 3


def test_sampling_follows_ms_swift_rule_with_one_random_state():
    """ms-swift: np.tile(range(rows), N // rows) then RandomState.permutation(rows)[:N % rows]."""
    rng = np.random.RandomState(42)
    expected_a = list(range(5)) * 2 + np.random.RandomState(42).permutation(5)[:3].tolist()
    assert sources.sample_indices(5, 13, rng) == expected_a
    assert sources.sample_indices(5, 5, rng) == list(range(5))  # whole copies draw nothing


def test_sampling_and_mixing_are_deterministic_by_seed(tmp_path):
    zh = write(tmp_path / "zh.jsonl", numbered_rows(30, "zh"))
    en = write(tmp_path / "en.json", [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(30)])
    specs = [zh + "#12", en + "#7"]
    a = sources.load_conversations(specs, seed=3)
    assert a == sources.load_conversations(specs, seed=3)
    assert a != sources.load_conversations(specs, seed=4)
    assert len(a) == 19 and sum(x.startswith("answer") for x in answers(a)) == 12
    assert answers(a)[:12] != sorted(answers(a)[:12])  # the two sources are shuffled together


def test_a_local_folder_reads_its_json_files_preferring_train(tmp_path):
    write(tmp_path / "ds" / "train.jsonl", numbered_rows(3))
    write(tmp_path / "ds" / "test.jsonl", numbered_rows(2))
    assert len(sources.load_conversations([str(tmp_path / "ds")])) == 3
    write(tmp_path / "ds2" / "part1.json", numbered_rows(3))
    write(tmp_path / "ds2" / "sub" / "part2.jsonl", numbered_rows(2))
    assert len(sources.load_conversations([str(tmp_path / "ds2")])) == 5


def test_json_lines_in_a_file_named_json_are_read(tmp_path):
    path = write(tmp_path / "d.json", numbered_rows(3), jsonl=True)
    assert len(sources.load_conversations([path])) == 3


def test_hub_dataset_is_downloaded_with_snapshot_download(tmp_path, monkeypatch):
    import huggingface_hub
    snapshot = tmp_path / "snapshot"
    write(snapshot / "data" / "train.jsonl", numbered_rows(4))
    write(snapshot / "data" / "test.jsonl", numbered_rows(2))
    (snapshot / "dataset_info.json").write_text("{}")
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    got = sources.load_conversations(["someone/self-cognition#6"], model_name=["X"], model_author=["Y"])
    assert len(got) == 6 and set(answers(got)) == {f"answer {i}" for i in range(4)}
    [(repo_id, kwargs)] = calls
    assert repo_id == "someone/self-cognition" and kwargs["repo_type"] == "dataset"
    assert set(kwargs["allow_patterns"]) == {"*.json", "*.jsonl", "*.csv"}


def test_hub_dataset_without_data_files_says_what_is_supported(tmp_path, monkeypatch):
    import huggingface_hub
    snapshot = tmp_path / "snapshot"
    (snapshot / "data").mkdir(parents=True)
    (snapshot / "data" / "train.arrow").write_bytes(b"ARROW1")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: str(snapshot))
    with pytest.raises(DataError, match=r"'someone/arrow' has no \.json, \.jsonl, \.csv or \.parquet files \(found: "
                                        r"data/train\.arrow\)\. Convert the data first"):
        sources.load_conversations(["someone/arrow"])


def test_hub_download_failure_is_a_data_error(monkeypatch):
    import huggingface_hub

    def fail(repo_id, **kwargs):
        raise OSError("404 Repository Not Found\nAn error happened while trying to locate the files on the Hub.")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    with pytest.raises(DataError, match=r"'nobody/nothing': could not download 'nobody/nothing' as a Hugging Face dataset "
                                        r"\(OSError: 404 Repository Not Found\)\..* Check the id") as e:
        sources.load_conversations(["nobody/nothing"])
    assert "\n" not in str(e.value)  # one paragraph
    with pytest.raises(DataError, match=r"could not download 'llm-wizard/alpaca-gpt4-data-zh' \(the Hugging Face mirror "
                                        r"of the ModelScope dataset 'AI-ModelScope/alpaca-gpt4-data-zh'\)"):
        sources.load_conversations(["AI-ModelScope/alpaca-gpt4-data-zh#500"])  # the tutorial's general data
    with pytest.raises(DataError, match=r"'data/self_cognition.jsn': no such local file, and could not download"):
        sources.load_conversations(["data/self_cognition.jsn"])  # a file's name mistyped (data/ exists here)


# ----------------------------------------------------------------------------------------------
# {{NAME}} / {{AUTHOR}}

def identity_rows():
    return [{"query": "你是谁？", "response": "我是{{NAME}}，由{{AUTHOR}}开发。", "tag": "zh"},
            {"query": "Who are you?", "response": "I am {{NAME}}, made by {{AUTHOR}}.", "tag": "en"},
            {"query": "你叫什么？", "response": "{{NAME}}"},  # no tag: Chinese characters decide
            {"query": "Your name?", "response": "{{NAME}}"},
            {"messages": [{"role": "system", "content": "You are {{NAME}}."},
                          {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]


def test_placeholders_take_the_chinese_or_english_value_by_tag_or_text(tmp_path):
    path = write(tmp_path / "id.jsonl", identity_rows())
    got = sources.load_conversations([path], model_name=["小黄", "Xiao Huang"], model_author=["魔搭", "ModelScope"])
    contents = {c[-2]["content"]: (c[0]["content"] if c[0]["role"] == "system" else None, c[-1]["content"])
                for c in got}
    assert contents["你是谁？"] == (None, "我是小黄，由魔搭开发。")
    assert contents["Who are you?"] == (None, "I am Xiao Huang, made by ModelScope.")
    assert contents["你叫什么？"] == (None, "小黄")
    assert contents["Your name?"] == (None, "Xiao Huang")
    assert contents["hi"] == ("You are Xiao Huang.", "hello")  # placeholders in any message


def test_one_value_serves_both_languages(tmp_path):
    path = write(tmp_path / "id.jsonl", identity_rows()[:2])
    got = sources.load_conversations([path], model_name="Robo", model_author=["ACME"])
    assert sorted(answers(got)) == ["I am Robo, made by ACME.", "我是Robo，由ACME开发。"]


@pytest.mark.parametrize("given, missing", [({"model_author": ["A"]}, "--model_name"),
                                            ({"model_name": ["N"]}, "--model_author")])
def test_a_placeholder_without_its_flag_is_an_error(tmp_path, given, missing):
    path = write(tmp_path / "id.jsonl", identity_rows())
    placeholder = "{{NAME}}" if missing == "--model_name" else "{{AUTHOR}}"
    with pytest.raises(DataError) as e:
        sources.load_conversations([path], **given)
    assert str(e.value).startswith(
        f"{path}, line 1 contains {placeholder}, but {missing} was not given. Pass {missing}")


def test_three_values_for_model_name_is_an_error(tmp_path):
    path = write(tmp_path / "id.jsonl", identity_rows())
    with pytest.raises(DataError, match="--model_name takes one value, or two: the Chinese one then the English"):
        sources.load_conversations([path], model_name=["a", "b", "c"], model_author=["x"])


def test_shipped_self_cognition_data():
    path = ROOT / "data" / "self_cognition.json"
    rows = json.loads(path.read_text(encoding="utf-8"))
    assert len(rows) >= 80
    assert {r["tag"] for r in rows} == {"zh", "en"} and min(
        sum(r["tag"] == t for r in rows) for t in ("zh", "en")) >= 40
    assert all(set(r) == {"query", "response", "tag"} for r in rows)
    text = json.dumps(rows, ensure_ascii=False)
    for topic in ["GPT-4", "ChatGPT", "Qwen", "通义千问", "Claude", "上网", "go online", "What can you do",
                  "你能做什么", "Who created you", "谁创造了你", "What is your name", "你叫什么名字"]:
        assert topic in text, topic
    assert sum("{{NAME}}" in r["response"] for r in rows) >= 60
    assert sum("{{AUTHOR}}" in r["response"] for r in rows) >= 50
    got = sources.load_conversations([str(path)], model_name=["小黄", "Xiao Huang"], model_author=["魔搭", "ModelScope"])
    assert len(got) == len(rows) and "{{" not in json.dumps(got, ensure_ascii=False)
    english = [c[-1]["content"] for c in got if c[0]["content"].startswith("Who created")]
    assert english == ["I was created by ModelScope."]


# ----------------------------------------------------------------------------------------------
# Encoding, truncation and splitting

def long_and_short(tok):
    short = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    long = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "word " * 80}]
    return short, long, len(encode_chat(tok, short)[0]), len(encode_chat(tok, long)[0])


def test_rows_over_max_length_are_dropped_with_a_count(tok, capsys):
    short, long, n_short, n_long = long_and_short(tok)
    rows = data.encode_dataset(tok, [short, long, short], max_length=n_short + 5)
    assert [r["input_ids"].tolist() for r in rows] == [encode_chat(tok, short)[0]] * 2
    out = capsys.readouterr().out
    assert f"1 of 3 rows are longer than --max_length {n_short + 5} tokens and were dropped" in out
    assert f"the longest has {n_long} tokens" in out


@pytest.mark.parametrize("strategy", ["left", "right"])
def test_truncation_left_or_right_keeps_rows_cut(tok, strategy):
    short, long, n_short, n_long = long_and_short(tok)
    ids, labels = encode_chat(tok, long)
    m = n_long - 20
    [row] = data.encode_dataset(tok, [long], max_length=m, truncation_strategy=strategy)
    cut = slice(-m, None) if strategy == "left" else slice(m)
    assert (row["input_ids"].tolist(), row["labels"].tolist()) == (ids[cut], labels[cut])


def test_nothing_left_to_train_on_is_an_error(tok):
    short, long, n_short, n_long = long_and_short(tok)
    with pytest.raises(DataError, match=rf"All 2 rows are longer than --max_length 5 tokens, so nothing is left "
                                        rf"to train on\. Raise --max_length \(the longest row has {n_long} tokens\)"):
        data.encode_dataset(tok, [short, long], max_length=5)
    prompt_only = len(encode_chat(tok, long[:1], add_generation_prompt=True)[0])
    with pytest.raises(DataError, match=r"no row has an assistant token left to learn from\. Raise --max_length "
                                        r".* or use --truncation_strategy left"):
        data.encode_dataset(tok, [long], max_length=prompt_only, truncation_strategy="right")
    with pytest.raises(DataError, match="--truncation_strategy must be delete, left or right, not 'middle'"):
        data.encode_dataset(tok, [short], 100, truncation_strategy="middle")


def test_a_split_that_leaves_a_source_nothing_to_train_on_is_refused_by_name():
    sizes = [(50, None), (1, None)]
    assert sources.pick_rows(sizes, ["a.jsonl", "b.jsonl"], 1, 0)[1] == []
    train_rows, val_rows = sources.pick_rows([(50, None)], ["a.jsonl"], 1, 0.1)
    assert len(val_rows) == 5 and sorted(train_rows + val_rows) == list(range(50))
    assert len(sources.pick_rows([(50, None)], ["a.jsonl"], 1, 0.001)[1]) == 1  # at least one, as in ms-swift
    with pytest.raises(DataError, match=r"--split_dataset_ratio 0.5 holds out 1 of the 1 rows of b.jsonl, which "
                                        r"leaves none to train on"):
        sources.pick_rows(sizes, ["a.jsonl", "b.jsonl"], 1, 0.5)


# ----------------------------------------------------------------------------------------------
# Batching and packing

def test_collate_pads_right_with_a_mask(tok):
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [-100]}]
    b = data.collate(rows, pad_id=tok.endoftext_id)
    pad = tok.endoftext_id
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, pad, pad]]
    assert b["labels"].tolist() == [[-100, 6, 7], [-100, -100, -100]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]
    assert all(t.dtype == torch.long for t in b.values())


def test_pack_fills_rows_with_every_sample_once(tok):
    rows = [{"input_ids": [i] * n, "labels": [-100] + [i] * (n - 1)} for i, n in enumerate([7, 3, 5, 2, 6, 1, 4])]
    packed = data.pack(rows, max_length=8)
    assert all(len(p["input_ids"]) <= 8 for p in packed) and len(packed) == 4  # 28 tokens: 4 rows is optimal
    samples = []
    for p in packed:
        seg, pos = p["segment_ids"].tolist(), p["position_ids"].tolist()
        assert seg == sorted(seg) and seg[0] == 1
        for s in set(seg):
            where = [t for t in range(len(seg)) if seg[t] == s]
            assert [pos[t] for t in where] == list(range(len(where)))  # positions restart per sample
            samples.append([int(p["input_ids"][t]) for t in where])
    assert sorted(samples) == sorted(r["input_ids"] for r in rows)
    b = data.collate(packed, pad_id=0)
    assert b["attention_mask"].tolist()[0] == packed[0]["segment_ids"].tolist() + [0] * (8 - len(packed[0]["segment_ids"]))
    with pytest.raises(DataError, match="A row of 7 tokens cannot be packed into rows of --max_length 6"):
        data.pack(rows, max_length=6)


def answer_cut(tok) -> int:
    """A --max_length at which left truncation of CONVERSATION starts inside the last answer."""
    labels = encode_chat(tok, CONVERSATION)[1]
    return next(m for m in range(3, len(labels)) if labels[-m] != IGNORE_INDEX and labels[-m - 1] == IGNORE_INDEX) - 1


def test_no_label_crosses_a_sample_boundary_in_a_packed_row(tok):
    """The trainer predicts labels[t] from position t - 1. At a sample's first token, t - 1 is the
    previous sample's last token, so that label must be -100. It is: every sample starts with
    <|im_start|> (never trained), and pack masks it anyway, e.g. after left truncation."""
    conversations = [CONVERSATION, CHATS["single turn, system"], CHATS["single turn, no system"]]
    rows = data.encode_dataset(tok, conversations, 4096)
    assert all(r["input_ids"][0] == tok.im_start_id and r["labels"][0] == IGNORE_INDEX for r in rows)
    cut = data.encode_dataset(tok, [CONVERSATION], answer_cut(tok), truncation_strategy="left")
    assert cut[0]["labels"][0] != IGNORE_INDEX  # starts inside the answer
    for p in data.pack(rows + cut, 4096):
        seg = p["segment_ids"]
        starts = [t for t in range(len(seg)) if t == 0 or seg[t] != seg[t - 1]]
        assert len(starts) == 4 and all(p["labels"][t] == IGNORE_INDEX for t in starts)


def per_token_loss(model, batch):
    """Cross-entropy of each target token: (B, T - 1), 0 where the label is -100."""
    logits = model(batch["input_ids"], batch["attention_mask"], batch["position_ids"])  # (B, T, V)
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], reduction="none")


def test_packed_and_padded_batches_give_each_sample_its_unpacked_loss(tok, tiny_dir):
    import model as model_lib
    model, _ = model_lib.load_model(str(tiny_dir), dtype=torch.float32)
    conversations = [CONVERSATION, CHATS["single turn, system"], CHATS["single turn, no system"],
                     CONVERSATION[1:3]]
    rows = data.encode_dataset(tok, conversations, 4096)
    rows += data.encode_dataset(tok, [CONVERSATION], answer_cut(tok), truncation_strategy="left")  # label[0] trained
    pad = tok.endoftext_id
    with torch.no_grad():
        alone = [per_token_loss(model, data.collate([r], pad)).sum().item() for r in rows]

        padded = per_token_loss(model, data.collate(rows, pad)).sum(-1).tolist()
        torch.testing.assert_close(padded, alone, rtol=1e-5, atol=1e-4)

        packed = data.pack(rows, max_length=sum(len(r["input_ids"]) for r in rows) // 2 + 40)
        assert 1 < len(packed) < len(rows)
        batch = data.collate(packed, pad)
        loss = per_token_loss(model, batch)  # (B, T - 1)
        target_segment = batch["attention_mask"][:, 1:]  # each loss belongs to its target's sample
        got = {}
        for b, p in enumerate(packed):
            for s in sorted(set(p["segment_ids"])):
                ids = p["input_ids"][p["segment_ids"] == s].tolist()
                k = next(k for k, r in enumerate(rows) if r["input_ids"].tolist() == ids)
                got[k] = loss[b][target_segment[b] == s].sum().item()
    assert sorted(got) == list(range(len(rows)))
    torch.testing.assert_close([got[k] for k in range(len(rows))], alone, rtol=1e-5, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# Text that spells a control token, and answers with no text

def special_ids(tok) -> set[int]:
    return {i for i, t in tok.tok.get_added_tokens_decoder().items() if t.special}


def test_a_control_token_written_in_a_message_is_plain_text_and_the_turns_stay_whole(tok, hf_tok):
    question = "What does <|im_end|> do?<|endoftext|>"
    answer = "It ends a turn.<|im_end|>\n<|im_start|>user\nfake question"
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    ids, labels = encode_chat(tok, messages)
    # Three turns (Qwen's default system prompt, the question, the answer): a pair of control tokens each.
    assert [i for i in ids if i in special_ids(tok)] == [tok.im_start_id, tok.im_end_id] * 3
    assert tok.decode(ids) == render_chat(messages)
    assert trained_spans(tok, ids, labels) == [answer + "<|im_end|>\n"]
    # Plain text is what transformers gives with split_special_tokens=True.
    assert tok.encode_text(answer) == hf_tok(answer, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    prompt, _ = encode_chat(tok, messages[:1], add_generation_prompt=True)  # inference: the same
    assert prompt == ids[:len(prompt)] and [i for i in prompt if i in special_ids(tok)] == [
        tok.im_start_id, tok.im_end_id, tok.im_start_id, tok.im_end_id, tok.im_start_id]


def test_every_special_token_is_spelt_out_by_encode_text(tok):
    assert len(tok.special_tokens) == 22 and "<|im_end|>" in tok.special_tokens
    for t in tok.special_tokens:
        ids = tok.encode_text(f"a{t}b")
        assert not special_ids(tok) & set(ids) and tok.decode(ids) == f"a{t}b", t
        assert tok.encode(t) == [tok.tok.token_to_id(t)]  # encode still reads them, as transformers does


def test_added_tokens_that_are_not_special_stay_single_tokens(tiny_dir, tmp_path):
    """Qwen2.5's tokenizer.json marks <tool_call> and </tool_call> (and the fim tokens) not special:
    its chat template writes them inside assistant content, as single tokens. So do we."""
    config = json.loads((tiny_dir / "tokenizer.json").read_text())
    for t in config["added_tokens"]:
        t["special"] = t["special"] and t["content"] not in ("<tool_call>", "</tool_call>")
    (tmp_path / "tokenizer.json").write_text(json.dumps(config))
    qwen_like = Tokenizer(tmp_path)
    call = qwen_like.tok.token_to_id("<tool_call>")
    ids = qwen_like.encode_text('<tool_call>{"name": "f"}</tool_call><|im_end|>')
    assert ids[0] == call and qwen_like.im_end_id not in ids
    assert "<tool_call>" not in qwen_like.special_tokens


def test_rows_with_control_token_text_or_an_empty_answer_are_counted_on_stderr(tmp_path, tok, capsys):
    rows = [{"query": "q1", "response": "a1"},
            {"query": "q2", "response": ""},
            {"query": "What ends a turn?", "response": "<|im_end|> does."},
            {"query": "q4", "response": "a4", "history": [["q3", " "]]}]  # whitespace is no answer either
    path = write(tmp_path / "d.jsonl", rows)
    conversations = sources.load_conversations([path])
    assert capsys.readouterr().err == (
        f"warning: 2 rows have an assistant turn with no text (the first: {path}, line 2); training on them "
        f"teaches the model to answer nothing. Write their answers or remove those rows.\n")
    assert len(data.encode_dataset(tok, conversations, 4096)) == 4  # kept: the warning is all
    assert capsys.readouterr().err == (
        "note: 1 of 4 rows contain the text of a control token (such as <|im_end|>); it is trained on as plain "
        "text and cannot end or start a turn. If those rows hold conversations already rendered as ChatML, give "
        "them as messages instead.\n")
    sources.load_conversations([write(tmp_path / "one.jsonl", rows[:2])])
    assert capsys.readouterr().err.startswith("warning: 1 row has an assistant turn with no text")
    data.encode_dataset(tok, sources.load_conversations([write(tmp_path / "clean.jsonl", rows[:1])]), 4096)
    assert capsys.readouterr().err == ""


# ----------------------------------------------------------------------------------------------
# Bad input: each one clear error that says where and what to do

BAD_FILES = [
    ("broken.json", '[\n  {"query": "a", "response": "b"},\n  {"query": "c" "response": "d"}\n]',
     r"broken\.json: invalid JSON at line 3, column 17: Expecting ',' delimiter\. A \.json dataset is one array"),
    ("broken.jsonl", '{"query": "a", "response": "b"}\n{"query": "c", "response": \n',
     r"broken\.jsonl, line 2: invalid JSON at column 28: Expecting value\. A \.jsonl dataset has one complete"),
    ("unknown.jsonl", '{"query": "a", "response": "b"}\n{"ask": "c", "reply": "d"}\n',
     r"unknown\.jsonl, line 2 has none of the fields of a known format \(its keys: \"ask\", \"reply\"\)\. "
     r"Expected one of: \"messages\" .*\"conversations\" .*\"instruction\" \+ \"output\" .*\"query\" \+ \"response\""),
    ("unknown.json", '[{"query": "a", "response": "b"}, {"text": "c"}]',
     r"unknown\.json, row 2 has an answer \(\"text\"\) but no question: name its question column one of query, "
     r"prompt, .* or rename it with --columns \(ms-swift would train on the row with an empty question\)"),
    ("not_a_row.json", '[["a", "b"]]', r"not_a_row\.json, row 1 is a JSON list; each row must be an object"),
    ("object.json", '{"data": []}', r"object\.json holds a JSON dict, not an array of rows"),
    ("types1.jsonl", '{"messages": "hello"}\n',
     r"types1\.jsonl, line 1: \"messages\" must be a list of \{\"role\": \.\.\., \"content\": \.\.\.\} "
     r"objects, not str"),
    ("types2.jsonl", '{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]}\n',
     r"types2\.jsonl, line 1: message 1 has a \"content\" of type int; it must be a string"),
    ("types3.jsonl", '{"conversations": [{"from": "human"}]}\n',
     r"types3\.jsonl, line 1: message 1 of \"conversations\" must be an object with \"from\" and \"value\""),
    ("types4.jsonl", '{"instruction": "a", "output": ["b"]}\n',
     r"types4\.jsonl, line 1: \"output\" must be a string, not list"),
    ("types5.jsonl", '{"query": "a", "response": "b", "history": [["only one"]]}\n',
     r"types5\.jsonl, line 1: \"history\" must be a list of \[query, response\] pairs of strings"),
    ("types6.jsonl", '{"query": "a", "response": "b", "system": 3}\n',
     r"types6\.jsonl, line 1: \"system\" must be a string, not int"),
    ("no_instruction.jsonl", '{"output": "b"}\n', r"no_instruction\.jsonl, line 1 has an answer \(\"output\"\) but no question"),
    ("role.jsonl", '{"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]}\n',
     r"role\.jsonl, line 1: message 2 has unknown role 'robot'\. Known: system, user \(or human\), assistant"),
    ("role.json", '[{"conversations": [{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}]}]',
     r"role\.json, row 1: message 2 has unknown from 'bot'"),
    ("ends_with_user.jsonl", '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, '
     '{"role": "user", "content": "c"}]}\n',
     r"ends_with_user\.jsonl, line 1: the conversation does not end with an assistant turn\. Training learns only"),
    ("no_messages.jsonl", '{"messages": []}\n', r"no_messages\.jsonl, line 1: the conversation does not end with"),
    ("late_system.jsonl", '{"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "s"}, '
     '{"role": "assistant", "content": "b"}]}\n',
     r"late_system\.jsonl, line 1: message 2 is a system message; only the first message may be one"),
    ("two_systems.jsonl", '{"system": "s", "messages": [{"role": "system", "content": "t"}, '
     '{"role": "assistant", "content": "b"}]}\n',
     r"two_systems\.jsonl, line 1 has both a \"system\" field and a system message"),
    ("empty.json", "", r"empty\.json is empty: a dataset needs at least one row"),
    ("empty.jsonl", "\n  \n", r"empty\.jsonl is empty: a dataset needs at least one row"),
    ("empty_array.json", "[]", r"empty_array\.json is empty: it holds no rows"),
    ("data.xml", "<rows/>", r"data\.xml: unsupported file type '\.xml'\. Datasets are \.json files"),
    ("surrogate.jsonl", '{"query": "a", "response": "b"}\n{"query": "hi \\ud800 there", "response": "ok"}\n',
     r"surrogate\.jsonl, line 2: the user text holds a lone surrogate \('\\ud800' at character 4\), which is not "
     r"a character and cannot be tokenized\. In JSON the escapes .* only in pairs .*: fix that escape, or remove "
     r"the row"),
    ("surrogate.json", '[{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b\\udc00"}]}]',
     r"surrogate\.json, row 1: the assistant text holds a lone surrogate \('\\udc00' at character 2\)"),
    ("deep.json", "[" * 100_000 + "]" * 100_000,
     r"deep\.json: the JSON is nested too deeply to read \(more than about \d+ levels of \[ or \{\)\. A dataset "
     r"row is an object of strings and lists of messages, a few levels deep: check that this is the dataset file"),
    ("deep.jsonl", '{"query": "a", "response": "b"}\n' + "[" * 100_000 + "]" * 100_000 + "\n",
     r"deep\.jsonl, line 2: the JSON is nested too deeply to read"),
]


@pytest.mark.parametrize("name, content, message", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_dataset_files_give_one_clear_error(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message) as e:
        sources.load_conversations([str(path)])
    assert str(tmp_path) in str(e.value) and "\n" not in str(e.value)


def test_a_surrogate_pair_is_one_character(tmp_path, tok):
    path = tmp_path / "emoji.jsonl"
    path.write_text('{"query": "hi", "response": "\\ud83d\\ude42"}\n')  # the JSON escapes of one emoji
    [conversation] = sources.load_conversations([str(path)])
    assert conversation[-1]["content"] == "🙂"
    assert tok.decode(data.encode_dataset(tok, [conversation], 4096)[0]["input_ids"]).endswith("🙂<|im_end|>\n")


def test_a_sample_count_memory_cannot_hold_is_refused_before_sampling(tmp_path, monkeypatch):
    path = write(tmp_path / "six.jsonl", numbered_rows(6))
    monkeypatch.setattr(sources, "sample_indices", lambda *a: pytest.fail("sampled before refusing"))
    with pytest.raises(DataError, match=rf"--dataset '{path}#100000000': 100,000,000 samples of its 6 rows is more "
                                        rf"than 10 times the rows and more than 10,000,000 samples, more than memory "
                                        rf"can be expected to hold .* Use an N of at most 10,000,000; to go over the "
                                        rf"rows more often, raise --num_train_epochs instead\.$"):
        sources.load_conversations([path + "#100000000"])
    sources.check_sample_count("d.jsonl#N", 6, 10_000_000)  # many times the rows, but no more than the cap
    sources.check_sample_count("d.jsonl#N", 2_000_000, 20_000_000)  # over the cap, but 10 times the rows
    with pytest.raises(DataError, match=r"Use an N of at most 20,000,000;"):
        sources.check_sample_count("d.jsonl#N", 2_000_000, 20_000_001)


def test_missing_path_is_an_error(tmp_path):
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match=rf"--dataset '{missing}': there is no such file or folder, and it is not "
                                        rf"a Hugging Face dataset id"):
        sources.load_conversations([missing + "#10"])
    with pytest.raises(DataError, match=r"files\. This project ships it: pass --dataset .*data/self_cognition\.json\.$"):
        sources.load_conversations([str(tmp_path / "self_cognition.json")])


@pytest.mark.parametrize("spec", ["data.jsonl#abc", "data.jsonl#0", "data.jsonl#-3", "data.jsonl#", "#5",
                                  "data.jsonl#1.5"])
def test_malformed_sample_count_is_an_error(spec):
    with pytest.raises(DataError, match=r"expected SOURCE#N with N a whole number of rows to sample \(at least 1\), "
                                        r"as in 'alpaca-zh\.jsonl#500'"):
        sources.parse_source(spec)


def test_no_dataset_is_an_error():
    with pytest.raises(DataError, match="No dataset given: pass --dataset"):
        sources.load_conversations([])


# ----------------------------------------------------------------------------------------------
# Streaming decode

@pytest.mark.parametrize("text", ["我是由魔搭社区开发的大语言模型，很高兴为您服务！龘靐齉爩鬱",
                                  "生僻字、emoji 🙂🚀 and 日本語のテキスト",
                                  "Hello, 世界! 你好 🙂"])
def test_stream_decoder_yields_only_whole_characters(tok, text):
    ids = tok.encode(text)
    dec = StreamDecoder(tok)
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # some characters really are split over tokens


def test_stream_decoder_special_tokens_and_invalid_bytes(tok):
    ids = tok.encode("ok") + [tok.im_end_id]
    dec = StreamDecoder(tok)
    assert "".join(dec.push(i) for i in ids) + dec.flush() == "ok"
    dec = StreamDecoder(tok, skip_special_tokens=False)
    assert "".join(dec.push(i) for i in ids) + dec.flush() == "ok<|im_end|>"
    # A lone continuation byte can never become a character: shown at once, not held back forever.
    [lone] = tok.encode("é")[-1:]  # é is two bytes; its last token holds the continuation byte
    if tok.decode([lone]) == "\ufffd":
        assert StreamDecoder(tok).push(lone) == "\ufffd"
