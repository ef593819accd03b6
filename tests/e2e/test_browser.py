"""Headless Chromium (Debian's chromium + chromium-driver, driven by selenium) against
the proxy: a page on a loopback origin streams a completion with fetch() across origins
(CORS preflight included), a page on another origin is refused while the public default
key is accepted, and the management page at GET / is used as a newcomer would: log in,
add providers through the forms, switch Debug Mode on and watch the live log."""
from __future__ import annotations

import json
import os
import secrets
import threading
import time
import urllib.request
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
                f"--host-resolver-rules=MAP {FOREIGN_HOST} 127.0.0.1", "--window-size=1280,900"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
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
    """The seed's path through the page: log in with the key the first start made, add an
    OpenAI-compatible provider exactly as the seed's section 2 draws it (with Fetch
    models), use it from a client, add a Claude key with two alias rows (section 3), turn
    Debug Mode on and see DEBUG lines arrive in the live log. Keys ProxyPal has and
    proxypal does not survive every save. Screenshots of each page, desktop and 400 px."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    driver, version = browser
    cell.set("chromium", version.split()[1] if " " in version else version, "-", "browser-management-page")
    folder = harness.cell_dir(f"browser-{cell.name}")
    upstream = KINDS["openai"](Scenario(secrets.token_hex(4)))
    foreign = {"_templates": {"claudeApiKeys": []}, "quotaSwitchProject": True, "commercialMode": False}
    proxy = ProxyProcess(dict(foreign), folder, flags=("--log-requests",))
    wait = WebDriverWait(driver, 20)

    def shot(name: str) -> None:
        for label, width in (("desktop", 1280), ("400px", 400)):
            driver.set_window_size(width, 900)
            time.sleep(0.2)                    # let the layout settle at the new width
            driver.save_screenshot(os.path.join(folder, f"page-{name}-{label}.png"))
        driver.set_window_size(1280, 900)

    def go(page: str) -> None:
        driver.find_element(By.CSS_SELECTOR, f'nav button[data-page="{page}"]').click()
        wait.until(lambda d: d.find_element(By.ID, "title").text)

    def fill(element_id: str, text: str) -> None:
        field = driver.find_element(By.ID, element_id)
        field.clear()
        field.send_keys(text)

    driver.get_log("browser")                  # drop what earlier cells left (their CORS refusals)
    try:
        with open(proxy.config_path, encoding="utf-8") as f:
            key = json.load(f)["managementKey"]            # made and saved at first start
        with urllib.request.urlopen(proxy.url + "/", timeout=10) as resp:
            csp = resp.headers["Content-Security-Policy"]
            assert "script-src 'sha256-" in csp and "frame-ancestors 'none'" in csp
            assert resp.headers["X-Frame-Options"] == "DENY" and resp.headers["X-Content-Type-Options"] == "nosniff"
        driver.get(proxy.url + "/")
        wait.until(lambda d: d.find_element(By.ID, "login-key").is_displayed())
        shot("login")
        fill("login-key", key)
        driver.find_element(By.ID, "login-go").click()
        wait.until(lambda d: d.find_element(By.ID, "card-today").is_displayed())
        assert "ANTHROPIC_BASE_URL=" + proxy.url in driver.find_element(By.ID, "snip-claude").text

        # Section 2: API Keys -> OpenAI Compatible -> Add Provider.
        go("keys")
        driver.find_element(By.CSS_SELECTOR, '[data-tab="ampOpenaiProviders"]').click()
        driver.find_element(By.ID, "add-entry").click()
        fill("f-name", "OpenRouter")
        fill("f-baseUrl", upstream.url + "/v1")
        fill("f-apiKey", harness.UPSTREAM_KEY)
        assert driver.find_element(By.ID, "f-apiKey").get_attribute("type") == "password"
        fill("f-models", "openai/gpt-4-turbo\nanthropic/claude-3-opus\ngoogle/gemini-pro\n"
                         "meta-llama/llama-3-70b-instruct")
        driver.find_element(By.ID, "f-fetch").click()
        wait.until(lambda d: "gpt-e2e-upstream" in d.find_element(By.ID, "f-models").get_attribute("value"))
        shot("add-provider")
        driver.find_element(By.ID, "f-submit").click()
        wait.until(lambda d: not d.find_elements(By.CSS_SELECTOR, ".modal"))
        shot("api-keys")

        listed = json.loads(urllib.request.urlopen(urllib.request.Request(
            proxy.url + "/v1/models", headers={"Authorization": f"Bearer {LOCAL_KEY}"}), timeout=10).read())
        names = [m["id"] for m in listed["data"]]
        assert {"openai/gpt-4-turbo", "anthropic/claude-3-opus", "gpt-e2e-upstream"} <= set(names), names
        answer = json.loads(urllib.request.urlopen(urllib.request.Request(
            proxy.url + "/v1/chat/completions", method="POST",
            data=json.dumps({"model": "openai/gpt-4-turbo", "messages": [{"role": "user", "content": "hello"}]}).encode(),
            headers={"Authorization": f"Bearer {LOCAL_KEY}", "Content-Type": "application/json"}), timeout=30).read())
        assert answer["choices"][0]["message"]["content"], answer
        assert upstream.requests[-1].body["model"] == "openai/gpt-4-turbo"

        # Section 3: the Claude tab -> Add Claude API Key, with two alias rows.
        driver.find_element(By.CSS_SELECTOR, '[data-tab="claudeApiKeys"]').click()
        driver.find_element(By.ID, "add-entry").click()
        driver.find_element(By.CSS_SELECTOR, '#f-kind option[value="azure"]').click()
        fill("f-apiKey", "azure-key-0123456789")
        fill("f-baseUrl", "https://my-resource.services.ai.azure.com/anthropic")
        for name, alias in (("claude-opus-4-5", "claude-opus-4-5-20251101"),
                            ("claude-sonnet-4-5", "claude-sonnet-4-5-20250929")):
            driver.find_element(By.ID, "f-add-alias").click()
            row = driver.find_elements(By.CSS_SELECTOR, "#f-aliases .row")[-1]
            row.find_element(By.CSS_SELECTOR, ".f-alias-name").send_keys(name)
            row.find_element(By.CSS_SELECTOR, ".f-alias-alias").send_keys(alias)
        shot("add-claude-key")
        driver.find_element(By.ID, "f-submit").click()
        wait.until(lambda d: not d.find_elements(By.CSS_SELECTOR, ".modal"))
        with open(proxy.config_path, encoding="utf-8") as f:
            saved = json.load(f)
        assert saved["claudeApiKeys"] == [{
            "apiKey": "azure-key-0123456789", "baseUrl": "https://my-resource.services.ai.azure.com/anthropic",
            "models": [{"name": "claude-opus-4-5", "alias": "claude-opus-4-5-20251101"},
                       {"name": "claude-sonnet-4-5", "alias": "claude-sonnet-4-5-20250929"}]}]
        assert saved["ampOpenaiProviders"][0]["name"] == "OpenRouter"
        assert {k: saved[k] for k in foreign} == foreign, "keys the page does not know were lost"
        page_text = driver.find_element(By.TAG_NAME, "body").text
        assert "azure-key-0123456789" not in page_text and harness.UPSTREAM_KEY not in page_text

        # Settings -> Debug Mode on; Logs -> DEBUG lines arrive live.
        go("settings")
        driver.find_element(By.ID, "s-debug").click()
        driver.find_element(By.ID, "save-settings").click()
        wait.until(lambda d: json.load(open(proxy.config_path, encoding="utf-8")).get("debug") is True)
        shot("settings")
        go("logs")
        driver.find_element(By.CSS_SELECTOR, '#log-level option[value="DEBUG"]').click()
        time.sleep(0.5)                        # the live tail reconnects with the new level
        urllib.request.urlopen(urllib.request.Request(
            proxy.url + "/v1/models", headers={"Authorization": f"Bearer {LOCAL_KEY}"}), timeout=10).read()
        urllib.request.urlopen(urllib.request.Request(
            proxy.url + "/v1/chat/completions", method="POST",
            data=json.dumps({"model": "anthropic/claude-3-opus", "messages": [{"role": "user", "content": "hi"}]}).encode(),
            headers={"Authorization": f"Bearer {LOCAL_KEY}", "Content-Type": "application/json"}), timeout=30).read()
        wait.until(lambda d: " DEBUG " in d.find_element(By.ID, "log").text)
        assert "route anthropic/claude-3-opus" in driver.find_element(By.ID, "log").text
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#requests tr"))
        shot("logs")
        for page in ("dashboard", "models", "usage"):
            go(page)
            time.sleep(0.5)                    # each page loads its data once shown
            shot(page)
        assert driver.find_element(By.ID, "usage-total").text not in ("", "0")
        severe = [e["message"] for e in driver.get_log("browser")
                  if e["level"] == "SEVERE" and "favicon" not in e["message"]]
        assert not severe, f"the browser reported errors: {severe}"
    finally:
        proxy.close()
        upstream.close()
        harness.save_artifacts(folder, upstream)
