"""Upstreams that fail at the byte level, through real sockets.

A raw socket-thread mock upstream (RawUpstream) plays each failure: garbage or cut
status lines, oversized or trickled heads, bad framing, silence, resets, interim 1xx
answers, pooled connections closed under the proxy, odd SSE line ends, huge events.
Every test checks what the client gets, in its own format, for same-format
(pass-through) and translated routes where that matters; that the answer is never the
proxy's own 500 "internal error"; and that the proxy still serves a normal request
afterwards. Time limits in the configs are fractions of a second; waits are on events,
each bounded."""
from __future__ import annotations

import http.client
import json
import logging
import queue
import socket
import struct
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest

import proxypal
from helpers import (ANTHROPIC_STREAM, OPENAI_STREAM, TIMEOUT, anthropic_message, anthropic_stream_named,
                     openai_completion, request, request_stream, send, sse_answer, mock_provider)

ANTHROPIC_HEADERS = {"x-api-key": "proxypal-local", "anthropic-version": "2023-06-01"}
SHORT = 0.2            # the small timeout the timeout tests configure, seconds


# -- a mock upstream that can misbehave at the byte level -----------------------------

class RawRequest:
    def __init__(self, method: str, path: str, headers: Dict[str, str], body: bytes, conn_no: int):
        self.method, self.path, self.headers, self.body = method, path, headers, body
        self.conn_no = conn_no                  # which accepted connection carried it (1-based)

    @property
    def anthropic(self) -> bool:
        """The upstream format the proxy speaks to us: Anthropic Messages or OpenAI Chat."""
        return self.path.endswith("/v1/messages")

    def json(self) -> Any:
        return json.loads(self.body)


class Peer:
    """The upstream's side of one connection from the proxy."""

    def __init__(self, sock: socket.socket, conn_no: int):
        self.sock, self.conn_no = sock, conn_no
        self.buf = b""
        self.closed = False
        sock.settimeout(TIMEOUT)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def read_request(self) -> Optional[RawRequest]:
        """The next request on this connection; None when the proxy closed it."""
        try:
            while b"\r\n\r\n" not in self.buf:
                more = self.sock.recv(65536)
                if not more:
                    return None
                self.buf += more
            head, self.buf = self.buf.split(b"\r\n\r\n", 1)
            lines = head.decode("latin-1").split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            length = int(headers.get("content-length") or 0)
            while len(self.buf) < length:
                more = self.sock.recv(65536)
                if not more:
                    return None
                self.buf += more
            body, self.buf = self.buf[:length], self.buf[length:]
            return RawRequest(method, path, headers, body, self.conn_no)
        except OSError:
            return None

    def send(self, data: bytes) -> bool:
        """Write; False if the proxy already closed the connection."""
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            return False

    def trickle(self, data: bytes, pause: float = 0.001) -> None:
        """One byte per TCP segment (Nagle is off; the pause lets each leave alone)."""
        for i in range(len(data)):
            if not self.send(data[i:i + 1]):
                return
            time.sleep(pause)

    def wait_closed(self, timeout: float = TIMEOUT) -> bool:
        """Block until the proxy closes its side (EOF or reset); False after `timeout`."""
        self.sock.settimeout(timeout)
        try:
            while True:
                more = self.sock.recv(65536)
                if not more:
                    return True
                self.buf += more
        except socket.timeout:
            return False
        except OSError:
            return True
        finally:
            self.sock.settimeout(TIMEOUT)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.sock.close()

    def reset(self) -> None:
        """Close with an RST instead of a FIN (SO_LINGER 0)."""
        if not self.closed:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.closed = True
            self.sock.close()


Handler = Callable[[Peer, RawRequest], None]


class RawUpstream:
    """127.0.0.1:0, a thread per connection. For each request on a connection it calls
    handler(peer, request), which writes whatever bytes it likes; the connection then
    serves its next request unless the handler closed or reset it."""

    def __init__(self, handler: Handler):
        self.handler = handler
        self.requests: "queue.Queue[RawRequest]" = queue.Queue()
        self.all: List[RawRequest] = []
        self.peers: List[Peer] = []
        self.lock = threading.Lock()
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.stopping = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def connections(self) -> int:
        return len(self.peers)

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                if self.stopping:
                    sock.close()
                    return
                peer = Peer(sock, len(self.peers) + 1)
                self.peers.append(peer)
            threading.Thread(target=self._serve, args=(peer,), daemon=True).start()

    def _serve(self, peer: Peer) -> None:
        try:
            while not peer.closed:
                req = peer.read_request()
                if req is None:
                    break
                self.all.append(req)
                self.requests.put(req)
                self.handler(peer, req)
        finally:
            peer.close()

    def last(self) -> RawRequest:
        return self.requests.get(timeout=TIMEOUT)

    def close(self) -> None:
        with self.lock:
            self.stopping = True
            peers = list(self.peers)
        self.listener.close()
        for peer in peers:                      # wakes any handler blocked on recv
            try:
                peer.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


# -- what a well-behaved upstream sends ----------------------------------------------

def head(status: int = 200, headers: Tuple[Tuple[str, str], ...] = (),
         reason: str = "OK") -> bytes:
    lines = [f"HTTP/1.1 {status} {reason}"] + [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def answer_body(req: RawRequest) -> bytes:
    return json.dumps(anthropic_message("c") if req.anthropic else openai_completion("m")).encode()


def full_answer(req: RawRequest, extra: Tuple[Tuple[str, str], ...] = ()) -> bytes:
    body = answer_body(req)
    return head(200, (("Content-Type", "application/json"),
                      ("Content-Length", str(len(body)))) + extra) + body


def stream_events(req: RawRequest) -> List[bytes]:
    return ANTHROPIC_STREAM if req.anthropic else OPENAI_STREAM


def first_events(req: RawRequest) -> List[bytes]:
    """The events up to and including the text "Hel", before any end marker."""
    return ANTHROPIC_STREAM[:3] if req.anthropic else OPENAI_STREAM[:2]


def rest_events(req: RawRequest) -> List[bytes]:
    return ANTHROPIC_STREAM[3:] if req.anthropic else OPENAI_STREAM[2:]


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


SSE_CHUNKED = (("Content-Type", "text/event-stream"), ("Transfer-Encoding", "chunked"))


def normal(peer: Peer, req: RawRequest) -> None:
    """A correct answer: JSON, or a chunked event stream when the request streams."""
    if req.json().get("stream"):
        peer.send(head(200, SSE_CHUNKED) + b"".join(chunk(e) for e in stream_events(req))
                  + b"0\r\n\r\n")
    else:
        peer.send(full_answer(req))


def half_closed_links(port: int) -> int:
    """How many of this process's sockets to 127.0.0.1:`port` sit in CLOSE_WAIT: the
    upstream closed, the proxy never closed its side (Linux /proc/net/tcp)."""
    count = 0
    with open("/proc/net/tcp") as table:
        for line in table.read().splitlines()[1:]:
            fields = line.split()
            if fields[2] == "0100007F:%04X" % port and fields[3] == "08":
                count += 1
    return count


def assert_no_half_closed_link(port: int, within: float = 0.5) -> None:
    """The proxy closes an upstream connection whose response broke (polls: no event to
    await for a socket state)."""
    try:
        open("/proc/net/tcp").close()
    except OSError:
        return                                  # not Linux: nothing to look at
    deadline = time.monotonic() + within
    while half_closed_links(port) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert half_closed_links(port) == 0, "the proxy left the broken upstream connection open"


# -- clients and configs ----------------------------------------------------------

# (client format, upstream kind): same-format pass-through and translated.
COMBOS = [("openai", "openai"), ("anthropic", "openai"), ("anthropic", "claude"), ("openai", "claude")]
COMBO_IDS = ["openai-passthrough", "anthropic-to-openai", "anthropic-passthrough", "openai-to-anthropic"]
MODEL = {"openai": "m", "claude": "c"}
PROVIDER = {"openai": "RawOpenAI", "claude": "RawClaude"}


def make_config(raw: RawUpstream, healthy_url: str, **extra: Any) -> Dict[str, Any]:
    config = {
        "ampOpenaiProviders": [
            {"name": "RawOpenAI", "baseUrl": raw.url + "/v1", "apiKey": "k", "models": ["m"]},
            {"name": "Healthy", "baseUrl": healthy_url + "/v1", "apiKey": "k", "models": ["healthy"]}],
        "claudeApiKeys": [{"name": "RawClaude", "apiKey": "k", "baseUrl": raw.url, "models": ["c"]}]}
    config.update(extra)
    return config


def ask(p: Any, client: str, model: str, stream: bool = False) -> Tuple[int, Dict[str, str], bytes]:
    """One request in the client's format; never the proxy's own internal error."""
    if client == "openai":
        body = {"model": model, "messages": [{"role": "user", "content": "Hello"}]}
        if stream:
            body["stream"] = True
        status, headers, out = request(p, "POST", "/v1/chat/completions", body)
    else:
        body = {"model": model, "max_tokens": 100, "messages": [{"role": "user", "content": "Hello"}]}
        if stream:
            body["stream"] = True
        status, headers, out = request(p, "POST", "/v1/messages", body, ANTHROPIC_HEADERS, key=None)
    assert b"internal error" not in out.lower(), out[:500]
    return status, headers, out


def error_message(client: str, body: bytes) -> str:
    """The message of an error body, checking it has the client's format."""
    obj = json.loads(body)
    if client == "anthropic":
        assert obj["type"] == "error" and isinstance(obj["error"]["type"], str), obj
    else:
        assert isinstance(obj["error"]["type"], str) and "param" in obj["error"], obj
    return obj["error"]["message"]


def events_of(body: bytes) -> List[Tuple[str, Any]]:
    """(event type, parsed data) of each event of an SSE body, any line ends (JSON data
    holds no raw CR or LF, so normalizing them is safe)."""
    out = []
    for block in body.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n\n"):
        if not block.strip() or block.startswith(b":"):
            continue
        event, data = "message", None
        for line in block.split(b"\n"):
            if line.startswith(b"event: "):
                event = line[7:].decode()
            elif line.startswith(b"data: "):
                raw = line[6:].decode()
                data = raw if raw == "[DONE]" else json.loads(raw)
        out.append((event, data))
    return out


def stream_error(client: str, body: bytes) -> Dict[str, Any]:
    """The error object of a stream's last event, checking it is an error in the format."""
    events = events_of(body)
    if client == "openai" and events[-1][1] == "[DONE]":
        events = events[:-1]
    event, data = events[-1]
    if client == "anthropic":
        assert event == "error" and data["type"] == "error", body[-400:]
    else:
        assert isinstance(data, dict) and "error" in data, body[-400:]
    return data["error"]


def streamed_text(client: str, body: bytes) -> str:
    """The text an SSE body carries, in either format."""
    text = ""
    for event, data in events_of(body):
        if not isinstance(data, dict):
            continue
        if client == "anthropic" and data.get("type") == "content_block_delta":
            text += data["delta"].get("text", "")
        elif client == "openai" and data.get("choices"):
            text += data["choices"][0]["delta"].get("content") or ""
    return text


def assert_complete_stream(client: str, body: bytes, text: str = "Hello") -> None:
    events = events_of(body)
    errors = [d for e, d in events if e == "error" or (isinstance(d, dict) and "error" in d)]
    assert not errors, errors
    assert streamed_text(client, body) == text
    if client == "anthropic":
        assert events[-1][0] == "message_stop" and not [e for e in events if e[0] == "error"]
    else:
        assert events[-1][1] == "[DONE]" or events[-1][1]["choices"][0]["finish_reason"]
        assert not [d for _, d in events if isinstance(d, dict) and "error" in d]


def assert_ok_answer(client: str, status: int, body: bytes) -> None:
    assert status == 200, body[:500]
    obj = json.loads(body)
    if client == "anthropic":
        assert obj["type"] == "message" and obj["content"][0]["text"] == "Hello"
    else:
        assert obj["choices"][0]["message"]["content"] == "Hello"


def alive(p: Any) -> None:
    """The proxy still serves normal requests, in both formats."""
    assert request(p, "GET", "/health", key=None)[0] == 200
    for client in ("openai", "anthropic"):
        status, _, body = ask(p, client, "healthy")
        assert_ok_answer(client, status, body)


def open_stream(p: Any, client: str, model: str, timeout: float = TIMEOUT) -> http.client.HTTPResponse:
    """Start a streamed request; the caller reads the response incrementally."""
    conn = http.client.HTTPConnection("127.0.0.1", p.port, timeout=timeout)
    if client == "openai":
        body = {"model": model, "stream": True, "messages": [{"role": "user", "content": "Hello"}]}
        conn.request("POST", "/v1/chat/completions", json.dumps(body),
                     {"Authorization": "Bearer proxypal-local", "Content-Type": "application/json"})
    else:
        body = {"model": model, "max_tokens": 100, "stream": True,
                "messages": [{"role": "user", "content": "Hello"}]}
        conn.request("POST", "/v1/messages", json.dumps(body),
                     dict(ANTHROPIC_HEADERS, **{"Content-Type": "application/json"}))
    resp = conn.getresponse()
    resp.conn = conn                            # closed by the caller
    return resp


def read_until(resp: http.client.HTTPResponse, needle: bytes, got: bytes = b"") -> bytes:
    while needle not in got:
        try:
            more = resp.read1(65536)
        except OSError as exc:                  # socket.timeout included
            more, failure = b"", f"{type(exc).__name__} waiting for {needle!r}; got {got[-300:]!r}"
        else:
            failure = f"stream ended before {needle!r}: {got[-300:]!r}"
        if not more:
            pytest.fail(failure)
        got += more
    return got


# -- fixtures -----------------------------------------------------------------------

@pytest.fixture
def raw_upstream():
    made: List[RawUpstream] = []

    def make(handler: Handler) -> RawUpstream:
        mock = RawUpstream(handler)
        made.append(mock)
        return mock
    yield make
    for mock in made:
        mock.close()


@pytest.fixture(autouse=True)
def no_unexpected_errors():
    """Nothing reaches the proxy's 'unexpected error' path (a bug), nor asyncio's log."""
    records: List[logging.LogRecord] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            # asyncio's "Task was destroyed but it is pending" comes from the harness
            # stopping a proxy's loop, at a time set by the garbage collector: not counted.
            if record.levelno >= logging.ERROR and (record.name == "proxypal" or record.exc_info):
                records.append(record)
    catch = Catch()
    loggers = [logging.getLogger("proxypal"), logging.getLogger("asyncio")]
    for logger in loggers:
        logger.addHandler(catch)
    yield
    for logger in loggers:
        logger.removeHandler(catch)
    assert not [r.getMessage() for r in records]


@pytest.fixture
def rig(upstream, proxy, raw_upstream):
    """make(handler, **config) -> (running proxy, raw upstream). The config routes model
    'm' to the raw upstream as an OpenAI provider, 'c' to it as an Anthropic one, and
    'healthy' to a well-behaved upstream for the proxy-still-serves checks."""
    def healthy(handler, rec):
        send(handler, 200, json.dumps(openai_completion("healthy")).encode())

    def make(handler: Handler, **extra: Any) -> Tuple[Any, RawUpstream]:
        raw = raw_upstream(handler)
        good = upstream(healthy)
        return proxy(make_config(raw, good.url, **extra)), raw
    return make


# -- broken response heads ------------------------------------------------------------

@pytest.mark.parametrize("client,kind", COMBOS, ids=COMBO_IDS)
def test_garbage_status_line_is_502_in_client_format(rig, client, kind):
    def handler(peer, req):
        peer.send(b"SSH-2.0-OpenSSH_9.6\r\nProtocol mismatch.\r\n\r\n")
        peer.close()
    p, raw = rig(handler)
    status, _, body = ask(p, client, MODEL[kind])
    msg = error_message(client, body)
    assert status == 502 and "malformed status line" in msg and "SSH-2.0" in msg
    assert PROVIDER[kind] in msg
    raw.handler = normal                        # the same upstream, healthy again
    assert_ok_answer(client, *ask(p, client, MODEL[kind])[::2])
    alive(p)


@pytest.mark.parametrize("lengths, ok", [(("{n}", "{n}"), True), (("{n}, {n}",), True),
                                         (("{n}", "{m}"), False), (("{n}, {m}",), False), (("abc",), False),
                                         (("+{n}",), False)])
def test_an_upstreams_content_length_is_one_number_or_the_answer_fails_at_once(rig, lengths, ok):
    """RFC 9112 6.3: an invalid Content-Length cannot frame the body: 502 at once, never a
    wait for a timeout (repeated equal values are one, RFC 9110 8.6)."""
    def handler(peer, req):
        body = answer_body(req)
        fields = tuple(("Content-Length", v.format(n=len(body), m=len(body) + 50)) for v in lengths)
        peer.send(head(200, (("Content-Type", "application/json"),) + fields) + body)
    p, _ = rig(handler)
    status, _, body = ask(p, "openai", "m")
    if ok:
        assert_ok_answer("openai", status, body)
    else:
        assert status == 502 and "invalid Content-Length" in error_message("openai", body), body
    alive(p)


def test_an_upstream_answer_with_both_length_and_chunked_is_never_followed_on_its_connection(rig):
    """RFC 9112 6.3: Transfer-Encoding overrides Content-Length, and the connection is
    closed after such a message (a response-splitting sign)."""
    def handler(peer, req):
        body = answer_body(req)
        peer.send(head(200, (("Content-Type", "application/json"), ("Content-Length", "5"),
                             ("Transfer-Encoding", "chunked"))) + chunk(body) + b"0\r\n\r\n")
    p, raw = rig(handler)
    for _ in range(3):
        assert_ok_answer("openai", *ask(p, "openai", "m")[::2])
    assert raw.connections == 3


def test_a_101_from_an_upstream_is_502_at_once(rig):
    def handler(peer, req):
        peer.send(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n")
    p, _ = rig(handler)
    status, _, body = ask(p, "anthropic", "c")
    assert status == 502 and "switched protocols (101)" in error_message("anthropic", body)
    alive(p)


@pytest.mark.parametrize("client,kind", COMBOS, ids=COMBO_IDS)
def test_status_line_then_close_is_502(rig, client, kind):
    def handler(peer, req):
        peer.send(b"HTTP/1.1 200 OK\r\n")
        peer.close()
    p, _ = rig(handler)
    status, _, body = ask(p, client, MODEL[kind])
    msg = error_message(client, body)
    assert status == 502 and "closed the connection without answering" in msg
    assert PROVIDER[kind] in msg and "127.0.0.1" in msg
    alive(p)


@pytest.mark.parametrize("size", [70 * 1024, 200 * 1024], ids=["70KiB", "200KiB"])
@pytest.mark.parametrize("client,kind", COMBOS[1:3], ids=COMBO_IDS[1:3])
def test_response_head_over_64kib_is_502(rig, client, kind, size):
    pads = tuple((f"X-Pad-{i}", "p" * 1000) for i in range(size // 1000 + 1))

    def handler(peer, req):
        peer.send(full_answer(req, pads))
        peer.wait_closed()
    p, _ = rig(handler)
    status, _, body = ask(p, client, MODEL[kind])
    msg = error_message(client, body)
    assert status == 502 and "response head over 65536 bytes" in msg and PROVIDER[kind] in msg
    alive(p)


@pytest.mark.parametrize("client,kind", COMBOS, ids=COMBO_IDS)
def test_head_trickled_one_byte_at_a_time_works(rig, client, kind):
    def handler(peer, req):
        body = answer_body(req)
        peer.trickle(b"HTTP/1.1 100 Continue\r\n\r\n")
        peer.trickle(head(200, (("Content-Type", "application/json"),
                                ("Content-Length", str(len(body))))))
        peer.send(body)
    p, _ = rig(handler)
    assert_ok_answer(client, *ask(p, client, MODEL[kind])[::2])
    alive(p)


@pytest.mark.parametrize("client,kind", COMBOS, ids=COMBO_IDS)
def test_interim_1xx_answers_are_skipped(rig, client, kind):
    def handler(peer, req):
        peer.send(b"HTTP/1.1 100 Continue\r\n\r\n"
                  b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n")
        normal(peer, req)
    p, raw = rig(handler)
    assert_ok_answer(client, *ask(p, client, MODEL[kind])[::2])
    status, _, body = ask(p, client, MODEL[kind], stream=True)
    assert status == 200
    assert_complete_stream(client, body)
    assert raw.connections == 1                 # interim answers leave the connection reusable
    alive(p)


# -- broken bodies ----------------------------------------------------------------------

@pytest.mark.parametrize("client,kind", COMBOS, ids=COMBO_IDS)
def test_content_length_longer_than_body_then_close_is_502(rig, client, kind):
    def handler(peer, req):
        body = answer_body(req)
        peer.send(head(200, (("Content-Type", "application/json"),
                             ("Content-Length", str(len(body) + 500)))) + body)
        peer.close()
    p, raw = rig(handler)
    status, _, body = ask(p, client, MODEL[kind])
    msg = error_message(client, body)
    assert status == 502 and "broke mid-response" in msg and "closed early" in msg
    assert PROVIDER[kind] in msg
    assert_no_half_closed_link(raw.port)
    alive(p)


@pytest.mark.parametrize("client,kind", COMBOS, ids=COMBO_IDS)
def test_invalid_chunk_size_non_stream_is_502_and_connection_closed(rig, client, kind):
    closed: "queue.Queue[bool]" = queue.Queue()

    def handler(peer, req):
        body = answer_body(req)
        peer.send(head(200, (("Content-Type", "application/json"), ("Transfer-Encoding", "chunked")))
                  + chunk(body[:10]) + b"zz-not-hex\r\n" + body[10:] + b"\r\n0\r\n\r\n")
        closed.put(peer.wait_closed(timeout=0.5))   # the upstream keeps the connection open
    p, raw = rig(handler)
    status, _, body = ask(p, client, MODEL[kind])
    msg = error_message(client, body)
    assert status == 502 and "invalid chunked framing" in msg and PROVIDER[kind] in msg
    # The broken connection is closed by the proxy at once (not left until a timeout).
    assert closed.get(timeout=TIMEOUT), "the proxy left the broken upstream connection open"
    raw.handler = normal
    assert_ok_answer(client, *ask(p, client, MODEL[kind])[::2])
    alive(p)


def stream_then(rig, client, kind, then):
    """Relay the first events of a stream to the client, then let `then(peer, req)` break
    the upstream; returns the proxy and every byte the client got."""
    relayed = threading.Event()

    def handler(peer, req):
        peer.send(head(200, SSE_CHUNKED) + b"".join(chunk(e) for e in first_events(req)))
        assert relayed.wait(TIMEOUT)            # the client has those events: now break
        then(peer, req)
    p, _ = rig(handler)
    resp = open_stream(p, client, MODEL[kind])
    try:
        assert resp.status == 200
        got = read_until(resp, b'"Hel"')
        relayed.set()
        got += resp.read()
    finally:
        relayed.set()
        resp.conn.close()
    return p, got


@pytest.mark.parametrize("client,kind", COMBOS, ids=COMBO_IDS)
def test_invalid_chunk_size_mid_stream_ends_with_error_event(rig, client, kind):
    def bad_chunk(peer, req):
        peer.send(b"-5\r\n" + b"".join(rest_events(req)) + b"\r\n0\r\n\r\n")
        peer.wait_closed()
    p, got = stream_then(rig, client, kind, bad_chunk)
    err = stream_error(client, got)
    assert "invalid chunked framing" in err["message"] and PROVIDER[kind] in err["message"]
    assert streamed_text(client, got) == "Hel"      # the events before the fault were relayed
    alive(p)


@pytest.mark.parametrize("client,kind", [c for c in COMBOS if c != ("anthropic", "claude")],
                         ids=[i for i in COMBO_IDS if i != "anthropic-passthrough"])
def test_chunked_stream_cut_mid_chunk_ends_with_error_event(rig, client, kind):
    # (anthropic-passthrough is covered in test_server.py)
    def handler(peer, req):
        peer.send(head(200, SSE_CHUNKED) + b"".join(chunk(e) for e in first_events(req))
                  + b"100\r\npartial")
        peer.close()
    p, _ = rig(handler)
    status, _, body = ask(p, client, MODEL[kind], stream=True)
    assert status == 200
    assert streamed_text(client, body) == "Hel"
    err = stream_error(client, body)
    assert "broke mid-response" in err["message"] and PROVIDER[kind] in err["message"]
    assert b"partial" not in body
    if client == "anthropic":
        assert b"message_stop" not in body and err["type"] == "api_error"
    alive(p)


@pytest.mark.parametrize("client,kind", COMBOS, ids=COMBO_IDS)
def test_chunked_body_cut_mid_chunk_non_stream_is_502(rig, client, kind):
    def handler(peer, req):
        body = answer_body(req)
        peer.send(head(200, (("Content-Type", "application/json"), ("Transfer-Encoding", "chunked")))
                  + b"%x\r\n" % len(body) + body[:20])
        peer.close()
    p, raw = rig(handler)
    status, _, body = ask(p, client, MODEL[kind])
    msg = error_message(client, body)
    assert status == 502 and "broke mid-response" in msg and PROVIDER[kind] in msg
    assert_no_half_closed_link(raw.port)
    alive(p)


@pytest.mark.parametrize("client,kind", [("anthropic", "openai"), ("openai", "claude")],
                         ids=["anthropic-to-openai", "openai-to-anthropic"])
@pytest.mark.parametrize("payload", [b"<html><body>Oops</body></html>", b"[1, 2, 3]", b""],
                         ids=["html", "json-array", "empty"])
def test_translated_non_json_200_is_clear_502(rig, client, kind, payload):
    def handler(peer, req):
        peer.send(head(200, (("Content-Type", "application/json"),
                             ("Content-Length", str(len(payload))))) + payload)
    p, raw = rig(handler)
    status, _, body = ask(p, client, MODEL[kind])
    msg = error_message(client, body)
    assert status == 502 and "not a JSON object" in msg and PROVIDER[kind] in msg
    raw.handler = normal                        # the connection went back to the pool intact
    assert_ok_answer(client, *ask(p, client, MODEL[kind])[::2])
    assert raw.connections == 1
    alive(p)


@pytest.mark.parametrize("client,kind", [("openai", "openai"), ("anthropic", "claude")],
                         ids=["openai-passthrough", "anthropic-passthrough"])
def test_passthrough_non_json_200_is_a_clear_502_too(rig, client, kind):
    """A captive portal's page or a cut answer with status 200 is the upstream's failure,
    whether or not the formats match: the client gets 502 in its own format naming the
    provider and what it sent."""
    payload = b"plain words, not JSON \xe2\x9c\x93"

    def handler(peer, req):
        peer.send(head(200, (("Content-Type", "text/plain; charset=utf-8"),
                             ("Content-Length", str(len(payload))))) + payload)
    p, raw = rig(handler)
    status, headers, body = ask(p, client, MODEL[kind])
    msg = error_message(client, body)
    assert status == 502 and headers["content-type"].startswith("application/json")
    assert PROVIDER[kind] in msg and "answered 200 with text/plain that is not a JSON object" in msg
    assert "plain words, not JSON" in msg
    raw.handler = normal                        # the connection went back to the pool intact
    assert_ok_answer(client, *ask(p, client, MODEL[kind])[::2])
    alive(p)


NGINX_502 = (b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
             b"<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx/1.24.0</center>\r\n"
             b"</body>\r\n</html>\r\n")


@pytest.mark.parametrize("client,kind", COMBOS, ids=COMBO_IDS)
def test_nginx_html_502_page_becomes_client_format_error(rig, client, kind):
    def handler(peer, req):
        peer.send(head(502, (("Server", "nginx/1.24.0"), ("Content-Type", "text/html"),
                             ("Content-Length", str(len(NGINX_502)))), "Bad Gateway") + NGINX_502)
    p, _ = rig(handler)
    for stream in (False, True):
        status, headers, body = ask(p, client, MODEL[kind], stream=stream)
        assert status == 502 and headers["content-type"].startswith("application/json")
        msg = error_message(client, body)
        assert PROVIDER[kind] in msg and "502 Bad Gateway" in msg and "nginx/1.24.0" in msg
        assert "<" not in msg and ">" not in msg
    alive(p)


@pytest.mark.parametrize("client,stream", [("anthropic", False), ("openai", False), ("anthropic", True),
                                           ("openai", True)],
                         ids=["anthropic-passthrough", "openai-to-anthropic",
                              "anthropic-passthrough-stream", "openai-to-anthropic-stream"])
def test_503_with_retry_after_fails_over_to_second_credential(upstream, proxy, raw_upstream, client,
                                                             stream):
    dropped = threading.Event()

    def unavailable(peer, req):
        body = b'{"type":"error","error":{"type":"overloaded_error","message":"busy"}}'
        peer.send(head(503, (("Retry-After", "30"), ("Content-Type", "application/json"),
                             ("Content-Length", str(len(body)))), "Service Unavailable") + body)
        if peer.wait_closed():
            dropped.set()
    first, second = raw_upstream(unavailable), raw_upstream(normal)
    p = proxy({"requestRetry": 1, "routingStrategy": "fill-first", "claudeApiKeys": [
        {"name": "First", "apiKey": "k1", "baseUrl": first.url, "models": ["c"]},
        {"name": "Second", "apiKey": "k2", "baseUrl": second.url, "models": ["c"]}]})
    status, _, body = ask(p, client, "c", stream=stream)
    if stream:
        assert status == 200
        assert_complete_stream(client, body)
    else:
        assert_ok_answer(client, status, body)
    assert len(first.all) == 1 and len(second.all) == 1
    assert first.last().headers["x-api-key"] == "k1" and second.last().headers["x-api-key"] == "k2"
    assert dropped.wait(TIMEOUT)                # the 503's connection was dropped


# -- timeouts -----------------------------------------------------------------------------

@pytest.mark.parametrize("client,kind,stream", [("anthropic", "claude", False), ("openai", "claude", True),
                                                ("anthropic", "openai", True)],
                         ids=["anthropic-passthrough", "openai-to-anthropic-stream",
                              "anthropic-to-openai-stream"])
def test_upstream_that_never_answers_is_504(rig, client, kind, stream):
    saw_close = threading.Event()

    def handler(peer, req):
        if peer.wait_closed():                  # accepted, read the request, said nothing
            saw_close.set()
    p, _ = rig(handler, firstByteTimeoutSeconds=SHORT)
    t0 = time.monotonic()
    status, _, body = ask(p, client, MODEL[kind], stream=stream)
    msg = error_message(client, body)
    assert status == 504 and "firstByteTimeoutSeconds" in msg and PROVIDER[kind] in msg
    assert f"{SHORT:g}s" in msg and time.monotonic() - t0 < SHORT + 3
    if client == "anthropic":
        assert json.loads(body)["error"]["type"] == "timeout_error"
    assert saw_close.wait(TIMEOUT)              # the proxy hung up on the silent upstream
    alive(p)


@pytest.mark.parametrize("client,kind", COMBOS, ids=COMBO_IDS)
def test_silence_mid_stream_ends_with_504_error_event(rig, client, kind):
    def handler(peer, req):
        peer.send(head(200, SSE_CHUNKED) + b"".join(chunk(e) for e in first_events(req)))
        peer.wait_closed()                      # then silence, until the proxy gives up
    p, _ = rig(handler, readTimeoutSeconds=SHORT)
    status, _, body = ask(p, client, MODEL[kind], stream=True)
    assert status == 200
    assert streamed_text(client, body) == "Hel"
    err = stream_error(client, body)
    assert f"upstream sent nothing for {SHORT:g}s (readTimeoutSeconds)" in err["message"]
    assert PROVIDER[kind] in err["message"]
    if client == "anthropic":
        assert err["type"] == "timeout_error"
    alive(p)


@pytest.mark.parametrize("client,kind", [("anthropic", "claude"), ("openai", "claude")],
                         ids=["anthropic-passthrough", "openai-to-anthropic"])
def test_silence_after_stream_head_before_any_event_is_504(rig, client, kind):
    def handler(peer, req):
        peer.send(head(200, SSE_CHUNKED))
        peer.wait_closed()
    p, _ = rig(handler, readTimeoutSeconds=SHORT)
    status, _, body = ask(p, client, MODEL[kind], stream=True)
    msg = error_message(client, body)
    assert status == 504 and "readTimeoutSeconds" in msg and PROVIDER[kind] in msg
    alive(p)


# -- connection resets and the pool ------------------------------------------------------

@pytest.mark.parametrize("client,kind", COMBOS, ids=COMBO_IDS)
def test_reset_mid_stream_ends_with_error_event(rig, client, kind):
    p, got = stream_then(rig, client, kind, lambda peer, req: peer.reset())
    assert streamed_text(client, got) == "Hel"
    err = stream_error(client, got)
    assert "broke mid-response" in err["message"] and PROVIDER[kind] in err["message"]
    alive(p)


@pytest.mark.parametrize("client,kind", [("openai", "openai"), ("anthropic", "openai")],
                         ids=["openai-passthrough", "anthropic-to-openai"])
@pytest.mark.parametrize("how", ["fin", "rst"])
def test_pooled_connection_closed_by_upstream_is_retried_once(rig, client, kind, how):
    """Connection 1 answers, then on its next request closes without a byte (the race of
    an idle timeout with a new request): the proxy retries once on a fresh connection."""
    def handler(peer, req):
        if peer.conn_no == 1 and len([r for r in raw.all if r.conn_no == 1]) == 2:
            peer.close() if how == "fin" else peer.reset()
            return
        normal(peer, req)
    p, raw = rig(handler)
    for stream in (False, True):
        status, _, body = ask(p, client, MODEL[kind], stream=stream)
        assert status == 200, body
    assert_complete_stream(client, body)
    assert raw.connections == 2 and len(raw.all) == 3
    assert raw.all[1].body == raw.all[2].body and raw.all[2].conn_no == 2
    alive(p)


def test_idle_pooled_connections_closed_between_requests(rig):
    closed = queue.Queue()

    def handler(peer, req):
        normal(peer, req)
        peer.close()                            # an idle-timeout close right after answering
        closed.put(peer)
    p, raw = rig(handler)
    for i in range(4):
        assert_ok_answer("openai", *ask(p, "openai", "m")[::2])
        closed.get(timeout=TIMEOUT)
    assert raw.connections == 4 and len(raw.all) == 4
    alive(p)


def test_retry_on_fresh_connection_is_not_repeated(rig):
    """Only a reused connection gets the one retry: a fresh one that closes is a 502."""
    def handler(peer, req):
        peer.close()
    p, raw = rig(handler)
    status, _, body = ask(p, "anthropic", "c")
    assert status == 502 and "closed the connection without answering" in error_message("anthropic", body)
    assert len(raw.all) == 1
    alive(p)


@pytest.mark.parametrize("upstream_closes", [True, False], ids=["upstream-closes", "upstream-lingers"])
def test_connection_close_on_every_response_means_no_reuse(rig, upstream_closes):
    lingering = queue.Queue()

    def handler(peer, req):
        if req.json().get("stream"):
            peer.send(head(200, SSE_CHUNKED + (("Connection", "close"),))
                      + b"".join(chunk(e) for e in stream_events(req)) + b"0\r\n\r\n")
        else:
            peer.send(full_answer(req, (("Connection", "close"),)))
        if upstream_closes:
            peer.close()
        else:
            lingering.put(peer.wait_closed(timeout=0.5))
    p, raw = rig(handler)
    for i, (client, kind, stream) in enumerate([("openai", "openai", False), ("anthropic", "claude", False),
                                                ("anthropic", "openai", True), ("openai", "claude", True),
                                                ("openai", "openai", False)]):
        status, _, body = ask(p, client, MODEL[kind], stream=stream)
        if stream:
            assert status == 200
            assert_complete_stream(client, body)
        else:
            assert_ok_answer(client, status, body)
        if not upstream_closes:              # the proxy closes what it will not reuse
            assert lingering.get(timeout=TIMEOUT), "the proxy left a Connection: close link open"
    assert raw.connections == 5 and [r.conn_no for r in raw.all] == [1, 2, 3, 4, 5]
    alive(p)


# -- odd event streams --------------------------------------------------------------------

def garbage_between(events: List[bytes], junk: List[bytes]) -> List[bytes]:
    out = [events[0]]
    for event in events[1:]:
        out += junk + [event]
    return out


@pytest.mark.parametrize("client,kind", [("anthropic", "openai"), ("openai", "claude")],
                         ids=["anthropic-to-openai", "openai-to-anthropic"])
def test_translated_stream_skips_events_that_are_not_json_objects(rig, client, kind):
    junk = [b"data: this is not json\n\n", b"data: [1, 2, 3]\n\n", b"event: content_block_delta\ndata: [\"x\"]\n\n",
            b'data: "a string"\n\n', b"data: {truncated\n\n", b"data: null\n\n"]

    def handler(peer, req):
        peer.send(head(200, SSE_CHUNKED) + b"".join(chunk(e) for e in garbage_between(stream_events(req), junk))
                  + b"0\r\n\r\n")
    p, _ = rig(handler)
    status, _, body = ask(p, client, MODEL[kind], stream=True)
    assert status == 200
    assert_complete_stream(client, body)
    alive(p)


@pytest.mark.parametrize("client,kind", [("anthropic", "openai"), ("openai", "claude")],
                         ids=["anthropic-to-openai", "openai-to-anthropic"])
def test_translated_stream_of_only_garbage_is_an_http_error(rig, client, kind):
    def handler(peer, req):
        peer.send(head(200, SSE_CHUNKED) + chunk(b"data: [1]\n\n") + chunk(b"data: nope\n\n")
                  + b"0\r\n\r\n")
    p, _ = rig(handler)
    status, _, body = ask(p, client, MODEL[kind], stream=True)
    # nothing the client could use came before the end: an HTTP error, as for any
    # failure before the stream's first event (another credential could be asked)
    assert status == 502
    assert "ended the stream before sending any event" in error_message(client, body)
    alive(p)


def test_translated_first_error_event_with_garbage_data_is_an_http_error(rig):
    def handler(peer, req):
        peer.send(head(200, SSE_CHUNKED) + chunk(b"event: error\ndata: [1, 2]\n\n") + b"0\r\n\r\n")
    p, _ = rig(handler)
    status, _, body = ask(p, "openai", "c", stream=True)
    assert status >= 400 and "RawClaude" in error_message("openai", body)
    alive(p)


def crlf(event: bytes) -> bytes:
    return event.replace(b"\n", b"\r\n")


def lone_cr(event: bytes) -> bytes:
    return event.replace(b"\n", b"\r")


def with_comments(events: List[bytes], eol: bytes) -> List[bytes]:
    """A comment block first, a comment line inside every event, a comment block between
    events (none after the last: see test_comments_after_final_event_are_not_an_early_end)."""
    out = [b": OPENROUTER PROCESSING" + eol + eol]
    for i, event in enumerate(events):
        out += ([b": ping" + eol + eol] if i else []) + [b": note" + eol + event]
    return out


lf_events = events_of


@pytest.mark.parametrize("eol,convert", [(b"\r\n", crlf), (b"\r", lone_cr)], ids=["crlf", "cr"])
@pytest.mark.parametrize("client,kind", COMBOS, ids=COMBO_IDS)
def test_sse_line_ends_and_comments(rig, client, kind, eol, convert):
    def handler(peer, req):
        events = with_comments([convert(e) for e in stream_events(req)], eol)
        peer.send(head(200, SSE_CHUNKED) + b"".join(chunk(e) for e in events) + b"0\r\n\r\n")
    p, _ = rig(handler)
    status, _, body = ask(p, client, MODEL[kind], stream=True)
    assert status == 200
    if (client, kind) in (("openai", "openai"), ("anthropic", "claude")):
        # pass-through: the upstream's events, and no error event added; with CRLF the
        # very bytes (a lone CR at the end of a read may be half a CRLF, so the last
        # event's line ends may be completed)
        events = ANTHROPIC_STREAM if kind == "claude" else OPENAI_STREAM
        sent = b"".join(with_comments([convert(e) for e in events], eol))
        assert lf_events(body) == lf_events(sent)
        if eol == b"\r\n":
            assert body == sent
    else:
        assert_complete_stream(client, body)
    alive(p)


@pytest.mark.parametrize("client,kind", [("openai", "openai"), ("anthropic", "openai")],
                         ids=["openai-passthrough", "anthropic-to-openai"])
def test_lone_cr_events_reach_client_before_the_next_is_sent(rig, client, kind):
    """An event ending in CR CR is complete: it must not wait for the upstream's next bytes."""
    allowed = [threading.Event() for _ in OPENAI_STREAM]

    def handler(peer, req):
        peer.send(head(200, SSE_CHUNKED))
        for i, event in enumerate(OPENAI_STREAM):
            if i:
                assert allowed[i].wait(TIMEOUT), f"event {i - 1} never reached the client"
            peer.send(chunk(lone_cr(event)))
        peer.send(b"0\r\n\r\n")
    p, _ = rig(handler)
    needles = ([b'"content":""', b'"Hel"', b'"lo"'] if client == "openai"
               else [b"message_start", b'"Hel"', b'"lo"'])
    resp = open_stream(p, client, MODEL[kind], timeout=0.5)
    try:
        got = b""
        for i, needle in enumerate(needles):
            got = read_until(resp, needle, got)   # a timeout here: the event was held back
            allowed[i + 1].set()
        got += resp.read()
    finally:
        for e in allowed:
            e.set()
        resp.conn.close()
    assert_complete_stream(client, got)
    alive(p)


@pytest.mark.parametrize("client,kind", COMBOS, ids=COMBO_IDS)
def test_comments_after_final_event_are_not_an_early_end(rig, client, kind):
    """Keep-alive comments after a finished stream (a proxy in front pinging) change nothing."""
    def events(req):
        return stream_events(req) + [b": ping\n\n"] * 3

    def handler(peer, req):
        peer.send(head(200, SSE_CHUNKED) + b"".join(chunk(e) for e in events(req)) + b"0\r\n\r\n")
    p, raw = rig(handler)
    status, _, body = ask(p, client, MODEL[kind], stream=True)
    assert status == 200
    assert_complete_stream(client, body)
    if (client, kind) == ("openai", "openai"):
        assert body == b"".join(events(raw.last()))
    if (client, kind) == ("anthropic", "claude"):
        assert body == b"".join(anthropic_stream_named(MODEL[kind]) + [b": ping\n\n"] * 3)
    alive(p)


@pytest.mark.parametrize("client,kind", COMBOS, ids=COMBO_IDS)
def test_huge_single_event_relayed_intact(rig, client, kind):
    text = ("0123456789abcdef" * 65536)         # 1 MiB of text in one event
    anthropic_big = ('event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
                     '"delta":{"type":"text_delta","text":"%s"}}\n\n' % text).encode()
    openai_big = ('data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"gpt-x",'
                  '"choices":[{"index":0,"delta":{"content":"%s"},"finish_reason":null}]}\n\n' % text).encode()

    def handler(peer, req):
        if req.anthropic:
            events = ANTHROPIC_STREAM[:2] + [anthropic_big] + ANTHROPIC_STREAM[2:]
        else:
            events = OPENAI_STREAM[:1] + [openai_big] + OPENAI_STREAM[1:]
        body = b"".join(events)
        # one 1 MiB chunk for the big event, plus a second chunk boundary inside it
        peer.send(head(200, SSE_CHUNKED) + chunk(body[:len(body) // 3]) + chunk(body[len(body) // 3:])
                  + b"0\r\n\r\n")
    p, _ = rig(handler)
    status, _, body = ask(p, client, MODEL[kind], stream=True)
    assert status == 200
    assert_complete_stream(client, body, text + "Hello")
    if (client, kind) == ("anthropic", "claude"):
        assert anthropic_big in body
    elif (client, kind) == ("openai", "openai"):
        assert openai_big in body
    alive(p)


def test_upstream_header_with_bare_lf_cannot_forge_a_header(upstream, proxy):
    def respond(handler, rec):
        body = json.dumps(openai_completion()).encode()
        handler.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                            b"X-Request-Id: abc\nSet-Cookie: sid=evil\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    up = upstream(respond)
    p = proxy({"ampOpenaiProviders": [mock_provider(up.url)]})
    status, headers, _ = request(p, "POST", "/v1/chat/completions", {"model": "m", "messages": []})
    assert status == 200 and "set-cookie" not in headers


# -- a client that leaves before the answer -------------------------------------------

@pytest.mark.parametrize("how", ["close", "half-close"])
@pytest.mark.parametrize("client,kind", COMBOS, ids=COMBO_IDS)
def test_a_non_stream_client_that_leaves_stops_the_upstream_request(rig, client, kind, how):
    """The upstream is still thinking when the client closes (or half-closes) its
    connection: the proxy closes the upstream request at once instead of waiting for an
    answer nobody reads (and that costs the user tokens)."""
    thinking = threading.Event()
    closed: "queue.Queue[bool]" = queue.Queue()

    def handler(peer, req):
        thinking.set()
        closed.put(peer.wait_closed())         # the upstream never answers by itself
    p, _ = rig(handler)
    path, headers, body = ("/v1/chat/completions", {"Authorization": "Bearer proxypal-local"},
                           {"model": MODEL[kind], "messages": [{"role": "user", "content": "Hi"}]}) \
        if client == "openai" else ("/v1/messages", ANTHROPIC_HEADERS,
                                    {"model": MODEL[kind], "max_tokens": 9, "messages": [{"role": "user", "content": "Hi"}]})
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", p.port), timeout=TIMEOUT)
    head_lines = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{head_lines}"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    assert thinking.wait(TIMEOUT)
    if how == "close":
        sock.close()
    else:
        sock.shutdown(socket.SHUT_WR)
    assert closed.get(timeout=TIMEOUT) is True, "the upstream request was left running"
    if how == "half-close":
        sock.close()
    alive(p)


# -- bytes nobody asked for, stream answers to plain requests, ends after the end ---------

@pytest.mark.parametrize("extra", ["second-answer-behind-the-body", "408-while-idle"])
def test_a_pooled_connection_with_unasked_bytes_is_never_reused(rig, extra):
    """Bytes past an answer's body (a wrong Content-Length, a second answer) or sent while
    the connection sat idle (a 408 before a close) must not become the next request's
    answer: such a connection goes, and the next request gets its own answer."""
    stale = json.dumps(openai_completion("m", "STALE")).encode()
    sent_late = threading.Event()

    def handler(peer, req):
        if peer.conn_no > 1:
            return normal(peer, req)
        if extra == "second-answer-behind-the-body":
            peer.send(full_answer(req) + head(200, (("Content-Type", "application/json"),
                                                    ("Content-Length", str(len(stale))))) + stale)
        else:
            peer.send(full_answer(req))
            peer.send(head(408, (("Connection", "close"), ("Content-Length", "15")),
                           "Request Timeout") + b"Request Timeout")
            sent_late.set()
            peer.wait_closed()
    p, raw = rig(handler)
    assert_ok_answer("openai", *ask(p, "openai", "m")[::2])
    if extra == "408-while-idle":
        assert sent_late.wait(TIMEOUT)
        deadline = time.monotonic() + TIMEOUT
        while not p.call(_buffered(p)) and time.monotonic() < deadline:
            time.sleep(0.01)                # (the loop reads the late bytes on its own time)
    for client in ("openai", "anthropic"):
        status, _, body = ask(p, client, "m")
        assert_ok_answer(client, status, body)
    assert raw.connections >= 2 and [r.conn_no for r in raw.all][1:] != [1, 1]


async def _buffered(p: Any) -> bool:
    """Some pooled connection holds bytes it was sent while idle."""
    return any(link.reader._buffer for links in p.server.client._idle.values() for link in links)


@pytest.mark.parametrize("client,kind", COMBOS, ids=COMBO_IDS)
def test_a_stream_answering_a_plain_request_is_a_clear_502_and_the_upstream_closed(rig, client,
                                                                                    kind):
    closed = threading.Event()

    def handler(peer, req):
        peer.send(head(200, SSE_CHUNKED) + b"".join(chunk(e) for e in first_events(req)))
        if peer.wait_closed():
            closed.set()
    p, _ = rig(handler)
    status, _, body = ask(p, client, MODEL[kind])
    assert status == 502 and "stream" in error_message(client, body)
    assert PROVIDER[kind] in error_message(client, body)
    assert closed.wait(TIMEOUT)                 # not left generating until readTimeoutSeconds
    alive(p)


@pytest.mark.parametrize("client,kind", COMBOS, ids=COMBO_IDS)
def test_a_committed_stream_answered_whole_gets_the_answer_as_events(rig, client, kind):
    """firstByteCommitSeconds opened the client's stream; the upstream then ignores
    stream: true and answers with one JSON body: its content is replayed into the open
    stream, which ends as a complete stream (it was an error event holding SSE text)."""
    def handler(peer, req):
        time.sleep(SHORT * 3)                   # past the commit
        peer.send(full_answer(req))
    p, _ = rig(handler, firstByteCommitSeconds=SHORT)
    status, _, body = ask(p, client, MODEL[kind], stream=True)
    assert status == 200
    assert_complete_stream(client, body)
    alive(p)


def test_a_responses_relay_held_open_after_a_large_last_event_ends_after_the_grace(raw_upstream, proxy,
                                                                                     monkeypatch):
    """response.completed repeats the whole answer: the last event's start may be far from
    the end of the read."""
    monkeypatch.setattr(proxypal, "STREAM_END_GRACE", SHORT)
    text = "x" * 6000
    resp = {"id": "resp_1", "object": "response", "status": "completed", "model": "r", "usage": {
        "input_tokens": 1, "output_tokens": 1, "total_tokens": 2}, "output": [
        {"id": "m1", "type": "message", "role": "assistant", "status": "completed",
         "content": [{"type": "output_text", "text": text, "annotations": []}]}]}
    events = [(kind, dict(fields, type=kind, sequence_number=n)) for n, (kind, fields) in enumerate([
        ("response.created", {"response": dict(resp, status="in_progress", output=[])}),
        ("response.output_text.delta", {"item_id": "m1", "output_index": 0, "content_index": 0, "delta": text}),
        ("response.completed", {"response": resp})])]
    hung_up = threading.Event()

    def handler(peer, req):
        peer.send(head(200, SSE_CHUNKED) + b"".join(
            chunk(b"event: %s\ndata: %s\n\n" % (k.encode(), json.dumps(e).encode())) for k, e in events))
        if peer.wait_closed():
            hung_up.set()
    raw = raw_upstream(handler)
    p = proxy({"ampOpenaiProviders": [{"name": "R", "baseUrl": raw.url + "/v1", "apiKey": "k",
                                       "models": ["r"], "wireApi": "responses"}],
               "readTimeoutSeconds": TIMEOUT * 3})      # (longer than the test client waits)
    status, _, body, complete = request_stream(p, "POST", "/v1/responses",
                                               {"model": "r", "input": "hi", "stream": True})
    assert status == 200 and complete and b"response.completed" in body
    assert hung_up.wait(TIMEOUT)


@pytest.mark.parametrize("client,kind", COMBOS, ids=COMBO_IDS)
@pytest.mark.parametrize("how", ["close-without-last-chunk", "reset", "held-open"])
def test_a_failure_after_the_streams_last_event_leaves_the_stream_complete(rig, client, kind, how,
                                                                            monkeypatch):
    """Held open: the last event came but the body never ends. The client's SDK reads to
    the body's end, so the proxy ends it after STREAM_END_GRACE, not readTimeoutSeconds
    (here longer than the test client waits), and hangs up on the upstream."""
    monkeypatch.setattr(proxypal, "STREAM_END_GRACE", SHORT)
    hung_up = threading.Event()

    def handler(peer, req):
        peer.send(head(200, SSE_CHUNKED) + b"".join(chunk(e) for e in stream_events(req)))
        if how == "held-open":
            if peer.wait_closed():
                hung_up.set()
        else:
            peer.close() if how == "close-without-last-chunk" else peer.reset()
    p, _ = rig(handler, readTimeoutSeconds=TIMEOUT * 3)
    status, _, body = ask(p, client, MODEL[kind], stream=True)
    assert status == 200
    assert_complete_stream(client, body)
    assert how != "held-open" or hung_up.wait(TIMEOUT)
    alive(p)


OVERLOADED = (b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error",'
              b'"message":"Overloaded"}}\n\n')


@pytest.mark.parametrize("client", ["anthropic", "openai"])
@pytest.mark.parametrize("reads", [1, 2], ids=["one-read", "split-across-reads"])
def test_an_error_as_a_streams_first_event_fails_over_to_the_next_credential(proxy, raw_upstream,
                                                                            client, reads):
    """Anthropic documents overloaded_error arriving inside a 200 stream; before anything
    went to the client, it is the next credential's turn, as for a 529 status, however
    the event arrives."""
    def busy(peer, req):
        cut = 30 if reads == 2 else len(OVERLOADED)
        peer.send(head(200, SSE_CHUNKED) + chunk(OVERLOADED[:cut]))
        if reads == 2:
            time.sleep(0.05)                 # (the rest in a later read, most likely)
            peer.send(chunk(OVERLOADED[cut:]))
        peer.send(b"0\r\n\r\n")
    first, second = raw_upstream(busy), raw_upstream(normal)
    p = proxy({"requestRetry": 1, "routingStrategy": "fill-first", "claudeApiKeys": [
        {"name": "First", "apiKey": "k1", "baseUrl": first.url, "models": ["c"]},
        {"name": "Second", "apiKey": "k2", "baseUrl": second.url, "models": ["c"]}]})
    status, _, body = ask(p, client, "c", stream=True)
    assert status == 200
    assert_complete_stream(client, body)
    assert len(first.all) == 1 and len(second.all) == 1


def test_a_responses_relay_ended_by_the_upstreams_error_fails_with_its_words(proxy, raw_upstream):
    """A Responses stream whose upstream stopped at its own error event: one
    response.failed (what Codex acts on) with the upstream's words, numbered after it; not a
    second error, nor a message about a missing response.completed."""
    events = [b'event: response.created\ndata: {"type":"response.created","sequence_number":0,'
              b'"response":{"id":"resp_1","object":"response","status":"in_progress","output":[]}}\n\n',
              b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta",'
              b'"sequence_number":1,"item_id":"m1","output_index":0,"content_index":0,"delta":"Hel"}\n\n',
              b'event: error\ndata: {"type":"error","sequence_number":2,"code":"server_error",'
              b'"message":"boom","param":null}\n\n']

    def handler(peer, req):
        peer.send(head(200, SSE_CHUNKED) + b"".join(chunk(e) for e in events) + b"0\r\n\r\n")
    raw = raw_upstream(handler)
    p = proxy({"ampOpenaiProviders": [{"name": "RawResponses", "baseUrl": raw.url + "/v1",
                                       "apiKey": "k", "models": ["r"], "wireApi": "responses"}]})
    status, _, body = request(p, "POST", "/v1/responses", {"model": "r", "input": "Hello",
                                                           "stream": True})
    assert status == 200 and raw.last().path == "/v1/responses"
    got = events_of(body)
    assert [e for e, _ in got].count("error") == 1, got
    assert got[-1][0] == "response.failed"
    assert "boom" in got[-1][1]["response"]["error"]["message"]
    assert got[-1][1]["sequence_number"] == 3


def test_a_stream_event_over_the_limit_ends_the_stream(rig, monkeypatch):
    monkeypatch.setattr(proxypal, "MAX_STREAM_EVENT", 64 * 1024)

    def handler(peer, req):
        peer.send(head(200, SSE_CHUNKED) + chunk(first_events(req)[0]))
        piece = b"x" * 16384
        peer.send(chunk(b'data: {"id":"c1","choices":[{"delta":{"content":"'))
        for _ in range(8):
            if not peer.send(chunk(piece)):
                return
        peer.wait_closed()
    p, _ = rig(handler)
    status, _, body = ask(p, "openai", "m", stream=True)
    assert status == 200
    assert "stream event over 65536 bytes" in stream_error("openai", body)["message"]
    alive(p)


def test_an_answer_that_breaks_after_it_began_is_never_asked_of_another_credential(proxy,
                                                                                    raw_upstream):
    """The first upstream ran the request (200, then its body broke): asking the next
    credential would run and bill it twice."""
    def broken(peer, req):
        body = answer_body(req)
        peer.send(head(200, (("Content-Type", "application/json"),
                             ("Content-Length", str(len(body) + 500)))) + body)
        peer.close()
    first, second = raw_upstream(broken), raw_upstream(normal)
    p = proxy({"requestRetry": 1, "routingStrategy": "fill-first", "claudeApiKeys": [
        {"name": "First", "apiKey": "k1", "baseUrl": first.url, "models": ["c"]},
        {"name": "Second", "apiKey": "k2", "baseUrl": second.url, "models": ["c"]}]})
    status, _, body = ask(p, "anthropic", "c")
    assert status == 502 and "broke mid-response" in error_message("anthropic", body)
    assert len(first.all) == 1 and len(second.all) == 0


# -- what is not a stream's end: the grace after the last event must not cut it ----------

def paused_before(index: int, seconds: float = SHORT * 3):
    def gate(i: int) -> None:
        if i == index:
            time.sleep(seconds)             # the model pauses, longer than the grace
    return gate


def data_event(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def test_a_gemini_relay_whose_call_has_an_argument_named_finishReason_is_not_cut(upstream, proxy,
                                                                                  monkeypatch):
    monkeypatch.setattr(proxypal, "STREAM_END_GRACE", SHORT)
    events = [data_event({"candidates": [{"content": {"role": "model", "parts": [
                  {"functionCall": {"name": "set_job", "args": {"finishReason": "manual"}}}]}}]}),
              data_event({"candidates": [{"content": {"role": "model", "parts": [
                  {"functionCall": {"name": "notify", "args": {}}}]}, "finishReason": "STOP"}]})]
    up = upstream(sse_answer(events, gate=paused_before(1)))
    p = proxy({"geminiApiKeys": [{"apiKey": "k", "baseUrl": up.url, "models": ["gemini-x"]}]})
    status, _, body, complete = request_stream(
        p, "POST", "/v1beta/models/gemini-x:streamGenerateContent?alt=sse",
        {"contents": [{"role": "user", "parts": [{"text": "go"}]}]})
    assert status == 200 and complete
    assert b'"notify"' in body and b'"STOP"' in body, body


def test_an_openai_relay_whose_text_quotes_done_is_not_cut(upstream, proxy, monkeypatch):
    monkeypatch.setattr(proxypal, "STREAM_END_GRACE", SHORT)
    base = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    events = [data_event(dict(base, choices=[{"index": 0, "delta": {"content": "A"}, "finish_reason": "stop"}])),
              data_event(dict(base, choices=[{"index": 1, "delta": {
                  "content": 'a stream ends with "data: [DONE]\n\n"'}, "finish_reason": None}])),
              data_event(dict(base, choices=[{"index": 1, "delta": {"content": " then closes."},
                                              "finish_reason": "stop"}])),
              b"data: [DONE]\n\n"]
    up = upstream(sse_answer(events, gate=paused_before(2)))
    p = proxy({"ampOpenaiProviders": [{"name": "O", "baseUrl": up.url + "/v1", "apiKey": "k", "models": ["m"]}]})
    status, _, body, complete = request_stream(p, "POST", "/v1/chat/completions", {
        "model": "m", "n": 2, "stream": True, "messages": [{"role": "user", "content": "hi"}]})
    assert status == 200 and complete
    assert b"then closes" in body and body.rstrip().endswith(b"data: [DONE]"), body


@pytest.mark.parametrize("commit", [False, True], ids=["not-committed", "committed"])
def test_a_stream_failed_over_to_a_translated_upstream_names_tools_back(upstream, proxy, commit):
    """Gemini CLI's files.read goes to an OpenAI upstream as a stand-in, after the Gemini
    credential answered 503; committed first or not, the client sees its own name."""
    stand_in = proxypal.stand_in_name("files.read")
    base = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "g"}
    answer = [data_event(dict(base, choices=[{"index": 0, "delta": {"role": "assistant", "tool_calls": [
                  {"index": 0, "id": "call_1", "type": "function",
                   "function": {"name": stand_in, "arguments": '{"path":"a"}'}}]}, "finish_reason": None}])),
              data_event(dict(base, choices=[{"index": 0, "delta": {}, "finish_reason": "tool_calls"}])),
              b"data: [DONE]\n\n"]

    def gemini_busy(handler, rec):
        if commit:
            time.sleep(SHORT * 3)           # silent past firstByteCommitSeconds
        send(handler, 503, json.dumps({"error": {"code": 503, "message": "overloaded",
                                                 "status": "UNAVAILABLE"}}).encode())
    g, o = upstream(gemini_busy), upstream(sse_answer(answer))
    p = proxy({"geminiApiKeys": [{"apiKey": "k", "baseUrl": g.url, "models": ["g"]}],
               "ampOpenaiProviders": [{"name": "O", "baseUrl": o.url + "/v1", "apiKey": "k", "models": ["g"]}],
               "requestRetry": 1, "routingStrategy": "fill-first", "firstByteCommitSeconds": SHORT})
    status, _, body, _ = request_stream(p, "POST", "/v1beta/models/g:streamGenerateContent?alt=sse", {
        "contents": [{"role": "user", "parts": [{"text": "read a"}]}],
        "tools": [{"functionDeclarations": [{"name": "files.read", "parameters": {
            "type": "object", "properties": {"path": {"type": "string"}}}}]}]})
    assert status == 200
    assert json.loads(o.last().body)["tools"][0]["function"]["name"] == stand_in
    names = [part["functionCall"]["name"] for line in body.split(b"\n") if line.startswith(b"data: ")
             for c in json.loads(line[6:]).get("candidates", [])
             for part in c.get("content", {}).get("parts", []) if "functionCall" in part]
    assert names == ["files.read"], body


GOOGLE_ERROR = (b'{\n  "error": {\n    "code": 503,\n    "message": "The model is overloaded. '
                b'Please try again later.",\n    "status": "UNAVAILABLE"\n  }\n}\n')


def test_googles_own_error_with_its_blank_line_is_relayed_once(upstream, proxy):
    up = upstream(sse_answer([b'data: {"candidates":[{"content":{"role":"model","parts":[{"text":"Hel"}]},'
                              b'"index":0}]}\n\n', GOOGLE_ERROR + b"\n"]))
    p = proxy({"geminiApiKeys": [{"apiKey": "g", "baseUrl": up.url, "models": ["gemini-x"]}]})
    status, _, body, complete = request_stream(
        p, "POST", "/v1beta/models/gemini-x:streamGenerateContent?alt=sse",
        {"contents": [{"role": "user", "parts": [{"text": "Hi"}]}]})
    assert status == 200 and complete and body.count(b'"error"') == 1, body


@pytest.mark.parametrize("client", ["gemini", "anthropic"])
def test_googles_own_error_mid_stream_keeps_its_status_and_words(upstream, proxy, client):
    """Google ends a failing alt=sse stream with a bare JSON object, line by line, not a
    data: event. A Gemini client gets it as such (its SDK raises ApiError 503, which Gemini
    CLI retries), in a body that ends cleanly; another client gets it in its own format."""
    up = upstream(sse_answer([b'data: {"candidates":[{"content":{"role":"model","parts":[{"text":"Hel"}]},'
                              b'"index":0}]}\r\n\r\n', GOOGLE_ERROR]))
    p = proxy({"geminiApiKeys": [{"apiKey": "g", "baseUrl": up.url, "models": ["gemini-x"]}]})
    if client == "gemini":
        status, _, body, complete = request_stream(
            p, "POST", "/v1beta/models/gemini-x:streamGenerateContent?alt=sse",
            {"contents": [{"role": "user", "parts": [{"text": "Hi"}]}]})
        error = json.loads(body.rstrip().rsplit(b"\n", 1)[-1])   # bare: no "data: "
    else:
        status, _, body, complete = request_stream(p, "POST", "/v1/messages", {
            "model": "gemini-x", "max_tokens": 50, "stream": True,
            "messages": [{"role": "user", "content": "Hi"}]}, ANTHROPIC_HEADERS, key=None)
        error = json.loads(body.split(b"\n\n")[-2].split(b"data: ", 1)[1])
        assert error["error"]["type"] == "overloaded_error"
    assert status == 200 and complete
    assert "The model is overloaded" in error["error"]["message"]
    assert client != "gemini" or (error["error"]["code"], error["error"]["status"]) == (503, "UNAVAILABLE")
