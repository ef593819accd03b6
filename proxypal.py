#!/usr/bin/env python3
"""proxypal.py: a one-file, standard-library-only LLM API proxy.

Local clients (Claude Code, Amp, Cursor, Codex, the OpenAI and Anthropic SDKs,
curl) speak the OpenAI, Anthropic or Gemini API to this proxy; it forwards each
request, by model name, to the upstreams configured in config.json: Anthropic-
format keys (api.anthropic.com, Azure AI Foundry), Gemini keys and any
OpenAI-compatible server (OpenRouter, Groq, DeepSeek, Ollama, vLLM, LiteLLM).

Run it:
    python proxypal.py --port 8317 [--config PATH] [--debug]

Embed it (no side effects on import):
    import proxypal
    proxypal.serve(proxypal.load_config("config.json"))        # blocks
    server = await proxypal.start(config, port=0)               # inside asyncio
    print(server.port); await server.close()

Python 3.8 or newer; nothing outside the standard library.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import difflib
import fnmatch
import hashlib
import hmac
import http
import ipaddress
import json
import logging
import math
import os
import re
import signal
import socket
import ssl
import struct
import sys
import time
import urllib.parse
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

__version__ = "0.1.0"
__all__ = ["serve", "start", "load_config", "parse_config", "Config", "ProxypalError",
           "ConfigError", "__version__"]

log = logging.getLogger("proxypal")


# =============================================================================
# 1. Constants and limits
# Strategy: every number the proxy enforces lives here, with the reason for its
# value. Nothing below hard-codes a limit or a timeout of its own.
# =============================================================================

DEFAULT_PORT = 8317                      # ProxyPal's port; the seed's curl tests use it
DEFAULT_HOST = "127.0.0.1"               # loopback: a local proxy is not a public service
DEFAULT_LOCAL_KEY = "proxypal-local"     # the seed's local key; public, so loopback only
DEFAULT_ANTHROPIC_VERSION = "2023-06-01"  # the only current anthropic-version value

MAX_REQUEST_LINE = 16 * 1024             # 414 beyond; long enough for any API path + query
MAX_HEADER_FIELD = 16 * 1024             # 431 beyond; a big bearer token is ~2 KiB
MAX_HEADER_BLOCK = 64 * 1024             # 431 beyond; asyncio's default stream limit
MAX_HEADERS = 100                        # 431 beyond; CPython http.client's _MAXHEADERS
MAX_CHUNK_LINE = 4 * 1024                # chunk-size line incl. extensions; h11 uses 4 KiB
MAX_TRAILER_BLOCK = 16 * 1024            # trailers are parsed and dropped
DEFAULT_MAX_BODY_MB = 32                 # Anthropic's own request size limit (A.5, 413)

HEAD_TIMEOUT = 10.0                      # slowloris: the whole head must arrive in 10 s
BODY_IDLE_TIMEOUT = 30.0                 # a body read silent this long is abandoned (408)
KEEPALIVE_IDLE_TIMEOUT = 75.0            # nginx's keepalive_timeout default
SHUTDOWN_GRACE = 5.0                     # in-flight requests get this long on stop
LINGER_SECONDS = 2.0                     # unread input drained this long before a close
USAGE_SAMPLES = 1000                     # latencies kept per model/provider for percentiles
CONFIG_POLL_SECONDS = 1.0                # config changes apply within 2 s (hot reload)
CLIENT_WRITE_TIMEOUT = 120.0             # a client that reads nothing this long is gone
WRITE_BUFFER_HIGH = 64 * 1024            # asyncio's own high-water mark for writes

DEFAULT_CONNECT_TIMEOUT = 10.0           # TCP + TLS handshake to an upstream
DEFAULT_FIRST_BYTE_TIMEOUT = 600.0       # a reasoning model may think for minutes
DEFAULT_READ_TIMEOUT = 300.0             # silence between two chunks of one response
READ_SIZE = 64 * 1024                    # one socket read
MAX_UPSTREAM_BODY = 64 * 1024 * 1024     # a non-streamed answer larger than this is refused
MAX_UPSTREAM_ERROR_BODY = 1024 * 1024    # error bodies are read up to this, then cut
POOL_IDLE_PER_HOST = 32                  # idle keep-alive connections kept per upstream

COOLDOWN_AUTH = 300.0                    # a key answering 401/403 rests 5 minutes (SPEC)
COOLDOWN_RETRY_AFTER_CAP = 300.0         # Retry-After is honoured up to 5 minutes (SPEC)
COOLDOWN_DEFAULT = 30.0                  # a 429 without Retry-After

OWN_HEADERS = frozenset({"content-type", "cache-control", "x-accel-buffering"})   # set here
FAILOVER_STATUSES = frozenset({401, 403, 429, 500, 502, 503, 504, 529})
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
                        "proxy-connection", "te", "trailer", "trailers", "transfer-encoding",
                        "upgrade", "content-length", "content-encoding", "set-cookie", "date",
                        "server", "alt-svc", "strict-transport-security"})

# Models served by a key that lists none (SPEC): current ids, plus any claude-*/gemini-*.
BUILTIN_CLAUDE_MODELS = (
    "claude-opus-4-5-20251101", "claude-opus-4-5", "claude-sonnet-4-5-20250929",
    "claude-sonnet-4-5", "claude-haiku-4-5-20251001", "claude-haiku-4-5",
    "claude-opus-4-1-20250805", "claude-opus-4-20250514", "claude-sonnet-4-20250514",
    "claude-3-7-sonnet-20250219", "claude-3-5-haiku-20241022",
)
BUILTIN_GEMINI_MODELS = (
    "gemini-3-pro-preview", "gemini-2.5-pro", "gemini-2.5-flash", "gemini-2.5-flash-lite",
    "gemini-2.0-flash",
)
PROXY_SCHEMES = ("http", "socks5", "socks5h")   # outbound proxies the client speaks through
KIND_PREFIX = {"claude": "claude-", "gemini": "gemini-"}
KIND_FORMAT = {"claude": "anthropic", "openai": "openai", "gemini": "gemini"}
CONFIG_LIST_KIND = {"claudeApiKeys": "claude", "geminiApiKeys": "gemini",
                    "ampOpenaiProviders": "openai"}


# =============================================================================
# 2. Errors
# Strategy: one small hierarchy; every error knows its HTTP status and speaks a
# lower-case message that quotes the bad value and ends with the fix. One pure
# function (error_body, section 6) renders any of them in the client's format.
# =============================================================================

class ProxypalError(Exception):
    """Base of every error the proxy raises on purpose; carries an HTTP status."""
    status = 500

    def __init__(self, message: str, status: Optional[int] = None,
                 headers: Sequence[Tuple[str, str]] = ()):
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        self.headers = list(headers)


class ConfigError(ProxypalError, ValueError):
    """An invalid config; .path names the key, e.g. claudeApiKeys[1].models[0].alias."""

    def __init__(self, path: str, message: str):
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path


class ClientError(ProxypalError):
    """The client's request is wrong; 4xx."""
    status = 400


class WireError(ClientError):
    """Malformed or over-limit HTTP; answered, then the connection is closed."""


class UpstreamError(ProxypalError):
    """An upstream could not be reached or failed; 502 unless said otherwise."""
    status = 502

    def __init__(self, message: str, status: Optional[int] = None, provider: str = "",
                 url: str = "", failover: bool = True):
        super().__init__(message, status)
        self.provider = provider
        self.url = url
        self.failover = failover


# =============================================================================
# 3. Helpers: JSON, secret masking, clock
# Strategy: small pure functions used by every section below. Masking is one
# function, installed once as a logging.Filter so no call site can forget it.
# =============================================================================

_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)   # one, not one per call


def dumps(obj: Any) -> bytes:
    """Compact UTF-8 JSON, the way the APIs themselves send it."""
    return _JSON.encode(obj).encode("utf-8")


_SECRET_PATTERNS = re.compile(
    r"(?i)((?:authorization|proxy-authorization)\s*[:=]\s*(?:bearer|basic)?\s*"
    r"|(?:x-api-key|x-goog-api-key|api-key|x-management-key|x-amz-secret-key"
    r"|x-amz-security-token|x-amz-session-token)\s*[:=]\s*"
    r"|[?&]key=|\"(?:apiKey|api_key|proxyPassword|managementKey|secret)\"\s*:\s*\")"
    r"([^\s\"'&,;]+)")
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")


def mask_secrets(text: str, secrets: Sequence[str] = (), patterns: bool = True) -> str:
    """Replace every known secret, and (with `patterns`) anything that looks like a
    credential in a header, query or JSON field, with ***."""
    for secret in secrets:
        if secret and len(secret) >= 4 and secret in text:
            text = text.replace(secret, "***")
    return _SECRET_PATTERNS.sub(lambda m: m.group(1) + "***", text) if patterns else text


def printable(text: str, limit: int = 200) -> str:
    """Client data made safe for a log line: control characters escaped, length capped."""
    text = _CONTROL_CHARS.sub(lambda m: "\\x%02x" % ord(m.group()), text)
    return text if len(text) <= limit else text[:limit] + "..."


class SecretFilter(logging.Filter):
    """Masks secrets in every record of the logger it is attached to."""

    def __init__(self) -> None:
        super().__init__()
        self.secrets: Tuple[str, ...] = ()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = mask_secrets(message, self.secrets)
        if masked != message or record.args:
            record.msg, record.args = masked, ()
        return True


def size_text(size: int) -> str:
    """1048576 -> '1 MB', 1049 -> '1049 bytes': limits as a person reads them."""
    mb = size / (1024 * 1024)
    return f"{mb:g} MB" if mb >= 1 else f"{size} bytes"


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or bool(mapped and mapped.is_loopback)


def short_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


# =============================================================================
# 4. Config
# Strategy: parse_config(raw) turns the JSON object into one frozen Config,
# validating every key it knows and naming the key path in each error; unknown
# keys (ProxyPal's app settings) are kept by name only. It never touches a
# file: load_config(path) is the I/O edge, and never writes.
# =============================================================================

@dataclasses.dataclass(frozen=True)
class ModelEntry:
    name: str                              # what the upstream receives
    alias: str                             # what clients ask for
    max_output_tokens: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class Credential:
    kind: str                              # "claude" | "gemini" | "openai"
    path: str                              # "claudeApiKeys[0]", for errors and logs
    name: str                              # shown to users
    api_key: str
    base_url: str                          # normalized, no trailing slash
    headers: Tuple[Tuple[str, str], ...]
    proxy_url: str
    models: Tuple[ModelEntry, ...]
    excluded: Tuple[str, ...]
    prefix: str
    request_retry: Optional[int]
    key: str                               # identity for cooldowns, survives reloads
    bedrock_region: str = ""               # set for Amazon Bedrock claudeApiKeys entries

    @property
    def label(self) -> str:
        return f"'{self.name}' ({self.path})"


@dataclasses.dataclass(frozen=True)
class Mapping:
    source: str                            # requested model; may hold * wildcards
    target: str


@dataclasses.dataclass(frozen=True)
class Config:
    """The whole configuration: one immutable value, swapped whole on reload."""
    port: int = DEFAULT_PORT
    host: str = DEFAULT_HOST
    proxy_api_key: str = DEFAULT_LOCAL_KEY
    api_keys: Tuple[str, ...] = ()
    management_key: str = ""
    allow_remote_management: bool = False
    debug: bool = False
    request_logging: bool = False
    logging_to_file: bool = False
    logs_max_total_size_mb: int = 100
    request_retry: int = 0
    routing_strategy: str = "round-robin"
    proxy_url: str = ""
    proxy_username: str = ""
    proxy_password: str = ""
    use_system_proxy: bool = False
    max_body_mb: float = DEFAULT_MAX_BODY_MB
    stream_keepalive_seconds: float = 0.0
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    first_byte_timeout: float = DEFAULT_FIRST_BYTE_TIMEOUT
    read_timeout: float = DEFAULT_READ_TIMEOUT
    credentials: Tuple[Credential, ...] = ()
    mappings: Tuple[Mapping, ...] = ()
    path: str = ""                         # where it was loaded from ("" when built in code)
    loaded: bool = False                   # False when the file did not exist
    unknown_keys: Tuple[str, ...] = ()

    @property
    def local_keys(self) -> Tuple[str, ...]:
        return tuple(k for k in (self.proxy_api_key,) + self.api_keys if k)

    @property
    def secrets(self) -> Tuple[str, ...]:
        found = [self.management_key, self.proxy_password]
        found += [k for k in self.local_keys if k != DEFAULT_LOCAL_KEY]
        for cred in self.credentials:
            found.append(cred.api_key)
            found += [v for k, v in cred.headers if _is_secret_header(k)]
            found.append(_url_password(cred.proxy_url))
        found.append(_url_password(self.proxy_url))
        return tuple(sorted({s for s in found if s and len(s) >= 4}, key=len, reverse=True))


def _is_secret_header(name: str) -> bool:
    name = name.lower()
    return name in ("authorization", "x-api-key", "api-key", "x-goog-api-key") or \
        name.startswith("x-amz-") and name != "x-amz-region"


def _url_password(url: str) -> str:
    try:
        return urllib.parse.urlsplit(url).password or ""
    except ValueError:
        return ""


_TYPE_NAMES = {str: "a string", bool: "true or false", int: "a whole number",
               float: "a number", list: "a list", dict: "an object"}


class _Reader:
    """Reads typed keys out of one JSON object, naming the path in every error."""

    def __init__(self, obj: Any, path: str):
        if not isinstance(obj, dict):
            raise ConfigError(path, f"must be an object, got {_json_type(obj)}")
        self.obj, self.path = obj, path

    def at(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def fail(self, key: str, message: str) -> ConfigError:
        """An error about one key: 'path: "key" message', or 'key: message' at the top."""
        if self.path:
            return ConfigError(self.path, f'"{key}" {message}')
        return ConfigError(key, message)

    def get(self, key: str, kind: type, default: Any = None, required: bool = False) -> Any:
        value = self.obj.get(key)
        if value is None or (value == "" and kind is str and not required):
            if required:
                raise self.fail(key, "is required")
            return default
        ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            try:
                value, ok = float(value), True
            except OverflowError:
                raise self.fail(key, f"is far too large: {_short(value)}") from None
        if not ok:
            raise self.fail(key, f"must be {_TYPE_NAMES[kind]}, got {_json_type(value)} {_short(value)}")
        if required and kind is str and not value.strip():
            raise self.fail(key, "must not be empty")
        return value

    def number(self, key: str, default: float, low: float, high: float, kind: type = float) -> Any:
        value = self.get(key, kind, default)
        if not low <= value <= high:
            raise self.fail(key, f"must be between {low:g} and {high:g}, got {value}")
        return value

    def strings(self, key: str) -> Tuple[str, ...]:
        items = self.get(key, list, [])
        for i, item in enumerate(items):
            if not isinstance(item, str):
                raise ConfigError(f"{self.at(key)}[{i}]", f"must be a string, got {_json_type(item)}")
        return tuple(items)


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            int: "a number", float: "a number", type(None): "null"}.get(type(value), "a value")


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 40 else text[:37] + "..."


_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_BAD_HEADER_TEXT = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def _parse_url(value: str, path: str, key: str, schemes: Sequence[str]) -> str:
    def fail(message: str) -> ConfigError:
        return ConfigError(path, f'"{key}" {message}') if path else ConfigError(key, message)
    try:
        parts = urllib.parse.urlsplit(value.strip())
        parts.port  # noqa: B018 -- raises ValueError on a bad port
    except ValueError as exc:
        raise fail(f"is not a valid URL: {value!r} ({exc})") from None
    if parts.scheme not in schemes or not parts.hostname:
        raise fail(f'must be a URL starting with {" or ".join(s + "://" for s in schemes)}, '
                   f"got {value!r}")
    return value.strip()


def _parse_headers(reader: _Reader) -> Tuple[Tuple[str, str], ...]:
    raw = reader.get("headers", dict, {})
    result = []
    for name, value in raw.items():
        where = f'{reader.at("headers")}'
        if not _TOKEN.match(name):
            raise ConfigError(where, f"{name!r} is not a valid header name")
        if not isinstance(value, str):
            raise ConfigError(where, f'"{name}" must be a string, got {_json_type(value)}')
        if _BAD_HEADER_TEXT.search(value):
            raise ConfigError(where, f'"{name}" must not contain line breaks or control characters')
        result.append((name, value.strip()))
    return tuple(result)


def _parse_models(reader: _Reader, required: bool) -> Tuple[ModelEntry, ...]:
    if required and reader.obj.get("models") is None:
        raise ConfigError(reader.path, '"models" is required: list the model ids this provider serves')
    entries = []
    for i, item in enumerate(reader.get("models", list, [])):
        path = f'{reader.at("models")}[{i}]'
        if isinstance(item, str):
            if not item.strip():
                raise ConfigError(path, "must not be an empty string")
            entries.append(ModelEntry(item.strip(), item.strip()))
            continue
        model = _Reader(item, path)
        name = model.get("name", str, required=True).strip()
        alias = (model.get("alias", str, "") or name).strip()
        limit = model.get("maxOutputTokens", int)
        if limit is not None and limit < 1:
            raise ConfigError(path, f'"maxOutputTokens" must be at least 1, got {limit}')
        entries.append(ModelEntry(name, alias, limit))
    return tuple(entries)


def _provider_name(kind: str, base_url: str) -> str:
    host = urllib.parse.urlsplit(base_url).hostname or base_url
    if host.endswith(".services.ai.azure.com"):
        return f"Azure AI Foundry ({host.split('.')[0]})"
    if host.startswith("bedrock-runtime.") and host.endswith(".amazonaws.com"):
        return f"Amazon Bedrock ({host.split('.')[1]})"
    if host == "api.anthropic.com":
        return "Anthropic"
    if host == "generativelanguage.googleapis.com":
        return "Gemini"
    return host


def _normalize_base(kind: str, url: str) -> str:
    url = url.rstrip("/")
    if kind == "claude" and url.endswith("/v1"):      # SPEC: tolerate a trailing /v1
        url = url[:-3]
    if kind == "gemini":
        for suffix in ("/v1beta", "/v1"):
            if url.endswith(suffix):
                url = url[:-len(suffix)]
    return url


DEFAULT_BASE_URL = {"claude": "https://api.anthropic.com",
                    "gemini": "https://generativelanguage.googleapis.com"}


def _parse_credential(kind: str, obj: Any, path: str) -> Credential:
    r = _Reader(obj, path)
    is_openai = kind == "openai"
    api_key = r.get("apiKey", str, "", required=not is_openai) or ""
    if _BAD_HEADER_TEXT.search(api_key):
        raise ConfigError(path, '"apiKey" must not contain line breaks or control characters '
                                "(two keys pasted into one?)")
    base = r.get("baseUrl", str, None, required=is_openai) or DEFAULT_BASE_URL[kind]
    base = _normalize_base(kind, _parse_url(base, path, "baseUrl", ("http", "https")))
    proxy_url = r.get("proxyUrl", str, "") or ""
    if proxy_url:
        _parse_url(proxy_url, path, "proxyUrl", PROXY_SCHEMES)
    name = (r.get("name", str, "", required=is_openai) or _provider_name(kind, base)).strip()
    retry = r.get("requestRetry", int)
    if retry is not None and not 0 <= retry <= 20:
        raise ConfigError(path, f'"requestRetry" must be between 0 and 20, got {retry}')
    prefix = (r.get("prefix", str, "") or "").strip().strip("/")
    headers = _parse_headers(r)
    return Credential(
        kind=kind, path=path, name=name, api_key=api_key.strip(), base_url=base,
        headers=headers, proxy_url=proxy_url, models=_parse_models(r, is_openai),
        excluded=r.strings("excludedModels"), prefix=prefix, request_retry=retry,
        key=f"{kind}|{base}|{short_hash(api_key)}|{short_hash(repr(headers))}",
        bedrock_region=bedrock_region(base, headers) if kind == "claude" else "")


_BEDROCK_HOST = re.compile(r"(?:^|\.)bedrock-runtime(?:-fips)?\.([a-z0-9-]+)\.(?:vpce\.)?amazonaws\.com$")


def bedrock_region(base_url: str, headers: Sequence[Tuple[str, str]]) -> str:
    """The AWS region of a Bedrock base URL (x-amz-region header first), else ""."""
    host = (urllib.parse.urlsplit(base_url).hostname or "").lower()
    match = _BEDROCK_HOST.search(host)
    if not match:
        return ""
    given = {k.lower(): v for k, v in headers}.get("x-amz-region", "").strip()
    return given or match.group(1)


def _parse_mappings(root: _Reader) -> Tuple[Mapping, ...]:
    result = []
    for i, item in enumerate(root.get("ampModelMappings", list, [])):
        m = _Reader(item, f"ampModelMappings[{i}]")
        if not m.get("enabled", bool, True):
            continue
        if "from" in item or "to" in item:
            source, target = m.get("from", str, required=True), m.get("to", str, required=True)
        else:                                   # ProxyPal's {name, alias}: alias is requested
            source, target = m.get("alias", str, required=True), m.get("name", str, required=True)
        result.append(Mapping(source.strip(), target.strip()))
    return tuple(result)


KNOWN_KEYS = frozenset({
    "port", "host", "proxyApiKey", "apiKeys", "managementKey", "allowRemoteManagement", "debug",
    "requestLogging", "loggingToFile", "logsMaxTotalSizeMb", "requestRetry", "routingStrategy",
    "proxyUrl", "proxyUsername", "proxyPassword", "useSystemProxy", "claudeApiKeys",
    "geminiApiKeys", "ampOpenaiProviders", "ampModelMappings", "maxBodyMb",
    "streamKeepaliveSeconds", "connectTimeoutSeconds", "firstByteTimeoutSeconds",
    "readTimeoutSeconds"})


def parse_config(raw: Any, path: str = "", loaded: bool = True) -> Config:
    """Validate a config object (the parsed JSON) into a Config. Pure; raises ConfigError."""
    r = _Reader(raw, "")
    strategy = r.get("routingStrategy", str, "round-robin").strip().lower()
    if strategy not in ("round-robin", "fill-first"):
        raise ConfigError("routingStrategy", f'must be "round-robin" or "fill-first", got {strategy!r}')
    proxy_url = r.get("proxyUrl", str, "") or ""
    if proxy_url:
        _parse_url(proxy_url, "", "proxyUrl", PROXY_SCHEMES)
    credentials = []
    for list_key, kind in CONFIG_LIST_KIND.items():
        for i, item in enumerate(r.get(list_key, list, [])):
            credentials.append(_parse_credential(kind, item, f"{list_key}[{i}]"))
    return Config(
        port=r.number("port", DEFAULT_PORT, 0, 65535, int),
        host=(r.get("host", str, DEFAULT_HOST) or DEFAULT_HOST).strip(),
        proxy_api_key=r.get("proxyApiKey", str, DEFAULT_LOCAL_KEY),
        api_keys=r.strings("apiKeys"),
        management_key=r.get("managementKey", str, ""),
        allow_remote_management=r.get("allowRemoteManagement", bool, False),
        debug=r.get("debug", bool, False),
        request_logging=r.get("requestLogging", bool, False),
        logging_to_file=r.get("loggingToFile", bool, False),
        logs_max_total_size_mb=r.number("logsMaxTotalSizeMb", 100, 1, 1_000_000, int),
        request_retry=r.number("requestRetry", 0, 0, 20, int),
        routing_strategy=strategy,
        proxy_url=proxy_url,
        proxy_username=r.get("proxyUsername", str, ""),
        proxy_password=r.get("proxyPassword", str, ""),
        use_system_proxy=r.get("useSystemProxy", bool, False),
        max_body_mb=r.number("maxBodyMb", DEFAULT_MAX_BODY_MB, 0.001, 4096),
        stream_keepalive_seconds=r.number("streamKeepaliveSeconds", 0.0, 0, 3600),
        connect_timeout=r.number("connectTimeoutSeconds", DEFAULT_CONNECT_TIMEOUT, 0.1, 600),
        first_byte_timeout=r.number("firstByteTimeoutSeconds", DEFAULT_FIRST_BYTE_TIMEOUT, 0.1, 86400),
        read_timeout=r.number("readTimeoutSeconds", DEFAULT_READ_TIMEOUT, 0.1, 86400),
        credentials=tuple(credentials),
        mappings=_parse_mappings(r),
        path=path, loaded=loaded,
        unknown_keys=tuple(sorted(set(raw) - KNOWN_KEYS)),
    )


def default_config_path(environ: Optional[Dict[str, str]] = None,
                        platform: str = sys.platform) -> str:
    """The OS default config path (SPEC): %APPDATA%, Application Support or XDG."""
    env = os.environ if environ is None else environ
    home = env.get("HOME") or os.path.expanduser("~")
    if platform.startswith("win"):
        base = env.get("APPDATA") or os.path.join(home, "AppData", "Roaming")
    elif platform == "darwin":
        base = os.path.join(home, "Library", "Application Support")
    else:
        base = env.get("XDG_CONFIG_HOME") or os.path.join(home, ".config")
    return os.path.join(base, "proxypal", "config.json")


def load_config(path: Optional[str] = None) -> Config:
    """Read and validate a config file; a missing file gives an empty config."""
    path = path or os.environ.get("PROXYPAL_CONFIG") or default_config_path()
    try:
        with open(path, "r", encoding="utf-8-sig") as f:   # -sig: Notepad writes a BOM
            text = f.read()
    except FileNotFoundError:
        return Config(path=path, loaded=False)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("", f"cannot read config file {path}: {exc}") from None
    try:
        raw = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError as exc:
        raise ConfigError("", f"{path}: line {exc.lineno}, column {exc.colno}: {exc.msg} "
                              "(the config file must be valid JSON)") from None
    except (ValueError, RecursionError) as exc:   # e.g. a number with thousands of digits
        raise ConfigError("", f"{path}: not usable JSON ({exc})") from None
    return parse_config(raw, path=path)


# =============================================================================
# 5. HTTP/1.1 wire (sans-I/O)
# Strategy: pure functions and small incremental decoders over bytes: find and
# parse a request head, decide the body framing, decode chunked bodies, split
# SSE streams into events, encode response heads. They raise WireError with
# the status to answer; they never read a socket or write a response.
# =============================================================================

@dataclasses.dataclass
class Request:
    method: str
    target: str
    path: str
    query: str
    version: str
    headers: Dict[str, str]                # lower-case names; repeats joined with ", "
    raw_headers: List[Tuple[str, str]]
    keep_alive: bool
    body: bytes = b""
    peer: str = ""
    framing: Tuple[str, int] = ("none", 0)  # set from body_framing() once the head is read

    def header(self, name: str, default: str = "") -> str:
        return self.headers.get(name, default)

    def query_params(self) -> Dict[str, str]:
        return dict(urllib.parse.parse_qsl(self.query, keep_blank_values=True))


# request-line = method SP request-target SP HTTP-version   (RFC 9112 section 3)
_METHOD = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_HEADER_NAME = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_BAD_VALUE_BYTES = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")   # HTAB allowed, CR/LF/NUL not
_BAD_TARGET_BYTES = re.compile(rb"[\x00-\x20\x7f]")
_VERSION = re.compile(rb"^HTTP/(\d)\.(\d)$")


def scan_head(buf: bytes) -> int:
    """Return the length of the request head at the start of buf (through the blank
    line), or -1 when more bytes are needed. Raises WireError for a head over a limit
    or with bare CR/LF line ends, however the bytes arrived."""
    end = buf.find(b"\r\n\r\n")
    region = buf if end < 0 else buf[:end + 2]
    if region.count(b"\n") != region.count(b"\r\n"):
        raise WireError("bare LF line ending in the request head; HTTP requires CRLF")
    bare_cr = region.count(b"\r") - region.count(b"\r\n")
    if bare_cr > 1 or (bare_cr == 1 and not region.endswith(b"\r")):
        raise WireError("bare CR in the request head; HTTP requires CRLF")
    first = region.find(b"\r\n")
    if first < 0:
        first = len(region)
    if first > MAX_REQUEST_LINE:
        raise WireError(f"request line longer than {MAX_REQUEST_LINE} bytes", 414)
    if len(region) - first > MAX_HEADER_BLOCK:
        raise WireError(f"request headers larger than {MAX_HEADER_BLOCK} bytes", 431)
    if end < 0:
        last = region.rfind(b"\n") + 1
        if last and len(region) - last > MAX_HEADER_FIELD:
            raise WireError(f"a header field is longer than {MAX_HEADER_FIELD} bytes", 431)
        if region.count(b"\n") > MAX_HEADERS + 1:
            raise WireError(f"more than {MAX_HEADERS} header fields", 431)
        return -1
    return end + 4


def parse_request_head(head: bytes) -> Request:
    """Parse a complete head (request line, fields, blank line) into a Request."""
    lines = head[:-4].split(b"\r\n") if head.endswith(b"\r\n\r\n") else head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not _METHOD.match(parts[0]) or not parts[1] \
            or _BAD_TARGET_BYTES.search(parts[1]):
        raise WireError(f"malformed request line {printable(lines[0].decode('latin-1'), 80)!r}")
    version = _VERSION.match(parts[2])
    if not version:
        raise WireError(f"malformed HTTP version {printable(parts[2].decode('latin-1'), 20)!r}")
    if version.group(1) != b"1":
        raise WireError("only HTTP/1.0 and HTTP/1.1 are supported", 505)
    if len(lines) - 1 > MAX_HEADERS:
        raise WireError(f"more than {MAX_HEADERS} header fields", 431)
    headers: Dict[str, str] = {}
    raw: List[Tuple[str, str]] = []
    for line in lines[1:]:
        if len(line) > MAX_HEADER_FIELD:
            raise WireError(f"a header field is longer than {MAX_HEADER_FIELD} bytes", 431)
        if line[:1] in (b" ", b"\t"):
            raise WireError("obsolete line folding in headers is not allowed (RFC 9112 5.2)")
        name, colon, value = line.partition(b":")
        if not colon or not _HEADER_NAME.match(name):
            raise WireError(f"malformed header field {printable(line.decode('latin-1'), 60)!r}"
                            " (no whitespace is allowed before the colon)")
        value = value.strip(b" \t")
        if _BAD_VALUE_BYTES.search(value):
            raise WireError(f"control character in header {name.decode('latin-1')!r}")
        key, text = name.decode("ascii").lower(), value.decode("latin-1")
        raw.append((key, text))
        headers[key] = headers[key] + ", " + text if key in headers else text
    method = parts[0].decode("ascii")
    target = parts[1].decode("latin-1")
    http11 = version.group(2) != b"0"
    if http11 and "host" not in headers:
        raise WireError("HTTP/1.1 request without a Host header (RFC 9112 section 3.2)")
    conn = headers.get("connection", "").lower()
    keep_alive = ("close" not in conn) if http11 else ("keep-alive" in conn)
    path, _, query = target.partition("?")
    return Request(method, target, path, query, f"HTTP/1.{version.group(2).decode()}",
                   headers, raw, keep_alive)


def body_framing(req: Request) -> Tuple[str, int]:
    """('none', 0), ('length', n) or ('chunked', 0); refuses ambiguous framing (RFC 9112 6.3)."""
    lengths = [v.strip() for k, v in req.raw_headers if k == "content-length" for v in v.split(",")]
    te = req.headers.get("transfer-encoding")
    if te is not None:
        if lengths:
            raise WireError("both Content-Length and Transfer-Encoding were sent")
        if te.strip().lower() != "chunked" or req.version == "HTTP/1.0":
            raise WireError(f"unsupported Transfer-Encoding {printable(te, 40)!r}; only chunked")
        return "chunked", 0
    if not lengths:
        return "none", 0
    if len(set(lengths)) != 1:
        raise WireError("differing Content-Length values")
    if not lengths[0].isdigit() or not lengths[0].isascii() or len(lengths[0]) > 15:
        raise WireError(f"invalid Content-Length {printable(lengths[0], 20)!r}")
    return "length", int(lengths[0])


# chunk = chunk-size [ chunk-ext ] CRLF chunk-data CRLF        (RFC 9112 section 7.1)
# chunk-ext = *( BWS ";" BWS ext-name [ BWS "=" BWS ( token / quoted-string ) ] )
_CHUNK_LINE = re.compile(
    rb'^([0-9A-Fa-f]{1,16})((?:[ \t]*;[ \t]*[!#$%&\'*+\-.^_`|~0-9A-Za-z]+'
    rb'(?:[ \t]*=[ \t]*(?:[!#$%&\'*+\-.^_`|~0-9A-Za-z]+|"(?:[^"\\\x00-\x08\x0a-\x1f\x7f]|\\[\t -~])*"))?)*)[ \t]*$')


class ChunkedDecoder:
    """Incremental chunked-body decoder: feed(bytes) -> data pieces; .done at the end;
    .unused holds bytes after the body (a pipelined request)."""

    def __init__(self, max_size: int):
        self.max_size = max_size
        self.size = 0
        self.done = False
        self.unused = b""
        self._buf = b""
        self._left = 0                     # bytes of chunk data still expected
        self._state = "size"               # size | data | crlf | trailer

    def feed(self, data: bytes) -> List[bytes]:
        if self.done:
            self.unused += data
            return []
        out: List[bytes] = []
        buf = self._buf + data
        while buf and not self.done:
            if self._state == "data":
                piece, buf = buf[:self._left], buf[self._left:]
                self._left -= len(piece)
                out.append(piece)
                if not self._left:
                    self._state = "crlf"
            elif self._state == "crlf":
                if len(buf) < 2:
                    break
                if buf[:2] != b"\r\n":
                    raise WireError("chunk data not followed by CRLF")
                buf, self._state = buf[2:], "size"
            else:
                line_end = buf.find(b"\r\n")
                limit = MAX_CHUNK_LINE if self._state == "size" else MAX_TRAILER_BLOCK
                if line_end < 0:
                    if len(buf) > limit or b"\n" in buf:
                        raise WireError("invalid chunk size line")
                    break
                line, buf = buf[:line_end], buf[line_end + 2:]
                if self._state == "size":
                    self._size_line(line)
                elif not line:
                    self.done, self.unused = True, buf
                    buf = b""
                elif b"\r" in line or b"\n" in line or line[:1] in (b" ", b"\t") \
                        or b":" not in line:
                    raise WireError("malformed chunked trailer")
        self._buf = buf
        return out

    def _size_line(self, line: bytes) -> None:
        match = _CHUNK_LINE.match(line)
        if not match:
            raise WireError(f"invalid chunk size line {printable(line.decode('latin-1'), 40)!r}")
        size = int(match.group(1), 16)
        self.size += size
        if self.size > self.max_size:
            raise WireError(f"request body larger than the {size_text(self.max_size)} limit "
                            "(maxBodyMb)", 413)
        self._left = size
        self._state = "data" if size else "trailer"


_SSE_BOUNDARY = re.compile(rb"(?:\r\n|\n|\r(?!\n))(?:\r\n|\n|\r(?!\n))")


class SSESplitter:
    """Splits a byte stream into complete SSE events (each through its blank line),
    as WHATWG's event stream grammar delimits them: CRLF, LF or lone CR."""

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> List[bytes]:
        buf = self._buf + data if self._buf else data
        events, start = [], 0
        while True:
            match = _SSE_BOUNDARY.search(buf, start)
            if not match:
                break
            # An event ending in a CR is complete even if an LF follows it (the LF is then
            # an empty line that dispatches nothing), so it goes out at once.
            events.append(buf[start:match.end()])
            start = match.end()
        self._buf = buf[start:]
        return events

    @property
    def pending(self) -> bytes:
        return self._buf

    def close(self) -> List[bytes]:
        """At end of stream: a final event left without its blank line, if any."""
        rest, self._buf = self._buf, b""
        return [rest] if rest.strip() else []


_SIMPLE_EVENT = re.compile(rb"(?:event: ?([^\r\n:]*)\n)?data: ?([^\r\n]*)\n\n?\Z")


def parse_sse_event(block: bytes) -> Optional[Tuple[str, str]]:
    """(event type, data) of one complete SSE event; None for comments-only blocks."""
    simple = _SIMPLE_EVENT.match(block)    # the shape nearly every upstream sends
    if simple:
        event = simple.group(1)
        return (event.decode("utf-8", "replace") if event else "message",
                simple.group(2).decode("utf-8", "replace"))
    event, data = "message", []
    for line in re.split(r"\r\n|\r|\n", block.decode("utf-8", "replace").lstrip("\ufeff")):
        if not line or line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "event":
            event = value
        elif name == "data":
            data.append(value)
    return (event, "\n".join(data)) if data else None


_REASONS = {status.value: status.phrase for status in http.HTTPStatus}
_REASONS[529] = "Overloaded"


def response_head(status: int, headers: Sequence[Tuple[str, str]], keep_alive: bool,
                  version: str = "HTTP/1.1") -> bytes:
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}"]
    lines += [f"{k}: {v}" for k, v in headers]
    if not keep_alive:
        lines.append("Connection: close")
    elif version == "HTTP/1.0":
        lines.append("Connection: keep-alive")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked response body."""
    return b"%x\r\n%s\r\n" % (len(data), data)


# =============================================================================
# 6. API formats
# Strategy: what differs between the OpenAI, Anthropic and Gemini wire formats
# outside of translation: which format a path speaks, error bodies (ours and
# the upstream's), in-stream error events and the model field. Pure.
# =============================================================================

ANTHROPIC_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                         402: "billing_error", 403: "permission_error", 404: "not_found_error",
                         413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
                         504: "timeout_error", 529: "overloaded_error"}
OPENAI_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                      403: "permission_error", 404: "not_found_error", 408: "timeout",
                      413: "invalid_request_error", 429: "rate_limit_error"}
OPENAI_ERROR_CODES = {401: "invalid_api_key", 404: "model_not_found", 413: "request_too_large",
                      429: "rate_limit_exceeded"}
GEMINI_STATUSES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED",
                   404: "NOT_FOUND", 408: "DEADLINE_EXCEEDED", 409: "ABORTED",
                   413: "INVALID_ARGUMENT", 429: "RESOURCE_EXHAUSTED", 500: "INTERNAL",
                   501: "UNIMPLEMENTED", 502: "UNAVAILABLE", 503: "UNAVAILABLE",
                   504: "DEADLINE_EXCEEDED"}


def client_format(path: str, headers: Optional[Dict[str, str]] = None) -> str:
    """'anthropic', 'openai' or 'gemini': the API a request path speaks."""
    path = strip_amp_prefix(path)
    if path.startswith("/v1/messages"):
        return "anthropic"
    if path.startswith("/v1beta/"):
        return "gemini"
    if headers and "anthropic-version" in headers:
        return "anthropic"
    return "openai"


def strip_amp_prefix(path: str) -> str:
    """Amp CLI's /api/provider/{provider}/v1/... routes reach the /v1/... handlers."""
    if path.startswith("/api/provider/"):
        rest = path[len("/api/provider/"):]
        slash = rest.find("/")
        return rest[slash:] if slash >= 0 else "/"
    return path


def error_object(fmt: str, status: int, message: str, err_type: str = "") -> Dict[str, Any]:
    if fmt == "anthropic":
        kind = err_type or ANTHROPIC_ERROR_TYPES.get(status) or (
            "api_error" if status >= 500 else "invalid_request_error")
        return {"type": "error", "error": {"type": kind, "message": message}}
    if fmt == "gemini":
        return {"error": {"code": status, "message": message,
                          "status": GEMINI_STATUSES.get(status, "INTERNAL" if status >= 500
                                                        else "FAILED_PRECONDITION")}}
    kind = err_type or OPENAI_ERROR_TYPES.get(status) or (
        "api_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind,
                      "code": OPENAI_ERROR_CODES.get(status), "param": None}}


def error_body(fmt: str, status: int, message: str, err_type: str = "") -> bytes:
    """The one renderer of every error the proxy answers, in the client's format."""
    return dumps(error_object(fmt, status, message, err_type))


def stream_error_event(fmt: str, status: int, message: str) -> bytes:
    """An error as the last event of a stream that had already begun."""
    body = error_body(fmt, status, message)
    if fmt == "anthropic":
        return b"event: error\ndata: " + body + b"\n\n"
    return b"data: " + body + b"\n\n"


def upstream_message(body: bytes) -> Tuple[str, str]:
    """(message, code) out of any upstream error body: OpenAI, Anthropic, Gemini,
    Azure ({"error": {"code": "DeploymentNotFound"}}), Ollama ({"error": "..."}), text."""
    try:
        obj = json.loads(body)
    except ValueError:
        text = body.decode("utf-8", "replace").strip()
        text = re.sub(r"<[^>]+>", " ", text) if text.startswith("<") else text
        return printable(" ".join(text.split()), 300), ""
    err = obj.get("error") if isinstance(obj, dict) else None
    if isinstance(err, str):
        return err, ""
    if isinstance(err, dict):
        code = err.get("code") or err.get("type") or err.get("status") or ""
        return str(err.get("message") or err), str(code)
    if isinstance(obj, list) and obj and isinstance(obj[0], dict):   # Gemini sometimes wraps
        return upstream_message(dumps(obj[0]))
    if isinstance(obj, dict) and obj.get("message"):
        return str(obj["message"]), str(obj.get("code") or obj.get("__type") or "")
    return printable(body.decode("utf-8", "replace"), 300), ""


def upstream_error_body(client_fmt: str, upstream_fmt: str, status: int, body: bytes,
                        provider: str, hint: str = "") -> bytes:
    """An upstream's error for the client: its own body kept (status, type, code, ids)
    when formats match and the shape is the client's, with the provider's name before
    the message and the hint after it; otherwise rebuilt in the client's format."""
    prefix, suffix = f"{provider}: ", (f" ({hint})" if hint else "")
    if client_fmt == upstream_fmt:
        try:
            obj = json.loads(body)
        except ValueError:
            obj = None
        err = obj.get("error") if isinstance(obj, dict) else None
        shaped = isinstance(err, dict) and isinstance(err.get("message"), str) and (
            client_fmt != "anthropic" or obj.get("type") == "error")
        if shaped:
            err["message"] = f"{prefix}{err['message']}{suffix}"
            return dumps(obj)
    message, code = upstream_message(body)
    if code and code not in message and not code.isdigit():
        message = f"{code}: {message}"
    err_type = ""
    if client_fmt == "anthropic" and code == "DeploymentNotFound":
        err_type = "not_found_error"
    return error_body(client_fmt, status, f"{prefix}{message}{suffix}", err_type)


def retry_after_seconds(value: str, now: Optional[float] = None) -> Optional[float]:
    """Seconds from a Retry-After header (delta-seconds or HTTP-date)."""
    value = (value or "").strip()
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        import email.utils
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


def clamp_output_tokens(body: Dict[str, Any], limit: Optional[int]) -> None:
    """Apply a model entry's maxOutputTokens to whichever field the format uses."""
    if not limit:
        return
    for key in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > limit:
            body[key] = limit
    config = body.get("generationConfig")
    if isinstance(config, dict):
        value = config.get("maxOutputTokens")
        if isinstance(value, int) and value > limit:
            config["maxOutputTokens"] = limit


def rewrite_model(body: bytes, alias: str) -> bytes:
    """A non-stream JSON answer with `model` set to the name the client asked for."""
    try:
        obj = json.loads(body)
    except ValueError:
        return body
    if isinstance(obj, dict) and isinstance(obj.get("model"), str) and obj["model"] != alias:
        obj["model"] = alias
        return dumps(obj)
    return body


def usage_tokens(obj: Any) -> Tuple[Optional[int], Optional[int]]:
    """(input, output) tokens reported by any format's answer or stream event; None where
    it says nothing. Anthropic's input excludes cached tokens, so they are added back."""
    if not isinstance(obj, dict):
        return None, None
    usage = obj.get("usage") or obj.get("usageMetadata")
    if usage is None and isinstance(obj.get("message"), dict):
        usage = obj["message"].get("usage")          # Anthropic message_start
    if not isinstance(usage, dict):
        return None, None

    def total(*keys: str) -> Optional[int]:
        values = [usage[k] for k in keys if isinstance(usage.get(k), int)]
        return sum(values) if values else None
    if "promptTokenCount" in usage or "candidatesTokenCount" in usage:
        return total("promptTokenCount"), total("candidatesTokenCount", "thoughtsTokenCount")
    if "prompt_tokens" in usage or "completion_tokens" in usage:
        return total("prompt_tokens"), total("completion_tokens")
    return (total("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"),
            total("output_tokens"))


def stream_usage(events: bytes) -> Tuple[Optional[int], Optional[int]]:
    """Token counts from the SSE events in `events` that carry any (cheap when none do)."""
    found: Tuple[Optional[int], Optional[int]] = (None, None)
    if b'"usage' not in events:
        return found
    for block in re.split(rb"\r?\n\r?\n", events):
        if b'"usage' in block:
            parsed = parse_sse_event(block)
            try:
                tokens = usage_tokens(json.loads(parsed[1])) if parsed else (None, None)
            except ValueError:
                continue
            found = (tokens[0] if tokens[0] is not None else found[0],
                     tokens[1] if tokens[1] is not None else found[1])
    return found


# =============================================================================
# 6a. Amazon Bedrock (sans-I/O)
# Strategy: what makes Bedrock differ from the Anthropic API it carries: the
# body (anthropic_version, anthropic_beta, no model/stream), the URL, AWS
# Signature Version 4 written with hmac/hashlib, the binary event stream
# decoded incrementally with both CRCs checked, and its error names mapped to
# Anthropic's. Pure functions of their inputs (the clock is a parameter).
# =============================================================================

BEDROCK_ANTHROPIC_VERSION = "bedrock-2023-05-31"
# Betas Bedrock accepts in the body; others make it answer 400 ValidationException (F.2).
BEDROCK_BETA_PREFIXES = ("interleaved-thinking-", "context-1m-", "computer-use-",
                         "token-efficient-tools-", "fine-grained-tool-streaming-")
BEDROCK_ERRORS = {   # x-amzn-ErrorType -> (HTTP status for the client, Anthropic error type), F.7
    "ValidationException": (400, "invalid_request_error"),
    "ServiceQuotaExceededException": (429, "rate_limit_error"),
    "AccessDeniedException": (403, "permission_error"),
    "UnrecognizedClientException": (401, "authentication_error"),
    "InvalidSignatureException": (401, "authentication_error"),
    "ExpiredTokenException": (401, "authentication_error"),
    "ResourceNotFoundException": (404, "not_found_error"),
    "ModelTimeoutException": (504, "timeout_error"),
    "ModelErrorException": (500, "api_error"),
    "ThrottlingException": (429, "rate_limit_error"),
    "ModelNotReadyException": (529, "overloaded_error"),
    "InternalServerException": (500, "api_error"),
    "ServiceUnavailableException": (529, "overloaded_error"),
    "ModelStreamErrorException": (500, "api_error"),
}
MAX_EVENT_STREAM_FRAME = 16 * 1024 * 1024   # one Bedrock frame; real ones are a few KiB


def bedrock_path(model: str, op: str, stream: bool) -> str:
    """/model/{id}/invoke[-with-response-stream] or /count-tokens; the id is one path
    segment, ':' kept raw as the AWS SDKs send it (F.1)."""
    action = "count-tokens" if op == "count_tokens" else (
        "invoke-with-response-stream" if stream else "invoke")
    return f"/model/{urllib.parse.quote(model, safe=':')}/{action}"


def bedrock_body(body: Dict[str, Any], beta_header: str) -> Dict[str, Any]:
    """An Anthropic Messages body as Bedrock's InvokeModel takes it (F.2)."""
    out = {k: v for k, v in body.items() if k not in ("model", "stream")}
    out["anthropic_version"] = BEDROCK_ANTHROPIC_VERSION
    betas = [b.strip() for b in beta_header.split(",") if b.strip().startswith(BEDROCK_BETA_PREFIXES)]
    if betas:
        out["anthropic_beta"] = betas
    return out


def bedrock_count_body(body: Dict[str, Any], beta_header: str) -> Dict[str, Any]:
    """CountTokens wraps the InvokeModel body, base64-encoded (F.2)."""
    import base64
    inner = bedrock_body(dict(body, max_tokens=body.get("max_tokens") or 1), beta_header)
    return {"input": {"invokeModel": {"body": base64.b64encode(dumps(inner)).decode("ascii")}}}


@dataclasses.dataclass(frozen=True)
class AwsCredentials:
    access_key: str
    secret_key: str
    session_token: str = ""


def aws_credentials(headers: Sequence[Tuple[str, str]], environ: Dict[str, str]
                    ) -> Optional[AwsCredentials]:
    """The seed's x-amz-access-key / x-amz-secret-key (/ x-amz-session-token) headers,
    else AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN; None if neither."""
    given = {k.lower(): v.strip() for k, v in headers}
    if given.get("x-amz-access-key") and given.get("x-amz-secret-key"):
        return AwsCredentials(given["x-amz-access-key"], given["x-amz-secret-key"],
                              given.get("x-amz-session-token") or given.get("x-amz-security-token", ""))
    if environ.get("AWS_ACCESS_KEY_ID") and environ.get("AWS_SECRET_ACCESS_KEY"):
        return AwsCredentials(environ["AWS_ACCESS_KEY_ID"], environ["AWS_SECRET_ACCESS_KEY"],
                              environ.get("AWS_SESSION_TOKEN", ""))
    return None


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode("utf-8"), hashlib.sha256).digest()


def sigv4_sign(method: str, url: str, headers: Dict[str, str], body: bytes,
               creds: AwsCredentials, region: str, amz_date: str,
               service: str = "bedrock") -> Dict[str, str]:
    """AWS Signature Version 4 (F.4): the headers to add (X-Amz-Date, X-Amz-Security-Token,
    Authorization). Every header in `headers` is signed, plus host; send them unchanged."""
    parts = urllib.parse.urlsplit(url)
    added = {"x-amz-date": amz_date}
    if creds.session_token:
        added["x-amz-security-token"] = creds.session_token
    signed = {k.lower(): " ".join(str(v).split()) for k, v in headers.items()}
    signed.update(added)
    signed.setdefault("host", parts.netloc)
    names = sorted(signed)
    payload_hash = hashlib.sha256(body).hexdigest()
    query = sorted(urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
    canonical = "\n".join([
        method,
        urllib.parse.quote(parts.path or "/", safe="/~"),
        "&".join(f"{urllib.parse.quote(k, safe='-_.~')}={urllib.parse.quote(v, safe='-_.~')}"
                 for k, v in query),
        "".join(f"{name}:{signed[name]}\n" for name in names),
        ";".join(names),
        payload_hash])
    date = amz_date[:8]
    scope = f"{date}/{region}/{service}/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope,
                         hashlib.sha256(canonical.encode("utf-8")).hexdigest()])
    key = _hmac(_hmac(_hmac(_hmac(("AWS4" + creds.secret_key).encode("utf-8"), date), region),
                      service), "aws4_request")
    signature = hmac.new(key, to_sign.encode("utf-8"), hashlib.sha256).hexdigest()
    added["authorization"] = (f"AWS4-HMAC-SHA256 Credential={creds.access_key}/{scope}, "
                              f"SignedHeaders={';'.join(names)}, Signature={signature}")
    return added


def amz_date(now: Optional[float] = None) -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None else now))


class EventStreamDecoder:
    """Incremental decoder of application/vnd.amazon.eventstream (F.5): feed(bytes) ->
    [(headers, payload)] for each complete message, both CRC32s verified."""

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> List[Tuple[Dict[str, Any], bytes]]:
        import zlib
        buf = self._buf + data if self._buf else data
        out = []
        while len(buf) >= 12:
            total, header_len, prelude_crc = struct.unpack(">III", buf[:12])
            if zlib.crc32(buf[:8]) != prelude_crc:
                raise UpstreamError("corrupt Bedrock event stream: prelude CRC mismatch")
            if total < 16 + header_len or total > MAX_EVENT_STREAM_FRAME:
                raise UpstreamError(f"corrupt Bedrock event stream: frame length {total}")
            if len(buf) < total:
                break
            frame, buf = buf[:total], buf[total:]
            if zlib.crc32(frame[:-4]) != struct.unpack(">I", frame[-4:])[0]:
                raise UpstreamError("corrupt Bedrock event stream: message CRC mismatch")
            out.append((self._headers(frame[12:12 + header_len]), frame[12 + header_len:-4]))
        self._buf = buf
        return out

    @property
    def pending(self) -> int:
        return len(self._buf)

    @staticmethod
    def _headers(raw: bytes) -> Dict[str, Any]:
        headers: Dict[str, Any] = {}
        fixed = {2: ">b", 3: ">h", 4: ">i", 5: ">q", 8: ">q"}
        i = 0
        try:
            while i < len(raw):
                name = raw[i + 1:i + 1 + raw[i]].decode("utf-8")
                i += 1 + raw[i]
                kind = raw[i]
                i += 1
                if kind in (0, 1):
                    value: Any = kind == 0
                elif kind in fixed:
                    size = struct.calcsize(fixed[kind])
                    value = struct.unpack(fixed[kind], raw[i:i + size])[0]
                    i += size
                elif kind in (6, 7):
                    size = struct.unpack(">H", raw[i:i + 2])[0]
                    value = raw[i + 2:i + 2 + size]
                    value = value.decode("utf-8") if kind == 7 else value
                    i += 2 + size
                elif kind == 9:
                    value, i = raw[i:i + 16], i + 16
                else:
                    raise ValueError(f"header type {kind}")
                headers[name] = value
        except (IndexError, ValueError, struct.error) as exc:
            raise UpstreamError(f"corrupt Bedrock event stream headers ({exc})") from None
        return headers


def bedrock_event(headers: Dict[str, Any], payload: bytes) -> Tuple[str, str]:
    """One event-stream message as the Anthropic SSE event it carries: (type, data JSON).
    Exceptions inside the stream become Anthropic `error` events."""
    import base64
    kind = headers.get(":message-type")
    if kind == "event" and headers.get(":event-type") == "chunk":
        try:
            data = base64.b64decode(json.loads(payload)["bytes"]).decode("utf-8")
            return json.loads(data).get("type", "message"), data
        except (ValueError, KeyError, TypeError, AttributeError):
            return "error", dumps(error_object("anthropic", 502, "malformed Bedrock chunk"))
    if kind == "event":
        return "", ""                      # other event types carry nothing for the client
    name = headers.get(":exception-type") or headers.get(":error-code") or "InternalServerException"
    try:
        message = json.loads(payload).get("message") or headers.get(":error-message") or name
    except (ValueError, AttributeError):
        message = headers.get(":error-message") or name
    _, err_type = BEDROCK_ERRORS.get(name[:1].upper() + name[1:], (500, "api_error"))
    return "error", dumps({"type": "error", "error": {"type": err_type,
                                                      "message": f"{name}: {message}"}})


def bedrock_error(status: int, error_type_header: str, body: bytes) -> Tuple[int, bytes]:
    """A Bedrock HTTP error as (status, Anthropic error body) per F.7."""
    name = (error_type_header or "").split(":")[0]
    try:
        obj = json.loads(body)
    except ValueError:
        obj = {}
    if not name and isinstance(obj, dict):
        name = str(obj.get("__type") or obj.get("code") or "").split("#")[-1]
    message = (obj.get("message") or obj.get("Message")) if isinstance(obj, dict) else None
    message = message or body.decode("utf-8", "replace")[:300] or f"HTTP {status}"
    new_status, err_type = BEDROCK_ERRORS.get(name, (status, ""))
    text = f"{name}: {message}" if name else str(message)
    return new_status, error_body("anthropic", new_status, text, err_type)


# =============================================================================
# 7. Translation
# Strategy: one table keyed by (client format, upstream format) says how a
# request, a response and a stream cross from one format to the other. Same
# format on both sides is pass-through: the body is forwarded with only the
# model rewritten and the stream relayed event by event, untouched.
# Translators are pure dict -> dict functions and small stream classes.
# =============================================================================

@dataclasses.dataclass(frozen=True)
class Translator:
    """How one (client format, upstream format) pair crosses; None fields: pass-through.
    request(body) -> upstream body; response(body, model) -> client body;
    stream(model, input_estimate) -> object with feed(event, data) and close(), both
    returning [(event name, data)] in the client's format."""
    request: Optional[Callable[[Dict[str, Any]], Dict[str, Any]]]
    response: Optional[Callable[[Dict[str, Any], str], Dict[str, Any]]]
    stream: Optional[Callable[[str, int], Any]]


PASS_THROUGH = Translator(None, None, None)

TRANSLATORS: Dict[Tuple[str, str], Translator] = {
    ("openai", "openai"): PASS_THROUGH,
    ("anthropic", "anthropic"): PASS_THROUGH,
    ("gemini", "gemini"): PASS_THROUGH,
}


def drop_unsigned_thinking(body: Dict[str, Any]) -> None:
    """Thinking blocks without a signature (made from another provider's reasoning by a
    translator) fail Anthropic's verification (H.4): they are dropped before an
    Anthropic-format upstream sees them. Signed blocks pass untouched."""
    for message in body.get("messages") or ():
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list) and any(_unsigned_thinking(b) for b in content):
            message["content"] = [b for b in content if not _unsigned_thinking(b)]


def _unsigned_thinking(block: Any) -> bool:
    return isinstance(block, dict) and block.get("type") == "thinking" and not block.get("signature")


def encode_event(fmt: str, event: str, data: str) -> bytes:
    """One SSE event as the client's format writes it (PROTOCOLS.md section 0)."""
    if fmt == "anthropic":
        return f"event: {event}\ndata: {data}\n\n".encode("utf-8")
    return f"data: {data}\n\n".encode("utf-8")


def estimate_tokens(body: Dict[str, Any]) -> int:
    """A heuristic, not a tokenizer: UTF-8 bytes of the JSON of the prompt parts
    (system, messages, tools, Gemini contents) divided by 4, rounded up. English text
    and JSON average close to 4 bytes a token for current models."""
    parts = {k: body[k] for k in ("system", "messages", "tools", "contents", "systemInstruction",
                                  "prompt", "input") if k in body}
    return (len(dumps(parts)) + 3) // 4 if parts else 0


def local_count(op: str, body: Dict[str, Any]) -> Dict[str, int]:
    """count_tokens answered here for upstreams that cannot count (A.6): an estimate."""
    if op == "gemini_count_tokens":
        return {"totalTokens": estimate_tokens(body)}
    return {"input_tokens": estimate_tokens(body)}


class AnthropicEventRelay:
    """Anthropic events relayed as they are (Bedrock's decoded frames), ending with an
    error event if the upstream stopped before message_stop."""

    def __init__(self, model: str, input_estimate: int = 0):
        self.finished = False

    def feed(self, event: str, data: str) -> List[Tuple[str, str]]:
        if event in ("message_stop", "error"):
            self.finished = True
        return [(event, data)] if event else []

    def close(self) -> List[Tuple[str, str]]:
        if self.finished:
            return []
        return [("error", dumps(error_object("anthropic", 502, "upstream ended the stream "
                                                               "before message_stop")).decode())]


# -- Anthropic Messages <-> OpenAI Chat Completions (PROTOCOLS.md C and D) -------

ANTHROPIC_DEFAULT_MAX_TOKENS = 8192      # Anthropic requires max_tokens (A.2); an OpenAI client
                                         # may omit it. 8192 is the largest cap every current
                                         # Claude model (3.5 and newer) accepts; 4.x allow more,
                                         # and the model entry's maxOutputTokens clamps anyway.
ANTHROPIC_PLACEHOLDER_TEXT = "(continue)"   # Anthropic needs a first user turn, no empty text
THINKING_BUDGETS = {"minimal": 1024, "low": 2048, "medium": 8192, "high": 24576,
                    "xhigh": 32768}      # reasoning_effort -> budget_tokens (D.1 suggestions)
BILLING_HEADER_PREFIX = "x-anthropic-billing-header:"   # Claude Code attribution text (H.8)
JSON_OBJECT_INSTRUCTION = "Respond with one JSON object and nothing else."

STOP_REASON_FROM_FINISH = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use",
                           "function_call": "tool_use", "content_filter": "refusal"}   # C.4
FINISH_FROM_STOP_REASON = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length",
                           "tool_use": "tool_calls", "refusal": "content_filter",
                           "pause_turn": "stop", "model_context_window_exceeded": "length"}  # D.4

_UNSAFE_TOOL_ID = re.compile(r"[^a-zA-Z0-9_-]")
_DATA_URL = re.compile(r"^data:([^;,]+)?((?:;[^;,]*)*?);base64,(.*)$", re.S)


def safe_tool_id(tool_id: Any, fallback: str) -> str:
    """A tool id Anthropic accepts (^[a-zA-Z0-9_-]+$). Deterministic, so the id of a
    tool_use and of its tool_result map alike without any state (H.20)."""
    text = tool_id if isinstance(tool_id, str) else ""
    return _UNSAFE_TOOL_ID.sub("_", text) or fallback


def _sse_json(obj: Any) -> str:
    return dumps(obj).decode("utf-8")


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _blocks(content: Any, where: str) -> List[Dict[str, Any]]:
    """Anthropic content (a string or a block list) as a block list."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if content is None:
        return []
    if not isinstance(content, list):
        raise ClientError(f"{where} must be a string or a list of blocks, got {_short(content)}")
    return [b for b in content if isinstance(b, dict)]


def _is_openai_usage(usage: Any) -> bool:
    return isinstance(usage, dict) and any(k in usage for k in ("prompt_tokens", "completion_tokens"))


def anthropic_usage_from_openai(usage: Dict[str, Any]) -> Dict[str, int]:
    """C.5: OpenAI's prompt_tokens includes cached tokens; Anthropic's input_tokens does not."""
    details = usage.get("prompt_tokens_details") or {}
    cached = _count(details.get("cached_tokens"))
    created = _count(usage.get("cache_creation_input_tokens") or details.get("cache_write_tokens")
                     or details.get("cache_creation_input_tokens"))
    return {"input_tokens": max(0, _count(usage.get("prompt_tokens")) - cached - created),
            "output_tokens": _count(usage.get("completion_tokens")),
            "cache_creation_input_tokens": created, "cache_read_input_tokens": cached}


def openai_usage_from_anthropic(usage: Dict[str, Any]) -> Dict[str, Any]:
    """D.5: prompt_tokens counts uncached, cache-written and cache-read input alike."""
    read = _count(usage.get("cache_read_input_tokens"))
    prompt = (_count(usage.get("input_tokens")) + _count(usage.get("cache_creation_input_tokens"))
              + read)
    completion = _count(usage.get("output_tokens"))
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion, "prompt_tokens_details": {"cached_tokens": read}}


def _tool_input(arguments: Any) -> Dict[str, Any]:
    """OpenAI tool arguments (a JSON string, or an object from lax servers, H.13) as an
    Anthropic tool input. Invalid JSON or a non-object becomes {} (CLIProxyAPI's choice):
    Anthropic needs an object, and a half-parsed guess could run the wrong command."""
    if isinstance(arguments, dict):
        return arguments
    try:
        value = json.loads(arguments) if isinstance(arguments, str) and arguments.strip() else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


# -- Anthropic client -> OpenAI-compatible upstream: request (C.1) -----------------

def _openai_system_text(system: Any) -> str:
    """One system string (H.14), Claude Code's billing header block dropped (H.8)."""
    texts = [b.get("text") for b in _blocks(system, "system") if b.get("type") == "text"]
    kept = [t for t in texts if isinstance(t, str) and t
            and not t.startswith(BILLING_HEADER_PREFIX)]
    return "\n".join(kept)


def _openai_part(block: Dict[str, Any], where: str) -> Optional[Dict[str, Any]]:
    """One Anthropic user block as an OpenAI content part; None for blocks with no
    OpenAI meaning (thinking, cache-only, server tool results)."""
    kind = block.get("type")
    if kind == "text":
        text = block.get("text")
        return {"type": "text", "text": text} if isinstance(text, str) and text else None
    source = block.get("source") if isinstance(block.get("source"), dict) else {}
    origin = source.get("type")
    if kind == "image" and origin == "base64":
        url = f"data:{source.get('media_type', 'image/png')};base64,{source.get('data', '')}"
        return {"type": "image_url", "image_url": {"url": url}}
    if kind == "image" and origin == "url":
        return {"type": "image_url", "image_url": {"url": source.get("url", "")}}
    if kind == "document" and origin == "base64":
        data = f"data:{source.get('media_type', 'application/pdf')};base64,{source.get('data', '')}"
        name = block.get("title") if isinstance(block.get("title"), str) else "document.pdf"
        return {"type": "file", "file": {"filename": name, "file_data": data}}
    if kind == "document" and origin == "text":
        return {"type": "text", "text": str(source.get("data", ""))}
    if kind == "document" and origin == "content":
        texts = [b.get("text", "") for b in _blocks(source.get("content"), where)
                 if b.get("type") == "text"]
        return {"type": "text", "text": "\n".join(texts)} if any(texts) else None
    if kind in ("image", "document"):
        raise ClientError(f"{where}: a {kind} with source type {origin!r} cannot be sent to an "
                          "OpenAI-compatible upstream; send it as base64 data instead")
    return None


def _openai_user_content(parts: List[Dict[str, Any]]) -> Any:
    """A string when every part is text (servers that reject arrays still work), else parts."""
    if all(p["type"] == "text" for p in parts):
        return "\n".join(p["text"] for p in parts)
    return parts


def _openai_tool_message(block: Dict[str, Any], where: str) -> Tuple[Dict[str, Any], list]:
    """A tool_result as a `tool` message, plus the parts (images, files) it carried, which
    go to a user message after it: most servers reject anything but text in `tool`."""
    content = block.get("content")
    texts, extra = [], []
    for i, inner in enumerate(_blocks(content, f"{where}.content")):
        part = _openai_part(inner, f"{where}.content[{i}]")
        if part is None:
            continue
        if part["type"] == "text":
            texts.append(part["text"])
        else:
            texts.append(f"[{inner.get('type')} {len(extra) + 1} follows in the next message]")
            extra.append(part)
    text = "\n\n".join(texts)
    if block.get("is_error") is True:     # no OpenAI field: say it in the text (C.1 rule 2)
        text = f"Error: {text}" if text else "Error"
    call_id = safe_tool_id(block.get("tool_use_id"), "toolu_missing")
    return {"role": "tool", "tool_call_id": call_id, "content": text}, extra


def _openai_user_messages(blocks: List[Dict[str, Any]], where: str) -> List[Dict[str, Any]]:
    """C.1: tool_results first (each its own `tool` message), then one user message."""
    tools, parts = [], []
    extra: List[Dict[str, Any]] = []
    for i, block in enumerate(blocks):
        if block.get("type") == "tool_result":
            message, carried = _openai_tool_message(block, f"{where}[{i}]")
            tools.append(message)
            extra += carried
        else:
            part = _openai_part(block, f"{where}[{i}]")
            if part is not None:
                parts.append(part)
    parts = extra + parts
    return tools + ([{"role": "user", "content": _openai_user_content(parts)}] if parts else [])


def _openai_assistant_message(blocks: List[Dict[str, Any]], where: str) -> List[Dict[str, Any]]:
    """One assistant message; thinking and redacted_thinking dropped (their signatures
    mean nothing to another provider), content "" rather than null (H.14)."""
    texts, calls = [], []
    for i, block in enumerate(blocks):
        kind = block.get("type")
        if kind == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif kind == "tool_use":
            name = block.get("name")
            if not isinstance(name, str) or not name:
                raise ClientError(f"{where}[{i}]: a tool_use needs a \"name\"; add the tool's name")
            arguments = block.get("input") if isinstance(block.get("input"), dict) else {}
            calls.append({"id": safe_tool_id(block.get("id"), f"toolu_{i}"), "type": "function",
                          "function": {"name": name, "arguments": _sse_json(arguments)}})
    if not texts and not calls:
        return []
    message: Dict[str, Any] = {"role": "assistant", "content": "".join(texts)}
    if calls:
        message["tool_calls"] = calls
    return [message]


def _as_parts(content: Any) -> List[Dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    return content


def _merge_openai_messages(messages: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Adjacent user (or assistant) messages merged: chat templates of some servers
    (vLLM, Ollama) require user and assistant to alternate."""
    merged: List[Dict[str, Any]] = []
    for message in messages:
        last = merged[-1] if merged else None
        if last is None or last["role"] != message["role"] or message["role"] not in (
                "user", "assistant"):
            merged.append(message)
            continue
        a, b = last["content"], message["content"]
        if isinstance(a, str) and isinstance(b, str):
            last["content"] = "\n".join(t for t in (a, b) if t)
        else:
            last["content"] = _as_parts(a) + _as_parts(b)
        if message.get("tool_calls"):
            last["tool_calls"] = last.get("tool_calls", []) + message["tool_calls"]
    return merged


def _openai_tools(tools: Any) -> List[Dict[str, Any]]:
    """Client tools as functions; server tools (typed, no input_schema) skipped (C.1);
    cache_control, strict, defer_loading and the like dropped (H.3)."""
    out = []
    for tool in tools if isinstance(tools, list) else []:
        if not isinstance(tool, dict) or not isinstance(tool.get("input_schema"), dict):
            continue
        schema = dict(tool["input_schema"])
        if schema.get("type") == "object" and "properties" not in schema:
            schema["properties"] = {}
        function = {"name": tool.get("name", "")}
        if isinstance(tool.get("description"), str):
            function["description"] = tool["description"]
        function["parameters"] = schema
        out.append({"type": "function", "function": function})
    return out


def _openai_tool_choice(choice: Any) -> Tuple[Any, Optional[bool]]:
    """(tool_choice, parallel_tool_calls) for an Anthropic tool_choice (C.1 table)."""
    if not isinstance(choice, dict):
        return None, None
    kind = choice.get("type")
    mapped = {"auto": "auto", "any": "required", "none": "none"}.get(kind)
    if kind == "tool":
        mapped = {"type": "function", "function": {"name": choice.get("name", "")}}
    parallel = False if choice.get("disable_parallel_tool_use") is True else None
    return mapped, parallel


def _reasoning_effort(thinking: Any, output_config: Any) -> Optional[str]:
    """C.1: budget_tokens <= 1024 low, <= 8192 medium, else high; adaptive thinking
    carries its effort in output_config."""
    if not isinstance(thinking, dict):
        return None
    if thinking.get("type") == "enabled":
        budget = _count(thinking.get("budget_tokens"))
        return "low" if budget <= 1024 else "medium" if budget <= 8192 else "high"
    if thinking.get("type") == "adaptive":
        effort = output_config.get("effort") if isinstance(output_config, dict) else None
        return effort if effort in ("low", "medium", "high") else "medium"
    return None


def anthropic_to_openai_request(body: Dict[str, Any]) -> Dict[str, Any]:
    """An Anthropic Messages request as a Chat Completions request (PROTOCOLS.md C.1).
    Dropped: cache_control, metadata, top_k, thinking blocks, server tools, beta fields."""
    messages: List[Dict[str, Any]] = []
    system = _openai_system_text(body.get("system"))
    if system:
        messages.append({"role": "system", "content": system})
    given = body.get("messages")
    if not isinstance(given, list):
        raise ClientError(f'"messages" must be a list, got {_short(given)}')
    for i, message in enumerate(given):
        where = f"messages[{i}].content"
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ("user", "assistant"):
            raise ClientError(f"messages[{i}].role is {_short(role)}; use \"user\" or \"assistant\" "
                              "(the system prompt goes in the top-level \"system\")")
        blocks = _blocks(message.get("content"), where)
        messages += (_openai_user_messages(blocks, where) if role == "user"
                     else _openai_assistant_message(blocks, where))
    out: Dict[str, Any] = {"model": body.get("model"), "messages": _merge_openai_messages(messages)}
    for key in ("max_tokens", "temperature", "top_p"):
        if key in body:
            out[key] = body[key]
    stops = body.get("stop_sequences")
    if isinstance(stops, list) and stops:
        out["stop"] = stops
    if "stream" in body:
        out["stream"] = body["stream"]
        if body["stream"] is True:
            out["stream_options"] = {"include_usage": True}
    tools = _openai_tools(body.get("tools"))
    if tools:
        out["tools"] = tools
        choice, parallel = _openai_tool_choice(body.get("tool_choice"))
        if choice is not None:
            out["tool_choice"] = choice
        if parallel is not None:
            out["parallel_tool_calls"] = parallel
    effort = _reasoning_effort(body.get("thinking"), body.get("output_config"))
    if effort:
        out["reasoning_effort"] = effort
    return out


# -- OpenAI-compatible upstream -> Anthropic client: response (C.2, C.4, C.5) -------

def _anthropic_message_id(upstream_id: Any, fallback: Any) -> str:
    """msg_<...> from the upstream's id (some clients expect the prefix), deterministic."""
    if isinstance(upstream_id, str) and upstream_id:
        safe = safe_tool_id(upstream_id, "x")
        return safe if safe.startswith("msg_") else f"msg_{safe}"
    return "msg_" + short_hash(_sse_json(fallback))


def _stop_reason(finish_reason: Any, tool_used: bool) -> str:
    """C.4, with rule 7: tool_use whenever a tool_use block was sent, never without one."""
    if tool_used:
        return "tool_use"
    reason = STOP_REASON_FROM_FINISH.get(finish_reason, "end_turn")
    return "end_turn" if reason == "tool_use" else reason


def _text_of(content: Any) -> str:
    """OpenAI message content as text: a string, or the text of its parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content
                       if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def openai_to_anthropic_response(body: Dict[str, Any], model: str) -> Dict[str, Any]:
    """A Chat Completions answer as an Anthropic Message (C.2): blocks in the order
    thinking, text, tool_use; the thinking block's signature is "" (no real one exists)."""
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        message, _ = upstream_message(dumps(body))
        raise UpstreamError(f"answered without choices: {message}")
    choice = choices[0]
    message = choice.get("message") if isinstance(choice.get("message"), dict) else {}
    content: List[Dict[str, Any]] = []
    reasoning = message.get("reasoning_content") or message.get("reasoning")
    if isinstance(reasoning, str) and reasoning:
        content.append({"type": "thinking", "thinking": reasoning, "signature": ""})
    text = _text_of(message.get("content")) or _text_of(message.get("refusal"))
    if text:
        content.append({"type": "text", "text": text})
    calls = message.get("tool_calls") if isinstance(message.get("tool_calls"), list) else []
    if isinstance(message.get("function_call"), dict):     # legacy single-function answer
        calls = calls + [{"function": message["function_call"]}]
    for i, call in enumerate(c for c in calls if isinstance(c, dict)):
        function = call.get("function") if isinstance(call.get("function"), dict) else {}
        content.append({"type": "tool_use",
                        "id": safe_tool_id(call.get("id"), f"toolu_{i}"),
                        "name": function.get("name") or "",
                        "input": _tool_input(function.get("arguments"))})
    tool_used = any(b["type"] == "tool_use" for b in content)
    usage = body.get("usage") if _is_openai_usage(body.get("usage")) else {}
    return {"id": _anthropic_message_id(body.get("id"), body), "type": "message",
            "role": "assistant", "model": model, "content": content,
            "stop_reason": _stop_reason(choice.get("finish_reason"), tool_used),
            "stop_sequence": None, "usage": anthropic_usage_from_openai(usage)}


# -- OpenAI-compatible upstream -> Anthropic client: stream (C.3) -----------------

class _JsonDepth:
    """Tells, a fragment at a time and in constant memory, when streamed JSON text has
    closed its outermost brace: the sign that a tool call's arguments are complete."""

    def __init__(self) -> None:
        self.depth, self.in_string, self.escaped, self.seen = 0, False, False, False

    def feed(self, text: str) -> None:
        for ch in text:
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif ch == "\\":
                    self.escaped = True
                elif ch == '"':
                    self.in_string = False
            elif ch == '"':
                self.in_string = self.seen = True
            elif ch in "{[":
                self.depth += 1
                self.seen = True
            elif ch in "}]":
                self.depth -= 1
            elif not ch.isspace():
                self.seen = True

    @property
    def complete(self) -> bool:
        return self.seen and self.depth <= 0 and not self.in_string


class _ToolCall:
    """One OpenAI tool call on its way to an Anthropic tool_use block. `pending` until it
    can start (name known, id known or arguments begun, no unfinished call open);
    buffered arguments are bounded by that one call."""

    def __init__(self) -> None:
        self.id, self.name, self.state = "", "", "pending"    # pending -> open -> closed
        self.index = -1
        self.buffered: List[str] = []
        self.depth = _JsonDepth()

    @property
    def startable(self) -> bool:
        return bool(self.name and (self.id or self.buffered))


class OpenAIToAnthropicStream:
    """Chat Completions chunks in, Anthropic Messages events out (C.3).

    Blocks never interleave: text and thinking open and close as the delta fields
    change; a tool call streams its arguments live while it is the open block, and a
    call that begins while another is still unfinished (true parallel interleaving) is
    buffered and sent whole once the open one completes, or at finish_reason.
    message_delta and message_stop wait for the usage chunk, [DONE] or the end; a stream
    that ends without finish_reason ends with an error event, never a fake end_turn."""

    def __init__(self, model: str, input_estimate: int = 0):
        self.model, self.input_estimate = model, input_estimate
        self.started = self.ended = self.tool_used = False
        self.next_index = 0
        self.open_kind = ""                       # "text", "thinking", "tool_use" or ""
        self.open_call: Optional[_ToolCall] = None
        self.calls: Dict[Any, _ToolCall] = {}     # OpenAI tool index -> its current call
        self.order: List[_ToolCall] = []          # every call, in order of first sight
        self.message_id = ""
        self.finish_reason: Optional[str] = None
        self.usage: Optional[Dict[str, Any]] = None

    # -- input ----------------------------------------------------------------
    def feed(self, event: str, data: str) -> List[Tuple[str, str]]:
        data = data.strip()
        if self.ended or not data:
            return []
        if data == "[DONE]":
            return self._finish(self.finish_reason or "stop")
        try:
            chunk = json.loads(data)
        except ValueError:
            return []                             # not a chunk (a stray keep-alive line)
        if not isinstance(chunk, dict):
            return []
        if chunk.get("error") is not None:
            message, code = upstream_message(dumps(chunk))
            return self._fail(f"{code}: {message}" if code and not code.isdigit()
                              and code not in message else message)
        out: List[Tuple[str, str]] = []
        choices = chunk.get("choices")
        if isinstance(choices, list) and choices and isinstance(choices[0], dict):
            if not self.started:
                out += self._start(chunk)
            out += self._choice(choices[0])
        if _is_openai_usage(chunk.get("usage")):
            self.usage = chunk["usage"]
            if self.finish_reason is not None and not choices:
                out += self._finish(self.finish_reason)
        return out

    def close(self) -> List[Tuple[str, str]]:
        if self.ended:
            return []
        if self.finish_reason is not None:    # finished; only [DONE] (and maybe usage) missing
            return self._finish(self.finish_reason)
        return self._fail("upstream stream ended early, before a finish_reason")

    def _choice(self, choice: Dict[str, Any]) -> List[Tuple[str, str]]:
        if self.finish_reason is not None:
            return []
        delta = choice.get("delta") if isinstance(choice.get("delta"), dict) else {}
        out: List[Tuple[str, str]] = []
        reasoning = delta.get("reasoning_content") or delta.get("reasoning")
        if isinstance(reasoning, str) and reasoning:
            out += self._text("thinking", reasoning)
        text = delta.get("content") or delta.get("refusal")
        if isinstance(text, str) and text:
            out += self._text("text", text)
        items = delta.get("tool_calls")
        for position, item in enumerate(items if isinstance(items, list) else []):
            if isinstance(item, dict):
                out += self._tool_fragment(item, position)
        reason = choice.get("finish_reason")
        if reason == "error":
            return out + self._fail("upstream finished with finish_reason \"error\"")
        if reason:
            out += self._close_open()
            for call in self.order:
                if call.state == "pending":
                    out += self._start_call(call, whole=True)
            self.finish_reason = reason
        return out

    # -- blocks ---------------------------------------------------------------
    def _start(self, chunk: Dict[str, Any]) -> List[Tuple[str, str]]:
        self.started = True
        self.message_id = _anthropic_message_id(chunk.get("id"), chunk)
        message = {"id": self.message_id, "type": "message", "role": "assistant", "content": [],
                   "model": self.model, "stop_reason": None, "stop_sequence": None,
                   "usage": {"input_tokens": self.input_estimate, "output_tokens": 0}}
        return [self._event({"type": "message_start", "message": message})]

    @staticmethod
    def _event(obj: Dict[str, Any]) -> Tuple[str, str]:
        return obj["type"], _sse_json(obj)

    def _open(self, kind: str, block: Dict[str, Any]) -> List[Tuple[str, str]]:
        out = self._close_open()
        self.open_kind, index = kind, self.next_index
        self.next_index += 1
        out.append(self._event({"type": "content_block_start", "index": index,
                                "content_block": block}))
        return out

    def _delta(self, delta: Dict[str, Any]) -> Tuple[str, str]:
        return self._event({"type": "content_block_delta", "index": self.next_index - 1,
                            "delta": delta})

    def _close_open(self) -> List[Tuple[str, str]]:
        if not self.open_kind:
            return []
        if self.open_call is not None:
            self.open_call.state, self.open_call = "closed", None
        self.open_kind = ""
        return [self._event({"type": "content_block_stop", "index": self.next_index - 1})]

    def _text(self, kind: str, text: str) -> List[Tuple[str, str]]:
        out: List[Tuple[str, str]] = []
        if self.open_kind != kind:
            block = ({"type": "text", "text": ""} if kind == "text"
                     else {"type": "thinking", "thinking": "", "signature": ""})
            out += self._open(kind, block)
        # The hot path of every translated stream: the event is formatted directly, which
        # is the same JSON _delta() would make at a third of the cost.
        out.append(("content_block_delta", '{"type":"content_block_delta","index":%d,"delta":'
                    '{"type":"%s_delta","%s":%s}}' % (self.next_index - 1, kind, kind,
                                                       _JSON.encode(text))))
        return out

    # -- tool calls (B.4, H.13) -----------------------------------------------
    def _tool_fragment(self, item: Dict[str, Any], position: int) -> List[Tuple[str, str]]:
        index = item.get("index") if isinstance(item.get("index"), int) else position
        function = item.get("function") if isinstance(item.get("function"), dict) else {}
        new_id = item.get("id") if isinstance(item.get("id"), str) else ""
        call = self.calls.get(index)
        if call is None or (new_id and call.id and new_id != call.id):   # index reused for a new call
            call = self.calls[index] = _ToolCall()
            self.order.append(call)
        call.id = call.id or new_id
        name = function.get("name")
        call.name = call.name or (name if isinstance(name, str) else "")   # a repeat is ignored
        arguments = function.get("arguments")
        if isinstance(arguments, (dict, list)):
            arguments = _sse_json(arguments)
        arguments = arguments if isinstance(arguments, str) else ""
        if call.state == "closed":
            return []          # a fragment after its block closed: nothing valid can follow
        if call.state == "open":
            if not arguments:
                return []
            call.depth.feed(arguments)
            out = [self._delta({"type": "input_json_delta", "partial_json": arguments})]
            return out + self._start_next() if call.depth.complete else out
        if arguments:
            call.buffered.append(arguments)
        return self._start_call(call) if call.startable else []

    def _start_next(self) -> List[Tuple[str, str]]:
        """The open call just completed: a buffered parallel call may start now."""
        for call in self.order:
            if call.state == "pending" and call.startable:
                return self._start_call(call)
        return []

    def _start_call(self, call: _ToolCall, whole: bool = False) -> List[Tuple[str, str]]:
        """Open call's block and send what it buffered; `whole` sends and closes it
        (at finish_reason, when no more fragments can come)."""
        if not whole and self.open_call is not None and not self.open_call.depth.complete:
            return []          # another call is mid-arguments: wait, blocks must not interleave
        position = self.order.index(call)
        call.id = call.id or f"toolu_{self.message_id[4:]}_{position}"
        block = {"type": "tool_use", "id": safe_tool_id(call.id, f"toolu_{position}"),
                 "name": call.name or f"tool_{position}", "input": {}}
        out = self._open("tool_use", block)
        call.state, self.open_call, self.tool_used = "open", call, True
        arguments, call.buffered = "".join(call.buffered), []
        if arguments:
            call.depth.feed(arguments)
            out.append(self._delta({"type": "input_json_delta", "partial_json": arguments}))
        if whole:
            out += self._close_open()
        return out

    # -- the end --------------------------------------------------------------
    def _finish(self, reason: str) -> List[Tuple[str, str]]:
        out: List[Tuple[str, str]] = []
        if not self.started:
            out += self._start({})
        if self.finish_reason is None:
            out += self._choice({"finish_reason": reason})
        usage = anthropic_usage_from_openai(self.usage) if self.usage else {"output_tokens": 0}
        delta = {"stop_reason": _stop_reason(reason, self.tool_used), "stop_sequence": None}
        out.append(self._event({"type": "message_delta", "delta": delta, "usage": usage}))
        out.append(self._event({"type": "message_stop"}))
        self.ended = True
        return out

    def _fail(self, message: str) -> List[Tuple[str, str]]:
        out = self._close_open()
        out.append(("error", _sse_json(error_object("anthropic", 500, message))))
        self.ended = True
        return out


# -- OpenAI client -> Anthropic-format upstream: request (D.1) --------------------

def _anthropic_part(part: Any, where: str) -> Optional[Dict[str, Any]]:
    """One OpenAI content part as an Anthropic block; None for empty text."""
    if isinstance(part, str):
        part = {"type": "text", "text": part}
    kind = part.get("type") if isinstance(part, dict) else None
    if kind in ("text", "refusal", "input_text"):
        text = part.get("text", part.get("refusal"))
        return {"type": "text", "text": text} if isinstance(text, str) and text else None
    if kind == "image_url":
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, dict) else image
        return {"type": "image", "source": _anthropic_source(url, f"{where}.image_url.url")}
    if kind == "file":
        file = part.get("file") if isinstance(part.get("file"), dict) else {}
        if isinstance(file.get("file_data"), str):
            return {"type": "document", "source": _anthropic_source(
                file["file_data"], f"{where}.file.file_data", urls=False)}
        raise ClientError(f"{where}: a file part needs file_data (a data: URL); file ids of "
                          "OpenAI's Files API cannot reach an Anthropic upstream")
    raise ClientError(f"{where}: content part type {_short(kind)} cannot be translated to "
                      "Anthropic; send text, image_url or file parts")


def _anthropic_source(url: Any, where: str, urls: bool = True) -> Dict[str, Any]:
    """An image_url/file_data URL as an Anthropic source: data: URLs split at the first
    comma into media type and base64 data, http(s) URLs kept as url sources (D.1)."""
    text = url if isinstance(url, str) else ""
    match = _DATA_URL.match(text)
    if match:
        return {"type": "base64", "media_type": match.group(1) or "application/octet-stream",
                "data": match.group(3)}
    if urls and text.startswith(("http://", "https://")):
        return {"type": "url", "url": text}
    raise ClientError(f"{where} is {_short(text[:60])}; send a base64 data: URL"
                      + (" or an http(s) URL" if urls else ""))


def _anthropic_blocks(content: Any, where: str) -> List[Dict[str, Any]]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if not isinstance(content, list):
        raise ClientError(f"{where} must be a string or a list of parts, got {_short(content)}")
    blocks = (_anthropic_part(p, f"{where}[{i}]") for i, p in enumerate(content))
    return [b for b in blocks if b is not None]


def _anthropic_tool_use(call: Any, where: str, fallback: str) -> Dict[str, Any]:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise ClientError(f"{where} needs function.name; send tool calls as "
                          '{"id", "type": "function", "function": {"name", "arguments"}}')
    return {"type": "tool_use", "id": safe_tool_id(call.get("id"), fallback),
            "name": function["name"], "input": _tool_input(function.get("arguments"))}


def _anthropic_turn(message: Dict[str, Any], i: int) -> Tuple[str, List[Dict[str, Any]]]:
    """(role, blocks) of one non-system OpenAI message; reasoning_content and `name`
    dropped (no signature exists to replay it with)."""
    role, where = message.get("role"), f"messages[{i}]"
    if role == "user":
        return "user", _anthropic_blocks(message.get("content"), f"{where}.content")
    if role == "assistant":
        blocks = _anthropic_blocks(message.get("content"), f"{where}.content")
        calls = message.get("tool_calls") if isinstance(message.get("tool_calls"), list) else []
        blocks += [_anthropic_tool_use(c, f"{where}.tool_calls[{j}]", f"toolu_{i}_{j}")
                   for j, c in enumerate(calls)]
        return "assistant", blocks
    if role == "tool":
        result: Dict[str, Any] = {"type": "tool_result",
                                  "tool_use_id": safe_tool_id(message.get("tool_call_id"),
                                                              "toolu_missing")}
        inner = _anthropic_blocks(message.get("content"), f"{where}.content")
        if inner:
            text_only = all(b["type"] == "text" for b in inner)
            result["content"] = "".join(b["text"] for b in inner) if text_only else inner
        return "user", [result]
    raise ClientError(f"{where}.role is {_short(role)}; use system, developer, user, assistant, "
                      "tool or function")


def _anthropic_messages(turns: List[Tuple[str, List[Dict[str, Any]]]]) -> List[Dict[str, Any]]:
    """D.1: empty turns dropped, same-role turns merged with tool_results first in each
    user turn, and a placeholder user turn first when the talk starts otherwise."""
    merged: List[Dict[str, Any]] = []
    for role, blocks in turns:
        if not blocks:
            continue
        if merged and merged[-1]["role"] == role:
            merged[-1]["content"] += blocks
        else:
            merged.append({"role": role, "content": list(blocks)})
    for message in merged:
        if message["role"] == "user":
            content = message["content"]
            message["content"] = ([b for b in content if b["type"] == "tool_result"]
                                  + [b for b in content if b["type"] != "tool_result"])
    if not merged or merged[0]["role"] != "user":
        merged.insert(0, {"role": "user",
                          "content": [{"type": "text", "text": ANTHROPIC_PLACEHOLDER_TEXT}]})
    return merged


def _anthropic_tools(tools: Any) -> List[Dict[str, Any]]:
    out = []
    for i, tool in enumerate(tools if isinstance(tools, list) else []):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not (
                isinstance(function, dict) and isinstance(function.get("name"), str)):
            raise ClientError(f"tools[{i}] is not a function tool with a name; Anthropic "
                              "upstreams take only {\"type\": \"function\", \"function\": {...}}")
        schema = function.get("parameters")
        schema = dict(schema) if isinstance(schema, dict) else {"type": "object", "properties": {}}
        schema.setdefault("type", "object")
        tool_out = {"name": function["name"]}
        if isinstance(function.get("description"), str):
            tool_out["description"] = function["description"]
        tool_out["input_schema"] = schema
        out.append(tool_out)
    return out


def _anthropic_tool_choice(choice: Any, parallel: Any) -> Optional[Dict[str, Any]]:
    """D.1 tool_choice table; parallel_tool_calls false needs a choice object to ride on."""
    if isinstance(choice, dict):
        function = choice.get("function") if isinstance(choice.get("function"), dict) else {}
        out: Optional[Dict[str, Any]] = {"type": "tool", "name": function.get("name", "")}
    else:
        out = {"type": {"auto": "auto", "required": "any", "none": "none"}.get(choice, "auto")}
        if choice is None and parallel is not False:
            out = None
    if out is not None and parallel is False and out["type"] != "none":
        out["disable_parallel_tool_use"] = True
    return out


def _response_format_instruction(fmt: Any) -> str:
    """No Anthropic field asks for JSON output: say it in the system prompt (D.1)."""
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "json_object":
        return JSON_OBJECT_INSTRUCTION
    if kind == "json_schema":
        schema = fmt.get("json_schema") if isinstance(fmt.get("json_schema"), dict) else {}
        return (f"{JSON_OBJECT_INSTRUCTION} It must match this JSON Schema: "
                f"{_sse_json(schema.get('schema', {}))}")
    return ""


def modern_openai_request(body: Dict[str, Any]) -> Dict[str, Any]:
    """OpenAI's legacy function calling (`functions`, `function_call`, assistant
    `function_call`, role "function" messages) in its `tools` form, so one translator
    serves both. Legacy calls have no ids: call_<n> is given in order, and each function
    result takes the id of the earliest unanswered call of that name. Pure."""
    messages = body.get("messages")
    legacy = isinstance(messages, list) and any(
        isinstance(m, dict) and (m.get("role") == "function" or "function_call" in m)
        for m in messages)
    if not legacy and "functions" not in body and "function_call" not in body:
        return body
    out = dict(body)
    functions, choice = out.pop("functions", None), out.pop("function_call", None)
    if isinstance(functions, list) and "tools" not in out:
        out["tools"] = [{"type": "function", "function": f} for f in functions]
    if choice is not None and "tool_choice" not in out:
        named = isinstance(choice, dict) and isinstance(choice.get("name"), str)
        out["tool_choice"] = ({"type": "function", "function": {"name": choice["name"]}}
                              if named else choice)
    if legacy:
        out["messages"], open_calls = [], []
        for message in messages:
            if isinstance(message, dict) and isinstance(message.get("function_call"), dict):
                call_id = f"call_{len(out['messages'])}"
                open_calls.append((message["function_call"].get("name"), call_id))
                message = dict(message, tool_calls=list(message.get("tool_calls") or []) + [
                    {"id": call_id, "type": "function", "function": message["function_call"]}])
                del message["function_call"]
            elif isinstance(message, dict) and message.get("role") == "function":
                match = next((c for c in open_calls if c[0] == message.get("name")), None)
                if match:
                    open_calls.remove(match)
                message = {"role": "tool", "content": message.get("content") or "",
                           "tool_call_id": match[1] if match else f"call_{len(out['messages'])}"}
            out["messages"].append(message)
    return out


def openai_to_anthropic_request(body: Dict[str, Any]) -> Dict[str, Any]:
    """A Chat Completions request as an Anthropic Messages request (PROTOCOLS.md D.1).
    Dropped: stream_options, seed, logit_bias, logprobs, penalties, reasoning_content."""
    body = modern_openai_request(body)
    if _count(body.get("n")) > 1:
        raise ClientError(f"\"n\" is {body['n']}: Anthropic upstreams return one choice; "
                          "send n=1 or leave it out")
    given = body.get("messages")
    if not isinstance(given, list):
        raise ClientError(f'"messages" must be a list, got {_short(given)}')
    system: List[Dict[str, Any]] = []
    turns = []
    for i, message in enumerate(given):
        if not isinstance(message, dict):
            raise ClientError(f"messages[{i}] must be an object, got {_short(message)}")
        if message.get("role") in ("system", "developer"):
            system += _anthropic_blocks(message.get("content"), f"messages[{i}].content")
        else:
            turns.append(_anthropic_turn(message, i))
    instruction = _response_format_instruction(body.get("response_format"))
    if instruction:
        system.append({"type": "text", "text": instruction})
    out: Dict[str, Any] = {"model": body.get("model"), "messages": _anthropic_messages(turns)}
    if system:
        out["system"] = system
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    out["max_tokens"] = limit if _count(limit) else ANTHROPIC_DEFAULT_MAX_TOKENS
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else []
    if stops:
        out["stop_sequences"] = stops
    if isinstance(body.get("stream"), bool):
        out["stream"] = body["stream"]
    if isinstance(body.get("user"), str) and body["user"]:
        out["metadata"] = {"user_id": body["user"]}
    tools = _anthropic_tools(body.get("tools"))
    choice = _anthropic_tool_choice(body.get("tool_choice"), body.get("parallel_tool_calls"))
    if tools:
        out["tools"] = tools
        if choice is not None:
            out["tool_choice"] = choice
    _sampling_and_thinking(body, out)
    return out


def _sampling_and_thinking(body: Dict[str, Any], out: Dict[str, Any]) -> None:
    """reasoning_effort -> thinking with max_tokens raised above the budget (D.1); with
    thinking on, Anthropic takes no temperature, top_p or top_k, and no forced tool."""
    budget = THINKING_BUDGETS.get(body.get("reasoning_effort"))
    forced = out.get("tool_choice", {}).get("type") in ("any", "tool")
    if budget and not forced:
        out["thinking"] = {"type": "enabled", "budget_tokens": budget}
        if out["max_tokens"] <= budget:      # the client's cap becomes room after thinking
            out["max_tokens"] += budget
        return
    if isinstance(body.get("temperature"), (int, float)):
        out["temperature"] = min(body["temperature"], 1)    # OpenAI's range is 0-2
    elif isinstance(body.get("top_p"), (int, float)):       # newer Claude reject both at once
        out["top_p"] = body["top_p"]
    if isinstance(body.get("top_k"), int):                  # vLLM/OpenRouter-style extension
        out["top_k"] = body["top_k"]


# -- Anthropic-format upstream -> OpenAI client: response (D.2, D.4, D.5) ----------

def anthropic_to_openai_response(body: Dict[str, Any], model: str) -> Dict[str, Any]:
    """An Anthropic Message as a chat.completion (D.2): text blocks joined into content
    (null when only tool calls), thinking as the non-standard reasoning_content."""
    if body.get("type") == "error" or not isinstance(body.get("content"), list):
        message, _ = upstream_message(dumps(body))
        raise UpstreamError(f"answered without content: {message}")
    blocks = [b for b in body["content"] if isinstance(b, dict)]
    text = "".join(b.get("text", "") for b in blocks if b.get("type") == "text")
    thinking = "".join(b.get("thinking", "") for b in blocks if b.get("type") == "thinking")
    calls = [{"id": b.get("id", ""), "type": "function",
              "function": {"name": b.get("name", ""), "arguments": _sse_json(b.get("input", {}))}}
             for b in blocks if b.get("type") == "tool_use"]
    message: Dict[str, Any] = {"role": "assistant", "content": None if calls and not text else text}
    if thinking:
        message["reasoning_content"] = thinking
    if calls:
        message["tool_calls"] = calls
    usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
    return {"id": body.get("id") or "chatcmpl-" + short_hash(_sse_json(body)),
            "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": FINISH_FROM_STOP_REASON.get(body.get("stop_reason"),
                                                                     "stop")}],
            "usage": openai_usage_from_anthropic(usage)}


# -- Anthropic-format upstream -> OpenAI client: stream (D.3) ---------------------

_ANTHROPIC_STATUS = {kind: status for status, kind in ANTHROPIC_ERROR_TYPES.items()}


class AnthropicToOpenAIStream:
    """Anthropic Messages events in, chat.completion.chunk data out (D.3): role chunk,
    content / reasoning_content / tool_calls deltas (tool indexes count tool calls from
    0, not blocks), finish chunk, a usage chunk with `choices: []`, then [DONE]. A stream
    that ends before message_stop ends with an error chunk."""

    HANDLED = ("message_start", "content_block_start", "content_block_delta",
               "message_delta", "message_stop")

    def __init__(self, model: str, input_estimate: int = 0):
        self.model, self.created = model, int(time.time())
        self.id = ""
        self.started = self.finished = self.ended = False
        self.tool_index: Dict[Any, int] = {}      # Anthropic block index -> OpenAI tool index
        self.whole: set = set()                   # blocks whose input came in their start
        self.usage: Dict[str, Any] = {}
        self._content_prefix: Optional[str] = None

    def feed(self, event: str, data: str) -> List[Tuple[str, str]]:
        if self.ended:
            return []
        try:
            obj = json.loads(data)
        except ValueError:
            return []
        if not isinstance(obj, dict):
            return []
        kind = obj.get("type") or event
        if kind == "error":
            err = obj.get("error") if isinstance(obj.get("error"), dict) else {}
            return self._fail(str(err.get("message") or "upstream error"),
                              str(err.get("type") or "api_error"))
        handler = getattr(self, "_on_" + kind, None) if kind in self.HANDLED else None
        if handler is None:
            return []                              # ping and anything newer
        out = [] if self.started or kind == "message_start" else self._role_chunk()
        return out + handler(obj)

    def close(self) -> List[Tuple[str, str]]:
        if self.ended:
            return []
        return self._fail("upstream stream ended early, before message_stop", "api_error")

    # -- events ---------------------------------------------------------------
    def _on_message_start(self, obj: Dict[str, Any]) -> List[Tuple[str, str]]:
        message = obj.get("message") if isinstance(obj.get("message"), dict) else {}
        self.id = message.get("id") if isinstance(message.get("id"), str) else ""
        self._content_prefix = None
        self._merge_usage(message.get("usage"))
        return self._role_chunk()

    def _on_content_block_start(self, obj: Dict[str, Any]) -> List[Tuple[str, str]]:
        block = obj.get("content_block") if isinstance(obj.get("content_block"), dict) else {}
        if block.get("type") != "tool_use":
            return []
        k = self.tool_index[obj.get("index")] = len(self.tool_index)
        function = {"name": block.get("name", ""), "arguments": ""}
        if isinstance(block.get("input"), dict) and block["input"]:
            function["arguments"] = _sse_json(block["input"])   # complete already: no deltas
            self.whole.add(obj.get("index"))
        return [self._chunk({"tool_calls": [{"index": k, "id": block.get("id", ""),
                                             "type": "function", "function": function}]})]

    def _on_content_block_delta(self, obj: Dict[str, Any]) -> List[Tuple[str, str]]:
        delta = obj.get("delta") if isinstance(obj.get("delta"), dict) else {}
        kind, index = delta.get("type"), obj.get("index")
        if kind == "text_delta" and isinstance(delta.get("text"), str) and delta["text"]:
            return [("", self._content_chunk(delta["text"]))]
        if kind == "thinking_delta" and delta.get("thinking"):
            return [self._chunk({"reasoning_content": delta["thinking"]})]
        if (kind == "input_json_delta" and delta.get("partial_json")
                and index in self.tool_index and index not in self.whole):
            return [self._chunk({"tool_calls": [{"index": self.tool_index[index], "function": {
                "arguments": delta["partial_json"]}}]})]
        return []                                  # signature_delta, citations_delta, empty

    def _on_message_delta(self, obj: Dict[str, Any]) -> List[Tuple[str, str]]:
        self._merge_usage(obj.get("usage"))
        delta = obj.get("delta") if isinstance(obj.get("delta"), dict) else {}
        if self.finished or not delta.get("stop_reason"):
            return []
        self.finished = True
        return [self._chunk({}, FINISH_FROM_STOP_REASON.get(delta["stop_reason"], "stop"))]

    def _on_message_stop(self, obj: Dict[str, Any]) -> List[Tuple[str, str]]:
        out = [] if self.finished else [self._chunk({}, "stop")]
        usage = dict(self._base(), choices=[], usage=openai_usage_from_anthropic(self.usage))
        self.ended = True
        return out + [("", _sse_json(usage)), ("", "[DONE]")]

    # -- chunks ---------------------------------------------------------------
    def _merge_usage(self, usage: Any) -> None:
        """Each usage field's last non-null value wins (D.5)."""
        if isinstance(usage, dict):
            self.usage.update((k, v) for k, v in usage.items() if v is not None)

    def _role_chunk(self) -> List[Tuple[str, str]]:
        self.started = True
        return [self._chunk({"role": "assistant", "content": ""})]

    def _base(self) -> Dict[str, Any]:
        return {"id": self.id or "chatcmpl-proxypal", "object": "chat.completion.chunk",
                "created": self.created, "model": self.model}

    def _chunk(self, delta: Dict[str, Any], finish: Optional[str] = None) -> Tuple[str, str]:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        return "", _sse_json(dict(self._base(), choices=[choice]))

    def _content_chunk(self, text: str) -> str:
        """The hot path: a text chunk formatted directly, the same JSON _chunk() makes."""
        if self._content_prefix is None:
            base = _sse_json(self._base())
            self._content_prefix = base[:-1] + ',"choices":[{"index":0,"delta":{"content":'
        return self._content_prefix + _JSON.encode(text) + '},"finish_reason":null}]}'


    def _fail(self, message: str, err_type: str) -> List[Tuple[str, str]]:
        self.ended = True
        status = _ANTHROPIC_STATUS.get(err_type, 502)
        error = error_object("openai", status, message, err_type)
        return [("", _sse_json(error)), ("", "[DONE]")]


TRANSLATORS[("anthropic", "openai")] = Translator(
    anthropic_to_openai_request, openai_to_anthropic_response, OpenAIToAnthropicStream)
TRANSLATORS[("openai", "anthropic")] = Translator(
    openai_to_anthropic_request, anthropic_to_openai_response, AnthropicToOpenAIStream)


# -----------------------------------------------------------------------------
# 7g. Gemini translators (PROTOCOLS.md E.6, E.7)
# Strategy: OpenAI and Anthropic clients reach a Gemini upstream through one
# contents builder (_gemini_append, _url_part, _function_response), one schema
# cleaner (gemini_schema) and one Gemini-stream reader (_GeminiUpstreamStream)
# that each client format renders. Gemini clients reach OpenAI and Anthropic
# upstreams through one contents reader (_gemini_turns) and the reverse tables.
# Gemini has no tool-call ids: they are derived from the response (never from a
# clock or a counter kept between requests); nothing is remembered across calls.
# -----------------------------------------------------------------------------

# Keys a Gemini function `parameters` Schema accepts (E.7); any other is a 400.
GEMINI_SCHEMA_KEYS = frozenset({
    "type", "format", "title", "description", "nullable", "enum", "maxItems", "minItems",
    "properties", "required", "minProperties", "maxProperties", "minLength", "maxLength",
    "pattern", "example", "anyOf", "propertyOrdering", "default", "items", "minimum", "maximum"})
GEMINI_SCHEMA_FORMATS = frozenset({"enum", "date-time", "float", "double", "int32", "int64"})
GEMINI_FUNCTION_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.:-]{0,63}$")     # H.21
GEMINI_MAX_STOP_SEQUENCES = 5                                              # E.2
# Google's documented stand-in for a thoughtSignature the proxy cannot give back (E.6 (b)).
GEMINI_DUMMY_SIGNATURE = "skip_thought_signature_validator"
ANTHROPIC_BILLING_PREFIX = "x-anthropic-billing-header:"                  # H.8: not for Gemini
ANTHROPIC_MIN_THINKING_BUDGET = 1024                                       # A.2
# reasoning_effort -> thinkingBudget (E.6 suggestion; 24576 is Gemini 2.5 Flash's ceiling).
REASONING_BUDGETS = {"none": 0, "minimal": 512, "low": 1024, "medium": 8192, "high": 24576,
                     "xhigh": 24576}
# thinkingBudget -> reasoning_effort, first bound that holds (C.1's suggested cut points).
BUDGET_EFFORTS = ((1024, "low"), (8192, "medium"), (None, "high"))

# Client request field -> generationConfig field (E.6); the first present wins.
OPENAI_TO_GEMINI_GENERATION = (
    ("max_completion_tokens", "maxOutputTokens"), ("max_tokens", "maxOutputTokens"),
    ("temperature", "temperature"), ("top_p", "topP"), ("top_k", "topK"),
    ("presence_penalty", "presencePenalty"), ("frequency_penalty", "frequencyPenalty"),
    ("seed", "seed"))
ANTHROPIC_TO_GEMINI_GENERATION = (
    ("max_tokens", "maxOutputTokens"), ("temperature", "temperature"), ("top_p", "topP"),
    ("top_k", "topK"))
# The way back: max_tokens is what OpenAI-compatible servers know (C.1); top_k is left
# out because OpenAI itself rejects it (H.9).
GEMINI_TO_OPENAI_GENERATION = (
    ("maxOutputTokens", "max_tokens"), ("temperature", "temperature"), ("topP", "top_p"),
    ("presencePenalty", "presence_penalty"), ("frequencyPenalty", "frequency_penalty"),
    ("seed", "seed"))
GEMINI_TO_ANTHROPIC_GENERATION = tuple((g, a) for a, g in ANTHROPIC_TO_GEMINI_GENERATION)

OPENAI_TOOL_MODES = {"auto": "AUTO", "required": "ANY", "none": "NONE"}
ANTHROPIC_TOOL_MODES = {"auto": "AUTO", "any": "ANY", "tool": "ANY", "none": "NONE"}

GEMINI_SAFETY_FINISHES = ("SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII",
                          "IMAGE_SAFETY", "LANGUAGE")
# Gemini finishReason -> client value; a reply holding a functionCall overrides both (E.6).
GEMINI_FINISH_TO_ANTHROPIC = {"STOP": "end_turn", "MAX_TOKENS": "max_tokens",
                              **{r: "refusal" for r in GEMINI_SAFETY_FINISHES}}
GEMINI_FINISH_TO_OPENAI = {"STOP": "stop", "MAX_TOKENS": "length",
                           **{r: "content_filter" for r in GEMINI_SAFETY_FINISHES}}
OPENAI_FINISH_TO_GEMINI = {"stop": "STOP", "length": "MAX_TOKENS", "tool_calls": "STOP",
                           "function_call": "STOP", "content_filter": "SAFETY"}
ANTHROPIC_STOP_TO_GEMINI = {"end_turn": "STOP", "stop_sequence": "STOP", "tool_use": "STOP",
                            "pause_turn": "STOP", "max_tokens": "MAX_TOKENS",
                            "model_context_window_exceeded": "MAX_TOKENS", "refusal": "SAFETY"}
# Anthropic error type -> HTTP status for a Gemini client's error (E.5: 503 is "overloaded").
ANTHROPIC_ERROR_STATUS = {**{t: s for s, t in ANTHROPIC_ERROR_TYPES.items()},
                          "overloaded_error": 503}

STREAM_CUT_SHORT = "upstream stream ended before its finish: the answer is incomplete, retry"


def _json_text(obj: Any) -> str:
    return dumps(obj).decode("utf-8")


def _as_list(value: Any, where: str) -> List[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ClientError(f"{where} must be an array, not {_json_type(value)}: send a list")
    return value


def _tool_id(prefix: str, response_id: str, n: int, call: Dict[str, Any]) -> str:
    """A tool-call id for a Gemini functionCall: its own id when it has one (Vertex),
    else derived from the response id, the call's position, name and args, so the same
    answer always gets the same ids and two answers almost never share one."""
    if call.get("id"):
        return re.sub(r"[^A-Za-z0-9_-]", "_", str(call["id"]))
    seed = f"{response_id}|{n}|{call.get('name')}|{_json_text(call.get('args') or {})}"
    return prefix + short_hash(seed)


# -- E.7: JSON Schema -> Gemini Schema ------------------------------------------

def gemini_schema(schema: Any, defs: Optional[Dict[str, Any]] = None,
                  seen: Tuple[str, ...] = ()) -> Dict[str, Any]:
    """A JSON Schema cut down to the subset Gemini's `parameters` accepts (E.7): local
    $refs inlined (a cycle becomes a bare object), allOf merged, oneOf read as anyOf,
    null types folded into nullable, const/enum kept only as strings."""
    if not isinstance(schema, dict):
        return {}
    if defs is None:
        defs = {**(schema.get("definitions") or {}), **(schema.get("$defs") or {})}
    ref = schema.get("$ref")
    if isinstance(ref, str):
        name = ref.rsplit("/", 1)[-1]
        if name in seen or name not in defs:
            return {"type": "object"}
        return gemini_schema({**defs[name], **{k: v for k, v in schema.items() if k != "$ref"}},
                             defs, seen + (name,))
    for branch in schema.get("allOf") or []:
        schema = _merge_schema(schema, branch if isinstance(branch, dict) else {})
    out = {k: v for k, v in schema.items() if k in GEMINI_SCHEMA_KEYS
           and k not in ("type", "properties", "items", "anyOf", "enum", "format", "required")}
    _schema_type(schema, out)
    _schema_enum(schema, out)
    if schema.get("format") in GEMINI_SCHEMA_FORMATS:
        out["format"] = schema["format"]
    if isinstance(schema.get("properties"), dict) and schema["properties"]:
        out["properties"] = {name: gemini_schema(sub, defs, seen)       # names are data
                             for name, sub in schema["properties"].items()}
        required = [r for r in schema.get("required") or [] if r in out["properties"]]
        if required:
            out["required"] = required
    items = schema.get("items")
    if isinstance(items, list):                                   # tuple form: first item
        items = items[0] if items else None
    if isinstance(items, dict):
        out["items"] = gemini_schema(items, defs, seen)
    branches = schema.get("anyOf") or schema.get("oneOf")
    if isinstance(branches, list):
        _schema_any_of(branches, out, defs, seen)
    return out


def _merge_schema(parent: Dict[str, Any], branch: Dict[str, Any]) -> Dict[str, Any]:
    merged = {k: v for k, v in parent.items() if k != "allOf"}
    for key, value in branch.items():
        if key == "properties" and isinstance(value, dict):
            merged["properties"] = {**(merged.get("properties") or {}), **value}
        elif key == "required" and isinstance(value, list):
            merged["required"] = list(merged.get("required") or []) + value
        else:
            merged.setdefault(key, value)
    return merged


def _schema_type(schema: Dict[str, Any], out: Dict[str, Any]) -> None:
    kind = schema.get("type")
    if isinstance(kind, list):
        types = [t for t in kind if t != "null"]
        if len(types) < len(kind):
            out["nullable"] = True
        if len(types) == 1:
            out["type"] = types[0]
        elif types:
            out["anyOf"] = [{"type": t} for t in types]
    elif isinstance(kind, str) and kind != "null":
        out["type"] = kind
    elif kind == "null":
        out["nullable"] = True


def _schema_enum(schema: Dict[str, Any], out: Dict[str, Any]) -> None:
    """Gemini enums are strings: keep const/enum only when every value is one (E.7
    allows dropping; stringifying would make the model answer "1" for 1)."""
    values = [schema["const"]] if "const" in schema else schema.get("enum")
    if isinstance(values, list) and values and all(isinstance(v, str) for v in values):
        out["enum"] = values
        out.setdefault("type", "string")


def _schema_any_of(branches: List[Any], out: Dict[str, Any], defs: Dict[str, Any],
                   seen: Tuple[str, ...]) -> None:
    kept = []
    for branch in branches:
        if isinstance(branch, dict) and branch.get("type") == "null":
            out["nullable"] = True
        else:
            kept.append(gemini_schema(branch, defs, seen))
    if len(kept) == 1:
        for key, value in kept[0].items():
            out.setdefault(key, value)
    elif kept:
        out["anyOf"] = kept


def json_schema_from_gemini(schema: Any) -> Dict[str, Any]:
    """A Gemini Schema as standard JSON Schema: lower-case types, nullable as a null type."""
    if not isinstance(schema, dict):
        return {}
    out = dict(schema)
    if isinstance(out.get("type"), str):
        out["type"] = out["type"].lower()
        if out.pop("nullable", False) is True:
            out["type"] = [out["type"], "null"]
    if isinstance(out.get("properties"), dict):
        out["properties"] = {k: json_schema_from_gemini(v) for k, v in out["properties"].items()}
    if isinstance(out.get("items"), dict):
        out["items"] = json_schema_from_gemini(out["items"])
    if isinstance(out.get("anyOf"), list):
        out["anyOf"] = [json_schema_from_gemini(b) for b in out["anyOf"]]
    return out


# -- OpenAI and Anthropic requests -> Gemini (E.6) --------------------------------

def _gemini_append(contents: List[Dict[str, Any]], role: str, parts: List[Dict[str, Any]]) -> None:
    """Add parts as a turn; consecutive turns of one role become one (E.2), which also
    puts parallel function responses in ONE user content, in order."""
    if not parts:
        return
    if contents and contents[-1]["role"] == role:
        contents[-1]["parts"].extend(parts)
    else:
        contents.append({"role": role, "parts": list(parts)})


def _sign_function_calls(contents: List[Dict[str, Any]]) -> None:
    """The first functionCall of each model turn gets Google's dummy signature (E.6 (b)):
    a stateless proxy cannot give Gemini 3 back its own, and without one it answers 400."""
    for content in contents:
        if content["role"] == "model":
            for part in content["parts"]:
                if "functionCall" in part:
                    part.setdefault("thoughtSignature", GEMINI_DUMMY_SIGNATURE)
                    break


_GEMINI_DATA_URL = re.compile(r"data:([^;,]+)[^,]*;base64,(.*)", re.S)


def _url_part(url: Any, mime: str, where: str) -> Dict[str, Any]:
    """A data: URL as inlineData, a gs:// URI as fileData; any other URL is refused,
    because a pure translator cannot download it and Gemini fetches only its own URIs."""
    url = url if isinstance(url, str) else ""
    match = _GEMINI_DATA_URL.match(url)
    if match:
        return {"inlineData": {"mimeType": match.group(1), "data": match.group(2)}}
    if url.startswith("gs://"):
        return {"fileData": {"fileUri": url, **({"mimeType": mime} if mime else {})}}
    raise ClientError(f"{where}: URL {printable(url, 80)!r} cannot be sent to a Gemini "
                      "upstream: send the file inline (a data: URL or base64) or as a gs:// URI")


def _function_response(name: str, result: Any, is_error: bool = False) -> Dict[str, Any]:
    """E.6: `response` must be an object; results are wrapped as result or error."""
    return {"functionResponse": {"name": name, "response": {"error" if is_error else "result": result}}}


def _function_declaration(name: Any, description: Any, schema: Any, where: str) -> Dict[str, Any]:
    if not isinstance(name, str) or not GEMINI_FUNCTION_NAME.match(name):
        raise ClientError(f"{where}: tool name {name!r} is not a valid Gemini function name: "
                          "use a letter or _ first, then up to 63 of A-Z a-z 0-9 _ . : -")
    decl: Dict[str, Any] = {"name": name}
    if description:
        decl["description"] = description
    params = gemini_schema(schema)
    if params.get("properties"):            # E.7: no parameters at all for a no-argument tool
        decl["parameters"] = params
    return decl


def _tool_config(mode: str, name: Any = None) -> Dict[str, Any]:
    config: Dict[str, Any] = {"mode": mode}
    if name:
        config["allowedFunctionNames"] = [name]
    return {"functionCallingConfig": config}


def _generation_config(body: Dict[str, Any], table: Sequence[Tuple[str, str]],
                       stop: Any) -> Dict[str, Any]:
    config: Dict[str, Any] = {}
    for source, target in table:
        if body.get(source) is not None and target not in config:
            config[target] = body[source]
    stops = [stop] if isinstance(stop, str) else [s for s in stop or [] if isinstance(s, str)]
    if stops:
        config["stopSequences"] = stops[:GEMINI_MAX_STOP_SEQUENCES]
    return config


def _thinking_config(budget: int) -> Dict[str, Any]:
    return {"thinkingBudget": budget, "includeThoughts": True} if budget else {"thinkingBudget": 0}


def _gemini_body(system: List[str], contents: List[Dict[str, Any]],
                 declarations: List[Dict[str, Any]], tool_config: Optional[Dict[str, Any]],
                 generation: Dict[str, Any]) -> Dict[str, Any]:
    _sign_function_calls(contents)
    out: Dict[str, Any] = {"contents": contents}
    if system:
        out["systemInstruction"] = {"parts": [{"text": text} for text in system]}
    if declarations:
        out["tools"] = [{"functionDeclarations": declarations}]
    if tool_config and declarations:
        out["toolConfig"] = tool_config
    if generation:
        out["generationConfig"] = generation
    return out


def _openai_text(content: Any, where: str) -> str:
    """Text of an OpenAI content (string or parts); non-text parts are refused."""
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for j, part in enumerate(_as_list(content, where)):
        if not isinstance(part, dict) or part.get("type") not in ("text", "input_text"):
            raise ClientError(f"{where}[{j}]: only text parts are allowed here, not "
                              f"{_short(part)}: send text")
        texts.append(part.get("text") or "")
    return "".join(texts)


def _openai_user_parts(content: Any, where: str) -> List[Dict[str, Any]]:
    if content is None or isinstance(content, str):
        return [{"text": content}] if content else []
    parts = []
    for j, part in enumerate(_as_list(content, where + ".content")):
        at, kind = f"{where}.content[{j}]", part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            parts += [{"text": part["text"]}] if part.get("text") else []
        elif kind == "image_url":
            image = part.get("image_url")
            parts.append(_url_part(image.get("url") if isinstance(image, dict) else image, "", at))
        elif kind == "input_audio":
            audio = part.get("input_audio") or {}
            parts.append({"inlineData": {"mimeType": f"audio/{audio.get('format') or 'wav'}",
                                         "data": audio.get("data") or ""}})
        elif kind == "file" and isinstance(part.get("file"), dict) and part["file"].get("file_data"):
            parts.append(_url_part(part["file"]["file_data"], "", at))
        else:
            raise ClientError(f"{at}: part {_short(part)} cannot be sent to a Gemini upstream: "
                              "send text, image_url, input_audio or file with file_data")
    return parts


def _openai_assistant_parts(msg: Dict[str, Any], where: str,
                            names: Dict[str, str]) -> List[Dict[str, Any]]:
    text = _openai_text(msg.get("content"), where + ".content")
    parts: List[Dict[str, Any]] = [{"text": text}] if text else []
    for j, call in enumerate(_as_list(msg.get("tool_calls"), where + ".tool_calls")):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not function.get("name"):
            raise ClientError(f"{where}.tool_calls[{j}] has no function name: send "
                              '{"id","type":"function","function":{"name","arguments"}}')
        names[str(call.get("id"))] = function["name"]
        parts.append({"functionCall": {"name": function["name"],
                                       "args": _tool_input(function.get("arguments"))}})
    return parts


def _answered_name(names: Dict[str, str], call_id: Any, where: str) -> str:
    """The function name of the call a tool result answers, from the request's own
    history (E.6, stateless recovery)."""
    name = names.get(str(call_id))
    if name is None:
        raise ClientError(f"{where} answers tool call {call_id!r}, which no earlier assistant "
                          "message holds: send the assistant tool call before its result")
    return name


def openai_to_gemini_request(body: Dict[str, Any]) -> Dict[str, Any]:
    """OpenAI Chat Completions request -> Gemini generateContent body (E.6)."""
    body = modern_openai_request(body)
    if body.get("n") not in (None, 1):
        raise ClientError(f"n={body['n']!r} is not supported for a Gemini upstream: send n=1")
    system: List[str] = []
    contents: List[Dict[str, Any]] = []
    names: Dict[str, str] = {}
    for i, msg in enumerate(_as_list(body.get("messages"), "messages")):
        where = f"messages[{i}]"
        role = msg.get("role") if isinstance(msg, dict) else None
        if role in ("system", "developer"):
            text = _openai_text(msg.get("content"), where + ".content")
            system += [text] if text else []
        elif role == "user":
            _gemini_append(contents, "user", _openai_user_parts(msg.get("content"), where))
        elif role == "assistant":
            _gemini_append(contents, "model", _openai_assistant_parts(msg, where, names))
        elif role in ("tool", "function"):
            name = (_answered_name(names, msg.get("tool_call_id"), where) if role == "tool"
                    else str(msg.get("name") or ""))
            result = _openai_text(msg.get("content"), where + ".content")
            _gemini_append(contents, "user", [_function_response(name, result)])
        else:
            raise ClientError(f"{where}: unknown role {role!r}: use system, developer, user, "
                              "assistant or tool")
    generation = _generation_config(body, OPENAI_TO_GEMINI_GENERATION, body.get("stop"))
    generation.update(_openai_response_format(body.get("response_format")))
    effort = body.get("reasoning_effort")
    if effort is not None:
        if effort not in REASONING_BUDGETS:
            raise ClientError(f"reasoning_effort {effort!r} is unknown: use one of "
                              + ", ".join(REASONING_BUDGETS))
        generation["thinkingConfig"] = _thinking_config(REASONING_BUDGETS[effort])
    declarations = [_function_declaration(t["function"].get("name"), t["function"].get("description"),
                                          t["function"].get("parameters"), f"tools[{i}]")
                    for i, t in enumerate(_as_list(body.get("tools"), "tools"))
                    if isinstance(t, dict) and isinstance(t.get("function"), dict)]
    return _gemini_body(system, contents, declarations,
                        _openai_tool_config(body.get("tool_choice")), generation)


def _openai_response_format(fmt: Any) -> Dict[str, Any]:
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "json_object":
        return {"responseMimeType": "application/json"}
    if kind == "json_schema":
        schema = (fmt.get("json_schema") or {}).get("schema")
        return {"responseMimeType": "application/json",
                **({"responseJsonSchema": schema} if isinstance(schema, dict) else {})}
    return {}


def _openai_tool_config(choice: Any) -> Optional[Dict[str, Any]]:
    if choice is None:
        return None
    if isinstance(choice, dict):
        return _tool_config("ANY", (choice.get("function") or {}).get("name"))
    if choice not in OPENAI_TOOL_MODES:
        raise ClientError(f"tool_choice {choice!r} is unknown: use auto, required, none or "
                          '{"type":"function","function":{"name":...}}')
    return _tool_config(OPENAI_TOOL_MODES[choice])


def _anthropic_block_list(content: Any, where: str) -> List[Dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return [b for b in _as_list(content, where) if isinstance(b, dict)]


def _anthropic_source_part(source: Any, where: str) -> Dict[str, Any]:
    source = source if isinstance(source, dict) else {}
    kind = source.get("type")
    if kind == "base64":
        return {"inlineData": {"mimeType": source.get("media_type") or "", "data": source.get("data") or ""}}
    if kind == "url":
        return _url_part(source.get("url"), "", where)
    if kind == "text":
        return {"text": source.get("data") or ""}
    raise ClientError(f"{where}: a {kind!r} source cannot be sent to a Gemini upstream: "
                      "send base64 data")


def _anthropic_parts(block: Dict[str, Any], where: str, names: Dict[str, str]) -> List[Dict[str, Any]]:
    """One Anthropic content block as Gemini parts. thinking and redacted_thinking are
    dropped (their signatures are Anthropic's; E.6), as are server-tool blocks."""
    kind = block.get("type")
    if kind == "text":
        return [{"text": block["text"]}] if block.get("text") else []
    if kind in ("image", "document"):
        return [_anthropic_source_part(block.get("source"), where)]
    if kind == "tool_use":
        names[str(block.get("id"))] = str(block.get("name"))
        args = block.get("input")
        return [{"functionCall": {"name": block.get("name"), "args": args if isinstance(args, dict) else {}}}]
    if kind == "tool_result":
        name = _answered_name(names, block.get("tool_use_id"), where)
        texts, extra = [], []
        for j, inner in enumerate(_anthropic_block_list(block.get("content") or "", where + ".content")):
            if inner.get("type") == "text":
                texts.append(inner.get("text") or "")
            else:       # images inside a result follow the functionResponse (E.6, CLIProxyAPI)
                extra += _anthropic_parts(inner, f"{where}.content[{j}]", names)
        return [_function_response(name, "\n".join(texts), block.get("is_error") is True)] + extra
    return []


def _anthropic_system(system: Any) -> List[str]:
    texts = [b.get("text") or "" for b in _anthropic_block_list(system or [], "system")]
    return [t for t in texts if t and not t.startswith(ANTHROPIC_BILLING_PREFIX)]


def _anthropic_thinking(thinking: Any) -> Optional[Dict[str, Any]]:
    """enabled -> that budget; adaptive -> Gemini's dynamic budget (-1); disabled or
    absent -> Gemini's default (a budget of 0 is refused by Pro models)."""
    kind = thinking.get("type") if isinstance(thinking, dict) else None
    if kind == "enabled":
        return _thinking_config(int(thinking.get("budget_tokens") or ANTHROPIC_MIN_THINKING_BUDGET))
    if kind == "adaptive":
        return _thinking_config(-1)
    return None


def _anthropic_tool_config(choice: Any) -> Optional[Dict[str, Any]]:
    if choice is None:
        return None
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind not in ANTHROPIC_TOOL_MODES:
        raise ClientError(f"tool_choice {_short(choice)} is unknown: use type auto, any, tool or none")
    return _tool_config(ANTHROPIC_TOOL_MODES[kind], choice.get("name") if kind == "tool" else None)


def anthropic_to_gemini_request(body: Dict[str, Any]) -> Dict[str, Any]:
    """Anthropic Messages request -> Gemini generateContent body (E.6)."""
    contents: List[Dict[str, Any]] = []
    names: Dict[str, str] = {}
    for i, msg in enumerate(_as_list(body.get("messages"), "messages")):
        where = f"messages[{i}]"
        role = msg.get("role") if isinstance(msg, dict) else None
        if role not in ("user", "assistant"):
            raise ClientError(f"{where}: role {role!r} is not user or assistant: put system "
                              "text in the top-level system field")
        parts: List[Dict[str, Any]] = []
        for j, block in enumerate(_anthropic_block_list(msg.get("content"), where + ".content")):
            parts += _anthropic_parts(block, f"{where}.content[{j}]", names)
        _gemini_append(contents, "model" if role == "assistant" else "user", parts)
    generation = _generation_config(body, ANTHROPIC_TO_GEMINI_GENERATION, body.get("stop_sequences"))
    thinking = _anthropic_thinking(body.get("thinking"))
    if thinking:
        generation["thinkingConfig"] = thinking
    declarations = [_function_declaration(t.get("name"), t.get("description"), t.get("input_schema"),
                                          f"tools[{i}]")
                    for i, t in enumerate(_as_list(body.get("tools"), "tools"))
                    if isinstance(t, dict) and ("input_schema" in t or t.get("type") in (None, "custom"))]
    return _gemini_body(_anthropic_system(body.get("system")), contents, declarations,
                        _anthropic_tool_config(body.get("tool_choice")), generation)


# -- Gemini responses -> OpenAI and Anthropic (E.6) --------------------------------

def _gemini_candidate(body: Dict[str, Any]) -> Dict[str, Any]:
    candidates = body.get("candidates")
    return candidates[0] if isinstance(candidates, list) and candidates and \
        isinstance(candidates[0], dict) else {}


def _gemini_parts(candidate: Dict[str, Any]) -> List[Dict[str, Any]]:
    parts = (candidate.get("content") or {}).get("parts")
    return [p for p in parts if isinstance(p, dict)] if isinstance(parts, list) else []


def _gemini_finish(body: Dict[str, Any]) -> Optional[str]:
    """The chunk's finishReason; a prompt blocked before generation counts as SAFETY."""
    reason = _gemini_candidate(body).get("finishReason")
    if reason:
        return reason
    feedback = body.get("promptFeedback")
    return "SAFETY" if isinstance(feedback, dict) and feedback.get("blockReason") else None


def _gemini_counts(meta: Any) -> Tuple[int, int, int, int, int]:
    """(prompt incl. cached, cached, candidates, thoughts, total) of a usageMetadata."""
    meta = meta if isinstance(meta, dict) else {}
    prompt, cached = meta.get("promptTokenCount") or 0, meta.get("cachedContentTokenCount") or 0
    candidates, thoughts = meta.get("candidatesTokenCount") or 0, meta.get("thoughtsTokenCount") or 0
    return prompt, cached, candidates, thoughts, meta.get("totalTokenCount") or prompt + candidates + thoughts


def anthropic_usage_from_gemini(meta: Any) -> Dict[str, int]:
    prompt, cached, candidates, thoughts, _ = _gemini_counts(meta)
    return {"input_tokens": max(0, prompt - cached), "output_tokens": candidates + thoughts,
            "cache_read_input_tokens": cached, "cache_creation_input_tokens": 0}


def openai_usage_from_gemini(meta: Any) -> Dict[str, Any]:
    prompt, cached, candidates, thoughts, total = _gemini_counts(meta)
    return {"prompt_tokens": prompt, "completion_tokens": candidates + thoughts, "total_tokens": total,
            "prompt_tokens_details": {"cached_tokens": cached},
            "completion_tokens_details": {"reasoning_tokens": thoughts}}


def gemini_to_anthropic_response(body: Dict[str, Any], model: str) -> Dict[str, Any]:
    """Gemini GenerateContentResponse -> Anthropic Message (E.6)."""
    response_id = str(body.get("responseId") or "")
    content: List[Dict[str, Any]] = []
    calls = 0
    for part in _gemini_parts(_gemini_candidate(body)):
        last = content[-1] if content else {}
        if "functionCall" in part:
            call = part["functionCall"]
            content.append({"type": "tool_use", "id": _tool_id("toolu_", response_id, calls, call),
                            "name": call.get("name"), "input": call.get("args") or {}})
            calls += 1
        elif part.get("thought") is True:
            if last.get("type") != "thinking":
                last = {"type": "thinking", "thinking": "", "signature": ""}
                content.append(last)
            last["thinking"] += part.get("text") or ""
            last["signature"] = part.get("thoughtSignature") or last["signature"]
        elif part.get("text"):
            if last.get("type") == "text":
                last["text"] += part["text"]
            else:
                content.append({"type": "text", "text": part["text"]})
    finish = _gemini_finish(body)
    stop = "tool_use" if calls else GEMINI_FINISH_TO_ANTHROPIC.get(finish or "", "end_turn")
    return {"id": "msg_" + (response_id or short_hash(_json_text(body))), "type": "message",
            "role": "assistant", "model": model, "content": content, "stop_reason": stop,
            "stop_sequence": None, "usage": anthropic_usage_from_gemini(body.get("usageMetadata"))}


def gemini_to_openai_response(body: Dict[str, Any], model: str) -> Dict[str, Any]:
    """Gemini GenerateContentResponse -> OpenAI chat.completion (E.6)."""
    response_id = str(body.get("responseId") or "")
    texts, thoughts, calls = [], [], []
    for part in _gemini_parts(_gemini_candidate(body)):
        if "functionCall" in part:
            calls.append(_openai_tool_call(response_id, len(calls), part["functionCall"]))
        elif part.get("thought") is True:
            thoughts.append(part.get("text") or "")
        else:
            texts.append(part.get("text") or "")
    message: Dict[str, Any] = {"role": "assistant",
                               "content": "".join(texts) if texts or not calls else None}
    if thoughts:
        message["reasoning_content"] = "".join(thoughts)
    if calls:
        message["tool_calls"] = calls
    finish = "tool_calls" if calls else GEMINI_FINISH_TO_OPENAI.get(_gemini_finish(body) or "", "stop")
    return {"id": "chatcmpl-" + (response_id or short_hash(_json_text(body))),
            "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": finish}],
            "usage": openai_usage_from_gemini(body.get("usageMetadata"))}


def _openai_tool_call(response_id: str, n: int, call: Dict[str, Any]) -> Dict[str, Any]:
    return {"id": _tool_id("call_", response_id, n, call), "type": "function",
            "function": {"name": call.get("name"), "arguments": _json_text(call.get("args") or {})}}


def _upstream_error(obj: Dict[str, Any]) -> Tuple[int, str]:
    """(HTTP status, message) of an in-stream {"error": ...} from any upstream."""
    err = obj.get("error")
    if not isinstance(err, dict):
        return 502, str(err)
    code = err.get("code")
    status = code if isinstance(code, int) and 400 <= code <= 599 else (
        ANTHROPIC_ERROR_STATUS.get(str(err.get("type")), 502))
    return status, str(err.get("message") or _json_text(err))


class _GeminiUpstreamStream:
    """Reads Gemini alt=sse chunks (E.4) and calls the client format's hooks: _start,
    _thinking, _text, _tool, _finish_blocks, _end, _error. Each chunk holds new parts
    only; functionCall parts arrive whole; the last chunk(s) carry finishReason and
    the full usageMetadata. The end is written when a chunk at or after the finish
    carries usage, or at close()."""

    def __init__(self, model: str, input_estimate: int = 0) -> None:
        self.model, self.input_estimate = model, input_estimate
        self.response_id, self.calls = "", 0
        self.usage: Dict[str, Any] = {}
        self.finish: Optional[str] = None
        self.state = "new"                          # new -> open -> done

    def feed(self, event: str, data: str) -> List[Tuple[str, str]]:
        if self.state == "done":
            return []
        try:
            obj = json.loads(data)
        except ValueError:
            obj = None
        if not isinstance(obj, dict):
            return self._fail(502, f"upstream sent a stream event that is not a JSON object: "
                                   f"{printable(data, 80)!r}")
        if "error" in obj:
            return self._fail(*_upstream_error(obj))
        out: List[Tuple[str, str]] = []
        if self.state == "new":
            self.response_id, self.state = str(obj.get("responseId") or ""), "open"
            out += self._start(obj.get("usageMetadata") or {})
        if isinstance(obj.get("usageMetadata"), dict):
            self.usage = obj["usageMetadata"]
        if self.finish is None:
            out += self._parts(_gemini_parts(_gemini_candidate(obj)))
            self.finish = _gemini_finish(obj)
            out += self._finish_blocks() if self.finish else []
        if self.finish and "usageMetadata" in obj:
            self.state = "done"
            out += self._end()
        return out

    def _parts(self, parts: List[Dict[str, Any]]) -> List[Tuple[str, str]]:
        out: List[Tuple[str, str]] = []
        for part in parts:
            if "functionCall" in part:
                call = part["functionCall"]
                out += self._tool(_tool_id(self.id_prefix, self.response_id, self.calls, call),
                                  str(call.get("name")), call.get("args") or {})
                self.calls += 1
            elif part.get("thought") is True:
                out += self._thinking(part.get("text") or "", part.get("thoughtSignature") or "")
            elif part.get("text"):   # an empty text part carries only a signature (E.4)
                out += self._text(part["text"])
        return out

    def close(self) -> List[Tuple[str, str]]:
        if self.state == "done":
            return []
        if self.finish:
            self.state = "done"
            return self._end()
        return self._fail(502, STREAM_CUT_SHORT)

    def _fail(self, status: int, message: str) -> List[Tuple[str, str]]:
        self.state = "done"
        return self._error(status, message)

    id_prefix = ""

    def _start(self, usage: Dict[str, Any]) -> List[Tuple[str, str]]:
        raise NotImplementedError

    def _thinking(self, text: str, signature: str) -> List[Tuple[str, str]]:
        raise NotImplementedError

    def _text(self, text: str) -> List[Tuple[str, str]]:
        raise NotImplementedError

    def _tool(self, call_id: str, name: str, args: Dict[str, Any]) -> List[Tuple[str, str]]:
        raise NotImplementedError

    def _finish_blocks(self) -> List[Tuple[str, str]]:
        raise NotImplementedError

    def _end(self) -> List[Tuple[str, str]]:
        raise NotImplementedError

    def _error(self, status: int, message: str) -> List[Tuple[str, str]]:
        raise NotImplementedError


def _anthropic_event(kind: str, **fields: Any) -> Tuple[str, str]:
    return kind, _json_text({"type": kind, **fields})


class GeminiToAnthropicStream(_GeminiUpstreamStream):
    """Gemini alt=sse -> Anthropic events in A.4 order (E.6 streaming): thoughts and text
    as deltas of one open block; each functionCall a whole tool_use block."""
    id_prefix = "toolu_"

    def __init__(self, model: str, input_estimate: int = 0) -> None:
        super().__init__(model, input_estimate)
        self.index, self.open, self.signature, self.tools = 0, "", "", False

    def _start(self, usage: Dict[str, Any]) -> List[Tuple[str, str]]:
        counts = anthropic_usage_from_gemini(usage)
        if "promptTokenCount" not in usage:
            counts["input_tokens"] = self.input_estimate
        message = {"id": "msg_" + (self.response_id or short_hash(self.model)), "type": "message",
                   "role": "assistant", "content": [], "model": self.model, "stop_reason": None,
                   "stop_sequence": None,
                   "usage": {"input_tokens": counts["input_tokens"], "output_tokens": 0,
                             "cache_read_input_tokens": counts["cache_read_input_tokens"]}}
        return [_anthropic_event("message_start", message=message)]

    def _open(self, kind: str) -> List[Tuple[str, str]]:
        if self.open == kind:
            return []
        out = self._finish_blocks()
        self.open = kind
        block = {"type": kind, kind: ""}             # {"type":"text","text":""}, thinking alike
        return out + [_anthropic_event("content_block_start", index=self.index, content_block=block)]

    def _finish_blocks(self) -> List[Tuple[str, str]]:
        if not self.open:
            return []
        out = []
        if self.open == "thinking" and self.signature:   # only Gemini's own; never invented
            out.append(_anthropic_event("content_block_delta", index=self.index,
                                        delta={"type": "signature_delta", "signature": self.signature}))
        out.append(_anthropic_event("content_block_stop", index=self.index))
        self.index, self.open, self.signature = self.index + 1, "", ""
        return out

    def _thinking(self, text: str, signature: str) -> List[Tuple[str, str]]:
        if not text and self.open != "thinking":
            return []
        out = self._open("thinking")
        if text:
            out.append(_anthropic_event("content_block_delta", index=self.index,
                                        delta={"type": "thinking_delta", "thinking": text}))
        self.signature = signature or self.signature
        return out

    def _text(self, text: str) -> List[Tuple[str, str]]:
        return self._open("text") + [_anthropic_event(
            "content_block_delta", index=self.index, delta={"type": "text_delta", "text": text})]

    def _tool(self, call_id: str, name: str, args: Dict[str, Any]) -> List[Tuple[str, str]]:
        out = self._finish_blocks()
        block = {"type": "tool_use", "id": call_id, "name": name, "input": {}}
        out += [_anthropic_event("content_block_start", index=self.index, content_block=block),
                _anthropic_event("content_block_delta", index=self.index,
                                 delta={"type": "input_json_delta", "partial_json": _json_text(args)}),
                _anthropic_event("content_block_stop", index=self.index)]
        self.index, self.tools = self.index + 1, True
        return out

    def _end(self) -> List[Tuple[str, str]]:
        stop = "tool_use" if self.tools else GEMINI_FINISH_TO_ANTHROPIC.get(self.finish or "", "end_turn")
        usage = anthropic_usage_from_gemini(self.usage)
        del usage["cache_creation_input_tokens"]
        return [_anthropic_event("message_delta", delta={"stop_reason": stop, "stop_sequence": None},
                                 usage=usage),
                _anthropic_event("message_stop")]

    def _error(self, status: int, message: str) -> List[Tuple[str, str]]:
        err_type = "overloaded_error" if status == 503 else ""
        out = self._finish_blocks()
        return out + [("error", _json_text(error_object("anthropic", status, message, err_type)))]


class GeminiToOpenAIStream(_GeminiUpstreamStream):
    """Gemini alt=sse -> OpenAI chat.completion.chunk events (E.6 streaming): one chunk
    per part, each tool call whole, then the finish chunk, the usage chunk and [DONE]."""
    id_prefix = "call_"

    def __init__(self, model: str, input_estimate: int = 0) -> None:
        super().__init__(model, input_estimate)
        self.created = int(time.time())

    def _chunk(self, delta: Optional[Dict[str, Any]], finish: Optional[str] = None,
               **extra: Any) -> Tuple[str, str]:
        choices = [{"index": 0, "delta": delta, "finish_reason": finish}] if delta is not None else []
        return "", _json_text({
            "id": "chatcmpl-" + (self.response_id or short_hash(self.model)),
            "object": "chat.completion.chunk", "created": self.created, "model": self.model,
            "choices": choices, **extra})

    def _start(self, usage: Dict[str, Any]) -> List[Tuple[str, str]]:
        return [self._chunk({"role": "assistant", "content": ""})]

    def _thinking(self, text: str, signature: str) -> List[Tuple[str, str]]:
        return [self._chunk({"reasoning_content": text})] if text else []

    def _text(self, text: str) -> List[Tuple[str, str]]:
        return [self._chunk({"content": text})]

    def _tool(self, call_id: str, name: str, args: Dict[str, Any]) -> List[Tuple[str, str]]:
        call = {"index": self.calls, "id": call_id, "type": "function",
                "function": {"name": name, "arguments": _json_text(args)}}
        return [self._chunk({"tool_calls": [call]})]

    def _finish_blocks(self) -> List[Tuple[str, str]]:
        finish = "tool_calls" if self.calls else GEMINI_FINISH_TO_OPENAI.get(self.finish or "", "stop")
        return [self._chunk({}, finish)]

    def _end(self) -> List[Tuple[str, str]]:
        return [self._chunk(None, usage=openai_usage_from_gemini(self.usage)), ("", "[DONE]")]

    def _error(self, status: int, message: str) -> List[Tuple[str, str]]:
        return [("", _json_text(error_object("openai", status, message)))]


# -- Gemini clients -> OpenAI and Anthropic upstreams (E.6, reversed) ------------

def _gemini_turns(body: Dict[str, Any]) -> List[Tuple[str, List[Tuple[Any, ...]]]]:
    """Gemini contents as (role, items), role "user" or "assistant", items one of
    ("text", text), ("thought", text, signature), ("inline", mime, data, where),
    ("file", mime, uri, where), ("call", id, name, args), ("result", id, response).
    A call's id is its own, else call_<n> (n counts calls in this request); a
    functionResponse answers the earliest unanswered call with its id, else its name."""
    turns: List[Tuple[str, List[Tuple[Any, ...]]]] = []
    pending: List[Tuple[str, str]] = []
    for i, content in enumerate(_as_list(body.get("contents"), "contents")):
        role = content.get("role", "user") if isinstance(content, dict) else None
        if role not in ("user", "model"):
            raise ClientError(f"contents[{i}]: role {role!r} is not user or model: use one of them")
        items = [_gemini_item(part, f"contents[{i}].parts[{j}]", pending)
                 for j, part in enumerate(_as_list(content.get("parts"), f"contents[{i}].parts"))
                 if isinstance(part, dict)]
        turns.append(("assistant" if role == "model" else "user", [x for x in items if x]))
    return turns


def _gemini_item(part: Dict[str, Any], where: str,
                 pending: List[Tuple[str, str]]) -> Optional[Tuple[Any, ...]]:
    if isinstance(part.get("functionCall"), dict):
        call = part["functionCall"]
        call_id = _tool_id("", "", 0, call) if call.get("id") else f"call_{len(pending)}"
        pending.append((call_id, str(call.get("name"))))
        args = call.get("args")
        return ("call", call_id, str(call.get("name")), args if isinstance(args, dict) else {})
    if isinstance(part.get("functionResponse"), dict):
        answer = part["functionResponse"]
        return ("result", _answered_id(pending, answer, where), answer.get("response"))
    if isinstance(part.get("inlineData"), dict):
        data = part["inlineData"]
        return ("inline", str(data.get("mimeType") or ""), str(data.get("data") or ""), where)
    if isinstance(part.get("fileData"), dict):
        data = part["fileData"]
        return ("file", str(data.get("mimeType") or ""), str(data.get("fileUri") or ""), where)
    if part.get("thought") is True:
        return ("thought", part.get("text") or "", part.get("thoughtSignature") or "")
    if isinstance(part.get("text"), str) and part["text"]:
        return ("text", part["text"])
    return None


def _answered_id(pending: List[Tuple[str, str]], answer: Dict[str, Any], where: str) -> str:
    wanted = _tool_id("", "", 0, answer) if answer.get("id") else ""
    by_id = [n for n, (call_id, _) in enumerate(pending) if wanted and call_id == wanted]
    by_name = [n for n, (call_id, name) in enumerate(pending) if call_id and name == answer.get("name")]
    for n in by_id[:1] or by_name[:1]:        # a client-made id (Gemini CLI) falls back to the name
        call_id, pending[n] = pending[n][0], ("", "")     # answered: never matched again
        return call_id
    raise ClientError(f"{where}: functionResponse {answer.get('name')!r} answers no earlier "
                      "functionCall: send the model's functionCall before its response")


def _result_text(response: Any) -> Tuple[str, bool]:
    """(text, is_error) of a functionResponse.response: {"result"|"output": text} unwrapped,
    {"error": x} flagged, any other object as JSON."""
    if isinstance(response, dict) and len(response) == 1:
        (key, value), = response.items()
        if key in ("result", "output", "error"):
            return (value if isinstance(value, str) else _json_text(value)), key == "error"
    return _json_text(response if response is not None else {}), False


def _gemini_system(body: Dict[str, Any]) -> str:
    instruction = body.get("systemInstruction") or body.get("system_instruction")
    parts = instruction.get("parts") if isinstance(instruction, dict) else None
    return "\n".join(p.get("text") for p in parts or [] if isinstance(p, dict) and p.get("text"))


def _gemini_declarations(body: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Function declarations with their parameters as standard JSON Schema; googleSearch,
    codeExecution and other Gemini-only tools have no equivalent and are left out."""
    out = []
    for i, tool in enumerate(_as_list(body.get("tools"), "tools")):
        for decl in _as_list(tool.get("functionDeclarations") if isinstance(tool, dict) else None,
                             f"tools[{i}].functionDeclarations"):
            schema = decl.get("parametersJsonSchema") or json_schema_from_gemini(decl.get("parameters"))
            out.append({"name": decl.get("name"),
                        **({"description": decl["description"]} if decl.get("description") else {}),
                        "parameters": schema or {"type": "object", "properties": {}}})
    return out


def _gemini_calling(body: Dict[str, Any]) -> Tuple[str, Optional[str]]:
    """(mode, the one allowed function name or None) of toolConfig."""
    config = (body.get("toolConfig") or {}).get("functionCallingConfig") or {}
    names = config.get("allowedFunctionNames") or []
    return str(config.get("mode") or ""), (names[0] if len(names) == 1 else None)


def _gemini_generation(body: Dict[str, Any], table: Sequence[Tuple[str, str]]) -> Dict[str, Any]:
    config = body.get("generationConfig") or {}
    if config.get("candidateCount") not in (None, 1):
        raise ClientError(f"candidateCount={config['candidateCount']!r} is not supported for this "
                          "upstream: send 1")
    return {target: config[source] for source, target in table if config.get(source) is not None}


def _thinking_budget(body: Dict[str, Any]) -> int:
    """An explicit positive thinkingBudget, else 0: dynamic (-1) and includeThoughts alone
    ask for nothing an OpenAI or Anthropic model must be told."""
    thinking = (body.get("generationConfig") or {}).get("thinkingConfig") or {}
    budget = thinking.get("thinkingBudget")
    return budget if isinstance(budget, int) and budget > 0 else 0


def _openai_media(item: Tuple[Any, ...]) -> Dict[str, Any]:
    kind, mime, data, where = item
    if kind == "inline":
        url = f"data:{mime};base64,{data}"
        if mime.startswith("image/"):
            return {"type": "image_url", "image_url": {"url": url}}
        if mime in ("audio/wav", "audio/mp3", "audio/mpeg"):
            return {"type": "input_audio", "input_audio": {"data": data, "format": mime.split("/")[1][:3]}}
        return {"type": "file", "file": {"filename": "file." + mime.split("/")[-1], "file_data": url}}
    if data.startswith(("http://", "https://")):
        return {"type": "image_url", "image_url": {"url": data}}
    raise ClientError(f"{where}: fileData {printable(data, 80)!r} cannot be sent to an "
                      "OpenAI-compatible upstream: send the file as inlineData")


def gemini_to_openai_request(body: Dict[str, Any]) -> Dict[str, Any]:
    """Gemini generateContent body -> OpenAI Chat Completions request (E.6 reversed).
    The pipeline sets model and stream from the path."""
    messages: List[Dict[str, Any]] = []
    system = _gemini_system(body)
    if system:
        messages.append({"role": "system", "content": system})
    for role, items in _gemini_turns(body):
        messages += _openai_messages(role, items)
    out: Dict[str, Any] = {"messages": messages, **_gemini_generation(body, GEMINI_TO_OPENAI_GENERATION)}
    config = body.get("generationConfig") or {}
    if config.get("stopSequences"):
        out["stop"] = list(config["stopSequences"])
    out.update(_openai_format_from_gemini(config))
    budget = _thinking_budget(body)
    if budget:
        out["reasoning_effort"] = next(e for bound, e in BUDGET_EFFORTS if bound is None or budget <= bound)
    elif config.get("thinkingConfig", {}).get("thinkingLevel") in ("low", "high"):
        out["reasoning_effort"] = config["thinkingConfig"]["thinkingLevel"]
    tools = [{"type": "function", "function": decl} for decl in _gemini_declarations(body)]
    if tools:
        out["tools"] = tools
        mode, name = _gemini_calling(body)
        choice = {"AUTO": "auto", "ANY": "required", "NONE": "none", "VALIDATED": "auto"}.get(mode)
        if mode == "ANY" and name:
            choice = {"type": "function", "function": {"name": name}}
        if choice:
            out["tool_choice"] = choice
    if body.get("stream") is True:
        out["stream_options"] = {"include_usage": True}
    return out


def _openai_format_from_gemini(config: Dict[str, Any]) -> Dict[str, Any]:
    schema = config.get("responseJsonSchema") or config.get("responseSchema")
    if isinstance(schema, dict):
        return {"response_format": {"type": "json_schema", "json_schema": {
            "name": "response", "schema": json_schema_from_gemini(schema)}}}
    if config.get("responseMimeType") == "application/json":
        return {"response_format": {"type": "json_object"}}
    return {}


def _openai_messages(role: str, items: List[Tuple[Any, ...]]) -> List[Dict[str, Any]]:
    """One Gemini turn as OpenAI messages: tool messages first (they must follow the
    assistant's tool_calls), then the user's other parts; thoughts are dropped."""
    if role == "assistant":
        calls = [{"id": x[1], "type": "function", "function": {"name": x[2], "arguments": _json_text(x[3])}}
                 for x in items if x[0] == "call"]
        text = "".join(x[1] for x in items if x[0] == "text")
        if not text and not calls:
            return []
        return [{"role": "assistant", "content": text, **({"tool_calls": calls} if calls else {})}]
    out = []
    for x in items:
        if x[0] == "result":
            result, is_error = _result_text(x[2])
            out.append({"role": "tool", "tool_call_id": x[1],
                        "content": ("Error: " if is_error else "") + result})   # C.1: flag kept
    parts = [{"type": "text", "text": x[1]} if x[0] == "text" else _openai_media(x)
             for x in items if x[0] in ("text", "inline", "file")]
    if len(parts) == 1 and parts[0]["type"] == "text":
        out.append({"role": "user", "content": parts[0]["text"]})
    elif parts:
        out.append({"role": "user", "content": parts})
    return out


def _anthropic_media(item: Tuple[Any, ...]) -> Dict[str, Any]:
    kind, mime, data, where = item
    block_type = "image" if mime.startswith("image/") else "document"
    supported = block_type == "image" or mime == "application/pdf"
    if kind == "inline" and supported:
        return {"type": block_type, "source": {"type": "base64", "media_type": mime, "data": data}}
    if kind == "file" and supported and data.startswith(("http://", "https://")):
        return {"type": block_type, "source": {"type": "url", "url": data}}
    raise ClientError(f"{where}: {mime or 'a file'} {'inlineData' if kind == 'inline' else repr(data)} "
                      "cannot be sent to an Anthropic upstream: send images or PDF inline")


def _anthropic_content(role: str, items: List[Tuple[Any, ...]]) -> List[Dict[str, Any]]:
    """One Gemini turn as Anthropic blocks. Thoughts keep their place only with the
    signature the client got from us (an Anthropic one); unsigned thoughts are dropped."""
    blocks: List[Dict[str, Any]] = []
    for x in items:
        if x[0] == "text":
            blocks.append({"type": "text", "text": x[1]})
        elif x[0] == "thought" and role == "assistant":
            if blocks and blocks[-1]["type"] == "thinking" and not blocks[-1]["signature"]:
                blocks[-1]["thinking"] += x[1]
                blocks[-1]["signature"] = x[2]
            else:
                blocks.append({"type": "thinking", "thinking": x[1], "signature": x[2]})
        elif x[0] == "call" and role == "assistant":
            blocks.append({"type": "tool_use", "id": x[1], "name": x[2], "input": x[3]})
        elif x[0] == "result":
            text, is_error = _result_text(x[2])
            blocks.append({"type": "tool_result", "tool_use_id": x[1], "content": text,
                           **({"is_error": True} if is_error else {})})
        elif x[0] in ("inline", "file"):
            blocks.append(_anthropic_media(x))
    return [b for b in blocks if b["type"] != "thinking" or b["signature"]]


def gemini_to_anthropic_request(body: Dict[str, Any]) -> Dict[str, Any]:
    """Gemini generateContent body -> Anthropic Messages request (E.6 reversed).
    The pipeline sets model and stream from the path."""
    messages: List[Dict[str, Any]] = []
    for role, items in _gemini_turns(body):
        blocks = _anthropic_content(role, items)
        if messages and messages[-1]["role"] == role:
            blocks = messages.pop()["content"] + blocks
        if blocks:     # tool_result blocks must lead a user message (A.2)
            blocks.sort(key=lambda b: b["type"] != "tool_result")
            messages.append({"role": role, "content": blocks})
    out: Dict[str, Any] = {"messages": messages, **_gemini_generation(body, GEMINI_TO_ANTHROPIC_GENERATION)}
    out.setdefault("max_tokens", ANTHROPIC_DEFAULT_MAX_TOKENS)   # A.2: required; defined above
    if isinstance(out.get("temperature"), (int, float)):
        out["temperature"] = min(out["temperature"], 1.0)   # Gemini 0-2, Anthropic 0-1
    stops = (body.get("generationConfig") or {}).get("stopSequences")
    if stops:
        out["stop_sequences"] = list(stops)
    system = _gemini_system(body)
    if system:
        out["system"] = system
    budget = _thinking_budget(body)
    if budget:
        budget = max(budget, ANTHROPIC_MIN_THINKING_BUDGET)
        out["thinking"] = {"type": "enabled", "budget_tokens": budget}
        out.pop("temperature", None)          # A.2: not allowed together with thinking
        out.pop("top_k", None)
        if out["max_tokens"] <= budget:
            out["max_tokens"] = budget + ANTHROPIC_DEFAULT_MAX_TOKENS
    tools = [{**{k: v for k, v in d.items() if k != "parameters"}, "input_schema": d["parameters"]}
             for d in _gemini_declarations(body)]
    if tools:
        out["tools"] = tools
        mode, name = _gemini_calling(body)
        choice = {"AUTO": {"type": "auto"}, "ANY": {"type": "any"}, "NONE": {"type": "none"},
                  "VALIDATED": {"type": "auto"}}.get(mode)
        if mode == "ANY" and name:
            choice = {"type": "tool", "name": name}
        if choice:
            out["tool_choice"] = choice
    return out


def gemini_usage_from_openai(usage: Any) -> Dict[str, int]:
    usage = usage if isinstance(usage, dict) else {}
    prompt, completion = usage.get("prompt_tokens") or 0, usage.get("completion_tokens") or 0
    reasoning = (usage.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    out = {"promptTokenCount": prompt, "candidatesTokenCount": max(0, completion - reasoning),
           "totalTokenCount": usage.get("total_tokens") or prompt + completion}
    if cached:
        out["cachedContentTokenCount"] = cached
    if reasoning:
        out["thoughtsTokenCount"] = reasoning
    return out


def gemini_usage_from_anthropic(usage: Any) -> Dict[str, int]:
    usage = usage if isinstance(usage, dict) else {}
    cached = usage.get("cache_read_input_tokens") or 0
    prompt = (usage.get("input_tokens") or 0) + (usage.get("cache_creation_input_tokens") or 0) + cached
    output = usage.get("output_tokens") or 0
    out = {"promptTokenCount": prompt, "candidatesTokenCount": output, "totalTokenCount": prompt + output}
    if cached:
        out["cachedContentTokenCount"] = cached
    return out


def _gemini_answer(parts: List[Dict[str, Any]], finish: Optional[str], usage: Optional[Dict[str, Any]],
                   model: str, response_id: str) -> Dict[str, Any]:
    """A GenerateContentResponse (whole answer or stream chunk). A finishing answer with
    no parts carries one empty text part, as Google's own final chunks do."""
    parts = parts or ([{"text": ""}] if finish else [])
    candidate: Dict[str, Any] = {"content": {"role": "model", "parts": parts}, "index": 0}
    if finish:
        candidate["finishReason"] = finish
    out: Dict[str, Any] = {"candidates": [candidate]}
    if usage is not None:
        out["usageMetadata"] = usage
    out.update({"modelVersion": model, "responseId": response_id})
    return out


def _function_call_part(call_id: str, name: str, args: Dict[str, Any]) -> Dict[str, Any]:
    """The upstream's call id rides along as functionCall.id; Gemini clients send it back
    on the functionResponse, which pairs them exactly (_answered_id)."""
    return {"functionCall": {"id": call_id, "name": name, "args": args}} if call_id else \
        {"functionCall": {"name": name, "args": args}}


def openai_to_gemini_response(body: Dict[str, Any], model: str) -> Dict[str, Any]:
    """OpenAI chat.completion -> Gemini GenerateContentResponse."""
    choices = body.get("choices") or [{}]
    message = choices[0].get("message") or {}
    parts: List[Dict[str, Any]] = []
    reasoning = message.get("reasoning_content") or message.get("reasoning")
    if isinstance(reasoning, str) and reasoning:
        parts.append({"text": reasoning, "thought": True})
    text = message.get("content")
    if isinstance(text, list):
        text = "".join(p.get("text") or "" for p in text if isinstance(p, dict))
    if text:
        parts.append({"text": text})
    for call in message.get("tool_calls") or []:
        function = call.get("function") or {}
        parts.append(_function_call_part(call.get("id") or "", str(function.get("name")),
                                         _tool_input(function.get("arguments"))))
    finish = OPENAI_FINISH_TO_GEMINI.get(choices[0].get("finish_reason") or "", "STOP")
    return _gemini_answer(parts, finish, gemini_usage_from_openai(body.get("usage")), model,
                          str(body.get("id") or ""))


def anthropic_to_gemini_response(body: Dict[str, Any], model: str) -> Dict[str, Any]:
    """Anthropic Message -> Gemini GenerateContentResponse. redacted_thinking has no
    Gemini form and is dropped."""
    parts: List[Dict[str, Any]] = []
    for block in body.get("content") or []:
        kind = block.get("type")
        if kind == "thinking":
            parts.append({"text": block.get("thinking") or "", "thought": True,
                          **({"thoughtSignature": block["signature"]} if block.get("signature") else {})})
        elif kind == "text" and block.get("text"):
            parts.append({"text": block["text"]})
        elif kind == "tool_use":
            parts.append(_function_call_part(str(block.get("id") or ""), str(block.get("name")),
                                             block.get("input") or {}))
    finish = ANTHROPIC_STOP_TO_GEMINI.get(body.get("stop_reason") or "", "STOP")
    return _gemini_answer(parts, finish, gemini_usage_from_anthropic(body.get("usage")), model,
                          str(body.get("id") or ""))


class _GeminiClientStream:
    """Writes Gemini alt=sse chunks for a Gemini client: "" events, no [DONE] (section 0)."""

    def __init__(self, model: str, input_estimate: int = 0) -> None:
        self.model, self.response_id, self.done = model, "", False

    def _chunk(self, parts: List[Dict[str, Any]], finish: Optional[str] = None,
               usage: Optional[Dict[str, Any]] = None) -> Tuple[str, str]:
        return "", _json_text(_gemini_answer(parts, finish, usage, self.model, self.response_id))

    def _fail(self, status: int, message: str) -> List[Tuple[str, str]]:
        self.done = True
        return [("", _json_text(error_object("gemini", status, message)))]

    def _load(self, data: str) -> Any:
        try:
            obj = json.loads(data)
        except ValueError:
            obj = None
        return obj if isinstance(obj, dict) else None


class OpenAIToGeminiStream(_GeminiClientStream):
    """OpenAI chunks -> Gemini chunks: text and reasoning pass through as they come;
    tool calls are gathered (Gemini sends each functionCall whole, E.4) and sent with
    the finishReason and usage in the last chunk."""

    def __init__(self, model: str, input_estimate: int = 0) -> None:
        super().__init__(model, input_estimate)
        self.calls: Dict[int, Dict[str, str]] = {}
        self.finish: Optional[str] = None
        self.usage: Optional[Dict[str, Any]] = None

    def feed(self, event: str, data: str) -> List[Tuple[str, str]]:
        if self.done:
            return []
        if data.strip() == "[DONE]":
            self.finish = self.finish or "stop"
            return self._end()
        obj = self._load(data)
        if obj is None:
            return self._fail(502, f"upstream sent a stream event that is not a JSON object: "
                                   f"{printable(data, 80)!r}")
        if obj.get("error"):
            return self._fail(*_upstream_error(obj))
        self.response_id = self.response_id or str(obj.get("id") or "")
        out = []
        for choice in (obj.get("choices") or [])[:1]:
            out += self._delta(choice.get("delta") or {})
            self.finish = choice.get("finish_reason") or self.finish
        if isinstance(obj.get("usage"), dict):
            self.usage = obj["usage"]
        return out + (self._end() if self.finish and self.usage else [])

    def _delta(self, delta: Dict[str, Any]) -> List[Tuple[str, str]]:
        parts = []
        reasoning = delta.get("reasoning_content") or delta.get("reasoning")
        if isinstance(reasoning, str) and reasoning:
            parts.append({"text": reasoning, "thought": True})
        if isinstance(delta.get("content"), str) and delta["content"]:
            parts.append({"text": delta["content"]})
        for item in delta.get("tool_calls") or []:
            call = self.calls.setdefault(item.get("index") or 0, {"id": "", "name": "", "arguments": ""})
            function = item.get("function") or {}
            call["id"] = call["id"] or str(item.get("id") or "")
            call["name"] = call["name"] or str(function.get("name") or "")
            arguments = function.get("arguments")
            call["arguments"] += arguments if isinstance(arguments, str) else _json_text(arguments or {})
        return [self._chunk(parts)] if parts else []

    def _end(self) -> List[Tuple[str, str]]:
        self.done = True
        parts = [_function_call_part(c["id"], c["name"], _tool_input(c["arguments"]))
                 for _, c in sorted(self.calls.items())]
        usage = gemini_usage_from_openai(self.usage) if self.usage else None
        return [self._chunk(parts, OPENAI_FINISH_TO_GEMINI.get(self.finish or "", "STOP"), usage)]

    def close(self) -> List[Tuple[str, str]]:
        if self.done:
            return []
        return self._end() if self.finish else self._fail(502, STREAM_CUT_SHORT)


class AnthropicToGeminiStream(_GeminiClientStream):
    """Anthropic events -> Gemini chunks: text and thinking deltas pass through, a
    signature as an empty thought part carrying it, each tool_use whole at its
    content_block_stop, finishReason and usage at message_stop."""

    def __init__(self, model: str, input_estimate: int = 0) -> None:
        super().__init__(model, input_estimate)
        self.tools: Dict[int, Dict[str, str]] = {}
        self.stop_reason = ""
        self.usage: Dict[str, Any] = {}

    def feed(self, event: str, data: str) -> List[Tuple[str, str]]:
        if self.done:
            return []
        obj = self._load(data)
        if obj is None:
            return self._fail(502, f"upstream sent a stream event that is not a JSON object: "
                                   f"{printable(data, 80)!r}")
        kind = obj.get("type") or event
        handler = getattr(self, "_on_" + str(kind), None)
        return handler(obj) if handler else []         # ping and unknown events: nothing

    def _on_error(self, obj: Dict[str, Any]) -> List[Tuple[str, str]]:
        return self._fail(*_upstream_error(obj))

    def _on_message_start(self, obj: Dict[str, Any]) -> List[Tuple[str, str]]:
        message = obj.get("message") or {}
        self.response_id = str(message.get("id") or "")
        self.usage.update(message.get("usage") or {})
        return []

    def _on_content_block_start(self, obj: Dict[str, Any]) -> List[Tuple[str, str]]:
        block = obj.get("content_block") or {}
        if block.get("type") == "tool_use":
            self.tools[obj.get("index", 0)] = {"id": str(block.get("id") or ""),
                                               "name": str(block.get("name")), "json": ""}
        return []

    def _on_content_block_delta(self, obj: Dict[str, Any]) -> List[Tuple[str, str]]:
        delta = obj.get("delta") or {}
        kind = delta.get("type")
        if kind == "input_json_delta" and obj.get("index", 0) in self.tools:
            self.tools[obj.get("index", 0)]["json"] += delta.get("partial_json") or ""
            return []
        part = {"text_delta": lambda: {"text": delta.get("text") or ""},
                "thinking_delta": lambda: {"text": delta.get("thinking") or "", "thought": True},
                "signature_delta": lambda: {"text": "", "thought": True,
                                            "thoughtSignature": delta.get("signature") or ""},
                }.get(kind)
        return [self._chunk([part()])] if part else []

    def _on_content_block_stop(self, obj: Dict[str, Any]) -> List[Tuple[str, str]]:
        tool = self.tools.pop(obj.get("index", 0), None)
        if tool is None:
            return []
        return [self._chunk([_function_call_part(tool["id"], tool["name"], _tool_input(tool["json"]))])]

    def _on_message_delta(self, obj: Dict[str, Any]) -> List[Tuple[str, str]]:
        self.stop_reason = (obj.get("delta") or {}).get("stop_reason") or self.stop_reason
        self.usage.update({k: v for k, v in (obj.get("usage") or {}).items() if v is not None})
        return []

    def _on_message_stop(self, obj: Dict[str, Any]) -> List[Tuple[str, str]]:
        self.done = True
        finish = ANTHROPIC_STOP_TO_GEMINI.get(self.stop_reason, "STOP")
        return [self._chunk([], finish, gemini_usage_from_anthropic(self.usage))]

    def close(self) -> List[Tuple[str, str]]:
        return [] if self.done else self._fail(502, STREAM_CUT_SHORT)


TRANSLATORS[("openai", "gemini")] = Translator(
    openai_to_gemini_request, gemini_to_openai_response, GeminiToOpenAIStream)
TRANSLATORS[("anthropic", "gemini")] = Translator(
    anthropic_to_gemini_request, gemini_to_anthropic_response, GeminiToAnthropicStream)
TRANSLATORS[("gemini", "openai")] = Translator(
    gemini_to_openai_request, openai_to_gemini_response, OpenAIToGeminiStream)
TRANSLATORS[("gemini", "anthropic")] = Translator(
    gemini_to_anthropic_request, anthropic_to_gemini_response, AnthropicToGeminiStream)


# =============================================================================
# 8. Routing
# Strategy: Router turns a Config into a plain dict from every routable model
# name to its targets, applies ampModelMappings, and answers lookups. Balancer
# holds the only mutable routing state (round-robin counters, cooldowns) and
# reads time from an injected clock. Neither does I/O.
# =============================================================================

@dataclasses.dataclass(frozen=True)
class Target:
    cred: Credential
    model: str                             # the upstream's model name
    max_output_tokens: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class Route:
    requested: str
    routed: str                            # after ampModelMappings
    mapping: Optional[Mapping]
    targets: Tuple[Target, ...]


def _excluded(cred: Credential, *names: str) -> bool:
    return any(fnmatch.fnmatchcase(n, pattern) for pattern in cred.excluded for n in names)


class Router:
    """Model name -> targets, built once per Config."""

    def __init__(self, config: Config):
        self.table: Dict[str, List[Target]] = {}
        self.wildcard_creds: List[Credential] = []
        for cred in config.credentials:
            entries = cred.models or tuple(ModelEntry(m, m) for m in self._builtin(cred.kind))
            for entry in entries:
                if _excluded(cred, entry.name, entry.alias):
                    continue
                target = Target(cred, entry.name, entry.max_output_tokens)
                self._add(entry.alias, target)
                if cred.prefix:
                    self._add(f"{cred.prefix}/{entry.alias}", target)
            if not cred.models and cred.kind in KIND_PREFIX:
                self.wildcard_creds.append(cred)
        self.exact_maps = {m.source: m for m in config.mappings if "*" not in m.source}
        self.wild_maps = [m for m in config.mappings if "*" in m.source]

    @staticmethod
    def _builtin(kind: str) -> Sequence[str]:
        return {"claude": BUILTIN_CLAUDE_MODELS, "gemini": BUILTIN_GEMINI_MODELS}.get(kind, ())

    def _add(self, name: str, target: Target) -> None:
        targets = self.table.setdefault(name, [])
        if target not in targets:
            targets.append(target)

    def lookup(self, name: str) -> List[Target]:
        """Every target serving `name`: listed names first, then keys serving claude-*/gemini-*."""
        found = list(self.table.get(name, ()))
        for cred in self.wildcard_creds:
            model = name
            if cred.prefix and model.startswith(cred.prefix + "/"):
                model = model[len(cred.prefix) + 1:]
            if model.startswith(KIND_PREFIX[cred.kind]) and not _excluded(cred, model):
                target = Target(cred, model)
                if all(t.cred is not cred for t in found):
                    found.append(target)
        return found

    def mapping_for(self, requested: str) -> Optional[Mapping]:
        """An exact `from` wins over a wildcard one; among wildcards, the first listed."""
        if requested in self.exact_maps:
            return self.exact_maps[requested]
        for mapping in self.wild_maps:
            if fnmatch.fnmatchcase(requested, mapping.source):
                return mapping
        return None

    def resolve(self, requested: str) -> Route:
        mapping = self.mapping_for(requested)
        if mapping and mapping.target != requested:
            targets = self.lookup(mapping.target)
            if targets:
                return Route(requested, mapping.target, mapping, tuple(targets))
        return Route(requested, requested, None, tuple(self.lookup(requested)))

    def names(self) -> List[str]:
        """Every routable name: listed models, prefixed forms and mapping sources."""
        names = list(self.table)
        names += [m.source for m in self.exact_maps.values()
                  if m.source not in self.table and self.lookup(m.target)]
        return names

    def nearest(self, requested: str) -> List[str]:
        return difflib.get_close_matches(requested, self.names(), n=3, cutoff=0.4)


@dataclasses.dataclass(frozen=True)
class Cooldown:
    until: float
    status: int
    reason: str


class Balancer:
    """Round-robin counters and cooldowns: the router's only mutable state."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._turn: Dict[str, int] = {}
        self.cooldowns: Dict[str, Cooldown] = {}

    def plan(self, route: Route, strategy: str) -> Tuple[List[Target], List[Tuple[Target, Cooldown]]]:
        """(targets to try in order, targets cooling down with why)."""
        now = self.clock()
        ready, cooling = [], []
        for target in route.targets:
            cool = self.cooldowns.get(target.cred.key)
            if cool and cool.until > now:
                cooling.append((target, cool))
            else:
                ready.append(target)
        if strategy == "round-robin" and len(ready) > 1:
            turn = self._turn.get(route.routed, 0)
            self._turn[route.routed] = turn + 1
            start = turn % len(ready)
            ready = ready[start:] + ready[:start]
        return ready, cooling

    def cool(self, cred: Credential, status: int, retry_after: Optional[float]) -> Optional[Cooldown]:
        """Rest a credential after 429 (Retry-After, capped) or 401/403 (5 minutes)."""
        if status == 429:
            seconds = min(COOLDOWN_RETRY_AFTER_CAP,
                          retry_after if retry_after is not None else COOLDOWN_DEFAULT)
            reason = "rate limited (429)"
        elif status in (401, 403):
            seconds, reason = COOLDOWN_AUTH, f"rejected the key ({status})"
        else:
            return None
        cool = Cooldown(self.clock() + seconds, status, reason)
        self.cooldowns[cred.key] = cool
        return cool


def describe_cooling(cooling: Sequence[Tuple[Target, Cooldown]], now: float,
                     wall: Optional[float] = None) -> str:
    """'every credential for this model is cooling down: ...' with which, why, until when."""
    wall = time.time() if wall is None else wall
    parts = []
    for target, cool in cooling:
        left = max(0.0, cool.until - now)
        when = time.strftime("%H:%M:%S", time.localtime(wall + left))
        parts.append(f"{target.cred.label} {cool.reason}, until {when} ({left:.0f}s)")
    return "every credential serving this model is cooling down: " + "; ".join(parts)


# =============================================================================
# 9. Upstream client
# Strategy: HTTP/1.1 to upstreams on the event loop itself, connections kept
# alive and reused through a pool keyed by (scheme, host, port, proxy); bodies
# framed by section 5's decoders. (http.client on worker threads cost ~700 us
# of CPU and two thread handoffs a request, and could not meet the latency and
# throughput targets.) Outbound proxies: http:// (CONNECT for https) and socks5://. Socket
# errors become UpstreamError with the fix in the message. Nothing here blocks
# the loop: proxy handshakes run on a worker thread.
# =============================================================================

@dataclasses.dataclass(frozen=True)
class ProxySpec:
    scheme: str                            # http | socks5 | socks5h
    host: str
    port: int
    username: str = ""
    password: str = ""

    @property
    def id(self) -> str:
        return f"{self.scheme}://{self.username}@{self.host}:{self.port}"

    def authorization(self) -> str:
        import base64
        raw = f"{urllib.parse.unquote(self.username)}:{urllib.parse.unquote(self.password)}"
        return "Basic " + base64.b64encode(raw.encode("utf-8")).decode("ascii")


def parse_proxy(url: str, username: str = "", password: str = "") -> Optional[ProxySpec]:
    if not url:
        return None
    parts = urllib.parse.urlsplit(url if "://" in url else "http://" + url)
    scheme = parts.scheme.lower()
    default_port = 1080 if scheme.startswith("socks") else 8080
    return ProxySpec(scheme, parts.hostname or "", parts.port or default_port,
                     parts.username or username, parts.password or password)


def system_proxy(scheme: str, host: str, environ: Dict[str, str]) -> str:
    """HTTPS_PROXY / HTTP_PROXY for this scheme unless NO_PROXY covers the host."""
    def env(name: str) -> str:
        return environ.get(name.lower()) or environ.get(name.upper()) or ""
    for entry in env("no_proxy").split(","):
        entry = entry.strip().lower()
        if entry == "*":
            return ""
        if entry and (host == entry.lstrip(".") or host.endswith("." + entry.lstrip("."))):
            return ""
    return env(f"{scheme}_proxy")


def make_ssl_context() -> ssl.SSLContext:
    """The system trust store; SSL_CERT_FILE / SSL_CERT_DIR are honoured (corporate CAs)."""
    context = ssl.create_default_context(cafile=os.environ.get("SSL_CERT_FILE") or None,
                                         capath=os.environ.get("SSL_CERT_DIR") or None)
    return context


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        more = sock.recv(n - len(data))
        if not more:
            raise OSError("SOCKS5 proxy closed the connection")
        data += more
    return data


SOCKS5_ERRORS = {1: "general failure", 2: "not allowed by ruleset", 3: "network unreachable",
                 4: "host unreachable", 5: "connection refused", 6: "TTL expired",
                 7: "command not supported", 8: "address type not supported"}


def socks5_connect(proxy: ProxySpec, host: str, port: int, timeout: float) -> socket.socket:
    """A TCP connection to host:port through a SOCKS5 proxy (RFC 1928, 1929)."""
    sock = socket.create_connection((proxy.host, proxy.port), timeout)
    try:
        user = urllib.parse.unquote(proxy.username).encode()
        methods = b"\x00\x02" if user else b"\x00"
        sock.sendall(b"\x05" + bytes([len(methods)]) + methods)
        _, method = _recv_exact(sock, 2)
        if method == 2:
            pw = urllib.parse.unquote(proxy.password).encode()
            sock.sendall(b"\x01" + bytes([len(user)]) + user + bytes([len(pw)]) + pw)
            if _recv_exact(sock, 2)[1] != 0:
                raise OSError("SOCKS5 proxy rejected the username or password")
        elif method != 0:
            raise OSError("SOCKS5 proxy offers no authentication method we support")
        name = host.encode("idna")
        sock.sendall(b"\x05\x01\x00\x03" + bytes([len(name)]) + name + struct.pack(">H", port))
        _, reply, _, atyp = _recv_exact(sock, 4)
        if reply != 0:
            raise OSError(f"SOCKS5 proxy could not connect: {SOCKS5_ERRORS.get(reply, reply)}")
        skip = {1: 4, 4: 16}.get(atyp)
        _recv_exact(sock, (skip if skip else _recv_exact(sock, 1)[0]) + 2)
        return sock
    except BaseException:
        sock.close()
        raise


def http_tunnel(proxy: ProxySpec, host: str, port: int, timeout: float) -> socket.socket:
    """A TCP connection to host:port through an HTTP proxy's CONNECT (RFC 9110 9.3.6).
    Blocking: run on a worker thread; the TLS handshake then happens on the loop."""
    sock = socket.create_connection((proxy.host, proxy.port), timeout)
    try:
        lines = [f"CONNECT {host}:{port} HTTP/1.1", f"Host: {host}:{port}"]
        if proxy.username:
            lines.append(f"Proxy-Authorization: {proxy.authorization()}")
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        head = b""
        while b"\r\n\r\n" not in head:
            more = sock.recv(4096)
            if not more or len(head) > MAX_HEADER_BLOCK:
                raise OSError("Tunnel connection failed: the proxy closed the connection")
            head += more
        status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or parts[1] != "200":
            raise OSError(f"Tunnel connection failed: {' '.join(parts[1:])}")
        if head.split(b"\r\n\r\n", 1)[1]:
            raise OSError("Tunnel connection failed: the proxy sent bytes after its answer")
        return sock
    except BaseException:
        sock.close()
        raise


@dataclasses.dataclass
class UpstreamRequest:
    method: str
    url: str
    headers: Dict[str, str]
    body: bytes
    provider: str = ""                     # for error messages
    proxy: Optional[ProxySpec] = None
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    first_byte_timeout: float = DEFAULT_FIRST_BYTE_TIMEOUT
    read_timeout: float = DEFAULT_READ_TIMEOUT


class _Link:
    """One upstream connection: asyncio streams plus a watchdog that aborts the
    transport after a silence longer than the current limit (cheaper than wrapping
    every read in asyncio.wait_for)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer
        self.loop = asyncio.get_running_loop()
        self.timed_out = False
        self._limit = 0.0
        self._last = 0.0
        self._timer: Optional[asyncio.TimerHandle] = None

    def arm(self, seconds: float) -> None:
        """Abort after `seconds` with no touch(). One timer per connection, re-armed only
        when it would fire too late: cheap enough to run for every request."""
        self._limit, self._last = seconds, self.loop.time()
        due = self._last + seconds
        if self._timer is not None and self._timer.when() > due:
            self._timer.cancel()
            self._timer = None
        if self._timer is None:
            self._timer = self.loop.call_at(due, self._check)

    def touch(self) -> None:
        self._last = self.loop.time()

    def disarm(self) -> None:
        self._limit = 0.0                  # the pending timer finds nothing to do

    def _check(self) -> None:
        self._timer = None
        if not self._limit:
            return
        silent = self.loop.time() - self._last
        if silent >= self._limit:
            self.timed_out = True
            self.writer.transport.abort()
        else:
            self._timer = self.loop.call_later(self._limit - silent, self._check)

    @property
    def usable(self) -> bool:
        """An idle connection the server has not closed (EOF arrives as at_eof)."""
        return not self.writer.transport.is_closing() and not self.reader.at_eof()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._limit = 0.0
        self.writer.transport.abort()


_RESPONSE_VALUE_BAD = re.compile(rb"[\x00\r\n]")


def parse_response_head(head: bytes) -> Tuple[str, int, List[Tuple[str, str]]]:
    """(version, status, lower-case headers) of an upstream response head.
    status-line = HTTP-version SP status-code SP [ reason-phrase ]   (RFC 9112 4)"""
    lines = head.lstrip(b"\r\n").rstrip(b"\r\n").split(b"\r\n")   # tolerate stray CRLFs
    parts = lines[0].decode("latin-1").split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise UpstreamError(f"upstream sent a malformed status line {printable(parts[0], 60)!r}")
    headers = []
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if colon and name and name[:1] not in (b" ", b"\t") and \
                not _RESPONSE_VALUE_BAD.search(value):   # a value with LF could forge a header
            headers.append((name.decode("latin-1").strip().lower(),
                            value.strip(b" \t").decode("latin-1")))
    return parts[0], int(parts[1]), headers


class UpstreamResponse:
    """A response whose body is still on the wire: read it with read1()/read_all(),
    then release() it to the pool, or abort() it."""

    def __init__(self, client: "UpstreamClient", key: tuple, link: _Link, version: str,
                 status: int, headers: List[Tuple[str, str]], req: UpstreamRequest):
        self._client, self._key, self._link, self.req = client, key, link, req
        self.status, self.headers = status, headers
        self.aborted = False
        self.done = False
        te = self.header("transfer-encoding").lower()
        length = self.header("content-length").strip()
        self._chunked = ChunkedDecoder(1 << 62) if "chunked" in te else None
        self._left = int(length) if length.isdigit() and not self._chunked else -1
        connection = self.header("connection").lower()
        self.will_close = "close" in connection or (version == "HTTP/1.0" and
                                                    "keep-alive" not in connection)
        if status in (204, 304) or req.method == "HEAD" or self._left == 0:
            self.done, self._left = True, 0
        elif self._left < 0 and not self._chunked:
            self.will_close = True         # delimited by the close of the connection
        link.arm(req.read_timeout)

    def header(self, name: str) -> str:
        for key, value in self.headers:
            if key == name:
                return value
        return ""

    @property
    def is_event_stream(self) -> bool:
        return self.header("content-type").split(";")[0].strip().lower() == "text/event-stream"

    async def read1(self) -> bytes:
        """The next body bytes as they arrive; b"" at the end; UpstreamError on failure."""
        while not self.done:
            want = READ_SIZE if self._left < 0 else min(READ_SIZE, self._left)
            try:
                data = await self._link.reader.read(want)
            except (ConnectionError, OSError) as exc:
                raise self._broken(type(exc).__name__) from None
            self._link.touch()
            if not data:
                if self._left < 0 and not self._chunked and not self._link.timed_out \
                        and not self.aborted:
                    self.done = True       # close-delimited: EOF is the end
                    return b""
                raise self._broken("closed early")
            if self._chunked is None:
                if self._left > 0:
                    self._left -= len(data)
                    self.done = self._left == 0
                return data
            try:
                out = b"".join(self._chunked.feed(data))
            except WireError as exc:
                self._link.close()
                raise UpstreamError(f"upstream sent invalid chunked framing ({exc.message})",
                                    502, self.req.provider) from None
            if self._chunked.done:
                self.done = True
                if self._chunked.unused:
                    self.will_close = True   # bytes after the body: never reuse
            if out:
                return out
        return b""

    def _broken(self, why: str) -> UpstreamError:
        """The error for a body that cannot be read to its end; the connection is closed."""
        self._link.close()
        if self.aborted:
            return UpstreamError("request aborted: the client went away", 499, self.req.provider)
        if self._link.timed_out:
            return UpstreamError(f"upstream sent nothing for {self.req.read_timeout:g}s "
                                 "(readTimeoutSeconds)", 504, self.req.provider)
        return UpstreamError(f"upstream connection broke mid-response ({why})", 502,
                             self.req.provider)

    async def read_all(self, limit: int, truncate: bool = False) -> bytes:
        """The whole body up to `limit` bytes: beyond, an error, or with `truncate` the
        first `limit` bytes."""
        parts, size = [], 0
        while True:
            data = await self.read1()
            if not data:
                break
            parts.append(data)
            size += len(data)
            if size > limit:
                self.abort()
                if truncate:
                    return b"".join(parts)[:limit]
                raise UpstreamError(f"upstream response larger than {size_text(limit)}",
                                    502, self.req.provider)
        self.release()
        return b"".join(parts)

    def release(self) -> None:
        """Back to the pool when the body was read to its end; closed otherwise."""
        if self.done and not self.will_close and not self.aborted:
            self._link.disarm()
            self._client._release(self._key, self._link)
        else:
            self._link.close()

    def abort(self) -> None:
        """Close the upstream connection now (the client went away, or the body is
        not wanted): the model stops spending tokens."""
        self.aborted = True
        self._link.close()


class UpstreamClient:
    """Keep-alive connections to upstreams, pooled by (scheme, host, port, proxy), all
    on the event loop. Outbound proxies: http:// (CONNECT tunnel for https) and socks5://;
    their handshakes run on a worker thread, TLS and HTTP on the loop."""

    def __init__(self, ssl_context: Optional[ssl.SSLContext] = None):
        self._ssl = ssl_context
        self._idle: Dict[tuple, List[_Link]] = {}
        self.opened = 0                    # connections ever opened: reuse is observable

    @property
    def ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:              # built on first use: it costs ~30 ms at start
            try:
                self._ssl = make_ssl_context()
            except (ssl.SSLError, OSError) as exc:
                raise UpstreamError(f"cannot load the CA certificates named by SSL_CERT_FILE / "
                                    f"SSL_CERT_DIR ({exc}): point them at a PEM bundle") from None
        return self._ssl

    def _take(self, key: tuple) -> Optional[_Link]:
        idle = self._idle.get(key)
        while idle:
            link = idle.pop()
            if link.usable:
                return link
            link.close()
        return None

    def _release(self, key: tuple, link: _Link) -> None:
        idle = self._idle.setdefault(key, [])
        if len(idle) < POOL_IDLE_PER_HOST and link.usable:
            idle.append(link)
        else:
            link.close()

    async def open(self, req: UpstreamRequest) -> UpstreamResponse:
        """Send the request; return once the status and headers arrived."""
        parts = urllib.parse.urlsplit(req.url)
        scheme, host = parts.scheme, parts.hostname or ""
        port = parts.port or (443 if scheme == "https" else 80)
        proxy = req.proxy
        absolute = bool(proxy and not proxy.scheme.startswith("socks") and scheme == "http")
        target = req.url if absolute else (parts.path or "/") + ("?" + parts.query if parts.query else "")
        headers = {"host": parts.netloc, "accept-encoding": "identity"}
        headers.update(req.headers)
        if absolute and proxy and proxy.username:
            headers["proxy-authorization"] = proxy.authorization()
        headers["content-length"] = str(len(req.body))
        fields = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        if "\n" in fields.replace("\r\n", "") or "\r" in fields.replace("\r\n", ""):
            raise UpstreamError("a header value for the upstream contains a line break; "
                                "check the headers and keys in the config", 500, req.provider)
        # Header values are octets (RFC 9110 5.5): non-ASCII config text goes out as UTF-8.
        wire = (f"{req.method} {target} HTTP/1.1\r\n{fields}\r\n").encode("utf-8")
        key = (scheme, host, port, proxy.id if proxy else "")
        where = f"{host}:{port}"
        for attempt in (0, 1):
            link = self._take(key)
            reused = link is not None
            if link is None:
                link = await self._connect(scheme, host, port, proxy, req, where)
            link.arm(req.first_byte_timeout)
            try:
                link.writer.write(wire + req.body)
                head = await self._read_head(link)
                version, status, resp_headers = parse_response_head(head)
                while 100 <= status < 200:          # interim answers carry no body
                    head = await self._read_head(link)
                    version, status, resp_headers = parse_response_head(head)
            except (asyncio.IncompleteReadError, ConnectionError, OSError) as exc:
                link.close()
                if link.timed_out:
                    raise UpstreamError(f"no answer from {where} within {req.first_byte_timeout:g}s "
                                        "(firstByteTimeoutSeconds: time to first byte)", 504,
                                        req.provider, req.url) from None
                partial = isinstance(exc, asyncio.IncompleteReadError) and exc.partial
                if reused and attempt == 0 and not partial:
                    continue               # the server dropped an idle connection: retry once
                raise UpstreamError(f"upstream at {where} closed the connection without "
                                    "answering", 502, req.provider, req.url) from None
            except (asyncio.LimitOverrunError, ValueError):
                link.close()
                raise UpstreamError(f"upstream at {where} sent a response head over "
                                    f"{MAX_HEADER_BLOCK} bytes", 502, req.provider, req.url) from None
            except (UpstreamError, asyncio.CancelledError):
                link.close()               # cancelled (client gone, shutdown): let it go
                raise
            return UpstreamResponse(self, key, link, version, status, resp_headers, req)
        raise AssertionError("unreachable")

    @staticmethod
    async def _read_head(link: _Link) -> bytes:
        head = await link.reader.readuntil(b"\r\n\r\n")
        if len(head) > MAX_HEADER_BLOCK:
            raise ValueError("response head over the limit")
        return head

    async def _connect(self, scheme: str, host: str, port: int, proxy: Optional[ProxySpec],
                       req: UpstreamRequest, where: str) -> _Link:
        loop = asyncio.get_running_loop()
        https = scheme == "https"
        tls = {"ssl": self.ssl_context, "server_hostname": host} if https else {}
        limit = MAX_HEADER_BLOCK * 2
        try:
            if proxy is None:
                opening = asyncio.open_connection(host, port, limit=limit, **tls)
            elif proxy.scheme.startswith("socks") or https:
                tunnel = socks5_connect if proxy.scheme.startswith("socks") else http_tunnel
                sock = await asyncio.wait_for(loop.run_in_executor(
                    None, tunnel, proxy, host, port, req.connect_timeout), req.connect_timeout)
                opening = asyncio.open_connection(sock=sock, limit=limit, **tls)
            else:
                opening = asyncio.open_connection(proxy.host, proxy.port, limit=limit)
            reader, writer = await asyncio.wait_for(opening, req.connect_timeout)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            raise connect_error(exc, req, where) from None
        self.opened += 1
        return _Link(reader, writer)

    def close(self) -> None:
        idle, self._idle = self._idle, {}
        for links in idle.values():
            for link in links:
                link.close()


def connect_error(exc: BaseException, req: UpstreamRequest, where: str) -> BaseException:
    """A failed connect as an UpstreamError whose message says what to check."""
    via = f" via proxy {req.proxy.host}:{req.proxy.port}" if req.proxy else ""
    if isinstance(exc, ConnectionRefusedError):
        return UpstreamError(f"refused connection at {where}{via}: is the server (Ollama, "
                             "vLLM, LiteLLM...) running, and is the port right?",
                             502, req.provider, req.url)
    if isinstance(exc, socket.gaierror):
        return UpstreamError(f"cannot resolve host '{where.rsplit(':', 1)[0]}'{via}: "
                             "check baseUrl and your network or proxyUrl", 502,
                             req.provider, req.url)
    if isinstance(exc, (asyncio.TimeoutError, socket.timeout)):
        return UpstreamError(f"no connection to {where}{via} within {req.connect_timeout:g}s "
                             "(connectTimeoutSeconds)", 504, req.provider, req.url)
    if isinstance(exc, ssl.SSLError):
        return UpstreamError(f"TLS to {where} failed ({exc}): behind a corporate proxy that "
                             "re-signs TLS, set SSL_CERT_FILE to its CA bundle", 502,
                             req.provider, req.url)
    if isinstance(exc, OSError) and "Tunnel connection failed" in str(exc):
        return UpstreamError(f"proxy{via} refused the tunnel to {where}: {exc} "
                             "(check proxyUrl, proxyUsername, proxyPassword)", 502,
                             req.provider, req.url)
    if isinstance(exc, OSError):
        return UpstreamError(f"connection to {where}{via} failed: {exc}", 502,
                             req.provider, req.url)
    return exc


# =============================================================================
# 10. Server
# Strategy: the asyncio edge. A connection reads bytes into a buffer, hands
# them to the wire functions, and writes what the request pipeline decides.
# The pipeline authenticates, parses the body, routes, translates, calls the
# upstream and relays the answer: whole, or event by event for streams.
# Errors become answers in the client's format; nothing here stops the server.
# =============================================================================

POST_ROUTES = {
    "/v1/chat/completions": "chat", "/v1/completions": "completions",
    "/v1/embeddings": "embeddings", "/v1/messages": "messages",
    "/v1/messages/count_tokens": "count_tokens",
}
GEMINI_METHODS = {"generateContent": "generate", "streamGenerateContent": "stream_generate",
                  "countTokens": "gemini_count_tokens"}
# Which operations each upstream kind serves, and under which path.
UPSTREAM_PATHS = {
    "openai": {"chat": "/chat/completions", "completions": "/completions",
               "embeddings": "/embeddings"},
    "claude": {"messages": "/v1/messages", "count_tokens": "/v1/messages/count_tokens"},
    "gemini": {"generate": "/v1beta/models/{model}:generateContent",
               "stream_generate": "/v1beta/models/{model}:streamGenerateContent",
               "gemini_count_tokens": "/v1beta/models/{model}:countTokens"},
}
LOCAL_COUNT_OPS = ("count_tokens", "gemini_count_tokens")
GENERATE_OPS = ("chat", "messages", "generate", "stream_generate")


def upstream_op(op: str, kind: str, stream: bool) -> str:
    """The upstream operation serving a client operation; "" when the kind has none."""
    if op in UPSTREAM_PATHS[kind]:
        return op
    if op in GENERATE_OPS:
        return {"openai": "chat", "claude": "messages",
                "gemini": "stream_generate" if stream else "generate"}[kind]
    return ""


class SSESource:
    """Upstream SSE bytes -> (event type, data) pairs."""

    def __init__(self) -> None:
        self._splitter = SSESplitter()

    def feed(self, data: bytes) -> List[Tuple[str, str]]:
        return [e for e in map(parse_sse_event, self._splitter.feed(data)) if e]

    def close(self) -> List[Tuple[str, str]]:
        return [e for e in map(parse_sse_event, self._splitter.close()) if e]


class BedrockSource:
    """Bedrock event-stream bytes -> the Anthropic (event type, data) pairs they carry."""

    def __init__(self) -> None:
        self._decoder = EventStreamDecoder()

    def feed(self, data: bytes) -> List[Tuple[str, str]]:
        return [e for e in (bedrock_event(h, p) for h, p in self._decoder.feed(data)) if e[0]]

    def close(self) -> List[Tuple[str, str]]:
        if self._decoder.pending:
            raise UpstreamError("Bedrock event stream ended inside a frame")
        return []


END_MARKER = {"anthropic": "message_stop", "openai": "a finish_reason", "gemini": "a finishReason"}
_OPENAI_FINISHED = re.compile(rb'"finish_reason"\s*:\s*"|^data:\s*\[DONE\]|^data:\s*\{\s*"error"', re.M)
_GEMINI_FINISHED = re.compile(rb'"finishReason"\s*:|^data:\s*\{\s*"error"', re.M)


def stream_finished(fmt: str, recent: Sequence[bytes]) -> bool:
    """Whether a relayed stream's last events include its format's proper end: Anthropic
    message_stop or error; OpenAI a finish_reason, [DONE] or an error chunk; Gemini a
    finishReason or an error. Decided on parsed fields, never on free text."""
    if fmt == "anthropic":
        last = parse_sse_event(recent[-1]) if recent else None
        return bool(last) and last[0] in ("message_stop", "error")
    pattern = _OPENAI_FINISHED if fmt == "openai" else _GEMINI_FINISHED
    return any(pattern.search(event) for event in recent)


def complete_json(data: str) -> bool:
    if data.strip() == "[DONE]":
        return True
    try:
        json.loads(data)
    except ValueError:
        return False
    return True


def with_provider(provider: str, event: str, data: str) -> str:
    """An error event's message with the provider's name before it (SPEC: errors); any
    other event unchanged. Cheap for the events that are not errors."""
    if event != "error" and not data.startswith('{"error"'):
        return data
    try:
        obj = json.loads(data)
        err = obj["error"]
        if isinstance(err, dict) and isinstance(err.get("message"), str) and provider \
                and not err["message"].startswith(provider + ": "):
            err["message"] = f"{provider}: {err['message']}"
            return dumps(obj).decode("utf-8")
    except (ValueError, KeyError, TypeError):
        pass
    return data


def early_stream_error(data: str) -> UpstreamError:
    """An Anthropic error event that arrived before anything else: an HTTP error instead."""
    try:
        err = json.loads(data).get("error") or {}
    except (ValueError, AttributeError):
        err = {}
    kind = err.get("type", "api_error") if isinstance(err, dict) else "api_error"
    status = {v: k for k, v in ANTHROPIC_ERROR_TYPES.items()}.get(kind, 502)
    return UpstreamError(str(err.get("message") if isinstance(err, dict) else err) or kind,
                         status, failover=status in FAILOVER_STATUSES)


def bedrock_count_answer(body: bytes) -> bytes:
    """CountTokens' {"inputTokens": N} as Anthropic's {"input_tokens": N}."""
    try:
        return dumps({"input_tokens": int(json.loads(body)["inputTokens"])})
    except (ValueError, KeyError, TypeError):
        raise UpstreamError("Bedrock CountTokens answered without inputTokens") from None


FORWARDED_HEADERS = {
    "openai": ("accept", "user-agent", "http-referer", "x-title", "openai-beta"),
    "claude": ("accept", "user-agent", "anthropic-beta"),
    "gemini": ("accept", "user-agent"),
}


def presented_key(req: Request) -> str:
    """The local key a client sent: Bearer, x-api-key, x-goog-api-key or ?key=."""
    auth = req.header("authorization")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    for name in ("x-api-key", "x-goog-api-key"):
        if name in req.headers:
            return req.headers[name].strip()
    if "key=" in req.query:
        return req.query_params().get("key", "")
    return ""


def key_matches(key: str, accepted: Sequence[str]) -> bool:
    """Constant-time comparison against every accepted key."""
    given = key.encode("utf-8")
    found = False
    for candidate in accepted:
        found |= hmac.compare_digest(given, candidate.encode("utf-8"))
    return found


def upstream_url(cred: Credential, op: str, model: str, stream: bool, query: str) -> str:
    path = UPSTREAM_PATHS[cred.kind][op].replace("{model}", urllib.parse.quote(model, safe=""))
    params = []
    if cred.kind == "gemini" and stream:
        params.append("alt=sse")
    if cred.kind == "claude" and "beta=true" in query.split("&"):
        params.append("beta=true")          # the SDK's client.beta.messages (A.1)
    return cred.base_url + path + ("?" + "&".join(params) if params else "")


def upstream_headers(cred: Credential, client: Dict[str, str]) -> Dict[str, str]:
    """Headers for the upstream: its auth, the client's API-relevant headers, then the
    credential's configured headers, which override. Client auth never passes."""
    headers = {"content-type": "application/json"}
    for name in FORWARDED_HEADERS[cred.kind]:
        if name in client:
            headers[name] = client[name]
    headers.setdefault("accept", "application/json")
    headers.setdefault("user-agent", f"proxypal/{__version__}")
    if cred.kind == "claude":
        headers["anthropic-version"] = client.get("anthropic-version") or DEFAULT_ANTHROPIC_VERSION
        if cred.api_key:
            headers["x-api-key"] = cred.api_key
            if urllib.parse.urlsplit(cred.base_url).hostname.endswith(".services.ai.azure.com"):
                headers["api-key"] = cred.api_key   # Foundry also reads api-key (G)
    elif cred.kind == "gemini":
        headers["x-goog-api-key"] = cred.api_key
    elif cred.api_key:
        headers["authorization"] = f"Bearer {cred.api_key}"
    for name, value in cred.headers:
        name = name.lower()
        if name.startswith("x-amz-"):      # AWS signing material: used to sign, never sent
            continue
        if name == "authorization":
            headers.pop("x-api-key", None)
            headers.pop("api-key", None)
        headers[name] = value
    return headers


def proxy_for(config: Config, cred: Credential, url: str,
              environ: Dict[str, str]) -> Optional[ProxySpec]:
    explicit = cred.proxy_url or config.proxy_url
    if explicit:
        return parse_proxy(explicit, config.proxy_username, config.proxy_password)
    if config.use_system_proxy:
        parts = urllib.parse.urlsplit(url)
        return parse_proxy(system_proxy(parts.scheme, parts.hostname or "", environ))
    return None


def upstream_hint(cred: Credential, status: int, url: str, body: bytes, model: str,
                  requested: str) -> str:
    """The seed's troubleshooting advice for an upstream error status."""
    if status in (401, 403):
        return f"check the apiKey of provider {cred.label}"
    if status != 404:
        return ""
    azure = (urllib.parse.urlsplit(cred.base_url).hostname or "").endswith(".azure.com")
    if b"DeploymentNotFound" in body or (azure and b"type\":\"error" not in body.replace(b" ", b"")):
        return (f"deployment '{model}' does not exist there: add model aliasing, e.g. "
                f'"models": [{{"name": "<deployment name>", "alias": "{requested}"}}]')
    try:
        json.loads(body)
        api_answered = True
    except ValueError:
        api_answered = False
    if api_answered and (b"model" in body.lower()):
        return (f"the upstream does not know model '{model}': check the names in "
                f"{cred.path}.models (aliases map client names to upstream names)")
    if cred.kind == "openai":
        advice = ("baseUrl must include the version segment, e.g. https://openrouter.ai/api/v1 "
                  "or http://localhost:11434/v1; the proxy appends /chat/completions")
    elif cred.kind == "claude":
        advice = ("give baseUrl without /v1, e.g. https://<resource>.services.ai.azure.com/"
                  "anthropic; the proxy appends /v1/messages")
    else:
        advice = "baseUrl should be https://generativelanguage.googleapis.com"
    return f"check baseUrl in {cred.path} (tried {url}): {advice}"


def bedrock_request(config: Config, target: Target, op: str, body: Dict[str, Any], stream: bool,
                    client: Dict[str, str], environ: Dict[str, str]) -> UpstreamRequest:
    """Bedrock's URL and body, signed with SigV4 (F.4), or carrying the apiKey as a
    Bedrock API key (F.3) when no AWS access key is configured."""
    cred = target.cred
    beta = client.get("anthropic-beta", "")
    payload = dumps(bedrock_count_body(body, beta) if op == "count_tokens"
                    else bedrock_body(body, beta))
    url = cred.base_url + bedrock_path(target.model, op, stream)
    accept = "x-amzn-bedrock-accept" if stream and op != "count_tokens" else "accept"
    sent = {"content-type": "application/json", accept: "application/json",
            "host": urllib.parse.urlsplit(url).netloc}
    creds = aws_credentials(cred.headers, environ)
    if creds:
        sent.update(sigv4_sign("POST", url, sent, payload, creds, cred.bedrock_region, amz_date()))
    elif cred.api_key:
        sent["authorization"] = f"Bearer {cred.api_key}"
    sent["user-agent"] = client.get("user-agent", f"proxypal/{__version__}")
    for name, value in cred.headers:       # e.g. X-Amzn-Bedrock-GuardrailIdentifier; unsigned
        if not name.lower().startswith("x-amz-") and name.lower() not in sent:
            sent[name.lower()] = value
    return UpstreamRequest("POST", url, sent, payload, cred.name,
                           proxy_for(config, cred, url, environ), config.connect_timeout,
                           config.first_byte_timeout, config.read_timeout)


def cors_headers(req: Request, config: Config) -> List[Tuple[str, str]]:
    """CORS for browser clients. With the public default key only loopback pages may
    call the proxy, so a web page cannot spend the user's upstream keys."""
    origin = req.header("origin")
    if not origin or not origin_allowed(origin, config):
        return []
    return [("Access-Control-Allow-Origin", origin), ("Vary", "Origin"),
            ("Access-Control-Expose-Headers", "request-id, x-request-id, retry-after")]


def origin_allowed(origin: str, config: Config) -> bool:
    """Pages on loopback always; other sites only when the public default key is off."""
    try:
        host = urllib.parse.urlsplit(origin).hostname or ""
    except ValueError:
        return False
    return is_loopback(host) or DEFAULT_LOCAL_KEY not in config.local_keys


def models_payload(router: Router, created: int) -> Dict[str, Any]:
    """/v1/models in a shape both the openai and the anthropic SDK parse."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created))
    data = [model_item(router, name, created, stamp) for name in router.names()]
    return {"object": "list", "data": data, "has_more": False,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None}


def gemini_models_payload(router: Router) -> Dict[str, Any]:
    """GET /v1beta/models in Gemini's shape, for Gemini CLI and the Google SDKs."""
    return {"models": [{"name": f"models/{name}", "baseModelId": name, "displayName": name,
                        "supportedGenerationMethods": ["generateContent", "streamGenerateContent",
                                                       "countTokens"]}
                       for name in router.names()]}


def model_item(router: Router, name: str, created: int, stamp: str) -> Dict[str, Any]:
    route = router.resolve(name)
    owner = route.targets[0].cred.name if route.targets else "proxypal"
    return {"id": name, "object": "model", "created": created, "owned_by": owner,
            "type": "model", "display_name": name, "created_at": stamp}


def percentile(values: Sequence[float], fraction: float) -> Optional[float]:
    """Nearest-rank percentile; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


class UsageStats:
    """Counters since start, per model and per provider: requests, errors by status,
    tokens, and latency / time-to-first-byte percentiles over the last USAGE_SAMPLES."""

    def __init__(self) -> None:
        self.started = time.time()
        self.groups: Dict[str, Dict[str, Dict[str, Any]]] = {"models": {}, "providers": {}}

    def record(self, model: str, provider: str, status: int, latency: float,
               ttfb: Optional[float], tokens_in: Optional[int], tokens_out: Optional[int]) -> None:
        for group, name in (("models", model), ("providers", provider)):
            if not name:
                continue
            entry = self.groups[group].setdefault(name, {
                "requests": 0, "errors": {}, "input_tokens": 0, "output_tokens": 0,
                "latency": collections.deque(maxlen=USAGE_SAMPLES),
                "ttfb": collections.deque(maxlen=USAGE_SAMPLES)})
            entry["requests"] += 1
            if status >= 400 or not status:
                key = str(status or "aborted")
                entry["errors"][key] = entry["errors"].get(key, 0) + 1
            entry["input_tokens"] += tokens_in or 0
            entry["output_tokens"] += tokens_out or 0
            entry["latency"].append(latency)
            if ttfb is not None:
                entry["ttfb"].append(ttfb)

    def snapshot(self) -> Dict[str, Any]:
        """The counters as JSON-ready data, latencies in milliseconds."""
        def ms(value: Optional[float]) -> Optional[float]:
            return None if value is None else round(value * 1000, 1)
        out: Dict[str, Any] = {"since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started))}
        for group, entries in self.groups.items():
            out[group] = {name: {
                "requests": e["requests"], "errors": dict(e["errors"]),
                "input_tokens": e["input_tokens"], "output_tokens": e["output_tokens"],
                "latency_ms": {"p50": ms(percentile(e["latency"], 0.5)),
                               "p95": ms(percentile(e["latency"], 0.95))},
                "ttfb_ms": {"p50": ms(percentile(e["ttfb"], 0.5)),
                            "p95": ms(percentile(e["ttfb"], 0.95))},
            } for name, e in sorted(entries.items())}
        return out


@dataclasses.dataclass
class Exchange:
    """One request in flight: what the pipeline knows about it so far."""
    conn: "Connection"
    req: Request
    fmt: str
    config: Config
    router: Router
    t0: float
    op: str = ""
    model: str = ""
    routed: str = ""
    provider: str = ""
    status: int = 0
    ttfb: Optional[float] = None
    error: str = ""
    started: bool = False                  # response headers already sent
    has_body: bool = False
    body_read: bool = False
    body: Dict[str, Any] = dataclasses.field(default_factory=dict)   # the parsed JSON request
    keep_alive: bool = True
    id: str = ""
    upstream_status: Optional[int] = None
    tokens_in: Optional[int] = None
    tokens_out: Optional[int] = None
    client_gone: bool = False
    on_gone: Callable[[], Any] = lambda: None   # what the client leaving should stop

    def count_tokens(self, found: Tuple[Optional[int], Optional[int]]) -> None:
        """Keep the latest token counts an answer or stream event reported."""
        if found[0] is not None:
            self.tokens_in = found[0]
        if found[1] is not None:
            self.tokens_out = found[1]


class Connection:
    """One client connection: buffered reads with the wire limits, and response writes."""

    def __init__(self, server: "Server", reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter):
        self.server, self.reader, self.writer = server, reader, writer
        peer = writer.get_extra_info("peername")
        self.peer = peer[0] if isinstance(peer, tuple) else "local"
        self.buf = b""
        self.busy = False
        self.eof = False
        self.expired = False                 # a timeout ended the input (see _arm)
        self.phase = ""
        self._deadline = math.inf
        self._timer: Optional[asyncio.TimerHandle] = None

    # Timeouts: one deadline per connection rather than asyncio.wait_for around each read
    # (a task per read). Its timer is moved only when the deadline comes earlier than the
    # timer; a timer that fires before the deadline just sets itself again. When the
    # deadline passes, reading stops and the pending read sees the end of input, with
    # `expired` saying why.
    def _arm(self, seconds: float, phase: str) -> None:
        loop = asyncio.get_running_loop()
        self.phase, self._deadline = phase, loop.time() + seconds
        if self._timer is not None and self._timer.when() > self._deadline:
            self._timer.cancel()
            self._timer = None
        if self._timer is None:
            self._timer = loop.call_at(self._deadline, self._expire)

    def disarm(self) -> None:
        self._deadline = math.inf           # the pending timer finds nothing to do

    def stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        self._timer = None
        loop = asyncio.get_running_loop()
        if self._deadline == math.inf:
            return
        if loop.time() < self._deadline:
            self._timer = loop.call_at(self._deadline, self._expire)
            return
        transport = self.writer.transport
        if self.phase == "write":          # a client that stopped reading: let it go
            transport.abort()
            return
        self.expired = True
        if not transport.is_closing():
            transport.pause_reading()       # nothing more is fed to the reader...
        self.reader.feed_eof()              # ...so its pending read can end now

    async def _read(self) -> bytes:
        data = await self.reader.read(READ_SIZE)
        if not data and not self.expired:
            self.eof = True
        return data

    async def read_head(self, first: bool) -> Optional[Request]:
        """The next request head; None when the client closed or idled out between requests."""
        self._arm(HEAD_TIMEOUT if first else KEEPALIVE_IDLE_TIMEOUT, "head" if first else "idle")
        while True:
            if self.buf[:1] in (b"\r", b"\n"):   # empty lines before a request are ignored
                self.buf = self.buf.lstrip(b"\r\n")   # (RFC 9112 section 2.2)
            if self.buf:
                if self.phase == "idle":     # first byte of a keep-alive request
                    self._arm(HEAD_TIMEOUT, "head")
                end = scan_head(self.buf)
                if end > 0:
                    self.disarm()
                    req = parse_request_head(self.buf[:end])
                    self.buf = self.buf[end:]
                    req.peer = self.peer
                    return req
            if self.eof:
                if self.buf:
                    raise WireError("connection closed in the middle of a request head")
                return None
            data = await self._read()
            if self.expired:
                if self.phase == "idle":
                    return None
                raise WireError(f"request head not received within {HEAD_TIMEOUT:g}s", 408)
            self.buf += data

    async def read_body(self, req: Request, limit: int) -> bytes:
        kind, length = req.framing
        if kind == "none":
            return b""
        if kind == "length" and length > limit:
            raise WireError(f"request body of {length} bytes is over the {size_text(limit)} "
                            "limit (maxBodyMb)", 413)
        expect = req.header("expect").lower()
        if expect:
            if expect != "100-continue":
                raise WireError(f"unsupported Expect {printable(expect, 40)!r}", 417)
            if req.version == "HTTP/1.1" and not self.buf:
                self.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if kind == "length":
            return await self._read_exact(length)
        decoder = ChunkedDecoder(limit)
        parts = decoder.feed(self.buf)
        self.buf = b""
        while not decoder.done:
            if self.eof:
                raise WireError("connection closed in the middle of a chunked body")
            data = await self._read_idle()
            if data:
                parts += decoder.feed(data)
        self.buf = decoder.unused
        return b"".join(parts)

    async def _read_exact(self, length: int) -> bytes:
        parts, have = [self.buf[:length]], len(self.buf[:length])
        self.buf = self.buf[length:]
        while have < length:
            data = await self._read_idle()
            if not data:
                raise WireError(f"connection closed after {have} of {length} body bytes")
            take = data[:length - have]
            parts.append(take)
            have += len(take)
            self.buf = data[len(take):]
        return b"".join(parts)

    async def _read_idle(self) -> bytes:
        self._arm(BODY_IDLE_TIMEOUT, "body")
        data = await self._read()
        self.disarm()
        if self.expired:
            raise WireError(f"request body stalled for {BODY_IDLE_TIMEOUT:g}s", 408)
        return data

    async def drain(self) -> None:
        """writer.drain(), but a client that reads nothing for CLIENT_WRITE_TIMEOUT is
        dropped rather than holding its stream (and the upstream's) forever."""
        if self.writer.transport.get_write_buffer_size() <= WRITE_BUFFER_HIGH:
            return await self.writer.drain()
        self._arm(CLIENT_WRITE_TIMEOUT, "write")
        try:
            await self.writer.drain()
        finally:
            self.disarm()

    async def watch_disconnect(self, on_gone: Callable[[], None]) -> None:
        """While a response streams, notice the client going away at once."""
        while len(self.buf) <= MAX_HEADER_BLOCK:
            data = await self.reader.read(READ_SIZE)
            if not data:
                self.eof = True
                on_gone()
                return
            self.buf += data               # a pipelined request: kept for later

    def send(self, ex: Exchange, status: int, body: bytes,
             headers: Sequence[Tuple[str, str]] = (), content_type: str = "application/json") -> None:
        ex.status = status
        if ex.has_body and not ex.body_read:
            ex.keep_alive = False          # the unread body would pass for the next request
        all_headers = [("Content-Type", content_type), ("Content-Length", str(len(body)))]
        all_headers += list(headers) + cors_headers(ex.req, ex.config)
        head = response_head(status, all_headers, ex.keep_alive, ex.req.version)
        self.writer.write(head if ex.req.method == "HEAD" else head + body)
        ex.started = True

    def send_error(self, ex: Exchange, exc: ProxypalError) -> None:
        ex.error = exc.message
        self.send(ex, exc.status, error_body(ex.fmt, exc.status, exc.message), exc.headers)


class Server:
    """A running proxy. Create with `await start(config)`; stop with `await close()`."""

    def __init__(self, config: Config, clock: Callable[[], float] = time.monotonic,
                 environ: Optional[Dict[str, str]] = None):
        check_exposure(config, config.host)
        self.config = config
        self.router = Router(config)
        self.balancer = Balancer(clock)
        self.client = UpstreamClient()
        self.environ = dict(os.environ if environ is None else environ)
        self.secret_filter = SecretFilter()
        self.secret_filter.secrets = config.secrets
        self.started_at = int(time.time())
        self.usage = UsageStats()
        self._requests = 0
        self._id_prefix = f"{os.getpid():x}-"
        self.host, self.port = config.host, config.port
        self.closing = False
        self.overrides: Dict[str, Any] = {}    # command-line values that beat the file
        self._watch: Optional[asyncio.Task] = None
        self._server: Optional[asyncio.AbstractServer] = None
        self._connections: Dict[asyncio.Task, Connection] = {}

    # -- lifecycle ---------------------------------------------------------------
    async def listen(self, host: str, port: int, reuse_port: bool = False,
                     sock: Optional[socket.socket] = None) -> None:
        check_exposure(self.config, host)
        if sock is not None:
            self._server = await asyncio.start_server(self._on_connection, sock=sock,
                                                      limit=MAX_HEADER_BLOCK * 2)
        else:
            self._server = await asyncio.start_server(self._on_connection, host, port,
                                                      limit=MAX_HEADER_BLOCK * 2,
                                                      reuse_port=reuse_port or None)
        self.host, self.port = host, self._server.sockets[0].getsockname()[1]
        log.addFilter(self.secret_filter)
        if self.config.path:
            self._watch = asyncio.get_running_loop().create_task(
                self._watch_config(self._config_stamp()))

    def apply(self, config: Config) -> None:
        """Switch to a new config: requests already running finish on the old one."""
        config = dataclasses.replace(config, **self.overrides)
        check_exposure(config, self.host)
        self.config, self.router = config, Router(config)
        self.secret_filter.secrets = config.secrets
        if log.handlers:                   # logging is main()'s: only adjust what it set up
            log.setLevel(logging.DEBUG if config.debug else logging.INFO)

    def reload(self) -> bool:
        """Read the config file again; an invalid file keeps the running config."""
        if not self.config.path:
            log.warning("reload asked, but this proxy was started from a config object, "
                        "not a file: nothing to reload")
            return False
        try:
            config = load_config(self.config.path)
            if not config.loaded:
                raise ConfigError("", f"{self.config.path} is missing")
            self.apply(config)
        except ConfigError as exc:
            log.error("config reload failed, keeping the running config: %s", exc.message)
            return False
        except Exception:                  # a bug must not stop future reloads
            log.exception("config reload failed, keeping the running config")
            return False
        log.info("config reloaded from %s: %d providers, %d models", config.path,
                 len(config.credentials), len(self.router.names()))
        return True

    def _config_stamp(self) -> Tuple[int, int]:
        try:
            info = os.stat(self.config.path)
            return info.st_mtime_ns, info.st_size
        except OSError:
            return 0, 0

    async def _watch_config(self, seen: Tuple[int, int]) -> None:
        """Poll the config file's mtime and size (no watcher dependency)."""
        while True:
            await asyncio.sleep(CONFIG_POLL_SECONDS)
            now = self._config_stamp()
            if now != seen and now != (0, 0):
                seen = now
                self.reload()

    async def close(self, grace: float = SHUTDOWN_GRACE) -> None:
        """Stop accepting, let in-flight requests finish for up to `grace` s, then stop."""
        self.closing = True
        if self._watch is not None:
            self._watch.cancel()
        if self._server is not None:
            self._server.close()
        for task, conn in list(self._connections.items()):
            if not conn.busy:
                task.cancel()
        busy = [t for t, c in self._connections.items() if c.busy]
        if busy:
            await asyncio.wait(busy, timeout=grace)
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.wait(list(self._connections), timeout=1.0)
        self.client.close()
        log.removeFilter(self.secret_filter)

    # -- connections -------------------------------------------------------------
    async def _on_connection(self, reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        conn = Connection(self, reader, writer)
        self._connections[task] = conn
        try:
            await self._serve_connection(conn)
        except (ConnectionError, asyncio.CancelledError):
            pass
        except Exception:                  # a bug: keep serving other connections
            log.exception("unexpected error on a connection from %s", conn.peer)
        finally:
            self._connections.pop(task, None)
            conn.stop_timer()
            await self._linger_close(conn)

    @staticmethod
    async def _linger_close(conn: Connection) -> None:
        """Close after the answer is out. Unread request bytes left in the socket would make
        the kernel reset the connection and drop that answer, so read and discard them
        for a moment first (a 'lingering close', as Apache and nginx do)."""
        writer = conn.writer
        try:
            if not conn.eof and not writer.transport.is_closing() and writer.can_write_eof():
                writer.write_eof()
                deadline = asyncio.get_running_loop().time() + LINGER_SECONDS
                while await asyncio.wait_for(conn.reader.read(READ_SIZE),
                                             deadline - asyncio.get_running_loop().time()):
                    pass
        except (asyncio.TimeoutError, ConnectionError, OSError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _serve_connection(self, conn: Connection) -> None:
        first = True
        while not self.closing:
            config, router = self.config, self.router
            ex = None
            try:
                req = await conn.read_head(first)
                if req is None:
                    return
                conn.busy = True
                self._requests += 1
                ex = Exchange(conn, req, client_format(req.path, req.headers), config, router,
                              time.monotonic(), id=f"{self._id_prefix}{self._requests:x}")
                ex.keep_alive = req.keep_alive
                req.framing = body_framing(req)      # refused before any route looks at it
                ex.has_body = req.framing[0] != "none"
                await self.handle(ex)
            except WireError as exc:
                if ex is None:
                    path = guess_path(conn.buf)
                    ex = Exchange(conn, Request("GET", path, path, "", "HTTP/1.1", {}, [], False),
                                  client_format(path), config, router, time.monotonic())
                ex.keep_alive = False
                if not ex.started:
                    conn.send_error(ex, exc)
            finally:
                conn.busy = False
            try:
                await conn.drain()
            except ConnectionError:
                ex = ex and dataclasses.replace(ex, keep_alive=False)
                conn.eof = True
            if ex is not None:
                self._log_request(ex)
            if not ex or not ex.keep_alive or conn.eof:
                return
            first = False

    # -- the request pipeline ----------------------------------------------------
    async def handle(self, ex: Exchange) -> None:
        req = ex.req
        try:
            self._check_target(req)
            if self.closing:
                ex.keep_alive = False
            if req.method == "OPTIONS":
                return self._preflight(ex)
            await self._route(ex)
        except WireError:
            raise
        except ProxypalError as exc:
            self._fail(ex, exc)
        except Exception as exc:           # a bug: answer 500 and keep serving
            log.exception("unexpected error handling %s %s", req.method, printable(req.path))
            self._fail(ex, ProxypalError(f"internal error in proxypal ({type(exc).__name__}); "
                                         "see the proxy's log", 500))

    def _fail(self, ex: Exchange, exc: ProxypalError) -> None:
        if not ex.started:
            ex.conn.send_error(ex, exc)
        else:
            ex.error = exc.message
            ex.keep_alive = False

    def _check_target(self, req: Request) -> None:
        """Origin-form only, or absolute-form naming this server: never an open proxy."""
        if req.method == "CONNECT":
            raise WireError("CONNECT is refused: proxypal is an API proxy, not a forward proxy", 405)
        if req.target.startswith(("http://", "https://")):
            parts = urllib.parse.urlsplit(req.target)
            if not (is_loopback(parts.hostname or "") or parts.hostname == self.host):
                raise WireError(f"absolute-form request for another host "
                                f"{printable(parts.hostname or '', 60)!r} is refused: proxypal "
                                "is not a forward proxy")
            req.path, req.query = parts.path or "/", parts.query
        elif not req.target.startswith("/") and not (req.method == "OPTIONS" and req.target == "*"):
            raise WireError(f"invalid request target {printable(req.target, 60)!r}")

    def _preflight(self, ex: Exchange) -> None:
        headers = cors_headers(ex.req, ex.config)
        if headers:
            asked = ex.req.header("access-control-request-headers")
            headers += [("Access-Control-Allow-Methods", "GET, POST, OPTIONS"),
                        ("Access-Control-Allow-Headers", asked or "authorization, content-type, "
                         "x-api-key, anthropic-version, anthropic-beta"),
                        ("Access-Control-Max-Age", "600")]
        ex.status = 204
        if ex.has_body:                    # never read: it must not pass for a request
            ex.keep_alive = False
        ex.conn.writer.write(response_head(204, headers, ex.keep_alive, ex.req.version))
        ex.started = True

    async def _route(self, ex: Exchange) -> None:
        req = ex.req
        path = strip_amp_prefix(req.path)
        if path == "/health" and req.method in ("GET", "HEAD"):
            return ex.conn.send(ex, 200, b'{"status":"ok"}')
        if path.startswith("/v0/management"):
            return await self._management(ex, path)
        self._authenticate(ex)
        if req.method in ("GET", "HEAD"):
            if path.rstrip("/") == "/v1beta/models":
                return ex.conn.send(ex, 200, dumps(gemini_models_payload(ex.router)))
            if path in ("/v1/models", "/v1/models/"):
                return ex.conn.send(ex, 200, dumps(models_payload(ex.router, self.started_at)))
            if path.startswith("/v1/models/"):
                return self._one_model(ex, urllib.parse.unquote(path[len("/v1/models/"):]))
        if req.method == "POST":
            op, model = self._operation(path)
            if op:
                ex.op = op
                body = await ex.conn.read_body(req, int(ex.config.max_body_mb * 1024 * 1024))
                ex.body_read = True
                return await self._model_request(ex, op, body, model)
        raise self._no_route(req, path)

    @staticmethod
    def _operation(path: str) -> Tuple[str, str]:
        """(operation, model from the path or "") for a POST path; ("", "") if unknown."""
        if path in POST_ROUTES:
            return POST_ROUTES[path], ""
        if path.startswith("/v1beta/models/") and ":" in path:
            model, _, method = path[len("/v1beta/models/"):].rpartition(":")
            if method in GEMINI_METHODS and model:
                return GEMINI_METHODS[method], urllib.parse.unquote(model)
        return "", ""

    @staticmethod
    def _no_route(req: Request, path: str) -> ProxypalError:
        known = ["POST /v1/chat/completions", "POST /v1/messages", "GET /v1/models"]
        if path.rstrip("/") in ("/chat/completions", "/messages", "/models", "/embeddings"):
            return ClientError(f"no route {req.method} {printable(path, 80)}: set your client's "
                               "base URL to http://HOST:PORT/v1 for OpenAI clients, or "
                               "http://HOST:PORT (no /v1) for Anthropic clients", 404)
        allowed = {"/v1/models": "GET, HEAD", "/health": "GET, HEAD"}
        for p in list(POST_ROUTES):
            allowed[p] = "POST"
        if path in allowed:
            return ClientError(f"method {req.method} is not allowed on {path}; use "
                               f"{allowed[path]}", 405, [("Allow", allowed[path])])
        return ClientError(f"no route {req.method} {printable(path, 80)}; this proxy serves "
                           f"{', '.join(known)} and the Gemini /v1beta routes", 404)

    def _authenticate(self, ex: Exchange) -> None:
        origin = ex.req.header("origin")
        if origin and not origin_allowed(origin, ex.config):
            # A web page the user visits must not spend their keys with the public local
            # key, not even through a 'simple' request that skips the CORS preflight.
            raise ProxypalError(f"requests from the web page {printable(origin, 80)!r} are "
                                f"refused while the public key {DEFAULT_LOCAL_KEY!r} is "
                                'accepted: set "proxyApiKey" to a secret to allow them', 403)
        key = presented_key(ex.req)
        if not key:
            raise ProxypalError("missing API key: send 'Authorization: Bearer <key>' or "
                                "'x-api-key: <key>' with the proxy's key (proxyApiKey in "
                                "config.json; default proxypal-local)", 401)
        if not key_matches(key, ex.config.local_keys):
            raise ProxypalError("invalid API key: use the proxy's own key (proxyApiKey or "
                                "apiKeys in config.json), not an upstream's", 401)

    def _one_model(self, ex: Exchange, name: str) -> None:
        route = ex.router.resolve(name)
        if not route.targets:
            raise self._unknown_model(ex, name)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started_at))
        ex.conn.send(ex, 200, dumps(model_item(ex.router, name, self.started_at, stamp)))

    def _unknown_model(self, ex: Exchange, name: str) -> ProxypalError:
        if not ex.config.credentials:
            where = ex.config.path or default_config_path()
            state = "" if ex.config.loaded else " (the file does not exist)"
            return ProxypalError(f"no auth available: no provider is configured; add one to "
                                 f"{where}{state} (claudeApiKeys, geminiApiKeys or "
                                 "ampOpenaiProviders); the proxy picks the change up within "
                                 "seconds", 503)
        near = ex.router.nearest(name)
        hint = f"; did you mean {', '.join(repr(n) for n in near)}?" if near else \
            "; GET /v1/models lists the names this proxy serves"
        return ClientError(f"Invalid model {printable(name, 100)!r}: it is not in any provider's "
                           f"models list{hint}", 404)

    # -- model requests ----------------------------------------------------------
    async def _model_request(self, ex: Exchange, op: str, raw: bytes, path_model: str) -> None:
        body = self._json_body(raw)
        model = path_model or body.get("model")
        if not isinstance(model, str) or not model.strip():
            raise ClientError('"model" is required and must be a non-empty string'
                              + ("" if "model" not in body else f", got {_short(model)}"))
        if "stream" in body and not isinstance(body["stream"], bool):
            raise ClientError(f'"stream" must be true or false, got {_short(body["stream"])}')
        stream = body.get("stream") is True or op == "stream_generate"
        ex.model, ex.body = model, body
        route = ex.router.resolve(model)
        if not route.targets:
            raise self._unknown_model(ex, model)
        ex.routed = route.routed
        usable = tuple(t for t in route.targets if (ex.fmt, KIND_FORMAT[t.cred.kind]) in TRANSLATORS
                       and (upstream_op(op, t.cred.kind, stream) or op in LOCAL_COUNT_OPS))
        if usable and not upstream_op(op, usable[0].cred.kind, stream):
            ex.provider = usable[0].cred.name      # an upstream that cannot count: estimate here
            return ex.conn.send(ex, 200, dumps(local_count(op, body)))
        if not usable:
            first = route.targets[0].cred
            raise ClientError(f"model {model!r} is served by {first.label}, which speaks the "
                              f"{KIND_FORMAT[first.kind]} API; {ex.req.path} cannot reach it: "
                              "call that provider's endpoint instead")
        if usable != route.targets:
            route = Route(route.requested, route.routed, route.mapping, usable)
        ready, cooling = self.balancer.plan(route, ex.config.routing_strategy)
        if not ready:
            raise self._cooling_error(cooling)
        retries = usable[0].cred.request_retry
        attempts = ready[:1 + (ex.config.request_retry if retries is None else retries)]
        log.debug("route %s -> %s via %s", printable(model), route.routed,
                  ", ".join(t.cred.label for t in attempts))
        await self._try_targets(ex, attempts, body, stream, route)

    @staticmethod
    def _json_body(raw: bytes) -> Dict[str, Any]:
        if not raw.strip():
            raise ClientError("request body is empty; send a JSON object")
        try:
            body = json.loads(raw)
        except UnicodeDecodeError:
            raise ClientError("request body is not UTF-8 JSON") from None
        except json.JSONDecodeError as exc:
            raise ClientError(f"request body is not valid JSON: {exc.msg} at line {exc.lineno}, "
                              f"column {exc.colno}") from None
        if not isinstance(body, dict):
            raise ClientError(f"request body must be a JSON object, got {_json_type(body)}")
        return body

    def _cooling_error(self, cooling: Sequence[Tuple[Target, Cooldown]]) -> ProxypalError:
        now = self.balancer.clock()
        soonest = min(c.until for _, c in cooling)
        status = 429 if all(c.status == 429 for _, c in cooling) else 503
        return ProxypalError(describe_cooling(cooling, now), status,
                             [("Retry-After", str(max(1, int(soonest - now + 0.999))))])

    async def _try_targets(self, ex: Exchange, attempts: Sequence[Target], body: Dict[str, Any],
                           stream: bool, route: Route) -> None:
        """Streams watch the client from the start: a client that leaves while the model
        is still thinking (Claude Code's Esc) cancels the upstream request at once."""
        if not stream:
            return await self._attempt(ex, attempts, body, stream, route)
        task = asyncio.current_task()

        def gone() -> None:
            ex.client_gone = True
            ex.on_gone()
        ex.on_gone = task.cancel
        watcher = asyncio.get_running_loop().create_task(ex.conn.watch_disconnect(gone))
        try:
            await self._attempt(ex, attempts, body, stream, route)
        except asyncio.CancelledError:
            if not ex.client_gone:
                raise                      # shutdown
            ex.error, ex.keep_alive = "client disconnected", False
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)

    async def _attempt(self, ex: Exchange, attempts: Sequence[Target], body: Dict[str, Any],
                       stream: bool, route: Route) -> None:
        last_error: Optional[UpstreamError] = None
        for i, target in enumerate(attempts):
            more = i + 1 < len(attempts)
            ureq = self._upstream_request(ex, target, body, stream)
            ex.provider = target.cred.name
            log.debug("upstream %s %s (%s)", ureq.method, ureq.url, target.cred.label)
            try:
                resp = await self.client.open(ureq)
            except UpstreamError as exc:
                last_error = exc
                log.warning("%s: %s", target.cred.label, exc.message)
                if more and exc.failover:
                    continue
                raise UpstreamError(f"provider {target.cred.label} {exc.message}", exc.status,
                                    target.cred.name, ureq.url) from None
            ex.ttfb, ex.upstream_status = time.monotonic() - ex.t0, resp.status
            if resp.status in FAILOVER_STATUSES:
                self.balancer.cool(target.cred, resp.status,
                                   retry_after_seconds(resp.header("retry-after")))
                if more:
                    log.warning("%s answered %d; trying the next credential", target.cred.label,
                                resp.status)
                    resp.abort()
                    continue
            try:
                return await self._deliver(ex, target, resp, stream, route)
            except asyncio.CancelledError:
                resp.abort()
                raise
            except UpstreamError as exc:
                if ex.started:
                    raise
                raise UpstreamError(f"{target.cred.name}: {exc.message}", exc.status,
                                    target.cred.name, ureq.url) from None
        raise last_error or UpstreamError("no credential could be tried")

    def _upstream_request(self, ex: Exchange, target: Target, body: Dict[str, Any],
                          stream: bool) -> UpstreamRequest:
        cred, config = target.cred, ex.config
        translator = TRANSLATORS[(ex.fmt, KIND_FORMAT[cred.kind])]
        op = upstream_op(ex.op, cred.kind, stream)
        if ex.fmt == "gemini" and cred.kind != "gemini":
            body = dict(body, stream=stream)   # Gemini clients choose streaming by path
        out = translator.request(body) if translator.request else dict(body)
        if ex.fmt == "anthropic" and cred.kind == "claude":
            drop_unsigned_thinking(out)
        if translator.request and cred.kind == "openai" and "max_tokens" in out and \
                urllib.parse.urlsplit(cred.base_url).hostname == "api.openai.com":
            # OpenAI itself takes only max_completion_tokens from its reasoning models
            # (B.2); every other OpenAI-compatible server knows max_tokens.
            out.setdefault("max_completion_tokens", out.pop("max_tokens"))
        if cred.kind != "gemini":
            out["model"] = target.model
            if ex.fmt == "gemini":
                out["stream"] = stream
        clamp_output_tokens(out, target.max_output_tokens)
        headers = upstream_headers(cred, ex.req.headers)
        if cred.bedrock_region:
            return bedrock_request(config, target, op, out, stream, ex.req.headers, self.environ)
        url = upstream_url(cred, op, target.model, stream, ex.req.query)
        return UpstreamRequest(
            "POST", url, headers, dumps(out), cred.name,
            proxy_for(config, cred, url, self.environ), config.connect_timeout,
            config.first_byte_timeout, config.read_timeout)

    async def _deliver(self, ex: Exchange, target: Target, resp: UpstreamResponse,
                       stream: bool, route: Route) -> None:
        cred = target.cred
        upstream_fmt = KIND_FORMAT[cred.kind]
        translator = TRANSLATORS[(ex.fmt, upstream_fmt)]
        if resp.status >= 400:
            body = await resp.read_all(MAX_UPSTREAM_ERROR_BODY, truncate=True)
            status = resp.status
            if cred.bedrock_region:
                if ex.op == "count_tokens":     # CountTokens is missing for some models
                    return ex.conn.send(ex, 200, dumps(local_count(ex.op, ex.body)))
                status, body = bedrock_error(status, resp.header("x-amzn-errortype"), body)
            hint = upstream_hint(cred, status, resp.req.url, body, target.model, route.requested)
            ex.error = f"{cred.name}: {upstream_message(body)[0]}"
            out = upstream_error_body(ex.fmt, upstream_fmt, status, body, cred.name, hint)
            out = mask_secrets(out.decode("utf-8", "replace"), ex.config.secrets,
                               patterns=False).encode("utf-8")
            ex.error = mask_secrets(ex.error, ex.config.secrets)   # upstreams echo keys back
            return ex.conn.send(ex, status, out, self._passed_headers(resp))
        content_type = resp.header("content-type").split(";")[0].strip().lower()
        if content_type == "application/vnd.amazon.eventstream":
            return await self._relay_events(ex, resp, BedrockSource(), translator, route)
        if resp.is_event_stream:
            if translator.stream is None:
                return await self._relay_stream(ex, resp)
            return await self._relay_events(ex, resp, SSESource(), translator, route)
        body = await resp.read_all(MAX_UPSTREAM_BODY)
        if cred.bedrock_region and ex.op == "count_tokens":
            body = bedrock_count_answer(body)
        try:
            obj = json.loads(body)
        except ValueError:
            obj = None
        if translator.response is not None:
            if not isinstance(obj, dict):
                raise UpstreamError(f"answered with something that is not a JSON object: "
                                    f"{printable(body.decode('utf-8', 'replace'), 120)!r}")
            obj = translator.response(obj, route.requested)
            body = dumps(obj)
        elif isinstance(obj, dict) and ex.fmt != "gemini" and \
                isinstance(obj.get("model"), str) and obj["model"] != route.requested:
            obj["model"] = route.requested     # the name the client asked for
            body = dumps(obj)
        ex.count_tokens(usage_tokens(obj))
        ex.conn.send(ex, resp.status, body, self._passed_headers(resp),
                     "application/json" if translator.response else
                     resp.header("content-type") or "application/json")

    @staticmethod
    def _passed_headers(resp: UpstreamResponse) -> List[Tuple[str, str]]:
        """The upstream's own headers worth passing on (request ids, rate limits)."""
        return [(k, v) for k, v in resp.headers if k not in HOP_BY_HOP and k not in OWN_HEADERS]

    async def _relay_stream(self, ex: Exchange, resp: UpstreamResponse) -> None:
        """Same format on both sides: relay the SSE bytes event by event, untouched; each
        complete event is written as soon as it arrived. A stream that ends without its
        format's last event gets an error event, not a quiet truncation."""
        splitter = SSESplitter()
        recent: List[bytes] = []            # the last few events: where the end markers are

        def relay(data: bytes) -> bytes:
            nonlocal recent
            events = splitter.feed(data)
            real = [e for e in events if not (e[:1] == b":" and b"data" not in e)]   # no comments
            if real:
                recent = (recent + real)[-3:]
            return b"".join(events)

        def finish() -> bytes:
            out = b""
            for tail in splitter.close():  # a last event left without its blank line
                parsed = parse_sse_event(tail)
                if parsed and complete_json(parsed[1]):
                    out, recent[:] = tail + b"\n\n", (recent + [tail])[-3:]
            if stream_finished(ex.fmt, recent):
                return out
            ex.error = "upstream ended the stream before its end"
            return out + stream_error_event(ex.fmt, 502, f"{ex.provider}: upstream ended the "
                                                         f"stream before {END_MARKER[ex.fmt]}")
        await self._stream(ex, resp, resp.header("content-type"), relay, finish)

    async def _relay_events(self, ex: Exchange, resp: UpstreamResponse, source: Any,
                            translator: Translator, route: Route) -> None:
        """A stream that must be decoded (Bedrock frames) or translated: upstream bytes ->
        upstream events -> client events, each written as soon as it exists."""
        factory = translator.stream or AnthropicEventRelay
        events = factory(route.requested, estimate_tokens(ex.body))

        def encode(incoming: List[Tuple[str, str]], closing: bool) -> bytes:
            out: List[Tuple[str, str]] = []
            for event, text in incoming:
                out += events.feed(event, text)
            if closing:
                out += events.close()
            return b"".join(encode_event(ex.fmt, e, with_provider(ex.provider, e, d))
                            for e, d in out)

        def early(data: bytes) -> bytes:
            incoming = source.feed(data)
            if incoming and incoming[0][0] == "error":   # failed before the stream began
                raise early_stream_error(incoming[0][1])
            return encode(incoming, False)
        await self._stream(ex, resp, "text/event-stream", lambda d: encode(source.feed(d), False),
                           lambda: encode(source.close(), True), early)

    async def _stream(self, ex: Exchange, resp: UpstreamResponse, content_type: str,
                      relay: Callable[[bytes], bytes], finish: Callable[[], bytes],
                      first: Optional[Callable[[bytes], bytes]] = None) -> None:
        """The streaming skeleton: await the upstream's first bytes (so an early failure is
        still an HTTP error), send the head, then write what relay() makes of each read
        and what finish() adds at the end. A client that goes away aborts the upstream."""
        conn = ex.conn
        ex.on_gone = resp.abort            # the client leaving now ends the upstream read
        chunked = ex.req.version == "HTTP/1.1"
        try:
            data = await resp.read1()
            if not data:
                raise UpstreamError("upstream ended the stream before sending any event", 502)
            out = (first or relay)(data)
            ex.keep_alive = ex.keep_alive and chunked
            headers = [("Content-Type", content_type), ("Cache-Control", "no-cache"),
                       ("X-Accel-Buffering", "no")]
            headers += [("Transfer-Encoding", "chunked")] if chunked else []
            headers += self._passed_headers(resp) + cors_headers(ex.req, ex.config)
            head = response_head(200, headers, ex.keep_alive, ex.req.version)
            ex.started, ex.status = True, resp.status
            keepalive = ex.config.stream_keepalive_seconds or None
            while data:
                if out or head:            # the head goes out with the first event
                    conn.writer.write(head + (chunk(out) if chunked and out else out))
                    head = b""
                    ex.count_tokens(stream_usage(out))
                    await conn.drain()
                if keepalive:
                    data = await self._read_or_ping(ex, resp, keepalive, chunked)
                else:
                    data = await resp.read1()
                out = relay(data) if data else finish()
            if out:
                self._write_event(conn, chunked, out)
                ex.count_tokens(stream_usage(out))
            if chunked:
                conn.writer.write(b"0\r\n\r\n")
            resp.release()
        except UpstreamError as exc:
            resp.abort()
            if not ex.started:
                raise
            ex.error, ex.keep_alive = exc.message, False
            if exc.status != 499 and not conn.writer.transport.is_closing():
                self._write_event(conn, chunked, stream_error_event(
                    ex.fmt, exc.status, f"{ex.provider}: {exc.message}"))
                if chunked:
                    conn.writer.write(b"0\r\n\r\n")
        except ConnectionError:            # the client went away while we wrote
            resp.abort()
            ex.error, ex.keep_alive = "client disconnected", False
        except asyncio.CancelledError:     # shutdown, or the client left: the upstream ends too
            resp.abort()
            raise
        except Exception as exc:           # a bug (e.g. in a translator): end the stream cleanly
            resp.abort()
            log.exception("stream relay failed for %s %s", ex.req.method, printable(ex.req.path))
            if not ex.started:
                raise
            ex.error, ex.keep_alive = f"internal error ({type(exc).__name__})", False
            if not conn.writer.transport.is_closing():
                self._write_event(conn, chunked, stream_error_event(
                    ex.fmt, 500, f"internal error in proxypal ({type(exc).__name__}) while "
                                 "relaying the stream; see the proxy's log"))
                if chunked:
                    conn.writer.write(b"0\r\n\r\n")

    async def _read_or_ping(self, ex: Exchange, resp: UpstreamResponse, seconds: float,
                            chunked: bool) -> bytes:
        """The next upstream bytes; while the upstream is silent, an SSE comment every
        `seconds` keeps idle-cutting proxies between here and the client open."""
        reading = asyncio.ensure_future(resp.read1())
        try:
            while True:
                done, _ = await asyncio.wait([reading], timeout=seconds)
                if done:
                    return reading.result()
                self._write_event(ex.conn, chunked, b": keep-alive\n\n")
                await ex.conn.drain()
        finally:
            if not reading.done():
                reading.cancel()

    @staticmethod
    def _write_event(conn: Connection, chunked: bool, data: bytes) -> None:
        conn.writer.write(chunk(data) if chunked else data)

    # -- management --------------------------------------------------------------
    async def _management(self, ex: Exchange, path: str) -> None:
        config = ex.config
        if not (config.allow_remote_management or is_loopback(ex.req.peer)):
            raise ProxypalError("the management API answers only loopback clients; set "
                                "allowRemoteManagement to true to allow others", 403)
        if not config.management_key:
            raise ProxypalError('the management API is off: set "managementKey" in config.json '
                                "and send it as X-Management-Key", 403)
        auth = ex.req.header("authorization")
        given = ex.req.header("x-management-key") or (auth[7:].strip()
                                                      if auth[:7].lower() == "bearer " else "")
        if not given or not key_matches(given, (config.management_key,)):
            raise ProxypalError("missing or wrong management key (X-Management-Key)", 401)
        if path.rstrip("/") == "/v0/management/usage" and ex.req.method in ("GET", "HEAD"):
            return ex.conn.send(ex, 200, dumps(self.usage.snapshot()))
        raise ClientError(f"no management route {printable(ex.req.method)} {printable(path, 80)}; "
                          "try GET /v0/management/usage", 404)

    # -- logging -----------------------------------------------------------------
    def _log_request(self, ex: Exchange) -> None:
        if ex.model:
            self.usage.record(ex.model, ex.provider, ex.status, time.monotonic() - ex.t0,
                              ex.ttfb, ex.tokens_in, ex.tokens_out)
        if ex.config.request_logging:
            log.info("%s", json.dumps(request_log_entry(ex), ensure_ascii=False))
        elif log.isEnabledFor(logging.DEBUG):
            log.debug("%s %s -> %d %s in %.1f ms", ex.req.method, printable(ex.req.path),
                      ex.status, ex.provider or "-", (time.monotonic() - ex.t0) * 1000)


def guess_path(buf: bytes) -> str:
    """The path of a request whose head could not be parsed, to answer in its format."""
    match = re.match(rb"[A-Z]{3,7} (/[^ ?\r\n]{0,200})", buf)
    return match.group(1).decode("latin-1") if match else "/"


def request_log_entry(ex: Exchange, now: Optional[float] = None,
                      wall: Optional[float] = None) -> Dict[str, Any]:
    """The request log line, as a dict (pure given the two clocks)."""
    now = time.monotonic() if now is None else now
    wall = time.time() if wall is None else wall
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(wall)) + f".{int(wall % 1 * 1000):03d}",
        "id": ex.id, "format": ex.fmt, "method": ex.req.method, "path": printable(ex.req.path),
        "model": printable(ex.model) or None, "routed": ex.routed or None,
        "provider": ex.provider or None, "status": ex.status,
        "upstream_status": ex.upstream_status,
        "latency_ms": round((now - ex.t0) * 1000, 1),
        "ttfb_ms": round(ex.ttfb * 1000, 1) if ex.ttfb is not None else None,
        "input_tokens": ex.tokens_in, "output_tokens": ex.tokens_out,
        "error": printable(ex.error, 300) or None,
    }


def check_exposure(config: Config, host: str) -> None:
    """Refuse to listen beyond loopback when the only key is the public default."""
    if not is_loopback(host) and DEFAULT_LOCAL_KEY in config.local_keys:
        raise ConfigError("host", f"{host!r} is reachable from other machines, but the public "
                                  f"default key {DEFAULT_LOCAL_KEY!r} is accepted: "
                                  'set "proxyApiKey" to a secret of your own')


# =============================================================================
# 11. Public API
# Strategy: start() for code that already runs an event loop, serve() for code
# that wants to block; both take a Config, a config dict or a path. Neither
# configures logging or touches signals unless serve() is told to.
# =============================================================================

def _as_config(config: Any) -> Config:
    if config is None or isinstance(config, str):
        return load_config(config)
    if isinstance(config, dict):
        return parse_config(config)
    if isinstance(config, Config):
        return config
    raise TypeError(f"config must be a Config, a dict or a path, not {type(config).__name__}")


async def start(config: Any = None, host: Optional[str] = None, port: Optional[int] = None,
                **kwargs: Any) -> Server:
    """Start a proxy on the running loop and return it; `server.port` is the real port
    (pass port=0 for an ephemeral one). Stop it with `await server.close()`."""
    cfg = _as_config(config)
    server = Server(cfg, **kwargs)
    await server.listen(cfg.host if host is None else host, cfg.port if port is None else port)
    return server


def banner(server: Server) -> str:
    config = server.config
    router = server.router
    host = server.host if ":" not in server.host else f"[{server.host}]"
    base = f"http://{host}:{server.port}"
    if config.loaded:
        where = f"config: {config.path} ({len(config.credentials)} providers, " \
                f"{len(router.names())} models)"
    else:
        where = (f"config: {config.path or '(none)'} not found: no providers yet; "
                 "create it (python proxypal.py init, or see README); it is picked up "
                 "within seconds")
    key = config.proxy_api_key if config.proxy_api_key == DEFAULT_LOCAL_KEY else "<your proxyApiKey>"
    return "\n".join([
        f"proxypal {__version__} listening on {base}",
        where,
        f"  export ANTHROPIC_BASE_URL={base} ANTHROPIC_AUTH_TOKEN={key}",
        f"  export OPENAI_BASE_URL={base}/v1 OPENAI_API_KEY={key}",
    ])


def serve(config: Any = None, host: Optional[str] = None, port: Optional[int] = None,
          print_banner: bool = True, overrides: Optional[Dict[str, Any]] = None,
          sock: Optional[socket.socket] = None, note: str = "", reuse_port: bool = False) -> int:
    """Run the proxy until SIGINT/SIGTERM (Ctrl-C), then stop gracefully: stop accepting,
    let in-flight requests finish for up to SHUTDOWN_GRACE seconds. SIGHUP reloads the
    config file at once (it is also polled). Returns 0."""
    async def run() -> None:
        cfg = _as_config(config)
        server = Server(cfg)
        server.overrides = dict(overrides or {})
        await server.listen(cfg.host if host is None else host,
                            cfg.port if port is None else port, reuse_port=reuse_port, sock=sock)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for name, action in (("SIGINT", stop.set), ("SIGTERM", stop.set),
                             ("SIGHUP", server.reload)):
            try:
                loop.add_signal_handler(getattr(signal, name), action)
            except (NotImplementedError, AttributeError, RuntimeError, ValueError):
                pass                       # Windows: Ctrl-C arrives as KeyboardInterrupt
        if print_banner:
            print(banner(server) + (f"\n{note}" if note else ""), flush=True)
        elif reuse_port:
            log.info("worker %d serving on port %d", os.getpid(), server.port)
        try:
            await stop.wait()
        finally:
            log.info("stopping: letting in-flight requests finish (up to %gs)", SHUTDOWN_GRACE)
            await server.close()
    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass
    return 0


# =============================================================================
# 12. Operations commands: check, models, init
# Strategy: what a person running the proxy for weeks asks of it, answered from
# the same config, router and upstream client the server uses. Each prints a
# table (or JSON with --json) and returns the exit code.
# =============================================================================

def print_table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> None:
    widths = [max(len(str(r[i])) for r in list(rows) + [header]) for i in range(len(header))]
    for row in [header, ["-" * w for w in widths]] + list(rows):
        print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip())


def model_routes(config: Config) -> List[Dict[str, Any]]:
    """Every routable name and where it goes: provider, upstream model, mapping applied."""
    router = Router(config)
    rows = []
    for name in router.names():
        route = router.resolve(name)
        for target in route.targets:
            rows.append({"model": name, "provider": target.cred.name, "entry": target.cred.path,
                         "upstream_model": target.model, "format": KIND_FORMAT[target.cred.kind],
                         "mapping": f"{route.mapping.source} -> {route.mapping.target}"
                         if route.mapping else None, "credentials": len(route.targets)})
    for cred in router.wildcard_creds:
        rows.append({"model": f"{KIND_PREFIX[cred.kind]}*", "provider": cred.name,
                     "entry": cred.path, "upstream_model": "(the name asked for)",
                     "format": KIND_FORMAT[cred.kind], "mapping": None, "credentials": 1})
    return rows


def print_models(config: Config, as_json: bool) -> int:
    rows = model_routes(config)
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no models: no provider is configured in {config.path}")
        return 0
    print_table([[r["model"], r["provider"], r["entry"], r["upstream_model"],
                  r["mapping"] or "", f"shared by {r['credentials']}" if r["credentials"] > 1 else ""]
                 for r in rows], ["model", "provider", "entry", "upstream model", "mapping", "note"])
    return 0


STARTER_CONFIG: Dict[str, Any] = {
    "_readme": "proxypal config. Copy an entry from _templates into the list of the same name "
               "above it, put your key in, and save: the running proxy reloads it. "
               "_templates itself is ignored.",
    "port": DEFAULT_PORT, "host": DEFAULT_HOST, "proxyApiKey": DEFAULT_LOCAL_KEY,
    "requestRetry": 1, "routingStrategy": "round-robin",
    "claudeApiKeys": [], "geminiApiKeys": [], "ampOpenaiProviders": [], "ampModelMappings": [],
    "_templates": {
        "claudeApiKeys": [
            {"apiKey": "YOUR_AZURE_AI_FOUNDRY_API_KEY",
             "baseUrl": "https://YOUR-RESOURCE.services.ai.azure.com/anthropic",
             "models": [{"name": "claude-opus-4-5", "alias": "claude-opus-4-5-20251101"},
                        {"name": "claude-sonnet-4-5", "alias": "claude-sonnet-4-5-20250929"},
                        {"name": "claude-haiku-4-5", "alias": "claude-haiku-4-5-20251001"}]},
            {"apiKey": "sk-ant-api03-YOUR-KEY", "baseUrl": "https://api.anthropic.com"},
            {"apiKey": "unused-with-aws-keys",
             "baseUrl": "https://bedrock-runtime.us-east-1.amazonaws.com",
             "headers": {"x-amz-access-key": "YOUR_ACCESS_KEY_ID",
                         "x-amz-secret-key": "YOUR_SECRET_ACCESS_KEY", "x-amz-region": "us-east-1"},
             "models": [{"name": "us.anthropic.claude-sonnet-4-5-20250929-v1:0",
                         "alias": "claude-sonnet-4-5-20250929"}]}],
        "geminiApiKeys": [{"apiKey": "AIzaSy-YOUR-KEY", "models": ["gemini-2.5-pro", "gemini-2.5-flash"]}],
        "ampOpenaiProviders": [
            {"name": "OpenRouter", "baseUrl": "https://openrouter.ai/api/v1",
             "apiKey": "sk-or-v1-YOUR-KEY", "models": ["openai/gpt-4o", "anthropic/claude-3-opus"]},
            {"name": "Groq", "baseUrl": "https://api.groq.com/openai/v1", "apiKey": "gsk_YOUR-KEY",
             "models": ["llama3-70b-8192"]},
            {"name": "DeepSeek", "baseUrl": "https://api.deepseek.com/v1", "apiKey": "sk-YOUR-KEY",
             "models": [{"name": "deepseek-chat", "alias": "deepseek-chat", "maxOutputTokens": 8192}]},
            {"name": "Ollama", "baseUrl": "http://localhost:11434/v1", "apiKey": "ollama",
             "models": ["llama3", "codellama"]},
            {"name": "vLLM Server", "baseUrl": "http://localhost:8000/v1", "apiKey": "token-abc123",
             "models": ["meta-llama/Llama-3-70b-chat-hf"]},
            {"name": "LiteLLM Local", "baseUrl": "http://localhost:4000", "apiKey": "sk-1234",
             "models": ["gpt-4"]},
            {"name": "LocalAI", "baseUrl": "http://localhost:8080/v1", "apiKey": "any",
             "models": ["gpt-3.5-turbo", "text-embedding-ada-002"]}],
        "ampModelMappings": [{"from": "claude-haiku-*", "to": "llama3", "enabled": True}],
    },
}


def init_config(path: str) -> int:
    """Write STARTER_CONFIG at `path`; an existing file is never touched. The file
    appears whole or not at all (written aside, then linked into place)."""
    if os.path.exists(path):
        print(f"proxypal: {path} already exists; init never overwrites a config. Edit it, or "
              "pass --config with a new path.", file=sys.stderr)
        return 1
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    temp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    with open(temp, "w", encoding="utf-8") as f:
        f.write(json.dumps(STARTER_CONFIG, indent=2, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(temp, path)                # fails if the path appeared meanwhile
    except FileExistsError:
        print(f"proxypal: {path} already exists; not overwritten", file=sys.stderr)
        return 1
    except OSError:                        # no hard links here (some filesystems)
        try:
            with open(path, "x", encoding="utf-8") as f, open(temp, encoding="utf-8") as src:
                f.write(src.read())
        except FileExistsError:
            print(f"proxypal: {path} already exists; not overwritten", file=sys.stderr)
            return 1
    finally:
        os.unlink(temp)
    print(f"wrote {path}\nnext: copy a provider from \"_templates\" into its list, add your "
          "key, then run: python proxypal.py")
    return 0


def probe_requests(config: Config, cred: Credential,
                   environ: Dict[str, str]) -> List[Tuple[List[str], UpstreamRequest]]:
    """What to ask an upstream to prove each configured model works: a models listing where
    the API has one (answers for all its models), else the smallest possible request."""
    names = [m.name for m in cred.models if not _excluded(cred, m.name, m.alias)]
    headers = upstream_headers(cred, {})
    listing = {"openai": "/models", "gemini": "/v1beta/models?pageSize=1000"}.get(cred.kind)
    if cred.kind == "claude" and urllib.parse.urlsplit(cred.base_url).hostname == "api.anthropic.com":
        listing = "/v1/models?limit=1000"
    if listing:
        url = cred.base_url + listing
        return [(names or ["(any)"], UpstreamRequest(
            "GET", url, headers, b"", cred.name, proxy_for(config, cred, url, environ),
            config.connect_timeout, config.first_byte_timeout, config.read_timeout))]
    probes = []
    for name in names or ["claude-haiku-4-5"]:
        body = {"model": name, "max_tokens": 1, "messages": [{"role": "user", "content": "ping"}]}
        if cred.bedrock_region:
            probes.append(([name], bedrock_request(config, Target(cred, name), "messages", body,
                                                   False, {}, environ)))
        else:
            url = upstream_url(cred, "messages", name, False, "")
            probes.append(([name], UpstreamRequest(
                "POST", url, headers, dumps(body), cred.name, proxy_for(config, cred, url, environ),
                config.connect_timeout, config.first_byte_timeout, config.read_timeout)))
    return probes


def listed_models(body: bytes) -> Optional[set]:
    """Model ids in an OpenAI, Anthropic or Gemini models listing; None if not one."""
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    items = obj.get("data") or obj.get("models") if isinstance(obj, dict) else None
    if not isinstance(items, list):
        return None
    ids = set()
    for item in items:
        if isinstance(item, dict):
            for key in ("id", "name"):
                if isinstance(item.get(key), str):
                    ids.add(item[key][len("models/"):] if item[key].startswith("models/") else item[key])
    return ids


async def probe(client: UpstreamClient, cred: Credential, names: List[str],
                req: UpstreamRequest, timeout: float) -> List[Dict[str, Any]]:
    t0 = time.monotonic()
    status, body, detail = 0, b"", ""
    try:
        resp = await asyncio.wait_for(client.open(req), timeout)
        status = resp.status
        body = await asyncio.wait_for(resp.read_all(MAX_UPSTREAM_BODY, truncate=True), timeout)
    except asyncio.TimeoutError:
        detail = f"no answer within {timeout:g}s"
    except UpstreamError as exc:
        detail = exc.message
    latency = round((time.monotonic() - t0) * 1000)
    listed = listed_models(body) if req.method == "GET" and status == 200 else None
    rows = []
    for name in names:
        ok = 200 <= status < 300 and (listed is None or name == "(any)" or name in listed)
        why = detail
        if status and not ok:
            why = (f"{name!r} is not in the provider's models listing" if 200 <= status < 300
                   else f"HTTP {status}: {upstream_message(body)[0]}")
            hint = upstream_hint(cred, status, req.url, body, name, name)
            why += f" ({hint})" if hint else ""
        rows.append({"provider": cred.name, "entry": cred.path, "base_url": cred.base_url,
                     "model": name, "ok": ok, "status": status or None, "latency_ms": latency,
                     "detail": mask_secrets(why, (cred.api_key,)) if why else ""})
    return rows


def run_check(config: Config, timeout: float, as_json: bool, environ: Dict[str, str]) -> int:
    """Probe every provider and model in parallel; exit 0 when all pass, 1 otherwise."""
    async def everything() -> List[Dict[str, Any]]:
        client = UpstreamClient()
        jobs = [probe(client, cred, names, req, timeout) for cred in config.credentials
                for names, req in probe_requests(config, cred, environ)]
        results = await asyncio.gather(*jobs)
        client.close()
        return [row for rows in results for row in rows]
    rows = asyncio.run(everything()) if config.credentials else []
    if as_json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print(f"nothing to check: no provider is configured in {config.path}")
    else:
        print_table([[r["provider"], r["base_url"], r["model"], "ok" if r["ok"] else "FAIL",
                      f"{r['latency_ms']} ms", r["detail"]] for r in rows],
                    ["provider", "base URL", "model", "result", "latency", "detail"])
    return 0 if rows and all(r["ok"] for r in rows) else 1


# =============================================================================
# 13. CLI
# Strategy: a command word (serve, check, models, init; serve when none), then
# argparse, then precedence command line > environment > config file > defaults.
# main() is the only place that configures logging. Exit codes: 0 ok, 1 a check
# failed or the start failed, 2 bad usage or invalid config.
# =============================================================================

COMMANDS = ("serve", "check", "models", "init")
LOG_FILE_BACKUPS = 4                     # rotated files kept beside proxypal.log


def _parser(command: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="proxypal.py" + ("" if command == "serve" else f" {command}"),
        description={
            "serve": "One-file LLM API proxy: OpenAI, Anthropic and Gemini clients to any "
                     "configured upstream. Commands: check (probe every provider and model), "
                     "models (what each model name routes to), init (write a starter config).",
            "check": "Probe every provider and configured model, in parallel, and print a "
                     "table; exit 1 if any failed.",
            "models": "List every routable model name and where it goes.",
            "init": "Write a starter config (never overwrites an existing file)."}[command],
        epilog="environment: PROXYPAL_CONFIG, PROXYPAL_HOST, PROXYPAL_PORT "
               "(the command line wins over them, they win over the config file)")
    parser.add_argument("--config", metavar="PATH",
                        help=f"config file (default: {default_config_path()})")
    if command == "serve":
        parser.add_argument("--host", help=f"listen address (default {DEFAULT_HOST})")
        parser.add_argument("--port", type=int,
                            help=f"listen port (default {DEFAULT_PORT}; 0 picks one)")
        parser.add_argument("--debug", action="store_true",
                            help="debug logging: routing decisions, upstream URLs, timings")
        parser.add_argument("--log-requests", action="store_true",
                            help="one JSON line per request (secrets masked)")
        parser.add_argument("--workers", type=int, default=1, metavar="N",
                            help="N processes sharing the port (SO_REUSEPORT; Linux, macOS)")
        parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
        parser.add_argument("--version", action="version", version=f"proxypal {__version__}")
    if command in ("check", "models"):
        parser.add_argument("--json", action="store_true", help="machine-readable output")
    if command == "check":
        parser.add_argument("--timeout", type=float, default=20.0,
                            help="seconds per probe (default 20)")
    return parser


def setup_logging(config: Config) -> None:
    """stderr always; with loggingToFile also <config folder>/logs/proxypal.log, rotated so
    the folder stays under logsMaxTotalSizeMb. Secrets are masked before any handler."""
    import logging.handlers
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%S")
    handlers: List[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if config.logging_to_file:
        folder = os.path.join(os.path.dirname(os.path.abspath(config.path or default_config_path())),
                              "logs")
        os.makedirs(folder, exist_ok=True)
        each = config.logs_max_total_size_mb * 1024 * 1024 // (LOG_FILE_BACKUPS + 1)
        handlers.append(logging.handlers.RotatingFileHandler(
            os.path.join(folder, "proxypal.log"), maxBytes=max(each, 64 * 1024),
            backupCount=LOG_FILE_BACKUPS, encoding="utf-8"))
    for handler in handlers:
        handler.setFormatter(formatter)
    log.handlers[:] = handlers
    log.setLevel(logging.DEBUG if config.debug else logging.INFO)
    log.propagate = False


def _serve_overrides(args: argparse.Namespace, env: Dict[str, str]) -> Dict[str, Any]:
    overrides: Dict[str, Any] = {}
    host = args.host or env.get("PROXYPAL_HOST")
    port = args.port if args.port is not None else env.get("PROXYPAL_PORT")
    if host:
        overrides["host"] = host
    if port is not None and port != "":
        try:
            overrides["port"] = int(port)
        except ValueError:
            raise ConfigError("PROXYPAL_PORT", f"must be a whole number, got {port!r}") from None
        if not 0 <= overrides["port"] <= 65535:
            raise ConfigError("port", f"must be between 0 and 65535, got {overrides['port']}")
    if args.debug:
        overrides["debug"] = True
    if args.log_requests:
        overrides["request_logging"] = True
    return overrides


def serve_workers(config: Config, overrides: Dict[str, Any], count: int,
                  argv: Sequence[str]) -> int:
    """N processes, each a full proxy, sharing one port through SO_REUSEPORT; the kernel
    spreads connections. No state needs sharing: each has its own pool and counters."""
    if not hasattr(socket, "SO_REUSEPORT"):
        log.warning("--workers needs SO_REUSEPORT, which this OS does not have; "
                    "running a single process")
        return serve(config, overrides=overrides)
    check_exposure(config, config.host)
    family = socket.getaddrinfo(config.host, config.port, type=socket.SOCK_STREAM)[0][0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((config.host, config.port))
    port = sock.getsockname()[1]
    rest = [a for a in argv if a != "--worker"]
    children = [subprocess_worker(rest, port) for _ in range(count - 1)]
    try:
        return serve(config, overrides=dict(overrides, port=port), sock=sock,
                     note=f"workers: {count} processes share port {port}")
    finally:
        for child in children:
            child.terminate()
        for child in children:
            try:
                child.wait(SHUTDOWN_GRACE + 2)
            except Exception:              # still running: it had its chance
                child.kill()


def subprocess_worker(argv: Sequence[str], port: int) -> Any:
    import subprocess
    args = list(argv)
    for flag in ("--workers", "--port"):   # the worker serves the parent's port, alone
        while flag in args:
            i = args.index(flag)
            del args[i:i + 2]
    args = [a for a in args if not a.startswith(("--workers=", "--port="))]
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), *args,
                             "--port", str(port), "--worker"])


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in COMMANDS else "serve"
    if argv and argv[0] == command:
        argv = argv[1:]
    args = _parser(command).parse_args(argv)
    env = dict(os.environ)
    path = args.config or env.get("PROXYPAL_CONFIG") or None
    try:
        if command == "init":
            return init_config(path or default_config_path())
        config = load_config(path)
        if command == "models":
            return print_models(config, args.json)
        if command == "check":
            return run_check(config, args.timeout, args.json, env)
        overrides = _serve_overrides(args, env)
        config = dataclasses.replace(config, **overrides)
        setup_logging(config)
        for key in config.unknown_keys:
            log.debug("config key %r is not used by proxypal; ignored", key)
        if args.workers > 1:
            return serve_workers(config, overrides, args.workers, argv)
        return serve(config, overrides=overrides, print_banner=not args.worker,
                     reuse_port=args.worker)
    except ConfigError as exc:
        print(f"proxypal: invalid config: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"proxypal: cannot start: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
