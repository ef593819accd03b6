"""Regressions from a code review: each test names the defect it pins down."""
from __future__ import annotations

import json
import socket
import threading

import pytest

from helpers import (ANTHROPIC_STREAM, OPENAI_STREAM, TIMEOUT, json_answer, openai_completion,
                     proxypal, raw_exchange, request, sse_answer, status_of)


def provider(url, **extra):
    return dict({"name": "Mock", "baseUrl": url + "/v1", "apiKey": "k", "models": ["m"]}, **extra)


def test_options_body_never_becomes_a_request(proxy):
    p = proxy({})
    smuggled = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer proxypal-local\r\n\r\n"
    raw = raw_exchange(p.port, b"OPTIONS /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                       b"Origin: http://localhost:3000\r\nContent-Length: %d\r\n\r\n%s" % (len(smuggled), smuggled))
    assert status_of(raw) == 204 and raw.count(b"HTTP/1.1 ") == 1 and b"Connection: close" in raw
    assert b"Content-Length" not in raw.split(b"\r\n\r\n")[0]


def test_api_key_with_line_break_is_a_config_error():
    with pytest.raises(proxypal.ConfigError) as info:
        proxypal.parse_config({"ampOpenaiProviders": [{"name": "x", "baseUrl": "http://h/v1",
                                                        "apiKey": "sk-one\nsk-two", "models": []}]})
    assert 'ampOpenaiProviders[0]: "apiKey" must not contain line breaks' in str(info.value)


def test_non_latin1_header_value_is_sent_as_utf8(upstream, proxy):
    up = upstream(json_answer(200, openai_completion()))
    p = proxy({"ampOpenaiProviders": [provider(up.url, headers={"X-Title": "Trợ lý"})]})
    assert request(p, "POST", "/v1/chat/completions", {"model": "m", "messages": []})[0] == 200
    assert up.last().headers["x-title"].encode("latin-1").decode("utf-8") == "Trợ lý"


def test_translator_bug_ends_stream_with_error_and_closes_upstream(upstream, proxy):
    closed = threading.Event()

    def respond(handler, rec):
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        bad = (ANTHROPIC_STREAM[:1] + [
            b'event: content_block_start\ndata: {"type":"content_block_start","index":0,"content_block":{"type":"tool_use","id":"t","name":"f","input":{}}}\n\n',
            b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":{"type":"input_json_delta","partial_json":1}}\n\n'])
        for event in bad:
            handler.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
        handler.wfile.flush()
        handler.connection.settimeout(TIMEOUT)
        try:
            if handler.connection.recv(1) == b"":
                closed.set()
        except OSError:
            closed.set()
        handler.close_connection = True
    up = upstream(respond)
    p = proxy({"claudeApiKeys": [{"apiKey": "k", "baseUrl": up.url}]})
    status, _, body = request(p, "POST", "/v1beta/models/claude-x:streamGenerateContent?alt=sse",
                              {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]},
                              {"x-goog-api-key": "proxypal-local"}, key=None)
    assert status in (200, 500, 502)
    if status == 200:
        assert b'"error"' in body.split(b"\n\n")[-2]
    assert closed.wait(TIMEOUT)


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
    p = proxy({"ampOpenaiProviders": [provider(up.url)]})
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(TIMEOUT)
    sock.connect(("127.0.0.1", p.port))
    body = json.dumps({"model": "m", "stream": True, "messages": []}).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer proxypal-local\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    assert upstream_done.wait(TIMEOUT)           # the proxy gave up: upstream writes failed
    sock.close()


def test_aborted_stream_is_logged_in_usage(upstream, proxy):
    release = threading.Event()

    def gate(i):
        if i == 1:
            release.wait(TIMEOUT)
    up = upstream(sse_answer(OPENAI_STREAM, gate=gate))
    p = proxy({"managementKey": "mk-123456", "ampOpenaiProviders": [provider(up.url)]})
    sock = socket.create_connection(("127.0.0.1", p.port), timeout=TIMEOUT)
    body = json.dumps({"model": "m", "stream": True, "messages": []}).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer proxypal-local\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    got = b""
    while b"chat.completion.chunk" not in got:
        got += sock.recv(65536)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()                                  # RST
    release.set()
    for _ in range(100):
        usage = json.loads(request(p, "GET", "/v0/management/usage", headers={"X-Management-Key": "mk-123456"},
                                   key=None)[2])
        if usage["models"].get("m", {}).get("requests"):
            break
        threading.Event().wait(0.05)
    assert usage["models"]["m"]["requests"] == 1


def test_stray_crlf_after_a_body_does_not_break_the_next_request(upstream, proxy):
    def respond(handler, rec):
        body = json.dumps(openai_completion()).encode()
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body + b"\r\n")      # one CRLF too many
    up = upstream(respond)
    p = proxy({"ampOpenaiProviders": [provider(up.url)]})
    for _ in range(3):
        assert request(p, "POST", "/v1/chat/completions", {"model": "m", "messages": []})[0] == 200


def test_upstream_header_with_bare_lf_cannot_forge_a_header(upstream, proxy):
    def respond(handler, rec):
        body = json.dumps(openai_completion()).encode()
        handler.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                            b"X-Request-Id: abc\nSet-Cookie: sid=evil\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    up = upstream(respond)
    p = proxy({"ampOpenaiProviders": [provider(up.url)]})
    status, headers, _ = request(p, "POST", "/v1/chat/completions", {"model": "m", "messages": []})
    assert status == 200 and "set-cookie" not in headers


def test_client_leaving_before_first_byte_cancels_upstream(upstream, proxy):
    closed, answered = threading.Event(), threading.Event()

    def respond(handler, rec):
        handler.connection.settimeout(TIMEOUT)
        try:                                      # a model thinking: nothing sent yet
            if handler.connection.recv(1) == b"":
                closed.set()
        except OSError:
            closed.set()
        answered.set()
    up = upstream(respond)
    p = proxy({"ampOpenaiProviders": [provider(up.url)]})
    sock = socket.create_connection(("127.0.0.1", p.port), timeout=TIMEOUT)
    body = json.dumps({"model": "m", "stream": True, "messages": []}).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer proxypal-local\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    up.last()                                     # the upstream has the request
    sock.close()
    assert closed.wait(TIMEOUT)
    assert request(p, "GET", "/health", key=None)[0] == 200
