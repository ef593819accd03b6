"""End to end through real sockets: the proxy on an ephemeral port, mock upstreams that
speak real HTTP, and assertions on what the client got and what the upstream received."""
from __future__ import annotations

import concurrent.futures
import http.client
import json
import socket
import threading
import time

import pytest

import seed
from helpers import (ANTHROPIC_STREAM, OPENAI_STREAM, TIMEOUT, anthropic_message, json_answer,
                     openai_completion, proxypal, request, send, sse_answer, mock_provider, request_stream)

ANTHROPIC_HEADERS = {"x-api-key": "proxypal-local", "anthropic-version": "2023-06-01"}


def openai_provider(url, models=("m",), **extra):
    return dict({"name": "Mock", "baseUrl": url + "/v1", "apiKey": "up-key", "models": list(models)}, **extra)


def chat(model="m", **extra):
    return dict({"model": model, "messages": [{"role": "user", "content": "Hello"}]}, **extra)


def message(model="claude-opus-4-5-20251101", **extra):
    return dict({"model": model, "max_tokens": 100,
                 "messages": [{"role": "user", "content": "Hello"}]}, **extra)


# -- the seed's configs and curl tests ---------------------------------------------

def test_seed_section_6_every_model_routes(upstream, proxy):
    def respond(handler, rec):
        if "/v1beta/" in rec.path:
            send(handler, 200, json.dumps({"candidates": [], "modelVersion": "x"}).encode())
        elif rec.path.endswith("/v1/messages"):
            send(handler, 200, json.dumps(anthropic_message(rec.json()["model"])).encode())
        else:
            send(handler, 200, json.dumps(openai_completion(rec.json()["model"])).encode())
    up = upstream(respond)
    p = proxy(seed.pointed_at(seed.SECTION_6, up.url))
    cases = [
        ("/v1/messages", "claude-opus-4-5-20251101", "/anthropic/v1/messages", "claude-opus-4-5", "AZURE_FOUNDRY_KEY"),
        ("/v1/messages", "claude-sonnet-4-5-20250929", "/anthropic/v1/messages", "claude-sonnet-4-5", "AZURE_FOUNDRY_KEY"),
        ("/v1/messages", "haiku-fast", "/v1/messages", "claude-3-haiku-20240307", "sk-ant-api03-direct-key"),
        ("/v1/chat/completions", "openai/gpt-4-turbo", "/api/v1/chat/completions", "openai/gpt-4-turbo", "Bearer sk-or-v1-xxx"),
        ("/v1/chat/completions", "anthropic/claude-3-opus", "/api/v1/chat/completions", "anthropic/claude-3-opus", "Bearer sk-or-v1-xxx"),
        ("/v1/chat/completions", "llama3-70b-8192", "/openai/v1/chat/completions", "llama3-70b-8192", "Bearer gsk_xxx"),
        ("/v1/chat/completions", "mixtral-8x7b-32768", "/openai/v1/chat/completions", "mixtral-8x7b-32768", "Bearer gsk_xxx"),
        ("/v1/chat/completions", "llama3", "/v1/chat/completions", "llama3", "Bearer ollama"),
        ("/v1/chat/completions", "codellama", "/v1/chat/completions", "codellama", "Bearer ollama"),
    ]
    for path, model, up_path, up_model, credential in cases:
        body = message(model) if path == "/v1/messages" else chat(model)
        status, _, out = request(p, "POST", path, body, ANTHROPIC_HEADERS if path == "/v1/messages" else None)
        assert status == 200, (model, out)
        assert json.loads(out)["model"] == model            # the alias the client asked for
        rec = up.last()
        assert (rec.path, rec.json()["model"]) == (up_path, up_model)
        assert credential in (rec.headers.get("x-api-key"), rec.headers.get("authorization"))
    for model in ("gemini-2.5-pro", "gemini-2.5-flash"):
        status, _, out = request(p, "POST", f"/v1beta/models/{model}:generateContent",
                                 {"contents": [{"parts": [{"text": "hi"}]}]},
                                 {"x-goog-api-key": "proxypal-local"}, key=None)
        assert status == 200, out
        rec = up.last()
        assert rec.path == f"/v1beta/models/{model}:generateContent"
        assert rec.headers["x-goog-api-key"] == "AIzaSyxxxxx"


def test_seed_section_7_curl_requests(upstream, proxy):
    def respond(handler, rec):
        obj = anthropic_message(rec.json()["model"]) if rec.path.endswith("/messages") \
            else openai_completion(rec.json()["model"])
        send(handler, 200, json.dumps(obj).encode())
    up = upstream(respond)
    p = proxy(seed.pointed_at(seed.SECTION_6, up.url))
    # curl http://localhost:8317/v1/messages -H "x-api-key: proxypal-local" ...
    status, _, out = request(p, "POST", "/v1/messages", {
        "model": "claude-opus-4-5-20251101", "max_tokens": 100,
        "messages": [{"role": "user", "content": "Hello"}]},
        {"x-api-key": "proxypal-local", "anthropic-version": "2023-06-01"}, key=None)
    assert status == 200 and json.loads(out)["content"][0]["text"] == "Hello"
    rec = up.last()
    assert rec.path == "/anthropic/v1/messages"
    assert rec.json() == {"model": "claude-opus-4-5", "max_tokens": 100,
                          "messages": [{"role": "user", "content": "Hello"}]}
    assert rec.headers["x-api-key"] == "AZURE_FOUNDRY_KEY"
    assert rec.headers["anthropic-version"] == "2023-06-01"
    # curl http://localhost:8317/v1/chat/completions -H "Authorization: Bearer proxypal-local"
    status, _, out = request(p, "POST", "/v1/chat/completions", {
        "model": "openai/gpt-4-turbo", "max_tokens": 100,
        "messages": [{"role": "user", "content": "Hello"}]})
    assert status == 200 and json.loads(out)["choices"][0]["message"]["content"] == "Hello"
    assert up.last().headers["authorization"] == "Bearer sk-or-v1-xxx"
    # curl http://localhost:8317/v1/models -H "Authorization: Bearer proxypal-local" | jq '.data[].id'
    status, _, out = request(p, "GET", "/v1/models")
    ids = [m["id"] for m in json.loads(out)["data"]]
    assert status == 200 and "claude-opus-4-5-20251101" in ids and "openai/gpt-4-turbo" in ids
    assert "gemini-2.5-pro" in ids and "llama3" in ids


# -- pass-through details ----------------------------------------------------------

def test_anthropic_headers_reach_upstream_exactly(upstream, proxy):
    up = upstream(json_answer(200, anthropic_message("claude-x")))
    p = proxy({"claudeApiKeys": [{"apiKey": "sk-ant-upstream", "baseUrl": up.url,
                                  "headers": {"X-Custom": "1"}}]})
    status, _, _ = request(p, "POST", "/v1/messages?beta=true", message("claude-sonnet-4-5"), {
        "anthropic-version": "2023-06-01", "anthropic-beta": "interleaved-thinking-2025-05-14",
        "Cookie": "c=1", "X-Api-Key": "proxypal-local", "Connection": "keep-alive"}, key=None)
    assert status == 200
    rec = up.last()
    assert rec.path == "/v1/messages?beta=true"
    h = rec.headers
    assert h["x-api-key"] == "sk-ant-upstream" and h["anthropic-beta"] == "interleaved-thinking-2025-05-14"
    assert h["x-custom"] == "1" and "cookie" not in h and "authorization" not in h and "api-key" not in h


def test_no_beta_header_is_injected_and_authorization_header_replaces_api_key(upstream, proxy):
    up = upstream(json_answer(200, anthropic_message()))
    p = proxy({"claudeApiKeys": [{"apiKey": "unused", "baseUrl": up.url + "/anthropic/",
                                  "headers": {"Authorization": "Bearer entra-token"}}]})
    assert request(p, "POST", "/v1/messages", message("claude-x"), ANTHROPIC_HEADERS, key=None)[0] == 200
    h = up.last().headers
    assert "anthropic-beta" not in h and "x-api-key" not in h
    assert h["authorization"] == "Bearer entra-token"


def test_openai_empty_api_key_sends_no_authorization(upstream, proxy):
    up = upstream(json_answer(200, openai_completion()))
    p = proxy({"ampOpenaiProviders": [dict(openai_provider(up.url), apiKey="")]})
    assert request(p, "POST", "/v1/chat/completions", chat())[0] == 200
    assert "authorization" not in up.last().headers


@pytest.mark.parametrize("path,up_path", [
    ("/v1/completions", "/v1/completions"), ("/v1/embeddings", "/v1/embeddings"),
    ("/api/provider/openai/v1/chat/completions", "/v1/chat/completions"),
], ids=["completions", "embeddings", "amp-route"])
def test_other_openai_routes(upstream, proxy, path, up_path):
    up = upstream(json_answer(200, {"object": "list", "data": [], "model": "up-model"}))
    p = proxy({"ampOpenaiProviders": [openai_provider(up.url, [{"name": "up-model", "alias": "m"}])]})
    status, _, out = request(p, "POST", path, {"model": "m", "input": "x"})
    assert status == 200 and json.loads(out)["model"] == "m"
    rec = up.last()
    assert (rec.path, rec.json()["model"]) == (up_path, "up-model")


def test_amp_anthropic_route_and_count_tokens(upstream, proxy):
    up = upstream(json_answer(200, {"input_tokens": 14}))
    p = proxy({"claudeApiKeys": [{"apiKey": "k", "baseUrl": up.url}]})
    status, _, out = request(p, "POST", "/api/provider/anthropic/v1/messages/count_tokens",
                             {"model": "claude-sonnet-4-5", "messages": []}, ANTHROPIC_HEADERS, key=None)
    assert (status, json.loads(out)) == (200, {"input_tokens": 14})
    assert up.last().path == "/v1/messages/count_tokens"


def test_max_output_tokens_clamped(upstream, proxy):
    up = upstream(json_answer(200, openai_completion()))
    p = proxy({"ampOpenaiProviders": [openai_provider(up.url, [{"name": "deepseek-chat", "alias": "m",
                                                                 "maxOutputTokens": 8192}])]})
    request(p, "POST", "/v1/chat/completions", chat(max_tokens=32000))
    assert up.last().json()["max_tokens"] == 8192


def test_upstream_connection_reused(upstream, proxy):
    up = upstream(json_answer(200, openai_completion()))
    p = proxy({"ampOpenaiProviders": [openai_provider(up.url)]})
    for _ in range(5):
        assert request(p, "POST", "/v1/chat/completions", chat())[0] == 200
    assert len(up.all) == 5 and up.connections == 1


def test_an_upstream_connection_idle_too_long_is_not_reused(upstream, proxy, monkeypatch):
    """After a laptop's sleep or a network change a pooled connection may be dead without
    a word; one idle longer than POOL_IDLE_SECONDS is closed, not written to."""
    monkeypatch.setattr(proxypal, "POOL_IDLE_SECONDS", 0.0)     # every idle one: too old
    up = upstream(json_answer(200, openai_completion()))
    p = proxy({"ampOpenaiProviders": [openai_provider(up.url)]})
    for _ in range(3):
        assert request(p, "POST", "/v1/chat/completions", chat())[0] == 200
    assert len(up.all) == 3 and up.connections == 3


def test_upstream_connections_are_reused_by_as_many_requests_at_once(upstream, proxy):
    """64 requests at once hold 64 upstream connections; the next 64 reuse every one of
    them (a pool that kept fewer would open new ones: a TLS handshake each)."""
    together = threading.Barrier(64, timeout=TIMEOUT)    # all 64 at the upstream at once
    answer = json_answer(200, openai_completion())

    def respond(handler, rec):
        together.wait()
        answer(handler, rec)
    up = upstream(respond)
    p = proxy({"ampOpenaiProviders": [openai_provider(up.url)]})
    for _ in range(2):
        with concurrent.futures.ThreadPoolExecutor(64) as pool:
            statuses = list(pool.map(
                lambda _: request(p, "POST", "/v1/chat/completions", chat())[0], range(64)))
        assert statuses == [200] * 64
    assert len(up.all) == 128 and up.connections == 64


@pytest.mark.parametrize("model,as_sent", [("m", True), ("big", False)], ids=["same-model", "alias"])
def test_a_relayed_body_goes_as_the_client_sent_it_unless_something_changes(upstream, proxy,
                                                                           model, as_sent):
    """Same format and the same model name: the client's bytes go as they are (no
    re-encoding of a large agent request); an alias rewrites the model and re-encodes."""
    up = upstream(json_answer(200, openai_completion()))
    p = proxy({"ampOpenaiProviders": [openai_provider(up.url, models=[
        "m", {"name": "m", "alias": "big"}])]})
    raw = ('{ "messages" : [ {"role": "user", "content": "caf\\u00e9 \u00e9"} ],\n'
           ' "temperature": 0.50, "model": "%s" }' % model).encode("utf-8")
    conn = http.client.HTTPConnection("127.0.0.1", p.port, timeout=TIMEOUT)
    conn.request("POST", "/v1/chat/completions", raw, {"Authorization": "Bearer proxypal-local",
                                                       "Content-Type": "application/json"})
    assert conn.getresponse().status == 200
    conn.close()
    sent = up.last()
    assert (sent.body == raw) is as_sent
    assert sent.json() == {"messages": [{"role": "user", "content": "café é"}],
                           "temperature": 0.5, "model": "m"}


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "utf-32-le"])
def test_a_relayed_body_in_another_encoding_reaches_the_upstream_as_utf8(upstream, proxy, encoding):
    up = upstream(json_answer(200, openai_completion()))
    p = proxy({"ampOpenaiProviders": [openai_provider(up.url)]})
    conn = http.client.HTTPConnection("127.0.0.1", p.port, timeout=TIMEOUT)
    conn.request("POST", "/v1/chat/completions", json.dumps(chat()).encode(encoding),
                 {"Authorization": "Bearer proxypal-local", "Content-Type": "application/json"})
    assert conn.getresponse().status == 200
    conn.close()
    sent = up.last().body
    assert json.loads(sent.decode("utf-8")) == chat() and not sent.startswith(b"\xef\xbb\xbf")


def test_foreign_thinking_never_reaches_an_anthropic_relay_on_any_attempt(upstream, proxy):
    """What a relay must leave out (thinking another provider made) stays out of the
    retry too, although the client's bytes held it."""
    bodies = []

    def respond(handler, rec):
        bodies.append(rec.json())
        if len(bodies) == 1:
            send(handler, 429, b'{"type":"error","error":{"type":"rate_limit_error","message":"slow"}}')
        else:
            send(handler, 200, json.dumps(anthropic_message("claude-x")).encode())
    up = upstream(respond)
    p = proxy({"requestRetry": 1, "claudeApiKeys": [
        {"apiKey": "k1", "baseUrl": up.url}, {"apiKey": "k2", "baseUrl": up.url}]})
    history = message("claude-x", messages=[
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "elsewhere", "signature": ""},
                                          {"type": "text", "text": "Hello"}]},
        {"role": "user", "content": "Again"}])
    status, _, _ = request(p, "POST", "/v1/messages", history, ANTHROPIC_HEADERS, key=None)
    assert status == 200 and len(bodies) == 2
    for body in bodies:
        assert body["messages"][1]["content"] == [{"type": "text", "text": "Hello"}]


# -- streams -----------------------------------------------------------------------

@pytest.mark.parametrize("framing", ["chunked", "length", "close"])
def test_stream_relayed_byte_exact(upstream, proxy, framing):
    up = upstream(sse_answer(ANTHROPIC_STREAM, framing))
    p = proxy({"claudeApiKeys": [{"apiKey": "k", "baseUrl": up.url}]})
    status, headers, body = request(p, "POST", "/v1/messages", message("claude-x", stream=True),
                                    ANTHROPIC_HEADERS, key=None)
    assert status == 200 and headers["content-type"] == "text/event-stream"
    assert body == b"".join(ANTHROPIC_STREAM)


def test_each_event_reaches_client_before_upstream_sends_next(upstream, proxy):
    allowed = [threading.Event() for _ in OPENAI_STREAM]
    allowed[0].set()

    def gate(i):
        assert allowed[i].wait(TIMEOUT), f"event {i} was never released"
    up = upstream(sse_answer(OPENAI_STREAM, gate=gate))
    p = proxy({"ampOpenaiProviders": [openai_provider(up.url)]})
    conn = http.client.HTTPConnection("127.0.0.1", p.port, timeout=TIMEOUT)
    conn.request("POST", "/v1/chat/completions", json.dumps(chat(stream=True)),
                 {"Authorization": "Bearer proxypal-local"})
    resp = conn.getresponse()
    assert resp.status == 200
    got = b""
    for i, event in enumerate(OPENAI_STREAM):
        while not got.endswith(event):
            got += resp.read1(65536)           # blocks until this event is relayed
        if i + 1 < len(allowed):
            allowed[i + 1].set()
    assert got == b"".join(OPENAI_STREAM)
    conn.close()


def test_stream_cut_mid_way_ends_with_error_event(upstream, proxy):
    def respond(handler, rec):
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        for event in ANTHROPIC_STREAM[:3]:
            handler.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
        handler.wfile.write(b"100\r\npartial")   # then the connection drops mid-chunk
        handler.wfile.flush()
        handler.close_connection = True
    up = upstream(respond)
    p = proxy({"claudeApiKeys": [{"apiKey": "k", "baseUrl": up.url}]})
    status, _, body = request(p, "POST", "/v1/messages", message("claude-x", stream=True),
                              ANTHROPIC_HEADERS, key=None)
    assert status == 200
    assert body.startswith(b"".join(ANTHROPIC_STREAM[:3]))
    last = body.split(b"\n\n")[-2]
    assert last.startswith(b"event: error\ndata: ")
    err = json.loads(last.split(b"data: ", 1)[1])
    assert err["type"] == "error" and err["error"]["type"] == "api_error"
    assert b"message_stop" not in body


def test_stream_missing_message_stop_gets_error_event(upstream, proxy):
    up = upstream(sse_answer(ANTHROPIC_STREAM[:-1], "close"))
    p = proxy({"claudeApiKeys": [{"apiKey": "k", "baseUrl": up.url}]})
    _, _, body = request(p, "POST", "/v1/messages", message("claude-x", stream=True), ANTHROPIC_HEADERS, key=None)
    assert body.endswith(b"\n\n") and b"event: error" in body.split(b"\n\n")[-2]
    assert b"before message_stop" in body


def test_upstream_error_before_first_byte_is_a_proper_status(upstream, proxy):
    def respond(handler, rec):
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        handler.wfile.flush()
        handler.close_connection = True       # closes before any event
    up = upstream(respond)
    p = proxy({"ampOpenaiProviders": [openai_provider(up.url)]})
    status, _, body = request(p, "POST", "/v1/chat/completions", chat(stream=True))
    assert status == 502 and "Mock" in json.loads(body)["error"]["message"]


def test_client_disconnect_closes_upstream_at_once(upstream, proxy):
    upstream_saw_close = threading.Event()

    def respond(handler, rec):
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        event = OPENAI_STREAM[0]
        handler.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
        handler.wfile.flush()
        handler.connection.settimeout(TIMEOUT)
        try:
            if handler.connection.recv(1) == b"":     # the proxy closed its side
                upstream_saw_close.set()
        except OSError:
            upstream_saw_close.set()
        handler.close_connection = True
    up = upstream(respond)
    p = proxy({"ampOpenaiProviders": [openai_provider(up.url)]})
    sock = socket.create_connection(("127.0.0.1", p.port), timeout=TIMEOUT)
    body = json.dumps(chat(stream=True)).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer proxypal-local\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    got = b""
    while b"chat.completion.chunk" not in got:
        got += sock.recv(65536)
    sock.close()
    assert upstream_saw_close.wait(TIMEOUT)


def test_keepalive_comment_during_silence(upstream, proxy):
    release = threading.Event()

    def gate(i):
        if i == 1:
            assert release.wait(TIMEOUT)
    up = upstream(sse_answer(OPENAI_STREAM, gate=gate))
    p = proxy({"streamKeepaliveSeconds": 0.05, "ampOpenaiProviders": [openai_provider(up.url)]})
    conn = http.client.HTTPConnection("127.0.0.1", p.port, timeout=TIMEOUT)
    conn.request("POST", "/v1/chat/completions", json.dumps(chat(stream=True)),
                 {"Authorization": "Bearer proxypal-local"})
    resp = conn.getresponse()
    got = b""
    while b": keep-alive\n\n" not in got:
        got += resp.read1(65536)
    release.set()
    got += resp.read()
    assert got.replace(b": keep-alive\n\n", b"") == b"".join(OPENAI_STREAM)
    conn.close()


def test_keepalive_pings_stop_with_their_stream(upstream, proxy):
    """The keep-alive timer belongs to one stream: once it ended, nothing more is written
    on the connection (a stray ping would be read as the start of the next answer)."""
    up = upstream(sse_answer(OPENAI_STREAM))
    p = proxy({"streamKeepaliveSeconds": 0.02, "ampOpenaiProviders": [openai_provider(up.url)]})
    conn = http.client.HTTPConnection("127.0.0.1", p.port, timeout=TIMEOUT)
    for _ in range(2):
        conn.request("POST", "/v1/chat/completions", json.dumps(chat(stream=True)),
                     {"Authorization": "Bearer proxypal-local"})
        resp = conn.getresponse()
        assert resp.status == 200 and resp.read() == b"".join(OPENAI_STREAM)
        conn.sock.settimeout(0.2)          # several ping intervals of silence
        with pytest.raises(socket.timeout):
            assert conn.sock.recv(1) == b"", "the connection was closed"
        conn.sock.settimeout(TIMEOUT)
    conn.close()



def test_alarms_ring_in_time_order_and_not_once_removed():
    """One loop timer serves every alarm (client watches, stream commits): each rings at
    its time, earliest first; a removed one never rings; one that raises stops no other."""
    import asyncio

    async def main():
        loop, rung = asyncio.get_running_loop(), []
        errors = []
        loop.set_exception_handler(lambda loop, context: errors.append(context["exception"]))

        class Alarm:
            def __init__(self, name, delay):
                self.name, self.when = name, loop.time() + delay

            def ring(self):
                rung.append(self.name)
                if self.name == "bad":
                    raise ValueError("bad alarm")
        alarms = proxypal.Alarms()
        late, bad, early, removed = Alarm("late", 0.06), Alarm("bad", 0.02), Alarm("early", 0.01), \
            Alarm("removed", 0.03)
        for alarm in (late, bad, early, removed):
            alarms.add(loop, alarm)
        alarms.remove(removed)
        await asyncio.sleep(0.1)
        assert not alarms.entries and not alarms.heap and alarms.timer is None
        for i in range(1000):              # quick calls: added and removed at once, long
            alarm = Alarm(i, 30)           # before their time; nothing keeps them
            alarms.add(loop, alarm)
            alarms.remove(alarm)
            assert len(alarms.heap) <= 65 and not alarms.entries
        last = Alarm("last", 0.02)
        alarms.add(loop, last)
        await asyncio.sleep(0.05)
        assert not alarms.heap and alarms.timer is None
        alarms.close()
        return rung, errors
    rung, errors = asyncio.run(main())
    assert rung == ["early", "bad", "late", "last"]
    assert [str(e) for e in errors] == ["bad alarm"]

# -- routing through the server ------------------------------------------------------

def test_failover_on_429_then_cooldown(upstream, proxy):
    limited = upstream(json_answer(429, {"error": {"message": "slow down", "type": "rate_limit_error"}},
                                   (("Retry-After", "120"),)))
    healthy = upstream(json_answer(200, openai_completion()))
    p = proxy({"requestRetry": 1, "routingStrategy": "fill-first", "ampOpenaiProviders": [
        openai_provider(limited.url, name="Limited"), openai_provider(healthy.url, name="Healthy")]})
    assert request(p, "POST", "/v1/chat/completions", chat())[0] == 200
    assert len(limited.all) == 1 and len(healthy.all) == 1
    assert request(p, "POST", "/v1/chat/completions", chat())[0] == 200
    assert len(limited.all) == 1 and len(healthy.all) == 2      # the limited key rests


def test_no_failover_on_request_errors(upstream, proxy):
    bad = upstream(json_answer(400, {"error": {"message": "bad messages", "type": "invalid_request_error"}}))
    other = upstream(json_answer(200, openai_completion()))
    p = proxy({"requestRetry": 3, "routingStrategy": "fill-first", "ampOpenaiProviders": [
        openai_provider(bad.url), openai_provider(other.url)]})
    status, _, body = request(p, "POST", "/v1/chat/completions", chat())
    assert status == 400 and json.loads(body)["error"]["message"] == "bad messages"
    assert len(other.all) == 0


def test_cooldowns_divert_but_never_block(upstream, proxy, caplog):
    """The only key answered 401 and cools down; the next request still goes to it (the
    client sees the upstream's own answer at once), and the log says which key is cooling,
    why and until when."""
    up = upstream(json_answer(401, {"type": "error", "error": {"type": "authentication_error",
                                                               "message": "invalid x-api-key"}}))
    p = proxy({"claudeApiKeys": [{"apiKey": "bad-key", "baseUrl": up.url}]})
    status, headers, body = request(p, "POST", "/v1/messages", message("claude-x"), ANTHROPIC_HEADERS,
                                    key=None)
    assert status == 401 and json.loads(body)["error"]["message"] == "invalid x-api-key"
    assert "check the apiKey" in headers["x-proxypal-hint"]
    with caplog.at_level("WARNING", logger="proxypal"):
        status, _, body = request(p, "POST", "/v1/messages", message("claude-x"), ANTHROPIC_HEADERS,
                                  key=None)
    assert status == 401 and len(up.all) == 2
    cooling = [r.getMessage() for r in caplog.records if "cooling down" in r.getMessage()]
    assert cooling and "rejected the key (401)" in cooling[0] and "until" in cooling[0]
    assert "bad-key" not in " ".join(r.getMessage() for r in caplog.records)


def test_round_robin_spreads_requests(upstream, proxy):
    a, b = upstream(json_answer(200, openai_completion())), upstream(json_answer(200, openai_completion()))
    p = proxy({"ampOpenaiProviders": [openai_provider(a.url), openai_provider(b.url)]})
    for _ in range(4):
        request(p, "POST", "/v1/chat/completions", chat())
    assert (len(a.all), len(b.all)) == (2, 2)


def test_mapping_routes_claude_code_background_model(upstream, proxy):
    up = upstream(json_answer(200, anthropic_message("claude-haiku-4-5")))
    p = proxy({"claudeApiKeys": [{"apiKey": "k", "baseUrl": up.url, "models": [
        {"name": "claude-haiku-4-5", "alias": "cheap"}]}],
        "ampModelMappings": [{"from": "claude-haiku-*", "to": "cheap"}]})
    status, _, body = request(p, "POST", "/v1/messages", message("claude-haiku-4-5-20251001"),
                              ANTHROPIC_HEADERS, key=None)
    assert status == 200 and json.loads(body)["model"] == "claude-haiku-4-5-20251001"
    assert up.last().json()["model"] == "claude-haiku-4-5"


# -- errors ------------------------------------------------------------------------

def test_no_provider_configured(proxy, tmp_path):
    p = proxy(str(tmp_path / "missing.json"))
    status, _, body = request(p, "POST", "/v1/messages", message(), ANTHROPIC_HEADERS, key=None)
    err = json.loads(body)["error"]
    assert status == 503 and err["message"].startswith("no auth available")
    assert "missing.json" in err["message"]


def test_unknown_model_names_the_nearest(upstream, proxy):
    up = upstream()
    p = proxy({"ampOpenaiProviders": [openai_provider(up.url, ["llama3", "codellama"])]})
    status, _, body = request(p, "POST", "/v1/chat/completions", chat("llama-3"))
    err = json.loads(body)["error"]
    assert status == 404 and "Invalid model 'llama-3'" in err["message"] and "'llama3'" in err["message"]
    assert err["code"] == "model_not_found"


@pytest.mark.parametrize("body,needle", [
    (b"{not json", "not valid JSON"), (b"[]", "must be a JSON object"), (b"", "empty"),
    (json.dumps({"messages": []}).encode(), '"model" is required'),
    (json.dumps({"model": 5}).encode(), '"model" is required'),
    (json.dumps({"model": "m", "stream": "yes"}).encode(), '"stream" must be true or false'),
], ids=["bad-json", "array", "empty", "no-model", "model-type", "stream-type"])
def test_bad_request_bodies(upstream, proxy, body, needle):
    up = upstream()
    p = proxy({"ampOpenaiProviders": [openai_provider(up.url)]})
    status, _, out = request(p, "POST", "/v1/chat/completions", body)
    assert status == 400 and needle in json.loads(out)["error"]["message"]
    status, _, out = request(p, "POST", "/v1/messages", body, ANTHROPIC_HEADERS, key=None)
    err = json.loads(out)
    assert status == 400 and err["type"] == "error" and err["error"]["type"] == "invalid_request_error"


def test_upstream_errors_pass_through_with_hints(upstream, proxy):
    def respond(handler, rec):
        model = rec.json()["model"]
        if model == "m404":
            send(handler, 404, b"<html><body>404 page not found</body></html>", "text/html")
        elif model == "deploy":
            send(handler, 404, json.dumps({"error": {"code": "DeploymentNotFound", "message":
                 "The API deployment for this resource does not exist."}}).encode())
        elif model == "m500":
            send(handler, 500, json.dumps({"error": {"message": "boom", "type": "server_error",
                                                     "code": None, "param": None}}).encode())
        elif model == "bare404":
            send(handler, 404, b"")
    up = upstream(respond)
    p = proxy({"ampOpenaiProviders": [openai_provider(up.url, ["m404", "m500", "bare404"], name="Groq")],
               "claudeApiKeys": [{"apiKey": "k", "baseUrl": up.url + "/anthropic",
                                  "models": [{"name": "deploy", "alias": "claude-opus-4-5-20251101"}]}]})
    status, _, body = request(p, "POST", "/v1/chat/completions", chat("m404"))
    msg = json.loads(body)["error"]["message"]
    assert status == 404 and msg.startswith("Groq: ") and "baseUrl" in msg and "/v1/chat/completions" in msg
    status, _, body = request(p, "POST", "/v1/chat/completions", chat("bare404"))
    msg = json.loads(body)["error"]["message"]     # an empty body: its status says it
    assert status == 404 and msg.startswith("Groq: Not Found (") and "baseUrl" in msg
    status, headers, body = request(p, "POST", "/v1/chat/completions", chat("m500"))
    assert status == 500 and body == json.dumps({"error": {"message": "boom", "type": "server_error",
                                                           "code": None, "param": None}}).encode()
    assert headers["x-proxypal-provider"] == "Groq"             # same format: byte for byte
    status, _, body = request(p, "POST", "/v1/messages", message(), ANTHROPIC_HEADERS, key=None)
    err = json.loads(body)
    assert status == 404 and err["type"] == "error" and err["error"]["type"] == "not_found_error"
    assert "DeploymentNotFound" in err["error"]["message"] and "model aliasing" in err["error"]["message"]
    assert "'deploy'" in err["error"]["message"]


def test_connection_refused_names_host_port(proxy):
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()                                   # nothing listens there now
    p = proxy({"ampOpenaiProviders": [{"name": "Ollama", "baseUrl": f"http://127.0.0.1:{port}/v1",
                                       "apiKey": "ollama", "models": ["llama3"]}]})
    status, _, body = request(p, "POST", "/v1/chat/completions", chat("llama3"))
    msg = json.loads(body)["error"]["message"]
    assert status == 502 and f"127.0.0.1:{port}" in msg and "running" in msg and "Ollama" in msg


@pytest.mark.parametrize("scheme,base", [("http", "http://llm.example.invalid/v1"),
                                         ("socks5", "https://llm.example.invalid/v1")])
def test_a_dead_outbound_proxy_is_named_not_the_provider(proxy, scheme, base):
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()                                   # the proxy the config names is not running
    p = proxy({"ampOpenaiProviders": [{"name": "Far", "baseUrl": base, "apiKey": "k", "models": ["m"],
                                       "proxyUrl": f"{scheme}://127.0.0.1:{port}"}]})
    status, _, body = request(p, "POST", "/v1/chat/completions", chat())
    msg = json.loads(body)["error"]["message"]
    assert status == 502 and f"outbound proxy 127.0.0.1:{port} refused" in msg and "Ollama" not in msg


def test_a_name_refused_on_every_address_is_a_refusal():
    # asyncio's one error when localhost is ::1 and 127.0.0.1 (Windows) and Ollama is down
    req = proxypal.UpstreamRequest("POST", "http://localhost:11434/v1/chat/completions", {}, b"",
                                   provider="'Ollama' (ampOpenaiProviders[0])")
    both = OSError("Multiple exceptions: [Errno 111] Connect call failed ('::1', 11434, 0, 0), "
                   "[Errno 111] Connect call failed ('127.0.0.1', 11434)")
    message = proxypal.connect_error(both, req, "localhost:11434").message
    assert message.startswith("refused connection at localhost:11434") and "running" in message
    mixed = OSError("Multiple exceptions: [Errno 111] Connect call failed ('::1', 11434, 0, 0), "
                    "[Errno 101] Connect call failed ('127.0.0.1', 11434)")
    assert proxypal.connect_error(mixed, req, "localhost:11434").message.startswith("connection to")


def test_first_byte_timeout_is_504(upstream, proxy):
    release = threading.Event()

    def respond(handler, rec):
        release.wait(TIMEOUT)
    up = upstream(respond)
    p = proxy({"firstByteTimeoutSeconds": 0.2, "ampOpenaiProviders": [openai_provider(up.url)]})
    status, _, body = request(p, "POST", "/v1/chat/completions", chat())
    release.set()
    assert status == 504 and "first byte" in json.loads(body)["error"]["message"]


def test_format_mismatch_is_explained(upstream, proxy):
    up = upstream()
    p = proxy({"ampOpenaiProviders": [openai_provider(up.url, ["gpt-x"])]})
    status, _, body = request(p, "POST", "/v1/completions", chat("gpt-x"))
    assert status == 200 or status == 502 or status == 400   # completions go to OpenAI upstreams
    p2 = proxy({"geminiApiKeys": [{"apiKey": "g", "baseUrl": up.url, "models": ["gemini-x"]}]})
    status, _, body = request(p2, "POST", "/v1/embeddings", {"model": "gemini-x", "input": "x"})
    assert status == 400 and "gemini" in json.loads(body)["error"]["message"].lower()


# -- models ------------------------------------------------------------------------

def test_models_list_parses_for_both_sdks(upstream, proxy):
    up = upstream()
    p = proxy({"ampOpenaiProviders": [openai_provider(up.url, ["openai/gpt-4o", "llama3"], prefix="or")],
               "ampModelMappings": [{"from": "claude-sonnet-4-5", "to": "llama3"}]})
    status, _, body = request(p, "GET", "/v1/models", headers=ANTHROPIC_HEADERS, key=None)
    page = json.loads(body)
    assert status == 200 and page["object"] == "list" and page["has_more"] is False
    ids = [m["id"] for m in page["data"]]
    assert set(ids) == {"openai/gpt-4o", "llama3", "or/openai/gpt-4o", "or/llama3", "claude-sonnet-4-5"}
    item = page["data"][0]
    assert {"id", "object", "created", "owned_by", "type", "display_name", "created_at"} <= set(item)
    assert page["first_id"] == ids[0] and page["last_id"] == ids[-1]
    status, _, body = request(p, "GET", "/v1/models/openai/gpt-4o")
    assert status == 200 and json.loads(body)["id"] == "openai/gpt-4o"
    status, _, body = request(p, "GET", "/v1/models/nope")
    assert status == 404


def test_health_needs_no_key(proxy):
    p = proxy({})
    assert request(p, "GET", "/health", key=None)[::2] == (200, b'{"status":"ok"}')


def test_management_gate(proxy):
    p = proxy({})                          # no key in the config: one made for this run
    status, _, body = request(p, "GET", "/v0/management/usage")
    assert status == 401 and "management key" in json.loads(body)["error"]["message"]
    key = p.server.management_key
    assert key.startswith("pp-mgmt-") and len(key) > 30
    assert request(p, "GET", "/v0/management/usage", headers={"X-Management-Key": key}, key=None)[0] == 200
    assert request(p, "GET", "/v1/models", key=key)[0] == 401             # it never opens the model API
    p2 = proxy({"managementKey": "mk-secret"})
    assert request(p2, "GET", "/v0/management/usage")[0] == 401          # local key does not open it
    assert request(p2, "GET", "/v0/management/usage", headers={"X-Management-Key": "wrong"}, key=None)[0] == 401


# -- outbound proxies --------------------------------------------------------------

def test_plain_http_upstream_through_http_proxy(upstream, proxy):
    corporate = upstream(json_answer(200, openai_completion()))
    p = proxy({"proxyUrl": corporate.url, "proxyUsername": "u", "proxyPassword": "pw",
               "ampOpenaiProviders": [{"name": "Far", "baseUrl": "http://llm.example.invalid/v1",
                                       "apiKey": "k", "models": ["m"]}]})
    assert request(p, "POST", "/v1/chat/completions", chat())[0] == 200
    rec = corporate.last()
    assert rec.path == "http://llm.example.invalid/v1/chat/completions"
    assert rec.headers["proxy-authorization"] == "Basic dTpwdw=="


def test_https_upstream_tunnel_refused_by_proxy(upstream, proxy):
    corporate = upstream(json_answer(407, {}))
    p = proxy({"ampOpenaiProviders": [{"name": "Far", "baseUrl": "https://llm.example.invalid/v1",
                                       "apiKey": "k", "models": ["m"], "proxyUrl": corporate.url}]})
    status, _, body = request(p, "POST", "/v1/chat/completions", chat())
    rec = corporate.last()
    assert rec.method == "CONNECT" and rec.path == "llm.example.invalid:443"
    msg = json.loads(body)["error"]["message"]
    assert status == 502 and "407" in msg and "proxyUrl" in msg


def test_use_system_proxy_honours_env(upstream, proxy):
    corporate = upstream(json_answer(200, openai_completion()))
    config = {"useSystemProxy": True, "ampOpenaiProviders": [
        {"name": "Far", "baseUrl": "http://llm.example.invalid/v1", "apiKey": "k", "models": ["m"]},
        {"name": "Near", "baseUrl": "http://near.example.invalid/v1", "apiKey": "k", "models": ["n"]}]}
    p = proxy(config, environ={"HTTP_PROXY": corporate.url, "NO_PROXY": "near.example.invalid"})
    assert request(p, "POST", "/v1/chat/completions", chat())[0] == 200
    assert corporate.last().path == "http://llm.example.invalid/v1/chat/completions"
    status, _, body = request(p, "POST", "/v1/chat/completions", chat("n"))   # bypassed: DNS fails
    assert status == 502 and "near.example.invalid" in json.loads(body)["error"]["message"]


# -- security ----------------------------------------------------------------------

def test_foreign_web_page_refused_with_public_key(upstream, proxy):
    up = upstream(json_answer(200, openai_completion()))
    p = proxy({"ampOpenaiProviders": [openai_provider(up.url)]})
    status, _, body = request(p, "POST", "/v1/chat/completions?key=proxypal-local", chat(),
                              {"Origin": "https://evil.example", "Content-Type": "text/plain"}, key=None)
    assert status == 403 and "proxyApiKey" in json.loads(body)["error"]["message"]
    assert len(up.all) == 0
    status, headers, _ = request(p, "POST", "/v1/chat/completions", chat(), {"Origin": "http://localhost:5173"})
    assert status == 200 and headers["access-control-allow-origin"] == "http://localhost:5173"
    private = proxy({"proxyApiKey": "my-private-key", "ampOpenaiProviders": [openai_provider(up.url)]})
    status, headers, _ = request(private, "POST", "/v1/chat/completions", chat(),
                                 {"Origin": "https://app.example"}, key="my-private-key")
    assert status == 200 and headers["access-control-allow-origin"] == "https://app.example"


def test_public_host_refused_while_default_key_accepted():
    config = proxypal.parse_config({"host": "0.0.0.0", "apiKeys": ["private-one"]})
    with pytest.raises(proxypal.ConfigError) as info:
        proxypal.Server(config)
    assert "proxyApiKey" in str(info.value) and info.value.field == "host"
    with pytest.raises(proxypal.ConfigError) as info:
        proxypal.check_exposure(proxypal.parse_config({"apiKeys": ["private-one"]}), "0.0.0.0")
    assert "proxyApiKey" in str(info.value)
    proxypal.check_exposure(proxypal.parse_config({"proxyApiKey": "s3cret"}), "0.0.0.0")
    proxypal.parse_config({"host": "0.0.0.0", "proxyApiKey": "s3cret"})


def test_aws_signing_headers_never_forwarded(upstream, proxy):
    up = upstream(json_answer(200, anthropic_message()))
    p = proxy({"claudeApiKeys": [{"apiKey": "k", "baseUrl": up.url, "headers": {
        "x-amz-access-key": "AKIDEXAMPLE", "x-amz-secret-key": "wJalrXUtnFEMI", "x-amz-region": "us-east-1"}}]})
    request(p, "POST", "/v1/messages", message("claude-x"), ANTHROPIC_HEADERS, key=None)
    assert not [h for h in up.last().headers if h.startswith("x-amz-")]


def test_azure_unknown_deployment_404_hints_aliasing(upstream, proxy):
    """A Foundry 404 in Azure's own shape (no Anthropic error type) is about the deployment."""
    azure = upstream(json_answer(404, {"error": {"code": "404", "message": "Resource not found"}}))
    config = {"proxyUrl": azure.url, "claudeApiKeys": [{
        "apiKey": "azure-key", "baseUrl": "http://res.services.ai.azure.com/anthropic",
        "models": [{"name": "claude-opus-4-5", "alias": "claude-opus-4-5-20251101"}]}]}
    p = proxy(config)
    status, _, body = request(p, "POST", "/v1/messages", message(), ANTHROPIC_HEADERS, key=None)
    err = json.loads(body)
    assert status == 404 and err["error"]["type"] == "not_found_error"
    assert "deployment 'claude-opus-4-5'" in err["error"]["message"] and "model aliasing" in err["error"]["message"]
    rec = azure.last()
    assert rec.path == "http://res.services.ai.azure.com/anthropic/v1/messages"
    assert rec.headers["x-api-key"] == "azure-key" and rec.headers["api-key"] == "azure-key"


CLEAN_BUT_SHORT = [
    ("anthropic-text-says-error", "claude", "/v1/messages",
     ANTHROPIC_STREAM[:2] + [b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
                             b'"delta":{"type":"text_delta","text":"the build failed with an error in"}}\n\n'],
     b"event: error", b"before message_stop"),
    ("anthropic-partial-event", "claude", "/v1/messages",
     ANTHROPIC_STREAM[:3] + [b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":{"type":"text_del'],
     b"event: error", b"before message_stop"),
    ("openai-no-finish", "openai", "/v1/chat/completions", OPENAI_STREAM[:2], b'data: {"error"', b"a finish_reason"),
    ("gemini-no-finish", "gemini", "/v1beta/models/gemini-x:streamGenerateContent?alt=sse",
     [b'data: {"candidates":[{"content":{"role":"model","parts":[{"text":"Hel"}]}}]}\n\n'],
     b'{"error"', b"a finishReason"),           # (bare, as Google's own: the SDKs raise on it)
]


@pytest.mark.parametrize("kind,path,events,marker,words", [c[1:] for c in CLEAN_BUT_SHORT],
                         ids=[c[0] for c in CLEAN_BUT_SHORT])
def test_stream_ended_cleanly_but_early_gets_error_event(upstream, proxy, kind, path, events, marker, words):
    up = upstream(sse_answer(events))
    config = {"claude": {"claudeApiKeys": [{"apiKey": "k", "baseUrl": up.url}]},
              "openai": {"ampOpenaiProviders": [openai_provider(up.url)]},
              "gemini": {"geminiApiKeys": [{"apiKey": "g", "baseUrl": up.url, "models": ["gemini-x"]}]}}[kind]
    p = proxy(config)
    body = {"claude": message("claude-x", stream=True), "openai": chat(stream=True),
            "gemini": {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}}[kind]
    status, _, out, complete = request_stream(p, "POST", path, body,
                                              ANTHROPIC_HEADERS if kind == "claude" else None,
                                              key=None if kind == "claude" else "proxypal-local")
    last = out.split(b"\n\n")[-2]
    assert status == 200 and last.startswith(marker) and words in last
    assert complete                     # (a body cut short could lose the error event)
    assert b"text_del\n" not in out and not out.endswith(b'"text_del')   # no partial event passed on


def test_openai_stream_with_finish_but_no_done_is_complete(upstream, proxy):
    up = upstream(sse_answer(OPENAI_STREAM[:-1]))
    p = proxy({"ampOpenaiProviders": [openai_provider(up.url)]})
    _, _, out = request(p, "POST", "/v1/chat/completions", chat(stream=True))
    assert out == b"".join(OPENAI_STREAM[:-1])


def test_non_latin1_header_value_is_sent_as_utf8(upstream, proxy):
    up = upstream(json_answer(200, openai_completion()))
    p = proxy({"ampOpenaiProviders": [mock_provider(up.url, headers={"X-Title": "Trợ lý"})]})
    assert request(p, "POST", "/v1/chat/completions", {"model": "m", "messages": []})[0] == 200
    assert up.last().headers["x-title"].encode("latin-1").decode("utf-8") == "Trợ lý"


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
    p = proxy({"ampOpenaiProviders": [mock_provider(up.url)]})
    sock = socket.create_connection(("127.0.0.1", p.port), timeout=TIMEOUT)
    body = json.dumps({"model": "m", "stream": True, "messages": []}).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer proxypal-local\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    up.last()                                     # the upstream has the request
    sock.close()
    assert closed.wait(TIMEOUT)
    assert request(p, "GET", "/health", key=None)[0] == 200


def test_translator_bug_ends_stream_with_error_and_closes_upstream(upstream, proxy, monkeypatch):
    """A bug in a stream writer (injected here) ends the client's stream with an error
    event and closes the upstream connection; the server keeps serving."""
    def broken(self, *args):
        raise RuntimeError("injected fault")
    monkeypatch.setattr(proxypal.GeminiStreamWriter, "tool_start", broken)
    closed = threading.Event()

    def respond(handler, rec):
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        events = (ANTHROPIC_STREAM[:1] + [
            b'event: content_block_start\ndata: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}\n\n',
            b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hi"}}\n\n',
            b'event: content_block_start\ndata: {"type":"content_block_start","index":1,"content_block":{"type":"tool_use","id":"t","name":"f","input":{}}}\n\n'])
        for event in events:
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
    status, _, body, _ = request_stream(p, "POST", "/v1beta/models/claude-x:streamGenerateContent?alt=sse",
                                        {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]},
                                        {"x-goog-api-key": "proxypal-local"}, key=None)
    assert status in (200, 500)            # failed in the first read, or after the head
    events = [e for e in body.split(b"\n\n") if e.strip()]
    assert b"internal error in proxypal (RuntimeError)" in events[-1]
    assert closed.wait(TIMEOUT)
    assert request(p, "GET", "/health", key=None)[0] == 200


# -- client input that once escaped as a 500 ---------------------------------------------

def test_a_lone_surrogate_is_quoted_in_a_400_or_sent_on_as_its_escape(upstream, proxy):
    """JSON may escape half of a UTF-16 pair ("\\ud800"), which has no UTF-8 form. An error
    quoting it is still answered (it went out as nothing at all), and a translated request
    carries it on as the escape it came as (it was a 500)."""
    up = upstream(json_answer(200, openai_completion("m")))
    running = proxy({"ampOpenaiProviders": [openai_provider(up.url)]})
    status, _, body = request(running, "POST", "/v1/chat/completions",
                              b'{"model":"m","stream":"\\ud800","messages":[]}')
    assert status == 400
    assert b'got \\"\\ud800\\"' in body     # the escape, inside the JSON message
    assert json.loads(body)["error"]["message"].endswith('got "\ud800"')
    raw = b'{"model":"m","max_tokens":5,"messages":[{"role":"user","content":"a\\ud83d"}]}'
    status, _, body = request(running, "POST", "/v1/messages", raw, headers=ANTHROPIC_HEADERS)
    assert status == 200, body
    assert json.loads(body)["type"] == "message"
    sent = up.last().body
    assert b'"a\\ud83d"' in sent
    assert json.loads(sent)["messages"][0]["content"] == "a\ud83d"


@pytest.mark.parametrize("path,body,fmt", [
    ("/v1/messages", {"model": "m", "max_tokens": 5, "messages": [], "tool_choice": {"type": []}},
     "anthropic"),
    ("/v1/messages", {"model": "claude-x", "max_tokens": 5, "messages": True}, "anthropic"),
    ("/v1/chat/completions", {"model": "claude-x", "messages": [{"role": "user", "content": "hi"}],
                              "tool_choice": []}, "openai"),
    ("/v1/responses", {"model": "m", "input": "hi", "tool_choice": []}, "openai"),
    ("/v1/responses", {"model": "m", "input": [{"type": "reasoning", "summary": 1}]}, "openai"),
    ("/v1beta/models/m:generateContent", {"contents": [], "systemInstruction": {"parts": 1}},
     "gemini"),
])
def test_a_field_of_the_wrong_type_is_a_400_in_the_clients_format(upstream, proxy, path, body, fmt):
    up = upstream(json_answer(200, openai_completion("m")))
    running = proxy({"ampOpenaiProviders": [openai_provider(up.url)],
                     "claudeApiKeys": [{"apiKey": "k", "baseUrl": up.url, "models": ["claude-x"]}]})
    status, _, raw = request(running, "POST", path, body, headers=ANTHROPIC_HEADERS)
    answer = json.loads(raw)
    if status == 200:                      # relayed as it came, or the field is optional
        return                             # and left out: either way, not a 500
    assert status == 400, raw
    assert (answer["type"] == "error") if fmt == "anthropic" else \
        (answer["error"]["status"] == "INVALID_ARGUMENT") if fmt == "gemini" else \
        (answer["error"]["type"] == "invalid_request_error")


def test_a_wrong_url_is_a_404_without_the_code_of_a_missing_model(upstream, proxy):
    up = upstream(json_answer(200, openai_completion("m")))
    running = proxy({"ampOpenaiProviders": [openai_provider(up.url)]})
    status, _, body = request(running, "POST", "/v1/nope", chat())
    assert status == 404 and json.loads(body)["error"]["code"] is None
    status, _, body = request(running, "POST", "/v1/chat/completions", chat("not-served"))
    assert status == 404 and json.loads(body)["error"]["code"] == "model_not_found"
    for path in ("/api/provider/openai", "/api/provider/openai/"):   # Amp's prefix, no route
        status, _, body = request(running, "GET", path)
        assert status == 404, (path, body[:80])
    status, _, body = request(running, "POST", "/api/provider/openai/v1/chat/completions", chat())
    assert status == 200


def test_a_client_that_resets_mid_body_is_a_client_error_not_a_500(upstream, proxy):
    up = upstream(json_answer(200, openai_completion("m")))
    running = proxy({"ampOpenaiProviders": [openai_provider(up.url)]})
    body = json.dumps(chat()).encode()
    sock = socket.create_connection(("127.0.0.1", running.port), timeout=TIMEOUT)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                 b"proxypal-local\r\nContent-Length: %d\r\n\r\n" % len(body) + body[:-5])
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()                           # SO_LINGER 0: a reset, not a close
    key = {"x-management-key": running.server.management_key}

    def logged():
        status, _, answer = request(running, "GET", "/v0/management/requests", key=None,
                                    headers=key)
        assert status == 200
        return [r for r in json.loads(answer)["requests"] if r["path"] == "/v1/chat/completions"]
    deadline = time.monotonic() + TIMEOUT
    while not logged() and time.monotonic() < deadline:
        time.sleep(0.02)                   # (the server notices the reset on its own time)
    [entry] = logged()
    assert entry["status"] == 400 and "closed after" in entry["error"], entry
    assert up.all == []
