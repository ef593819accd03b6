"""Claude Code (`claude -p`) on every upstream kind, side calls on, through the proxy;
and once straight to the scripted Anthropic upstream, which proves the script and
captures what Claude Code sends."""
from __future__ import annotations

import json
import os
import secrets

import pytest

import harness
from agents import check_agent, check_fault, run_agent_cell
from conftest import tool_path
from scripted_upstreams import Scenario

PINNED_MODEL = {"direct": "gpt-e2e", "anthropic": "claude-sonnet-4-5", "openai": "gpt-e2e",
                "gemini": "gemini-2.5-flash", "bedrock": "claude-sonnet-4-5"}
KINDS = ["anthropic", "openai", "gemini", "bedrock"]

CELLS = [("direct", "default", "shell", ""), ("direct", "pinned", "shell", ""),
         ("direct", "default", "parallel", ""), ("direct", "default", "shell", "cut"),
         ("direct", "default", "shell", "429")]
for _kind in KINDS:
    CELLS += [(_kind, "default", "shell", ""), (_kind, "pinned", "shell", ""),
              (_kind, "pinned", "parallel", ""), (_kind, "pinned", "shell", "cut"),
              (_kind, "pinned", "shell", "429")]
# a local model whose window cannot hold Claude Code's output cap beside the prompt (vLLM)
CELLS.append(("openai", "pinned", "shell", "window"))


def cell_id(route: str, model: str, mode: str, fault: str) -> str:
    return "-".join(x for x in (route, model + "-model", mode, fault) if x)


def capture_name(rec) -> str:
    """Name the kind of call Claude Code made (for the captures)."""
    body = rec.body if isinstance(rec.body, dict) else {}
    if rec.label in ("head", "count_tokens", "models", "unknown"):
        return {"head": "head-root", "count_tokens": "count-tokens",
                "models": "models-list"}.get(rec.label, "unknown-" + rec.method.lower())
    stream = "stream" if body.get("stream") else "json"
    if rec.label == "side-json":
        return f"messages-side-json-{stream}"
    if rec.label == "side-text":
        return f"messages-side-text-{stream}-{body.get('max_tokens')}"
    return f"messages-{rec.label}"


@pytest.mark.parametrize("route,model,mode,fault", CELLS, ids=[cell_id(*c) for c in CELLS])
def test_claude_code(tools, cell, route, model, mode, fault):
    exe = tool_path(tools, "claude")
    version = tools["claude"]["version"]
    cell.set("claude-code", version, "anthropic -> " + ("anthropic (direct)" if route == "direct" else route),
             cell_id(route, model, mode, fault))
    scenario = Scenario(secrets.token_hex(4), mode, fault)
    pinned = PINNED_MODEL.get(route, "") if model == "pinned" else ""
    timeout = 150 if fault == "429" else 120
    outcome = run_agent_cell("claude", exe, route, scenario, f"claude-{cell.name}", pinned, timeout)
    if route == "direct" and not fault:     # captures of the normal calls only
        harness.save_captures("claude-code", outcome.upstream, capture_name, pinned)
    if fault == "window":
        check_lowered_cap(outcome, scenario)
    elif fault:
        check_fault(outcome, scenario)
    else:
        check_agent(outcome, scenario)


def check_lowered_cap(outcome, scenario) -> None:
    """Claude Code read the refusal as Anthropic's "input length and `max_tokens` exceed
    context limit", asked again with a cap that fits, and finished the task."""
    fired = [r for r in outcome.upstream.requests if r.fault == "window"]
    assert fired, f"the window fault was never reached; {outcome.diagnosis()}"
    window = outcome.upstream.window(fired[0].body)
    again = [r for r in outcome.upstream.requests if r.at > fired[0].at and r.label == "main-turn"]
    assert again, f"Claude Code did not ask again after the refusal; {outcome.diagnosis()}"
    cap = outcome.upstream.asked(again[0].body)
    assert cap <= window - outcome.upstream.WINDOW_PROMPT, (cap, window, outcome.diagnosis())
    check_agent(outcome, scenario)


@pytest.mark.parametrize("route", ["direct", "anthropic"])
def test_claude_code_model_discovery(tools, cell, route):
    """CLAUDE_CODE_ENABLE_GATEWAY_MODEL_DISCOVERY=1: Claude Code lists GET /v1/models
    (Anthropic shape, ids containing 'claude') and caches what it found."""
    exe = tool_path(tools, "claude")
    cell.set("claude-code", tools["claude"]["version"],
             "anthropic -> " + ("anthropic (direct)" if route == "direct" else route),
             f"{route}-model-discovery")
    scenario = Scenario(secrets.token_hex(4))
    outcome = run_agent_cell("claude", exe, route, scenario, f"claude-{cell.name}",
                             extra_env={"CLAUDE_CODE_ENABLE_GATEWAY_MODEL_DISCOVERY": "1"})
    if route == "direct":
        harness.save_captures("claude-code", outcome.upstream, capture_name)
    check_agent(outcome, scenario)
    cached = os.path.join(os.path.dirname(outcome.workdir), "home", ".claude", "cache",
                          "gateway-models.json")
    assert os.path.exists(cached), f"no {cached}: the model list was not taken; {outcome.diagnosis()}"
    with open(cached, encoding="utf-8") as f:
        listed = json.load(f)
    assert "claude" in json.dumps(listed), f"no claude model in the cached list: {listed}"
