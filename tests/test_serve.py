"""serve.py, driven as its clients drive it: the official openai client and raw HTTP against a real
server process (the tiny model with two adapters), its answers compared with decode.generate."""

import http.client
import json
import signal
import socket
import threading
import time

import openai
import pytest
import torch

import data
import decode
import infer
import lora
import model as modeling
import serve
from template import TEMPLATES
from conftest import SERVER_KEY as KEY, ServerProcess, random_adapter

QUESTION = [{"role": "user", "content": "Who are you?"}]
PENALTY = 1.05  # the tiny model's generation_config.json: what a request that gives none decodes with
SLOT = ["--max_model_len", "512", "--max_batch_size", "4", "--device", "cpu"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------------------------
# A server process, adapters, and the answers decode.generate gives


@pytest.fixture(scope="module")
def adapters(tiny_dir, tmp_path_factory):
    """Two adapters on the tiny model, random B so that each answers its own way; their base is named 'tiny'."""
    root = tmp_path_factory.mktemp("serve_adapters")
    paths = {}
    for name, seed in (("a", 1), ("b", 2)):
        paths[name] = random_adapter(tiny_dir, root / name, seed, base_model_name_or_path="tiny")
    return paths


@pytest.fixture(scope="module")
def server(adapters):
    s = ServerProcess("--model", "tiny", "--adapters", f"a={adapters['a']}", f"b={adapters['b']}", "--api_key", KEY, *SLOT)
    yield s
    assert s.stop(signal.SIGTERM) == 0  # SIGTERM stops it as Ctrl-C does (test_ctrl_c_...)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def expected(tiny_dir, adapters):
    """expected(model id, n, messages): the greedy answer decode.generate gives that adapter (or the
    base, 'tiny'), as text, with the model's default repetition penalty."""
    m, _ = modeling.load_model(str(tiny_dir), dtype=torch.float32)
    for name, path in adapters.items():
        lora.load_adapter(m, path, name)
    tok = data.Tokenizer(tiny_dir)
    stop = {tok.im_end_id, tok.endoftext_id}

    def answer(model, n, messages=QUESTION):
        lora.set_active_adapter(m, None if model == "tiny" else model)
        ids, _ = data.encode_chat(tok, messages, add_generation_prompt=True)
        tokens = list(decode.generate(m, ids, n, stop, repetition_penalty=PENALTY))
        dec = infer.StreamDecoder(tok)
        return "".join(dec.push(t) for t in tokens) + dec.flush(), len(ids), tokens[-1] in stop

    return answer


# ----------------------------------------------------------------------------------------------
# Answers


def test_models_lists_the_base_under_its_name_and_each_adapter(client, server):
    server.wait_for(r"serving tiny, a, b at http://127\.0\.0\.1:\d+/v1")  # the start-up line, then a request to paste:
    server.wait_for(r"curl http://\S+/v1/chat/completions .*Bearer \$API_KEY.* -d '\{\"model\": \"a\"")
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny", "a", "b"]
    assert all(m.object == "model" and m.owned_by == "swift" for m in models)


def test_model_ids_are_named_as_ms_swift_names_them():
    assert serve.model_id("Qwen/Qwen2.5-7B-Instruct") == "Qwen2.5-7B-Instruct"
    assert serve.model_id("/data/models/Qwen3-4B-Instruct-2507/") == "Qwen3-4B-Instruct-2507"
    assert serve.model_id("/root/.cache/huggingface/hub/models--Qwen--Qwen3-8B/snapshots/9c9/") == "Qwen3-8B"
    assert serve.model_id("/root/.cache/modelscope/hub/Qwen/Qwen2___5-7B-Instruct") == "Qwen2.5-7B-Instruct"


@pytest.mark.parametrize("model", ["a", "b", "tiny"])
def test_greedy_completion_equals_decode_generate(client, expected, model):
    text, prompt_tokens, stopped = expected(model, 24)
    reply = client.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=24)
    assert reply.choices[0].message.content == text and reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason == ("stop" if stopped else "length") and reply.model == model
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == \
        (prompt_tokens, 24, prompt_tokens + 24)


def test_streamed_answer_joins_to_the_same_text_and_ends_properly(client, server, expected):
    text, prompt_tokens, _ = expected("a", 30)
    chunks = list(client.chat.completions.create(model="a", messages=QUESTION, temperature=0, max_completion_tokens=30,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 30
    assert len({c.id for c in chunks}) == 1
    # On the wire: server-sent events, each `data: {...}` and a blank line, the last `data: [DONE]`.
    conn = http.client.HTTPConnection(server.host, int(server.port), timeout=30)
    conn.request("POST", "/v1/chat/completions", json.dumps({"model": "a", "messages": QUESTION, "temperature": 0,
                                                             "max_tokens": 5, "stream": True}),
                 {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    response = conn.getresponse()
    wire = response.read().decode()
    assert response.getheader("Content-Type") == "text/event-stream"
    events = wire.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""] and all(e.startswith("data: {") for e in events[:-2])


def test_a_stop_string_cuts_the_answer_there(client, expected):
    text, _, _ = expected("a", 24)
    stop = text[10:13]
    cut = text[:text.index(stop)]
    reply = client.chat.completions.create(model="a", messages=QUESTION, temperature=0, max_tokens=24, stop=[stop, "zzz"])
    assert reply.choices[0].message.content == cut and reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens < 24  # decoding stopped there too
    pieces = client.chat.completions.create(model="a", messages=QUESTION, temperature=0, max_tokens=24, stop=stop,
                                            stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in pieces) == cut


def test_two_adapters_asked_at_once_each_give_their_own_answer(client, expected):
    want = {model: expected(model, 40)[0] for model in ("a", "b", "tiny")}
    got = {}

    def ask(model, i):
        reply = client.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=40)
        got[model, i] = reply.choices[0].message.content

    threads = [threading.Thread(target=ask, args=(model, i)) for i in range(2) for model in ("a", "b", "tiny")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(set(want.values())) == 3  # the adapters do answer differently
    assert got == {(model, i): want[model] for i in range(2) for model in ("a", "b", "tiny")}


def test_a_burst_of_clients_connecting_at_once_is_served_not_reset(server):
    """64 connections at the same moment (bench.py --serve 32 met resets: socketserver queues 5)."""
    assert serve.HTTPServer.request_queue_size >= 128
    start, statuses = threading.Barrier(64), []

    def ask():
        start.wait()
        statuses.append(server.request("GET", "/health", key=None)[0])

    threads = [threading.Thread(target=ask) for _ in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert statuses == [200] * 64


def test_a_sampled_answer_follows_its_seed(client):
    def sample(seed):
        return client.chat.completions.create(model="b", messages=QUESTION, temperature=1.0, top_p=0.9, max_tokens=16,
                                              seed=seed).choices[0].message.content

    assert sample(7) == sample(7)
    assert len({sample(7), sample(8), sample(9)}) > 1


# ----------------------------------------------------------------------------------------------
# Errors: OpenAI's body and status, and the server goes on


BAD_REQUESTS = [
    (b"{not json", 400, None, None),
    ({"model": "nope", "messages": QUESTION}, 404, "model", "model_not_found"),
    ({"messages": QUESTION}, 400, "model", "missing_required_parameter"),
    ({"model": "a"}, 400, "messages", "missing_required_parameter"),
    ({"model": "a", "messages": []}, 400, "messages", "missing_required_parameter"),
    ({"model": "a", "messages": QUESTION, "max_tokens": 0}, 400, "max_tokens", "invalid_value"),
    ({"model": "a", "messages": QUESTION, "max_tokens": -5}, 400, "max_tokens", "invalid_value"),
    ({"model": "a", "messages": QUESTION, "max_completion_tokens": 1.5}, 400, "max_completion_tokens", "invalid_type"),
    ({"model": "a", "messages": QUESTION, "temperature": 3}, 400, "temperature", "invalid_value"),
    ({"model": "a", "messages": QUESTION, "temperature": "hot"}, 400, "temperature", "invalid_type"),
    ({"model": "a", "messages": QUESTION, "top_p": 0}, 400, "top_p", "invalid_value"),
    ({"model": "a", "messages": [{"role": "user", "content": "hello " * 600}]}, 400, "messages", "context_length_exceeded"),
    ({"model": "a", "messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].role", None),
    ({"model": "a", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages[0].content", None),
    ({"model": "a", "messages": QUESTION, "n": 2}, 400, "n", None),
    ({"model": "a", "messages": QUESTION, "stop": 5}, 400, "stop", None),
    ({"model": "a", "messages": QUESTION, "stream": "yes"}, 400, "stream", None),
    ({"model": "a", "messages": QUESTION, "chat_template_kwargs": {"enable_thinking": True}}, 400, "chat_template_kwargs", None),
    ({"model": "a", "messages": QUESTION, "reasoning_effort": "low"}, 400, "reasoning_effort", None),  # Qwen2.5: none
    ({"model": "a", "messages": QUESTION, "chat_template_kwargs": {"reasoning_effort": "high"}}, 400,
     "chat_template_kwargs", None),
    ({"model": "a", "messages": QUESTION, "reasoning_effort": ["low"]}, 400, "reasoning_effort", None),  # not a 500
    ({"model": "a", "messages": QUESTION, "chat_template_kwargs": "low"}, 400, "chat_template_kwargs", None),
]


@pytest.mark.parametrize("body,status,param,code", BAD_REQUESTS)
def test_bad_requests_get_openai_error_bodies_and_the_server_goes_on(server, body, status, param, code):
    raw = body if isinstance(body, bytes) else None
    got, answer = server.request("POST", "/v1/chat/completions", None if raw else body, raw=raw)
    assert got == status
    error = answer["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert (error["param"], error["code"], error["type"]) == (param, code, "invalid_request_error")
    ok, reply = server.request("POST", "/v1/chat/completions", {"model": "tiny", "messages": QUESTION, "max_tokens": 2})
    assert ok == 200 and reply["usage"]["completion_tokens"] == 2


def test_the_openai_client_raises_its_own_errors(client):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="nope", messages=QUESTION)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model="a", messages=QUESTION, max_tokens=0)


def test_every_route_but_health_needs_the_api_key(server):
    assert server.request("GET", "/health", key=None) == (200, {"status": "ok", "running": 0, "waiting": 0})
    for key in (None, "wrong"):
        status, answer = server.request("GET", "/v1/models", key=key)
        assert status == 401 and answer["error"]["code"] == "invalid_api_key"
        status, _ = server.request("POST", "/v1/chat/completions", {"model": "a", "messages": QUESTION}, key=key)
        assert status == 401
    assert server.request("GET", "/v1/models")[0] == 200
    assert server.request("GET", "/v2/nothing")[0] == 404


def test_a_client_leaving_mid_stream_frees_its_slot(server):
    body = json.dumps({"model": "tiny", "messages": QUESTION, "temperature": 0, "max_tokens": 440, "stream": True})
    with socket.create_connection((server.host, int(server.port)), timeout=30) as sock:
        sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}".encode())
        received = b""
        while received.count(b"data: ") < 3:  # the role, then two pieces of the answer
            chunk = sock.recv(4096)
            assert chunk, f"the server closed the stream early: {received!r}"
            received += chunk
    line = server.wait_for(r"tiny: \d+ prompt \+ (\d+) answer tokens, cancelled: the client went away")
    assert int(line.group(1)) < 440
    deadline = time.monotonic() + 10
    while server.request("GET", "/health")[1] != {"status": "ok", "running": 0, "waiting": 0}:
        assert time.monotonic() < deadline, "the engine still runs the answer of a client that left"
        time.sleep(0.02)


# ----------------------------------------------------------------------------------------------
# Stopping, and bad flags


@pytest.fixture(scope="module")
def merged_server(adapters):
    """Adapter b given without a name and merged into the weights: the base's id answers with it."""
    s = ServerProcess("--adapters", adapters["b"], "--merge_lora", "true", *SLOT)
    yield s
    s.stop()


def test_a_merged_adapter_answers_under_the_base_id(merged_server, expected):
    status, models = merged_server.request("GET", "/v1/models")
    assert status == 200 and [m["id"] for m in models["data"]] == ["tiny"]  # the base named in b's adapter_config.json
    text, _, _ = expected("b", 24)
    status, reply = merged_server.request("POST", "/v1/chat/completions", {"model": "tiny", "messages": QUESTION,
                                                                           "temperature": 0, "max_tokens": 24})
    assert status == 200 and reply["choices"][0]["message"]["content"] == text


def test_ctrl_c_finishes_the_answers_in_flight_and_exits_0(merged_server):
    """(Stops merged_server: it comes after the other tests that use it.)"""
    s = merged_server
    body = json.dumps({"model": "tiny", "messages": QUESTION, "temperature": 0, "max_tokens": 400, "stream": True})
    with socket.create_connection((s.host, int(s.port)), timeout=30) as sock:
        sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
        received = sock.recv(4096)
        s.proc.send_signal(signal.SIGINT)
        s.wait_for("stopping: 1 answer")
        with pytest.raises(ConnectionRefusedError):  # no new connections
            socket.create_connection((s.host, int(s.port)), timeout=5)
        while chunk := sock.recv(65536):
            received += chunk
    events = [e.removeprefix("data: ") for e in received.decode().split("\r\n\r\n", 1)[1].split("\n\n") if e]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"  # the whole answer, 400 tokens
    assert s.proc.wait(timeout=30) == 0
    s.wait_for(r"tiny: \d+ prompt \+ 400 answer tokens, length")


@pytest.mark.parametrize("flags,message", [
    (["--port", "70000"], "--port 70000"),
    (["--max_batch_size", "0"], "--max_batch_size 0"),
    (["--client_timeout", "0"], "--client_timeout 0"),
    (["--max_connections", "0"], "--max_connections 0"),
    (["--api_key", ""], "--api_key is empty"),
    (["--ssl_keyfile", "key.pem"], "TLS proxy"),
    (["--adapters", "ckpt-1", "ckpt-2"], "name all but one"),
    (["--vllm_max_model_len", "8192"], "vLLM is not used"),
    (["--lora_rank", "8"], "a flag of train.py"),
])
def test_bad_flags_are_one_clear_paragraph_and_exit_2(capsys, flags, message):
    assert serve.main(["--model", "tiny", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("error:") and "Traceback" not in err


def test_a_port_in_use_is_a_clear_error_before_the_model_loads(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert serve.main(["--model", "tiny", "--port", str(taken.getsockname()[1])]) == 2
    err = capsys.readouterr().err
    assert "another program listens there" in err and "loading" not in err


def test_a_request_sets_qwen3_8s_reasoning_effort():
    """reasoning_effort (OpenAI's field) or chat_template_kwargs.reasoning_effort (ms-swift's): the instruction
    Qwen3.8's template writes for it opens the prompt; --reasoning_effort is the default of requests without."""
    from types import SimpleNamespace
    from template import EFFORTS
    args = serve.serve_parser().parse_args(["--model", "tiny-qwen3_5", "--template", "qwen3_8", "--reasoning_effort", "low"])
    chat = infer.load_chat(serve.chat_args(args))
    served = serve.Served(None, chat.template)

    def prompt(body):
        ids, _ = serve.Server.prompt(SimpleNamespace(chat=chat), served, QUESTION, None, serve.effort_switch(body))
        return chat.tok.decode(ids)
    assert prompt({}).startswith(f"<|im_start|>system\n{EFFORTS['low']}<|im_end|>")
    assert prompt({"reasoning_effort": "xhigh"}).startswith(f"<|im_start|>system\n{EFFORTS['xhigh']}<|im_end|>")
    assert prompt({"chat_template_kwargs": {"reasoning_effort": "medium"}}).startswith("<|im_start|>user\n")


# ----------------------------------------------------------------------------------------------
# A thinking model's reasoning apart from its answer


def pieces_of(text: serve.AnswerText, ids):
    out = [text.push(t, i == len(ids) - 1) for i, t in enumerate(ids)]
    return ["".join(p.get(part, "") for p in out) for part in ("reasoning_content", "content")]


@pytest.mark.parametrize("template,written", [
    ("qwen3", "<think>\nFirst, the plan.\n</think>\n\nThe answer."),  # the model opens the block itself
    ("qwen3_thinking", "First, the plan.\n</think>\n\nThe answer."),  # the prompt opened it
])
def test_reasoning_streams_apart_from_the_answer(template, written):
    import tiny
    tok = data.Tokenizer(tiny.tiny_model_dir("tiny-qwen3"))
    ids = tok.encode(written) + [tok.im_end_id]
    text = serve.AnswerText(tok, [], TEMPLATES[template])
    assert pieces_of(text, ids) == ["First, the plan.", "The answer."]
    assert text.message() == {"role": "assistant", "content": "The answer.", "reasoning_content": "First, the plan."}
    plain = serve.AnswerText(tok, [], TEMPLATES["qwen3_nothinking"])  # a model that never thinks: all of it is the answer
    assert pieces_of(plain, tok.encode("<think>x</think>y")) == ["", "<think>x</think>y"]


def test_text_that_may_begin_a_stop_string_is_held_back(tiny_dir):
    tok = data.Tokenizer(tiny_dir)
    ids = tok.encode("Hello world, how are you?")
    text = serve.AnswerText(tok, ["how", "you?!"], TEMPLATES["qwen2_5"])  # the longer may begin 4 characters back
    shown = ""
    for t in ids:
        shown += text.push(t, False).get("content", "")
        if text.stopped:
            break
        assert shown == text.text[:max(0, len(text.text) - 4)]
    assert shown == "Hello world, " and text.stopped and text.message()["content"] == shown
