"""Shared fixtures: tiny Qwen2 checkpoints in the official layout, made by the tests themselves."""

import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session", autouse=True)
def _isolated_home(tmp_path_factory):
    """`--model tiny` inside tests (and their subprocesses) uses a fresh tiny model of the session."""
    home = tmp_path_factory.mktemp("qwen_lora_home")
    os.environ["QWEN_LORA_HOME"] = str(home)
    os.environ["HF_HUB_OFFLINE"] = "1"
    yield home


@pytest.fixture(scope="session", autouse=True)
def _ctrl_c_reaches_the_commands():
    """The Ctrl-C tests need SIGINT to reach train.py, infer.py and merge.py as it does at a
    terminal. A job a script starts in the background (`cmd &`) begins with SIGINT ignored, and
    every process it starts inherits that: Python then never raises KeyboardInterrupt. Handling it
    here gives the commands under test the default back (a handler is reset to it at exec)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def _process_wide_cuda_settings():
    """train.main and infer.main run in-process in many tests, and on a GPU a run changes settings
    of the whole process, as a command may (speed.TrainingPlan.prepare: a side stream for all
    work, TF32 float32 matmuls). Each test gets them back as a new process has them."""
    import torch
    tf32 = torch.backends.cuda.matmul.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32 = tf32
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.set_stream(torch.cuda.default_stream())


def compile_without_inductor(monkeypatch):
    """torch.compile's tracing (dynamo, AOT autograd, a checkpoint inside) without inductor's C++
    code, which a clean machine compiles with gcc for a minute and more on 2 cores: for the tests
    of what is compiled, how often, and what the run around it does.
    tests/test_model.py::test_compiled_checkpointed_layers_give_the_eager_gradients runs inductor."""
    import functools
    import torch
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))


@pytest.fixture
def without_inductor(monkeypatch):
    compile_without_inductor(monkeypatch)


@contextlib.contextmanager
def single_torch_thread():
    """torch on one thread, then as before. Tiny matmuls run fastest on one, a busy machine can make
    several a hundred times slower, and one thread sums floats as a subprocess with
    OMP_NUM_THREADS=1 does, bit for bit."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def one_torch_thread():
    """single_torch_thread for a whole test module (`pytestmark = pytest.mark.usefixtures(...)`)."""
    with single_torch_thread():
        yield


@pytest.fixture(scope="session")
def tiny_dir(_isolated_home, request):
    """The built-in tiny model (config, sharded safetensors, tokenizer), as `--model tiny` sees it;
    a test marked @both_families runs on it and on `--model tiny-qwen3`."""
    import tiny
    return tiny.tiny_model_dir(getattr(request, "param", "tiny"))


# The same test on the tiny Qwen2.5 and the tiny Qwen3 (q_norm / k_norm, head_dim not hidden / heads).
both_families = pytest.mark.parametrize("tiny_dir", ["tiny", "tiny-qwen3"], indirect=True)
# The same test on transformers' Qwen2ForCausalLM and Qwen3ForCausalLM (hf_checkpoint(family=...)).
hf_families = pytest.mark.parametrize("family", ["qwen2", "qwen3"])

# Qwen3.5 at the tiny sizes: 4 layers (three Gated DeltaNet, then full attention), 2 query / key
# heads of 16 shared by 4 value heads of 8, conv kernel 4; attention head_dim 32 of which RoPE turns 8.
QWEN3_5_TINY = dict(head_dim=32, num_hidden_layers=4, linear_num_key_heads=2, linear_num_value_heads=4,
                    linear_key_head_dim=16, linear_value_head_dim=8, linear_conv_kernel_dim=4)
QWEN3_5_ROPE = {"rope_type": "default", "rope_theta": 1000000.0, "partial_rotary_factor": 0.25,
                "mrope_section": [2, 1, 1], "mrope_interleaved": True}  # as the official text_config writes it
QWEN3_5_VISION = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=64, patch_size=2,
                      temporal_patch_size=2, num_position_embeddings=16)


def hf_model(family: str, base: dict):
    """transformers' model of a family (qwen3_5_vl: Qwen3_5ForConditionalGeneration, the official layout)."""
    import transformers
    if family == "qwen3_5_vl":
        config = transformers.Qwen3_5Config(
            text_config={k: v for k, v in base.items() if k != "tie_word_embeddings"}, vision_config=QWEN3_5_VISION,
            tie_word_embeddings=base["tie_word_embeddings"], image_token_id=950, video_token_id=951,
            vision_start_token_id=952, vision_end_token_id=953)
        return transformers.Qwen3_5ForConditionalGeneration(config)
    Model, Config = {"qwen2": (transformers.Qwen2ForCausalLM, transformers.Qwen2Config),
                     "qwen3": (transformers.Qwen3ForCausalLM, transformers.Qwen3Config),
                     "qwen3_5": (transformers.Qwen3_5ForCausalLM, transformers.Qwen3_5TextConfig)}[family]
    return Model(Config(**base))


def make_hf_checkpoint(out_dir, tiny_dir, seed=0, family="qwen2", **config):
    """Save a random transformers Qwen2ForCausalLM (or, with family="qwen3", Qwen3ForCausalLM: its
    head_dim 24, not hidden / heads = 16; "qwen3_5": Qwen3_5ForCausalLM, QWEN3_5_TINY; "qwen3_5_vl":
    the same text model in Qwen3_5ForConditionalGeneration with a tiny vision tower, plus two mtp.*
    tensors, as the official checkpoints hold them) with the tiny tokenizer, in small shards.

    Returns the transformers model (float32, eval mode) so tests can compare against it."""
    import torch

    import data
    tok = data.Tokenizer(tiny_dir)
    base = dict(vocab_size=960, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
                bos_token_id=tok.endoftext_id, eos_token_id=tok.im_end_id)
    if family == "qwen3":
        base.update(head_dim=24, attention_bias=False)
    if family.startswith("qwen3_5"):
        base.update(QWEN3_5_TINY, rope_parameters=QWEN3_5_ROPE)
        del base["rope_theta"]
    base.update(config)
    torch.manual_seed(seed)
    hf = hf_model(family, base).float().eval()
    with torch.no_grad():  # the default init leaves biases at zero and norms at one; make them matter
        for name, p in hf.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            if name.endswith("A_log"):  # decays of e^-0.05 or so a token: the state carries across chunks
                p.copy_(torch.randn_like(p) * 0.5 - 3)
    out_dir = Path(out_dir)
    hf.save_pretrained(out_dir, max_shard_size="100KB")
    if family == "qwen3_5_vl":  # transformers has no MTP module: a shard of two stand-in tensors
        from safetensors.torch import save_file
        save_file({"mtp.fc.weight": torch.randn(64, 128), "mtp.norm.weight": torch.zeros(64)},
                  out_dir / "mtp.safetensors", metadata={"format": "pt"})
        index = json.loads((out_dir / "model.safetensors.index.json").read_text())
        index["weight_map"].update({"mtp.fc.weight": "mtp.safetensors", "mtp.norm.weight": "mtp.safetensors"})
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "generation_config.json"):
        shutil.copy(Path(tiny_dir) / f, out_dir / f)
    return hf


@pytest.fixture
def hf_checkpoint(tmp_path, tiny_dir):
    """Factory: hf_checkpoint(name, **config) -> (folder, transformers model)."""
    def make(name="hf", seed=0, family="qwen2", **config):
        folder = tmp_path / name
        return folder, make_hf_checkpoint(folder, tiny_dir, seed=seed, family=family, **config)
    return make


def lora_for_training(m, cfg, b_std: float, seed: int | None = None):
    """m with a LoRA adapter whose B is drawn from N(0, b_std) instead of zero (so every A has a
    gradient, and the loss sees the dropout masks), in training mode, checkpointed as train.py
    trains it. seed: reseed after the adapter's own init, before B is drawn."""
    import torch
    import lora
    lora.add_adapter(m, cfg)
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lora_B" in name:
                p.normal_(0, b_std)
    m.train()
    m.model.gradient_checkpointing = True
    return m


def random_rows(lengths, seed=0):
    """Rows of random tokens, one of each length, whose first third is an unlabelled prompt."""
    import torch
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        ids = torch.randint(10, 900, (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * (n // 3) + ids[n // 3:]})
    return rows


def loss_and_gradients(m, batch, layers, seed: int):
    """(loss, gradient of every LoRA parameter) of one micro-batch through train.CausalLMLoss with
    these layers (None: the model's own), dropout drawn from `seed` so that paths can be compared.
    By .backward(), as train.micro_batch runs it (a reentrant checkpoint, shard.py's, cannot run
    under torch.autograd.grad)."""
    import torch
    import lora
    import train
    params = lora.lora_parameters(m)
    for p in params:
        p.grad = None
    torch.manual_seed(seed)
    loss = train.CausalLMLoss(m, layers=layers)(**batch)
    loss.backward()
    grads = tuple(p.grad for p in params)
    for p in params:
        p.grad = None
    return loss.detach(), grads


def random_adapter(tiny_dir, out_dir, seed, base_model_name_or_path=None):
    """A LoRA adapter (r=4, alpha=8) on every projection with random A and B, saved in out_dir, so
    that the tiny model's answers differ from row to row (without one it writes newlines)."""
    import torch
    import lora
    import model as modeling
    m, _ = modeling.load_model(str(tiny_dir), dtype=torch.float32)
    lora.add_adapter(m, lora.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0), "x")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora.lora_parameters(m, "x"):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    lora.save_adapter(m, out_dir, "x", base_model_name_or_path=base_model_name_or_path or str(tiny_dir))
    return Path(out_dir)


def marked_text(tok, ids, labels) -> str:
    """The row's text with its trained spans in ⟦ ⟧, as the ms-swift oracle (/work/oracle/swift) writes them."""
    from data import IGNORE_INDEX
    out, i = [], 0
    while i < len(ids):
        j = i
        while j < len(ids) and (labels[j] != IGNORE_INDEX) == (labels[i] != IGNORE_INDEX):
            j += 1
        text = tok.decode(ids[i:j])
        out.append(f"⟦{text}⟧" if labels[i] != IGNORE_INDEX else text)
        i = j
    return "".join(out)


@pytest.fixture(scope="module")
def qwen3_dir(_isolated_home):
    """The built-in tiny hybrid Qwen3 (its tokenizer and Qwen3-8B's chat template)."""
    import tiny
    return tiny.tiny_model_dir("tiny-qwen3")


def with_template(src, dst, chat_template):
    """A copy of a model folder whose tokenizer_config.json holds another chat template (None: none)."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "tokenizer_config.json").read_text())
    cfg.pop("chat_template")
    if chat_template is not None:
        cfg["chat_template"] = chat_template
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    return dst


def random_tokens(batch=2, length=13, seed=0, vocab=900):
    """(batch, length) token ids drawn from a seeded generator."""
    import torch
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def assert_left_padded_decoding_matches_rows_alone(m):
    """A left-padded batch of two rows, prefilled into a cache and then given one token each, gives
    each row's logits as that row alone does."""
    import torch
    a, b = random_tokens(1, 8, seed=1)[0], random_tokens(1, 5, seed=2)[0]
    ids = torch.stack([a, torch.cat([torch.zeros(3, dtype=torch.long), b])])
    mask = torch.tensor([[1] * 8, [0] * 3 + [1] * 5])
    nxt = torch.tensor([[11], [12]])
    with torch.no_grad():
        cache = m.new_cache(2, 16)
        m(ids, attention_mask=mask, cache=cache)
        step = m(nxt, attention_mask=torch.ones(2, 1, dtype=torch.long), cache=cache)[:, -1]
        torch.testing.assert_close(step[0], m(torch.cat([a, nxt[0]])[None])[0, -1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(step[1], m(torch.cat([b, nxt[1]])[None])[0, -1], rtol=1e-5, atol=1e-5)


def chat_logits(m, decoder) -> tuple[list, list]:
    """(copies of every logits `decoder` gives, its snapshot positions after each turn) over a chat
    as infer.py runs it (decode.generate, greedy, the cache reused between turns): an answer; a
    prompt that goes on from it, stopped after two tokens (Ctrl-C); a prompt that leaves the first
    answer after three tokens, so that a Qwen3.5 model goes back to its snapshot at the end of the
    first prompt; a new text, from position 0. 40 positions at most."""
    import decode
    kept, cached, turns = LogitsKept(decoder), [], []
    ask = lambda ids, n: decode.generate(m, ids, n, set(), decoder=kept, cached=cached)
    first = random_tokens(1, 20, seed=1)[0].tolist()
    answer = list(ask(first, 6))
    turns.append(sorted(decoder.snapshots))
    for i, _ in enumerate(ask(first + answer + random_tokens(1, 7, seed=2)[0].tolist(), 6)):
        if i == 2:
            break
    turns.append(sorted(decoder.snapshots))
    list(ask(first + answer[:3] + random_tokens(1, 5, seed=3)[0].tolist(), 6))
    turns.append(sorted(decoder.snapshots))
    list(ask(random_tokens(1, 10, seed=4)[0].tolist(), 6))
    turns.append(sorted(decoder.snapshots))
    return kept.logits, turns


class LogitsKept:
    """A decoder that keeps a copy of the logits of each prefill and decode_one (a CUDA graph's
    logits are overwritten by its next replay)."""

    def __init__(self, decoder):
        self.decoder, self.logits = decoder, []

    def __getattr__(self, name):  # max_len, resume_point: the decoder's own
        return getattr(self.decoder, name)

    def prefill(self, input_ids, start=0):
        return self.kept(self.decoder.prefill(input_ids, start))

    def decode_one(self, token, position):
        return self.kept(self.decoder.decode_one(token, position))

    def kept(self, logits):
        self.logits.append(logits.clone())
        return logits


# ----------------------------------------------------------------------------------------------
# serve.py in a process of its own (tests/test_serve.py, tests/test_serve_faults.py)


SERVER_KEY = "sk-test-key"  # the --api_key of tests/test_serve.py's server


class ServerProcess:
    """python serve.py ... in a subprocess on a free port; its stderr is collected line by line."""

    def __init__(self, *args):
        env = dict(os.environ, OMP_NUM_THREADS="1")  # in-process expectations run on one thread too
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--port", "0", *map(str, args)],
                                     cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        threading.Thread(target=self.collect, daemon=True).start()
        started = self.wait_for(r"serving .* at (http://\S+/v1)", timeout=60)
        self.url = started.group(1)
        self.host, self.port = re.match(r"http://(.+):(\d+)/v1", self.url).groups()

    def collect(self):
        for line in self.proc.stderr:
            self.lines.append(line)

    def wait_for(self, pattern: str, timeout=20):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines:
                if m := re.search(pattern, line):
                    return m
            if self.proc.poll() is not None:  # exited: its last lines are read within a moment
                time.sleep(0.2)
                deadline = min(deadline, time.monotonic())
            time.sleep(0.02)
        raise AssertionError(f"no line matching {pattern!r} from serve.py; it wrote:\n{''.join(self.lines)}")

    def request(self, method, path, body=None, key=SERVER_KEY, raw: bytes | None = None):
        """(status, parsed JSON body) of one plain HTTP request."""
        conn = http.client.HTTPConnection(self.host, int(self.port), timeout=30)
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        conn.request(method, path, body=raw if raw is not None else None if body is None else json.dumps(body),
                     headers=headers)
        response = conn.getresponse()
        status, content = response.status, response.read()
        conn.close()
        return status, json.loads(content)

    def stop(self, how=signal.SIGINT):
        if self.proc.poll() is None:
            self.proc.send_signal(how)
        return self.proc.wait(timeout=30)
