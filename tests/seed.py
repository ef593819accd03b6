"""The seed guide's configs (seed-custom-providers.md), verbatim, for the tests."""
from __future__ import annotations

import copy
from typing import Any, Dict

SECTION_6: Dict[str, Any] = {
    "port": 8317,
    "claudeApiKeys": [
        {
            "apiKey": "AZURE_FOUNDRY_KEY",
            "baseUrl": "https://foundry-resource.services.ai.azure.com/anthropic",
            "headers": {"x-api-key": "AZURE_FOUNDRY_KEY", "anthropic-version": "2023-06-01"},
            "models": [
                {"name": "claude-opus-4-5", "alias": "claude-opus-4-5-20251101"},
                {"name": "claude-sonnet-4-5", "alias": "claude-sonnet-4-5-20250929"},
            ],
        },
        {
            "apiKey": "sk-ant-api03-direct-key",
            "baseUrl": "https://api.anthropic.com",
            "models": [{"name": "claude-3-haiku-20240307", "alias": "haiku-fast"}],
        },
    ],
    "geminiApiKeys": [{"apiKey": "AIzaSyxxxxx", "models": ["gemini-2.5-pro", "gemini-2.5-flash"]}],
    "ampOpenaiProviders": [
        {"name": "OpenRouter", "baseUrl": "https://openrouter.ai/api/v1", "apiKey": "sk-or-v1-xxx",
         "models": ["openai/gpt-4-turbo", "anthropic/claude-3-opus"]},
        {"name": "Groq", "baseUrl": "https://api.groq.com/openai/v1", "apiKey": "gsk_xxx",
         "models": ["llama3-70b-8192", "mixtral-8x7b-32768"]},
        {"name": "Local Ollama", "baseUrl": "http://localhost:11434/v1", "apiKey": "ollama",
         "models": ["llama3", "codellama"]},
    ],
}

# Section 3: Azure AI Foundry with three aliases onto two deployments.
SECTION_3_AZURE: Dict[str, Any] = {
    "claudeApiKeys": [{
        "apiKey": "YOUR_AZURE_AI_FOUNDRY_API_KEY",
        "baseUrl": "https://YOUR-RESOURCE.services.ai.azure.com/anthropic",
        "headers": {"x-api-key": "YOUR_AZURE_AI_FOUNDRY_API_KEY", "anthropic-version": "2023-06-01"},
        "models": [
            {"name": "claude-opus-4-5", "alias": "claude-opus-4-5-20251101"},
            {"name": "claude-opus-4-5", "alias": "claude-sonnet-4-5-20250929"},
            {"name": "claude-haiku-4-5", "alias": "claude-haiku-4-5-20251001"},
        ],
    }]
}

# Section 5: self-hosted servers.
SECTION_5 = [
    {"name": "LiteLLM Local", "baseUrl": "http://localhost:4000", "apiKey": "sk-1234",
     "models": ["gpt-4", "claude-3-opus", "gemini-pro"]},
    {"name": "Ollama", "baseUrl": "http://localhost:11434/v1", "apiKey": "ollama",
     "models": ["llama3", "codellama", "mistral"]},
    {"name": "vLLM Server", "baseUrl": "http://localhost:8000/v1", "apiKey": "token-abc123",
     "models": ["meta-llama/Llama-3-70b-chat-hf"]},
    {"name": "LocalAI", "baseUrl": "http://localhost:8080/v1", "apiKey": "any",
     "models": ["gpt-3.5-turbo", "text-embedding-ada-002"]},
]

# What the ProxyPal desktop app itself writes: many keys this proxy does not use.
PROXYPAL_APP_CONFIG: Dict[str, Any] = {
    "port": 8317, "autoStart": True, "launchAtLogin": False, "debug": False, "proxyUrl": "",
    "requestRetry": 3, "quotaSwitchProject": True, "usageStatsEnabled": False,
    "requestLogging": False, "loggingToFile": False, "configVersion": 1,
    "ampApiKey": "amp-key-value", "ampRoutingMode": "mappings", "ampOpenaiProvider": None,
    "ampOpenaiProviders": [],
    "ampModelMappings": [
        {"from": "claude-sonnet-4-5-20250929", "to": "claude-opus-4-5-20251101", "enabled": True},
        {"from": "gemini-2.5-flash-lite", "to": "gemini-3-pro-preview", "enabled": False},
    ],
    "copilot": {"enabled": False, "port": 4141, "githubToken": "", "rateLimit": None},
    "forceModelMappings": False,
    "claudeApiKeys": copy.deepcopy(SECTION_3_AZURE["claudeApiKeys"]),
    "geminiApiKeys": [],
    "codexApiKeys": [{"apiKey": "codex", "baseUrl": "https://x.services.ai.azure.com/anthropic"}],
    "thinkingBudgetMode": "custom", "thinkingBudgetCustom": 16000,
    "reasoningEffortLevel": "xhigh", "closeToTray": True, "maxRetryInterval": 0,
}


def pointed_at(config: Dict[str, Any], url: str) -> Dict[str, Any]:
    """A copy of `config` whose every baseUrl points at a local mock, path kept."""
    import urllib.parse
    out = copy.deepcopy(config)
    for key in ("claudeApiKeys", "geminiApiKeys", "ampOpenaiProviders"):
        for entry in out.get(key, []):
            base = entry.get("baseUrl") or {"claudeApiKeys": "https://api.anthropic.com",
                                            "geminiApiKeys": "https://generativelanguage.googleapis.com"}[key]
            entry["baseUrl"] = url + urllib.parse.urlsplit(base).path
    return out
