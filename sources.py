"""sources.py: reading --dataset into conversations, and tokenizing a dataset of any size in batches.

A first reading can skip this file. data.py holds the rule: a conversation -> token ids and labels
(encode_chat), rows cut to --max_length (fit_rows), packing and batches; its encode_dataset is the
plain path from conversations to rows. This file holds where the conversations come from (files,
folders, hub datasets, every row format, {{NAME}} / {{AUTHOR}}, `SOURCE#N`) and the fast path for a
large dataset:

    load_conversations  read every source (local .json / .jsonl / .csv, a folder, a Hugging Face
                        or ModelScope dataset id), turn each row of any supported format into a conversation,
                        fill in {{NAME}} / {{AUTHOR}}, sample `SOURCE#N`, mix
    load_dataset        what train.py calls: the rows data.encode_dataset(load_conversations(...))
                        gives, for a dataset of any size

Batched encoding (encode_chats, ChatBatch, load_dataset). Replaces: data.encode_rows (each
conversation through data.encode_chat). Proved equal by:
tests/test_data_scale.py::test_batched_encoding_gives_the_ids_and_labels_of_per_row_encoding, and
::test_the_streamed_dataset_equals_encoding_the_loaded_conversations (load_dataset against
data.encode_dataset(load_conversations(...)): sampling, mixing, truncation and notes alike).

load_dataset reads a source a line at a time and tokenizes it in batches of a thousand
conversations on every core (on a thread of its own, while the next batch is read), so the text
and the conversations are never all in memory; a large source prints how far it has got.

Row formats (a file may mix them; each row is recognised by its keys, and the other column names
ms-swift reads, COLUMNS, are read too: question/answer, prompt/completion, ...; --columns renames):

    messages      {"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}
    ShareGPT      {"conversations": [{"from": "human", "value": ...}, {"from": "gpt", ...}]}
    alpaca        {"instruction": ..., "input": ..., "output": ..., "system": ..., "history": ...}
    query         {"query": ..., "response": ..., "system": ..., "history": [[q, r], ...]}

Where ms-swift (the tool our users come from) does something surprising, we do the plain thing
(data.py's docstring lists the two cases of its own: truncation, and control tokens as text):
- {{NAME}} / {{AUTHOR}} are replaced in every dataset, not only in ms-swift's own hub
  self-cognition dataset, and a placeholder left without its flag is an error instead of being
  trained on as the literal text "{{NAME}}".
- The Chinese or English value of --model_name / --model_author is picked by the row's "tag"
  ("zh" / "en") if it has one, else by whether the row contains Chinese characters (ms-swift
  reads only "tag": any row not tagged "zh" gets the English value). One value serves both.
- `SOURCE#N` needs N >= 1 (ms-swift turns #0 into an empty dataset without a word).
- A hub id is a Hugging Face dataset; a ModelScope id of ms-swift's registry is its Hugging Face
  mirror (MODELSCOPE_DATASETS: what ms-swift downloads under --use_hf true), swift/self-cognition
  the shipped data/self_cognition.json. Its .json / .jsonl / .csv files are read, else its .parquet
  files (with the optional pyarrow); when some file names contain "train", only those, so a test
  split is not trained on.
- A row whose columns give two names for one part ("prompt" and "question"), or an answer without
  a question, is an error (ms-swift trains it without that part, or after an empty question).
- An assistant message's "reasoning_content" (a thinking model's reasoning) is written into its
  content as Qwen3's template writes it, <think>...</think> first; ms-swift drops the field.
- An assistant turn with no text is trained on (it teaches the model to answer nothing), but the
  rows that have one are counted in a warning that names the first.
Everything else follows ms-swift: the `#N` rule (N < rows: N distinct rows; N >= rows: N // rows
whole copies plus N % rows random rows), drawn from one numpy RandomState(seed) in --dataset
order and followed by one shuffle of the mixture; alpaca's query is "instruction\\ninput"; the
system prompt is the row's own, else --system, else the template's default; an empty one (the row's
own "" or --system '') writes no system turn.
"""

import ast
import collections
import concurrent.futures
import csv
import functools
import io
import itertools
import json
import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from data import (LONE_SURROGATE, DataError, Row, Tokenizer, chat_pieces, chat_template, control_token_texts,
                  clip_hopeless_texts, fit_rows, layout_turns, note_clipped, note_control_token_text,
                  turn_text)
from template import Template, with_reasoning_in_content

# ----------------------------------------------------------------------------------------------
# Reading datasets: files, folders and hub ids -> conversations

FORMATS = ('"messages" (a list of role/content messages), "conversations" (ShareGPT: a list of '
           'from/value messages), "instruction" + "output" (alpaca; optional "input", "system", '
           '"history"), or "query" + "response" (optional "system", "history"; or the other names '
           'ms-swift reads: prompt/completion, question/answer, problem/solution, ...; --columns renames others)')
ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}
PLACEHOLDERS = {"{{NAME}}": "--model_name", "{{AUTHOR}}": "--model_author"}
HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")  # Chinese characters
# Files in a dataset repo or folder that describe the dataset rather than hold rows.
METADATA_FILES = {"dataset_info.json", "dataset_infos.json", "dataset_dict.json", "state.json"}


def parse_source(spec: str) -> tuple[str, int | None]:
    """'data.jsonl#500' -> ('data.jsonl', 500); 'data.jsonl' -> ('data.jsonl', None)."""
    spec = spec.strip()
    if "#" not in spec or Path(spec).is_file():  # a file whose name contains '#' is read whole, as in ms-swift
        return spec, None
    source, n = spec.rsplit("#", 1)
    if not source.strip() or not re.fullmatch(r"[0-9]+", n.strip()) or int(n) < 1:
        raise DataError(f"--dataset {spec!r}: expected SOURCE#N with N a whole number of rows to sample "
                        f"(at least 1), as in 'alpaca-zh.jsonl#500'; got SOURCE {source!r} and N {n!r}.")
    return source.strip(), int(n)


def source_files(source: str) -> list[Path]:
    """The data files of a local file, a local folder, a Hugging Face dataset or a ModelScope id of
    ms-swift's registry (MODELSCOPE_DATASETS)."""
    path = Path(source).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        return folder_files(path, source)
    hub_id = hub_name(source)
    if hub_id in SELF_COGNITION:
        return [self_cognition_file(source)]
    if re.fullmatch(r"[\w.-]+/[\w.-]+", hub_id) and not hub_id.endswith(DATA_SUFFIXES):
        return folder_files(download_hub_dataset(MODELSCOPE_DATASETS.get(hub_id, hub_id), source), source)
    raise DataError(f"--dataset {source!r}: there is no such file or folder, and it is not a Hugging Face "
                    f"dataset id (owner/name) or a ModelScope one. Check the path; datasets are .json arrays, .jsonl or .csv files."
                    + shipped_hint(source))


# ModelScope ids that ms-swift's dataset registry maps to a Hugging Face mirror (what `swift sft --use_hf true`
# downloads), copied from ms-swift 4.6.0: swift/dataset/dataset/llm.py (register_dataset: ms_dataset_id,
# hf_dataset_id) and swift/dataset/data/dataset_info.json. A ModelScope id not listed here is tried as a
# Hugging Face id of the same name.
MODELSCOPE_DATASETS = {
    "AI-ModelScope/alpaca-gpt4-data-zh": "llm-wizard/alpaca-gpt4-data-zh",  # llm.py
    "AI-ModelScope/alpaca-gpt4-data-en": "vicgalle/alpaca-gpt4",  # dataset_info.json
    "AI-ModelScope/alpaca-cleaned": "yahma/alpaca-cleaned",  # dataset_info.json
    "wyj123456/code_alpaca_en": "sahil2801/CodeAlpaca-20k",  # dataset_info.json
    "swift/self-cognition": "modelscope/self-cognition",  # llm.py; read from data/self_cognition.json
}
SELF_COGNITION = ("swift/self-cognition", "modelscope/self-cognition")  # served by the shipped file


def without_input_prefix(row):
    """ms-swift's AlpacaZhPreprocessor (llm.py) for alpaca-gpt4-data-zh: an "input" starting with 输入： loses it."""
    text = row.get("input") if isinstance(row, dict) else None
    return {**row, "input": text[3:]} if isinstance(text, str) and text.startswith("输入：") else row


ROW_CLEANING = {"AI-ModelScope/alpaca-gpt4-data-zh": without_input_prefix}  # ms-swift's own preprocessing of a dataset


def hub_name(source: str) -> str:
    """A hub id without ms-swift's HF:: / MS:: prefix (the hub is chosen by MODELSCOPE_DATASETS here)."""
    return re.sub(r"^(?i:hf|ms)::", "", source)
SHIPPED_DATA = Path(__file__).resolve().parent / "data"
DATA_SUFFIXES = (".json", ".jsonl", ".csv")  # read with the standard library; .parquet needs pyarrow


def self_cognition_file(source: str) -> Path:
    """ms-swift's self-cognition dataset: the shipped data/self_cognition.json, which holds rows of the
    same kind ({{NAME}} / {{AUTHOR}}, tagged zh or en), written for this project: not ms-swift's rows."""
    path, where = SHIPPED_DATA / "self_cognition.json", os.path.relpath(SHIPPED_DATA / "self_cognition.json")
    print(f"note: --dataset {source} is read from the shipped {path if where.startswith('..') else where} (self-cognition rows "
          f"with {{{{NAME}}}} / {{{{AUTHOR}}}}, written for this project; ms-swift's own rows differ).", file=sys.stderr)
    return path


def shipped_hint(source: str) -> str:
    """For a missing file that names a dataset this project ships (self_cognition.json): where the
    shipped copy is. Otherwise ''."""
    name = Path(source).name.replace("-", "_")
    shipped = SHIPPED_DATA / (name if name.endswith((".json", ".jsonl")) else name + ".json")
    if not shipped.is_file():
        return ""
    where = os.path.relpath(shipped)
    return f" This project ships it: pass --dataset {shipped if where.startswith('..') else where}."


def download_hub_dataset(repo_id: str, source: str) -> Path:
    """The folder of a Hugging Face dataset repo's data files, downloaded by huggingface_hub into its cache
    (HF_HOME) or found there; with HF_HUB_OFFLINE=1, only found. Its .json / .jsonl / .csv files; when it
    has none, its .parquet files (the hub's own format, read with the optional pyarrow)."""
    import huggingface_hub
    from huggingface_hub import constants
    try:
        folder = Path(huggingface_hub.snapshot_download(repo_id, repo_type="dataset",
                                                        allow_patterns=["*" + s for s in DATA_SUFFIXES]))
        if not data_files(folder):
            folder = Path(huggingface_hub.snapshot_download(repo_id, repo_type="dataset", allow_patterns=["*.parquet"]))
    except Exception as e:
        why = (str(e).strip().splitlines() or [""])[0]  # one paragraph: the first line says what happened
        mirror = f" (the Hugging Face mirror of the ModelScope dataset {source!r})" if repo_id != source else ""
        offline = (f" HF_HUB_OFFLINE=1 is set and it is not in the cache ({constants.HF_HUB_CACHE}): "
                   f"run once with the network, or unset HF_HUB_OFFLINE." if constants.HF_HUB_OFFLINE else "")
        modelscope = (" ModelScope ids are fetched from their Hugging Face mirror only for the datasets of "
                      f"ms-swift's registry listed here ({', '.join(MODELSCOPE_DATASETS)}); download others from "
                      "modelscope.cn and pass the file (SOURCE#N samples N rows as before)." if not mirror else "")
        local = "no such local file, and " if looks_local(source) else ""  # a typo in a file's name, most likely
        raise DataError(f"--dataset {source!r}: {local}could not download {repo_id!r}{mirror} as a Hugging Face dataset "
                        f"({type(e).__name__}: {why}).{offline} Check the id, your network and HF_TOKEN for a private "
                        f"dataset, or pass a local .json / .jsonl / .csv file." + modelscope) from None
    return folder


def looks_local(source: str) -> bool:
    """Whether a --dataset that is no file names one all the same: a file suffix, or a folder that exists."""
    parent = Path(source).parent
    return bool(Path(source).suffix) or (str(parent) != "." and parent.is_dir())


def data_files(folder: Path) -> list[Path]:
    """A folder's files that may hold rows, hidden ones and dataset descriptions left out: its .json /
    .jsonl / .csv files, else its .parquet files."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not any(
        part.startswith(".") for part in p.relative_to(folder).parts))
    data = [p for p in files if p.suffix in DATA_SUFFIXES and p.name not in METADATA_FILES]
    return data or [p for p in files if p.suffix == ".parquet"]


def folder_files(folder: Path, source: str) -> list[Path]:
    """The data files of a folder (a local one or a hub snapshot).

    When some file names contain "train", only those are read, so a repo's test split is not
    trained on."""
    data = data_files(folder)
    if not data:
        found = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        raise DataError(f"--dataset {source!r} has no .json, .jsonl, .csv or .parquet files (found: "
                        f"{', '.join(found[:8]) or 'no files'}). Convert the data first, e.g. "
                        f"`datasets.load_dataset(...)['train'].to_json('train.jsonl')`, and pass that file.")
    if data[0].suffix == ".parquet":
        parquet_reader(source)  # without pyarrow: say so now, before anything is read
    train = [p for p in data if "train" in p.name.lower()]
    return train or data


def read_file(path: Path, progress: "Progress") -> Iterator[tuple[str, object]]:
    """The rows of a .json file (one array) or a .jsonl file (one object per line), as (where, row).

    `where` ("data.jsonl, line 7" / "data.json, row 7") is how error messages point at a row. A
    .jsonl file is read a line at a time, so the text of a large one is never in memory whole. A .csv
    file (read_csv) and a .parquet file (read_parquet) hold a row in each line / record too."""
    if path.suffix == ".csv":
        yield from read_csv(path, progress)
        return
    if path.suffix == ".parquet":
        yield from read_parquet(path, progress)
        return
    if path.suffix not in (".json", ".jsonl"):
        raise DataError(f"{path}: unsupported file type {path.suffix!r}. Datasets are .json files holding "
                        f"one array of rows, .jsonl files with one row per line, or .csv files with a header line.")
    rows = read_json_array(path) if path.suffix == ".json" else None
    if rows is None:
        yield from read_json_lines(path, progress)
        return
    share = path.stat().st_size / len(rows)  # of the bytes, per row: for the progress lines
    for i, row in enumerate(rows, 1):
        progress.read(share)
        yield f"{path}, row {i}", row


def read_json_array(path: Path) -> list | None:
    """The rows of a .json file, or None when it holds JSON lines instead (objects one after another)."""
    text = read_utf8(path, path.read_bytes())
    if not text.strip():
        raise DataError(f"{path} is empty: a dataset needs at least one row.")
    try:
        value = parse_json(text, str(path))
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and text.lstrip().startswith("{"):
            return None
        raise DataError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}. "
                        f"A .json dataset is one array of rows: [{{...}}, {{...}}].") from None
    if not isinstance(value, list):
        raise DataError(f"{path} holds a JSON {type(value).__name__}, not an array of rows. A .json "
                        f"dataset is one array: [{{...}}, {{...}}]; or write one row per line as .jsonl.")
    if not value:
        raise DataError(f"{path} is empty: it holds no rows.")
    return value


def read_json_lines(path: Path, progress: "Progress") -> Iterator[tuple[str, object]]:
    """The rows of a file of JSON lines, one line at a time."""
    start, count = 0, 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            line = read_utf8(path, raw, start).rstrip("\r\n")
            start += len(raw)
            progress.read(len(raw))
            if not line or line.isspace():  # (not line.strip(), without copying the line)
                continue
            where = f"{path}, line {lineno}"
            try:
                row = parse_json(line, where)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON at column {e.colno}: {e.msg}. "
                                f"A .jsonl dataset has one complete JSON object per line.") from None
            count += 1
            yield where, row
    if not count:
        raise DataError(f"{path} is empty: a dataset needs at least one row.")


def read_csv(path: Path, progress: "Progress") -> Iterator[tuple[str, object]]:
    """The rows of a .csv file: a header line of column names, then one row a line (a quoted cell may
    span lines). Every cell is a string and an empty cell is "", as ms-swift reads them (na_filter=False)."""
    text = read_utf8(path, path.read_bytes())
    reader = csv.DictReader(io.StringIO(text, newline=""))
    count, share = 0, len(text) / max(1, text.count("\n"))  # of the bytes, per line: for the progress lines
    try:
        for row in reader:
            progress.read(share)
            where = f"{path}, line {reader.line_num}"
            if None in row or None in row.values():
                raise DataError(f"{where} has {'more' if None in row else 'fewer'} cells than the header line's "
                                f"{len(reader.fieldnames)} columns; quote a cell that holds a comma or a line break: \"a, b\".")
            count += 1
            yield where, row
    except csv.Error as e:
        raise DataError(f"{path}, line {reader.line_num}: not valid CSV ({e}).") from None
    if not count:
        raise DataError(f"{path} is empty: a dataset needs a header line and at least one row.")


def parquet_reader(source):
    """pyarrow.parquet, the optional package that reads the Parquet files of a hub dataset."""
    try:
        import pyarrow.parquet
    except ImportError:
        raise DataError(f"--dataset {source!r} is stored as Parquet files, which need the optional package pyarrow: "
                        f"`pip install pyarrow`, then run again (or convert them to .jsonl and pass that file).") from None
    return pyarrow.parquet


def read_parquet(path: Path, progress: "Progress") -> Iterator[tuple[str, object]]:
    """The rows of a .parquet file (pyarrow), a thousand records at a time."""
    file = parquet_reader(path).ParquetFile(path)
    share, count = path.stat().st_size / max(1, file.metadata.num_rows), 0
    for batch in file.iter_batches(batch_size=BATCH_ROWS):
        for row in batch.to_pylist():
            count += 1
            progress.read(share)
            yield f"{path}, row {count}", row
    if not count:
        raise DataError(f"{path} is empty: a dataset needs at least one row.")


def read_utf8(path: Path, raw: bytes, start: int = 0) -> str:
    """Bytes of the file from byte `start` on, as text (a byte order mark at the file's start is dropped)."""
    try:
        return raw.decode("utf-8-sig" if start == 0 else "utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (byte {start + e.start}); save it as UTF-8.") from None


def parse_json(text: str, where: str):
    """json.loads; JSON nested deeper than Python's recursion limit is a DataError, not a RecursionError."""
    try:
        return json.loads(text)
    except RecursionError:
        raise DataError(f"{where}: the JSON is nested too deeply to read (more than about {sys.getrecursionlimit()} "
                        f"levels of [ or {{). A dataset row is an object of strings and lists of messages, a few "
                        f"levels deep: check that this is the dataset file you meant.") from None


def _messages(value, where: str, key: str, role_key: str, content_key: str) -> list[dict]:
    """A "messages" / "conversations" list, checked and normalised to role/content dicts."""
    if not isinstance(value, list):
        raise DataError(f'{where}: "{key}" must be a list of {{"{role_key}": ..., "{content_key}": ...}} '
                        f"objects, not {type(value).__name__}.")
    out = []
    for i, m in enumerate(value, 1):
        if not isinstance(m, dict) or role_key not in m or content_key not in m:
            raise DataError(f'{where}: message {i} of "{key}" must be an object with "{role_key}" and '
                            f'"{content_key}"; got {json.dumps(m, ensure_ascii=False)[:80]}.')
        role, content = m[role_key], m[content_key]
        if role not in ROLES:
            raise DataError(f'{where}: message {i} has unknown {role_key} {role!r}. Known: system, user '
                            f"(or human), assistant (or gpt). Tool calls are not supported.")
        if not isinstance(content, str):
            raise DataError(f'{where}: message {i} has a "{content_key}" of type {type(content).__name__}; '
                            f"it must be a string.")
        reasoning = m.get("reasoning_content")
        if ROLES[role] == "assistant" and isinstance(reasoning, str) and reasoning.strip():
            # OpenAI's and ms-swift's field for a thinking model's reasoning, written into the content as
            # Qwen3's template writes it (ms-swift drops the field; the same row with the reasoning in its
            # content keeps it). A reasoning_content of another type is refused.
            content = with_reasoning_in_content({"role": "assistant", "content": content, "reasoning_content": reasoning})["content"]
        elif reasoning is not None and not isinstance(reasoning, str):
            raise DataError(f'{where}: message {i} has a "reasoning_content" of type {type(reasoning).__name__}; it must be a string.')
        out.append({"role": ROLES[role], "content": content})
    return out


def _text(row: dict, key: str, where: str, optional: bool = False) -> str | None:
    value = row.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise DataError(f'{where}: "{key}" must be a string, not {type(value).__name__}.')
    return value


def _history(row: dict, where: str) -> list[dict]:
    """[[query, response], ...] (also accepted as the string of such a list, as ms-swift does)."""
    history = row.get("history") or []
    if isinstance(history, str):
        try:
            history = ast.literal_eval(history)
        except (ValueError, SyntaxError):
            history = None
    if not isinstance(history, list) or not all(
            isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(s, str) for s in pair)
            for pair in history):
        raise DataError(f'{where}: "history" must be a list of [query, response] pairs of strings.')
    return [{"role": r, "content": s} for q, a in history for r, s in (("user", q), ("assistant", a))]


def row_to_messages(row, where: str, columns: dict | None = None) -> list[dict]:
    """One dataset row of any supported format -> a conversation (its own system prompt first).

    The row's columns are renamed by `columns` (--columns) first; then each part is read from the
    column names ms-swift reads it from (COLUMNS), found whatever their case, as ms-swift finds them."""
    if not isinstance(row, dict):
        raise DataError(f"{where} is a JSON {type(row).__name__}; each row must be an object with the fields "
                        f"of one of these formats: {FORMATS}.")
    row = renamed(row, columns or {}, where)
    named = {k.lower(): k for k in row if isinstance(k, str)}  # lower-case name -> the row's own spelling
    chat = next((named[k] for k in COLUMNS["messages"] if k in named), None)
    if chat is not None:  # role/content messages, or ShareGPT's from/value, under any of the three names
        first = row[chat][0] if isinstance(row[chat], list) and row[chat] and isinstance(row[chat][0], dict) else {}
        sharegpt = "from" in first if first.keys() & {"from", "role"} else chat.lower() != "messages"
        messages = _messages(row[chat], where, chat, *(("from", "value") if sharegpt else ("role", "content")))
    else:
        if "instruction" in named and "input" in named:  # alpaca: the query is "instruction\ninput"
            instruction, input_ = (_text(row, named[k], where, True) for k in ("instruction", "input"))
            query = f"{instruction}\n{input_}" if instruction and input_ else (instruction or input_ or "")
            question, answer = named["instruction"], named.get("output") or column(named, "response", where)
        else:
            question, answer = column(named, "query", where), column(named, "response", where)
            if question is None and answer is None:
                keys = ", ".join(json.dumps(k, ensure_ascii=False) for k in list(row)[:8]) or "none"
                raise DataError(f"{where} has none of the fields of a known format (its keys: {keys}). "
                                f"Expected one of: {FORMATS}.")
            query = _text(row, question, where) if question else None
        if query is None or answer is None:
            found, missing = (f'an answer ("{answer}")', "question") if answer else (f'a question ("{question}")', "answer")
            raise DataError(f"{where} has {found} but no {missing}: name its {missing} column one of "
                            f"{', '.join(COLUMNS['query' if missing == 'question' else 'response'])}, or rename it with "
                            f"--columns (ms-swift would train on the row with an empty {missing}).")
        messages = _history(row, where) + [{"role": "user", "content": query},
                                           {"role": "assistant", "content": _text(row, answer, where)}]
    # A row-level "system" field goes in front of the conversation. An empty one stays, as an empty
    # system message: the template then writes no system turn at all, as ms-swift does.
    system_column = column(named, "system", where)
    system = _text(row, system_column, where, optional=True) if system_column else None
    if system is not None and not (system == "" and messages and messages[0]["role"] == "system"):
        if messages and messages[0]["role"] == "system":
            raise DataError(f'{where} has both a "system" field and a system message; keep one.')
        messages = [{"role": "system", "content": system}] + messages
    for i, m in enumerate(messages[1:], 2):
        if m["role"] == "system":
            raise DataError(f"{where}: message {i} is a system message; only the first message may be one.")
    if not messages or messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: the conversation does not end with an assistant turn. Training learns "
                        f"only from assistant turns, so each conversation must end with the answer.")
    check_characters(messages, where)
    return messages



# The column names ms-swift reads each part of a row from (ms-swift 4.6.0, swift/dataset/preprocessor/core.py:
# MessagesPreprocessor, ResponsePreprocessor; AlpacaPreprocessor when both "instruction" and "input" are there),
# the standard name first. A row with the standard name uses it; else the one other name it has. Two other
# names (say "prompt" and "question") are an error here: ms-swift renames neither, and the row loses that part.
COLUMNS = {
    "messages": ("messages", "conversations", "conversation"),
    "system": ("system", "system_prompt"),
    "query": ("query", "prompt", "input", "instruction", "question", "problem"),
    "response": ("response", "answer", "output", "targets", "target", "answer_key", "answers", "solution",
                 "text", "completion", "content"),
}


def column(named: dict, part: str, where: str) -> str | None:
    """The row's column for a part of COLUMNS (named: the row's columns by their lower-case names), or None."""
    standard, *others = COLUMNS[part]
    if standard in named:
        return named[standard]
    found = [named[k] for k in others if k in named]
    if len(found) > 1:
        raise DataError(f'{where}: the columns "{found[0]}" and "{found[1]}" could each be the {part}; say which '
                        f"with --columns '{{\"{found[0]}\": \"{standard}\"}}' (ms-swift takes neither, and trains "
                        f"the row without its {part}).")
    return found[0] if found else None


def renamed(row: dict, columns: dict, where: str) -> dict:
    """The row with its columns renamed as --columns says ({"old name": "new name"}), as ms-swift renames
    them: old names found whatever their case, and a new name that two columns would take given to neither."""
    found = {k.lower(): k for k in row if isinstance(k, str)}
    pairs = [(found[old.lower()], new) for old, new in columns.items() if old.lower() in found]
    taken = collections.Counter(new for _, new in pairs)
    renames = {old: new for old, new in pairs if taken[new] == 1 and old != new}
    out = {k: v for k, v in row.items() if k not in renames}
    for old, new in renames.items():
        if new in out:
            raise DataError(f'{where}: --columns renames "{old}" to "{new}", but the row has a "{new}" column '
                            f"already; rename that one too (to \"_\" to leave it out).")
        out[new] = row[old]
    return out


def parse_columns(value) -> dict:
    """--columns as ms-swift takes it: a JSON object of {"old name": "new name"}, given as text or as the
    path of a .json file; None: {}."""
    if value is None or isinstance(value, dict):
        return value or {}
    try:
        text = Path(value).read_text(encoding="utf-8") if Path(value).is_file() else value
        mapping = json.loads(text)
    except (OSError, ValueError) as e:
        raise DataError(f"--columns {value!r} is not a JSON object ({e}); write it as "
                        f"'{{\"question\": \"query\", \"answer\": \"response\"}}', or give a .json file of one.") from None
    if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
        raise DataError(f'--columns {value!r}: expected a JSON object of column names, {{"old name": "new name", ...}}.')
    return mapping


def check_characters(messages: list[dict], where: str):
    """Every text is real Unicode: JSON's escape "\\ud800" alone gives a string that no tokenizer (or
    UTF-8 encoder) accepts, which would otherwise fail much later, with no row named."""
    for m in messages:
        bad = LONE_SURROGATE.search(m["content"])
        if bad:
            raise DataError(f"{where}: the {m['role']} text holds a lone surrogate ({ascii(bad.group())} at character "
                            f"{bad.start() + 1}), which is not a character and cannot be tokenized. In JSON the "
                            f"escapes \\ud800-\\udfff make a character only in pairs (\\ud83d\\ude42 is one emoji): "
                            f"fix that escape, or remove the row.")


def placeholder_values(model_name, model_author) -> dict:
    """{{NAME}} / {{AUTHOR}} -> (Chinese value, English value), from --model_name / --model_author."""
    return {"{{NAME}}": _flag_values(model_name, "--model_name"), "{{AUTHOR}}": _flag_values(model_author, "--model_author")}


def _flag_values(values, flag: str) -> tuple[str, str] | None:
    """--model_name 'X' or --model_name '小X' 'X' -> (Chinese value, English value)."""
    if values is None or values == []:
        return None
    if isinstance(values, str):
        values = [values]
    if len(values) not in (1, 2) or not all(isinstance(v, str) for v in values):
        raise DataError(f"{flag} takes one value, or two: the Chinese one then the English one "
                        f"(e.g. {flag} 小黄 'Xiao Huang'); got {list(values)!r}.")
    return (values[0], values[-1])


def fill_placeholders(messages: list[dict], chinese: bool, values: dict, where: str) -> list[dict]:
    """Replace {{NAME}} / {{AUTHOR}} with the Chinese or English value of their flag."""
    out = []
    for m in messages:
        content = m["content"]
        for placeholder, flag in PLACEHOLDERS.items():
            if placeholder not in content:
                continue
            if values[placeholder] is None:
                raise DataError(f"{where} contains {placeholder}, but {flag} was not given. Pass {flag} with one "
                                f"value, or a Chinese and an English one (e.g. {flag} 小黄 'Xiao Huang'), so the "
                                f"model is not trained on the literal text {placeholder}.")
            content = content.replace(placeholder, values[placeholder][0 if chinese else 1])
        out.append({"role": m["role"], "content": content})
    return out


MAX_SAMPLES = 10_000_000  # SOURCE#N above this and above 10x the rows is refused (see check_sample_count)


def check_sample_count(spec: str, n_rows: int, n: int):
    """Refuse a SOURCE#N that memory cannot be expected to hold, before a list of N rows is made.

    Every sample becomes a conversation and then a tokenized row of its own, so a mistyped N (an
    extra zero or three) would allocate until the machine runs out of memory."""
    if n > 10 * n_rows and n > MAX_SAMPLES:
        raise DataError(f"--dataset {spec!r}: {n:,} samples of its {n_rows:,} rows is more than 10 times the rows and "
                        f"more than {MAX_SAMPLES:,} samples, more than memory can be expected to hold (each sample is "
                        f"a tokenized copy). Use an N of at most {max(10 * n_rows, MAX_SAMPLES):,}; to go over the "
                        f"rows more often, raise --num_train_epochs instead.")


def sample_indices(n_rows: int, n: int, rng: np.random.RandomState) -> list[int]:
    """ms-swift's SOURCE#N: N // n_rows copies of every row, then N % n_rows distinct random rows."""
    repeats, extra = divmod(n, n_rows)
    idx = list(range(n_rows)) * repeats
    if extra:
        idx += rng.permutation(n_rows)[:extra].tolist()
    return idx


def load_conversations(specs: list[str], seed: int = 42, model_name: list[str] | None = None,
                       model_author: list[str] | None = None, columns=None) -> list[list[dict]]:
    """Every --dataset source read, checked, filled in, sampled and mixed: a list of conversations."""
    conversations = []
    order, _ = read_sources(specs, conversations.extend, seed, model_name, model_author, columns=columns)
    return [[dict(m) for m in conversations[i]] for i in order]  # copies: repeats are not aliases


def read_sources(specs: list[str], consume, seed: int = 42, model_name=None, model_author=None,
                 progress=None, columns=None, ratio: float = 0.0) -> tuple[list[int], list[int]]:
    """Read every --dataset source, handing its conversations (checked, placeholders filled in) to
    `consume` in batches as they are read. Returns pick_rows': the conversation each training row
    and each validation row is, in order, as indices into all the conversations consumed.

    progress(name, total_bytes) makes the Progress that reports on a source (default: Progress);
    columns: --columns, the renaming of every row's columns (parse_columns); ratio: pick_rows'."""
    if isinstance(specs, str):
        specs = [specs]
    if not specs:
        raise DataError("No dataset given: pass --dataset with one or more .json / .jsonl files or hub ids.")
    values = placeholder_values(model_name, model_author)
    sizes, no_answer, columns = [], [], parse_columns(columns)  # no_answer: where the rows with an empty answer are
    for spec in specs:
        source, n = parse_source(spec)
        files = source_files(source)
        report = (progress or Progress)(source, sum(p.stat().st_size for p in files))
        count = 0
        clean = ROW_CLEANING.get(hub_name(source), lambda row: row)
        for batch in batches(conversations_of(files, values, no_answer, report, columns, clean), BATCH_ROWS):
            consume(batch)
            count += len(batch)
            report.rows_done(count)
        report.rows_done(count, finished=True)
        if n is not None:
            check_sample_count(spec, count, n)
        sizes.append((count, n))
    if no_answer:  # legal, but almost always a broken conversion: say so once, and go on
        rows = "1 row has" if len(no_answer) == 1 else f"{len(no_answer)} rows have"
        print(f"warning: {rows} an assistant turn with no text (the first: {no_answer[0]}); training on them teaches "
              f"the model to answer nothing. Write their answers or remove those rows.", file=sys.stderr)
    return pick_rows(sizes, specs, seed, ratio)


def conversations_of(files: list[Path], values: dict, no_answer: list, progress: "Progress",
                     columns: dict | None = None, clean=lambda row: row) -> Iterator[list[dict]]:
    """The conversations of a source's files, one at a time: checked and filled in."""
    for path in files:
        for where, row in read_file(path, progress):
            messages = row_to_messages(clean(row), where, columns)
            if any(m["role"] == "assistant" and (not m["content"] or m["content"].isspace()) for m in messages):
                no_answer.append(where)
            yield filled(messages, row, values, where)


def filled(messages: list[dict], row: dict, values: dict, where: str) -> list[dict]:
    """The row's messages with {{NAME}} / {{AUTHOR}} replaced: in Chinese or English by the row's
    "tag" ("zh" / "en"), else by whether it holds Chinese characters."""
    if not any(placeholder in m["content"] for m in messages for placeholder in PLACEHOLDERS):
        return messages
    tag = row.get("tag")
    chinese = tag == "zh" if tag in ("zh", "en") else any(HAN.search(m["content"]) for m in messages)
    return fill_placeholders(messages, chinese, values, where)


def pick_rows(sizes: list[tuple[int, int | None]], specs: list[str], seed: int, ratio: float) -> tuple[list, list]:
    """ms-swift's load_dataset(specs, split_dataset_ratio=ratio, seed=data_seed): (training rows,
    validation rows) as indices. Ratio 1 is how ms-swift reads --val_dataset (validation_rows);
    below 1, --dataset (mixture)."""
    if ratio == 1:
        return [], validation_rows(sizes, specs)
    for spec, (n_rows, n) in zip(specs, sizes):
        held = held_out_count(n_rows, n or n_rows, ratio)
        if (n or n_rows) <= held:
            raise DataError(f"--split_dataset_ratio {ratio:g} holds out {held} of the {n or n_rows} rows of {spec}, "
                            "which leaves none to train on (each source is split apart, as in ms-swift): use a "
                            "smaller ratio, more rows, or --val_dataset.")
    return mixture(sizes, seed, ratio)


def mixture(sizes: list[tuple[int, int | None]], seed: int, ratio: float = 0.0) -> tuple[list[int], list[int]]:
    """ms-swift's load_dataset(sources, split_dataset_ratio=ratio, seed=data_seed) as indices into all
    sources' rows one after another: (training rows, validation rows), the same rows in the same
    order as ms-swift 4.6 for the same seed (tests/test_swift_flags2.py's SWIFT_ROWS).

    sizes: (rows of each source, its SOURCE#N or None). One RandomState(seed) draws everything, in
    ms-swift's order: for each source in --dataset order a seed for its augmentation (unused here,
    drawn all the same), then its rows: with a ratio, max(1, int(min(rows, N) x ratio)) rows held
    out as datasets' train_test_split picks them (numpy's default_rng of a drawn seed permutes the
    rows; the first are held out); the rest (every row without a ratio) whole or sampled to N minus
    those (sample_indices). Then the training rows are shuffled (default_rng of a drawn seed), and
    the validation rows by another."""
    rng = np.random.RandomState(seed)
    draw = lambda: int(rng.randint(0, np.iinfo(np.int32).max))  # ms-swift's get_seed
    train, val, start = [], [], 0
    for n_rows, n in sizes:
        n, _ = (n_rows if n is None else n), draw()
        order = np.random.default_rng(draw()).permutation(n_rows).tolist() if ratio else list(range(n_rows))
        held = order[:held_out_count(n_rows, n, ratio)]
        rest = order[len(held):]
        train += [start + rest[i] for i in sample_indices(len(rest), n - len(held), rng)]
        val += [start + i for i in held]
        start += n_rows
    shuffled = lambda rows: [rows[i] for i in np.random.default_rng(draw()).permutation(len(rows))] if rows else []
    return shuffled(train), shuffled(val)


def held_out_count(n_rows: int, n: int, ratio: float) -> int:
    """How many of a source's rows a split holds out: max(1, int(min(rows, N) x ratio)), as ms-swift's
    post_process; none without a ratio."""
    return max(int(min(n_rows, n) * ratio), 1) if ratio else 0


def validation_rows(sizes: list[tuple[int, int | None]], specs: list[str]) -> list[int]:
    """--val_dataset as ms-swift reads it (split ratio 1, val_dataset_shuffle false): each source
    whole, or SOURCE#N its first N rows, in file order; as indices like mixture's."""
    rows, start = [], 0
    for spec, (n_rows, n) in zip(specs, sizes):
        if n is not None and n > n_rows:
            raise DataError(f"--val_dataset {spec}: {n} rows asked of a source of {n_rows}; validation rows are "
                            f"not repeated (ms-swift refuses it too). Ask for at most {n_rows}, or leave out #{n}.")
        rows += range(start, start + (n_rows if n is None else n))
        start += n_rows
    return rows


def batches(items, size: int):
    items = iter(items)
    while batch := list(itertools.islice(items, size)):
        yield batch


PROGRESS_OVER = 10_000_000  # bytes: smaller sources are read without progress lines
PROGRESS_EVERY = 5.0  # seconds between progress lines


class Progress:
    """How far reading a large source has got, on stderr: a line as it starts, one every `every` seconds
    with the rows done, the share of its bytes read and the time left, and one when it is done.
    Sources under `over` bytes print nothing: they are read before anyone would wonder."""

    def __init__(self, name: str, total_bytes: int, over: int = PROGRESS_OVER, every: float = PROGRESS_EVERY):
        self.name, self.total, self.every, self.on = name, total_bytes, every, total_bytes >= over
        self.bytes_read, self.start = 0, time.monotonic()
        self.last = self.start
        self.say(f"reading {name} ({total_bytes / 1e6:,.0f} MB)")

    def say(self, text: str):
        if self.on:
            print(f"data: {text}", file=sys.stderr, flush=True)

    def read(self, n_bytes: float):
        self.bytes_read += n_bytes

    def rows_done(self, n_rows: int, finished: bool = False):
        now = time.monotonic()
        if finished:
            self.say(f"{self.name}: {n_rows:,} rows in {now - self.start:.0f} s")
        elif now - self.last >= self.every:
            self.last = now
            share = min(1.0, self.bytes_read / max(1, self.total))
            left = (now - self.start) * (1 - share) / max(share, 1e-6)
            self.say(f"{self.name}: {n_rows:,} rows ({share:.0%}), about {left:.0f} s left")


# ----------------------------------------------------------------------------------------------
# Batched encoding. Replaces: data.encode_rows (each conversation through data.encode_chat), and in
# load_dataset data.encode_dataset(load_conversations(...)).
# Proved equal by: tests/test_data_scale.py::test_batched_encoding_gives_the_ids_and_labels_of_per_row_encoding
# and ::test_the_streamed_dataset_equals_encoding_the_loaded_conversations

BATCH_ROWS = 1000  # conversations tokenized in one call


def encode_chats(tok: Tokenizer, conversations: list[list[dict]], system: str | None = None,
                 template: Template | None = None) -> list[Row]:
    """data.encode_rows for many conversations at once: the same Rows, tokenized in one call (see ChatBatch)."""
    batch = ChatBatch(conversations, system, template)
    return batch.rows(tok, tok.encode_texts(batch.texts))


class ChatBatch:
    """Conversations encoded together: the texts of all their turns, each distinct text once, are
    tokenized in one call (Tokenizer.encode_texts, which may run on another thread meanwhile), then
    rows() lays them out as encode_chat does, with numpy over the whole batch instead of Python
    lists per token. test_batched_encoding_gives_the_ids_and_labels_of_per_row_encoding proves it."""

    def __init__(self, conversations: list[list[dict]], system: str | None = None, template: Template | None = None):
        template = chat_template(system, template)
        conversations = [layout_turns(template.training_turns(messages)) for messages in conversations]
        turns = [m for messages in conversations for m in messages]
        number = {}  # text -> its place in self.texts: a text many rows share (a system prompt) is tokenized once
        self.text_of_turn = [number.setdefault(turn_text(m), len(number)) for m in turns]
        self.texts = list(number)
        self.role_of_turn = [ROLE_NAMES.index(m["role"]) for m in turns]
        self.turns_per_row = [len(messages) for messages in conversations]

    def rows(self, tok: Tokenizer, encodings) -> list[Row]:
        """The conversations as Rows, given the Encodings of self.texts."""
        text_len = np.array([len(e) for e in encodings], dtype=np.int32)
        text_ids = np.fromiter(itertools.chain.from_iterable(e.ids for e in encodings), np.int32, text_len.sum())
        # Every turn is three slices of one source array: its role's fixed ids before the text
        # (turn_layout), the text, its role's fixed ids after the text. The source holds each role's
        # fixed ids, then all the texts.
        layouts = [turn_layout(tok, role) for role in ROLE_NAMES]  # [(before, after, trained), ...] by role
        fixed = [ids for before, after, _ in layouts for ids in (before, after)]
        source = np.concatenate(fixed + [text_ids])
        fixed_len = np.array([len(ids) for ids in fixed], dtype=np.int32)
        fixed_start = np.cumsum(fixed_len, dtype=np.int32) - fixed_len
        text_start = fixed_len.sum() + np.cumsum(text_len, dtype=np.int32) - text_len
        role, text = np.array(self.role_of_turn), np.array(self.text_of_turn)  # (turns,)
        before, after = 2 * role, 2 * role + 1  # their places in `fixed`
        starts = np.stack([fixed_start[before], text_start[text], fixed_start[after]], 1).ravel()  # (turns * 3,)
        lengths = np.stack([fixed_len[before], text_len[text], fixed_len[after]], 1).ravel()  # (turns * 3,)
        flags = np.array([flags for _, _, flags in layouts])[role].ravel()  # (turns * 3,): is the slice trained
        ids = source[slices(starts, lengths)]  # (tokens of the batch,)
        trained = np.repeat(flags, lengths)  # (tokens of the batch,)
        # Each row is a view of the batch's two arrays: two allocations a batch rather than two a row.
        ends = np.cumsum(lengths.reshape(-1, 3).sum(1))[np.cumsum(self.turns_per_row) - 1]
        trained[np.r_[0, ends[:-1]]] = False  # a row's first token is no one's target (as encode_chat)
        return [Row(i, t) for i, t in zip(np.split(ids, ends[:-1]), np.split(trained, ends[:-1]))]


ROLE_NAMES = ("system", "user", "assistant", "think", "answer", "past", "said", "whole", "whole_think")  # the roles of layout_turns' turns
TEXT = -1  # stands for a turn's text in turn_layout


def turn_layout(tok: Tokenizer, role: str) -> tuple[np.ndarray, np.ndarray, tuple[bool, bool, bool]]:
    """A turn of this role as chat_pieces lays it out around its text: (the ids before the text, the
    ids after it, whether (those before, the text, those after) are trained)."""
    pieces = chat_pieces(tok, [{"role": role, "content": ""}], [[TEXT]])
    ids = np.array([i for piece, _ in pieces for i in piece], dtype=np.int32)
    trained = np.array([t for piece, t in pieces for _ in piece], dtype=bool)
    k = int(np.flatnonzero(ids == TEXT)[0])
    before, after = trained[:k], trained[k + 1:]
    # chat_pieces trains a piece whole or not at all, and a turn's pieces around its text are alike.
    assert (before.all() or not before.any()) and (after.all() or not after.any()), (role, trained)
    return ids[:k], ids[k + 1:], (bool(before.any()), bool(trained[k]), bool(after.any()))


def slices(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The indices arange(starts[0], starts[0] + lengths[0]), then those of the next slice, ..., in one array."""
    offsets = np.cumsum(lengths, dtype=starts.dtype) - lengths  # where each slice starts in the result
    return np.repeat(starts - offsets, lengths) + np.arange(lengths.sum(), dtype=starts.dtype)


def load_dataset(tok: Tokenizer, specs: list[str], max_length: int, truncation_strategy: str = "delete",
                 system: str | None = None, seed: int = 42, model_name: list[str] | None = None,
                 model_author: list[str] | None = None, progress_over: int = PROGRESS_OVER,
                 progress_every: float = PROGRESS_EVERY, template: Template | None = None, columns=None,
                 ratio: float = 0.0) -> tuple[list[Row], list[Row]]:
    """(training rows, validation rows): data.encode_dataset(load_conversations(...)) for a dataset of any
    size, split as pick_rows splits it by ratio. Each source is tokenized in batches while it is read,
    so only the compact rows are ever all in memory, not the text or the conversations; a source of
    progress_over bytes or more prints its progress every progress_every s."""
    rows, spelled, pending, clipped = [], [], collections.deque(), []

    def encode(conversations):
        # The tokenizer works on its own thread and lets go of Python meanwhile, so while it tokenizes this
        # batch, this thread lays out the batch before and reads the next: both cores stay busy. Only the
        # tokenizing runs there, so it starts on the next batch as soon as it is done with one.
        spelled.extend(control_token_texts(tok, conversations))
        if truncation_strategy == "delete":  # a row sure to be dropped: not all of its text tokenized
            conversations, n = clip_hopeless_texts(tok, conversations, max_length)
            clipped.append(n)
        batch = ChatBatch(conversations, system, template)
        pending.append((batch, pool.submit(tok.encode_texts, batch.texts)))
        if len(pending) > 1:
            batch, job = pending.popleft()
            rows.extend(batch.rows(tok, job.result()))

    progress = functools.partial(Progress, over=progress_over, every=progress_every)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        picked = read_sources(specs, encode, seed, model_name, model_author, progress, columns, ratio)
        rows.extend(row for batch, job in pending for row in batch.rows(tok, job.result()))
    note_control_token_text([spelled[i] for order in picked for i in order])
    note_clipped(sum(clipped), max_length)
    # repeats share their arrays; a part without rows says nothing
    return tuple(fit_rows([rows[i] for i in order], max_length, truncation_strategy, what) if order else []
                 for order, what in zip(picked, ("rows", "validation rows")))
