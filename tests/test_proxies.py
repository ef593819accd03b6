"""Outbound proxies and TLS: an https upstream reached through an HTTP CONNECT proxy and
through a SOCKS5 proxy, its certificate verified against SSL_CERT_FILE."""
from __future__ import annotations

import asyncio
import json
import shutil
import ssl
import struct
import subprocess
import threading

import pytest

from helpers import MockUpstream, TIMEOUT, json_answer, openai_completion, request

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed")


@pytest.fixture
def tls_upstream(tmp_path):
    """A MockUpstream speaking TLS with a self-signed certificate for 'llm.test'."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=llm.test", "-addext", "subjectAltName=DNS:llm.test",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True, timeout=60)
    mock = MockUpstream(json_answer(200, openai_completion("m")))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(cert), str(key))
    mock.server.socket = context.wrap_socket(mock.server.socket, server_side=True)
    yield mock, str(cert)
    mock.close()


class TunnelProxy:
    """A forward proxy on 127.0.0.1:0 that sends every tunnel to `target_port` whatever
    host it names (so 'llm.test' needs no DNS), speaking HTTP CONNECT or SOCKS5."""

    def __init__(self, kind: str, target_port: int):
        self.kind, self.target_port, self.asked = kind, target_port, []
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run():
            asyncio.set_event_loop(self.loop)
            self.server = self.loop.run_until_complete(asyncio.start_server(self.handle, "127.0.0.1", 0))
            self.port = self.server.sockets[0].getsockname()[1]
            ready.set()
            self.loop.run_forever()
        threading.Thread(target=run, daemon=True).start()
        assert ready.wait(TIMEOUT)

    async def handle(self, reader, writer):
        if self.kind == "connect":
            head = await reader.readuntil(b"\r\n\r\n")
            self.asked.append(head.split(b"\r\n")[0].decode())
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        else:
            ver, count = await reader.readexactly(2)
            await reader.readexactly(count)
            writer.write(b"\x05\x00")
            ver, cmd, _, atyp = await reader.readexactly(4)
            name = await reader.readexactly((await reader.readexactly(1))[0])
            port = struct.unpack(">H", await reader.readexactly(2))[0]
            self.asked.append(f"{name.decode()}:{port}")
            writer.write(b"\x05\x00\x00\x01\x7f\x00\x00\x01" + struct.pack(">H", port))
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def pipe(src, dst):
            try:
                while True:
                    data = await src.read(65536)
                    if not data:
                        break
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def close(self):
        async def shutdown():
            self.server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(TIMEOUT)
        self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.mark.parametrize("kind,scheme", [("connect", "http"), ("socks5", "socks5h")])
def test_https_upstream_through_proxy_with_verified_tls(tls_upstream, proxy, monkeypatch, kind, scheme):
    mock, cert = tls_upstream
    monkeypatch.setenv("SSL_CERT_FILE", cert)
    tunnel = TunnelProxy(kind, mock.port)
    try:
        p = proxy({"proxyUrl": f"{scheme}://127.0.0.1:{tunnel.port}", "ampOpenaiProviders": [
            {"name": "Remote", "baseUrl": "https://llm.test/v1", "apiKey": "k", "models": ["m"]}]})
        status, _, body = request(p, "POST", "/v1/chat/completions", {"model": "m", "messages": []})
        assert status == 200 and json.loads(body)["choices"][0]["message"]["content"] == "Hello"
        rec = mock.last()
        assert rec.path == "/v1/chat/completions" and rec.headers["host"] == "llm.test"
        assert tunnel.asked[0] in ("CONNECT llm.test:443 HTTP/1.1", "llm.test:443")
        assert request(p, "POST", "/v1/chat/completions", {"model": "m", "messages": []})[0] == 200
        assert len(tunnel.asked) == 1                      # the tunnel is kept alive and reused
    finally:
        tunnel.close()


def test_untrusted_certificate_is_refused_with_a_hint(tls_upstream, proxy, monkeypatch, tmp_path):
    mock, _ = tls_upstream
    other = tmp_path / "other.pem"                    # a valid CA, but not the upstream's
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=other", "-keyout", str(tmp_path / "other.key"), "-out", str(other)],
                   check=True, capture_output=True, timeout=60)
    monkeypatch.setenv("SSL_CERT_FILE", str(other))
    tunnel = TunnelProxy("connect", mock.port)
    try:
        p = proxy({"proxyUrl": f"http://127.0.0.1:{tunnel.port}", "ampOpenaiProviders": [
            {"name": "Remote", "baseUrl": "https://llm.test/v1", "apiKey": "k", "models": ["m"]}]})
        status, _, body = request(p, "POST", "/v1/chat/completions", {"model": "m", "messages": []})
        message = json.loads(body)["error"]["message"]
        assert status == 502 and "TLS" in message and "SSL_CERT_FILE" in message
    finally:
        tunnel.close()


def test_unreadable_ca_bundle_is_a_clear_error(proxy, monkeypatch, tmp_path):
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate")
    monkeypatch.setenv("SSL_CERT_FILE", str(bad))
    p = proxy({"ampOpenaiProviders": [{"name": "Remote", "baseUrl": "https://llm.test/v1",
                                       "apiKey": "k", "models": ["m"]}]})
    status, _, body = request(p, "POST", "/v1/chat/completions", {"model": "m", "messages": []})
    message = json.loads(body)["error"]["message"]
    assert status == 502 and "SSL_CERT_FILE" in message and "'Remote'" in message
