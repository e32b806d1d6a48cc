"""serve.py against clients that misbehave: malformed request lines and headers, bodies too big, cut
short or too slow, clients that vanish mid-body or mid-answer, more connections than it takes. Each
gets an answer it can read (OpenAI's error body) or a closed connection, never a traceback, a hang or
a reset; and after each the server still answers /health and a real completion (an autouse fixture).
A client that leaves mid-stream by closing politely is tests/test_serve.py's."""

import http.client
import json
import re
import socket
import struct
import threading
import time

import pytest

import serve
from conftest import ServerProcess

QUESTION = [{"role": "user", "content": "Who are you?"}]
CAP = 16  # --max_connections of the server here
TIMEOUT_S = 1  # its --client_timeout: short, so that a stalled client is cut off quickly


@pytest.fixture(scope="module")
def server():
    s = ServerProcess("--model", "tiny", "--max_model_len", "512", "--max_batch_size", "4", "--device", "cpu",
                      "--client_timeout", TIMEOUT_S, "--max_connections", CAP)
    yield s
    s.proc.kill()  # (a stop by signal is tests/test_serve.py's)
    s.proc.wait(timeout=30)


@pytest.fixture(autouse=True)
def afterwards_it_still_serves(server):
    """After each case: the slots empty again, /health and a completion answered, no traceback logged."""
    start = len(server.lines)
    yield
    wait_until_idle(server)
    status, reply = server.request("POST", "/v1/chat/completions", {"model": "tiny", "messages": QUESTION, "max_tokens": 2})
    assert status == 200 and reply["usage"]["completion_tokens"] == 2
    logged = "".join(server.lines[start:])
    assert "Traceback" not in logged and "Exception occurred" not in logged, logged


def wait_until_idle(server, timeout=10):
    deadline = time.monotonic() + timeout
    while (health := server.request("GET", "/health")) != (200, {"status": "ok", "running": 0, "waiting": 0}):
        assert time.monotonic() < deadline, f"the engine still holds answers: {health}"
        time.sleep(0.02)


def connect(server, timeout=10) -> socket.socket:
    return socket.create_connection((server.host, int(server.port)), timeout=timeout)


def read_to_end(sock) -> bytes:
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def exchange(server, data: bytes) -> bytes:
    """Send raw bytes on a new connection; all the server writes back, up to its close."""
    with connect(server) as sock:
        sock.sendall(data)
        return read_to_end(sock)


def error_of(response: bytes, status: int) -> dict:
    """The OpenAI error of a raw HTTP response, checked to have this status and to close the connection."""
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status} ".encode()), response[:300]
    assert b"\r\nConnection: close" in head and b"\r\nContent-Type: application/json" in head
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def reset(sock):
    """Close abruptly: an RST, as a client that crashes or loses its network does."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def post(body: bytes, length: int | str | None = None, headers: str = "") -> bytes:
    length = len(body) if length is None else length
    return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{headers}"
            f"Content-Length: {length}\r\n\r\n").encode() + body


# ----------------------------------------------------------------------------------------------
# Malformed requests: an error a client can read, at once, then the connection closes


MALFORMED = {
    "garbage bytes (a TLS hello)": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\xa7\r\n\r\n", 400),
    "no HTTP version, no blank line": (b"GET /health\r\n", 400),  # HTTP/0.9: nothing says where it ends
    "a request line over 64 KiB": (b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n", 414),
    "HTTP/2": (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505),
    "an unknown method": (b"PUT /health HTTP/1.1\r\n\r\n", 501),
    "not a URL": (b"GET http://[ HTTP/1.1\r\nConnection: close\r\n\r\n", 400),  # (its connection could go on)
    "a header line without a colon": (b"GET /health HTTP/1.1\r\nHost: x\r\nnot a header\r\nX: y\r\n\r\n", 400),
    "a space before the colon": (b"GET /health HTTP/1.1\r\nContent-Length : 5\r\n\r\n", 400),
    "a header line over 64 KiB": (b"GET /health HTTP/1.1\r\nX: " + b"a" * 70_000 + b"\r\n\r\n", 431),
    "101 headers": (b"GET /health HTTP/1.1\r\n" + b"".join(b"X%d: y\r\n" % i for i in range(101)) + b"\r\n", 431),
    "Content-Length not a number": (b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 0_2\r\n\r\n{}", 400),
    "two Content-Lengths": (post(b"{}", headers="Content-Length: 40\r\n"), 400),
    "a chunked body": (post(b"2\r\n{}\r\n0\r\n\r\n", headers="Transfer-Encoding: chunked\r\n"), 400),
}


@pytest.mark.parametrize("request_bytes,status", MALFORMED.values(), ids=MALFORMED.keys())
def test_a_malformed_request_gets_an_openai_error_and_the_connection_closes(server, request_bytes, status):
    error = error_of(exchange(server, request_bytes), status)
    assert error["type"] == "invalid_request_error"


# ----------------------------------------------------------------------------------------------
# Bodies: too big, too slow, cut short


def test_a_body_over_max_body_gets_413_before_it_is_read(server):
    with connect(server) as sock:  # a body of a terabyte announced; a megabyte of it sent, then the answer read
        sock.sendall(post(b"x" * 2**20, length=10**12))
        assert error_of(read_to_end(sock), 413)["code"] == "request_too_large"
    error_of(exchange(server, post(b"{}", length="9" * 5000)), 413)  # too many digits to be a number
    # A client that sends all of its body before it reads (http.client) gets the 413, not a reset.
    conn = http.client.HTTPConnection(server.host, int(server.port), timeout=30)
    conn.request("POST", "/v1/chat/completions", b" " * (serve.MAX_BODY + 1), {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 413 and json.loads(response.read())["error"]["code"] == "request_too_large"
    conn.close()


def test_a_client_that_stalls_is_cut_off_and_the_others_are_served_meanwhile(server):
    mid_body, mid_headers, idle = connect(server), connect(server), connect(server)
    mid_body.sendall(post(b'{"model": "tiny"', length=100))  # 84 bytes of the body missing
    mid_headers.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")  # no blank line
    status, reply = server.request("POST", "/v1/chat/completions", {"model": "tiny", "messages": QUESTION, "max_tokens": 3})
    assert status == 200 and reply["usage"]["completion_tokens"] == 3  # while all three hold their connections
    with mid_body, mid_headers, idle:
        assert error_of(read_to_end(mid_body), 408)["code"] == "request_timeout"
        assert read_to_end(mid_headers) == b"" and read_to_end(idle) == b""  # closed after the timeout


def test_a_body_cut_short_is_400_not_a_parse_of_half_of_it(server):
    with connect(server) as sock:
        sock.sendall(post(b'{"model": "tiny", "mess', length=100))
        sock.shutdown(socket.SHUT_WR)  # the client will send no more, and waits for the answer
        error = error_of(read_to_end(sock), 400)
    assert error["message"] == "The body ended after 23 of the 100 bytes its Content-Length gives."


@pytest.mark.parametrize("how", ["reset", "end, then reset"])
def test_a_client_that_vanishes_mid_body_costs_nothing(server, how):
    """Its handler meets the end of the connection while it reads the body, or while it writes the 400
    of a body cut short: either way the connection closes quietly."""
    sock = connect(server)
    sock.sendall(post(b'{"model": "tiny", "mess', length=100))
    if how == "reset":
        time.sleep(0.1)  # the handler waits for the rest
    else:
        sock.shutdown(socket.SHUT_WR)
    reset(sock)


# ----------------------------------------------------------------------------------------------
# Clients that vanish while their answer is decoded: the slot is freed


def long_answer(stream: bool) -> bytes:
    return post(json.dumps({"model": "tiny", "messages": QUESTION, "temperature": 0, "max_tokens": 440,
                            "stream": stream}).encode())


def cancelled(server) -> list[int]:
    """The answer tokens of each answer the server logged as cancelled because its client went away."""
    return [int(m.group(1)) for line in server.lines
            if (m := re.search(r"\+ (\d+) answer tokens, cancelled: the client went away", line))]


def next_cancelled(server, before: int, timeout=10) -> int:
    deadline = time.monotonic() + timeout
    while len(cancelled(server)) <= before:
        assert time.monotonic() < deadline, "no answer was cancelled: its client's slot still decodes"
        time.sleep(0.02)
    return cancelled(server)[before]


def test_a_client_that_vanishes_while_its_answer_is_decoded_frees_its_slot(server):
    before = len(cancelled(server))
    sock = connect(server)
    sock.sendall(long_answer(stream=False))
    deadline = time.monotonic() + 10
    while server.request("GET", "/health")[1]["running"] == 0:  # decoding has begun
        assert time.monotonic() < deadline
        time.sleep(0.01)
    sock.close()
    assert next_cancelled(server, before) < 440
    wait_until_idle(server)


def test_a_client_that_resets_mid_stream_frees_its_slot(server):
    """Its handler's next write fails (a polite close mid-stream is tests/test_serve.py's)."""
    before = len(cancelled(server))
    sock = connect(server)
    sock.sendall(long_answer(stream=True))
    received = b""
    while received.count(b"data: ") < 3:  # the role, then two pieces of the answer
        chunk = sock.recv(4096)
        assert chunk, received
        received += chunk
    reset(sock)
    assert next_cancelled(server, before) < 440
    wait_until_idle(server)


# ----------------------------------------------------------------------------------------------
# More connections than the server takes


def held_connection(server, timeout=5) -> http.client.HTTPConnection:
    """A keep-alive connection the server took: its /health answered 200, and it stays open. (A
    connection closed a moment ago may still count: then this one is refused, and tried again.)"""
    deadline = time.monotonic() + timeout
    while True:
        conn = http.client.HTTPConnection(server.host, int(server.port), timeout=10)
        conn.request("GET", "/health")
        response = conn.getresponse()
        response.read()
        if response.status == 200 and conn.sock is not None:
            return conn
        conn.close()
        assert time.monotonic() < deadline, f"no connection was taken: {response.status}"
        time.sleep(0.02)


def test_a_connection_over_max_connections_gets_503_and_one_freed_is_taken_again(server):
    held = [held_connection(server) for _ in range(CAP)]
    error = error_of(exchange(server, post(json.dumps({"model": "tiny", "messages": QUESTION}).encode())), 503)
    assert (error["type"], error["code"]) == ("server_error", "too_many_connections")
    held.pop().close()
    held.append(held_connection(server))  # the place freed is taken again
    for conn in held:
        conn.close()


def test_200_clients_at_once_are_each_answered_or_refused_with_503(server):
    n, results = 200, []
    start = threading.Barrier(n)
    body = json.dumps({"model": "tiny", "messages": QUESTION, "max_tokens": 2})

    def ask():
        conn = http.client.HTTPConnection(server.host, int(server.port), timeout=60)
        try:
            conn.connect()
            start.wait()  # all connected, then all ask
            conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
            response = conn.getresponse()
            results.append((response.status, json.loads(response.read())))
        except Exception as e:  # noqa: BLE001 (a reset or a lost answer: what this test looks for)
            results.append((type(e).__name__, str(e)))
        finally:
            conn.close()

    threads = [threading.Thread(target=ask) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    answered = [reply for status, reply in results if status == 200]
    refused = [reply for status, reply in results if status == 503]
    assert len(answered) + len(refused) == n, [r for r in results if r[0] not in (200, 503)][:3]
    assert answered and all(reply["usage"]["completion_tokens"] == 2 for reply in answered)
    assert all(reply["error"]["code"] == "too_many_connections" for reply in refused)
