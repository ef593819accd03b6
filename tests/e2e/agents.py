"""Drivers for the agent CLIs (CLIENTS.md section 1) and the agent-cell runner.

A cell = one CLI, one route (the CLI straight to its own API's scripted upstream, or
through the proxy to an upstream of some kind), one Scenario. The runner starts the
scripted upstream and the proxy, seeds the working directory, runs the CLI with a
temporary HOME and a bounded time, and returns what it saw."""
from __future__ import annotations

import functools
import json
import os
import subprocess

import harness
from harness import LOCAL_KEY, CliResult, Outcome, ProxyProcess
from scripted_upstreams import KINDS, Scenario

CODEX_MODEL = "gpt-5.5"          # a model Codex knows: it then offers apply_patch
NATIVE_KIND = {"claude": "anthropic", "gemini": "gemini", "codex": "responses"}
CATCH_ALL = {"claude": "claude-*", "gemini": "gemini-*", "codex": ""}


def claude_code(exe: str, base_url: str, scenario: Scenario, cwd: str, home: str,
                model: str = "", timeout: float = harness.CLI_TIMEOUT, extra_env=None) -> CliResult:
    env = dict(harness.base_env(home), ANTHROPIC_BASE_URL=base_url, ANTHROPIC_AUTH_TOKEN=LOCAL_KEY,
               DISABLE_TELEMETRY="1", DISABLE_AUTOUPDATER="1", DISABLE_ERROR_REPORTING="1",
               **(extra_env or {}))
    if os.geteuid() == 0:
        env["IS_SANDBOX"] = "1"        # lets root use --dangerously-skip-permissions
    argv = [exe, "-p", scenario.prompt(), "--dangerously-skip-permissions"]
    if model:
        argv += ["--model", model]
    return harness.run_cli(argv, env, cwd, timeout)


@functools.lru_cache(maxsize=None)
def gemini_flags(exe: str) -> tuple:
    """--skip-trust exists only in newer Gemini CLI versions."""
    try:
        text = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60,
                              env=harness.base_env(os.path.expanduser("~"))).stdout
    except (OSError, subprocess.TimeoutExpired):
        text = ""
    return ("--skip-trust",) if "--skip-trust" in text else ()


def gemini_cli(exe: str, base_url: str, scenario: Scenario, cwd: str, home: str,
               model: str = "", timeout: float = harness.CLI_TIMEOUT, extra_env=None) -> CliResult:
    settings = {"security": {"auth": {"selectedType": "gemini-api-key"}},
                "general": {"disableAutoUpdate": True, "disableUpdateNag": True},
                "privacy": {"usageStatisticsEnabled": False},
                "telemetry": {"enabled": False}}
    os.makedirs(os.path.join(home, ".gemini"), exist_ok=True)
    with open(os.path.join(home, ".gemini", "settings.json"), "w", encoding="utf-8") as f:
        json.dump(settings, f)
    env = dict(harness.base_env(home), GOOGLE_GEMINI_BASE_URL=base_url, GEMINI_API_KEY=LOCAL_KEY,
               **(extra_env or {}))
    argv = [exe, "-p", scenario.prompt(), "--yolo", *gemini_flags(exe)]
    if model:
        argv += ["-m", model]
    return harness.run_cli(argv, env, cwd, timeout)


CODEX_CONFIG = """\
model = "{model}"
model_provider = "proxypal"
approval_policy = "never"
sandbox_mode = "danger-full-access"
check_for_update_on_startup = false

[model_providers.proxypal]
name = "proxypal"
base_url = "{base_url}/v1"
env_key = "PROXYPAL_API_KEY"
wire_api = "responses"
"""


def codex(exe: str, base_url: str, scenario: Scenario, cwd: str, home: str,
          model: str = "", timeout: float = harness.CLI_TIMEOUT, extra_env=None) -> CliResult:
    codex_home = os.path.join(home, ".codex")
    os.makedirs(codex_home, exist_ok=True)
    with open(os.path.join(codex_home, "config.toml"), "w", encoding="utf-8") as f:
        f.write(CODEX_CONFIG.format(model=model or CODEX_MODEL, base_url=base_url))
    env = dict(harness.base_env(home), CODEX_HOME=codex_home, PROXYPAL_API_KEY=LOCAL_KEY,
               **(extra_env or {}))
    argv = [exe, "exec", "--skip-git-repo-check", "--dangerously-bypass-approvals-and-sandbox",
            "--json", scenario.prompt()]
    return harness.run_cli(argv, env, cwd, timeout)


DRIVERS = {"claude": claude_code, "gemini": gemini_cli, "codex": codex}


def run_agent_cell(client: str, exe: str, route: str, scenario: Scenario, name: str,
                   model: str = "", timeout: float = harness.CLI_TIMEOUT, extra_env=None) -> Outcome:
    """route: 'direct' (the CLI to its own API's scripted upstream, no proxy) or an
    upstream kind reached through the proxy."""
    folder = harness.cell_dir(name)
    cwd, home = os.path.join(folder, "work"), os.path.join(folder, "home")
    os.makedirs(cwd)
    os.makedirs(home)
    for file_name, content in scenario.seed_files().items():
        with open(os.path.join(cwd, file_name), "w", encoding="utf-8") as f:
            f.write(content)
    kind = NATIVE_KIND[client] if route == "direct" else route
    upstream = KINDS[kind](scenario)
    proxy = None
    try:
        if route == "direct":
            base_url = upstream.url
        else:
            aliases = (CODEX_MODEL,) if client == "codex" and kind != "responses" else ()
            config = harness.route_config(kind, upstream.url, CATCH_ALL[client], aliases)
            if client == "codex" and kind == "responses":
                config["ampOpenaiProviders"][0]["models"].append(CODEX_MODEL)
            proxy = ProxyProcess(config, folder)
            base_url = proxy.url
        result = DRIVERS[client](exe, base_url, scenario, cwd, home, model, timeout, extra_env)
    finally:
        if proxy is not None:
            proxy.close()
        upstream.close()
    files = {}
    for file_name in scenario.files():
        path = os.path.join(cwd, file_name)
        files[file_name] = open(path, encoding="utf-8").read() if os.path.exists(path) else None
    harness.save_artifacts(folder, upstream, result)
    return Outcome(result, upstream, proxy, files, cwd)


# -- what every agent cell asserts ------------------------------------------------------

def check_agent(outcome: Outcome, scenario: Scenario) -> None:
    """Exit 0, the files written, the tool result seen upstream, the marker printed."""
    why = outcome.diagnosis()
    assert outcome.result.returncode == 0, f"CLI failed: {why}"
    for file_name, content in scenario.files().items():
        got = outcome.files.get(file_name)
        assert got is not None, f"{file_name} was not written; {why}"
        assert got.strip() == content.strip(), f"{file_name} holds {got!r}, not {content!r}; {why}"
    assert outcome.upstream.saw_tool_result(), f"no tool result reached the upstream; {why}"
    assert scenario.marker in outcome.result.stdout, f"final marker not printed; {why}"


def check_fault(outcome: Outcome, scenario: Scenario) -> None:
    """The fault fired; then the client either reported an error or retried to success.
    Exit 0 without the full final answer is the one failure."""
    why = outcome.diagnosis()
    assert scenario.fault in outcome.upstream.faults_fired, \
        f"the {scenario.fault} fault was never reached; {why}"
    if outcome.result.returncode == 0:
        assert scenario.marker in outcome.result.stdout, \
            f"exit 0 with a truncated answer after the {scenario.fault}; {why}"
        assert outcome.upstream.saw_tool_result(), f"exit 0 without the tool result; {why}"
    else:
        assert outcome.result.output.strip(), f"exit {outcome.result.returncode} with no message; {why}"
