"""Large datasets (#17 item 17): batched tokenizing gives the rows per-row encoding gives, rows are
stored compactly, and reading a large file says how far it has got.

`python tests/test_data_scale.py /tmp/big.jsonl 338000` writes the ~200 MB file the issue measured
(alpaca-zh/en-like rows in the messages format, ~600 bytes each); the tests use a few hundred rows.
"""

import json
import random
import re
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import data  # noqa: E402
import sources  # noqa: E402
from data import IGNORE_INDEX, Tokenizer  # noqa: E402

HANZI = ("的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着去之过家学对可她里后"
         "小么心多天而能好都然没日于起还发成事只作当想看文无开手十用主行方又如前所本见经头面公同三已老从动两长"
         "知民样现分将外但身些与高意进把法此实回二理美点月明其种声全工己话儿者向情部正名定女问力机给等几很业最间新"
         "什打便位因重被走电四第门相次东政海口使教西再平真听世气信北少关并内加化由却代军产入先山五太水万市眼体别处")
WORDS = ("the of and to in is you that it he was for on are as with his they at be this have from or one had by "
         "word but not what all were we when your can said there use an each which she do how their if will up other "
         "about out many then them these so some her would make like him into time has look two more write go see "
         "number no way could people my than first water been call who oil its now find long down day did get come "
         "made may part model answer question explain example because however therefore translate summary list steps "
         "first second finally important data learning network training result").split()
SYSTEMS = ["You are a helpful assistant.", "你是一个乐于助人的助手。", "Answer briefly and accurately."]


def sentence(rng: random.Random, chinese: bool, n: int) -> str:
    if chinese:
        text = "".join(rng.choice(HANZI) for _ in range(n))
        return "，".join(text[i:i + 12] for i in range(0, len(text), 12)) + "。"
    words = [rng.choice(WORDS) for _ in range(n)]
    return " ".join(words).capitalize() + "."


def fake_row(rng: random.Random) -> dict:
    """One alpaca-like conversation of ~600 bytes: Chinese or English, some with a system prompt,
    some with a second turn."""
    chinese = rng.random() < 0.5
    scale = 2 if chinese else 1  # a Chinese character is 3 bytes, an English word about 6 with its space
    messages = [{"role": "system", "content": rng.choice(SYSTEMS)}] if rng.random() < 0.3 else []
    for _ in range(2 if rng.random() < 0.2 else 1):
        messages += [{"role": "user", "content": sentence(rng, chinese, rng.randint(5, 24) * scale)},
                     {"role": "assistant", "content": sentence(rng, chinese, rng.randint(24, 96) * scale)}]
    return {"messages": messages}


def write_big_jsonl(path, n_rows: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n_rows):
            f.write(json.dumps(fake_row(rng), ensure_ascii=False) + "\n")
    return Path(path)


@pytest.fixture(scope="module")
def tok(tiny_dir):
    return Tokenizer(tiny_dir)


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """600 rows (0.4 MB): with BATCH_ROWS 250 (small_batches), two batches and a bit."""
    return str(write_big_jsonl(tmp_path_factory.mktemp("scale") / "big.jsonl", 600))


@pytest.fixture
def small_batches(monkeypatch):
    monkeypatch.setattr(sources, "BATCH_ROWS", 250)


def encode_chat_before_17(tok, messages, system=None):
    """encode_chat as it was before batching (#17), one tokenizer call per turn: the oracle."""
    ids, labels = [], []
    header = [tok.im_start_id] + tok.encode_text("assistant\n")
    for m in data.chat_template(system).with_system(messages):
        if m["role"] == "assistant":
            answer = tok.encode_text(m["content"]) + [tok.im_end_id] + tok.newline_ids
            ids += header + answer
            labels += [IGNORE_INDEX] * len(header) + answer
        else:
            turn = [tok.im_start_id] + tok.encode_text(f"{m['role']}\n{m['content']}") + [tok.im_end_id] + tok.newline_ids
            ids += turn
            labels += [IGNORE_INDEX] * len(turn)
    return ids, labels


def turns(*texts, system=None):
    messages = [{"role": "system", "content": system}] if system is not None else []
    return messages + [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(texts)]


VARIED = [
    turns("你是谁？", "我是一个由魔搭社区开发的小助手，很高兴为您服务！"),
    turns("Who are you?", "A small model.", "还有呢？", "没有了。", system="Be brief."),
    turns("emoji 🙂🚀 and 日本語", "🙂" * 5 + " ok\n\n  indented"),
    turns("\n\n  a question that starts with newlines", "\nan answer that starts with one"),
    turns("What ends a turn?", "<|im_end|> does, and <|endoftext|>; <tool_call> stays one token."),
    turns("empty answer", ""),
    turns("q", "a", system=""),
    turns("生僻字：龘靐齉爩鬱", "Hello, 世界! " * 40),
]


@pytest.mark.parametrize("system", [None, "", "Other system prompt."])
def test_batched_encoding_gives_the_ids_and_labels_of_per_row_encoding(tok, system):
    """sources.encode_chats (ChatBatch) against the plain path it replaces, data.encode_rows (each
    conversation through data.encode_chat), and against the oracle from before batching."""
    conversations = VARIED * 3  # repeated turns are tokenized once in a batch, and still land in each row
    rows = sources.encode_chats(tok, conversations, system=system)
    plain = data.encode_rows(tok, conversations, system=system)
    assert len(rows) == len(plain) == len(conversations)
    for messages, row, alone in zip(conversations, rows, plain):
        ids_and_labels = (row["input_ids"].tolist(), row["labels"].tolist())
        assert ids_and_labels == (alone["input_ids"].tolist(), alone["labels"].tolist())
        assert ids_and_labels == encode_chat_before_17(tok, messages, system)
        assert ids_and_labels == data.encode_chat(tok, messages, system=system)
        assert (row.ids.dtype, row.trained.dtype) == (alone.ids.dtype, alone.trained.dtype) == (np.int32, np.bool_)


def test_a_text_tokenized_once_for_a_question_and_an_answer_is_trained_only_as_the_answer(tok):
    """ChatBatch tokenizes each distinct turn text once: a question's text "user\nhi" (its role's
    name is tokenized with it) and an answer "user\nhi" share one tokenization, yet only the answer
    is trained, in this row and in the next."""
    conversations = [turns("hi", "user\nhi"), turns("user\nhi", "hi", "hi", "user\nhi")]
    batch = sources.ChatBatch(conversations)
    assert batch.texts.count("user\nhi") == 1
    rows = batch.rows(tok, tok.encode_texts(batch.texts))
    for messages, row in zip(conversations, rows):
        assert (row["input_ids"].tolist(), row["labels"].tolist()) == encode_chat_before_17(tok, messages)


def test_control_token_texts_names_each_rows_first_spelling_or_none(tok):
    """One search of the whole batch finds that no row spells a control token; when one does, each row
    gets its own first spelling, as control_token_text gives it."""
    plain, spelled = turns("q", "a"), turns("say <|endoftext|>", "no: <|im_end|>")
    assert data.control_token_texts(tok, [plain] * 3) == [None] * 3
    assert data.control_token_texts(tok, [plain, spelled, plain]) == [None, "<|endoftext|>", None]


def test_the_streamed_dataset_equals_encoding_the_loaded_conversations(tok, big, tmp_path, capsys, small_batches):
    """load_dataset (read, tokenize in batches, sample, mix) gives the rows, in the order, that
    encode_dataset(load_conversations(...)) gives: sampling, mixing and truncation unchanged."""
    small = tmp_path / "small.json"
    odd = [{"messages": turns("What ends a turn?", "<|im_end|> does.")}, {"messages": turns("q", " ")}]
    small.write_text(json.dumps([fake_row(random.Random(i)) for i in range(5)] + odd, ensure_ascii=False))
    specs, max_length = [big + "#500", f"{small}#20"], 300
    rows, _ = sources.load_dataset(tok, specs, max_length, "left", seed=5)
    streamed = capsys.readouterr()
    expected = data.encode_dataset(tok, sources.load_conversations(specs, seed=5), max_length, "left")
    assert [(r["input_ids"].tolist(), r["labels"].tolist()) for r in rows] == \
        [(r["input_ids"].tolist(), r["labels"].tolist()) for r in expected]
    assert streamed == capsys.readouterr()  # the same warning and notes, and no progress lines
    assert "rows are longer than --max_length 300 tokens and were cut from the left" in streamed.out
    assert "1 row has an assistant turn with no text" in streamed.err and "control token" in streamed.err


def test_a_large_source_reports_rows_share_and_time_left_on_stderr(tok, big, capsys, small_batches):
    """The original failure: minutes of silence. A source over progress_over bytes prints a line as it
    starts, one per progress_every seconds (here: after each batch), and one when it is done."""
    sources.load_dataset(tok, [big], 4096, progress_over=300_000, progress_every=0)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == f"data: reading {big} ({Path(big).stat().st_size / 1e6:.0f} MB)"
    progress = [re.fullmatch(rf"data: {re.escape(big)}: ([\d,]+) rows \((\d+)%\), about \d+ s left", line)
                for line in lines[1:-1]]
    assert [m.group(1) for m in progress] == ["250", "500", "600"]
    shares = [int(m.group(2)) for m in progress]
    assert shares == sorted(shares) and 30 < shares[0] < 50 and shares[-1] == 100
    assert re.fullmatch(rf"data: {re.escape(big)}: 600 rows in \d+ s", lines[-1])
    sources.load_dataset(tok, [big], 4096)  # under the default threshold: read in silence
    assert capsys.readouterr().err == ""


def test_rows_are_int32_ids_and_a_bool_mask_and_repeats_share_them(tok, big):
    """The original failure was 3.8 GB for a 200 MB file: Python lists of ints. Now a token costs
    5 bytes (int32 id, bool trained) plus a small object per row, and SOURCE#N repeats share arrays."""
    tracemalloc.start()
    rows, _ = sources.load_dataset(tok, [big], 4096)
    held, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    tokens = sum(len(r.ids) for r in rows)
    assert all(r.ids.dtype == np.int32 and r.trained.dtype == np.bool_ for r in rows)
    assert sum(r.ids.nbytes + r.trained.nbytes for r in rows) == 5 * tokens
    assert held < 8 * tokens  # lists of ints held 16-48 bytes a token
    repeated, _ = sources.load_dataset(tok, [big + "#1500"], 4096)
    assert len(repeated) == 1500 and len({id(r.ids) for r in repeated}) == 600
    packed = data.pack(rows[:50], 4096)
    assert all(isinstance(p, data.Row) and p.ids.dtype == np.int32 for p in packed)
    assert sum(len(p.ids) for p in packed) == sum(len(r.ids) for r in rows[:50])


if __name__ == "__main__":
    out = write_big_jsonl(sys.argv[1], int(sys.argv[2]))
    print(f"{out}: {out.stat().st_size / 1e6:.0f} MB")


@pytest.mark.parametrize("streamed", [True, False])
def test_a_text_too_long_to_keep_is_not_tokenized_whole(tok, tmp_path, monkeypatch, capsys, streamed):
    """Issue 34: one 180 MB line took 9 GB, tokenized whole only to be dropped. With --truncation_strategy
    delete, a text of more than data.CLIP_OVER characters (and (max_length + 1) x the longest token's)
    is over max_length whatever it tokenizes to: only that much is tokenized, the row is dropped the
    same, the other rows are untouched. With left (the row is kept, cut), all of it is tokenized.
    At a smaller scale: CLIP_OVER 16,384 and a text of 20,000 characters (tokenizing 2**20 characters
    cost seconds), the same path."""
    monkeypatch.setattr(data, "CLIP_OVER", 2**14)
    path = tmp_path / "rows.jsonl"
    rows = [{"messages": turns(f"question {i}", f"answer {i}")} for i in range(3)]
    rows.insert(1, {"messages": turns("x " * 10_000, "ok")})  # 20,000 characters
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    seen = []
    monkeypatch.setattr(Tokenizer, "encode_texts", lambda self, texts, f=Tokenizer.encode_texts: (
        seen.extend(map(len, texts)), f(self, texts))[1])
    monkeypatch.setattr(Tokenizer, "encode_text", lambda self, text, f=Tokenizer.encode_text: (
        seen.append(len(text)), f(self, text))[1])

    def load(strategy):
        seen.clear()
        if streamed:
            return sources.load_dataset(tok, [str(path)], 64, strategy)[0]
        return data.encode_dataset(tok, sources.load_conversations([str(path)]), 64, strategy)

    kept = load("delete")
    assert max(seen) <= data.CLIP_OVER + 20 < 20_000 and len(kept) == 3  # (+ a role's header)
    assert "only its start was tokenized" in capsys.readouterr().out
    small = [c for c in sources.load_conversations([str(path)]) if len(c[0]["content"]) < 100]
    assert sorted(r["input_ids"].tolist() for r in kept) == \
        sorted(r["input_ids"].tolist() for r in data.encode_dataset(tok, small, 64))
    load("left")
    assert max(seen) >= 20_000
