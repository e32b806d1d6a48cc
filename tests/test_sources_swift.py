"""Datasets as ms-swift reads them: a row's empty system prompt, the column names it maps itself,
--columns, .csv files, and the ModelScope ids of its tutorial (their Hugging Face mirrors, from a
hub cache made here: no network).

The ids, labels and renderings below were recorded from ms-swift 4.6.0 itself (its own template and
dataset loader, as `swift sft` runs them: /work/oracle/swift/swift_encode.py, --model_type qwen2
--template qwen2_5, on the tiny model of tests/conftest.py's tiny_dir; CPU, float32). ms-swift 3.12.6
rendered the empty system prompts the same way."""

import json
import sys
from pathlib import Path

import pytest

import data
import sources
from data import IGNORE_INDEX, DataError
from conftest import marked_text


@pytest.fixture(scope="module")
def tok(tiny_dir):
    return data.Tokenizer(tiny_dir)


def write_rows(path: Path, rows) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def rows_in_file_order(path, columns=None) -> list[list[dict]]:
    """The conversations of one file, in its order (load_conversations shuffles the mixture)."""
    progress = sources.Progress(str(path), 0)
    return [sources.row_to_messages(row, where, sources.parse_columns(columns))
            for where, row in sources.read_file(Path(path), progress)]


def marked(tok, conversation, system=None) -> str:
    """The training row's text with its trained spans in ⟦ ⟧, as the ms-swift oracle writes them."""
    [row] = data.encode_dataset(tok, [conversation], 4096, system=system)
    return marked_text(tok, row["input_ids"].tolist(), row["labels"].tolist())


# ----------------------------------------------------------------------------------------------
# A row's own empty system prompt: no system turn at all (issue 31, item 1)

HI = [899, 84, 82, 394, 198, 71, 72, 900, 198, 899, 64, 315, 374, 83, 198]  # <|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n
HELLO = [71, 436, 78, 900, 198]  # hello<|im_end|>\n, trained
QWEN_SYSTEM = [899, 82, 88, 82, 83, 68, 76, 198, 501, 426, 812, 11, 847, 460, 220, 32, 75, 72, 65, 64, 65, 64, 220, 34, 75,
               261, 67, 13, 220, 501, 426, 257, 871, 386, 13, 900, 198]  # Qwen2.5's default system turn
BLANK_SYSTEM = [899, 82, 88, 82, 83, 68, 76, 198, 220, 220, 900, 198]  # <|im_start|>system\n  <|im_end|>\n
EMPTY_SYSTEM_ROWS = {  # row -> the (input_ids, labels) ms-swift 4.6.0 trains on
    "messages, system message ''": (
        {"messages": [{"role": "system", "content": ""}, {"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "hello"}]}, HI + HELLO, [IGNORE_INDEX] * 15 + HELLO),
    "alpaca, system ''": ({"instruction": "hi", "input": "", "output": "hello", "system": ""}, HI + HELLO,
                          [IGNORE_INDEX] * 15 + HELLO),
    "query, system ''": ({"query": "hi", "response": "hello", "system": ""}, HI + HELLO, [IGNORE_INDEX] * 15 + HELLO),
    "sharegpt, system message ''": (
        {"conversations": [{"from": "system", "value": ""}, {"from": "human", "value": "hi"},
                           {"from": "gpt", "value": "hello"}]}, HI + HELLO, [IGNORE_INDEX] * 15 + HELLO),
    "sharegpt, system ''": ({"system": "", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
                            HI + HELLO, [IGNORE_INDEX] * 15 + HELLO),
    "alpaca, no system": ({"instruction": "hi", "input": "", "output": "hello"}, QWEN_SYSTEM + HI + HELLO,
                          [IGNORE_INDEX] * 52 + HELLO),
    "messages, system '  '": (
        {"messages": [{"role": "system", "content": "  "}, {"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "hello"}]}, BLANK_SYSTEM + HI + HELLO, [IGNORE_INDEX] * 27 + HELLO),
}


@pytest.mark.parametrize("name", list(EMPTY_SYSTEM_ROWS))
def test_a_rows_own_empty_system_prompt_writes_no_system_turn_as_ms_swift(tmp_path, tok, name):
    row, ids, labels = EMPTY_SYSTEM_ROWS[name]
    [conversation] = sources.load_conversations([write_rows(tmp_path / "d.jsonl", [row])])
    [encoded] = data.encode_dataset(tok, [conversation], 4096)
    assert (encoded["input_ids"].tolist(), encoded["labels"].tolist()) == (ids, labels)
    [batched], _ = sources.load_dataset(tok, [str(tmp_path / "d.jsonl")], 4096)  # the path train.py takes
    assert (batched["input_ids"].tolist(), batched["labels"].tolist()) == (ids, labels)


def test_a_rows_own_empty_system_prompt_wins_over_the_system_flag(tmp_path, tok):
    """ms-swift 4.6.0 and 3.12.6 with --system 'Other.': the row's "" still writes no system turn."""
    rows = [EMPTY_SYSTEM_ROWS[n][0] for n in ("messages, system message ''", "alpaca, system ''", "alpaca, no system")]
    conversations = rows_in_file_order(write_rows(tmp_path / "d.jsonl", rows))
    assert [marked(tok, c, system="Other.") for c in conversations] == [
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n⟦hello<|im_end|>\n⟧",
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n⟦hello<|im_end|>\n⟧",
        "<|im_start|>system\nOther.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n⟦hello<|im_end|>\n⟧"]


# ----------------------------------------------------------------------------------------------
# The column names ms-swift maps itself, --columns, .csv (issue 31, item 11)

S, U, A, E = "<|im_start|>system\nS<|im_end|>\n", "<|im_start|>user\n", "<|im_start|>assistant\n", "<|im_end|>\n"
MS_SWIFT_COLUMNS = [  # a row, and the row ms-swift 4.6.0 trains on with --system S
    ({"prompt": "p1", "completion": "c1"}, f"{S}{U}p1{E}{A}⟦c1{E}⟧"),
    ({"question": "q2", "answer": "a2"}, f"{S}{U}q2{E}{A}⟦a2{E}⟧"),
    ({"problem": "p3", "solution": "s3"}, f"{S}{U}p3{E}{A}⟦s3{E}⟧"),
    ({"Question": "q6", "Answer": "a6"}, f"{S}{U}q6{E}{A}⟦a6{E}⟧"),  # any case
    ({"instruction": "i7", "input": "in7", "output": "o7", "text": "junk7"}, f"{S}{U}i7\nin7{E}{A}⟦o7{E}⟧"),
    ({"query": "q8", "prompt": "p8", "response": "r8"}, f"{S}{U}q8{E}{A}⟦r8{E}⟧"),  # the standard name wins
    ({"system_prompt": "sp10", "question": "q10", "answer": "a10"},
     f"<|im_start|>system\nsp10{E}{U}q10{E}{A}⟦a10{E}⟧"),
    ({"conversation": [{"from": "human", "value": "h13"}, {"from": "gpt", "value": "g13"}]}, f"{S}{U}h13{E}{A}⟦g13{E}⟧"),
    ({"instruction": "i14", "answer": "a14"}, f"{S}{U}i14{E}{A}⟦a14{E}⟧"),
    ({"input": "in15", "targets": "t15"}, f"{S}{U}in15{E}{A}⟦t15{E}⟧"),
    ({"instruction": "i17", "input": "", "output": "o17", "system": ""}, f"{U}i17{E}{A}⟦o17{E}⟧"),
]


def test_columns_ms_swift_maps_itself_train_as_in_ms_swift(tmp_path, tok):
    path = write_rows(tmp_path / "d.jsonl", [row for row, _ in MS_SWIFT_COLUMNS])
    assert [marked(tok, c, system="S") for c in rows_in_file_order(path)] == [m for _, m in MS_SWIFT_COLUMNS]


@pytest.mark.parametrize("row, message", [
    ({"prompt": "p9", "question": "q9", "answer": "a9"},  # ms-swift: trains "a9" after an empty question
     r"d\.jsonl, line 1: the columns \"prompt\" and \"question\" could each be the query; say which with "
     r"--columns '\{\"prompt\": \"query\"\}' \(ms-swift takes neither"),
    ({"query": "q16", "answer": "a16", "text": "t16"},  # ms-swift: a row with no answer, nothing trained
     r"the columns \"answer\" and \"text\" could each be the response"),
    ({"text": "t4"}, r"d\.jsonl, line 1 has an answer \(\"text\"\) but no question"),  # ms-swift: an empty question
])
def test_a_row_ms_swift_reads_without_its_question_or_answer_is_an_error_here(tmp_path, row, message):
    with pytest.raises(DataError, match=message):
        sources.load_conversations([write_rows(tmp_path / "d.jsonl", [row])])


def test_columns_flag_renames_as_ms_swift(tmp_path, tok):
    """--columns '{"Q": "query", "a": "response", "sys": "system"}' on {"q", "a", "sys"}: ms-swift 4.6.0's ids."""
    path = write_rows(tmp_path / "d.jsonl", [{"q": "q12", "a": "a12", "sys": "S12"}])
    flag = '{"Q": "query", "a": "response", "sys": "system"}'
    [conversation] = sources.load_conversations([path], columns=flag)
    [row] = data.encode_dataset(tok, [conversation], 4096)
    assert row["input_ids"].tolist() == [899, 82, 88, 82, 83, 68, 76, 198, 50, 16, 17, 900, 198, 899, 84, 82, 394, 198,
                                         80, 16, 17, 900, 198, 899, 64, 315, 374, 83, 198, 64, 16, 17, 900, 198]
    assert row["labels"].tolist() == [IGNORE_INDEX] * 29 + [64, 16, 17, 900, 198]
    (tmp_path / "columns.json").write_text(flag)  # ms-swift also takes the path of a JSON file
    assert sources.load_conversations([path], columns=str(tmp_path / "columns.json")) == [conversation]


def test_columns_flag_gives_a_name_two_columns_would_take_to_neither(tmp_path):
    path = write_rows(tmp_path / "d.jsonl", [{"query": "q", "a": "x", "b": "y", "response": "r"}])
    assert rows_in_file_order(path, '{"a": "response", "b": "response"}')[0][-1]["content"] == "r"
    with pytest.raises(DataError, match=r"--columns renames \"a\" to \"response\", but the row has a \"response\" "
                                        r"column already"):
        rows_in_file_order(path, '{"a": "response"}')
    with pytest.raises(DataError, match=r"--columns 'question=query' is not a JSON object"):
        sources.parse_columns("question=query")


def test_csv_files_are_read_as_ms_swift_reads_them(tmp_path, tok):
    """A header line, quoted cells with commas and line breaks, and an empty cell as "" (ms-swift's
    na_filter=False): an empty system cell writes no system turn, as ms-swift 4.6.0 renders it."""
    path = tmp_path / "d.csv"
    path.write_text('question,answer,system\n"q11, with comma","a11\nline2",\nq11b,a11b,Be brief.\n', encoding="utf-8")
    assert [marked(tok, c, system="S") for c in rows_in_file_order(path)] == [
        f"{U}q11, with comma{E}{A}⟦a11\nline2{E}⟧",
        f"<|im_start|>system\nBe brief.{E}{U}q11b{E}{A}⟦a11b{E}⟧"]
    bad = tmp_path / "bad.csv"
    bad.write_text("query,response\na,b,c\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.csv, line 2 has more cells than the header line's 2 columns; quote"):
        sources.load_conversations([str(bad)])


# ----------------------------------------------------------------------------------------------
# ModelScope ids: their Hugging Face mirrors, from a hub cache (issue 31, item 10)

@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An offline Hugging Face cache (HF_HUB_OFFLINE=1) in huggingface_hub's own layout; add(repo, files)
    puts a dataset snapshot in it."""
    from huggingface_hub import constants
    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    def add(repo_id: str, files: dict):
        repo = cache / ("datasets--" + repo_id.replace("/", "--"))
        commit = "0123456789abcdef0123456789abcdef01234567"
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
        for name, text in files.items():
            (repo / "snapshots" / commit / name).parent.mkdir(parents=True, exist_ok=True)
            (repo / "snapshots" / commit / name).write_bytes(text if isinstance(text, bytes) else text.encode())
    return add


def test_the_tutorials_modelscope_ids_come_from_their_hugging_face_mirrors(hub_cache, capsys):
    """`--dataset 'AI-ModelScope/alpaca-gpt4-data-zh#500' 'AI-ModelScope/alpaca-gpt4-data-en#500'
    'swift/self-cognition#500'`: the mirrors ms-swift's registry names, from the cache; self-cognition
    from the shipped file, its placeholders filled in."""
    zh = [{"instruction": f"问题{i}", "input": "", "output": f"回答{i}"} for i in range(3)]
    zh.append({"instruction": "翻译", "input": "输入：你好", "output": "回答3"})  # ms-swift drops 输入： (AlpacaZhPreprocessor)
    hub_cache("llm-wizard/alpaca-gpt4-data-zh", {"alpaca_gpt4_data_zh.json": json.dumps(zh, ensure_ascii=False)})
    en = "".join(json.dumps({"instruction": f"q{i}", "input": "", "output": f"a{i}", "text": "..."}) + "\n" for i in range(3))
    hub_cache("vicgalle/alpaca-gpt4", {"data/train.jsonl": en, "README.md": "# card"})
    got = sources.load_conversations(["AI-ModelScope/alpaca-gpt4-data-zh#5", "AI-ModelScope/alpaca-gpt4-data-en#2",
                                      "swift/self-cognition#6"], model_name=["小黄", "Xiao Huang"],
                                     model_author=["魔搭", "ModelScope"])
    answers = [c[-1]["content"] for c in got]
    assert sum(a.startswith("回答") for a in answers) == 5 and sum(a[:1] == "a" and a[1:].isdigit() for a in answers) == 2
    assert len(answers) == 13 and not any("{{" in c[-2]["content"] + c[-1]["content"] for c in got)
    assert {c[-2]["content"] for c in got if c[-1]["content"] == "回答3"} == {"翻译\n你好"}
    assert sum("小黄" in a or "Xiao Huang" in a or "魔搭" in a or "ModelScope" in a for a in answers) >= 3
    assert "swift/self-cognition is read from the shipped data/self_cognition.json" in capsys.readouterr().err


def test_the_shipped_self_cognition_rows_are_in_ms_swifts_format():
    """The shipped file has the columns and tags of ms-swift's swift/self-cognition (query, response,
    tag zh / en, {{NAME}} and {{AUTHOR}}); its rows are this project's own wording."""
    rows = json.loads((sources.SHIPPED_DATA / "self_cognition.json").read_text(encoding="utf-8"))
    assert {frozenset(r) for r in rows} == {frozenset({"query", "response", "tag"})}
    assert {r["tag"] for r in rows} == {"zh", "en"}
    assert {"{{NAME}}", "{{AUTHOR}}"} <= {p for r in rows for p in sources.PLACEHOLDERS if p in r["response"]}


def test_an_uncached_dataset_with_hf_hub_offline_says_so(hub_cache):
    with pytest.raises(DataError, match=r"could not download 'vicgalle/alpaca-gpt4' \(the Hugging Face mirror of the "
                                        r"ModelScope dataset 'AI-ModelScope/alpaca-gpt4-data-en'\) .* HF_HUB_OFFLINE=1 "
                                        r"is set and it is not in the cache"):
        sources.load_conversations(["AI-ModelScope/alpaca-gpt4-data-en#500"])


def test_a_parquet_only_dataset_names_the_optional_pyarrow(hub_cache, monkeypatch):
    hub_cache("someone/parquet-only", {"data/train-00000-of-00001.parquet": b"PAR1"})
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if it were not installed
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(DataError, match=r"--dataset 'someone/parquet-only' is stored as Parquet files, which need the "
                                        r"optional package pyarrow: `pip install pyarrow`"):
        sources.load_conversations(["someone/parquet-only"])


def test_a_parquet_dataset_is_read_with_pyarrow(hub_cache, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist([{"question": f"q{i}", "answer": f"a{i}"} for i in range(3)]), tmp_path / "t.parquet")
    hub_cache("someone/parquet", {"data/train-00000-of-00001.parquet": (tmp_path / "t.parquet").read_bytes()})
    got = sources.load_conversations(["someone/parquet"])
    assert sorted(c[-1]["content"] for c in got) == ["a0", "a1", "a2"]
