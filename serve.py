"""serve.py: an OpenAI-compatible HTTP server for a Qwen model and its LoRA adapters (ms-swift's `swift deploy`).

A first reading can skip this file: it holds no model code. It puts engine.py (continuous
batching) behind OpenAI's chat API, with the standard library's HTTP server and nothing else:

    python serve.py --adapters robot=output/v0-.../checkpoint-100 poet=output/v1-.../checkpoint-50
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"model": "robot", "messages": [{"role": "user", "content": "Who are you?"}]}'

    GET  /v1/models            the base model and each adapter, OpenAI's list
    POST /v1/chat/completions  an answer, whole or streamed as server-sent events (`data: {...}`)
    GET  /health               200 while serving, with how many answers run and wait

How it runs: ThreadingHTTPServer gives each connection a thread. A handler turns the JSON body into
an engine.Request (the prompt through the chat template, its sampling settings, its adapter) and
adds it to the one Engine; one engine thread steps the engine while anything runs and sleeps
otherwise, so requests that arrive together decode in one batch, each row through its own adapter.
Tokens come back to the handler through a queue of its own; it turns them into text (whole UTF-8
characters, a thinking model's reasoning apart in `reasoning_content`, cut at a stop string) and
writes them. A client that goes away cancels its request, which frees its slot at the next step.

Where ms-swift's `swift deploy` (4.6) differs, or leaves a choice, this file chooses:
- Model ids: the base under ms-swift's name for it (the last part of the hub id or folder:
  Qwen/Qwen2.5-7B-Instruct is Qwen2.5-7B-Instruct; --served_model_name renames it), each
  NAME=PATH adapter as NAME. An adapter given without NAME= is what the base id answers with, as
  in swift deploy, which loads such an adapter into the model itself. --merge_lora true merges
  the one adapter into the weights, and then only its id is served.
- --host is 127.0.0.1 unless given (ms-swift: 0.0.0.0); --port 0 takes any free port (ms-swift
  moves to the next free port by itself; here a port in use is an error).
- --api_key: every route but /health needs `Authorization: Bearer KEY`, else 401 (ms-swift: 400,
  and /v1/models and /ping stay open).
- Errors are OpenAI's body, {"error": {"message", "type", "param", "code"}}, with OpenAI's status
  (400 bad field, 401 key, 404 unknown model or route); ms-swift answers 400 {"message", "object"}.
- A field the request leaves out takes the server's flag, else generation_config.json, as in
  ms-swift; a request without a seed gets a new one. A stop string is cut from the answer, as
  OpenAI does. max_tokens not given: the rest of the slot (--max_model_len), as in ms-swift.
- Ctrl-C or SIGTERM: no new connections, the answers in flight get GRACE_S seconds to finish,
  the rest are cancelled (a second Ctrl-C cancels them at once); exit code 0.

Limits, so that a client that misbehaves costs a bounded thread for a bounded time and the others
go on (tests/test_serve_faults.py sends each fault):
- A request line without its HTTP version, a header line without its colon, a Content-Length that
  is not one number: 400. A request line or a header line over 64 KiB: 414 / 431, more than 100
  headers: 431 (http.server's limits). A body over MAX_BODY: 413, before it is read. Each in
  OpenAI's error body, and the connection closes.
- A client silent for --client_timeout seconds (CLIENT_TIMEOUT_S) while it sends its request, or
  that stops reading its answer, is cut off (mid-body: 408 first); so is an idle keep-alive one.
- At most --max_connections connections at once (MAX_CONNECTIONS): a request on one more is
  answered 503 and the connection closes (it waits at most LINGER_S for that request).
- A connection closes without losing its last answer: what the client still sends (the rest of a
  refused body) is read and dropped for up to LINGER_S seconds, since closing a socket with unread
  data resets it, and the reset can overtake the answer.
"""

import argparse
import errno
import json
import queue
import random
import secrets
import select
import signal
import socket
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import cli
import data
import engine
import flags
import infer
import lora
from cli import UsageError, str2bool
from infer import note
from template import EFFORTS, TEMPLATES, Qwen38Template, Template, TemplateError, split_reasoning, with_trained_thinking

GRACE_S = 5.0  # on Ctrl-C / SIGTERM, how long the answers in flight may go on before they are cancelled
MAX_BODY = 32 * 2**20  # the largest request body read, in bytes
CLIENT_TIMEOUT_S = 60.0  # a client silent this long mid-request, or not reading its answer, is cut off (--client_timeout)
MAX_CONNECTIONS = 512  # connections open at once; beyond them a request is answered 503 (--max_connections)
LINGER_S = 2.0  # at a close, how long what the client still sends is read and dropped, so that it gets the answer
DEFAULT_MAX_MODEL_LEN = 32768  # a slot's positions when --max_model_len is not given (or the context, if shorter)
CHECK_CLIENT_S = 0.5  # how often a handler waiting for tokens looks whether its client is still there

# ----------------------------------------------------------------------------------------------
# Flags: infer.py's (the model, adapters, template, sampling defaults) and `swift deploy`'s

# ms-swift deploy flags accepted without effect, and refused ones (swift_flags.py's table has no
# deploy script yet; these move there once it has).
DEPLOY_IGNORED = {
    "log_interval": "there is no periodic throughput log; --verbose true logs one line a request",
    "log_level": "the server logs to stderr; --verbose false keeps only the start-up and errors",
    "max_logprobs": "log probabilities are not returned",
    "vllm_use_async_engine": "there is no vLLM here; engine.py batches the requests itself",
    "stream": "each request's \"stream\" field decides",
}
DEPLOY_REFUSED = {
    "ssl_keyfile": "serve.py speaks plain HTTP: put a TLS proxy (nginx, caddy) in front of it",
    "ssl_certfile": "serve.py speaks plain HTTP: put a TLS proxy (nginx, caddy) in front of it",
    "result_path": "requests are not written to a file; --verbose true logs one line each to stderr",
}


def serve_parser() -> argparse.ArgumentParser:
    p = cli.FlagParser(description="An OpenAI-compatible server for a Qwen2 / Qwen2.5 / Qwen3 model and its LoRA "
                                   "adapters (flags as in `swift deploy`).")
    model_flags(p)
    cli.quant_flags(p)
    answer_flags(p)
    server_flags(p)
    g = p.add_argument_group("ms-swift's deploy flags that change nothing here")
    for name, why in DEPLOY_IGNORED.items():
        g.add_argument(f"--{name}", default=None, metavar="VALUE", help=f"ignored: {why}")
    for name in DEPLOY_REFUSED:
        p.add_argument(f"--{name}", default=None, help=argparse.SUPPRESS)
    p.add_swift_flags("infer")
    return p


def model_flags(p):
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, help="local folder, hub id or 'tiny' (default: the base the adapters were trained on)")
    g.add_argument("--adapters", nargs="+", default=[], metavar="[NAME=]PATH",
                   help="LoRA checkpoint folders; a request's \"model\": NAME picks one. One without NAME= is what "
                        "the base model's id answers with, as in swift deploy")
    g.add_argument("--served_model_name", default=None, help="the base model's id (default: the last part of its name, as ms-swift)")
    flags.device_flags(g)
    g.add_argument("--infer_backend", default="pt", help="pt (ms-swift 4.x: transformers): PyTorch, the one backend here")
    g.add_argument("--merge_lora", type=str2bool, default=False,
                   help="merge the (single) adapter into the weights at load: the base model's speed, and one id served")
    g.add_argument("--cuda_graph", type=str2bool, default=None, help="decode each batch step as one CUDA graph replay (default: true on a GPU)")
    g.add_argument("--torch_compile", type=str2bool, default=False,
                   help="compile the batch step before recording its graphs (start-up: a minute or two more)")
    g.add_argument("--template", default=None, choices=list(TEMPLATES), help="chat template (default: the adapter's, else the checkpoint's own)")
    g.add_argument("--enable_thinking", type=str2bool, default=None,
                   help="hybrid Qwen3: reason before answering (default: as each adapter was trained, else true)")
    g.add_argument("--reasoning_effort", default=None, choices=list(EFFORTS),
                   help="Qwen3.8: how hard to think, when a request does not say (default: as trained, else xhigh)")
    g.add_argument("--system", default=None, help="system prompt for conversations without one (default: the adapter's training one)")


def answer_flags(p):
    g = p.add_argument_group("answers: defaults for the fields a request leaves out (unset: generation_config.json's, as in ms-swift)")
    g.add_argument("--temperature", type=float, default=None, help="0 = greedy: always the most likely token")
    g.add_argument("--top_p", type=float, default=None, help="sample only from the most likely tokens whose probabilities add up to this")
    g.add_argument("--top_k", type=int, default=None, help="sample only from the k most likely tokens (0 = all)")
    g.add_argument("--repetition_penalty", type=float, default=None, help="> 1 makes tokens already in the text less likely (1 = off)")
    g.add_argument("--max_new_tokens", type=int, default=None, help="longest answer in tokens (default: the rest of --max_model_len)")
    g.add_argument("--seed", type=int, default=42, help="seeds the seeds of requests that give none")


def server_flags(p):
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface; give --api_key then)")
    g.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free one, printed at start)")
    g.add_argument("--api_key", default=None, help="require `Authorization: Bearer API_KEY` on every route but /health")
    g.add_argument("--owned_by", default="swift", help="the owned_by field of /v1/models")
    g.add_argument("--max_batch_size", type=int, default=32, help="answers decoded together at most (fewer where GPU memory cannot hold them)")
    g.add_argument("--max_model_len", type=int, default=None,
                   help=f"prompt + answer positions of each slot (default: the model's context, at most {DEFAULT_MAX_MODEL_LEN:,})")
    g.add_argument("--client_timeout", type=float, default=CLIENT_TIMEOUT_S,
                   help="seconds a client may stay silent while it sends a request, or keep from reading its answer, "
                        "before its connection is closed (also an idle keep-alive connection)")
    g.add_argument("--max_connections", type=int, default=MAX_CONNECTIONS,
                   help="connections open at once; a request on one more is answered 503 and that connection closed")
    g.add_argument("--verbose", type=str2bool, default=True, help="log one line for each request to stderr")


def check_serve_args(args):
    """Reject what cannot work before anything slow; note the flags that change nothing here."""
    for name, why in DEPLOY_REFUSED.items():
        if getattr(args, name) is not None:
            raise UsageError(f"--{name}: {why}.")
    for name, why in DEPLOY_IGNORED.items():
        if getattr(args, name) is not None:
            note(f"note: --{name} {getattr(args, name)} changes nothing here: {why}.")
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port {args.port}: give 1 to 65535 (or 0 for any free port).")
    if args.api_key is not None and not args.api_key.strip():
        raise UsageError("--api_key is empty: give the key clients must send, or leave the flag out.")
    if args.max_batch_size < 1:
        raise UsageError(f"--max_batch_size {args.max_batch_size}: must be 1 or more.")
    if not args.client_timeout > 0:
        raise UsageError(f"--client_timeout {args.client_timeout}: give the seconds a silent client is waited for, more than 0.")
    if args.max_connections < 1:
        raise UsageError(f"--max_connections {args.max_connections}: must be 1 or more.")
    if args.max_model_len is not None and args.max_model_len < 2:
        raise UsageError(f"--max_model_len {args.max_model_len}: a slot needs room for a prompt and an answer; give 2 or more.")
    unnamed = [spec for (_, path), spec in zip(flags.parse_adapters(args.adapters), args.adapters) if path == spec]
    if len(unnamed) > 1:
        raise UsageError(f"--adapters: {len(unnamed)} adapters have no name ({', '.join(unnamed)}); an adapter without "
                         "NAME= is what the base model's id answers with, so name all but one of them: NAME=PATH.")


def chat_args(args) -> argparse.Namespace:
    """The flags infer.load_chat reads: infer.py's defaults, with serve.py's values laid over them."""
    ns = flags.infer_parser().parse_args([])
    for name, value in vars(args).items():
        if hasattr(ns, name) and name not in DEPLOY_IGNORED:
            setattr(ns, name, value)
    ns.prompt, ns.show_thinking = "", False  # not a REPL: nothing is read from stdin
    return ns


# ----------------------------------------------------------------------------------------------
# The model ids served


@dataclass(frozen=True)
class Served:
    """What one model id answers with."""

    adapter: str | None  # a loaded adapter's name; None: the base model
    template: Template  # the chat format, thinking or not as that adapter was trained (a hybrid Qwen3)


def model_id(name: str) -> str:
    """ms-swift's name for a model (swift.model.get_model_name): the repository in a hub cache
    path, else the last part of the hub id or folder."""
    name = name.replace("\\", "/").rstrip("/")
    for cache in ("/models--", "/models/"):  # a Hugging Face or ModelScope snapshot folder
        if cache in name and "/snapshots/" in name:
            return name.split(cache)[-1].split("/snapshots/")[0].split("--", 1)[-1]
    return name.rsplit("/", 1)[-1].replace("___", ".")


def served_models(args, chat: infer.Chat) -> dict[str, Served]:
    """{model id: what it answers with}: the base (or the adapter without a name), then each named adapter.
    A merged adapter (--merge_lora true) is in every answer: only its own id is served."""
    pairs = flags.parse_adapters(args.adapters)
    unnamed = [name for (name, path), spec in zip(pairs, args.adapters) if path == spec]
    base = args.served_model_name or model_id(args.model or lora.checkpoint_args(pairs[0][1])["model"])
    if chat.merged:
        return {base if unnamed else chat.adapter: Served(chat.adapter, chat.template)}
    served = {name: Served(name, chat.template if args.enable_thinking is not None else
                           with_trained_thinking(chat.template, lora.checkpoint_args(path))) for name, path in pairs}
    models = {base: served[unnamed[0]] if unnamed else Served(None, chat.template)}
    for name in served.keys() - set(unnamed):
        if name == base:
            raise UsageError(f"--adapters {name}=...: {name!r} is the base model's id here; give the adapter another "
                             "name, or the base another id with --served_model_name.")
    return models | {name: s for name, s in served.items() if name not in unnamed}


def slot_length(args, chat: infer.Chat) -> int:
    """--max_model_len, checked against the model's context; by default the context, at most DEFAULT_MAX_MODEL_LEN."""
    if args.max_model_len is None:
        return min(chat.context, DEFAULT_MAX_MODEL_LEN)
    if args.max_model_len > chat.context:
        raise UsageError(f"--max_model_len {args.max_model_len} is more than the model's context of {chat.context} "
                         "tokens (max_position_embeddings; RoPE scaling is not done here): give at most that.")
    return args.max_model_len


# ----------------------------------------------------------------------------------------------
# One answer: tokens in, text out


class AnswerText:
    """The text of one answer as its tokens arrive: whole UTF-8 characters only (infer.StreamDecoder),
    a thinking model's reasoning apart from its answer (read as template.split_reasoning reads a
    whole message), and cut at the first stop string. Text that may still turn out to be the start
    of a stop string, or the newlines a template writes around the reasoning, is held back until
    the next token shows what it is; so the pieces handed out join to exactly the final text."""

    def __init__(self, tok: data.Tokenizer, stops: list[str], template: Template):
        self.utf8 = infer.StreamDecoder(tok)
        self.stops = [s for s in stops if s]
        self.hold = max(map(len, self.stops), default=1) - 1  # a stop string may have begun this far back
        self.thinks = template.thinks != "never"
        self.opened = template.generation_prompt() == "<think>\n"  # Thinking-2507's prompt opens the block
        self.text = ""  # everything decoded so far, cut at a stop string
        self.sent = {"reasoning_content": "", "content": ""}  # handed out so far
        self.stopped = False  # a stop string ended the answer

    def push(self, token: int, last: bool) -> dict:
        """Take one token (last: no more follow); the new text of each part, {"content": ...} and/or
        {"reasoning_content": ...}, empty when nothing can be shown yet."""
        start = max(0, len(self.text) - self.hold)
        self.text += self.utf8.push(token) + (self.utf8.flush() if last else "")
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            self.text, self.stopped, last = self.text[:min(hits)], True, True
        shown = self.text if last else self.text[:len(self.text) - self.hold]
        reasoning, answer = self.split(shown, last)
        new = {}
        for part, text in (("reasoning_content", reasoning), ("content", answer)):
            if len(text) > len(self.sent[part]) and text.startswith(self.sent[part]):
                new[part], self.sent[part] = text[len(self.sent[part]):], text
        return new

    def split(self, text: str, last: bool) -> tuple[str, str]:
        """(reasoning, answer) of the text so far."""
        if not self.reasons(text):
            return "", text if (last or not self.thinks or text.strip()) else ""  # a think block may still open
        if "</think>" in text:
            return split_reasoning({"content": text})
        return text.split("<think>")[-1].strip("\n"), ""  # its last newlines may be the template's, before </think>

    def reasons(self, text: str | None = None) -> bool:
        """Whether the answer begins with reasoning (a think block)."""
        text = self.text if text is None else text
        return self.thinks and (self.opened or text.lstrip().startswith("<think>"))

    def message(self) -> dict:
        """The whole answer as OpenAI's assistant message."""
        reasoning = {"reasoning_content": self.sent["reasoning_content"]} if self.reasons() else {}
        return {"role": "assistant", "content": self.sent["content"], **reasoning}


@dataclass(eq=False)
class Job:
    """One chat completion in flight: the engine's request and what its handler needs to answer."""

    model: str  # the id asked for
    request: engine.Request
    text: AnswerText
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the token counts
    events: queue.Queue = field(default_factory=queue.Queue)  # (token, finished) from the engine thread, or an APIError
    tokens: int = 0  # the answer's tokens so far
    finish_reason: str | None = None  # "stop" or "length" once it ended; None: still running, or cancelled
    outcome: str = "cancelled: the client went away"  # for the log line, when it did not finish
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))
    started: float = field(default_factory=time.monotonic)

    def usage(self) -> dict:
        prompt = len(self.request.prompt)
        return {"prompt_tokens": prompt, "completion_tokens": self.tokens, "total_tokens": prompt + self.tokens}

    def chunk(self, delta: dict, finish_reason: str | None = None) -> dict:
        """One server-sent event of a streamed answer."""
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}

    def completion(self) -> dict:
        """The whole answer, for a request that did not stream."""
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": self.text.message(), "finish_reason": self.finish_reason,
                             "logprobs": None}],
                "usage": self.usage()}


# ----------------------------------------------------------------------------------------------
# Reading a request: OpenAI's fields, each checked, into a Job


class APIError(Exception):
    """A request the server does not answer: its HTTP status and OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except ValueError as e:  # not JSON, or not UTF-8
        raise APIError(400, f"The body is not valid JSON ({e}); send one JSON object.") from None
    if not isinstance(body, dict):
        raise APIError(400, f"The body must be a JSON object, got {type(body).__name__}.")
    return body


def request_path(target: str) -> str:
    """The route a request line's target names: /v1/models of /v1/models/?x=1 or http://host/v1/models."""
    try:
        return urlsplit(target).path.rstrip("/")
    except ValueError as e:  # http://[ : not a URL
        raise APIError(400, f"Invalid path {target[:100]!r} ({e}).") from None


def range_text(low, high, above: bool, integer: bool) -> str:
    """What number() takes, in words: "a number at least 0 and at most 2"."""
    bounds = [f"{'more than' if above else 'at least'} {low}"] if low is not None else []
    bounds += [f"at most {high}"] if high is not None else []
    return " ".join(["an integer" if integer else "a number", " and ".join(bounds)]).strip()


def number(body: dict, name: str, low=None, high=None, integer=False, above=False):
    """body[name], checked: None when absent or null; a 400 error when not a number in range."""
    value = body.get(name)
    if value is None:
        return None
    wrong_type = isinstance(value, bool) or not isinstance(value, int if integer else (int, float)) or value != value
    out_of_range = not wrong_type and ((low is not None and (value <= low if above else value < low))
                                       or (high is not None and value > high))
    if wrong_type or out_of_range:
        raise APIError(400, f"Invalid '{name}': expected {range_text(low, high, above, integer)}, got {json.dumps(value)}.",
                       param=name, code="invalid_type" if wrong_type else "invalid_value")
    return value


def refuse_unsupported(body: dict):
    """OpenAI fields that ask for what this server does not do: a 400 that says so, never a silent default."""
    if body.get("n", 1) != 1:
        raise APIError(400, "Invalid 'n': one answer a request here; send several requests (they decode together).", param="n")
    if body.get("tools") or body.get("functions"):
        raise APIError(400, "Function calling is not supported by this server; send the conversation without tools.",
                       param="tools")
    if body.get("logprobs") or body.get("top_logprobs"):
        raise APIError(400, "Log probabilities are not returned by this server; leave out logprobs.", param="logprobs")
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name) not in (None, 0):
            raise APIError(400, f"'{name}' is not supported here; repetition_penalty is (> 1 makes repeated tokens "
                                "less likely).", param=name)
    if body.get("response_format") not in (None, {"type": "text"}):
        raise APIError(400, "Only text answers here: response_format {\"type\": \"text\"}.", param="response_format")


def chat_messages(body: dict) -> list[dict]:
    """OpenAI's messages as the templates read them: {"role", "content"} with text content (a list of
    text parts is joined), an assistant turn's reasoning_content kept; "developer" is the system role."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "Missing required parameter: 'messages' (a list of {\"role\", \"content\"} objects).",
                       param="messages", code="missing_required_parameter")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        role = m.get("role") if isinstance(m, dict) else None
        role = "system" if role == "developer" else role
        if role not in ("system", "user", "assistant"):
            raise APIError(400, f"Invalid '{where}.role': {json.dumps(role)}; system, user and assistant messages are "
                                "understood here (no tool messages).", param=f"{where}.role")
        content = m.get("content")
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and
                                             isinstance(p.get("text"), str) for p in content):
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str) or data.LONE_SURROGATE.search(content):
            raise APIError(400, f"Invalid '{where}.content': give text, a string or a list of {{\"type\": \"text\", "
                                "\"text\": ...}} parts (these models read no images or audio).", param=f"{where}.content")
        message = {"role": role, "content": content}
        if role == "assistant" and isinstance(m.get("reasoning_content"), str):
            message["reasoning_content"] = m["reasoning_content"]
        out.append(message)
    return out


def stop_strings(body: dict) -> list[str]:
    stop = body.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise APIError(400, "Invalid 'stop': give a string or a list of strings.", param="stop")
    return stops


def template_kwargs(body: dict) -> dict:
    """chat_template_kwargs (vLLM's and ms-swift's field): an object, or {} where it is not given."""
    kwargs = body.get("chat_template_kwargs")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise APIError(400, "Invalid 'chat_template_kwargs': give an object, such as {\"enable_thinking\": false}.",
                       param="chat_template_kwargs")
    return kwargs or {}


def thinking_switch(body: dict) -> bool | None:
    """chat_template_kwargs.enable_thinking (vLLM's and ms-swift's field), for a hybrid Qwen3."""
    value = template_kwargs(body).get("enable_thinking")
    if value is not None and not isinstance(value, bool):
        raise APIError(400, "Invalid 'chat_template_kwargs.enable_thinking': give true or false.", param="chat_template_kwargs")
    return value


def effort_switch(body: dict) -> str | None:
    """reasoning_effort (OpenAI's field, which vLLM hands to the template) or
    chat_template_kwargs.reasoning_effort (ms-swift's), for Qwen3.8: xhigh, medium or low."""
    kwargs = template_kwargs(body)
    param = "chat_template_kwargs" if kwargs.get("reasoning_effort") is not None else "reasoning_effort"
    value = kwargs.get("reasoning_effort") if param == "chat_template_kwargs" else body.get("reasoning_effort")
    if value is not None and not (isinstance(value, str) and value in EFFORTS):
        raise APIError(400, f"Invalid '{param}': {json.dumps(value)} is not a reasoning effort; Qwen3.8's template "
                            "takes xhigh (its default), medium or low.", param=param)
    return value


def sampling_fields(body: dict, defaults: dict, seeds: random.Random) -> dict:
    """engine.Request's temperature, top_p, top_k, repetition_penalty and seed: the request's, else the server's."""
    given = {"temperature": number(body, "temperature", 0, 2),
             "top_p": number(body, "top_p", 0, 1, above=True),
             "top_k": number(body, "top_k", -1, integer=True),
             "repetition_penalty": number(body, "repetition_penalty", 0, above=True)}
    sampling = dict(defaults, **{k: v for k, v in given.items() if v is not None})
    sampling["top_k"] = max(sampling["top_k"], 0)  # -1 is off too (vLLM's and ms-swift's spelling)
    seed = number(body, "seed", integer=True)
    sampling["seed"] = seeds.randrange(2**63) if seed is None else seed % 2**63
    return sampling


def max_tokens(body: dict, default: int | None, room: int) -> int:
    """max_completion_tokens (OpenAI's newer name) or max_tokens, else the server's; never past the slot."""
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    limit = number(body, name, 1, integer=True)
    return min(room, limit or default or room)


# ----------------------------------------------------------------------------------------------
# What the handler threads share: the model, the ids served, the engine and its thread


class Server:
    """The loaded chat, the ids served, the engine with the one thread that steps it, and the
    answers in flight. Handlers call new_job / submit / finish; the signal handler stop / drain."""

    def __init__(self, chat: infer.Chat, models: dict[str, Served], eng: engine.Engine, args):
        self.chat, self.models, self.engine = chat, models, eng
        self.api_key, self.owned_by, self.verbose = args.api_key, args.owned_by, args.verbose
        self.default_max_tokens = args.max_new_tokens
        self.seeds = random.Random(args.seed)
        self.created = int(time.time())
        self.jobs: set[Job] = set()
        self.lock = threading.Lock()  # guards jobs and stopping
        self.stopping = False
        self.wake = threading.Condition()  # the engine thread sleeps on it while the engine is idle
        self.closed = False
        self.thread = threading.Thread(target=self.run_engine, name="engine", daemon=True)
        self.thread.start()

    def run_engine(self):
        """The one thread that calls engine.step(): while anything waits or runs, else asleep."""
        while True:
            with self.wake:
                self.wake.wait_for(lambda: self.closed or not self.engine.idle())
                if self.closed:
                    return
            try:
                self.engine.step()
            except Exception as e:  # noqa: BLE001 (a failed step must not leave every client waiting)
                traceback.print_exc()
                for job in self.in_flight():
                    self.cancel(job, APIError(500, f"decoding failed: {type(e).__name__}: {e}", kind="server_error"))

    def check_key(self, header: str | None):
        if self.api_key is None:
            return
        header = header or ""
        given = header[len("Bearer "):].strip() if header.startswith("Bearer ") else ""
        if not secrets.compare_digest(given.encode(), self.api_key.encode()):
            raise APIError(401, "Incorrect or missing API key: send the header `Authorization: Bearer KEY` with the "
                                "server's --api_key.", code="invalid_api_key")

    def model_list(self) -> dict:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": self.created,
                                            "owned_by": self.owned_by} for name in self.models]}

    def health(self) -> dict:
        running = sum(seq is not None for seq in self.engine.running)
        return {"status": "stopping" if self.stopping else "ok", "running": running, "waiting": len(self.engine.waiting)}

    def new_job(self, body: dict) -> Job:
        """The request's fields, each checked, as a Job whose engine.Request is ready to add."""
        name = body.get("model")
        if not isinstance(name, str) or not name:
            raise APIError(400, f"Missing required parameter: 'model' (one of {', '.join(self.models)}).", param="model",
                           code="missing_required_parameter")
        if name not in self.models:
            raise APIError(404, f"The model `{name}` does not exist here; this server has {', '.join(self.models)}.",
                           param="model", code="model_not_found")
        refuse_unsupported(body)
        prompt, template = self.prompt(self.models[name], chat_messages(body), thinking_switch(body), effort_switch(body))
        room = self.engine.max_len - len(prompt)
        if room < 1:
            raise APIError(400, f"This model's maximum context length is {self.engine.max_len} tokens (--max_model_len); "
                                f"your messages are {len(prompt)} tokens, with no room left for an answer. Shorten them.",
                           param="messages", code="context_length_exceeded")
        request = engine.Request(prompt, max_tokens(body, self.default_max_tokens, room), frozenset(self.chat.stop_ids),
                                 adapter=self.models[name].adapter,
                                 **sampling_fields(body, self.chat.sampling, self.seeds))
        stream = False if body.get("stream") is None else body["stream"]
        if not isinstance(stream, bool):
            raise APIError(400, f"Invalid 'stream': expected true or false, got {json.dumps(stream)}.", param="stream")
        options = body.get("stream_options") if isinstance(body.get("stream_options"), dict) else {}
        job = Job(name, request, AnswerText(self.chat.tok, stop_strings(body), template), stream=stream,
                  include_usage=stream and options.get("include_usage") is True)
        request.on_token = lambda token, finished: job.events.put((token, finished))  # on the engine thread
        return job

    def prompt(self, served: Served, messages: list[dict], thinking: bool | None,
               effort: str | None = None) -> tuple[list[int], Template]:
        """The prompt's token ids as infer.Chat renders them (that adapter's system prompt and thinking)."""
        chat = replace(self.chat, adapter=served.adapter, template=served.template)
        if effort is not None and not isinstance(chat.template, Qwen38Template):
            raise APIError(400, f"Invalid 'reasoning_effort': the {chat.template.name} template has no reasoning effort "
                                "(Qwen3.8's, qwen3_8, has); leave it out.", param="reasoning_effort")
        if effort is not None:
            chat.template = replace(chat.template, reasoning_effort=effort)
        try:
            if thinking is not None:
                chat.set_thinking(thinking)
            return chat.prompt_ids(messages), chat.template
        except TemplateError as e:
            raise APIError(400, f"Invalid 'chat_template_kwargs.enable_thinking': {e}", param="chat_template_kwargs") from None

    def submit(self, job: Job):
        with self.lock:
            if self.stopping:
                raise APIError(503, "The server is shutting down.", kind="server_error")
            with self.wake:
                self.engine.add(job.request)
                self.wake.notify()
            self.jobs.add(job)

    def cancel(self, job: Job, error: "APIError | None" = None):
        """Stop a job: its slot is freed at the next step; its handler gets `error` if given."""
        job.request.cancelled = True
        if error is not None:
            job.events.put(error)

    def finish(self, job: Job):
        """A handler is done with its job: cancel what still runs (cut at a stop string, or the client
        went away), log a line."""
        with self.lock:
            self.jobs.discard(job)
        if not job.request.done:
            self.cancel(job)
        if self.verbose:
            note(f"{job.model}: {len(job.request.prompt)} prompt + {job.tokens} answer tokens, "
                 f"{job.finish_reason or job.outcome}, {time.monotonic() - job.started:.2f}s")

    def in_flight(self) -> list[Job]:
        with self.lock:
            return list(self.jobs)

    def drain(self, grace: float, now: threading.Event):
        """Let the answers in flight finish for up to `grace` seconds (or until `now` is set), cancel
        the rest, give their handlers a moment to write the end, and stop the engine thread."""
        with self.lock:
            self.stopping = True
        deadline = time.monotonic() + grace
        while self.in_flight() and time.monotonic() < deadline and not now.is_set():
            time.sleep(0.02)
        for job in self.in_flight():
            self.cancel(job, APIError(503, "The server is shutting down; this answer was cut off.", kind="server_error"))
        deadline = time.monotonic() + 1.0
        while self.in_flight() and time.monotonic() < deadline:
            time.sleep(0.02)
        with self.wake:
            self.closed = True
            self.wake.notify()


# ----------------------------------------------------------------------------------------------
# HTTP: one handler thread per connection


class ClientGone(Exception):
    """The client closed its connection while its answer was being made."""


class Handler(BaseHTTPRequestHandler):
    """The requests of one connection (HTTP/1.1 keep-alive; a streamed answer closes it at its end)."""

    protocol_version = "HTTP/1.1"
    status = None  # the status sent, for the log line
    refused = False  # the connection is one over --max_connections: each request on it is answered 503

    def setup(self):
        self.timeout = self.server.client_timeout  # StreamRequestHandler.setup gives the socket this timeout
        super().setup()
        self.refused = not self.server.admit()
        if self.refused:  # waited for briefly: a flood of connections holds threads for seconds, not minutes
            self.connection.settimeout(min(self.timeout, LINGER_S))

    def finish(self):
        if not self.refused:
            self.server.release()
        super().finish()

    def parse_request(self) -> bool:
        """http.server's reading of the request line and headers, made strict: a line without an HTTP
        version (HTTP/0.9 has no headers, so nothing says where the request ends) and a header line
        that is not NAME: VALUE (http.client would drop the headers after it) are refused."""
        if len(self.raw_requestline.split()) == 2:
            self.command, self.requestline = None, str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
            self.send_error(400, f"No HTTP version in the request line {self.requestline!r}: send METHOD PATH HTTP/1.1")
            return False
        if not super().parse_request():
            return False
        if self.headers.defects:
            self.send_error(400, "A header line is not NAME: VALUE (no colon, or a space before it)")
            return False
        return True

    def do_GET(self):
        self.route()

    def do_POST(self):
        self.route()

    def route(self):
        self.status = None  # a new request on this connection
        try:
            self.answer()
        except APIError as e:
            self.send_api_error(e)
        except (ClientGone, OSError):  # a write failed or the peer closed: nothing more to say to it
            self.close_connection = True
        except Exception as e:  # noqa: BLE001 (a bug answers 500 and the server goes on)
            traceback.print_exc()
            self.close_connection = True
            self.send_api_error(APIError(500, f"{type(e).__name__}: {e}", kind="server_error"))

    def answer(self):
        """Read the request's body, then answer it by its route (an APIError: the error to answer)."""
        app = self.server.app
        if self.refused:
            self.close_connection = True  # its body, if any, is left unread
            raise APIError(503, f"The server has {self.server.max_connections} connections open, its most "
                                "(--max_connections): retry in a moment.", kind="server_error", code="too_many_connections")
        body, path = self.read_body(), request_path(self.path)
        if path == "/health" and self.command == "GET":
            return self.send_json(200, app.health())
        app.check_key(self.headers.get("Authorization"))
        if app.stopping:
            raise APIError(503, "The server is shutting down.", kind="server_error")
        if (self.command, path) == ("GET", "/v1/models"):
            return self.send_json(200, app.model_list())
        if (self.command, path) == ("POST", "/v1/chat/completions"):
            return self.chat_completion(parse_json(body))
        known = path in ("/health", "/v1/models", "/v1/chat/completions")
        raise APIError(405 if known else 404, f"No route {self.command} {path or '/'}: this server has GET "
                       "/v1/models, POST /v1/chat/completions and GET /health.",
                       code="method_not_allowed" if known else "unknown_url")

    def send_api_error(self, e: APIError):
        """The error in OpenAI's body; once an answer has begun, or the client is gone, the connection just closes."""
        if self.status is not None:
            self.close_connection = True
            return
        try:
            self.send_json(e.status, e.body())
        except OSError:
            self.close_connection = True

    def read_body(self) -> bytes:
        """The body, as long as its Content-Length says. One that cannot be read whole (too long, cut
        short, too slow to come) is an APIError, and the connection closes: where the next request
        would begin is not known."""
        length = self.body_length()
        try:
            body = self.rfile.read(length)
        except TimeoutError:
            self.close_connection = True
            raise APIError(408, f"The body stopped coming: nothing for {self.server.client_timeout:g} s "
                                "(--client_timeout). Send it whole, at once.", code="request_timeout") from None
        if len(body) < length:
            self.close_connection = True
            raise APIError(400, f"The body ended after {len(body)} of the {length} bytes its Content-Length gives.")
        return body

    def body_length(self) -> int:
        """Content-Length: one header, digits only; at most MAX_BODY (checked before a byte is read)."""
        lengths = self.headers.get_all("Content-Length") or ["0"]
        given = lengths[0].strip()
        if len(set(lengths)) > 1 or not (given.isascii() and given.isdigit()) or "Transfer-Encoding" in self.headers:
            self.close_connection = True
            raise APIError(400, f"Send the body with one Content-Length header, its size in bytes (given: "
                                f"{', '.join(lengths)[:40]}; chunked transfer encoding is not read here).")
        if len(given) > len(str(MAX_BODY)) or int(given) > MAX_BODY:  # (a 5,000-digit number is not parsed)
            self.close_connection = True
            raise APIError(413, f"The body is longer than {MAX_BODY:,} bytes, the most this server reads.",
                           code="request_too_large")
        return int(given)

    def chat_completion(self, body: dict):
        app = self.server.app
        job = app.new_job(body)
        app.submit(job)  # from here on the engine thread answers it
        try:
            if job.stream:
                self.stream(job)
            else:
                for _ in self.answer_pieces(job):
                    pass
                self.send_json(200, job.completion())
        finally:
            app.finish(job)

    def answer_pieces(self, job: Job):
        """Yield the new text of each part ({"content": ...}, {"reasoning_content": ...}) as tokens
        arrive, until the answer ends; ClientGone when the client leaves, the APIError of a cancel."""
        checked = time.monotonic()
        while job.finish_reason is None:
            try:
                event = job.events.get(timeout=CHECK_CLIENT_S)
            except queue.Empty:
                event = None
            if time.monotonic() - checked > CHECK_CLIENT_S:
                checked = time.monotonic()
                if self.client_gone():
                    job.outcome = "cancelled: the client went away"
                    raise ClientGone()
            if isinstance(event, APIError):
                job.outcome = f"cancelled: {event}"
                raise event
            if event is None:
                continue
            token, finished = event
            job.tokens += 1
            new = job.text.push(token, finished)
            if job.text.stopped or finished:
                job.finish_reason = "stop" if job.text.stopped or token in job.request.stop_ids else "length"
            if new:
                yield new

    def client_gone(self) -> bool:
        """Whether the client closed its connection: readable, and a peek reads nothing."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def stream(self, job: Job):
        """Server-sent events: the role, each new piece of text, the finish reason, [DONE]."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        try:
            self.send_event(job.chunk({"role": "assistant", "content": ""}))
            for piece in self.answer_pieces(job):
                self.send_event(job.chunk(piece))
            self.send_event(job.chunk({}, job.finish_reason))
            if job.include_usage:
                self.send_event({**job.chunk({}), "choices": [], "usage": job.usage()})
        except APIError as e:  # cancelled by the server (shutting down, a failed step): say why in the stream
            self.send_event(e.body())
        self.wfile.write(b"data: [DONE]\n\n")

    def send_event(self, payload: dict):
        self.wfile.write(b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n")

    def send_json(self, status: int, payload: dict):
        content = json.dumps(payload, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(content)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(content)

    def send_response(self, code, message=None):
        self.status = code
        super().send_response(code, message)

    def send_error(self, code, message=None, explain=None):
        """http.server's own refusals (a malformed request line, too long a line, too many headers, an
        unknown method) in OpenAI's error body, as every error here; the connection then closes."""
        message = message or self.responses.get(code, ("Bad request",))[0]
        self.log_error("code %d, message %s", code, message)
        self.request_version = "HTTP/1.1"  # a status line and headers even for a request line without a version
        self.close_connection = True
        self.send_json(code, APIError(code, f"{message}.").body())

    def log_request(self, code="-", size="-"):
        if not getattr(self, "command", None):  # a malformed request line: send_error logged it
            return
        app = self.server.app
        if (app.verbose and self.command != "POST") or code not in (200, "-"):  # a completion logs its own line
            note(f"{self.command} {self.path} {code}")

    def log_message(self, format, *args):  # http.server's own messages (a malformed request line)
        note(f"{self.address_string()}: {format % args}")


# ----------------------------------------------------------------------------------------------
# Start, serve, stop


class HTTPServer(ThreadingHTTPServer):
    """http.server's server, a thread a connection, with what many clients need: a deep accept queue,
    a cap on the connections open at once, and closes that do not lose the last answer."""

    # The kernel's queue of connections not yet accepted: socketserver's 5 resets the rest of a burst
    # of clients that connect at once (32 streaming clients did); accepting takes no time, so be generous.
    request_queue_size = 1024
    client_timeout = CLIENT_TIMEOUT_S  # each connection's socket timeout (main sets the flags' values)
    max_connections = MAX_CONNECTIONS

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.connections, self.connections_lock = 0, threading.Lock()  # open and admitted

    def admit(self) -> bool:
        """Count one more connection open; False when max_connections are already (then refuse it)."""
        with self.connections_lock:
            if self.connections >= self.max_connections:
                return False
            self.connections += 1
            return True

    def release(self):
        with self.connections_lock:
            self.connections -= 1

    def shutdown_request(self, request):
        """Close a connection without losing its last answer: tell the client the answer is whole (FIN),
        then read and drop what it still sends until it closes too, for up to LINGER_S. Closing a socket
        with unread data resets the connection, and a client still sending a body refused unread (413,
        503) would meet the reset, not the answer."""
        try:
            request.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + LINGER_S
            while select.select([request], [], [], max(0.0, deadline - time.monotonic()))[0]:
                if not request.recv(65536) or time.monotonic() > deadline:
                    break
        except OSError:  # the client reset the connection, or is gone
            pass
        self.close_request(request)

    def handle_error(self, request, client_address):
        """An exception no handler answered: a client that went away mid-write is worth no traceback."""
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


def listen(host: str, port: int) -> ThreadingHTTPServer:
    """Bind the port before the (slow) model loads, so that a port in use fails at once."""
    try:
        httpd = HTTPServer((host, port), Handler)
    except OSError as e:
        why = ("another program listens there: pass --port N, or --port 0 for any free port" if e.errno == errno.EADDRINUSE
               else "check --host (an address of this machine: 127.0.0.1, 0.0.0.0)")
        raise UsageError(f"cannot listen on {host}:{port} ({e.strerror or e}): {why}.") from None
    return httpd  # its handler threads are daemons: one still writing does not keep the process alive at exit


def announce(server: Server, host: str, port: int):
    """The start-up line: the URL, the ids served, and a request to paste."""
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}/v1"
    example = next(iter(name for name, s in server.models.items() if s.adapter), next(iter(server.models)))
    body = json.dumps({"model": example, "messages": [{"role": "user", "content": "Who are you?"}]})
    key = " -H \"Authorization: Bearer $API_KEY\"" if server.api_key else ""
    note(f"serving {', '.join(server.models)} at {url} (OpenAI's API; Ctrl-C stops); for example:\n"
         f"  curl {url}/chat/completions -H 'Content-Type: application/json'{key} -d '{body}'")
    if server.api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        note(f"warning: listening on {host} without --api_key: anyone who can reach port {port} can use this model.")


def serve(httpd: ThreadingHTTPServer, server: Server) -> int:
    """Serve until Ctrl-C or SIGTERM; then stop accepting, let the answers in flight finish, exit 0."""
    stop, now = threading.Event(), threading.Event()

    def on_signal(signum, frame):
        (now if stop.is_set() else stop).set()  # a second Ctrl-C: cancel the answers in flight at once

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    threading.Thread(target=httpd.serve_forever, args=(0.1,), name="http", daemon=True).start()
    while not stop.wait(0.5):
        pass
    answering = len(server.in_flight())
    httpd.shutdown()  # no new connections; the handlers of open ones go on
    httpd.server_close()
    note(f"stopping: {answering} answer(s) in flight get up to {GRACE_S:g}s to finish (Ctrl-C again: cancel them now)"
         if answering else "stopping")
    server.drain(GRACE_S, now)
    return 0


def main(argv=None) -> int:
    def serve_until_stopped():
        args = serve_parser().parse_args(argv)
        check_serve_args(args)
        httpd = listen(args.host, args.port)
        httpd.client_timeout, httpd.max_connections = args.client_timeout, args.max_connections
        try:
            chat = infer.load_chat(chat_args(args))
            batches = engine.Engine(chat.model, args.max_batch_size, slot_length(args, chat), args.cuda_graph,
                                    compile=chat.decoding.compile)
            batches.warm_up()  # on a GPU: every batch size's decode step recorded before the first client
            server = Server(chat, served_models(args, chat), batches, args)
            httpd.app = server
            announce(server, args.host, httpd.server_address[1])
            return serve(httpd, server)
        finally:
            httpd.server_close()

    return cli.run_main(serve_until_stopped)


if __name__ == "__main__":
    sys.exit(main())
