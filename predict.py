"""predict.py: a whole dataset answered, as ms-swift's `swift infer --val_dataset` answers it: one JSON
line a row in --result_path, in the rows' order.

    python infer.py --adapters CKPT --val_dataset test.jsonl --result_path out.jsonl --max_batch_size 32
    python infer.py --adapters CKPT --load_data_args true        # the rows its training held out

A first reading can skip this file. infer.py answers one question at a time (decode.generate); here
engine.Engine answers every row of a dataset, --max_batch_size of them at once, and this file holds
what is around it:

    read_dataset    the rows: every --val_dataset source, in any format train.py reads (sources.py),
                    SOURCE#N its first N rows (as ms-swift), in input order. A row's question is its
                    last user turn with the conversation before it; its final answer, if it has one,
                    is its `labels`, which the model does not see. With --load_data_args, the
                    validation rows the checkpoint's training held out (held_out_rows)
    ResultFile      the JSONL file: one complete line a row, flushed, in input order as soon as every
                    row before it is done; an existing file is checked line by line and continued
    predict         the prompts (each row's adapter and system prompt, as infer.py renders them),
                    the engine, a progress line on stderr, Ctrl-C

A line is what ms-swift 4.6 writes, with its keys in its order:

    {"response": ANSWER, "labels": THE ROW'S OWN ANSWER or null, "logprobs": null,
     "messages": [...the conversation up to the question..., {"role": "assistant", "content": ANSWER}],
     "dataset": THE SOURCE, as given without #N}

ANSWER continues the prompt as the template does (ms-swift's response prefix, then the decoded tokens,
the stop token left out): a thinking model's reasoning stays in it as its <think>...</think> block, and
a hybrid Qwen3 told not to think answers after the empty block "<think>\\n\\n</think>\\n\\n", both as
ms-swift writes them. Other fields of a row are not copied (ms-swift drops them too).

Where ms-swift does otherwise, this file chooses:
- An existing --result_path is continued where it stopped (its lines checked against the rows), not
  appended to a second time.
- A row may name its adapter in an "adapter" field: a loaded adapter's name, or "base" (none).
- A sampled answer (temperature > 0) draws from its own generator, seeded --seed + its row's number,
  so it does not depend on which rows run beside it or on a resume.
"""

import contextlib
import functools
import json
import shlex
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path


import data
import flags
import lora
import sources
from cli import UsageError
from data import DataError
from engine import Engine, Request
from flags import DEFAULT_MAX_NEW_TOKENS
from template import choose_template


def say(*msg):
    """Everything but the answers goes to stderr, as in infer.py."""
    print(*msg, file=sys.stderr, flush=True)


@dataclass
class Row:
    """One dataset row to answer."""

    messages: list[dict]  # the conversation up to its last question (its own system turn first, if any)
    labels: str | None  # the row's own final answer, not shown to the model; None: it ends with the question
    dataset: str  # the source it came from, as given without #N (ms-swift's "dataset" field)
    where: str  # "FILE, line N": where errors point
    adapter: object = None  # its "adapter" field, if any (checked once the adapters are loaded)


# ----------------------------------------------------------------------------------------------
# The rows


def read_dataset(args) -> list[Row]:
    """--val_dataset's rows in input order, before the model loads, so that a bad row fails at once.
    SOURCE#N: its first N rows, as ms-swift reads --val_dataset. With --load_data_args nothing yet:
    held_out_rows reads the training run's data once the model (and its tokenizer) is loaded."""
    flags.check_dataset_args(args)
    if args.load_data_args:
        training_args(flags.parse_adapters(args.adapters)[0][1])  # one that cannot work fails now
        return []
    trained = lora.checkpoint_args(flags.parse_adapters(args.adapters)[0][1]) if args.adapters else {}
    values = sources.placeholder_values(args.model_name or trained.get("model_name"),
                                args.model_author or trained.get("model_author"))
    rows, (_, order) = read_sources(args.val_dataset, 42, values, ratio=1)
    rows = [rows[i] for i in order]
    if args.result_path:
        answered_before(Path(args.result_path), rows)  # a file of other rows is refused now, not after loading
    return rows


def read_sources(specs: list[str], seed: int, values: dict, ratio: float) -> tuple[list[Row], tuple[list, list]]:
    """Every source's rows in file order, and the training and validation rows ms-swift (and train.py)
    takes of them by ratio, as indices into those rows (sources.pick_rows). sources.read_sources
    reads training rows only (each must end with its answer); this reads rows that end with their
    question too."""
    rows, sizes = [], []
    for spec in specs:
        source, n = sources.parse_source(spec)
        files = sources.source_files(source)
        progress = sources.Progress(source, sum(p.stat().st_size for p in files))
        start = len(rows)
        for path in files:
            rows += [row_of(raw, where, source, values) for where, raw in sources.read_file(path, progress)]
        progress.rows_done(len(rows) - start, finished=True)
        if n is not None:
            sources.check_sample_count(spec, len(rows) - start, n)
        sizes.append((len(rows) - start, n))
    return rows, sources.pick_rows(sizes, specs, seed, ratio)


def row_of(raw, where: str, source: str, values: dict) -> Row:
    """A dataset row of any format sources.py reads -> a Row; its {{NAME}} / {{AUTHOR}} filled in as
    sources.conversations_of fills them (the row's "tag", else whether it holds Chinese)."""
    readable, answered = with_answer(raw)
    messages = sources.row_to_messages(readable, where)  # checks the row, and says what is wrong with it
    messages = sources.filled(messages, raw, values, where)
    return Row(messages[:-1], messages[-1]["content"] if answered else None, source, where, raw.get("adapter"))


def with_answer(raw) -> tuple[object, bool]:
    """(the row, with an empty answer after its question if it ends with one; whether it had an answer).
    sources.row_to_messages reads training rows, which end with their answer; the format is told by
    the same keys, in the same order."""
    if not isinstance(raw, dict):
        return raw, True  # not a row at all: row_to_messages says so
    chats = (("messages", "role", "content", "assistant"), ("conversations", "from", "value", "gpt"))
    for key, role, text, answer in chats:
        if key in raw:
            turns = raw[key]
            last = turns[-1] if isinstance(turns, list) and turns else None
            if isinstance(last, dict) and last.get(role) not in ("assistant", "gpt"):
                return {**raw, key: turns + [{role: answer, text: ""}]}, False
            return raw, True
    key = "output" if "instruction" in raw or "output" in raw else "response"
    if ("query" in raw or key == "output") and raw.get(key) is None:
        return {**raw, key: ""}, False
    return raw, True


def held_out_rows(chat, args) -> list[Row]:
    """--load_data_args: the validation rows of the adapter's training run, as train.load_data held them
    out. Its args.json says what it read: --dataset is read, sampled and split as it was (its
    --data_seed, #N, --split_dataset_ratio: sources.pick_rows), or --val_dataset's rows are taken;
    each row is encoded in its template and fitted to its --max_length as it was (data.fit_rows).
    tests/test_predict.py proves the rows the same."""
    folder = flags.parse_adapters(args.adapters)[0][1]
    trained = training_args(folder)
    template = choose_template(chat.tok.path.parent, chat.model.config.model_type, trained.get("template"),
                               trained.get("system"), trained.get("enable_thinking"), trained.get("loss_scale"),
                               trained.get("add_non_thinking_prefix", True), trained.get("preserve_thinking"),
                               trained.get("reasoning_effort"))
    values = sources.placeholder_values(trained.get("model_name"), trained.get("model_author"))

    def held(specs, ratio):
        try:
            rows, (_, order) = read_sources(specs, trained.get("data_seed", 42), values, ratio)
        except DataError as e:
            raise DataError(f"{e} (--load_data_args reads the datasets {folder}/args.json names; a relative path "
                            "is read from the folder you run in, as training did.)") from None
        return fitted(chat.tok, template, [rows[i] for i in order], trained.get("max_length", 2048),
                      trained.get("truncation_strategy", "delete"))

    val_dataset = trained.get("val_dataset")  # when given, its rows alone (train.py then splits nothing)
    held_out = held(val_dataset, 1) if val_dataset else held(trained["dataset"], trained["split_dataset_ratio"])
    say(f"data: the {len(held_out)} validation rows the training run of {folder} held out")
    return held_out


def training_args(folder) -> dict:
    """The checkpoint's args.json, if train.py wrote it (its split is the one rebuilt here)."""
    trained = lora.checkpoint_args(folder)
    if not (Path(folder) / "args.json").is_file() or not trained.get("dataset"):
        raise UsageError(f"--load_data_args true: {folder} has no args.json naming the datasets it was trained on. "
                         "Name the rows to answer with --val_dataset.")
    if "swift_version" in trained and "max_tokens_per_pass" not in trained:  # ours carry swift_version too, for ms-swift 4.x
        raise UsageError(f"--load_data_args true: {folder} was trained by ms-swift {trained['swift_version']}, whose "
                         "validation split is not rebuilt here (only train.py's). Name the rows with --val_dataset.")
    if not trained.get("split_dataset_ratio") and not trained.get("val_dataset"):
        raise UsageError(f"--load_data_args true: the training run of {folder} held out no validation rows "
                         "(--split_dataset_ratio 0 and no --val_dataset). Name the rows to answer with --val_dataset.")
    return trained


def fitted(tok, template, rows: list[Row], max_length: int, truncation_strategy: str) -> list[Row]:
    """The rows training kept, in its order: data.fit_rows of their encodings, as train.py fits them."""
    for r in rows:
        if r.labels is None:
            raise DataError(f"{r.where} ends with a question, and training reads only rows that end with their "
                            "answer: the file has changed since the run, so its validation rows cannot be rebuilt.")
    conversations = [r.messages + [{"role": "assistant", "content": r.labels}] for r in rows]
    encoded = data.encode_rows(tok, conversations, template=template)
    with contextlib.redirect_stdout(sys.stderr):  # its notes (rows dropped or cut), as training printed them
        kept = data.fit_rows(encoded, max_length, truncation_strategy, "validation rows")
    # fit_rows gives back each row it keeps, or a cut of it: a view into that row's ids (encode_rows
    # gives each row an array of its own). Either way the array says which row it was.
    index = {id(e.ids): i for i, e in enumerate(encoded)}
    return [rows[index[id(k.ids if k.ids.base is None else k.ids.base)]] for k in kept]


# ----------------------------------------------------------------------------------------------
# The result file


def default_result_path(args) -> Path:
    """Where ms-swift writes without --result_path: CKPT/infer_result/YYYYMMDD-HHMMSS.jsonl in the first
    adapter (or model folder) with an args.json, else result/MODEL/infer_result/... in this folder."""
    adapters = [path for _, path in flags.parse_adapters(args.adapters)]
    folder = next((Path(f) for f in adapters + [args.model or ""] if f and (Path(f) / "args.json").is_file()), None)
    if folder is None:
        model = args.model or lora.checkpoint_args(adapters[0])["model"]
        folder = Path("result") / Path(str(model).rstrip("/")).name
    return (folder / "infer_result" / time.strftime("%Y%m%d-%H%M%S.jsonl")).absolute()


def result_line(row: Row, response: str) -> dict:
    return {"response": response, "labels": row.labels, "logprobs": None,
            "messages": row.messages + [{"role": "assistant", "content": response}], "dataset": row.dataset}


def answered_before(path: Path, rows: list[Row]) -> tuple[int, int]:
    """(how many rows an earlier run answered into `path`, the bytes of a last line it left unfinished).
    Each line must be the answer to the row in its place (its messages and labels), else a UsageError:
    the file is another dataset's, and continuing it would mix the two."""
    if not path.exists():
        return 0, 0
    lines = path.read_bytes().split(b"\n")  # the last part follows the last newline: b"" unless cut short
    complete, cut = lines[:-1], len(lines[-1])
    if len(complete) > len(rows):
        raise UsageError(f"--result_path {path} holds {len(complete)} answers, more than the {len(rows)} rows of this "
                         "dataset: it was written for other rows. Give another --result_path, or delete the file.")
    for i, (line, row) in enumerate(zip(complete, rows)):
        problem = line_problem(line, row)
        if problem:
            raise UsageError(f"--result_path {path}: line {i + 1} is not the answer to row {i + 1} of this dataset "
                             f"({row.where}): {problem}. The file was written for other rows (another dataset, #N, "
                             "--seed or --load_data_args); give another --result_path, or delete the file to start "
                             "again.")
    return len(complete), cut


def line_problem(line: bytes, row: Row) -> str | None:
    """Why this line of a result file is not the answer to `row` (None: it is)."""
    try:
        value = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "it is not a JSON line"
    if not isinstance(value, dict) or not isinstance(value.get("messages"), list):
        return "it has no \"messages\""
    if value["messages"][:-1] != row.messages:
        return "its messages differ"
    if value.get("labels") != row.labels:
        return "its labels differ"
    return None


class ResultFile:
    """The answers, one complete JSON line a row in the rows' order, each flushed as it is written: the
    file is valid JSONL at every moment and holds every row answered before a crash or Ctrl-C. Answers
    finish in any order (short ones first); one waits in `ready` until every row before it is written."""

    def __init__(self, path: Path, rows: list[Row]):
        self.path, self.ready = path, {}
        self.written, cut = answered_before(path, rows)
        path.parent.mkdir(parents=True, exist_ok=True)
        if cut:  # a line cut short by a crash: its row is answered again
            say(f"(the last line of {path} was cut short, by a crash or a kill: its row is answered again)")
            with open(path, "r+b") as f:
                f.truncate(f.seek(0, 2) - cut)
        self.file = open(path, "a", encoding="utf-8")

    def finish(self, i: int, line: dict):
        self.ready[i] = line
        while self.written in self.ready:
            self.file.write(json.dumps(self.ready.pop(self.written), ensure_ascii=False) + "\n")
            self.file.flush()
            self.written += 1

    def close(self):
        self.file.close()


class ProgressLine:
    """Rows done, the rate and the time left, on stderr: one line rewritten in place on a terminal
    (at most 4 times a second), else a line every 10 seconds."""

    def __init__(self, total: int, done: int, out=None):
        self.total, self.done, self.first, self.tokens = total, done, done, 0
        self.out = sys.stderr if out is None else out  # (looked up now: a test or a caller may have replaced it)
        self.tty = hasattr(self.out, "isatty") and self.out.isatty()
        self.every = 0.25 if self.tty else 10.0
        self.start = self.last = time.monotonic()

    def add(self, rows: int = 0, tokens: int = 0):
        self.done, self.tokens = self.done + rows, self.tokens + tokens
        if time.monotonic() - self.last >= self.every:
            self.show()

    def show(self):
        self.last = time.monotonic()
        seconds = max(self.last - self.start, 1e-9)
        rate = (self.done - self.first) / seconds
        left = f", about {clock((self.total - self.done) / rate)} left" if rate and self.done < self.total else ""
        text = (f"rows {self.done:,}/{self.total:,} ({self.done / max(self.total, 1):.0%}), {rate:.2f} rows/s, "
                f"{self.tokens / seconds:,.0f} tokens/s{left}")
        print("\r" + text + "\033[K" if self.tty else text, end="" if self.tty else "\n", file=self.out, flush=True)

    def close(self):
        self.show()
        if self.tty:
            print(file=self.out, flush=True)


def clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# ----------------------------------------------------------------------------------------------
# Answering


def row_adapters(chat, rows: list[Row]) -> list[str | None]:
    """Each row's adapter (None: the base model): its "adapter" field, a loaded adapter's name or "base";
    else the first adapter. A name that is not loaded is a DataError naming the row."""
    names = []
    for row in rows:
        name = chat.adapter if row.adapter is None else None if row.adapter == "base" else row.adapter
        if name is not None and name not in chat.adapter_systems:
            loaded = ", ".join(chat.adapter_systems) or "none"
            given = json.dumps(row.adapter, ensure_ascii=False)
            raise DataError(f"{row.where}: its \"adapter\" is {given}, which is not loaded (loaded: {loaded}; "
                            "\"base\" is the model without adapter). Load it with --adapters NAME=PATH, or fix the "
                            "row. Nothing was answered yet.")
        if chat.merged and name != chat.adapter:
            raise DataError(f"{row.where}: it asks for {row.adapter!r}, but adapter {chat.adapter!r} is merged into "
                            "the weights (--merge_lora true), so every answer comes from it. Drop --merge_lora.")
        names.append(name)
    return names


def prompts_of(chat, rows: list[Row], adapters: list[str | None]) -> list[list[int]]:
    """Each row's prompt as infer.py renders it with that row's adapter active (its training system
    prompt, unless --system); a prompt that leaves no room for an answer is a DataError naming the row."""
    views = {name: replace(chat, adapter=name) for name in set(adapters)}  # Chat.current_system follows .adapter
    prompts = [views[name].prompt_ids(row.messages) for row, name in zip(rows, adapters)]
    for row, ids in zip(rows, prompts):
        if len(ids) >= chat.context:
            raise DataError(f"{row.where}: its question with the conversation before it is {len(ids)} tokens, and the "
                            f"model's context holds {chat.context}: no room for an answer. Shorten or remove the row; "
                            "nothing was answered yet.")
    return prompts


def response_text(chat, tokens: list[int]) -> str:
    """The answer as ms-swift writes it: what the template writes after `<|im_start|>assistant\\n` (a
    thinking model's opening of its think block, or a hybrid's empty one), then the tokens without
    the stop token that ended them."""
    if tokens and tokens[-1] in chat.stop_ids:
        tokens = tokens[:-1]
    return chat.template.generation_prompt() + chat.tok.decode(tokens)


def predict(chat, rows: list[Row], args) -> int:
    """Answer every row into the result file (0), or stop at Ctrl-C with every finished line kept (130)."""
    rows = held_out_rows(chat, args) if args.load_data_args else rows
    adapters = row_adapters(chat, rows)
    prompts = prompts_of(chat, rows, adapters)  # every row checked before anything is written
    path = Path(args.result_path).absolute() if args.result_path else default_result_path(args)
    out = ResultFile(path, rows)
    start = out.written
    if start == len(rows):
        out.close()
        say(f"all {len(rows)} rows are answered in {path} already")
        return 0
    say(f"answering {len(rows) - start} rows into {path}" + (f", after the {start} it holds" if start else ""))
    limit = DEFAULT_MAX_NEW_TOKENS if chat.max_new_tokens is None else chat.max_new_tokens
    if chat.max_new_tokens is None:
        say(f"(each answer may run to {limit:,} tokens and the KV cache holds that many for every row decoded at once: "
            "--max_new_tokens bounds both)")
    progress = ProgressLine(len(rows), start)
    requests = [Request(prompts[i], limit, frozenset(chat.stop_ids), seed=args.seed + i, adapter=adapters[i],
                        **chat.sampling) for i in range(start, len(rows))]
    for i, request in enumerate(requests, start):
        request.on_token = functools.partial(on_token, chat, rows[i], i, request, out, progress)
    slots = len(requests) if args.max_batch_size == -1 else min(args.max_batch_size, len(requests))
    started = time.monotonic()
    run_engine(chat, requests, slots, max(map(len, prompts[start:])) + limit, out, progress)
    seconds = time.monotonic() - started
    say(f"{len(requests)} rows answered in {seconds:.1f} s ({len(requests) / seconds:.2f} rows/s, "
        f"{progress.tokens / seconds:,.0f} tokens/s); the answers are in {path}")
    return 0


def on_token(chat, row: Row, i: int, request: Request, out: ResultFile, progress: ProgressLine, token: int,
             finished: bool):
    """Engine's callback for row i: count the token; a finished answer becomes its line."""
    progress.add(tokens=1)
    if finished:
        out.finish(i, result_line(row, response_text(chat, request.tokens)))
        progress.add(rows=1)


def run_engine(chat, requests: list[Request], slots: int, max_len: int, out: ResultFile, progress: ProgressLine):
    """The requests through the engine until all are answered. Ctrl-C stops it: every line written stays,
    and the message says how to go on."""
    engine = Engine(chat.model, slots, min(max_len, chat.context), cuda_graph=chat.decoding.cuda_graph,
                    compile=chat.decoding.compile)
    try:
        for request in requests:
            engine.add(request)
        while not engine.idle():
            engine.step()
    except KeyboardInterrupt:
        again = f"--result_path {shlex.quote(str(out.path))}"
        raise KeyboardInterrupt(f"interrupted: {out.written} of {progress.total} rows are answered in {out.path}. "
                                f"The same command with {again} answers the rest.") from None
    finally:
        engine.close()
        out.close()
        progress.close()
