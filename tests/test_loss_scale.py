"""--loss_scale last_round and all (issue 31, item 13): only the answers after the last question
are trained, or every token, as ms-swift 4.6 trains them; its ids and labels recorded in tests/swift/last_round.json
(tiny Qwen2.5 with qwen2_5, tiny Qwen3 with qwen3, where ms-swift makes it
last_round+ignore_empty_think and writes an earlier answer without the empty think block)."""

import json
from pathlib import Path

import pytest

import data
import sources
import template as T
import train

RECORDED = json.loads((Path(__file__).parent / "swift" / "last_round.json").read_text())


@pytest.mark.parametrize("family,name", [("tiny", "qwen2_5"), ("tiny-qwen3", "qwen3")])
def test_last_round_trains_only_the_last_answers_as_ms_swift(family, name, _isolated_home):
    import tiny
    folder = tiny.tiny_model_dir(family)
    tok = data.Tokenizer(folder)
    t = T.choose_template(folder, "qwen2" if family == "tiny" else "qwen3", name, None, None, "last_round", True)
    assert t.loss_scale == ("last_round" if name == "qwen2_5" else "last_round+ignore_empty_think")
    want = RECORDED[name]
    for messages, w in zip(RECORDED["rows"], want):  # the plain encoder
        assert data.encode_chat(tok, messages, template=t) == (w["ids"], w["labels"])
    batched = sources.encode_chats(tok, RECORDED["rows"], template=t)  # the batched one, which replaces it
    assert [(r["input_ids"].tolist(), r["labels"].tolist()) for r in batched] == [(w["ids"], w["labels"]) for w in want]


def test_all_trains_every_token_but_the_first_as_ms_swift(_isolated_home):
    import tiny
    folder = tiny.tiny_model_dir("tiny")
    tok = data.Tokenizer(folder)
    t = T.choose_template(folder, "qwen2", "qwen2_5", None, None, "all", True)
    want = [(w["ids"], w["labels"]) for w in RECORDED["all_qwen2_5"]]
    assert [data.encode_chat(tok, m, template=t) for m in RECORDED["rows"]] == want
    assert [(r["input_ids"].tolist(), r["labels"].tolist()) for r in sources.encode_chats(tok, RECORDED["rows"], template=t)] == want
    assert all(labels[0] == -100 and -100 not in labels[1:] for _, labels in want)


def test_a_run_with_last_round_records_it_and_trains(tmp_path, capsys):
    rows = [{"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                          {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]}] * 4
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert train.main(["--model", "tiny", "--dataset", str(tmp_path / "d.jsonl"), "--loss_scale", "last_round",
                       "--max_steps", "1", "--device", "cpu", "--output_dir", str(tmp_path / "out")]) == 0
    assert "chat template: qwen2_5 (loss_scale last_round)" in capsys.readouterr().out
    (args,) = (tmp_path / "out").glob("v0-*/args.json")
    assert json.loads(args.read_text())["loss_scale"] == "last_round"
