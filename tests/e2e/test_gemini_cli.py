"""Gemini CLI (`gemini -p --yolo`) in its default auto mode (routing classifier first)
and with a pinned model, on every upstream kind it can reach through the proxy; and
once straight to the scripted Gemini upstream (proves the script, captures the calls)."""
from __future__ import annotations

import re
import secrets

import pytest

import harness
from agents import check_agent, check_fault, run_agent_cell
from conftest import tool_path
from scripted_upstreams import Scenario

PINNED_MODEL = {"direct": "gemini-2.5-flash", "gemini": "gemini-2.5-flash", "openai": "gpt-e2e",
                "anthropic": "claude-sonnet-4-5"}

CELLS = [("direct", "auto", "shell", ""), ("direct", "pinned", "shell", ""),
         ("direct", "pinned", "parallel", ""), ("direct", "pinned", "shell", "cut"),
         ("direct", "pinned", "shell", "429")]
for _kind in ("gemini", "openai", "anthropic"):
    CELLS += [(_kind, "auto", "shell", ""), (_kind, "pinned", "shell", ""),
              (_kind, "pinned", "parallel", ""), (_kind, "pinned", "shell", "cut"),
              (_kind, "pinned", "shell", "429")]


def cell_id(route: str, model: str, mode: str, fault: str) -> str:
    return "-".join(x for x in (route, model + "-model", mode, fault) if x)


def capture_name(rec) -> str:
    """Name the kind of call Gemini CLI made (for the captures)."""
    if rec.label in ("head", "models", "unknown"):
        return f"{rec.label}-{rec.method.lower()}"
    op = re.search(r":(\w+)", rec.path)
    op = op.group(1) if op else "request"
    if rec.label == "count_tokens":
        return op
    if rec.label == "side-json":
        return f"{op}-classifier-json-schema"
    return f"{op}-{rec.label}"


@pytest.mark.parametrize("route,model,mode,fault", CELLS, ids=[cell_id(*c) for c in CELLS])
def test_gemini_cli(tools, cell, route, model, mode, fault):
    exe = tool_path(tools, "gemini")
    cell.set("gemini-cli", tools["gemini"]["version"],
             "gemini -> " + ("gemini (direct)" if route == "direct" else route),
             cell_id(route, model, mode, fault))
    scenario = Scenario(secrets.token_hex(4), mode, fault)
    pinned = PINNED_MODEL[route] if model == "pinned" else ""
    timeout = 150 if fault == "429" else 120
    outcome = run_agent_cell("gemini", exe, route, scenario, f"gemini-{cell.name}", pinned, timeout)
    if route == "direct" and not fault:     # captures of the normal calls only
        harness.save_captures("gemini-cli", outcome.upstream, capture_name, pinned)
    if fault:
        check_fault(outcome, scenario)
    else:
        check_agent(outcome, scenario)
