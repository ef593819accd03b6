"""The hand-written HTTP/1.1 server, through real sockets: keep-alive and pipelining,
Content-Length and chunked bodies, 100-continue, CORS preflight, HEAD, the wire limits
(414, 431, 413, 408), malformed requests (400 and close), absolute-form and CONNECT,
local-key auth, and that the server keeps serving after every one of them.

Every test talks raw bytes to a proxy on an ephemeral port, routed to a mock upstream
that records what it received. Sizes and counts are written out from the issue
(16 KiB, 64 KiB, 100 headers) rather than read from proxypal's constants, so the tests
state the required behaviour. Timeouts are shortened with monkeypatch."""
from __future__ import annotations

import json
import select
import socket
import threading
import time
from types import SimpleNamespace
from typing import Any, Dict, Sequence, Tuple

import pytest

from helpers import (TIMEOUT, MockUpstream, anthropic_message, mock_provider, openai_completion,
                     raw_exchange, request, send, status_of)
import proxypal

KEY = "proxypal-local"
AUTH = ("Authorization", f"Bearer {KEY}")
CHAT = "/v1/chat/completions"
MESSAGES = "/v1/messages"
OPENAI_BODY = b'{"model":"gpt-x","messages":[{"role":"user","content":"hi"}]}'
ANTHROPIC_BODY = (b'{"model":"claude-x","max_tokens":16,'
                  b'"messages":[{"role":"user","content":"hi"}]}')
BODY_FOR = {CHAT: OPENAI_BODY, MESSAGES: ANTHROPIC_BODY}
FORMAT_FOR = {CHAT: "openai", MESSAGES: "anthropic"}
KIB = 1024
CLOSE_WAIT = 3.0            # how long a test waits for the server to close a connection


# -- raw HTTP client ----------------------------------------------------------------

class Response:
    def __init__(self, head: bytes, status: int, headers: Dict[str, str], body: bytes):
        self.head, self.status, self.headers, self.body = head, status, headers, body

    def header(self, name: str) -> str:
        return self.headers.get(name.lower(), "")

    def json(self) -> Any:
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"<Response {self.head[:200]!r} body={self.body[:300]!r}>"


class Client:
    """One TCP connection to the proxy: send raw bytes, read parsed responses."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def answered(self, wait: float) -> bool:
        """True as soon as the server has sent something (or closed), within `wait` s."""
        return bool(self.buf) or bool(select.select([self.sock], [], [], wait)[0])

    def trickle(self, data: bytes, piece: int = 512) -> None:
        """Send data in small separate writes; stop early once the server answers."""
        for i in range(0, len(data), piece):
            if self.answered(0.001):
                return
            try:
                self.sock.sendall(data[i:i + piece])
            except (BrokenPipeError, ConnectionResetError):
                return

    def _more(self) -> bool:
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            data = b""
        self.buf += data
        return bool(data)

    def _take(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._more():
                raise AssertionError(f"connection closed {n - len(self.buf)} bytes short")
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            if not self._more():
                raise AssertionError(f"connection closed mid-line: {self.buf!r}")
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def read_response(self, head_request: bool = False) -> Response:
        while b"\r\n\r\n" not in self.buf:
            if not self._more():
                raise AssertionError(f"connection closed before a complete response head; "
                                     f"got {self.buf[:300]!r}")
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.split(b"\r\n")
        assert lines[0].startswith(b"HTTP/1.1 "), lines[0]
        status = int(lines[0].split(b" ")[1])
        headers: Dict[str, str] = {}
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            assert colon, f"malformed response header line {line!r}"
            key, text = name.decode("ascii").lower(), value.strip().decode("latin-1")
            headers[key] = headers[key] + ", " + text if key in headers else text
        if head_request or status in (204, 304) or 100 <= status < 200:
            body = b""
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int(self._line().split(b";")[0], 16)
                if not size:
                    while self._line():
                        pass
                    break
                parts.append(self._take(size))
                assert self._take(2) == b"\r\n"
            body = b"".join(parts)
        elif "content-length" in headers:
            body = self._take(int(headers["content-length"]))
        else:
            while self._more():
                pass
            body, self.buf = self.buf, b""
        return Response(head + b"\r\n\r\n", status, headers, body)

    def expect_closed(self, timeout: float = CLOSE_WAIT) -> None:
        """The server closes the connection (EOF or reset) without sending anything more."""
        self.sock.settimeout(timeout)
        try:
            extra = self.sock.recv(65536)
        except ConnectionResetError:
            extra = b""
        except socket.timeout:
            pytest.fail(f"the server left the connection open for {timeout}s")
        assert self.buf + extra == b"", f"unexpected bytes after the response: {self.buf + extra!r}"

    def expect_silence(self, seconds: float) -> None:
        """Nothing arrives and the connection stays open for `seconds`."""
        assert not self.buf
        ready = select.select([self.sock], [], [], seconds)[0]
        assert not ready, f"the server sent or closed early: {self.sock.recv(65536)!r}"


def build(method: str, target: str, headers: Sequence[Tuple[str, Any]] = (), body: bytes = b"",
          version: str = "HTTP/1.1", host: bool = True) -> bytes:
    """A request; Content-Length is added for a body unless the headers frame it."""
    lines = [f"{method} {target} {version}".encode("latin-1")]
    if host:
        lines.append(b"Host: 127.0.0.1")
    for name, value in headers:
        lines.append(name.encode("latin-1") + b": " +
                     (value if isinstance(value, bytes) else str(value).encode("latin-1")))
    framed = any(n.lower() in ("content-length", "transfer-encoding") for n, _ in headers)
    if body and not framed:
        lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def chunked(*pieces: bytes, trailer: bytes = b"") -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces if p) + b"0\r\n" + trailer + b"\r\n"


def exchange(port: int, data: bytes, head_request: bool = False) -> Response:
    with Client(port) as client:
        client.send(data)
        return client.read_response(head_request)


def assert_alive(port: int) -> None:
    """The server survived: a fresh connection still gets GET /health 200."""
    resp = exchange(port, build("GET", "/health"))
    assert resp.status == 200, resp
    assert resp.json() == {"status": "ok"}


def assert_error(resp: Response, status: int, fmt: str) -> str:
    """`status` with a JSON error body in the client's format; returns the message."""
    assert resp.status == status, resp
    assert resp.header("content-type").startswith("application/json"), resp
    body = resp.json()
    if fmt == "anthropic":
        assert set(body) == {"type", "error"} and body["type"] == "error", body
        err = body["error"]
        assert isinstance(err.get("type"), str) and err["type"], body
    else:
        assert set(body) == {"error"}, body
        err = body["error"]
        assert set(err) == {"message", "type", "code", "param"}, body
        assert isinstance(err["type"], str) and err["type"], body
    assert isinstance(err.get("message"), str) and err["message"], body
    return err["message"]


def assert_refused_and_closed(client: Client, status: int, fmt: str, port: int) -> Response:
    resp = client.read_response()
    assert_error(resp, status, fmt)
    assert resp.header("connection").lower() == "close", resp
    client.expect_closed()
    assert_alive(port)
    return resp


# -- proxy and upstream ---------------------------------------------------------------

def _answer(handler: Any, rec: Any) -> None:
    obj = anthropic_message() if rec.path.endswith("/messages") else openai_completion()
    send(handler, 200, json.dumps(obj).encode())


@pytest.fixture(scope="module")
def shared_upstream():
    """One mock upstream for the module: closing one costs its 0.5 s poll interval."""
    mock = MockUpstream(_answer)
    yield mock
    mock.close()


@pytest.fixture
def make_env(proxy, shared_upstream):
    """A fresh proxy routing gpt-x (OpenAI) and claude-x (Anthropic) to the mock upstream,
    whose record of requests starts empty."""
    def make(**extra: Any) -> SimpleNamespace:
        up = shared_upstream
        up.all.clear()
        while not up.requests.empty():
            up.requests.get_nowait()
        config = {"ampOpenaiProviders": [{"name": "mock", "baseUrl": up.url + "/v1",
                                          "models": ["gpt-x"]}],
                  "claudeApiKeys": [{"apiKey": "sk-upstream", "baseUrl": up.url,
                                     "models": ["claude-x"]}]}
        config.update(extra)
        running = proxy(config)
        return SimpleNamespace(port=running.port, upstream=up, proxy=running)
    return make


@pytest.fixture
def env(make_env) -> SimpleNamespace:
    return make_env()


@pytest.fixture
def small_body_env(make_env) -> SimpleNamespace:
    return make_env(maxBodyMb=0.001)          # 1048 bytes


def assert_upstream_got(env: SimpleNamespace, path: str, body: bytes) -> None:
    rec = env.upstream.last()
    assert rec.path == path
    assert rec.body == body


def assert_upstream_untouched(env: SimpleNamespace) -> None:
    assert env.upstream.all == [], [r.path for r in env.upstream.all]


def is_completion(resp: Response, path: str = CHAT) -> bool:
    if resp.status != 200:
        return False
    kind = resp.json().get("object" if path == CHAT else "type")
    return kind == ("chat.completion" if path == CHAT else "message")


# =====================================================================================
# Keep-alive and pipelining
# =====================================================================================

def test_keep_alive_serves_several_requests_on_one_connection(env):
    with Client(env.port) as client:
        client.send(build("GET", "/health"))
        assert client.read_response().json() == {"status": "ok"}

        client.send(build("POST", CHAT, [AUTH], OPENAI_BODY))
        resp = client.read_response()
        assert is_completion(resp), resp
        assert_upstream_got(env, "/v1/chat/completions", OPENAI_BODY)

        client.send(build("POST", CHAT, [AUTH, ("Transfer-Encoding", "chunked")],
                          chunked(OPENAI_BODY[:10], OPENAI_BODY[10:])))
        assert is_completion(client.read_response())
        assert_upstream_got(env, "/v1/chat/completions", OPENAI_BODY)

        client.send(build("HEAD", "/health"))
        assert client.read_response(head_request=True).status == 200

        client.send(build("GET", "/v1/models", [AUTH]))
        resp = client.read_response()
        assert resp.status == 200 and resp.json()["object"] == "list"

        client.send(build("POST", MESSAGES, [("x-api-key", KEY)], ANTHROPIC_BODY))
        resp = client.read_response()
        assert is_completion(resp, MESSAGES), resp
        assert_upstream_got(env, "/v1/messages", ANTHROPIC_BODY)
        assert resp.header("connection").lower() != "close"


def _kind(resp: Response) -> str:
    """What answered: health, models, chat or message; for checking the order."""
    if resp.status != 200:
        return f"status {resp.status}"
    body = resp.json()
    return {"ok": "health"}.get(body.get("status"), "") or \
        {"list": "models", "chat.completion": "chat"}.get(body.get("object"), "") or \
        {"message": "message"}.get(body.get("type"), "?")


HEALTH = build("GET", "/health")
MODELS = build("GET", "/v1/models", [AUTH])
POST_CL = build("POST", CHAT, [AUTH], OPENAI_BODY)
POST_CHUNKED = build("POST", CHAT, [AUTH, ("Transfer-Encoding", "chunked")],
                     chunked(OPENAI_BODY[:7], OPENAI_BODY[7:30], OPENAI_BODY[30:]))
POST_MESSAGE = build("POST", MESSAGES, [("x-api-key", KEY)], ANTHROPIC_BODY)

PIPELINES = [
    pytest.param([(HEALTH, "health"), (MODELS, "models")], False, id="two-gets"),
    pytest.param([(MODELS, "models"), (POST_CL, "chat"), (HEALTH, "health")], False,
                 id="get-post-get"),
    pytest.param([(POST_CHUNKED, "chat"), (POST_MESSAGE, "message"), (MODELS, "models")], False,
                 id="chunked-post-first"),
    pytest.param([(POST_CL, "chat"), (POST_CHUNKED, "chat")], False, id="two-posts"),
    pytest.param([(HEALTH, "health"), (POST_MESSAGE, "message"), (HEALTH, "health")], True,
                 id="three-then-half-close"),
]


@pytest.mark.parametrize("pipeline, half_close", PIPELINES)
def test_pipelined_requests_are_answered_in_order(env, pipeline, half_close):
    with Client(env.port) as client:
        client.send(b"".join(data for data, _ in pipeline))
        if half_close:
            client.sock.shutdown(socket.SHUT_WR)
        got = [_kind(client.read_response()) for _ in pipeline]
        assert got == [kind for _, kind in pipeline]
        if half_close:
            client.expect_closed()
    posted = [data for data, _ in pipeline if data.startswith(b"POST")]
    assert [r.body for r in env.upstream.all] == \
        [OPENAI_BODY if CHAT.encode() in d else ANTHROPIC_BODY for d in posted]


@pytest.mark.parametrize("version, connection, stays_open", [
    pytest.param("HTTP/1.0", None, False, id="http10-closes-by-default"),
    pytest.param("HTTP/1.0", "keep-alive", True, id="http10-keep-alive-stays-open"),
    pytest.param("HTTP/1.1", None, True, id="http11-stays-open-by-default"),
    pytest.param("HTTP/1.1", "close", False, id="http11-connection-close"),
])
def test_connection_persistence_follows_version_and_connection_header(
        env, version, connection, stays_open):
    headers = [("Connection", connection)] if connection else []
    with Client(env.port) as client:
        client.send(build("GET", "/health", headers, version=version))
        resp = client.read_response()
        assert resp.status == 200
        if not stays_open:
            assert resp.header("connection").lower() == "close"
            client.expect_closed()
            return
        if version == "HTTP/1.0":
            assert resp.header("connection").lower() == "keep-alive"
        client.send(build("GET", "/health", headers, version=version))
        assert client.read_response().status == 200


# =====================================================================================
# Request bodies, 100-continue, preflight, HEAD
# =====================================================================================

B = OPENAI_BODY
BODIES = [
    pytest.param([], B, id="content-length"),
    pytest.param([("Content-Length", f"{len(B)}, {len(B)}")], B, id="content-length-repeated-equal"),
    pytest.param([("Content-Length", len(B)), ("Content-Length", len(B))], B,
                 id="content-length-two-equal-lines"),
    pytest.param([("Transfer-Encoding", "chunked")], chunked(B), id="chunked-one-chunk"),
    pytest.param([("Transfer-Encoding", "chunked")], chunked(B[:1], B[1:20], B[20:21], B[21:]),
                 id="chunked-uneven-chunks"),
    pytest.param([("Transfer-Encoding", "chunked")],
                 b"".join(b"1\r\n%s\r\n" % B[i:i + 1] for i in range(len(B))) + b"0\r\n\r\n",
                 id="chunked-one-byte-chunks"),
    pytest.param([("Transfer-Encoding", "Chunked")], chunked(B), id="chunked-coding-name-any-case"),
    pytest.param([("Transfer-Encoding", "chunked")],
                 b"%X\r\n%s\r\n0\r\n\r\n" % (len(B), B), id="chunked-uppercase-hex"),
    pytest.param([("Transfer-Encoding", "chunked")],
                 b"000%x\r\n%s\r\n0000\r\n\r\n" % (len(B), B), id="chunked-leading-zeros"),
    pytest.param([("Transfer-Encoding", "chunked")],
                 b"%x;foo=bar\r\n%s\r\n0;last\r\n\r\n" % (len(B), B), id="chunk-ext-token"),
    pytest.param([("Transfer-Encoding", "chunked")],
                 b'%x;name="a \\"quoted\\" value";flag\r\n%s\r\n0\r\n\r\n' % (len(B), B),
                 id="chunk-ext-quoted-string"),
    pytest.param([("Transfer-Encoding", "chunked")],
                 b"%x ; a = b\t;c\r\n%s\r\n0\r\n\r\n" % (len(B), B), id="chunk-ext-with-whitespace"),
    pytest.param([("Transfer-Encoding", "chunked")],
                 chunked(B, trailer=b"X-Checksum: abc\r\nX-Other: 1\r\n"), id="chunked-with-trailers"),
]


@pytest.mark.parametrize("headers, wire_body", BODIES)
@pytest.mark.parametrize("delivery", ["one-send", "trickled"])
def test_request_body_reaches_the_upstream_exactly(env, headers, wire_body, delivery):
    data = build("POST", CHAT, [AUTH, ("Content-Type", "application/json")] + headers, wire_body)
    with Client(env.port) as client:
        if delivery == "one-send":
            client.send(data)
        else:
            client.trickle(data, piece=7)
        resp = client.read_response()
        assert is_completion(resp), resp
    assert_upstream_got(env, "/v1/chat/completions", OPENAI_BODY)


@pytest.mark.parametrize("path", [CHAT, MESSAGES])
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_expect_100_continue_gets_100_before_the_final_answer(env, path, framing):
    body = BODY_FOR[path]
    frame = ("Content-Length", len(body)) if framing == "content-length" \
        else ("Transfer-Encoding", "chunked")
    wire_body = body if framing == "content-length" else chunked(body[:9], body[9:])
    with Client(env.port) as client:
        client.send(build("POST", path, [("x-api-key", KEY), frame, ("Expect", "100-continue")]))
        interim = client.read_response()
        assert interim.head == b"HTTP/1.1 100 Continue\r\n\r\n"
        assert env.upstream.all == []
        client.send(wire_body)
        assert is_completion(client.read_response(), path)
    assert_upstream_got(env, path, body)


@pytest.mark.parametrize("path, headers, status", [
    pytest.param(CHAT, [("Authorization", "Bearer wrong")], 401, id="openai-wrong-key-401"),
    pytest.param(MESSAGES, [], 401, id="anthropic-missing-key-401"),
    pytest.param("/v1/nowhere", [AUTH], 404, id="unknown-path-404"),
])
def test_expect_100_continue_refused_early_gets_the_final_status_instead(env, path, headers, status):
    body = BODY_FOR.get(path, OPENAI_BODY)
    with Client(env.port) as client:
        client.send(build("POST", path, headers + [("Content-Length", len(body)),
                                                   ("Expect", "100-continue")]))
        resp = client.read_response()
        assert_error(resp, status, FORMAT_FOR.get(path, "openai"))
        # the body is still to come: the server either closes, or reads and drops it
        if resp.header("connection").lower() == "close":
            client.expect_closed()
        else:
            client.send(body + HEALTH)
            after = client.read_response()
            assert after.status == 200 and after.json() == {"status": "ok"}, after
    assert_upstream_untouched(env)


@pytest.mark.parametrize("origin, allowed", [
    pytest.param("http://localhost:3000", True, id="localhost-origin"),
    pytest.param("http://127.0.0.1:5173", True, id="loopback-ip-origin"),
    pytest.param("https://evil.example", False, id="foreign-origin"),
    pytest.param("http://localhost.evil.example", False, id="foreign-origin-localhost-prefix"),
])
def test_options_preflight(env, origin, allowed):
    preflight = build("OPTIONS", CHAT, [("Origin", origin),
                                        ("Access-Control-Request-Method", "POST"),
                                        ("Access-Control-Request-Headers",
                                         "authorization, content-type")])
    with Client(env.port) as client:
        client.send(preflight)
        resp = client.read_response()
        assert resp.status == 204, resp
        if allowed:
            assert resp.header("access-control-allow-origin") == origin
            assert "POST" in resp.header("access-control-allow-methods")
            allow_headers = resp.header("access-control-allow-headers").lower()
            assert "authorization" in allow_headers and "content-type" in allow_headers
        else:
            assert "access-control-allow-origin" not in resp.headers
        client.send(HEALTH)              # no stray body bytes: the next answer parses
        assert client.read_response().status == 200


@pytest.mark.parametrize("path, headers", [
    pytest.param("/health", [], id="health-without-key"),
    pytest.param("/v1/models", [AUTH], id="models"),
])
def test_head_gives_the_headers_without_a_body(env, path, headers):
    with Client(env.port) as client:
        client.send(build("GET", path, headers))
        get = client.read_response()
        client.send(build("HEAD", path, headers) + HEALTH)   # HEAD then a pipelined GET
        head = client.read_response(head_request=True)
        assert head.status == 200
        assert head.header("content-length") == str(len(get.body))
        assert head.header("content-type") == get.header("content-type")
        after = client.read_response()   # would fail to parse if HEAD had sent a body
        assert after.status == 200 and after.json() == {"status": "ok"}


# =====================================================================================
# Limits: 414, 431, 413, 408 in the client's format, then close
# =====================================================================================

# Each maker builds a head `excess` beyond its limit: 1 byte (or 1 field) when sent whole,
# so the boundary is exact; far beyond when trickled, where the head is sent in pieces
# and never finished (the over-limit part comes last), so the limit must be enforced
# while the head is still arriving.

def _line_too_long(path: str, excess: int) -> bytes:
    fixed = len(f"GET {path}?pad= HTTP/1.1")
    return build("GET", path + "?pad=" + "a" * (16 * KIB + excess - fixed), [AUTH])


def _field_too_long(path: str, excess: int) -> bytes:
    body = BODY_FOR[path]
    return build("POST", path, [AUTH, ("Content-Length", len(body)),
                                ("X-Big", "b" * (16 * KIB + excess - len("X-Big: ")))], body)


def _block_too_big(path: str, excess: int) -> bytes:
    fields = (64 * KIB + excess) // (8 * KIB) + 1
    return build("POST", path, [AUTH] + [(f"X-Pad-{i:02}", "c" * (8 * KIB)) for i in range(fields)],
                 BODY_FOR[path])


def _too_many_headers(path: str, excess: int) -> bytes:
    # Host, Authorization, Content-Length and 97 + excess more: 100 + excess fields
    return build("POST", path, [AUTH] + [(f"X-H{i}", "v") for i in range(97 + excess)],
                 BODY_FOR[path])


OVERSIZED_HEADS = [   # make, status, excess when sent whole, excess and piece size when trickled
    pytest.param(_line_too_long, 414, 1, 8 * KIB, 512, id="request-line-over-16KiB-414"),
    pytest.param(_field_too_long, 431, 1, 8 * KIB, 512, id="header-field-over-16KiB-431"),
    pytest.param(_block_too_big, 431, 1, 32 * KIB, 2048, id="header-block-over-64KiB-431"),
    pytest.param(_too_many_headers, 431, 1, 50, 16, id="over-100-headers-431"),
]


@pytest.mark.parametrize("make, status, whole_excess, trickle_excess, piece", OVERSIZED_HEADS)
@pytest.mark.parametrize("path", [CHAT, MESSAGES], ids=["openai", "anthropic"])
@pytest.mark.parametrize("delivery", ["one-send", "trickled"])
def test_oversized_head_is_refused_in_the_clients_format(
        env, make, status, whole_excess, trickle_excess, piece, path, delivery):
    with Client(env.port) as client:
        if delivery == "one-send":
            client.send(make(path, whole_excess))
        else:                    # never finish the head: the limit must hold without it
            data = make(path, trickle_excess)
            client.trickle(data[:data.index(b"\r\n\r\n")], piece)
            assert client.answered(CLOSE_WAIT), "no answer until the head is complete"
        assert_refused_and_closed(client, status, FORMAT_FOR[path], env.port)
    assert_upstream_untouched(env)


@pytest.mark.parametrize("data", [
    pytest.param(b"GET /health?pad=" + b"a" * (16 * KIB - len(b"GET /health?pad= HTTP/1.1"))
                 + b" HTTP/1.1\r\nHost: x\r\n\r\n", id="request-line-of-exactly-16KiB"),
    pytest.param(build("GET", "/health", [("X-Big", "b" * (16 * KIB - len("X-Big: ")))]),
                 id="header-field-of-exactly-16KiB"),
    pytest.param(build("GET", "/health", [(f"X-H{i}", "v") for i in range(99)]),
                 id="exactly-100-headers"),
    pytest.param(build("GET", "/health", [(f"X-Pad-{i}", "c" * (12 * KIB)) for i in range(5)]),
                 id="header-block-of-60KiB"),
])
def test_heads_at_the_limits_are_accepted(env, data):
    assert exchange(env.port, data).status == 200


def test_limits_boundary_cases_are_what_they_claim():
    line = b"GET /health?pad=" + b"a" * (16 * KIB - len(b"GET /health?pad= HTTP/1.1")) + b" HTTP/1.1"
    assert len(line) == 16 * KIB
    field = build("GET", "/health", [("X-Big", "b" * (16 * KIB - len("X-Big: ")))]).split(b"\r\n")[2]
    assert len(field) == 16 * KIB
    assert build("GET", "/health", [(f"X-H{i}", "v") for i in range(99)]).count(b"\r\n") - 2 == 100
    assert _too_many_headers(CHAT, 1).split(b"\r\n\r\n")[0].count(b"\r\n") == 101
    assert len(_line_too_long(CHAT, 1).split(b"\r\n")[0]) == 16 * KIB + 1
    assert len(_field_too_long(CHAT, 1).split(b"\r\n")[4]) == 16 * KIB + 1
    head = _block_too_big(CHAT, 1).split(b"\r\n\r\n")[0]
    assert len(head) - len(head.split(b"\r\n")[0]) > 64 * KIB


@pytest.mark.parametrize("path", [CHAT, MESSAGES], ids=["openai", "anthropic"])
@pytest.mark.parametrize("framing", ["content-length", "chunked", "content-length-expect-100"])
def test_body_over_max_body_mb_is_413(small_body_env, path, framing):
    env = small_body_env
    big = BODY_FOR[path][:-1] + b',"pad":"' + b"x" * 2000 + b'"}'
    if framing == "chunked":
        data = build("POST", path, [AUTH, ("Transfer-Encoding", "chunked")],
                     chunked(*[big[i:i + 300] for i in range(0, len(big), 300)]))
    elif framing == "content-length":
        data = build("POST", path, [AUTH], big)
    else:   # the head alone: 413 must come instead of 100 Continue
        data = build("POST", path, [AUTH, ("Content-Length", len(big)), ("Expect", "100-continue")])
    with Client(env.port) as client:
        client.send(data)
        resp = assert_refused_and_closed(client, 413, FORMAT_FOR[path], env.port)
    assert b"100 Continue" not in resp.head
    assert_upstream_untouched(env)


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_413_message_names_the_setting_to_change(small_body_env, framing):
    big = b'{"model":"gpt-x","pad":"' + b"x" * 2000 + b'"}'
    headers = [AUTH] + ([("Transfer-Encoding", "chunked")] if framing == "chunked" else [])
    data = build("POST", CHAT, headers, chunked(big) if framing == "chunked" else big)
    message = assert_error(exchange(small_body_env.port, data), 413, "openai")
    assert "maxBodyMb" in message
    assert "0 MB" not in message       # 0.001 MB must not be shown as a limit of 0 MB


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_body_under_max_body_mb_is_accepted(small_body_env, framing):
    headers = [AUTH] + ([("Transfer-Encoding", "chunked")] if framing == "chunked" else [])
    data = build("POST", CHAT, headers, chunked(OPENAI_BODY) if framing == "chunked" else OPENAI_BODY)
    assert is_completion(exchange(small_body_env.port, data))
    assert_upstream_got(small_body_env, "/v1/chat/completions", OPENAI_BODY)


@pytest.fixture
def short_timeouts(monkeypatch):
    """Head, body-idle and keep-alive timeouts cut to fractions of a second."""
    monkeypatch.setattr(proxypal, "HEAD_TIMEOUT", 0.5)
    monkeypatch.setattr(proxypal, "BODY_IDLE_TIMEOUT", 0.4)
    monkeypatch.setattr(proxypal, "KEEPALIVE_IDLE_TIMEOUT", 0.4)


def test_head_timeout_default_is_10_seconds():
    assert proxypal.HEAD_TIMEOUT == 10.0


@pytest.mark.parametrize("path", [CHAT, MESSAGES], ids=["openai", "anthropic"])
@pytest.mark.parametrize("pattern", ["stalled", "slowloris"])
def test_head_not_complete_in_time_is_408(short_timeouts, env, path, pattern):
    with Client(env.port) as client:
        t0 = time.monotonic()
        client.send(f"POST {path} HTTP/1.1\r\nHost: x\r\nX-Slow: ".encode())
        if pattern == "slowloris":
            # a byte every 50 ms keeps the connection busy, but the whole head is late
            while not client.answered(0.05) and time.monotonic() - t0 < 5:
                client.send(b"a")
        assert_refused_and_closed(client, 408, FORMAT_FOR[path], env.port)
        assert time.monotonic() - t0 < 5
    assert_upstream_untouched(env)


@pytest.mark.parametrize("path", [CHAT, MESSAGES], ids=["openai", "anthropic"])
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_body_read_idle_is_408(short_timeouts, env, path, framing):
    body = BODY_FOR[path]
    if framing == "chunked":
        data = build("POST", path, [AUTH, ("Transfer-Encoding", "chunked")],
                     b"%x\r\n%s" % (len(body), body[:10]))
    else:
        data = build("POST", path, [AUTH, ("Content-Length", len(body))], body[:10])
    with Client(env.port) as client:
        client.send(data)
        assert_refused_and_closed(client, 408, FORMAT_FOR[path], env.port)
    assert_upstream_untouched(env)


def test_idle_keep_alive_connection_is_closed_after_the_keep_alive_timeout(short_timeouts, env):
    with Client(env.port) as client:
        client.send(HEALTH)
        assert client.read_response().status == 200
        t0 = time.monotonic()
        client.expect_closed()                 # quietly: no 408 on an idle connection
        assert time.monotonic() - t0 >= 0.2
    assert_alive(env.port)


def test_idle_between_requests_is_governed_by_the_keep_alive_timeout(monkeypatch, env):
    monkeypatch.setattr(proxypal, "HEAD_TIMEOUT", 0.2)
    monkeypatch.setattr(proxypal, "KEEPALIVE_IDLE_TIMEOUT", 5.0)
    with Client(env.port) as client:
        client.send(HEALTH)
        assert client.read_response().status == 200
        client.expect_silence(0.6)             # three head timeouts pass: still open
        client.send(HEALTH)
        assert client.read_response().status == 200


# =====================================================================================
# Malformed requests: 400 and close
# =====================================================================================

def post(headers: Sequence[Tuple[str, Any]], body: bytes, version: str = "HTTP/1.1") -> bytes:
    return build("POST", CHAT, [AUTH] + list(headers), body, version=version)


def raw_post(header_lines: bytes, body: bytes = OPENAI_BODY) -> bytes:
    """A POST whose header block is given verbatim (after the request line and Host)."""
    return (b"POST " + CHAT.encode() + b" HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " +
            KEY.encode() + b"\r\n" + header_lines + b"Content-Length: %d\r\n\r\n" % len(body) + body)


TE = ("Transfer-Encoding", "chunked")
N = len(OPENAI_BODY)
CHUNKED_B = chunked(OPENAI_BODY)

BAD_FRAMING = [
    pytest.param(post([("Content-Length", len(CHUNKED_B)), TE], CHUNKED_B), id="content-length-and-chunked"),
    pytest.param(post([TE, ("Content-Length", N)], CHUNKED_B), id="chunked-and-content-length"),
    pytest.param(post([("Content-Length", N), ("Content-Length", N + 1)], OPENAI_BODY),
                 id="differing-duplicate-content-length"),
    pytest.param(post([("Content-Length", f"{N}, {N + 1}")], OPENAI_BODY),
                 id="differing-content-length-list"),
    pytest.param(post([("Transfer-Encoding", "gzip")], OPENAI_BODY), id="te-gzip"),
    pytest.param(post([("Transfer-Encoding", "gzip, chunked")], CHUNKED_B), id="te-gzip-then-chunked"),
    pytest.param(post([("Transfer-Encoding", "chunked, gzip")], CHUNKED_B), id="te-chunked-then-gzip"),
    pytest.param(post([("Transfer-Encoding", "identity")], OPENAI_BODY), id="te-identity"),
    pytest.param(post([TE, TE], CHUNKED_B), id="te-chunked-twice"),
    pytest.param(post([TE], CHUNKED_B, version="HTTP/1.0"), id="te-chunked-on-http10"),
]

BAD_CHUNKS = [
    pytest.param(post([TE], b"zz\r\nhello\r\n0\r\n\r\n"), id="chunk-size-not-hex"),
    pytest.param(post([TE], b"-5\r\nhello\r\n0\r\n\r\n"), id="chunk-size-negative"),
    pytest.param(post([TE], b"0x5\r\nhello\r\n0\r\n\r\n"), id="chunk-size-0x-prefix"),
    pytest.param(post([TE], b"+5\r\nhello\r\n0\r\n\r\n"), id="chunk-size-plus-sign"),
    pytest.param(post([TE], b"\r\nhello\r\n0\r\n\r\n"), id="chunk-size-empty"),
    pytest.param(post([TE], b" 5\r\nhello\r\n0\r\n\r\n"), id="chunk-size-leading-space"),
    pytest.param(post([TE], b"1" + b"0" * 16 + b"\r\nhello\r\n0\r\n\r\n"), id="chunk-size-overflow"),
    pytest.param(post([TE], b"5;\r\nhello\r\n0\r\n\r\n"), id="chunk-ext-without-name"),
    pytest.param(post([TE], b"5;=v\r\nhello\r\n0\r\n\r\n"), id="chunk-ext-value-without-name"),
    pytest.param(post([TE], b"5;a=\r\nhello\r\n0\r\n\r\n"), id="chunk-ext-empty-value"),
    pytest.param(post([TE], b'5;a="open\r\nhello\r\n0\r\n\r\n'), id="chunk-ext-unterminated-quote"),
    pytest.param(post([TE], b"5;a=b c\r\nhello\r\n0\r\n\r\n"), id="chunk-ext-space-in-value"),
    pytest.param(post([TE], b"5;a\x00\r\nhello\r\n0\r\n\r\n"), id="chunk-ext-nul"),
    pytest.param(post([TE], b"5\nhello\r\n0\r\n\r\n"), id="chunk-size-line-bare-lf"),
    pytest.param(post([TE], b"5\r\nhelloXX0\r\n\r\n"), id="chunk-data-without-crlf"),
]

BAD_HEADS = [
    pytest.param(raw_post(b"X-Folded: a\r\n b\r\n"), id="obs-fold-space"),
    pytest.param(raw_post(b"X-Folded: a\r\n\tb\r\n"), id="obs-fold-tab"),
    pytest.param(raw_post(b"X-A: a\rb\r\n"), id="bare-cr-in-value"),
    pytest.param(raw_post(b"X-A: a\r"), id="bare-cr-line-end"),
    pytest.param(raw_post(b"X-A: a\n"), id="bare-lf-line-end"),
    pytest.param(b"POST " + CHAT.encode() + b" HTTP/1.1\nHost: x\r\n\r\n", id="bare-lf-after-request-line"),
    pytest.param(b"GET /health HTTP/1.1\r\nHost: x\r\n\n", id="bare-lf-blank-line"),
    pytest.param(b"GET /health HTTP/1.1\n\n", id="bare-lf-everywhere"),
    pytest.param(raw_post(b"Content-Type : application/json\r\n"), id="space-before-colon"),
    pytest.param(raw_post(b"Content-Type\t: application/json\r\n"), id="tab-before-colon"),
    pytest.param(raw_post(b"X-A: a\x00b\r\n"), id="nul-in-value"),
    pytest.param(raw_post(b"X-A: a\x01b\r\n"), id="soh-in-value"),
    pytest.param(raw_post(b"X-A: a\x1bb\r\n"), id="esc-in-value"),
    pytest.param(raw_post(b"X-A: a\x0bb\r\n"), id="vt-in-value"),
    pytest.param(raw_post(b"X-A: a\x7fb\r\n"), id="del-in-value"),
    pytest.param(raw_post(b"X-A: \x00\r\n"), id="value-only-nul"),
]

BAD_LENGTHS = [
    pytest.param(post([("Content-Length", value)], OPENAI_BODY), id=name)
    for name, value in [("cl-letters", "abc"), ("cl-negative", "-1"), ("cl-plus-sign", f"+{N}"),
                        ("cl-decimal", f"{N}.0"), ("cl-hex", "0x10"), ("cl-exponent", "1e3"),
                        ("cl-empty", ""), ("cl-inner-space", f"{N} {N}"),
                        ("cl-non-ascii-digit", b"\xb2"), ("cl-overflowing", "9" * 25),
                        ("cl-overflowing-64-bit", "18446744073709551617")]
]

BAD_TARGETS = [
    pytest.param(build("POST", "http://evil.example" + CHAT, [AUTH], OPENAI_BODY),
                 id="absolute-form-other-host"),
    pytest.param(build("POST", "https://evil.example" + CHAT, [AUTH], OPENAI_BODY),
                 id="absolute-form-https-other-host"),
    pytest.param(build("POST", "http://127.0.0.1@evil.example" + CHAT, [AUTH], OPENAI_BODY),
                 id="absolute-form-userinfo-trick"),
    pytest.param(build("POST", "http://127.0.0.1.evil.example" + CHAT, [AUTH], OPENAI_BODY),
                 id="absolute-form-loopback-lookalike"),
    pytest.param(build("POST", "http://[::1" + CHAT, [AUTH], OPENAI_BODY),
                 id="absolute-form-unclosed-ipv6"),
    pytest.param(build("POST", "http://127.0.0.1:port" + CHAT, [AUTH], OPENAI_BODY),
                 id="absolute-form-port-not-a-number"),
    pytest.param(raw_post(b"").replace(b"Host: x", b"Host: a b@c"), id="host-with-space-and-at"),
    pytest.param(raw_post(b"").replace(b"Host: x", b"Host: [::1"), id="host-unclosed-ipv6"),
]

MALFORMED = BAD_FRAMING + BAD_CHUNKS + BAD_HEADS + BAD_LENGTHS + BAD_TARGETS


@pytest.mark.parametrize("data", MALFORMED)
def test_malformed_request_is_400_and_closed(env, data):
    with Client(env.port) as client:
        client.send(data)
        assert_refused_and_closed(client, 400, "openai", env.port)
    assert_upstream_untouched(env)


@pytest.mark.parametrize("target", [
    pytest.param("evil.example:443", id="other-host"),
    pytest.param("127.0.0.1:443", id="loopback"),
])
def test_connect_is_refused_and_closed(env, target):
    with Client(env.port) as client:
        client.send(build("CONNECT", target, [AUTH]))
        resp = client.read_response()
        assert resp.status in (400, 405), resp
        assert_error(resp, resp.status, "openai")
        assert resp.header("connection").lower() == "close"
        client.expect_closed()
    assert_alive(env.port)


@pytest.mark.parametrize("data, path", [
    pytest.param(raw_post(b"X-Folded: a\r\n b\r\n").replace(CHAT.encode(), MESSAGES.encode()),
                 MESSAGES, id="obs-fold"),
    pytest.param(raw_post(b"X-A: a\n").replace(CHAT.encode(), MESSAGES.encode()),
                 MESSAGES, id="bare-lf"),
    pytest.param(raw_post(b"X-A: a\x00b\r\n").replace(CHAT.encode(), MESSAGES.encode()),
                 MESSAGES, id="nul-in-value"),
    pytest.param(build("POST", MESSAGES, [AUTH, ("Content-Length", 5), TE], chunked(b"hello")),
                 MESSAGES, id="content-length-and-chunked"),
    pytest.param(build("POST", MESSAGES, [AUTH, TE], b"zz\r\nhello\r\n0\r\n\r\n"),
                 MESSAGES, id="bad-chunk-size"),
    pytest.param(build("POST", MESSAGES, [AUTH, ("Content-Length", "abc")], b"hello"),
                 MESSAGES, id="non-numeric-content-length"),
    # absolute-form (RFC 9112 3.2.2): the format is its path's, as in origin-form
    pytest.param(build("POST", "http://127.0.0.1" + MESSAGES, [AUTH, TE], b"zz\r\n"),
                 MESSAGES, id="absolute-form-bad-chunk-size"),
    pytest.param(b"POST http://127.0.0.1/v1/messages HTTP/1.1\r\nHost: x\r\nX-A: \x00\r\n\r\n",
                 MESSAGES, id="absolute-form-unparsable-head"),
])
def test_malformed_anthropic_request_is_refused_in_anthropic_format(env, data, path):
    with Client(env.port) as client:
        client.send(data)
        assert_refused_and_closed(client, 400, "anthropic", env.port)
    assert_upstream_untouched(env)


# Framing must be decided for every request, whatever the route and whether or not it
# is authenticated: a body the server never reads would be parsed as the next request.
FRAMING_ANY_ROUTE = [("content-length-and-chunked", [("Content-Length", 5), TE], chunked(b"hello")),
                     ("differing-content-length", [("Content-Length", 5), ("Content-Length", 6)],
                      b"hello"),
                     ("te-gzip", [("Transfer-Encoding", "gzip")], b"hello"),
                     ("non-numeric-content-length", [("Content-Length", "abc")], b"hello")]
ROUTES = [("get-health", "GET", "/health", []),
          ("post-without-key", "POST", CHAT, []),
          ("post-unknown-path", "POST", "/v1/nowhere", [AUTH])]


@pytest.mark.parametrize("method, path, auth, headers, body", [
    pytest.param(method, path, auth, headers, body, id=f"{route}-{case}")
    for route, method, path, auth in ROUTES for case, headers, body in FRAMING_ANY_ROUTE
])
def test_bad_framing_is_refused_on_every_route(env, method, path, auth, headers, body):
    with Client(env.port) as client:
        client.send(build(method, path, auth + headers, body))
        assert_refused_and_closed(client, 400, "openai", env.port)


@pytest.mark.parametrize("first", [
    pytest.param(build("POST", CHAT, [("Authorization", "Bearer wrong")], b'{"x":1}'),
                 id="401-wrong-key"),
    pytest.param(build("POST", CHAT, [], b'{"x":1}'), id="401-missing-key"),
    pytest.param(build("POST", "/v1/nowhere", [AUTH], b'{"x":1}'), id="404-unknown-path"),
    pytest.param(build("PUT", CHAT, [AUTH], b'{"x":1}'), id="405-wrong-method"),
    pytest.param(build("GET", "/health", [], b'{"x":1}'), id="200-get-with-body"),
    pytest.param(build("POST", CHAT, [("Authorization", "Bearer wrong"), TE],
                       chunked(b'{"x":1}')), id="401-chunked-body"),
])
def test_unread_body_never_becomes_the_next_request(env, first):
    """An answer sent before the body was read must either consume the body or close."""
    with Client(env.port) as client:
        client.send(first + HEALTH)
        resp = client.read_response()
        assert resp.status in (200, 401, 404, 405), resp
        if resp.header("connection").lower() == "close":
            client.expect_closed()
        else:
            after = client.read_response()
            assert after.status == 200 and after.json() == {"status": "ok"}, after
    assert_alive(env.port)


@pytest.mark.parametrize("first, status", [
    pytest.param(build("GET", "/v1/nowhere", [AUTH]), 404, id="404-unknown-path"),
    pytest.param(build("GET", "/v1/models"), 401, id="401-missing-key"),
    pytest.param(build("DELETE", CHAT, [AUTH]), 405, id="405-wrong-method"),
    pytest.param(build("POST", CHAT, [AUTH], b'{"model":"nope"}'), 404, id="404-unknown-model"),
    pytest.param(build("POST", CHAT, [AUTH], b"not json"), 400, id="400-invalid-json-body"),
])
def test_errors_on_fully_read_requests_keep_the_connection(env, first, status):
    with Client(env.port) as client:
        client.send(first)
        resp = client.read_response()
        assert_error(resp, status, "openai")
        assert resp.header("connection").lower() != "close", resp
        client.send(HEALTH)
        assert client.read_response().status == 200


@pytest.mark.parametrize("data", [
    pytest.param(lambda port: build("POST", f"http://127.0.0.1:{port}{CHAT}", [AUTH], OPENAI_BODY),
                 id="post-chat-127.0.0.1-with-port"),
    pytest.param(lambda port: build("POST", f"http://127.0.0.1{CHAT}", [AUTH], OPENAI_BODY),
                 id="post-chat-127.0.0.1"),
    pytest.param(lambda port: build("POST", f"http://localhost:{port}{CHAT}", [AUTH], OPENAI_BODY),
                 id="post-chat-localhost"),
    pytest.param(lambda port: build("GET", f"http://127.0.0.1:{port}/health"), id="get-health"),
    pytest.param(lambda port: build("GET", f"http://[::1]:{port}/health"), id="get-health-ipv6-loopback"),
    pytest.param(lambda port: build("GET", f"http://127.0.0.1:{port}/v1/models?key={KEY}"),
                 id="get-models-query-key"),
])
def test_absolute_form_naming_this_server_is_accepted(env, data):
    with Client(env.port) as client:
        client.send(data(env.port))
        resp = client.read_response()
        assert resp.status == 200, resp
        client.send(HEALTH)                      # and the connection stays usable
        assert client.read_response().status == 200
    if b"POST" in data(env.port)[:4]:
        assert_upstream_got(env, "/v1/chat/completions", OPENAI_BODY)


def test_server_survives_the_whole_malformed_table_in_a_row(env):
    for param in MALFORMED:
        with Client(env.port) as client:
            client.send(param.values[0])
            try:
                client.read_response()
            except (AssertionError, OSError, ValueError):
                pass                             # the table's own test reports it
    assert_alive(env.port)
    assert is_completion(exchange(env.port, POST_CL))


# =====================================================================================
# Auth
# =====================================================================================

@pytest.mark.parametrize("target, headers", [
    pytest.param("/v1/models", [("Authorization", f"Bearer {KEY}")], id="bearer"),
    pytest.param("/v1/models", [("Authorization", f"bearer {KEY}")], id="bearer-lowercase-scheme"),
    pytest.param("/v1/models", [("x-api-key", KEY)], id="x-api-key"),
    pytest.param("/v1/models", [("x-goog-api-key", KEY)], id="x-goog-api-key"),
    pytest.param(f"/v1/models?key={KEY}", [], id="query-key"),
    pytest.param(f"/v1/models?alt=json&key={KEY}", [], id="query-key-not-first"),
])
def test_every_key_style_is_accepted(env, target, headers):
    resp = exchange(env.port, build("GET", target, headers))
    assert resp.status == 200, resp
    google = "key=" in target or headers[0][0] == "x-goog-api-key"      # (google-genai: Gemini's list)
    assert ("models" in resp.json()) if google else resp.json()["object"] == "list"


@pytest.mark.parametrize("path, headers", [
    pytest.param(CHAT, [("Authorization", f"Bearer {KEY}")], id="chat-bearer"),
    pytest.param(MESSAGES, [("x-api-key", KEY)], id="messages-x-api-key"),
    pytest.param(CHAT + f"?key={KEY}", [], id="chat-query-key"),
    pytest.param(MESSAGES, [("x-goog-api-key", KEY)], id="messages-x-goog-api-key"),
])
def test_model_requests_accept_the_key(env, path, headers):
    plain = path.split("?")[0]
    assert is_completion(exchange(env.port, build("POST", path, headers, BODY_FOR[plain])), plain)
    assert_upstream_got(env, plain, BODY_FOR[plain])


@pytest.mark.parametrize("headers, query", [
    pytest.param([], "", id="missing"),
    pytest.param([("Authorization", "Bearer wrong")], "", id="wrong-bearer"),
    pytest.param([("Authorization", "Bearer ")], "", id="empty-bearer"),
    pytest.param([("Authorization", f"Basic {KEY}")], "", id="basic-scheme"),
    pytest.param([("x-api-key", "wrong")], "", id="wrong-x-api-key"),
    pytest.param([("x-goog-api-key", "wrong")], "", id="wrong-x-goog-api-key"),
    pytest.param([], "?key=wrong", id="wrong-query-key"),
    pytest.param([("Authorization", f"Bearer {KEY}x")], "", id="key-with-suffix"),
])
@pytest.mark.parametrize("method, path", [
    pytest.param("POST", CHAT, id="openai-chat"),
    pytest.param("POST", MESSAGES, id="anthropic-messages"),
    pytest.param("GET", "/v1/models", id="models"),
])
def test_missing_or_wrong_key_is_401_in_the_clients_format(env, headers, query, method, path):
    body = BODY_FOR.get(path, b"")
    resp = exchange(env.port, build(method, path + query, headers, body))
    fmt = FORMAT_FOR.get(path, "openai")
    assert_error(resp, 401, fmt)
    if fmt == "openai":
        assert resp.json()["error"]["code"] == "invalid_api_key"
    else:
        assert resp.json()["error"]["type"] == "authentication_error"
    assert_upstream_untouched(env)


def test_the_path_alone_decides_the_error_format(env):
    """Some gateways add anthropic-version to every request: an OpenAI route still
    answers in OpenAI's shape, and an Anthropic route in Anthropic's."""
    for path, fmt in (("/v1/models", "openai"), ("/v1/chat/completions", "openai"),
                      ("/v1/messages", "anthropic")):
        method = "GET" if path == "/v1/models" else "POST"
        resp = exchange(env.port, build(method, path, [("anthropic-version", "2023-06-01")]))
        assert_error(resp, 401, fmt)


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_health_needs_no_key(env, method):
    resp = exchange(env.port, build(method, "/health"), head_request=method == "HEAD")
    assert resp.status == 200


def test_options_body_never_becomes_a_request(proxy):
    p = proxy({})
    smuggled = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer proxypal-local\r\n\r\n"
    raw = raw_exchange(p.port, b"OPTIONS /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                       b"Origin: http://localhost:3000\r\nContent-Length: %d\r\n\r\n%s" % (len(smuggled), smuggled))
    assert status_of(raw) == 204 and raw.count(b"HTTP/1.1 ") == 1 and b"Connection: close" in raw
    assert b"Content-Length" not in raw.split(b"\r\n\r\n")[0]


def test_stray_crlf_after_a_body_does_not_break_the_next_request(upstream, proxy):
    def respond(handler, rec):
        body = json.dumps(openai_completion()).encode()
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body + b"\r\n")      # one CRLF too many
    up = upstream(respond)
    p = proxy({"ampOpenaiProviders": [mock_provider(up.url)]})
    for _ in range(3):
        assert request(p, "POST", "/v1/chat/completions", {"model": "m", "messages": []})[0] == 200


def test_client_that_stops_reading_is_dropped(upstream, proxy, monkeypatch):
    monkeypatch.setattr(proxypal, "CLIENT_WRITE_TIMEOUT", 0.3)
    upstream_done = threading.Event()
    big = b'data: {"x":"' + b"y" * 60000 + b'"}\n\n'

    def respond(handler, rec):
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        handler.end_headers()
        try:
            for _ in range(400):            # ~24 MB: far more than socket buffers hold
                handler.wfile.write(big)
        except OSError:
            pass
        upstream_done.set()
        handler.close_connection = True
    up = upstream(respond)
    p = proxy({"ampOpenaiProviders": [mock_provider(up.url)]})
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(TIMEOUT)
    sock.connect(("127.0.0.1", p.port))
    body = json.dumps({"model": "m", "stream": True, "messages": []}).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer proxypal-local\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    assert upstream_done.wait(TIMEOUT)           # the proxy gave up: upstream writes failed
    sock.close()


# -- bad input answered at once ----------------------------------------------------------

@pytest.mark.parametrize("path", [CHAT, MESSAGES], ids=["openai", "anthropic"])
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_body_trickled_a_byte_at_a_time_meets_the_total_deadline(monkeypatch, env, path, framing):
    """Each byte comes well inside the idle timeout, yet the body as a whole is cut off
    by the total deadline (BODY_TOTAL_TIMEOUT, shortened here)."""
    monkeypatch.setattr(proxypal, "BODY_TOTAL_TIMEOUT", 0.5)
    body = BODY_FOR[path]
    head = build("POST", path, [AUTH, ("Transfer-Encoding", "chunked")] if framing == "chunked"
                 else [AUTH, ("Content-Length", len(body))])
    wire = chunked(body) if framing == "chunked" else body
    with Client(env.port) as client:
        client.send(head)
        t0 = time.monotonic()
        for i in range(len(wire)):
            if client.answered(0.05):          # a byte every 50 ms (idle timeout: 30 s)
                break
            client.send(wire[i:i + 1])
        resp = client.read_response()
        assert "not received within 0.5s" in assert_error(resp, 408, FORMAT_FOR[path])
        assert time.monotonic() - t0 < 5
    assert_upstream_untouched(env)


def test_total_body_deadline_default_has_room_for_the_largest_body():
    """32 MB (the default maxBodyMb) at 1 Mbit/s takes about 270 s."""
    assert proxypal.BODY_TOTAL_TIMEOUT == 300.0 and 32 * 8 / 1 < proxypal.BODY_TOTAL_TIMEOUT


@pytest.mark.parametrize("path", [CHAT, MESSAGES], ids=["openai", "anthropic"])
@pytest.mark.parametrize("body,says", [
    (b'{"model":"gpt-x","messages":' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nests too deeply"),
    (b'{"model":"gpt-x","max_tokens":' + b"7" * 5000 + b',"messages":[]}', "a number of more than 4300 digits"),
    (b'{"model":"gpt-x","messages":' + b"[" * 990 + b"]" * 990 + b"}", None),
], ids=["nested-100000", "5000-digit-number", "nested-990"])
def test_pathological_json_is_a_400_in_the_clients_format(env, path, body, says):
    resp = exchange(env.port, build("POST", path, [AUTH, ("x-api-key", KEY)], body))
    if says is None and path == CHAT and parses(body):
        # Python 3.12+ parses 990 levels in C: a request for an upstream of its own format
        # goes on as the client sent it, and the upstream judges it
        assert resp.status == 200 and env.upstream.last().body == body
        return
    message = assert_error(resp, 400, FORMAT_FOR[path])
    assert says is None or says in message, message
    assert "internal error" not in message
    assert_upstream_untouched(env)
    assert_alive(env.port)


def parses(body: bytes) -> bool:
    try:
        json.loads(body)
        return True
    except RecursionError:
        return False


def test_a_tls_client_hello_on_the_plain_port_is_told_at_once(env):
    hello = bytes.fromhex("16030100c4010000c00303") + bytes(32) + b"\x00\x00\x02\x13\x01\x01\x00"
    with Client(env.port) as client:
        client.send(hello)
        assert client.answered(1.0), "no answer to a ClientHello (waited for a head timeout?)"
        resp = client.read_response()
        assert "this port speaks plain HTTP: use http://" in assert_error(resp, 400, "openai")
        client.expect_closed()
    assert_alive(env.port)


def test_two_host_headers_are_400(env):
    data = b"GET /v1/models HTTP/1.1\r\nHost: a\r\nHost: b\r\nAuthorization: Bearer " + KEY.encode() + b"\r\n\r\n"
    with Client(env.port) as client:
        client.send(data)
        assert "more than one Host header" in assert_refused_and_closed(client, 400, "openai", env.port).json()["error"]["message"]


def test_routes_and_upstream_urls_are_remembered_only_when_short():
    """Paths and URLs are cached per request, but a client chooses them: one longer
    than CACHED_TEXT_MAX is worked out each time and never held."""
    long_path = "/v1beta/models/" + "m" * 600 + ":generateContent"
    for cache, call, short, long in [
            (proxypal.endpoint_for.cache, lambda path: proxypal.endpoint_for("POST", path)[1]["model"],
             "/v1beta/models/cache-probe:generateContent", long_path),
            (proxypal.url_parts.cache, lambda url: proxypal.url_parts(url)[4],
             "https://example.com/v1beta/models/cache-probe:streamGenerateContent?alt=sse",
             "https://example.com" + long_path + "?alt=sse")]:
        cache.cache_clear()                                # (other tests filled it)
        size, hits = 0, 0
        assert call(long) == call(long)                    # worked out twice, the same
        assert cache.cache_info().currsize == size and cache.cache_info().hits == hits
        assert call(short) == call(short)                  # the second time from the cache
        assert cache.cache_info().currsize == size + 1 and cache.cache_info().hits == hits + 1
    assert proxypal.endpoint_for("POST", long_path)[1]["model"] == "m" * 600
    assert proxypal.url_parts("https://example.com" + long_path + "?alt=sse") == (
        "https", "example.com", 443, "example.com", long_path + "?alt=sse")
    assert proxypal.url_parts("http://127.0.0.1:8080") == ("http", "127.0.0.1", 8080, "127.0.0.1:8080", "/")
