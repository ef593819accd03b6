"""Codex CLI (`codex exec`) with a custom provider (wire_api = "responses") through the
proxy to every upstream kind: a shell command that writes a file, an apply_patch edit,
parallel tool calls, a stream cut and a 429. Once straight to the scripted Responses
upstream as well (proves the script, captures what Codex sends)."""
from __future__ import annotations

import json
import secrets

import pytest

import harness
from agents import check_agent, check_fault, run_agent_cell
from conftest import tool_path
from scripted_upstreams import Scenario

MODES = [("shell", ""), ("patch", ""), ("parallel", ""), ("shell", "cut"), ("shell", "429")]
CELLS = [("direct", mode, fault) for mode, fault in MODES]
CELLS += [(kind, mode, fault) for kind in ("responses", "openai", "anthropic", "gemini", "bedrock")
          for mode, fault in MODES]


def cell_id(route: str, mode: str, fault: str) -> str:
    return "-".join(x for x in (route, mode, fault) if x)


def capture_name(rec) -> str:
    """Name the kind of call Codex made (for the captures)."""
    if rec.label in ("head", "models", "unknown"):
        return f"{rec.label}-{rec.method.lower()}"
    body = rec.body if isinstance(rec.body, dict) else {}
    if rec.label == "tool-result-turn":
        kinds = sorted({i.get("type") for i in body.get("input") or []
                        if isinstance(i, dict) and str(i.get("type", "")).endswith("_output")})
        return "responses-tool-result-turn-" + "-".join(k.replace("_", "-") for k in kinds)
    return f"responses-{rec.label}"


@pytest.mark.parametrize("route,mode,fault", CELLS, ids=[cell_id(*c) for c in CELLS])
def test_codex(tools, cell, route, mode, fault):
    exe = tool_path(tools, "codex")
    cell.set("codex", tools["codex"]["version"],
             "responses -> " + ("responses (direct)" if route == "direct" else route),
             cell_id(route, mode, fault))
    scenario = Scenario(secrets.token_hex(4), mode, fault)
    timeout = 150 if fault == "429" else 120
    outcome = run_agent_cell("codex", exe, route, scenario, f"codex-{cell.name}", "", timeout)
    if route == "direct" and not fault:     # captures of the normal calls only
        harness.save_captures("codex", outcome.upstream, capture_name)
    if fault:
        check_fault(outcome, scenario)
    else:
        check_agent(outcome, scenario)
    if mode == "patch":           # the edit arrived as Codex's freeform apply_patch call
        assert any("apply_patch" in json.dumps(r.body) for r in outcome.upstream.requests)
