"""The command line: banner, real port with --port 0, clean stop on SIGTERM, exit codes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from helpers import TIMEOUT, proxypal

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "proxypal.py")


def run(*args, env=None):
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                          timeout=TIMEOUT * 3, env=full_env)


def spawn(*args, env=None):
    full_env = dict(os.environ, **(env or {}))
    return subprocess.Popen([sys.executable, SCRIPT, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=full_env)


def read_banner(proc):
    lines = [proc.stdout.readline() for _ in range(5)]
    assert lines[0].startswith("proxypal "), (lines, proc.stderr.read() if proc.poll() is not None else "")
    return lines


@pytest.mark.skipif(sys.platform.startswith("win"), reason="SIGTERM is POSIX")
def test_start_banner_port_zero_and_clean_stop(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"ampOpenaiProviders": [
        {"name": "Ollama", "baseUrl": "http://127.0.0.1:9/v1", "apiKey": "sk-secret-value", "models": ["llama3", "mistral"]}]}))
    proc = spawn("--config", str(config), "--port", "0")
    try:
        lines = read_banner(proc)
        url = lines[0].split("listening on ")[1].strip()
        port = int(url.rsplit(":", 1)[1])
        assert port > 0
        assert str(config) in lines[1] and "1 providers, 2 models" in lines[1]
        saved = json.loads(config.read_text())              # a management key, made and saved once
        key = saved.pop("managementKey")
        assert saved == {"ampOpenaiProviders": [{"name": "Ollama", "baseUrl": "http://127.0.0.1:9/v1",
                                                 "apiKey": "sk-secret-value", "models": ["llama3", "mistral"]}]}
        assert lines[2].strip() == f"management page: {url}/  (management key: {key}; saved as " \
                                   f"managementKey in {config})"
        assert lines[3].strip() == f"export ANTHROPIC_BASE_URL={url} ANTHROPIC_AUTH_TOKEN=proxypal-local"
        assert lines[4].strip() == f"export OPENAI_BASE_URL={url}/v1 OPENAI_API_KEY=proxypal-local"
        with urllib.request.urlopen(url + "/health", timeout=TIMEOUT) as resp:
            assert json.loads(resp.read()) == {"status": "ok"}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(TIMEOUT) == 0
        assert "sk-secret-value" not in proc.stdout.read() + proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/PID/cmdline")
def test_serving_starts_lean_from_its_own_file_with_the_same_pid_and_flags(tmp_path):
    """`python proxypal.py` replaces itself with an interpreter that runs the code the
    script was compiled to (the script's syntax tree would otherwise live as long as the
    server): the same pid, arguments and interpreter flags, and the file it was started
    as, even under another name beside a different proxypal.py."""
    vendored = tmp_path / "llm_proxy.py"
    vendored.write_text(open(SCRIPT, encoding="utf-8").read(), encoding="utf-8")
    (tmp_path / "proxypal.py").write_text("raise SystemExit('the wrong file was imported')\n")
    config = tmp_path / "config.json"
    config.write_text("{}")
    proc = subprocess.Popen([sys.executable, "-W", "ignore::UserWarning", str(vendored),
                             "--config", str(config), "--port", "0"], cwd=str(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = read_banner(proc)[0].split("listening on ")[1].strip()
        with urllib.request.urlopen(url + "/health", timeout=TIMEOUT) as resp:
            assert json.loads(resp.read()) == {"status": "ok"}
        with open(f"/proc/{proc.pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")[:-1]
        code = argv.index(b"-c")
        assert b"-Wignore::UserWarning" in argv[1:code]
        assert repr(str(vendored)).encode() in argv[code + 1]
        assert b"marshal.loads" in argv[code + 1]         # handed the compiled code: no recompile
        assert argv[code + 2:] == [b"--config", str(config).encode(), b"--port", b"0"]
        held = []
        for fd in os.listdir(f"/proc/{proc.pid}/fd"):
            try:
                held.append(os.readlink(f"/proc/{proc.pid}/fd/{fd}"))
            except FileNotFoundError:      # (the health check's connection, closing meanwhile)
                pass
        assert not [name for name in held if "(deleted)" in name]   # the handoff file is closed
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(TIMEOUT) == 0
        assert "wrong file" not in proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/PID/cmdline")
def test_a_frozen_app_serves_as_it_is(tmp_path):
    """In a frozen app (PyInstaller and the like) sys.executable is the app itself, so
    the lean start must not exec it: the script serves from where it is."""
    config = tmp_path / "config.json"
    config.write_text("{}")
    runner = ("import sys; sys.frozen = True; sys.argv = [%r, '--config', %r, '--port', '0']; "
              "exec(compile(open(%r).read(), %r, 'exec'), {'__name__': '__main__', "
              "'__file__': %r, '__spec__': None})" % (SCRIPT, str(config), SCRIPT, SCRIPT, SCRIPT))
    proc = subprocess.Popen([sys.executable, "-c", runner], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        url = read_banner(proc)[0].split("listening on ")[1].strip()
        with urllib.request.urlopen(url + "/health", timeout=TIMEOUT) as resp:
            assert json.loads(resp.read()) == {"status": "ok"}
        with open(f"/proc/{proc.pid}/cmdline", "rb") as f:
            assert f.read().split(b"\0")[2] == runner.encode()   # the same program: no exec
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(TIMEOUT) == 0
    finally:
        proc.kill()
        proc.wait()


def test_missing_config_starts_and_says_where(tmp_path):
    missing = tmp_path / "none" / "config.json"
    proc = spawn("--port", "0", env={"PROXYPAL_CONFIG": str(missing)})
    try:
        lines = read_banner(proc)
        assert str(missing) in lines[1] and "no providers yet: add one on the page" in lines[1]
    finally:
        proc.terminate()
        proc.wait(TIMEOUT)
    # The file is made with the page's key alone, so the page has somewhere to save.
    assert list(json.loads(missing.read_text())) == ["managementKey"]
    assert json.loads(missing.read_text())["managementKey"] in lines[2]


def test_env_port_and_command_line_precedence(tmp_path):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"port": 1}))
    proc = spawn("--config", str(config), "--port", "0", env={"PROXYPAL_PORT": "2"})
    try:
        lines = read_banner(proc)
        assert not lines[0].rstrip().endswith((":1", ":2"))   # --port 0 beat env and file
    finally:
        proc.terminate()
        proc.wait(TIMEOUT)


@pytest.mark.parametrize("content,needle", [
    ('{"claudeApiKeys": [{"apiKey": "a"}, {"apiKey": "b", "models": [{"name": "n", "alias": 5}]}]}',
     'claudeApiKeys[1].models[0]: "alias" must be a string'),
    ('{"port": 8317,}', "line 1, column "),
], ids=["bad-type", "bad-json"])
def test_invalid_config_exits_2_with_key_path(tmp_path, content, needle):
    config = tmp_path / "c.json"
    config.write_text(content)
    out = run("--config", str(config), "--port", "0")
    assert out.returncode == 2 and needle in out.stderr
    assert config.read_text() == content


def test_refuses_public_host_with_default_key(tmp_path):
    out = run("--config", str(tmp_path / "none.json"), "--host", "0.0.0.0", "--port", "0")
    assert out.returncode == 2 and "proxyApiKey" in out.stderr


def test_version_and_help():
    out = run("--version")
    assert out.returncode == 0 and out.stdout.startswith("proxypal ")
    out = run("--help")
    assert out.returncode == 0 and "--config" in out.stdout and "PROXYPAL_CONFIG" in out.stdout


def test_bad_env_port_exits_2(tmp_path):
    out = run("--config", str(tmp_path / "none.json"), env={"PROXYPAL_PORT": "eighty"})
    assert out.returncode == 2 and "PROXYPAL_PORT" in out.stderr


def test_log_requests_and_debug_flags(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"ampOpenaiProviders": [
        {"name": "Down", "baseUrl": "http://127.0.0.1:9/v1", "apiKey": "k", "models": ["m"]}]}))
    proc = spawn("--config", str(config), "--port", "0", "--log-requests", "--debug")
    try:
        url = read_banner(proc)[0].split("listening on ")[1].strip()
        req = urllib.request.Request(url + "/v1/chat/completions", data=b'{"model":"m","messages":[]}',
                                     headers={"Authorization": "Bearer proxypal-local"})
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(req, timeout=TIMEOUT)
        proc.send_signal(signal.SIGTERM)
        err = proc.communicate(timeout=TIMEOUT)[1]
    finally:
        proc.kill()
        proc.wait()
    assert " DEBUG route m -> m via 'Down'" in err                       # --debug: routing
    assert " DEBUG upstream POST http://127.0.0.1:9/v1/chat/completions" in err
    entry = json.loads([l for l in err.splitlines() if '"path": "/v1/chat/completions"' in l][0]
                       .split(" INFO ", 1)[1])                            # --log-requests
    assert entry["status"] == 502 and entry["provider"] == "Down" and "refused" in entry["error"]


def test_a_listing_cut_short_by_its_reader_ends_quietly(tmp_path):
    config = tmp_path / "config.json"              # (more than a pipe holds: 64 KB on Linux)
    config.write_text(json.dumps({"ampOpenaiProviders": [
        {"name": "Big", "baseUrl": "http://h/v1", "apiKey": "k", "models": [f"model-{i}" for i in range(5000)]}]}))
    proc = spawn("models", "--json", "--config", str(config))
    assert proc.stdout.readline() == "[\n"         # `| head -1`: read a line, then go
    proc.stdout.close()
    assert proc.wait(timeout=TIMEOUT) == 0
    assert proc.stderr.read() == ""


def test_names_beyond_the_console_code_page_never_end_a_command(tmp_path):
    # a redirected stdout on Windows is in the ANSI code page (cp1252), strictly
    folder = tmp_path / "Łukasz"
    folder.mkdir()
    config = folder / "config.json"
    config.write_text(json.dumps({"ampOpenaiProviders": [
        {"name": "通义千问", "baseUrl": "http://h/v1", "apiKey": "k", "models": ["qwen-max"]}]}), encoding="utf-8")
    result = run("models", "--config", str(config), env={"PYTHONIOENCODING": "cp1252"})
    assert result.returncode == 0 and "qwen-max" in result.stdout and "Traceback" not in result.stderr
    result = run("init", "--config", str(folder / "new.json"), env={"PYTHONIOENCODING": "cp1252"})
    assert result.returncode == 0 and (folder / "new.json").exists()


def test_the_banner_speaks_the_shell_of_its_system():
    banner = proxypal.banner(proxypal.Server(proxypal.parse_config({})))
    unix = proxypal.client_lines("http://127.0.0.1:8317", "proxypal-local", windows=False)
    windows = proxypal.client_lines("http://127.0.0.1:8317", "proxypal-local", windows=True)
    assert (windows if os.name == "nt" else unix)[0] in banner.splitlines()
    assert unix[0] == "  export ANTHROPIC_BASE_URL=http://127.0.0.1:8317 ANTHROPIC_AUTH_TOKEN=proxypal-local"
    assert windows == ["  $env:ANTHROPIC_BASE_URL = 'http://127.0.0.1:8317'; $env:ANTHROPIC_AUTH_TOKEN = 'proxypal-local'",
                       "  $env:OPENAI_BASE_URL = 'http://127.0.0.1:8317/v1'; $env:OPENAI_API_KEY = 'proxypal-local'"]
    quoted = proxypal.client_lines("http://h", "pa$$'word", windows=True)[0]   # PowerShell expands
    assert quoted.endswith("$env:ANTHROPIC_AUTH_TOKEN = 'pa$$''word'")       # "$..." but not '$...'


def test_ctrl_c_without_add_signal_handler_stops_gracefully_then_at_once():
    # Windows' loop has no add_signal_handler: the plain handler sets the stop (in-flight
    # requests get their grace), and a second Ctrl-C interrupts
    import asyncio

    async def main():
        loop, stop = asyncio.get_running_loop(), asyncio.Event()
        previous = proxypal._stop_on_ctrl_c(loop, stop)
        try:
            signal.raise_signal(signal.SIGINT)
            await asyncio.wait_for(stop.wait(), TIMEOUT)
            with pytest.raises(KeyboardInterrupt):
                signal.raise_signal(signal.SIGINT)
        finally:
            signal.signal(signal.SIGINT, previous)
    asyncio.run(main())


def test_a_listening_socket_closed_under_the_proxy_is_opened_again(caplog):
    # Windows' proactor closes the listening socket for good when one accept fails (CPython
    # gh-93821); the selector loop's _stop_serving does what it does. While the port is
    # taken the proxy says so once and retries; then it listens on the same port again.
    import asyncio
    import socket

    async def health(port):
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            return False
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        line = await asyncio.wait_for(reader.readline(), TIMEOUT)
        writer.close()
        return line.startswith(b"HTTP/1.1 200")

    async def until(predicate):
        deadline = asyncio.get_running_loop().time() + TIMEOUT
        while not await predicate():
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.05)

    async def main():
        server = await proxypal.start(proxypal.parse_config({}), port=0)
        port, loop = server.port, asyncio.get_running_loop()
        try:
            assert await health(port)
            for sock in server.listener.server.sockets:
                loop._stop_serving(getattr(sock, "_sock", sock))
            blocker = socket.socket()
            blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            blocker.bind(("127.0.0.1", port))
            blocker.listen()
            async def refused():
                return "cannot be opened again" in caplog.text
            await until(refused)
            blocker.close()
            await until(lambda: health(port))
            assert caplog.text.count("cannot be opened again") == 1
            assert "listening again" in caplog.text and server.port == port
        finally:
            await server.close(grace=0)
        assert not await health(port)
    with caplog.at_level("INFO", logger="proxypal"):
        asyncio.run(main())
