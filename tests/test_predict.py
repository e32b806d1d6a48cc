"""predict.py: a dataset answered through infer.py, as ms-swift's `swift infer --val_dataset` answers it:
the lines ms-swift writes, each answer what decoding its row alone gives, #N, the default path,
--load_data_args, resuming, refusals, and each row's own adapter."""

import json
from pathlib import Path

import pytest

import data
import decode
import flags
import infer
import model as modeling
import predict
import sources
import train
from conftest import random_adapter

MS_SWIFT = Path("/tmp/ms")  # where the ms-swift run below wrote its files; replaced by each test's folder

# The seven lines `swift infer` (ms-swift 4.6.0, --infer_backend pt, CPU, float32) wrote for the files of
# ms_swift_files, answered by the tiny model with the adapter random_adapter(seed=1), run as:
#   swift infer --model TINY --model_type qwen2 --template qwen2_5 --adapters ADAPTER --val_dataset
#     /tmp/ms/m.jsonl /tmp/ms/q.jsonl /tmp/ms/a.jsonl /tmp/ms/s.jsonl --result_path out.jsonl
#     --infer_backend pt --torch_dtype float32 --max_new_tokens 12 --temperature 0 --max_batch_size 4
MS_SWIFT_LINES = """\
{"response": "\ufffdne我的人 l\ufffdex onlin能上ex Can。了你", "labels": "I am a bot.", "logprobs": null, "messages": [{"role": "user", "content": "who are you?"}, {"role": "assistant", "content": "\ufffdne我的人 l\ufffdex onlin能上ex Can。了你"}], "dataset": "/tmp/ms/m.jsonl"}
{"response": "E se with很b创造\ufffd卸多，晼我", "labels": null, "logprobs": null, "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "E se with很b创造\ufffd卸多，晼我"}], "dataset": "/tmp/ms/m.jsonl"}
{"response": " with\ufffd什么 se\ufffd\ufffd withrow seGPWhoslat\ufffd", "labels": "4", "logprobs": null, "messages": [{"role": "user", "content": "what is 2+2"}, {"role": "assistant", "content": " with\ufffd什么 se\ufffd\ufffd withrow seGPWhoslat\ufffd"}], "dataset": "/tmp/ms/q.jsonl"}
{"response": "我@ se ass\ufffdntb se\ufffd AI Are with", "labels": "r2", "logprobs": null, "messages": [{"role": "system", "content": "sys!"}, {"role": "user", "content": "h1"}, {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"}, {"role": "assistant", "content": "我@ se ass\ufffdntb se\ufffd AI Are with"}], "dataset": "/tmp/ms/q.jsonl"}
{"response": "1 nighWho is，\ufffdbL\ufffd\ufffd withank with，\ufffd", "labels": "bonjour", "logprobs": null, "messages": [{"role": "user", "content": "Translate\\nhello"}, {"role": "assistant", "content": "1 nighWho is，\ufffdbL\ufffd\ufffd withank with，\ufffd"}], "dataset": "/tmp/ms/a.jsonl"}
{"response": "exGP onlin onlin l AIZ My\ufffd\ufffd创造\ufffd Can", "labels": "done", "logprobs": null, "messages": [{"role": "user", "content": "Do"}, {"role": "assistant", "content": "exGP onlin onlin l AIZ My\ufffd\ufffd创造\ufffd Can"}], "dataset": "/tmp/ms/a.jsonl"}
{"response": " with。 l\ufffd se\ufffd se\ufffd se My many se", "labels": "d", "logprobs": null, "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}, {"role": "assistant", "content": " with。 l\ufffd se\ufffd se\ufffd se My many se"}], "dataset": "/tmp/ms/s.jsonl"}
"""

GREEDY = ["--temperature", "0", "--device", "cpu", "--torch_dtype", "float32"]


# ----------------------------------------------------------------------------------------------
# Helpers: adapters, datasets and the answers of one row at a time


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def ms_swift_files(folder):
    """The four files of the ms-swift run above: every format, with and without an answer, history."""
    return [str(write_jsonl(folder / name, rows)) for name, rows in [
        ("m.jsonl", [{"messages": [{"role": "user", "content": "who are you?"}, {"role": "assistant", "content": "I am a bot."}]},
                     {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]}]),
        ("q.jsonl", [{"query": "what is 2+2", "response": "4"},
                     {"query": "q2", "response": "r2", "system": "sys!", "history": [["h1", "a1"]]}]),
        ("a.jsonl", [{"instruction": "Translate", "input": "hello", "output": "bonjour"},
                     {"instruction": "Do", "output": "done", "extra_field": 7}]),
        ("s.jsonl", [{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"},
                                        {"from": "human", "value": "c"}, {"from": "gpt", "value": "d"}]}])]]


def mixed_dataset(folder):
    """Rows of every format and of very different lengths, in a .jsonl and a .json file."""
    long_question = " ".join(f"word{i} 你好" for i in range(150))
    a = write_jsonl(folder / "mixed.jsonl", [
        {"messages": [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "A bot."}]},
        {"query": long_question, "response": "long"},
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"},
                           {"from": "human", "value": "and then?"}]},
        {"instruction": "Translate", "input": "cat", "output": "chat", "system": "You translate."},
        {"query": "no answer here"},
    ])
    b = folder / "more.json"
    b.write_text(json.dumps([{"query": f"question {i}" + "?" * (7 * i), "response": f"answer {i}"} for i in range(5)]))
    return [str(a), str(b)]


def read_lines(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def answer_alone(chat, messages, adapter, max_new_tokens):
    """The answer decode.generate gives this conversation alone, through infer's Chat (its template,
    system prompt and sampling), written as predict writes it."""
    chat.use_adapter(adapter)
    tokens = list(decode.generate(chat.model, chat.prompt_ids(messages), max_new_tokens, chat.stop_ids, **chat.sampling))
    tokens = tokens[:-1] if tokens[-1] in chat.stop_ids else tokens
    return chat.template.generation_prompt() + chat.tok.decode(tokens)


def run(argv, capsys=None):
    code = infer.main(argv)
    return code, (capsys.readouterr().err if capsys else "")


# ----------------------------------------------------------------------------------------------
# What each line holds


def test_the_file_is_the_one_ms_swift_writes_for_the_same_rows(tmp_path, tiny_dir, capsys):
    adapter = random_adapter(tiny_dir, tmp_path / "adapter", seed=1)
    out = tmp_path / "out.jsonl"
    code, err = run(["--model", str(tiny_dir), "--adapters", str(adapter), "--val_dataset", *ms_swift_files(tmp_path),
                     "--result_path", str(out), "--max_new_tokens", "12", "--max_batch_size", "4", *GREEDY], capsys)
    assert code == 0, err
    assert out.read_text() == MS_SWIFT_LINES.replace(f"{MS_SWIFT}/", f"{tmp_path}/")
    assert "7 rows answered in" in err and str(out) in err


def test_every_greedy_answer_is_what_its_row_decoded_alone_gives(tmp_path, tiny_dir, capsys):
    adapter = random_adapter(tiny_dir, tmp_path / "adapter", seed=2)
    argv = ["--model", str(tiny_dir), "--adapters", f"robot={adapter}", "--max_new_tokens", "12", *GREEDY]
    out = tmp_path / "out.jsonl"
    specs = mixed_dataset(tmp_path)
    assert run(argv + ["--val_dataset", *specs, "--result_path", str(out), "--max_batch_size", "4"]) == (0, "")
    lines = read_lines(out)
    assert [line["labels"] for line in lines] == ["A bot.", "long", None, "chat", None] + [f"answer {i}" for i in range(5)]
    chat = infer.load_chat(flags.infer_parser().parse_args(argv))
    for line in lines:
        assert line["response"] == answer_alone(chat, line["messages"][:-1], "robot", 12)
        assert line["messages"][-1] == {"role": "assistant", "content": line["response"]}
    assert len({line["response"] for line in lines}) > 5  # the rows got answers of their own
    lengths = [len(chat.prompt_ids(line["messages"][:-1])) for line in lines]
    assert max(lengths) > 400 and max(lengths) > 8 * min(lengths)  # rows of very different lengths, in one batch
    assert lines[3]["messages"][0] == {"role": "system", "content": "You translate."}
    assert lines[2]["messages"][-2] == {"role": "user", "content": "and then?"} and lines[4]["dataset"] == specs[0]


def test_a_thinking_model_keeps_its_reasoning_in_the_response_as_ms_swift(tmp_path, capsys):
    """ms-swift writes the template's response prefix before the answer: a hybrid Qwen3 told not to
    think starts with the empty think block; one that thinks writes <think>...</think> itself."""
    import tiny
    qwen3 = tiny.tiny_model_dir("tiny-qwen3")
    spec = str(write_jsonl(tmp_path / "q.jsonl", [{"query": "hi"}, {"query": "who are you", "response": "me"}]))
    for thinking in ("false", "true"):
        argv = ["--model", str(qwen3), "--enable_thinking", thinking, "--max_new_tokens", "6", *GREEDY]
        out = tmp_path / f"out-{thinking}.jsonl"
        assert run(argv + ["--val_dataset", spec, "--result_path", str(out)])[0] == 0
        chat = infer.load_chat(flags.infer_parser().parse_args(argv))
        for line in read_lines(out):
            assert line["response"] == answer_alone(chat, line["messages"][:-1], None, 6)
            assert line["response"].startswith("<think>\n\n</think>\n\n") == (thinking == "false")


# ----------------------------------------------------------------------------------------------
# Which rows, where the file goes


def test_sampling_n_answers_the_first_n_rows_as_ms_swift(tmp_path, tiny_dir, capsys):
    spec = str(write_jsonl(tmp_path / "ten.jsonl", [{"query": f"q{i}", "response": f"a{i}"} for i in range(10)]))
    out = tmp_path / "out4.jsonl"
    assert run(["--model", "tiny", "--val_dataset", f"{spec}#4", "--result_path", str(out), "--max_new_tokens", "1",
                "--data_seed", "7", *GREEDY])[0] == 0  # swift infer --val_dataset: split ratio 1, not shuffled
    assert [line["labels"] for line in read_lines(out)] == ["a0", "a1", "a2", "a3"]
    assert all(line["dataset"] == spec for line in read_lines(out))
    code, err = run(["--model", "tiny", "--val_dataset", f"{spec}#13", "--result_path", str(tmp_path / "o13.jsonl"),
                     *GREEDY], capsys)
    assert code == 2 and "13 rows asked of a source of 10; validation rows are not repeated" in err


def test_without_result_path_the_answers_go_where_ms_swift_writes_them(tmp_path, tiny_dir, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = str(write_jsonl(tmp_path / "q.jsonl", [{"query": "hi", "response": "hello"}]))
    common = ["--val_dataset", spec, "--max_new_tokens", "1", *GREEDY]
    code, err = run(["--model", "tiny"] + common, capsys)
    (written,) = (tmp_path / "result" / "tiny" / "infer_result").glob("*.jsonl")  # no checkpoint: result/MODEL/
    assert code == 0 and f"the answers are in {written}\n" in err
    assert len(written.name) == len("20261207-111815.jsonl") and written.name[8] == "-"
    assert train.main(["--model", "tiny", "--dataset", spec, "--max_steps", "1", "--output_dir", str(tmp_path / "run"),
                       "--device", "cpu", "--gradient_accumulation_steps", "1"]) == 0
    (ckpt,) = (tmp_path / "run").glob("v0-*/checkpoint-1")
    code, err = run(["--adapters", str(ckpt)] + common, capsys)
    (written,) = (ckpt / "infer_result").glob("*.jsonl")  # a checkpoint (args.json): CKPT/infer_result/
    assert code == 0 and f"answering 1 rows into {written}\n" in err and read_lines(written)[0]["labels"] == "hello"
    code, err = run(["--adapters", str(ckpt), "--load_data_args", "true", *GREEDY], capsys)
    assert code == 2 and err == (f"error: --load_data_args true: the training run of {ckpt} held out no validation rows "
                                 "(--split_dataset_ratio 0 and no --val_dataset). Name the rows to answer with "
                                 "--val_dataset.\n")  # before the model loads


@pytest.mark.parametrize("truncation,given", [("delete", "split"), ("left", "split"), ("left", "val_dataset")])
def test_load_data_args_answers_exactly_the_rows_training_held_out(tmp_path, tiny_dir, truncation, given, capsys):
    """Proof that the rows are train.py's: train.load_data's validation rows (token ids, in order)
    equal the answered rows encoded and fitted as training fits them, with #N, rows dropped or cut
    by --max_length, and a split (or a --val_dataset, which means no split) in play."""
    short = write_jsonl(tmp_path / "a.jsonl", [{"query": f"q{i} " + "x " * (i % 7) * 9, "response": f"a{i}"}
                                               for i in range(30)])
    other = tmp_path / "b.json"
    other.write_text(json.dumps([{"messages": [{"role": "user", "content": f"m{i}"}, {"role": "assistant", "content": "ok"}]}
                                 for i in range(6)]))
    val = write_jsonl(tmp_path / "v.jsonl", [{"query": "v" * 30 * i, "response": "fine"} for i in range(1, 4)])
    argv = ["--model", "tiny", "--dataset", str(short), f"{other}#9", "--split_dataset_ratio", "0.3", "--max_length", "100", "--truncation_strategy", truncation, "--seed", "3", "--max_steps", "1",
            "--gradient_accumulation_steps", "1", "--output_dir", str(tmp_path / "run"), "--device", "cpu"]
    argv += ["--val_dataset", str(val)] if given == "val_dataset" else []
    assert train.main(argv) == 0
    fitting = capsys.readouterr().out
    assert ("were dropped" if truncation == "delete" else "were cut from the left") in fitting  # fit_rows at work
    (ckpt,) = (tmp_path / "run").glob("v0-*/checkpoint-1")
    out = tmp_path / "held_out.jsonl"
    assert run(["--adapters", str(ckpt), "--load_data_args", "true", "--result_path", str(out), "--max_new_tokens", "1",
                *GREEDY])[0] == 0

    a = flags.train_parser().parse_args(argv)
    flags.check_train_args(a)
    tok = data.Tokenizer(tiny_dir)
    template = train.chat_template(a, tiny_dir, modeling.Config.from_json(tiny_dir / "config.json"))
    _, expected = train.load_data(a, tok, template)
    lines = read_lines(out)
    got = data.encode_rows(tok, [line["messages"][:-1] + [{"role": "assistant", "content": line["labels"]}]
                                 for line in lines], template=template)
    assert len(lines) == len(expected) >= 3
    for row, line, want in zip(got, lines, expected):
        assert row.ids[-100:].tolist() == want["input_ids"].tolist(), line["messages"]
    datasets = {line["dataset"] for line in lines}
    assert datasets == ({str(val)} if given == "val_dataset" else {str(short), str(other)})


# ----------------------------------------------------------------------------------------------
# Keeping the file: resume, Ctrl-C, refusals


def test_a_run_cut_short_goes_on_to_the_file_an_uninterrupted_run_writes(tmp_path, tiny_dir, capsys, monkeypatch):
    adapter = random_adapter(tiny_dir, tmp_path / "adapter", seed=3)
    specs = mixed_dataset(tmp_path)
    argv = ["--model", str(tiny_dir), "--adapters", str(adapter), "--val_dataset", *specs, "--max_new_tokens", "8",
            "--max_batch_size", "3", *GREEDY]
    whole = tmp_path / "whole.jsonl"
    assert run(argv + ["--result_path", str(whole)])[0] == 0
    lines = whole.read_text().splitlines(keepends=True)

    crashed = tmp_path / "crashed.jsonl"  # a crash in the middle of writing line 5
    crashed.write_text("".join(lines[:4]) + lines[4][:20])
    code, err = run(argv + ["--result_path", str(crashed)], capsys)
    assert code == 0 and "was cut short" in err and "after the 4 it holds" in err
    assert crashed.read_text() == whole.read_text()

    stopped = tmp_path / "stopped.jsonl"  # Ctrl-C after a few engine steps
    real_step, steps = predict.Engine.step, []

    def step_then_ctrl_c(engine):
        steps.append(1)
        if len(steps) == 12:
            raise KeyboardInterrupt
        real_step(engine)

    monkeypatch.setattr(predict.Engine, "step", step_then_ctrl_c)
    code, err = run(argv + ["--result_path", str(stopped)], capsys)
    kept = stopped.read_text()
    assert code == 130 and 0 < kept.count("\n") < len(lines) and whole.read_text().startswith(kept)
    assert f"rows are answered in {stopped}. The same command with --result_path {stopped} answers the rest." in err
    monkeypatch.setattr(predict.Engine, "step", real_step)
    assert run(argv + ["--result_path", str(stopped)])[0] == 0
    assert stopped.read_text() == whole.read_text()
    code, err = run(argv + ["--result_path", str(stopped)], capsys)
    assert code == 0 and f"all 10 rows are answered in {stopped} already" in err


def test_a_result_file_of_other_rows_is_refused_and_left_as_it_was(tmp_path, tiny_dir, capsys):
    specs = mixed_dataset(tmp_path)
    out = tmp_path / "out.jsonl"
    common = ["--model", "tiny", "--max_new_tokens", "1", "--result_path", str(out), *GREEDY]
    assert run(common + ["--val_dataset", specs[1]], capsys)[0] == 0
    before = out.read_bytes()
    code, err = run(common + ["--val_dataset", specs[0]], capsys)
    assert code == 2 and out.read_bytes() == before
    assert err == (f"error: --result_path {out}: line 1 is not the answer to row 1 of this dataset ({specs[0]}, line 1): "
                   "its messages differ. The file was written for other rows (another dataset, #N, --seed or "
                   "--load_data_args); give another --result_path, or delete the file to start again.\n")
    assert "loading" not in err  # refused before the model loads
    code, err = run(common + ["--val_dataset", f"{specs[1]}#2"], capsys)
    assert code == 2 and "holds 5 answers, more than the 2 rows" in err and out.read_bytes() == before


@pytest.mark.parametrize("row,problem", [
    ({"query": "hi", "adapter": "poet"}, "its \"adapter\" is \"poet\", which is not loaded (loaded: robot, writer;"),
    ({"foo": "bar"}, "has none of the fields of a known format"),
])
def test_a_bad_row_is_one_clear_error_before_anything_is_written(tmp_path, tiny_dir, row, problem, capsys):
    adapters = [f"robot={random_adapter(tiny_dir, tmp_path / 'a', 1)}", f"writer={random_adapter(tiny_dir, tmp_path / 'b', 2)}"]
    spec = str(write_jsonl(tmp_path / "rows.jsonl", [{"query": "fine"}, row]))
    code, err = run(["--model", "tiny", "--adapters", *adapters, "--val_dataset", spec, "--result_path",
                     str(tmp_path / "out.jsonl"), *GREEDY], capsys)
    assert code == 2 and err.splitlines()[-1].startswith(f"error: {spec}, line 2") and problem in err
    assert not (tmp_path / "out.jsonl").exists()
    code, err = run(["--model", "tiny", "--val_dataset", str(tmp_path / "missing.jsonl"), *GREEDY], capsys)
    assert code == 2 and err == f"error: --val_dataset {tmp_path}/missing.jsonl: {tmp_path}/missing.jsonl does not exist.\n"


def test_each_row_is_answered_by_the_adapter_it_names(tmp_path, tiny_dir):
    robot, writer = random_adapter(tiny_dir, tmp_path / "a", 4), random_adapter(tiny_dir, tmp_path / "b", 5)
    argv = ["--model", str(tiny_dir), "--adapters", f"robot={robot}", f"writer={writer}", "--max_new_tokens", "10", *GREEDY]
    names = ["writer", "base", None, "robot", "writer", None, "base"]
    spec = str(write_jsonl(tmp_path / "rows.jsonl", [{"query": f"who are you, {i}?", **({"adapter": n} if n else {})}
                                                     for i, n in enumerate(names)]))
    out = tmp_path / "out.jsonl"
    assert run(argv + ["--val_dataset", spec, "--result_path", str(out), "--max_batch_size", "4"])[0] == 0
    chat = infer.load_chat(flags.infer_parser().parse_args(argv))
    lines = read_lines(out)
    for line, name in zip(lines, names):  # no field: the first adapter; "base": none
        adapter = {"base": None, None: "robot"}.get(name, name)
        assert line["response"] == answer_alone(chat, line["messages"][:-1], adapter, 10), name
    assert lines[0]["response"] != answer_alone(chat, lines[0]["messages"][:-1], "robot", 10)


def test_the_progress_line_is_rewritten_in_place_on_a_terminal():
    class Terminal(list):
        def isatty(self):
            return True

        def write(self, text):
            self.append(text)

        def flush(self):
            pass

    screen = Terminal()
    line = predict.ProgressLine(total=8, done=2, out=screen)
    for _ in range(3):
        line.add(rows=1, tokens=40)  # at most 4 lines a second: these wait for the next
    line.close()
    text = "".join(screen)
    assert text.startswith("\rrows 5/8 (62%), ") and text.endswith(" left\033[K\n") and text.count("\r") == 1
