"""Headless Chromium (Debian's chromium + chromium-driver, driven by selenium) against
the proxy: a page on a loopback origin streams a completion with fetch() across origins
(CORS preflight included), a page on another origin is refused while the public default
key is accepted, and GET / shows the management page."""
from __future__ import annotations

import json
import secrets
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import harness
from harness import LOCAL_KEY, ProxyProcess
from scripted_upstreams import KINDS, Scenario

FOREIGN_HOST = "page.e2e.example"      # resolved to 127.0.0.1 by Chromium only
PAGE = b"<!doctype html><title>e2e page</title><p>e2e</p>"

FETCH_STREAM = """
const [url, headers, body, done] = arguments;
(async () => {
  try {
    const response = await fetch(url, {method: "POST", headers, body});
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let text = "";
    for (;;) {
      const {value, done: end} = await reader.read();
      if (end) break;
      text += decoder.decode(value, {stream: true});
    }
    done({status: response.status, text});
  } catch (error) {
    done({error: String(error)});
  }
})();
"""

REQUESTS = {   # client format -> (path, extra headers, body builder)
    "openai": ("/v1/chat/completions", {},
               lambda: {"model": harness.UPSTREAM_MODEL["openai"], "stream": True,
                        "messages": [{"role": "user", "content": "hello"}]}),
    "anthropic": ("/v1/messages", {"anthropic-version": "2023-06-01"},
                  lambda: {"model": harness.UPSTREAM_MODEL["anthropic"], "stream": True, "max_tokens": 64,
                           "messages": [{"role": "user", "content": "hello"}]}),
}


class PageServer:
    """Serves one blank page, so scripts can run on an origin of the test's choosing."""

    def __init__(self):
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(PAGE)))
                self.end_headers()
                self.wfile.write(PAGE)

            def log_message(self, *args) -> None:
                pass
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def browser(tools):
    info = tools.get("chromium") or {"skipped": "setup_tools.py has not run"}
    if "skipped" in info:
        pytest.skip(f"chromium: {info['skipped']}")
    webdriver = pytest.importorskip("selenium.webdriver")
    options = webdriver.ChromeOptions()
    options.binary_location = info["path"]
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--host-resolver-rules=MAP {FOREIGN_HOST} 127.0.0.1"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=info["driver"]))
    driver.set_script_timeout(30)
    driver.set_page_load_timeout(30)
    yield driver, info["version"]
    driver.quit()


@pytest.fixture(scope="module")
def page_server():
    server = PageServer()
    yield server
    server.close()


def fetch_from(driver, page_url: str, url: str, headers: dict, body: dict) -> dict:
    driver.get(page_url)
    return driver.execute_async_script(FETCH_STREAM, url, headers, json.dumps(body))


@pytest.mark.parametrize("client_format", list(REQUESTS))
def test_loopback_page_streams(browser, page_server, cell, client_format):
    driver, version = browser
    cell.set("chromium", version.split()[1] if " " in version else version,
             f"{client_format} -> {client_format}", f"browser-loopback-page-{client_format}")
    scenario = Scenario(secrets.token_hex(4))
    upstream = KINDS[client_format](scenario)
    folder = harness.cell_dir(f"browser-{cell.name}")
    proxy = ProxyProcess(harness.provider_config(client_format, upstream.url), folder)
    path, extra, body = REQUESTS[client_format]
    try:
        got = fetch_from(driver, f"http://127.0.0.1:{page_server.port}/", proxy.url + path,
                         dict(extra, Authorization=f"Bearer {LOCAL_KEY}", **{"Content-Type": "application/json"}),
                         body())
    finally:
        proxy.close()
        upstream.close()
        harness.save_artifacts(folder, upstream)
    assert "error" not in got, f"fetch failed in the page: {got['error']}; proxy: {proxy.errors()}"
    assert got["status"] == 200, f"status {got['status']}: {got['text'][:300]}"
    assert '"OK"' in got["text"] and upstream.labels() == ["side-text"], \
        f"upstream saw {upstream.labels()}; the page got {got['text'][:300]}"


SIMPLE_POST = """
const [url, body, done] = arguments;
fetch(url, {method: "POST", mode: "no-cors", body})
  .then(r => done({type: r.type}), e => done({error: String(e)}));
"""


def test_foreign_page_refused(browser, page_server, cell):
    """A page on a non-loopback origin, while the public default key is accepted: its
    preflighted fetch and its "simple" no-cors POST (key in ?key=, no preflight) must
    both be refused before anything reaches the upstream."""
    driver, version = browser
    cell.set("chromium", version.split()[1] if " " in version else version,
             "gemini -> gemini", "browser-foreign-page-refused")
    upstream = KINDS["gemini"](Scenario(secrets.token_hex(4)))
    folder = harness.cell_dir(f"browser-{cell.name}")
    proxy = ProxyProcess(harness.provider_config("gemini", upstream.url), folder)
    url = f"{proxy.url}/v1beta/models/{harness.UPSTREAM_MODEL['gemini']}:generateContent"
    body = {"contents": [{"role": "user", "parts": [{"text": "hello"}]}]}
    try:
        page = f"http://{FOREIGN_HOST}:{page_server.port}/"
        preflighted = fetch_from(driver, page, url, {"x-goog-api-key": LOCAL_KEY,
                                                     "Content-Type": "application/json"}, body)
        simple = driver.execute_async_script(SIMPLE_POST, f"{url}?key={LOCAL_KEY}", json.dumps(body))
    finally:
        proxy.close()
        upstream.close()
    assert "error" in preflighted or preflighted.get("status") == 403, \
        f"a foreign page's fetch got an answer: {preflighted}"
    assert "error" not in simple, f"the no-cors POST was not even sent: {simple}"
    posts = [e.get("status") for e in proxy.request_log() if e.get("method") == "POST"]
    assert posts and all(status == 403 for status in posts), \
        f"the proxy answered the foreign page's POSTs with {posts}, not 403"
    assert upstream.requests == [], f"a foreign page's request reached the upstream: {upstream.labels()}"


def test_management_page(browser, cell):
    """SPEC: GET / is the management page (HTML), shown without a key."""
    driver, version = browser
    cell.set("chromium", version.split()[1] if " " in version else version, "-", "browser-management-page")
    folder = harness.cell_dir(f"browser-{cell.name}")
    proxy = ProxyProcess({}, folder)
    try:
        driver.get(proxy.url + "/")
        title, text = driver.title, driver.find_element("tag name", "body").text
    finally:
        proxy.close()
    assert "proxypal" in (title + text).lower() and not text.lstrip().startswith("{"), \
        f"GET / is not the management page: title {title!r}, body {text[:200]!r}"
