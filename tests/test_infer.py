"""infer.py: decoding against transformers and peft, and the CLI and REPL as a user drives them."""

import json
import os
import pty
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import data
import decode
import fast_decode
import flags
import infer
import lora
import model as modeling
from conftest import chat_logits, hf_families

ROOT = Path(__file__).resolve().parent.parent
QUESTION = "Who are you?"


# ----------------------------------------------------------------------------------------------
# Helpers: models, adapters and expected answers built here


def load(folder):
    m, _ = modeling.load_model(str(folder), dtype=torch.float32)
    return m


def prompt_ids(tok, query, system=None, history=()):
    ids, _ = data.encode_chat(tok, list(history) + [{"role": "user", "content": query}],
                              add_generation_prompt=True, system=system)
    return ids


def make_adapter(model_dir, out_dir, seed, base=None):
    """A LoRA adapter (r=4, alpha=8) on every projection, with random B so that it changes the output."""
    m = load(model_dir)
    lora.add_adapter(m, lora.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0), "x")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora.lora_parameters(m, "x"):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    lora.save_adapter(m, out_dir, "x", base_model_name_or_path=str(base or model_dir))
    return Path(out_dir)


def expected_answer(m, tok, query, system=None, history=(), max_new_tokens=8):
    """What infer.py prints for this conversation: greedy, no repetition penalty, streamed text."""
    ids = prompt_ids(tok, query, system, history)
    dec = infer.StreamDecoder(tok)
    stop = {tok.im_end_id, tok.endoftext_id}  # the tiny model's generation_config eos list
    text = "".join(dec.push(t) for t in decode.generate(m, ids, max_new_tokens, stop)) + dec.flush()
    return text


def with_context(src, dst, n):
    """A copy of a model folder whose context (max_position_embeddings) is only n tokens."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["max_position_embeddings"] = n
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def make_scripted_model(out_dir, tiny_dir, text, loop=False):
    """A model that writes `text` whatever it is asked (then <|im_end|>, or `text` again if loop).

    Attention and MLP outputs are zero, so the last hidden state is the last token's embedding,
    and lm_head maps each token's embedding to the token that follows it in the script."""
    tok = data.Tokenizer(tiny_dir)
    script = tok.encode(text)
    start = prompt_ids(tok, "x")[-1]  # every prompt ends with the same token (the generation prompt's "\n")
    assert len(set(script + [start])) == len(script) + 1, "each token of the script must be different"
    follow = dict(zip([start] + script, script + [script[0] if loop else tok.im_end_id]))
    cfg = modeling.Config(vocab_size=960, hidden_size=128, intermediate_size=128, num_hidden_layers=1,
                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                          torch_dtype="float32", eos_token_id=tok.im_end_id)
    state = {k: torch.zeros_like(v) for k, v in modeling.QwenForCausalLM(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(cfg.vocab_size, cfg.hidden_size, generator=g), dim=-1)
    state["model.embed_tokens.weight"] = emb
    for k in state:
        if k.endswith("norm.weight"):
            state[k] = torch.ones_like(state[k])
    for cur, nxt in follow.items():
        state["lm_head.weight"][nxt] += 10 * emb[cur]
    out_dir = Path(out_dir)
    out_dir.mkdir()
    modeling.save_safetensors_sharded(state, out_dir)
    (out_dir / "config.json").write_text(json.dumps(cfg.to_dict()))
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(Path(tiny_dir) / f, out_dir / f)
    return out_dir


# Tiny models run fastest on one thread, and in-process expectations then match subprocesses exactly.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run_cli(*args, stdin=""):
    """infer.py in a subprocess with piped stdin/stdout: (exit code, stdout, stderr) as text."""
    p = subprocess.run([sys.executable, str(ROOT / "infer.py"), *map(str, args)], input=stdin.encode(),
                       capture_output=True, cwd=ROOT, timeout=120, env=dict(os.environ, **ONE_THREAD))
    return p.returncode, p.stdout.decode(), p.stderr.decode()


def run_here(capsys, *args):
    """infer.py as infer.main in this process, for tests of what it answers rather than of a process
    (a process start costs seconds here): (exit code, stdout, stderr) as run_cli gives them."""
    capsys.readouterr()
    code = infer.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


# Greedy, on the CPU: expected_answer decodes in float32 on the CPU, and a GPU's bf16 rounding can
# flip a greedy choice of these random weights (these tests are about the command line, not numerics).
GREEDY = ["--temperature", "0", "--repetition_penalty", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def chatty(tiny_dir, tmp_path_factory):
    """A random model (made by transformers, untied, with the tiny tokenizer) whose greedy answers
    vary from token to token: (folder, our model, tokenizer)."""
    from conftest import make_hf_checkpoint

    folder = tmp_path_factory.mktemp("chatty") / "model"
    make_hf_checkpoint(folder, tiny_dir, seed=0)
    return folder, load(folder), data.Tokenizer(folder)


@pytest.fixture(scope="module")
def two_adapters(chatty, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return make_adapter(chatty[0], root / "a", seed=1), make_adapter(chatty[0], root / "b", seed=2)


# ----------------------------------------------------------------------------------------------
# Decoding


@pytest.mark.parametrize("penalty", [1.0, 1.3])
@hf_families
def test_greedy_tokens_match_transformers_generate(hf_checkpoint, penalty, family):
    folder, hf = hf_checkpoint(family=family)
    tok = data.Tokenizer(folder)
    ids = prompt_ids(tok, QUESTION)
    stop = [tok.im_end_id, tok.endoftext_id]
    ref = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), do_sample=False,
                      max_new_tokens=30, repetition_penalty=penalty, eos_token_id=stop, pad_token_id=tok.endoftext_id)
    ours = list(decode.generate(load(folder), ids, 30, set(stop), repetition_penalty=penalty))
    assert ours == ref[0, len(ids):].tolist()
    assert len(ours) == 30  # no early stop: every step was compared


@hf_families
def test_greedy_tokens_with_adapter_match_peft(hf_checkpoint, tmp_path, family):
    from peft import PeftModel

    folder, hf = hf_checkpoint(family=family)
    adapter = make_adapter(folder, tmp_path / "adapter", seed=3)
    tok = data.Tokenizer(folder)
    ids = prompt_ids(tok, QUESTION)
    ours = load(folder)
    base_tokens = list(decode.generate(ours, ids, 30, set()))
    lora.load_adapter(ours, adapter)
    adapted_tokens = list(decode.generate(ours, ids, 30, set()))
    peft_model = PeftModel.from_pretrained(hf, adapter).eval()
    ref = peft_model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              do_sample=False, max_new_tokens=30, eos_token_id=None, pad_token_id=tok.endoftext_id)
    assert adapted_tokens == ref[0, len(ids):].tolist()
    assert adapted_tokens != base_tokens  # the adapter really changes the answer


def test_cached_decoding_equals_recomputing_the_whole_sequence(chatty):
    _, m, tok = chatty
    ids = prompt_ids(tok, QUESTION)
    cached = list(decode.generate(m, ids, 20, set()))
    seq = list(ids)
    with torch.no_grad():
        decoder = decode.Decoder(m, len(ids) + 20)
        logits = decoder.prefill(torch.tensor([ids]))
        for _ in range(20):
            full = m(torch.tensor([seq]))[0, -1]  # from scratch, no cache
            torch.testing.assert_close(logits, full, rtol=1e-4, atol=1e-4)
            seq.append(int(full.argmax()))
            logits = decoder.decode_one(torch.tensor(seq[-1]), len(seq) - 1)
    assert cached == seq[len(ids):]


def test_a_conversation_runs_only_its_new_tokens_and_answers_as_from_scratch(chatty, monkeypatch):
    _, m, tok = chatty
    stop = {tok.im_end_id, tok.endoftext_id}
    prefilled = []
    real_prefill = decode.Decoder.prefill
    monkeypatch.setattr(decode.Decoder, "prefill", lambda self, ids, start=0: (
        prefilled.append(ids.shape[1]), real_prefill(self, ids, start))[1])
    cache, cached = decode.Decoder(m, 512), []
    history = []
    for turn, question in enumerate([QUESTION, "What can you do?", "And then?"]):
        ids = prompt_ids(tok, question, history=history)
        answer = list(decode.generate(m, ids, 8, stop, decoder=cache, cached=cached))
        assert answer == list(decode.generate(m, ids, 8, stop))  # a fresh cache, the whole prompt
        new = prefilled[-2]  # the reusing call's prefill (the fresh one came after it)
        if turn == 0:
            assert new == len(ids)
        else:  # only what follows the earlier turns' tokens: the new question and its template
            assert new <= len(ids) - len(previous)
        previous = ids
        history += [{"role": "user", "content": question},
                    {"role": "assistant", "content": tok.decode([t for t in answer if t not in stop])}]
    # Stopping early (Ctrl-C in the REPL) leaves `cached` true to what the cache holds.
    ids = prompt_ids(tok, "Tell me more.", history=history)
    for i, _ in enumerate(decode.generate(m, ids, 8, stop, decoder=cache, cached=cached)):
        if i == 2:
            break
    assert cached[:len(ids)] == ids and len(cached) == len(ids) + 2
    ids = prompt_ids(tok, "Something else.", history=history)
    assert list(decode.generate(m, ids, 8, stop, decoder=cache, cached=cached)) == list(decode.generate(m, ids, 8, stop))


def test_sampling_filters_match_transformers_logits_processors():
    from transformers import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                              TopKLogitsWarper, TopPLogitsWarper)

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(500, generator=g) * 3
    text = torch.randint(0, 500, (40,), generator=g)
    seen = torch.zeros(500, dtype=torch.bool)
    seen[text] = True
    for temperature, top_p, top_k in [(0.7, 0.8, 20), (1.3, 0.5, 0), (0.5, 1.0, 7)]:
        processors = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.05), TemperatureLogitsWarper(temperature)]
                                         + ([TopKLogitsWarper(top_k)] if top_k else []) + [TopPLogitsWarper(top_p)])
        ref = processors(text[None], logits[None].clone()).softmax(-1)[0]
        ours = decode.sampling_probs(decode.apply_repetition_penalty(logits, seen, 1.05), temperature, top_p, top_k)
        torch.testing.assert_close(ours, ref)
        assert (ours > 0).sum() < 500  # something was filtered


def test_seeded_sampling_is_reproducible(chatty):
    _, m, tok = chatty
    ids = prompt_ids(tok, QUESTION)

    def sample(seed):
        g = torch.Generator().manual_seed(seed)
        return list(decode.generate(m, ids, 25, set(), temperature=1.0, top_p=0.95, top_k=50, generator=g))

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)
    assert sample(7) != list(decode.generate(m, ids, 25, set()))  # not greedy


def test_sampled_tokens_match_transformers_with_the_same_seed(hf_checkpoint):
    folder, hf = hf_checkpoint()
    tok = data.Tokenizer(folder)
    ids = prompt_ids(tok, QUESTION)
    settings = dict(temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05)  # Qwen2.5's own
    torch.manual_seed(3)
    ref = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), do_sample=True,
                      max_new_tokens=30, eos_token_id=None, pad_token_id=tok.endoftext_id, **settings)
    torch.manual_seed(3)  # generator=None: both draw from torch's global generator
    assert list(decode.generate(load(folder), ids, 30, set(), **settings)) == ref[0, len(ids):].tolist()


def test_answer_is_clamped_to_the_context_and_an_overlong_prompt_is_refused(chatty, tmp_path):
    m = load(with_context(chatty[0], tmp_path / "short", 40))
    assert len(list(decode.generate(m, list(range(30)), 100, set()))) == 10
    with pytest.raises(modeling.ModelError, match="context holds 40"):
        list(decode.generate(m, list(range(40)), 5, set()))


# ----------------------------------------------------------------------------------------------
# One-shot and piped use


def test_prompt_flag_prints_only_the_answer(chatty):
    folder, m, tok = chatty
    code, out, err = run_cli("--model", folder, "--prompt", QUESTION, "--max_new_tokens", 12, *GREEDY)
    assert code == 0, err
    assert out == expected_answer(m, tok, QUESTION, max_new_tokens=12) + "\n"
    assert f"loading {folder}" in err and "decoding: greedy" in err


def test_without_max_new_tokens_the_models_generation_config_bounds_the_answer(chatty, tmp_path, capsys):
    """generation_config.json's max_new_tokens is the default, as transformers' generate takes it (the
    tiny models set 256, so a random base does not write to the end of a 32k context); the flag wins."""
    import shutil
    folder, m, tok = chatty
    copy = tmp_path / "model"
    shutil.copytree(folder, copy)
    gen = json.loads((copy / "generation_config.json").read_text())
    (copy / "generation_config.json").write_text(json.dumps(dict(gen, max_new_tokens=7)))
    code, out, err = run_here(capsys, "--model", copy, "--prompt", QUESTION, *GREEDY)
    assert code == 0 and out == expected_answer(m, tok, QUESTION, max_new_tokens=7) + "\n", err
    assert "max_new_tokens 7" in err
    code, out, err = run_here(capsys, "--model", copy, "--prompt", QUESTION, "--max_new_tokens", 9, *GREEDY)
    assert out == expected_answer(m, tok, QUESTION, max_new_tokens=9) + "\n"


def test_piped_lines_are_answered_one_by_one_on_stdout(chatty):
    folder, m, tok = chatty
    code, out, err = run_cli("--model", folder, "--max_new_tokens", 10, "--stream", "false", *GREEDY,
                             stdin=f"{QUESTION}\n\n你好\n")
    assert code == 0, err
    # Each line is its own conversation (the second answer does not see the first), answered as
    # one JSON object a line that names its input line: newlines in an answer cannot shift them.
    assert [json.loads(line) for line in out.splitlines()] == [
        {"line": 1, "query": QUESTION, "response": expected_answer(m, tok, QUESTION, max_new_tokens=10)},
        {"line": 3, "query": "你好", "response": expected_answer(m, tok, "你好", max_new_tokens=10)}]


def test_checkpoint_args_supply_base_model_and_system_prompt(chatty, tmp_path, capsys):
    folder, m, tok = chatty
    ckpt = make_adapter(folder, tmp_path / "output" / "v0-20260101-000000" / "checkpoint-5", seed=4)
    system = "You are a pirate."
    (ckpt / "args.json").write_text(json.dumps({"model": str(folder), "system": system, "lora_rank": 4}))
    code, out, err = run_here(capsys, "--adapters", ckpt, "--prompt", QUESTION, "--max_new_tokens", 10, "--show_prompt", "true",
                              *GREEDY)
    assert code == 0, err
    assert f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{QUESTION}" in err
    adapted = load(folder)
    lora.load_adapter(adapted, ckpt)
    assert out == expected_answer(adapted, tok, QUESTION, system=system, max_new_tokens=10) + "\n"
    assert out != expected_answer(m, tok, QUESTION, system=system, max_new_tokens=10) + "\n"


def test_chinese_streams_whole_characters(tiny_dir, tmp_path):
    text = "你好龍。"  # 龍 is not in the tiny vocabulary: three byte-level tokens, one per UTF-8 byte
    scripted = make_scripted_model(tmp_path / "scripted", tiny_dir, text)
    tok = data.Tokenizer(tiny_dir)
    assert "\ufffd" in "".join(tok.decode([t]) for t in tok.encode(text))  # token by token would break it
    code, out, err = run_cli("--model", scripted, "--prompt", "说中文", "--stream", "true", *GREEDY)
    assert code == 0, err
    assert out == text + "\n"


# ----------------------------------------------------------------------------------------------
# Errors: one `error: ...` paragraph on stderr, exit code 2


def test_bad_model_path_is_a_clear_error_without_traceback(tmp_path, capsys):
    code, out, err = run_here(capsys, "--model", tmp_path / "no-such-model", "--prompt", "hi")
    assert code == 2 and out == ""
    assert "error: --model" in err and "no such folder" in err and "Traceback" not in err


def error_of(capsys, *args):
    code = infer.main([str(a) for a in args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    return err[err.index("error: "):]


@pytest.mark.parametrize("flags,message", [
    (["--temperature", "-1"], "--temperature -1.0: must be 0"),
    (["--top_p", "0"], "--top_p 0.0: must be in (0, 1]"),
    (["--stream", "maybe"], "argument --stream: expected true or false, got 'maybe'"),
    (["--torch_dtype", "int8"], "--torch_dtype 'int8' is not one of"),
    (["--merge_lora", "true"], "--merge_lora true needs exactly one adapter"),
    (["--max_new_tokens", "lots"], "argument --max_new_tokens: invalid int value"),
    (["--no_such_flag", "1"], "unrecognized arguments: --no_such_flag"),
    (["--temprature", "0"], "unrecognized arguments: --temprature 0 (did you mean --temperature?)"),
    (["--cuda_graph", "true", "--device", "cpu"], "--cuda_graph true needs a GPU"),
    (["--torch_compile", "true", "--device", "cpu"], "--torch_compile true (which compiles the CUDA graph step) needs a GPU"),
    (["--torch_compile", "true", "--cuda_graph", "false"], "it cannot go with --cuda_graph false"),
])
def test_bad_flag_values_are_clear_errors(capsys, flags, message):
    assert message in error_of(capsys, "--model", "tiny", *flags)


@pytest.mark.parametrize("tiny_dir", ["tiny-qwen3_5"], indirect=True)
def test_a_qwen3_5_model_decodes_with_a_cuda_graph_on_a_gpu(tiny_dir):
    """Its DeltaNet states are written in place (fast_decode.StaticKVCache), so its step is recorded by
    default on a GPU, as the other families' (test_cuda_graph_decoding_gives_the_eager_logits[tiny-qwen3_5]
    passed on an H100, run 26); --cuda_graph false and the CPU decode eagerly."""
    m, _ = modeling.load_model(str(tiny_dir), dtype=torch.float32, device="cpu")
    assert fast_decode.plan_decoding(None, False, torch.device("cuda"), m).cuda_graph
    assert fast_decode.plan_decoding(True, False, torch.device("cuda"), m).cuda_graph
    assert not fast_decode.plan_decoding(False, False, torch.device("cuda"), m).cuda_graph
    assert not fast_decode.plan_decoding(None, False, torch.device("cpu"), m).cuda_graph


def test_cuda_graph_is_the_default_on_a_gpu_only():
    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    assert fast_decode.plan_decoding(None, False, gpu).cuda_graph and not fast_decode.plan_decoding(None, False, cpu).cuda_graph
    assert not fast_decode.plan_decoding(False, False, gpu).cuda_graph
    chat = infer.load_chat(flags.infer_parser().parse_args(["--model", "tiny", "--device", "cpu"]))
    assert chat.decoding.cuda_graph is False



def test_repl_line_that_is_not_utf8_is_skipped_with_a_note(capsys, monkeypatch):
    """Where no readline cleans the line (libedit, a plain pipe to input()), bytes that are not UTF-8
    arrive surrogate-escaped: the REPL says so and goes on, instead of the tokenizer's TypeError."""
    chat = infer.load_chat(flags.infer_parser().parse_args(["--model", "tiny", "--device", "cpu"]))
    lines = iter([b"caf\xe9".decode("utf-8", "surrogateescape")])

    def typed(prompt=""):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None
    monkeypatch.setattr("builtins.input", typed)
    infer.repl(chat)  # returns at the end of input, no exception
    assert "that line is not UTF-8 text; type it again" in capsys.readouterr().err

def test_bad_adapter_folders_are_clear_errors(capsys, tmp_path, two_adapters):
    assert "does not exist" in error_of(capsys, "--adapters", tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    assert "no adapter_config.json" in error_of(capsys, "--adapters", tmp_path / "empty")
    run = tmp_path / "output" / "v1-20260101-000000"
    shutil.copytree(two_adapters[0], run / "checkpoint-10")
    assert "pass one of them" in error_of(capsys, "--adapters", run)  # the run folder, not a checkpoint
    assert "name 'base' cannot be used" in error_of(capsys, "--adapters", f"base={two_adapters[0]}")
    # An adapter without args.json whose adapter_config.json names no base: the user must say which.
    nameless = tmp_path / "nameless"
    shutil.copytree(two_adapters[0], nameless)
    cfg = json.loads((nameless / "adapter_config.json").read_text())
    (nameless / "adapter_config.json").write_text(json.dumps(dict(cfg, base_model_name_or_path=None)))
    assert "pass --model" in error_of(capsys, "--adapters", nameless)


def test_adapter_of_another_model_is_a_clear_error(capsys, chatty, tiny_dir, tmp_path):
    other = make_adapter(chatty[0], tmp_path / "other", seed=5)  # hidden size 64; the tiny model has 128
    assert "different" in error_of(capsys, "--model", tiny_dir, "--adapters", other, "--prompt", "hi")


# ----------------------------------------------------------------------------------------------
# The REPL on a pseudo-terminal, as a user at a keyboard drives it


class Terminal:
    """infer.py running on a pseudo-terminal: what is typed goes in, everything shown comes out."""

    def __init__(self, *args):
        env = dict(os.environ, TERM="dumb", **ONE_THREAD)
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the pty is its controlling terminal, so Ctrl-C sends SIGINT
            os.chdir(ROOT)
            os.execve(sys.executable, [sys.executable, "infer.py", *map(str, args)], env)
        self.pending = b""
        self.read_until("<<< ", timeout=60)

    def read_until(self, marker: str, timeout=30) -> str:
        """Everything shown up to and including `marker`, with the terminal's \\r\\n made \\n."""
        end = time.time() + timeout
        while marker.encode() not in self.pending:
            ready, _, _ = select.select([self.fd], [], [], max(0, end - time.time()))
            try:
                chunk = os.read(self.fd, 65536) if ready else b""
            except OSError:  # the child has exited
                chunk = b""
            if not chunk:
                raise AssertionError(f"no {marker!r} on the terminal; it shows:\n{self.pending.decode(errors='replace')}")
            self.pending += chunk
        cut = self.pending.index(marker.encode()) + len(marker.encode())
        shown, self.pending = self.pending[:cut], self.pending[cut:]
        return shown.decode(errors="replace").replace("\r\n", "\n")

    def type(self, keys: str):
        os.write(self.fd, keys.encode())

    def ask(self, line: str) -> str:
        """Type a line and return what is shown until the next prompt."""
        self.type(line + "\n")
        return self.read_until("<<< ")

    def exit_code(self, timeout=30) -> int:
        end = time.time() + timeout
        while time.time() < end:
            try:
                os.read(self.fd, 65536)  # keep the terminal drained
            except OSError:
                pass
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.05)
        raise AssertionError("infer.py did not exit")

    def kill(self):
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


@pytest.fixture
def terminal():
    opened = []

    def start(*args):
        opened.append(Terminal(*args))
        return opened[-1]
    yield start
    for t in opened:
        t.kill()


def test_repl_keeps_the_conversation_until_clear_and_applies_system(terminal, chatty):
    folder, m, tok = chatty
    term = terminal("--model", folder, "--max_new_tokens", 8, "--show_prompt", "true", *GREEDY)
    first = expected_answer(m, tok, QUESTION)
    assert first in term.ask(QUESTION)
    history = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": first}]
    shown = term.ask("What can you do?")
    # The second prompt carries the first question and answer, and the answer follows from them.
    assert data.render_chat(history + [{"role": "user", "content": "What can you do?"}], add_generation_prompt=True) in shown
    assert expected_answer(m, tok, "What can you do?", history=history) in shown
    assert "cleared" in term.ask("clear")
    shown = term.ask("Hello")
    assert QUESTION not in shown and expected_answer(m, tok, "Hello") in shown
    assert "system prompt: You are a pirate." in term.ask("/system You are a pirate.")
    shown = term.ask("Hello")
    assert "<|im_start|>system\nYou are a pirate.<|im_end|>" in shown and "<|im_start|>user\nHello" in shown
    assert expected_answer(m, tok, "Hello", system="You are a pirate.", history=[
        {"role": "user", "content": "Hello"}, {"role": "assistant", "content": expected_answer(m, tok, "Hello")}]) in shown
    assert "cleared" in term.ask("clear")  # clear keeps the system prompt; /system default is the way back
    assert "system prompt: You are Qwen, created by Alibaba Cloud." in term.ask("/system default")  # issue 34 item 12
    term.type("exit\n")
    assert term.exit_code() == 0


def test_repl_switches_between_adapters_and_base(terminal, chatty, two_adapters):
    folder, m, tok = chatty
    a, b = two_adapters
    answers = {}
    for name, path in [("a", a), ("b", b)]:
        adapted = load(folder)
        lora.load_adapter(adapted, path)
        answers[name] = expected_answer(adapted, tok, QUESTION)
    answers["base"] = expected_answer(m, tok, QUESTION)
    assert len(set(answers.values())) == 3  # each adapter answers differently

    term = terminal("--model", folder, "--adapters", f"a={a}", f"b={b}", "--max_new_tokens", 8, *GREEDY)
    assert "adapters: base, a (active), b" in term.ask("/adapters")
    assert answers["a"] in term.ask(QUESTION)
    for name in ["b", "base", "a"]:
        assert "now answering with" in term.ask(f"/adapter {name}")
        term.ask("clear")
        assert answers[name] in term.ask(QUESTION)
    shown = term.ask("/adapter nope")
    assert "error: no adapter named 'nope'" in shown and "loaded: a, b" in shown
    term.ask("clear")
    assert answers["a"] in term.ask(QUESTION)  # still running, still on adapter a
    term.type("\x04")  # Ctrl-D
    assert term.exit_code() == 0


def test_ctrl_c_stops_the_answer_and_returns_to_the_prompt(terminal, tiny_dir, tmp_path):
    endless = make_scripted_model(tmp_path / "endless", tiny_dir, "你好龍。", loop=True)
    term = terminal("--model", endless, "--max_new_tokens", 100000, "--show_prompt", "true", *GREEDY)
    term.type("first question\n")
    term.read_until("你好龍。" * 5)  # streaming: whole characters, as they come
    term.type("\x03")  # Ctrl-C
    assert "stopped" in term.read_until("<<< ")
    term.type("second question\n")
    shown = term.read_until("你好龍。" * 3)
    assert "second question" in shown and "first question" not in shown  # the stopped turn was dropped
    term.type("\x03")
    term.read_until("<<< ")
    term.type("\x04")
    assert term.exit_code() == 0


def test_repl_says_when_the_conversation_outgrows_the_context(terminal, chatty, tmp_path):
    short = with_context(chatty[0], tmp_path / "short", 64)
    term = terminal("--model", short, *GREEDY)
    assert "cut off at the model's context of 64 tokens" in term.ask("Hi")  # no --max_new_tokens: fills it
    assert "Type clear" in term.ask("And now?")
    term.ask("clear")
    assert "cut off" in term.ask("Hi")
    term.type("quit\n")
    assert term.exit_code() == 0


def test_merged_adapter_answers_like_the_unmerged_one(capsys, chatty, two_adapters):
    folder, _, _ = chatty
    answers = []
    for merge in ("false", "true"):
        assert infer.main(["--model", str(folder), "--adapters", str(two_adapters[0]), "--merge_lora", merge,
                           "--prompt", QUESTION, "--max_new_tokens", "12", *GREEDY]) == 0
        out, err = capsys.readouterr()
        answers.append(out)
    assert answers[0] == answers[1] and "merged into the weights" in err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU: run on the GPU machine")
@pytest.mark.parametrize("tiny_dir", ["tiny", "tiny-qwen3", "tiny-qwen3_5"], indirect=True)
def test_cuda_graph_decoding_gives_the_eager_logits(tiny_dir):
    """fast_decode.CUDAGraphDecoder replays decode.Decoder.decode_one: the same logits at every step,
    after a prefill and after a second prefill that reuses the cache (a chat's next turn); and over
    a chat through decode.generate that stops an answer, goes back to a snapshot (Qwen3.5's DeltaNet
    states, copied out of the graph's buffers and back) and starts a new text (conftest.chat_logits)."""
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 as float32 (an earlier test may have allowed TF32)
    try:
        compare_graph_and_eager_decoding(tiny_dir)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def compare_graph_and_eager_decoding(tiny_dir):
    m, _ = modeling.load_model(str(tiny_dir), dtype=torch.float32, device="cuda")
    eager, graphed = decode.Decoder(m, 64), fast_decode.CUDAGraphDecoder(m, 64)
    seq = list(range(10, 30))
    with torch.no_grad():
        for start, end in ((0, 12), (12, 20)):  # two turns: the second reuses positions 0..11
            prompt = torch.tensor([seq[start:end]], device="cuda")
            a, b = eager.prefill(prompt, start), graphed.prefill(prompt, start)
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
        for position in range(20, 40):
            token = a.argmax()
            a, b = eager.decode_one(token, position), graphed.decode_one(token, position).clone()
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    want, want_turns = chat_logits(m, decode.Decoder(m, 64))
    got, got_turns = chat_logits(m, fast_decode.CUDAGraphDecoder(m, 64))
    assert got_turns == want_turns and len(got) == len(want)
    for a, b in zip(want, got):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


def test_a_line_that_is_not_utf8_is_skipped_and_the_others_answered(tiny_dir):
    p = subprocess.run([sys.executable, str(ROOT / "infer.py"), "--model", "tiny", *GREEDY,
                        "--max_new_tokens", "3"], input=b"hello\n\xff\xfe bad\nwho are you\n", capture_output=True,
                       cwd=ROOT, timeout=120, env=dict(os.environ, **ONE_THREAD))
    err = p.stderr.decode()
    assert p.returncode == 1 and "input line 2 is not UTF-8 text; skipped it" in err and "Traceback" not in err
    results = [json.loads(line) for line in p.stdout.decode().splitlines()]
    assert [r["line"] for r in results] == [1, 2, 3] and results[1] == {"line": 2, "error": "not UTF-8 text"}
    assert "response" in results[0] and "response" in results[2]


def test_adapter_folders_with_dots_get_a_valid_name(capsys, two_adapters, tmp_path):
    versioned = tmp_path / "robot-v1.2"
    shutil.copytree(two_adapters[0], versioned)
    assert flags.parse_adapters([str(versioned)]) == [("robot-v1_2", str(versioned))]
    assert "cannot hold a dot; write it as a_b=PATH" in error_of(capsys, "--adapters", f"a.b={versioned}")
    assert "--temperature nan: give a number" in error_of(capsys, "--model", "tiny", "--temperature", "nan")
    assert "--system holds bytes that are not UTF-8" in error_of(capsys, "--model", "tiny", "--system", "a\udcffb")
