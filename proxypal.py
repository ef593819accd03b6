#!/usr/bin/env python3
"""proxypal.py: a one-file, standard-library-only LLM API proxy.

Local clients (Claude Code, Codex, Gemini CLI, Amp, Cursor, the OpenAI, Anthropic
and Google SDKs, curl) speak the OpenAI (Chat Completions or Responses), Anthropic
or Gemini API to this proxy; it forwards each request, by model name, to the
upstreams configured in config.json: Anthropic-format keys (api.anthropic.com, Azure
AI Foundry, Amazon Bedrock), Gemini keys and any OpenAI-compatible server
(OpenRouter, Groq, DeepSeek, Ollama, vLLM, LiteLLM), translating requests, answers
and streams when the two formats differ. GET / is its management page.

Run it:
    python proxypal.py --port 8317 [--config PATH] [--debug]

Embed it (no side effects on import):
    import proxypal
    proxypal.serve(proxypal.load_config("config.json"))        # blocks
    server = await proxypal.start(config, port=0)               # inside asyncio
    print(server.port); await server.close()

Python 3.8 or newer; nothing outside the standard library.

Map of the file (each section uses only those above it):
     1 constants and limits     every number the proxy enforces, with its reason
     2 errors                   ProxypalError and kin: each carries its HTTP status
     3 helpers                  JSON, secret masking, small pure functions
     4 config                   SETTINGS, parse_config, load_config, ConfigStore
     5 HTTP/1.1 wire            head parser, body framing, chunked and SSE decoders
     6 API formats              FORMATS: paths, error bodies, framing, stream ends
     7 translation              the internal form; a reader and a writer per format;
                                TRANSLATORS composes them; StreamPipe
     8 routing                  Router (model name -> targets), Balancer (cooldowns)
     9 upstreams                Bedrock's wire, the HTTP client, one adapter per dialect
    10 server                   Connection, ENDPOINTS, ModelCall, relay; usage on disk,
                                the journal, the management page and its API; Server
    11 public API               start(), serve()
    12 operations commands      check, models, init
    13 CLI                      main()

A request's path through it:
    Server._serve_connection -> Connection.read_head -> parse_request_head ->
    Server.handle -> endpoint_for (ENDPOINTS) -> gate (client key) -> handler ->
    ModelCall.plan (Router, Balancer, TRANSLATORS) -> ModelCall.run ->
    Upstream.request -> UpstreamClient.open -> ModelCall.answer ->
    Reply (Connection.write_reply) or StreamReply (relay: StreamPipe or RelayPipe)
    -> Record -> UsageStats and the request log.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import dataclasses
import fnmatch
import functools
import hashlib
import heapq
import hmac
import http
import ipaddress
import itertools
import json
import logging
import math
import os
import re
import secrets
import signal
import socket
import ssl
import struct
import sys
import tempfile
import threading
import time
import urllib.parse
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

if os.name != "nt":                        # (a lock taken per request: imported once)
    import fcntl

__version__ = "0.1.0"
__all__ = ["serve", "start", "load_config", "parse_config", "Config", "ProxypalError",
           "ConfigError", "__version__"]

log = logging.getLogger("proxypal")
LOGGING_OWNED = False                    # main() set up logging: the config's debug drives it


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
DEFAULT_MAX_BODY_MB = 32                 # Anthropic's own request size limit (its 413)
ANTHROPIC_MIN_THINKING_BUDGET = 1024     # budget_tokens below this is refused

HEAD_TIMEOUT = 10.0                      # slowloris: the whole head must arrive in 10 s
BODY_IDLE_TIMEOUT = 30.0                 # a body read silent this long is abandoned (408)
BODY_TOTAL_TIMEOUT = 300.0               # a whole body: 32 MB (maxBodyMb) at 1 Mbit/s takes
                                         # 270 s; a body trickled slower holds a slot (408)
MAX_JSON_DIGITS = 4300                   # longer integers are refused (CPython's own limit
                                         # since 3.11, applied on every version)
KEEPALIVE_IDLE_TIMEOUT = 75.0            # nginx's keepalive_timeout default
SHUTDOWN_GRACE = 5.0                     # in-flight requests get this long on stop
LINGER_SECONDS = 2.0                     # unread input drained this long before a close
CONFIG_POLL_SECONDS = 0.5                # config changes (and other workers' cooldowns)
                                         # apply within a second
STATE_FILE = "state.json"                # cooldowns the workers share, beside config.json
CLIENT_WRITE_TIMEOUT = 120.0             # a client that reads nothing this long is gone
WRITE_BUFFER_HIGH = 64 * 1024            # asyncio's own high-water mark for writes

DEFAULT_CONNECT_TIMEOUT = 10.0           # TCP + TLS handshake to an upstream
DEFAULT_FIRST_BYTE_TIMEOUT = 600.0       # a reasoning model may think for minutes
DEFAULT_READ_TIMEOUT = 300.0             # silence between two chunks of one response
STREAM_END_GRACE = 2.0                   # after a stream's last event its body ends at once;
#   an upstream (or a proxy before it) that holds it open is let go after this much
#   silence, not readTimeoutSeconds: the client's SDK reads to the end of the body.
ERROR_TAIL = 4096                        # an upstream's error event (which may echo its key)
                                         # ends its stream: only a read's end is looked at
                                         # (scanning whole bursts cost 0.1 us an event)
READ_SIZE = 64 * 1024                    # one socket read
MAX_UPSTREAM_BODY = 64 * 1024 * 1024     # a non-streamed answer larger than this is refused
MAX_UPSTREAM_ERROR_BODY = 1024 * 1024    # error bodies are read up to this, then cut
MAX_STREAM_EVENT = MAX_UPSTREAM_BODY     # one stream event is held whole: as large as an answer
CACHED_TEXT_MAX = 512                    # longer paths and URLs are not remembered: a
#   cache of strings clients choose must stay small (256 entries of this at most)
POOL_IDLE_PER_HOST = 128                 # idle keep-alive connections kept per upstream: up
#   to this many requests at once to one upstream reuse theirs (with 32, 64 at once
#   opened a new connection, a TLS handshake, for one request in ten)
POOL_IDLE_SECONDS = 60.0                 # an upstream connection idle longer is not reused:
#   after a laptop's sleep or a network change, or past a NAT's idle timeout, it may be
#   dead without a word, and a request on it would wait out firstByteTimeoutSeconds

CLIENT_GONE = "client disconnected"      # a request's error when its client left first
WATCH_CLIENT_AFTER = 0.25                # a non-stream call lasting this long has its client
                                         # watched: a client that leaves is still noticed well
                                         # within a second, and a quick call needs no task

COOLDOWN_AUTH = 300.0                    # a key answering 401/403 rests 5 minutes
COOLDOWN_RETRY_AFTER_CAP = 300.0         # Retry-After is honoured up to 5 minutes
COOLDOWN_DEFAULT = 30.0                  # a 429 without Retry-After

OWN_HEADERS = frozenset({"content-type", "cache-control", "x-accel-buffering",   # set here
                         "x-proxypal-provider", "x-proxypal-hint"})
DEFAULT_FIRST_BYTE_COMMIT = 30.0         # a stream silent this long gets its head and keep-
                                         # alives: Claude Code resends a request after ~300 s
COMMIT_PING_SECONDS = 15.0               # keep-alives while committed: well inside the idle
                                         # watchdogs of Claude Code and Codex (300 s)
FAILOVER_STATUSES = frozenset({401, 403, 429, 500, 502, 503, 504, 529})
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
                        "proxy-connection", "te", "trailer", "trailers", "transfer-encoding",
                        "upgrade", "content-length", "content-encoding", "set-cookie", "date",
                        "server", "alt-svc", "strict-transport-security"})

# Models served by a key that lists none: current ids, plus any claude-*/gemini-*.
BUILTIN_CLAUDE_MODELS = (                 # (Claude Code 2.1's own names first)
    "claude-opus-4-8", "claude-opus-4-7", "claude-opus-4-6", "claude-sonnet-5", "claude-sonnet-4-6",
    "claude-opus-4-5-20251101", "claude-opus-4-5", "claude-sonnet-4-5-20250929",
    "claude-sonnet-4-5", "claude-haiku-4-5-20251001", "claude-haiku-4-5",
    "claude-opus-4-1-20250805", "claude-opus-4-20250514", "claude-sonnet-4-20250514",
    "claude-3-7-sonnet-20250219", "claude-3-5-haiku-20241022",
)
BUILTIN_GEMINI_MODELS = (
    "gemini-3-pro-preview", "gemini-2.5-pro", "gemini-2.5-flash", "gemini-2.5-flash-lite",
    "gemini-2.0-flash",
)
BUILTIN_MODELS = {"anthropic": BUILTIN_CLAUDE_MODELS, "gemini": BUILTIN_GEMINI_MODELS}
MODEL_PREFIX = {"anthropic": "claude-", "gemini": "gemini-"}   # also served by keys listing none
PROXY_SCHEMES = ("http", "socks5", "socks5h")   # outbound proxies the client speaks through


# =============================================================================
# 2. Errors
# Strategy: one small hierarchy; every error knows its HTTP status and speaks a
# lower-case message that quotes the bad value and ends with the fix. One pure
# function (error_body, section 6) renders any of them in the client's format.
# =============================================================================

class ProxypalError(Exception):
    """Base of every error the proxy raises on purpose; carries an HTTP status, and for
    the formats whose errors have one, a code ("": none; None: the status's usual one)."""
    status = 500
    code: Optional[str] = None

    def __init__(self, message: str, status: Optional[int] = None,
                 headers: Sequence[Tuple[str, str]] = ()):
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        self.headers = list(headers)


class ConfigError(ProxypalError, ValueError):
    """An invalid config; .path names where, e.g. claudeApiKeys[1].models[0], and .field
    the key itself when one is at fault (claudeApiKeys[1].baseUrl), for the page."""
    status = 400

    def __init__(self, path: str, message: str, field: str = ""):
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path
        self.field = field or path


class ConfigWriteError(ConfigError):
    """The config file could not be written; the old one is intact."""
    status = 500


class ClientError(ProxypalError):
    """The client's request is wrong; 4xx."""
    status = 400


class WireError(ClientError):
    """Malformed or over-limit HTTP; answered, then the connection is closed."""


class UpstreamError(ProxypalError):
    """An upstream could not be reached or failed; 502 unless said otherwise. `unanswered`:
    it failed before giving any answer (a stream's opening error), so another credential
    may be asked without the request having run twice."""
    status = 502
    unanswered = False

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
# A lone UTF-16 surrogate ("\ud83d" without its pair: JSON allows the escape, and clients
# and upstreams send it when they cut an emoji in two) has no UTF-8 form. Encoding JSON
# text, this error handler writes it back as the escape it came in as: it can only stand
# inside a JSON string, so the text stays the JSON that was sent.
JSON_ESCAPE = "backslashreplace"


def dumps(obj: Any) -> bytes:
    """Compact UTF-8 JSON, the way the APIs themselves send it."""
    return _JSON.encode(obj).encode("utf-8", JSON_ESCAPE)


_SECRET_PATTERNS = re.compile(
    r"(?i)((?:authorization|proxy-authorization)\s*[:=]\s*(?:bearer|basic)?\s*"
    r"|(?:x-api-key|x-goog-api-key|api-key|x-management-key|x-amz-secret-key"
    r"|x-amz-security-token|x-amz-session-token)\s*[:=]\s*"
    r"|[?&]key=|\"(?:apiKey|api_key|proxyPassword|managementKey|secret)\"\s*:\s*\")"
    r"([^\s\"'&,;]+)")
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")


def loads_json(data: Any) -> Any:
    """json.loads for what others send: JSON nested deeper than Python recurses is a
    ValueError like any other that cannot be used, not a RecursionError."""
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def mask_secrets(text: str, secrets: Sequence[str] = (), patterns: bool = True) -> str:
    """Replace every known secret, and (with `patterns`) anything that looks like a
    credential in a header, query or JSON field, with ***."""
    for secret in secrets:
        if secret and len(secret) >= 4 and secret in text:
            text = text.replace(secret, "***")
    return _SECRET_PATTERNS.sub(lambda m: m.group(1) + "***", text) if patterns else text


# An error event in any format: Anthropic's and Responses' `event: error`, an {"error": {
# object (OpenAI, Gemini's bare one), a "type": "error". A model's own text never matches:
# inside a JSON string its quotes are escaped.
_ERROR_EVENT = re.compile(rb'event:[ \t]*error\b|"error"\s*:\s*[{"]|"type"\s*:\s*"error"')


def mask_bytes(data: bytes, secrets: Sequence[str]) -> bytes:
    """mask_secrets for bytes on their way to a client, known secrets only."""
    for secret in secrets:
        raw = secret.encode("utf-8")
        if raw in data:
            data = data.replace(raw, b"***")
    return data


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


def remembered(function: Callable[..., Any]) -> Callable[..., Any]:
    """functools.lru_cache (256 calls) for a pure function of strings a client chooses
    (a path, a model name in a URL): a call whose strings are longer than CACHED_TEXT_MAX
    in all is worked out each time and never held. `.cache` is the lru_cache."""
    cache = functools.lru_cache(maxsize=256)(function)

    @functools.wraps(function)
    def call(*args: str) -> Any:
        return (cache if sum(map(len, args)) <= CACHED_TEXT_MAX else function)(*args)
    call.cache = cache                     # type: ignore[attr-defined]
    return call


def size_text(size: int) -> str:
    """1048576 -> '1 MB', 1049 -> '1049 bytes': limits as a person reads them."""
    mb = size / (1024 * 1024)
    return f"{mb:g} MB" if mb >= 1 else f"{size} bytes"


@functools.lru_cache(maxsize=256)         # (peers are a few loopback addresses)
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
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:12]


# =============================================================================
# 4. Config
# Strategy: SETTINGS is the one table of top-level settings (key, type,
# default, range, whether it applies live, help); it feeds parse_config, the
# known keys, `init`, the management page and a README check. parse_config(raw)
# turns the JSON object into one frozen Config, validating every key it knows
# and naming the key path in each error; it keeps the raw document untouched,
# unknown keys included. ConfigStore is the only code that writes the file:
# validate, write aside, fsync, keep the previous file as .bak, rename.
# =============================================================================

@dataclasses.dataclass(frozen=True)
class Setting:
    key: str                               # the JSON key
    attr: str                              # the Config field
    kind: type                             # str, bool, int, float or list (of strings)
    default: Any
    low: Optional[float] = None
    high: Optional[float] = None
    live: bool = True                      # applied on reload, without a restart
    help: str = ""
    choices: Tuple[str, ...] = ()
    secret: bool = False


SETTINGS: Tuple[Setting, ...] = (
    Setting("port", "port", int, DEFAULT_PORT, 0, 65535, False, "listen port"),
    Setting("host", "host", str, DEFAULT_HOST, live=False,
            help="listen address; beyond loopback it needs a proxyApiKey of your own"),
    Setting("proxyApiKey", "proxy_api_key", str, DEFAULT_LOCAL_KEY,
            help="the key local clients present", secret=True),
    Setting("apiKeys", "api_keys", list, (), help="more accepted local keys", secret=True),
    Setting("managementKey", "management_key", str, "",
            help="key for the management page and API (generated at first start)", secret=True),
    Setting("allowRemoteManagement", "allow_remote_management", bool, False,
            help="answer management requests from other machines too"),
    Setting("debug", "debug", bool, False, help="debug log lines: routing, upstream URLs, timings"),
    Setting("requestLogging", "request_logging", bool, False,
            help="one JSON log line per request (secrets masked)"),
    Setting("loggingToFile", "logging_to_file", bool, False, live=False,
            help="also write logs under the config folder's logs/"),
    Setting("logsMaxTotalSizeMb", "logs_max_total_size_mb", int, 100, 1, 1_000_000, False,
            "cap for the logs folder; older files rotate away"),
    Setting("requestRetry", "request_retry", int, 0, 0, 20,
            help="extra tries on other credentials for 429, 5xx and connect errors"),
    Setting("routingStrategy", "routing_strategy", str, "round-robin",
            help="how to pick among credentials serving one model",
            choices=("round-robin", "fill-first")),
    Setting("proxyUrl", "proxy_url", str, "",
            help="outbound proxy for every upstream: http://, socks5:// or socks5h://"),
    Setting("proxyUsername", "proxy_username", str, "", help="outbound proxy user"),
    Setting("proxyPassword", "proxy_password", str, "", help="outbound proxy password", secret=True),
    Setting("useSystemProxy", "use_system_proxy", bool, False,
            help="honour HTTPS_PROXY, HTTP_PROXY and NO_PROXY"),
    Setting("maxBodyMb", "max_body_mb", float, float(DEFAULT_MAX_BODY_MB), 0.001, 4096,
            help="largest request body accepted"),
    Setting("streamKeepaliveSeconds", "stream_keepalive_seconds", float, 0.0, 0, 3600,
            help="while a stream is silent this long, send a keep-alive (0: off)"),
    Setting("firstByteCommitSeconds", "first_byte_commit", float, DEFAULT_FIRST_BYTE_COMMIT, 0,
            3600, help="a streaming upstream silent this long: answer 200 and the stream's "
                       "opening event, then keep-alives until it speaks (0: wait)"),
    Setting("connectTimeoutSeconds", "connect_timeout", float, DEFAULT_CONNECT_TIMEOUT, 0.1, 600,
            help="TCP and TLS connect to an upstream"),
    Setting("firstByteTimeoutSeconds", "first_byte_timeout", float, DEFAULT_FIRST_BYTE_TIMEOUT,
            0.1, 86400, help="wait for an upstream's first byte"),
    Setting("readTimeoutSeconds", "read_timeout", float, DEFAULT_READ_TIMEOUT, 0.1, 86400,
            help="silence allowed between two chunks of one upstream answer"),
)
SETTING_BY_ATTR = {s.attr: s for s in SETTINGS}
CREDENTIAL_LISTS = {"claudeApiKeys": "anthropic", "geminiApiKeys": "gemini",
                    "ampOpenaiProviders": "openai"}
KNOWN_KEYS = frozenset([s.key for s in SETTINGS] + list(CREDENTIAL_LISTS) + ["ampModelMappings"])


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    name: str                              # what the upstream receives
    alias: str                             # what clients ask for
    max_output_tokens: Optional[int] = None
    context_window: Optional[int] = None   # shown in /v1/models for clients' context meters


@dataclasses.dataclass(frozen=True)
class Credential:
    api: str                               # the format it speaks: anthropic | gemini | openai
    dialect: str                           # anthropic | azure | bedrock | gemini | openai
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
    wire_api: str = ""                     # OpenAI-compatible: "chat", "responses" (every
                                           # client reaches it in Responses), "" (default)

    @property
    def label(self) -> str:
        return f"'{self.name}' ({self.path})"

    @property
    def secrets(self) -> Tuple[str, ...]:
        """What must never be shown: its key, secret headers, its proxy's password."""
        return tuple(s for s in (self.api_key, _url_password(self.proxy_url),
                                 *(v for k, v in self.headers if _is_secret_header(k, v))) if s)


@dataclasses.dataclass(frozen=True)
class Mapping:
    source: str                            # requested model; may hold * wildcards
    target: str


@dataclasses.dataclass(frozen=True)
class Config:
    """The whole configuration: one immutable value, swapped whole on reload. Its
    top-level fields are SETTINGS; `raw` is the document it was made from (read it,
    never change it: ConfigStore writes copies)."""
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
    max_body_mb: float = float(DEFAULT_MAX_BODY_MB)
    stream_keepalive_seconds: float = 0.0
    first_byte_commit: float = DEFAULT_FIRST_BYTE_COMMIT
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    first_byte_timeout: float = DEFAULT_FIRST_BYTE_TIMEOUT
    read_timeout: float = DEFAULT_READ_TIMEOUT
    credentials: Tuple[Credential, ...] = ()
    mappings: Tuple[Mapping, ...] = ()
    path: str = ""                         # where it was loaded from ("" when built in code)
    loaded: bool = False                   # False when the file did not exist
    unknown_keys: Tuple[str, ...] = ()
    raw: Any = dataclasses.field(default=None, compare=False, repr=False)

    @functools.cached_property              # (a Config never changes; asked per request)
    def local_keys(self) -> Tuple[str, ...]:
        return tuple(k for k in (self.proxy_api_key,) + self.api_keys if k)

    @functools.cached_property
    def secrets(self) -> Tuple[str, ...]:
        """Every secret the config holds, longest first (a Config never changes)."""
        found = [self.management_key, self.proxy_password]
        found += [k for k in self.local_keys if k != DEFAULT_LOCAL_KEY]
        for cred in self.credentials:
            found += cred.secrets
        found.append(_url_password(self.proxy_url))
        return tuple(sorted({s for s in found if s and len(s) >= 4}, key=len, reverse=True))


# Headers a config sets whose values are settings, never secrets. Others are secrets when
# their name or value says so (a gateway's Ocp-Apim-Subscription-Key, Helicone-Auth,
# X-Auth-Token...): _is_secret_header.
PLAIN_HEADERS = frozenset({"anthropic-version", "anthropic-beta", "x-amz-region", "http-referer",
                           "referer", "x-title", "user-agent", "accept", "content-type",
                           "openai-organization", "openai-project", "api-version"})


_SECRET_HEADER_NAME = re.compile(r"(?:^|[-_])(?:api-?)?key(?:$|[-_])|token|auth|secret|passw|"
                                 r"signature|cookie|session|credential")
_PLAIN_VALUE = re.compile(r"[A-Za-z]+|[0-9.]+|[0-9]{4}-[0-9]{2}-[0-9]{2}")


def _is_secret_header(name: str, value: str) -> bool:
    """A header whose name says credential, or whose value looks like one (long, mixed):
    a short word or number ("true", "3600", "openai") stays readable wherever it appears."""
    name = name.lower()
    if name in PLAIN_HEADERS:
        return False
    return bool(_SECRET_HEADER_NAME.search(name)) or name.startswith("x-amz-") or \
        (len(value) >= 16 and not _PLAIN_VALUE.fullmatch(value))


def _url_password(url: str) -> str:
    try:
        return urllib.parse.urlsplit(url).password or ""
    except ValueError:
        return ""


_TYPE_NAMES = {str: "a string", bool: "true or false", int: "a whole number",
               float: "a number", list: "a list", dict: "an object"}
SECRET_KEYS = frozenset({"apiKey", "apiKeys", "proxyApiKey", "managementKey", "proxyPassword",
                         "proxyUrl", "baseUrl"})      # their values are never echoed in errors
_SURROGATE = re.compile("[\ud800-\udfff]")


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
            return ConfigError(self.path, f'"{key}" {message}', self.at(key))
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
        if not ok:                         # (a list or headers given as text: a key)
            shown = "" if key in SECRET_KEYS or kind in (list, dict) else " " + _short(value)
            raise self.fail(key, f"must be {_TYPE_NAMES[kind]}, got {_json_type(value)}{shown}")
        if kind is str and _SURROGATE.search(value):
            raise self.fail(key, "holds a lone UTF-16 surrogate (half of an emoji?), which is "
                                 "not text")
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
            if not isinstance(item, str) or _SURROGATE.search(item):
                raise ConfigError(f"{self.at(key)}[{i}]", "must be a string of text, got "
                                  + ("a lone UTF-16 surrogate" if isinstance(item, str)
                                     else _json_type(item)))
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
        return ConfigError(path, f'"{key}" {message}', f"{path}.{key}") if path \
            else ConfigError(key, message)
    # (no user name or password in an error, however the URL is broken)
    shown = value.split("://", 1)[0] + "://***@" + value.rsplit("@", 1)[1] if "@" in value \
        else value
    try:
        parts = urllib.parse.urlsplit(value.strip())
        parts.port  # noqa: B018 -- raises ValueError on a bad port
    except ValueError as exc:
        raise fail(f"is not a valid URL: {shown!r}" + ("" if "@" in value else f" ({exc})")) \
            from None
    if parts.scheme not in schemes or not parts.hostname:
        raise fail(f'must be a URL starting with {" or ".join(s + "://" for s in schemes)}, '
                   f"got {shown!r}")
    if not _valid_host(parts.hostname):
        raise fail(f"names no host a connection can be made to: {printable(parts.hostname, 80)!r}")
    return value.strip()


def _valid_host(host: str) -> bool:
    """An IP literal, or a name DNS can carry (IDNA: labels of at most 63 characters)."""
    if ":" in host:
        try:
            ipaddress.ip_address(host.split("%")[0])
            return True
        except ValueError:
            return False
    if not host or re.search(r"[\s\x00-\x1f\x7f\\/?#@\ud800-\udfff]", host):
        return False
    try:
        host.encode("idna")
    except UnicodeError:
        return False
    return True


def _parse_headers(reader: _Reader) -> Tuple[Tuple[str, str], ...]:
    raw = reader.get("headers", dict, {})
    result = []
    for name, value in raw.items():
        where = f'{reader.at("headers")}'
        if not _TOKEN.match(name):
            raise ConfigError(where, f"{name!r} is not a valid header name")
        if not isinstance(value, str):
            raise ConfigError(where, f'"{name}" must be a string, got {_json_type(value)}')
        if _BAD_HEADER_TEXT.search(value) or _SURROGATE.search(value):
            raise ConfigError(where, f'"{name}" must not contain line breaks, control characters '
                                     "or lone UTF-16 surrogates")
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
        limits = [model.get(key, int) for key in ("maxOutputTokens", "contextWindow")]
        for key, limit in zip(("maxOutputTokens", "contextWindow"), limits):
            if limit is not None and limit < 1:
                raise ConfigError(path, f'"{key}" must be at least 1, got {limit}')
        entries.append(ModelEntry(name, alias, *limits))
    return tuple(entries)


def _provider_name(base_url: str) -> str:
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


def _normalize_base(api: str, url: str) -> str:
    url = url.rstrip("/")
    if api == "anthropic" and url.endswith("/v1"):    # tolerate a trailing /v1
        url = url[:-3]
    if api == "gemini":
        for suffix in ("/v1beta", "/v1"):
            if url.endswith(suffix):
                url = url[:-len(suffix)]
    return url


DEFAULT_BASE_URL = {"anthropic": "https://api.anthropic.com",
                    "gemini": "https://generativelanguage.googleapis.com"}


ENTRY_FIELDS = ("name", "apiKey", "baseUrl", "proxyUrl", "headers", "models", "excludedModels",
                "prefix", "requestRetry", "wireApi", "disabled")
_ENTRY_SPELLINGS = {re.sub(r"[-_]", "", f.lower()): f for f in ENTRY_FIELDS}


def _misspelled_fields(r: "_Reader") -> None:
    """Refuse a field spelled like one of ours but not as ours ("baseURL", "api_key"): it
    would be ignored, and the key sent to the default host (api.anthropic.com) instead.
    Other unknown fields are kept and ignored (the desktop app's own)."""
    for key in r.obj:
        meant = _ENTRY_SPELLINGS.get(re.sub(r"[-_]", "", key.lower()))
        if meant and meant != key:
            raise r.fail(key, f'is not a field: write "{meant}"')


def _parse_credential(api: str, obj: Any, path: str) -> Credential:
    r = _Reader(obj, path)
    _misspelled_fields(r)
    is_openai = api == "openai"
    api_key = r.get("apiKey", str, "", required=not is_openai) or ""
    if _BAD_HEADER_TEXT.search(api_key):
        raise ConfigError(path, '"apiKey" must not contain line breaks or control characters '
                                "(two keys pasted into one?)")
    base = r.get("baseUrl", str, None, required=is_openai) or DEFAULT_BASE_URL[api]
    base = _normalize_base(api, _parse_url(base, path, "baseUrl", ("http", "https")))
    if "@" in urllib.parse.urlsplit(base).netloc:    # it would go out in the Host header
        raise ConfigError(path, '"baseUrl" must not hold a user name or password: put the key '
                                'in "apiKey", or a header in "headers"', f"{path}.baseUrl")
    proxy_url = r.get("proxyUrl", str, "") or ""
    if proxy_url:
        _parse_url(proxy_url, path, "proxyUrl", PROXY_SCHEMES)
    name = (r.get("name", str, "", required=is_openai) or _provider_name(base)).strip()
    retry = r.get("requestRetry", int)
    if retry is not None and not 0 <= retry <= 20:
        raise ConfigError(path, f'"requestRetry" must be between 0 and 20, got {retry}')
    prefix = (r.get("prefix", str, "") or "").strip().strip("/")
    headers = _parse_headers(r)
    region = bedrock_region(base, headers) if api == "anthropic" else ""
    wire = (r.get("wireApi", str, "") or "").strip().lower() if is_openai else ""
    if wire not in ("", "chat", "responses"):
        raise ConfigError(path, f'"wireApi" must be "chat" or "responses", got {wire!r}')
    return Credential(
        api=api, dialect=_dialect(api, base, region), path=path, name=name,
        api_key=api_key.strip(), base_url=base, headers=headers, proxy_url=proxy_url,
        models=_parse_models(r, is_openai), excluded=r.strings("excludedModels"), prefix=prefix,
        request_retry=retry, key=f"{api}|{base}|{short_hash(api_key)}|{short_hash(repr(headers))}",
        bedrock_region=region, wire_api=wire)


def _dialect(api: str, base_url: str, region: str) -> str:
    """Which upstream adapter (section 9) serves a credential."""
    if region:
        return "bedrock"
    if api == "anthropic" and (urllib.parse.urlsplit(base_url).hostname or "").endswith(
            ".services.ai.azure.com"):
        return "azure"
    return api


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


PRESENTED_KEYS = ("proxyApiKey", "apiKeys", "managementKey")   # clients send them in headers
_KEY_TEXT = re.compile("(?:[\x21-\x7e\xa1-\xff](?:[\x20-\x7e\xa0-\xff]*[\x21-\x7e\xa1-\xff])?)?")


def _setting(r: _Reader, setting: Setting) -> Any:
    """One top-level setting, read and checked as SETTINGS describes it."""
    if setting.key in PRESENTED_KEYS:
        value = r.strings(setting.key) if setting.kind is list else \
            r.get(setting.key, str, setting.default)
        for key in [value] if isinstance(value, str) else value:
            if _KEY_TEXT.fullmatch(key) is None:
                raise ConfigError(setting.key, "must be text a client can send in a header: "
                                  "printable Latin-1, without spaces at either end")
        return tuple(value) if isinstance(value, list) else value
    if setting.kind is list:
        return r.strings(setting.key)
    if setting.low is not None:
        return r.number(setting.key, setting.default, setting.low, setting.high or 0, setting.kind)
    value = r.get(setting.key, setting.kind, setting.default)
    if setting.kind is str:
        value = (value or setting.default) if setting.key == "host" else value
        value = value.strip().lower() if setting.choices else value
        if setting.choices and value not in setting.choices:
            raise ConfigError(setting.key, "must be " + " or ".join(f'"{c}"' for c in setting.choices)
                              + f", got {value!r}")
        if setting.key == "proxyUrl" and value:
            _parse_url(value, "", "proxyUrl", PROXY_SCHEMES)
        value = value.strip() if setting.key == "host" else value
    return tuple(value) if isinstance(value, list) else value


def parse_config(raw: Any, path: str = "", loaded: bool = True) -> Config:
    """Validate a config object (the parsed JSON) into a Config. Pure; raises ConfigError."""
    r = _Reader(raw, "")
    values = {s.attr: _setting(r, s) for s in SETTINGS}
    slots: List[Tuple[Optional[Credential], str, bool]] = []   # (entry, name, made)
    for list_key, api in CREDENTIAL_LISTS.items():
        for i, item in enumerate(r.get(list_key, list, [])):
            where = f"{list_key}[{i}]"
            if isinstance(item, dict) and _Reader(item, where).get("disabled", bool, False):
                slots.append((None, _default_name(api, item), True))   # (keeps its number)
                continue                   # switched off on the page; kept in the file
            cred = _parse_credential(api, item, where)
            slots.append((cred, cred.name, not item.get("name")))
    if values["management_key"] and values["management_key"] in \
            (values["proxy_api_key"],) + tuple(values["api_keys"]):
        raise ConfigError("managementKey", "must differ from proxyApiKey and apiKeys: the "
                                           "clients' key must not open the management page")
    if not _valid_host(values["host"].strip("[]")):
        raise ConfigError("host", f"must be an IP address or a host name, got "
                                  f"{printable(values['host'], 80)!r}")
    return Config(**values, credentials=_numbered(slots), mappings=_parse_mappings(r),
                  path=path, loaded=loaded, unknown_keys=tuple(sorted(set(raw) - KNOWN_KEYS)),
                  raw=raw)


def _default_name(api: str, item: Dict[str, Any]) -> str:
    """The name a switched-off entry made from its host would have (it keeps its number
    while off), "" for one named by the user or that says too little."""
    base = item.get("baseUrl") or DEFAULT_BASE_URL.get(api, "")
    if item.get("name") or not isinstance(base, str):
        return ""
    with contextlib.suppress(ValueError):  # (a switched-off entry may be half written)
        return _provider_name(_normalize_base(api, base))
    return ""


def _numbered(slots: List[Tuple[Optional[Credential], str, bool]]) -> Tuple[Credential, ...]:
    """The entries, names made from the host ("Anthropic") numbered where an earlier entry
    has the name already ("Anthropic 2"): two keys for one provider keep their own
    requests, errors and usage on the page. Names the user gave stay as they are. A
    switched-off entry (None) keeps its number, so switching one off renames no other."""
    taken = {name for _, name, made in slots if not made}
    out = []
    for cred, name, made in slots:
        numbered, n = name, 1
        while made and numbered in taken:
            n += 1
            numbered = f"{name} {n}"
        taken.add(numbered)
        if cred is not None:
            out.append(cred if numbered == cred.name else dataclasses.replace(cred, name=numbered))
    return tuple(out)


def check_exposure(config: Config, host: str) -> None:
    """Refuse to listen beyond loopback when the only key is the public default."""
    if not is_loopback(host) and DEFAULT_LOCAL_KEY in config.local_keys:
        raise ConfigError("host", f"{host!r} is reachable from other machines, but the public "
                                  f"default key {DEFAULT_LOCAL_KEY!r} is accepted: "
                                  'set "proxyApiKey" to a secret of your own')


def default_config_path(environ: Optional[Dict[str, str]] = None,
                        platform: str = sys.platform) -> str:
    """The OS default config path: %APPDATA%, Application Support or XDG."""
    env = os.environ if environ is None else environ
    home = env.get("HOME") or os.path.expanduser("~")
    if platform.startswith("win"):
        base = env.get("APPDATA") or os.path.join(home, "AppData", "Roaming")
    elif platform == "darwin":
        base = os.path.join(home, "Library", "Application Support")
    else:
        base = env.get("XDG_CONFIG_HOME") or os.path.join(home, ".config")
    return os.path.join(base, "proxypal", "config.json")


def parse_config_text(text: str, path: str) -> Any:
    """The JSON document of a config file's text; an empty file is an empty object."""
    try:
        return json.loads(text) if text.strip() else {}
    except json.JSONDecodeError as exc:
        raise ConfigError("", f"{path}: line {exc.lineno}, column {exc.colno}: {exc.msg} "
                              "(the config file must be valid JSON)") from None
    except (ValueError, RecursionError) as exc:   # e.g. a number with thousands of digits
        raise ConfigError("", f"{path}: not usable JSON ({exc})") from None


def load_config(path: Optional[str] = None) -> Config:
    """Read and validate a config file; a missing file gives an empty config."""
    path = path or os.environ.get("PROXYPAL_CONFIG") or default_config_path()
    try:
        with open(path, "r", encoding="utf-8-sig") as f:   # -sig: Notepad writes a BOM
            text = f.read()
    except FileNotFoundError:
        return Config(path=path, loaded=False, raw={})
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("", f"cannot read config file {path}: {exc}") from None
    return parse_config(parse_config_text(text, path), path=path)


class ConfigConflict(ProxypalError):
    """A save over a file that changed since the version the editor started from."""
    status = 409


class ConfigStore:
    """The only code that writes the config file. save() validates with parse_config
    first, refuses to overwrite a newer file than the one the caller edited, writes the
    new text aside in the same folder, fsyncs it, keeps the previous file as
    config.json.bak and renames the new one into place: the file is always whole, old
    or new. Keys it does not know are written back as they came. One save at a time,
    in this process (a lock) and across processes (a lock file)."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self._lock = threading.Lock()

    @staticmethod
    def version_of(data: Optional[bytes]) -> str:
        return hashlib.sha256(data).hexdigest()[:16] if data is not None else ""

    def read_bytes(self) -> Optional[bytes]:
        try:
            with open(self.path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ConfigError("", f"cannot read config file {self.path}: {exc}") from None

    def read(self) -> Tuple[Dict[str, Any], str]:
        """(the document, its version); ({}, "") when the file does not exist."""
        return self.document(self.read_bytes())

    def document(self, data: Optional[bytes]) -> Tuple[Dict[str, Any], str]:
        """(the document, its version) of the file's bytes; ({}, "") for no file."""
        if data is None:
            return {}, ""
        text = data.decode("utf-8-sig", "replace")
        raw = parse_config_text(text, self.path)
        if not isinstance(raw, dict):
            raise ConfigError("", f"{self.path}: the config must be a JSON object")
        return raw, self.version_of(data)

    def save(self, raw: Dict[str, Any], base_version: Optional[str] = None) -> Tuple[Config, str]:
        """Validate and write `raw`; base_version is the version the caller edited (None:
        whatever is there). Returns (the new Config, the new version)."""
        config = parse_config(raw, path=self.path)
        check_exposure(config, config.host)   # (a file the next start would refuse)
        data = (json.dumps(raw, indent=2, ensure_ascii=False) + "\n").encode("utf-8", JSON_ESCAPE)
        with self._lock, _FolderLock(os.path.dirname(self.path)):
            current = self.read_bytes()
            if base_version is not None and self.version_of(current) != base_version:
                raise ConfigConflict(f"{self.path} changed since it was read (by another editor "
                                     "or by hand): reload it, reapply your change, and save again")
            if current is not None and current != data:
                self.write_file(self.path + ".bak", current)
            self.write_file(self.path, data)
        return config, self.version_of(data)

    def create(self, raw: Dict[str, Any]) -> bool:
        """Write a new file; False (and nothing written) when one exists already. The file
        appears whole or not at all: written aside, then linked into place."""
        config = parse_config(raw, path=self.path)
        check_exposure(config, config.host)
        data = (json.dumps(raw, indent=2, ensure_ascii=False) + "\n").encode("utf-8", JSON_ESCAPE)
        with self._lock, _FolderLock(os.path.dirname(self.path)):
            if os.path.exists(self.path):
                return False
            temp = self.path + f".{os.getpid()}.new"
            self.write_file(temp, data)
            try:
                os.link(temp, self.path)      # fails if the path appeared meanwhile
            except FileExistsError:
                return False
            except OSError:                   # no hard links here (some filesystems)
                os.replace(temp, self.path)
            finally:
                with contextlib.suppress(OSError):
                    os.unlink(temp)
        return True

    @staticmethod
    def write_file(path: str, data: bytes) -> None:
        """Write aside in the same folder, fsync, rename into place: whole, old or new. A
        symbolic link (a dotfiles setup) is followed: its target gets the new text."""
        path = os.path.realpath(path)
        folder = os.path.dirname(path)
        try:
            os.makedirs(folder, exist_ok=True)
            fd, temp = tempfile.mkstemp(prefix=".config-", suffix=".tmp", dir=folder)
        except OSError as exc:
            raise ConfigWriteError("", f"cannot write {path}: {exc.strerror or exc}; the file "
                                       "was not changed") from None
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            _replace(temp, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise ConfigWriteError("", f"cannot write {path}: {exc.strerror or exc}; the file "
                                       "was not changed") from None
        _fsync_folder(folder)


def _replace(src: str, dst: str) -> None:
    """os.replace, retried for a moment on Windows: there a file that another process
    has open (a second proxy reading it, an editor, an indexer or antivirus scan) cannot
    be replaced (PermissionError) until it is closed."""
    for delay in (0.01, 0.03, 0.1, 0.25) if os.name == "nt" else ():
        try:
            return os.replace(src, dst)
        except PermissionError:
            time.sleep(delay)
    os.replace(src, dst)


def new_management_key() -> str:
    return "pp-mgmt-" + secrets.token_urlsafe(24)


def ensure_management_key(config: Config) -> Tuple[Config, str]:
    """(config, the key made now or ""). A config file without managementKey gets one,
    saved through ConfigStore (the file's other keys kept; the file is created when
    missing, so that the page has somewhere to save). When it cannot be saved the key
    still works until the proxy stops, and the log says why."""
    if config.management_key:
        return config, ""
    key = new_management_key()
    if config.path:
        store = ConfigStore(config.path)
        try:
            raw, version = store.read()
            raw["managementKey"] = key
            store.save(raw, version)
            config = dataclasses.replace(config, raw=raw, loaded=True)
        except ProxypalError as exc:
            log.warning("the new management key could not be saved (%s); it works until the "
                        "proxy stops", exc.message)
    return dataclasses.replace(config, management_key=key), key


def _fsync_folder(folder: str) -> None:
    """Make the rename itself durable (POSIX; Windows has no directory handles)."""
    if os.name != "posix":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _FolderLock:
    """A lock, across processes, on the folder of the config file: flock on the folder
    itself (POSIX: no lock file is left behind), a lock file on Windows. Exclusive for
    writers of whole files; `shared` for appenders, who may hold it together (its folder
    handle is kept open between uses, as each request takes it)."""

    def __init__(self, folder: str, shared: bool = False) -> None:
        self.folder, self.shared, self.fd = folder, shared, -1

    def __enter__(self) -> "_FolderLock":
        try:
            if os.name == "nt":            # msvcrt has one kind of lock: exclusive
                os.makedirs(self.folder, exist_ok=True)
                self.fd = os.open(os.path.join(self.folder, ".proxypal.lock"),
                                  os.O_RDWR | os.O_CREAT, 0o600)
                import msvcrt
                # Not LK_LOCK: it sleeps a whole second between tries (10 tries), and this
                # runs on the event loop. Try often instead, for as long.
                deadline = time.monotonic() + 10.0
                while True:
                    try:
                        msvcrt.locking(self.fd, msvcrt.LK_NBLCK, 1)
                        return self
                    except OSError:
                        if time.monotonic() > deadline:
                            raise
                        time.sleep(0.002)
            if self.fd < 0:
                os.makedirs(self.folder, exist_ok=True)
                self.fd = os.open(self.folder, os.O_RDONLY)
            fcntl.flock(self.fd, fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX)
        except OSError:
            pass                           # no lock to be had: the write will say what is wrong
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.fd < 0:
            return
        if self.shared and os.name != "nt":
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            return
        if os.name == "nt":                # unlocked before the close: Windows frees the
            import msvcrt                  # locks of a closed handle only "eventually"
            with contextlib.suppress(OSError):
                os.lseek(self.fd, 0, os.SEEK_SET)
                msvcrt.locking(self.fd, msvcrt.LK_UNLCK, 1)
        os.close(self.fd)                  # closing releases the lock
        self.fd = -1


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
# Host = uri-host [ ":" port ]; uri-host = IP-literal / IPv4address / reg-name (RFC 3986 3.2.2)
_HOST = re.compile(r"(?:\[[0-9A-Za-z:._~!$&'()*+,;=-]+\]|[0-9A-Za-z._~%!$&'()*+,;=-]*)(?::[0-9]*)?")
# field-line = field-name ":" OWS field-value OWS (RFC 9112 section 5), checked over the
# latin-1 text of all field lines at once: the fast path of every request.
_FIELDS = re.compile(r"(?:[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[\t\x20-\x7e\x80-\xff]*(?:\r\n(?!\Z)|\Z))*")


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
    line, _, fields = (head[:-4] if head.endswith(b"\r\n\r\n") else head).partition(b"\r\n")
    parts = line.split(b" ")
    if len(parts) != 3 or not _METHOD.match(parts[0]) or not parts[1] \
            or _BAD_TARGET_BYTES.search(parts[1]):
        raise WireError(f"malformed request line {printable(line.decode('latin-1'), 80)!r}")
    version = _VERSION.match(parts[2])
    if not version:
        raise WireError(f"malformed HTTP version {printable(parts[2].decode('latin-1'), 20)!r}")
    if version.group(1) != b"1":
        raise WireError("only HTTP/1.0 and HTTP/1.1 are supported", 505)
    if fields and fields.count(b"\r\n") >= MAX_HEADERS:
        raise WireError(f"more than {MAX_HEADERS} header fields", 431)
    block = fields.decode("latin-1")
    if len(block) <= MAX_HEADER_FIELD and _FIELDS.fullmatch(block):
        raw = [(name.lower(), value.strip(" \t")) for name, _, value in
               (line.partition(":") for line in block.split("\r\n") if line)]
    else:
        raw = header_fields(fields.split(b"\r\n"))
    headers: Dict[str, str] = dict(raw)
    if len(headers) < len(raw):            # repeated names: their values joined in order
        headers = {}
        for key, text in raw:
            headers[key] = headers[key] + ", " + text if key in headers else text
        if sum(1 for key, _ in raw if key == "host") > 1:
            raise WireError("more than one Host header (RFC 9112 section 3.2)")
    method = parts[0].decode("ascii")
    target = parts[1].decode("latin-1")
    http11 = version.group(2) != b"0"
    host = headers.get("host")
    if host is None:
        if http11:
            raise WireError("HTTP/1.1 request without a Host header (RFC 9112 section 3.2)")
    elif _HOST.fullmatch(host) is None:
        raise WireError(f"invalid Host header {printable(host, 60)!r} (RFC 9112 section 3.2)")
    conn = headers.get("connection", "").lower()
    keep_alive = ("close" not in conn) if http11 else ("keep-alive" in conn)
    path, _, query = target.partition("?")
    if path.startswith(("http://", "https://")):   # absolute-form (RFC 9112 3.2.2); its
        try:                                        # host is checked by check_target
            url = urllib.parse.urlsplit(target)
            url.port                       # (raises for a port that is not a number)
        except ValueError:
            raise WireError(f"invalid request target {printable(target, 60)!r}") from None
        path, query = url.path or "/", url.query
    return Request(method, target, path, query, f"HTTP/1.{version.group(2).decode()}",
                   headers, raw, keep_alive)


def header_fields(lines: Sequence[bytes]) -> List[Tuple[str, str]]:
    """(lower-case name, value) of each field line, checked one by one: the error names
    what is wrong. parse_request_head checks a whole block of good lines at once
    (_FIELDS) and comes here for any other."""
    raw: List[Tuple[str, str]] = []
    for line in lines:
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
        raw.append((name.decode("ascii").lower(), value.decode("latin-1")))
    return raw


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
    rb'(?:[ \t]*=[ \t]*(?:[!#$%&\'*+\-.^_`|~0-9A-Za-z]+|"(?:[^"\\\x00-\x08\x0a-\x1f\x7f]|\\[\t -~\x80-\xff])*"))?)*)[ \t]*\Z')


_HEX_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})")
_CHUNK_HEAD = re.compile(rb"([0-9A-Fa-f]{1,16})\r\n")
_HEX_SIZES = re.compile(rb"[0-9A-Fa-f]{1,16}(?:,[0-9A-Fa-f]{1,16})*")


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
        self._split = True                 # chunk data without CRLF so far (_split_chunks)

    def feed(self, data: bytes) -> List[bytes]:
        if self.done:
            self.unused += data
            return []
        out: List[bytes] = []
        buf = self._buf + data if self._buf else data
        pos, end = 0, len(buf)             # one index through buf: no copy per chunk
        if self._state == "size":
            pos = self._whole_chunks(buf, pos, out)
        while pos < end and not self.done:
            if self._state == "data":
                take = min(self._left, end - pos)
                out.append(buf[pos:pos + take])
                pos += take
                self._left -= take
                if not self._left:
                    self._state = "crlf"
            elif self._state == "crlf":
                if end - pos < 2:
                    break
                if buf[pos:pos + 2] != b"\r\n":
                    raise WireError("chunk data not followed by CRLF")
                pos, self._state = self._whole_chunks(buf, pos + 2, out), "size"
            else:
                line_end = buf.find(b"\r\n", pos)
                limit = MAX_CHUNK_LINE if self._state == "size" else MAX_TRAILER_BLOCK
                if line_end < 0:
                    if end - pos > limit or buf.find(b"\n", pos) >= 0:
                        raise WireError("invalid chunk size line")
                    break
                line, pos = buf[pos:line_end], line_end + 2
                if self._state == "size":
                    if len(line) > MAX_CHUNK_LINE:   # (however it arrived: whole or not)
                        raise WireError("invalid chunk size line: longer than "
                                        f"{MAX_CHUNK_LINE} bytes")
                    self._size_line(line)
                elif not line:
                    self.done, self.unused, pos = True, buf[pos:], end
                elif b"\r" in line or b"\n" in line or line[:1] in (b" ", b"\t") \
                        or b":" not in line:
                    raise WireError("malformed chunked trailer")
        self._buf = buf[pos:] if pos < end else b""
        return out

    def _split_chunks(self, buf: bytes, pos: int, out: List[bytes]) -> int:
        """Take the complete chunks at the start of buf without a loop of ours: split at
        every CRLF and read the pieces as size, data, size, data... Where every size is
        bare hex equal to the length of the piece after it, that reading is the right one
        (data holding a CRLF would split short of its size), so an event stream is decoded
        by a few calls of C. Any other body, from the first mismatch on, goes through
        _whole_chunks and the state machine (and this decoder stops trying)."""
        parts = (buf[pos:] if pos else buf).split(b"\r\n")
        pairs = (len(parts) - 1) // 2
        sizes = parts[0:2 * pairs:2]
        joined = b",".join(sizes)
        if not pairs or not _HEX_SIZES.fullmatch(joined) or joined.count(b",") != pairs - 1:
            self._split = pairs == 0
            return pos
        numbers = list(map(int, sizes, itertools.repeat(16)))
        whole = numbers.index(0) if 0 in numbers else pairs     # 0: the last chunk
        data = parts[1:2 * whole:2]
        lengths = list(map(len, data))
        if numbers[:whole] != lengths:
            self._split = False
            return pos
        out += data
        self._count(sum(lengths))
        return pos + sum(map(len, sizes[:whole])) + sum(lengths) + 4 * whole

    def _whole_chunks(self, buf: bytes, pos: int, out: List[bytes]) -> int:
        """Take the complete, bare-sized chunks from buf[pos:] in one tight loop (an
        upstream's burst of events: one chunk each) and return where they end; anything
        else (a partial chunk, extensions, the last chunk, an error) is left to feed()."""
        if self._split and len(buf) - pos > 2048:      # several chunks: worth a split
            pos = self._split_chunks(buf, pos, out)
        match, taken = _CHUNK_HEAD.match, 0
        while True:
            head = match(buf, pos)
            if head is None:
                break
            start = head.end()
            stop = start + int(head.group(1), 16)
            if stop == start or not buf.startswith(b"\r\n", stop):
                break
            out.append(buf[start:stop])
            taken += stop - start
            pos = stop + 2
        self._count(taken)
        return pos

    def _size_line(self, line: bytes) -> None:
        match = _HEX_SIZE.fullmatch(line) or _CHUNK_LINE.match(line)   # bare size: most
        if not match:
            raise WireError(f"invalid chunk size line {printable(line.decode('latin-1'), 40)!r}")
        size = int(match.group(1), 16)
        self._count(size)
        self._left = size
        self._state = "data" if size else "trailer"

    def _count(self, size: int) -> None:
        self.size += size
        if self.size > self.max_size:
            raise WireError(f"request body larger than the {size_text(self.max_size)} limit "
                            "(maxBodyMb)", 413)


_SSE_BOUNDARY = re.compile(rb"(?:\r\n|\n|\r(?!\n))(?:\r\n|\n|\r(?!\n))")


class SSESplitter:
    """Splits a byte stream into complete SSE events (each through its blank line),
    as WHATWG's event stream grammar delimits them: CRLF, LF or lone CR."""

    def __init__(self) -> None:
        self.rest = b""                      # the start of an event still arriving
        self._held: List[bytes] = []         # ...and its later reads, not joined yet
        self._size = 0

    def take(self, data: bytes) -> Optional[bytes]:
        """What has arrived of the events not split off yet, `data` included, for the caller
        to split (it sets `rest` to what is left); None when `data` only lengthens an event
        begun in an earlier read (no blank line can end in it): it is kept aside, so that
        a long event costs one join at its end, not one per read. Refuses an event over
        MAX_STREAM_EVENT."""
        if not (self.rest or self._held):
            return data                      # the common case: every read ends its events
        if not data:
            return None
        before = (self._held[-1] if self._held else self.rest)[-1:]
        if b"\n\n" not in data and not (before == b"\n" and data[:1] == b"\n") \
                and before != b"\r" and b"\r" not in data:   # (cheapest first)
            self._held.append(data)
            self._size += len(data)
            if len(self.rest) + self._size > MAX_STREAM_EVENT:
                raise UpstreamError(f"upstream sent a stream event over "
                                    f"{size_text(MAX_STREAM_EVENT)} without its end")
            return None
        buf = b"".join([self.rest, *self._held, data])
        self.rest, self._held, self._size = b"", [], 0
        return buf

    @property
    def waiting(self) -> bytes:
        """What has arrived of an event not complete yet."""
        return b"".join([self.rest, *self._held]) if self._held else self.rest

    def feed(self, data: bytes) -> List[bytes]:
        buf = self.take(data)
        if buf is None:
            return []
        if b"\r" not in buf:              # LF only, as nearly every upstream: one split
            *whole, self.rest = buf.split(b"\n\n")
            return [event + b"\n\n" for event in whole]
        events, start = [], 0
        while True:
            match = _SSE_BOUNDARY.search(buf, start)
            if not match:
                break
            # An event ending in a CR is complete even if an LF follows it (the LF is then
            # an empty line that dispatches nothing), so it goes out at once.
            events.append(buf[start:match.end()])
            start = match.end()
        self.rest = buf[start:]
        return events

    def close(self) -> List[bytes]:
        """At end of stream: a final event left without its blank line, if any."""
        rest, self.rest, self._held = self.waiting, b"", []
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
            event = value or "message"     # (an empty type is "message": WHATWG dispatch)
        elif name == "data":
            data.append(value)
    if not data and block.lstrip()[:1] == b"{" and block.rstrip()[-1:] == b"}":
        return "message", block.decode("utf-8", "replace").strip()   # Google's error mid-stream:
    return (event, "\n".join(data)) if data else None                  # a bare JSON object


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
    # (a value with text beyond latin-1, such as a hint naming a client's model, is
    # escaped rather than refused: the head must go out whole)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "backslashreplace")


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked response body."""
    return b"%x\r\n%s\r\n" % (len(data), data)


# =============================================================================
# 6. API formats
# Strategy: one Format record per API a client or an upstream speaks (OpenAI
# Chat Completions, Anthropic Messages, Gemini, OpenAI Responses): its client
# paths and operations, its error body and status-to-type table, how it frames
# stream events, how a stream of it ends, and where its usage lives. Everything
# below asks the record instead of testing format names. Pure.
# =============================================================================

ANTHROPIC_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                         402: "billing_error", 403: "permission_error", 404: "not_found_error",
                         413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
                         503: "overloaded_error", 504: "timeout_error", 529: "overloaded_error"}
ANTHROPIC_ERROR_STATUS = {"invalid_request_error": 400, "authentication_error": 401,
                          "billing_error": 402, "permission_error": 403, "not_found_error": 404,
                          "request_too_large": 413, "rate_limit_error": 429, "api_error": 500,
                          "timeout_error": 504, "overloaded_error": 529}
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


def _openai_error(status: int, message: str, err_type: str = "",
                  code: Optional[str] = None) -> Dict[str, Any]:
    if code in (None, "", "invalid_request_error") and context_overflow(status, message):
        status, code = 400, "context_length_exceeded"     # (a generic code says less)
    kind = err_type or OPENAI_ERROR_TYPES.get(status) or (
        "api_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": None,
                      "code": OPENAI_ERROR_CODES.get(status) if code is None else code or None}}


# A prompt over the model's context window, in any API's words. Clients recover only
# from their own API's: Claude Code compacts on Anthropic's "prompt is too long", Codex
# on OpenAI's code context_length_exceeded; other words leave a session stuck at its limit.
_CONTEXT_OVERFLOW = re.compile(r"context_length_exceeded|prompt is too long|too many tokens|"
                               r"context (?:length|window|size|limit)|input token count .{0,40}exceeds",
                               re.I)


_WINDOW = re.compile(r"maximum context length is (\d+)", re.I)
_ASKED = re.compile(r"\((\d+) in the messages, (?:(\d+) in the functions, and )?(\d+) in the completion\)|"
                    r"is too large: (\d+)\. This model's maximum context length is \d+ tokens and "
                    r"your request has (\d+) input", re.I)
# Claude Code retries with a lower max_tokens on Anthropic's own words for an output cap
# that does not fit beside the prompt, when that leaves the window minus a 1,000 token
# margin at least its floor of 3,000 output tokens; else only compacting can help.
CLAUDE_CODE_OUTPUT_ROOM = 4000


def overflow_sizes(message: str) -> Optional[Tuple[int, int, int]]:
    """(prompt, output, window) tokens of an OpenAI-compatible server's context overflow:
    OpenAI's and DeepSeek's "maximum context length is W tokens. However, you requested T
    tokens (P in the messages[, F in the functions, and] C in the completion)", vLLM's
    "'max_tokens' or 'max_completion_tokens' is too large: C. This model's maximum
    context length is W tokens and your request has P input tokens"."""
    window, asked = _WINDOW.search(message), _ASKED.search(message)
    if not window or not asked:
        return None
    if asked.group(1):                     # (the tools count as prompt)
        return int(asked.group(1)) + int(asked.group(2) or 0), int(asked.group(3)), int(window.group(1))
    return int(asked.group(5)), int(asked.group(4)), int(window.group(1))


def context_overflow(status: int, message: str) -> bool:
    return status in (400, 413) and bool(_CONTEXT_OVERFLOW.search(message))


def _anthropic_overflow(message: str) -> str:
    """An overflow in Anthropic's words, the ones Claude Code acts on: "input length and
    `max_tokens` exceed context limit" (it lowers max_tokens and retries) when the prompt
    leaves room for an answer, else "prompt is too long" (it compacts)."""
    sizes = overflow_sizes(message)
    if sizes and sizes[0] + CLAUDE_CODE_OUTPUT_ROOM <= sizes[2]:
        return ("input length and `max_tokens` exceed context limit: %d + %d > %d, decrease input "
                "length or `max_tokens` and try again (%s)" % (*sizes, message))
    return f"prompt is too long: {message}"


def _anthropic_error(status: int, message: str, err_type: str = "",
                     code: Optional[str] = None) -> Dict[str, Any]:
    if context_overflow(status, message) and "prompt is too long" not in message and \
            "exceed context limit" not in message:
        status, message = 400, _anthropic_overflow(message)
    kind = err_type or ANTHROPIC_ERROR_TYPES.get(status) or (
        "api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def client_status(fmt: str, status: int) -> int:
    """The HTTP status an error goes to a client with: Anthropic's 529 "overloaded" is
    Gemini's 503 (google-genai retries 408, 429, 500, 502, 503 and 504, not 529)."""
    return 503 if status == 529 and fmt == "gemini" else status


def _gemini_error(status: int, message: str, err_type: str = "",
                  code: Optional[str] = None) -> Dict[str, Any]:
    status = client_status("gemini", status)
    return {"error": {"code": status, "message": message,
                      "status": GEMINI_STATUSES.get(status, "INTERNAL" if status >= 500
                                                    else "FAILED_PRECONDITION")}}


def _named_event(event: str, data: str) -> bytes:
    return f"event: {event}\ndata: {data}\n\n".encode("utf-8", JSON_ESCAPE)


def _data_event(event: str, data: str) -> bytes:
    return f"data: {data}\n\n".encode("utf-8", JSON_ESCAPE)


_OPENAI_FINISHED = re.compile(rb'"finish_reason"\s*:\s*"|^data:\s*\[DONE\]|^data:\s*\{\s*"error"', re.M)
_GEMINI_FINISHED = re.compile(rb'"finishReason"\s*:|^(?:data:)?\s*\{\s*"error"', re.M)
_RESPONSES_FINISHED = re.compile(
    rb'^event:\s*response\.(?:completed|incomplete|failed)\s*$'
    rb'|^data:\s*\{\s*"type"\s*:\s*"response\.(?:completed|incomplete|failed)"', re.M)
_SEQUENCE = re.compile(rb'"sequence_number"\s*:\s*(\d+)')


def _responses_failure(status: int, message: str, last: bytes = b"") -> bytes:
    """A relayed Responses stream that failed: error, then response.failed (what Codex
    acts on), numbered after the last event relayed; only response.failed when that last
    event was the upstream's own error."""
    found = _SEQUENCE.findall(last)
    seq = int(found[-1]) + 1 if found else 0
    code = "rate_limit_exceeded" if status == 429 else "server_error"
    error = {"type": "error", "sequence_number": seq, "code": code, "message": message, "param": None}
    failed = {"type": "response.failed", "sequence_number": seq + 1, "response": {
        "id": "resp_proxypal", "object": "response", "status": "failed",
        "error": {"code": code, "message": message}, "output": [], "usage": None}}
    if last.startswith((b"event: error\n", b"event:error\n")):     # said already
        failed["sequence_number"] = seq
        return _named_event("response.failed", dumps(failed).decode())
    return _named_event("error", dumps(error).decode()) + \
        _named_event("response.failed", dumps(failed).decode())


def _gemini_event(event: str, data: str) -> bytes:
    """A Gemini stream chunk; an error as a bare JSON object, not an SSE event, the way
    Google's API sends one mid-stream: @google/genai (Gemini CLI) raises an ApiError with
    its status, which Gemini CLI retries, only for a read that is such an object."""
    return (data + "\n\n").encode("utf-8", JSON_ESCAPE) if event == "error" else _data_event(event, data)


def _anthropic_finished(recent: Sequence[bytes]) -> bool:
    last = parse_sse_event(recent[-1]) if recent else None
    return bool(last) and last[0] in ("message_stop", "error")


Tokens = Tuple[Optional[int], Optional[int], Optional[int], Optional[int]]
NO_TOKENS: Tokens = (None, None, None, None)


def usage_counts(obj: Any) -> Tokens:
    """(input, output, cached, reasoning) tokens any format's answer or stream event
    reports; None where it says nothing. Input includes cached tokens (Anthropic counts
    them apart, so they are added back); output includes reasoning."""
    if not isinstance(obj, dict):
        return NO_TOKENS
    usage = obj.get("usage") or obj.get("usageMetadata")
    if usage is None and isinstance(obj.get("message"), dict):
        usage = obj["message"].get("usage")          # Anthropic message_start
    if usage is None and isinstance(obj.get("response"), dict):
        usage = obj["response"].get("usage")         # Responses terminal events
    if not isinstance(usage, dict):
        return NO_TOKENS

    def total(*keys: str, within: Any = usage) -> Optional[int]:
        if not isinstance(within, dict):
            return None
        values = [within[k] for k in keys if isinstance(within.get(k), int)]
        return sum(values) if values else None
    if "promptTokenCount" in usage or "candidatesTokenCount" in usage:
        return (total("promptTokenCount"), total("candidatesTokenCount", "thoughtsTokenCount"),
                total("cachedContentTokenCount"), total("thoughtsTokenCount"))
    if "prompt_tokens" in usage or "completion_tokens" in usage:
        cached = total("cached_tokens", within=usage.get("prompt_tokens_details"))
        return (total("prompt_tokens"), total("completion_tokens"),
                total("prompt_cache_hit_tokens") if cached is None else cached,   # (DeepSeek's)
                total("reasoning_tokens", within=usage.get("completion_tokens_details")))
    return (total("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"),
            total("output_tokens"),
            total("cache_read_input_tokens") if "cache_read_input_tokens" in usage else
            total("cached_tokens", within=usage.get("input_tokens_details")),
            total("reasoning_tokens", within=usage.get("output_tokens_details")))


def merged_tokens(old: Tokens, new: Tokens) -> Tokens:
    """Each count's latest known value (streams report usage in pieces)."""
    return tuple(n if n is not None else o for o, n in zip(old, new))  # type: ignore


@dataclasses.dataclass(frozen=True)
class Format:
    """What one API is on the wire, apart from translation (section 7)."""
    name: str                              # "openai", "anthropic", "gemini", "responses"
    title: str                             # for messages: "OpenAI Chat Completions"
    paths: Dict[str, str]                  # client POST path -> operation
    error: Callable[..., Dict[str, Any]]   # (status, message, type, code) -> body
    encode: Callable[[str, str], bytes]    # one stream event, framed
    end_marker: str                        # what a complete stream ends with, for messages
    finished: Callable[[Sequence[bytes]], bool]   # do these last events end the stream?
    opening: Tuple[str, ...] = ()          # the events that open a stream, if it has any
    ping: bytes = b": keep-alive\n\n"     # what keeps a silent stream alive
    end: bytes = b""                       # bytes a stream's last event holds: a cheap test,
                                           # for every read, before `last_event`
    last_event: Optional[Any] = None       # matches bytes that end with the stream's last event
                                           # (none for Gemini: its last chunk is like the others)

    def error_body(self, status: int, message: str, err_type: str = "",
                   code: Optional[str] = None) -> bytes:
        return dumps(self.error(status, message, err_type, code))

    def events(self, events: Sequence[Tuple[str, str]]) -> bytes:
        """A writer's (event, data) pairs as this format's stream bytes."""
        encode = self.encode
        return b"".join([encode(e, d) for e, d in events])

    failure: Optional[Callable[..., bytes]] = None   # its own way to end a failed stream

    def stream_error(self, status: int, message: str, last: bytes = b"") -> bytes:
        """An error as the last event of a stream that had already begun (`last`: the last
        event relayed, for formats that number their events)."""
        if self.failure is not None:
            return self.failure(status, message, last)
        return self.encode("error", dumps(self.error(status, message, "")).decode("utf-8"))


FORMATS: Dict[str, Format] = {f.name: f for f in (
    Format("openai", "OpenAI Chat Completions",
           {"/v1/chat/completions": "generate", "/v1/completions": "completions",
            "/v1/embeddings": "embeddings"},
           _openai_error, _data_event, "a finish_reason",
           lambda recent: any(_OPENAI_FINISHED.search(e) for e in recent), end=b"[DONE]",
           last_event=re.compile(rb"(?:\A|\n)data:[ ]?\[DONE\][ \t]*\r?\n\r?\n\Z")),
    Format("anthropic", "Anthropic Messages",
           {"/v1/messages": "generate", "/v1/messages/count_tokens": "count"},
           _anthropic_error, _named_event, "message_stop", _anthropic_finished, ("message_start",),
           b'event: ping\ndata: {"type":"ping"}\n\n', end=b"message_stop",
           last_event=re.compile(rb"(?:\A|\n)event:[ ]?message_stop\r?\ndata:[^\n]*\n\r?\n\Z")),
    Format("gemini", "Gemini",
           {"generateContent": "generate", "streamGenerateContent": "stream",
            "countTokens": "count"},
           _gemini_error, _gemini_event, "a finishReason",
           lambda recent: any(_GEMINI_FINISHED.search(e) for e in recent), end=b"finishReason"),
    Format("responses", "OpenAI Responses",
           {"/v1/responses": "generate", "/v1/responses/input_tokens": "count"},
           _openai_error, _named_event, "response.completed",
           lambda recent: any(_RESPONSES_FINISHED.search(e) for e in recent),
           ("response.created", "response.in_progress"), failure=_responses_failure,
           end=b"usage", last_event=re.compile(         # (only the last events carry usage)
               rb"(?:\A|\n)event:[ ]?response\.(?:completed|incomplete)\r?\ndata:[^\n]*\n\r?\n\Z")),
)}


def format_of_path(path: str) -> str:
    """The API a path speaks, for answers to requests that match no route."""
    path = strip_amp_prefix(path)
    if path.startswith("/v1/messages"):
        return "anthropic"
    if path.startswith("/v1beta/") or (path.startswith("/v1/models/") and ":" in path):
        return "gemini"
    if path.startswith("/v1/responses"):
        return "responses"
    return "openai"


def strip_amp_prefix(path: str) -> str:
    """Amp CLI's /api/provider/{provider}/v1/... routes reach the /v1/... handlers."""
    if path.startswith("/api/provider/"):
        rest = path[len("/api/provider/"):]
        slash = rest.find("/")
        if 0 <= slash < len(rest) - 1:     # (nothing after the provider: no route, not "/")
            return rest[slash:]
    return path


def error_body(fmt: str, status: int, message: str, err_type: str = "",
               code: Optional[str] = None) -> bytes:
    """The one renderer of every error the proxy answers, in the client's format."""
    return FORMATS[fmt].error_body(status, message, err_type, code)


def upstream_message(body: bytes) -> Tuple[str, str]:
    """(message, code) out of any upstream error body: OpenAI, Anthropic, Gemini,
    Azure ({"error": {"code": "DeploymentNotFound"}}), Ollama ({"error": "..."}), text."""
    try:
        obj = loads_json(body)
    except ValueError:
        if body.lstrip().startswith((b"event:", b"data:")):    # an error sent as a stream
            parsed = parse_sse_event(body.lstrip().split(b"\n\n", 1)[0])
            if parsed and parsed[1].lstrip().startswith("{"):
                return upstream_message(parsed[1].encode("utf-8"))
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
                        provider: str, hint: str = "") -> Tuple[bytes, bool]:
    """An upstream's error for the client, and whether it went as it came. Same format
    and the client's shape: the body byte for byte (Claude Code's recovery reads the
    upstream's own wording; the provider is named in a header). Otherwise rebuilt with the
    client format's own types: the provider, the upstream's message and the hint."""
    if client_fmt == upstream_fmt:
        try:
            obj = loads_json(body)
        except ValueError:
            obj = None
        err = obj.get("error") if isinstance(obj, dict) else None
        if isinstance(err, dict) and isinstance(err.get("message"), str) and (
                client_fmt != "anthropic" or obj.get("type") == "error"):
            return body, True
    message, code = upstream_message(body)
    if code and code not in message and not code.isdigit():
        message = f"{code}: {message}"
    err_type = "not_found_error" if client_fmt == "anthropic" and code == "DeploymentNotFound" else ""
    message = f"{provider}: {message}" + (f" ({hint})" if hint else "")
    openai_family = ("openai", "responses")       # (one vocabulary of codes: insufficient_quota...)
    kept = code if client_fmt in openai_family and upstream_fmt in openai_family and code and \
        not code.isdigit() else None
    return error_body(client_fmt, status, message, err_type, kept), False


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
    except (TypeError, ValueError, IndexError, OverflowError, OSError):
        return None                        # (a "-0000" date is local time: Windows' localtime
                                           # refuses one before 1970 or after 3000, OSError)
    return max(0.0, when - (time.time() if now is None else now))


_RETRY_DELAY = re.compile(r'"retryDelay"\s*:\s*"([0-9.]+)s"')
_RETRY_IN = re.compile(r"Please retry in ([0-9.]+)(ms|s)\b")
RETRY_INFO = "type.googleapis.com/google.rpc.RetryInfo"


def google_retry_delay(body: bytes) -> Optional[float]:
    """Seconds from a Google error's RetryInfo detail ("retryDelay": "35s",
    https://cloud.google.com/apis/design/errors#error_details), else its message's
    "Please retry in 35.8s", which Gemini CLI reads too."""
    if b"etry" not in body:
        return None
    text = body.decode("utf-8", "replace")
    found = _RETRY_DELAY.search(text)
    with contextlib.suppress(ValueError):
        if found:
            return float(found.group(1))
        found = _RETRY_IN.search(text)
        return float(found.group(1)) / (1000 if found.group(2) == "ms" else 1) if found else None
    return None


def retry_hints(fmt: str, status: int, body: bytes, headers: List[Tuple[str, str]],
                delay: Optional[float]) -> Tuple[bytes, List[Tuple[str, str]]]:
    """A refusal to wait on says how long in the client's own terms: a Retry-After header
    (the Anthropic and OpenAI SDKs and Claude Code wait that long), and for a Gemini
    client a RetryInfo detail (Gemini CLI waits that long, else guesses)."""
    if delay is None or status not in (429, 503, 529) or not 0 <= delay <= COOLDOWN_RETRY_AFTER_CAP * 288:
        return body, headers               # (a day at most: a wait past it is no advice)
    if not any(k.lower() == "retry-after" for k, _ in headers):
        headers = headers + [("retry-after", str(math.ceil(delay)))]
    if fmt == "gemini" and RETRY_INFO.encode() not in body:
        with contextlib.suppress(ValueError, AttributeError):
            obj = loads_json(body)
            obj["error"].setdefault("details", []).append(
                {"@type": RETRY_INFO, "retryDelay": f"{math.ceil(delay)}s"})
            body = dumps(obj)
    return body, headers


def stream_usage(events: bytes) -> Tokens:
    """Token counts from the SSE events in `events` that carry any: only the events
    around each '"usage' are parsed (cheap when none do)."""
    found = NO_TOKENS
    at = events.find(b'"usage')
    if at < 0:
        return found
    if b"\r" in events:                    # CR line ends: split every event
        blocks = [b for b in re.split(rb"\r?\n\r?\n|\r\r", events) if b'"usage' in b]
    else:
        blocks = []
        while at >= 0:
            start, end = events.rfind(b"\n\n", 0, at) + 2, events.find(b"\n\n", at)
            end = len(events) if end < 0 else end
            blocks.append(events[max(start, 0) if start >= 2 else 0:end])
            at = events.find(b'"usage', end)
    for block in blocks:
        parsed = parse_sse_event(block)
        try:
            found = merged_tokens(found, usage_counts(loads_json(parsed[1])) if parsed
                                  else NO_TOKENS)
        except ValueError:
            continue
    return found


def last_events(out: bytes, count: int = 3) -> List[bytes]:
    """The last `count` events of LF-framed SSE bytes that end with a blank line,
    comments left out: where each format's end markers are."""
    events: List[bytes] = []
    end = len(out)
    while end > 0 and len(events) < count:
        start = out.rfind(b"\n\n", 0, end - 2) + 2
        start = start if start >= 2 else 0
        event = out[start:end]
        if event.strip(b"\n") and not (event[:1] == b":" and b"data" not in event):
            events.insert(0, event)
        end = start
    return events


def clamp_output_tokens(body: Dict[str, Any], limit: Optional[int],
                        interleaved: bool = False) -> None:
    """Apply a model entry's maxOutputTokens to whichever field the format uses.
    `interleaved`: the client asked for Anthropic's interleaved thinking, whose budget may
    exceed max_tokens (it spans the whole turn)."""
    if not limit:
        return
    lowered = isinstance(body.get("max_tokens"), int) and body["max_tokens"] > limit
    for key in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > limit:
            body[key] = limit
    for name in ("generationConfig", "generation_config"):    # (Google's JSON takes proto
        for key in ("maxOutputTokens", "max_output_tokens"):     # field names too)
            config = body.get(name)
            value = config.get(key) if isinstance(config, dict) else None
            if isinstance(value, int) and value > limit:     # (a new dict: the client's body,
                body[name] = dict(config, **{key: limit})    # shared below, stays as it came)
    thinking, cap = body.get("thinking"), body.get("max_tokens")
    if lowered and not interleaved and isinstance(thinking, dict) and \
            thinking.get("type") == "enabled" and isinstance(thinking.get("budget_tokens"), int) \
            and thinking["budget_tokens"] >= cap:
        # Anthropic's budget must stay under max_tokens: half the cap for thinking, as
        # translated requests get, or no thinking under a cap too small for its minimum
        if cap // 2 >= ANTHROPIC_MIN_THINKING_BUDGET:
            body["thinking"] = dict(thinking, budget_tokens=cap // 2)
        else:
            del body["thinking"]


# =============================================================================
# 7. Translation
# Strategy: every API format has one reader and one writer for requests, for
# answers and for streams, all meeting in an internal form of our own (7.1),
# never in another wire format: a Chat Completions pivot would lose thinking
# signatures, cache_control, exact thinking budgets, tool-result errors and
# images, and Gemini's functionResponse names. TRANSLATORS (7.6) composes the
# readers of one format with the writers of another; a client format is one
# request reader, one answer writer and one stream writer. Same-format pairs
# never enter the internal form: they are relayed byte for byte. Opaque values
# (Anthropic signatures and redacted thinking, Gemini thoughtSignature, Responses
# encrypted_content) remember the format that made them, travel to a client of
# another format tagged "pp1:<origin>:", and are only ever sent back to an
# upstream of their own format. Pure: no I/O, no config, no logging.
# =============================================================================

# -- 7.1 The internal form --------------------------------------------------------

@dataclasses.dataclass
class Text:
    text: str
    cache: Optional[Dict[str, Any]] = None     # Anthropic cache_control, positional


@dataclasses.dataclass
class Media:
    """An image, document or audio part: inline base64 `data`, or a `url` (http(s), gs://)."""
    mime: str
    data: str = ""
    url: str = ""
    name: str = ""
    where: str = ""                            # its place in the client's request, for errors
    cache: Optional[Dict[str, Any]] = None

    @property
    def kind(self) -> str:
        return self.mime.split("/")[0] if "/" in self.mime else "file"


@dataclasses.dataclass
class Reasoning:
    text: str = ""
    signature: str = ""                        # opaque; only for an upstream of `origin`
    origin: str = ""                           # the format whose upstream made the signature
    redacted: bool = False                     # Anthropic redacted_thinking: data in signature


@dataclasses.dataclass
class ToolCall:
    id: str
    name: str
    args: Any                                  # an object; raw text for a freeform tool
    signature: str = ""                        # Gemini thoughtSignature of a functionCall part
    origin: str = ""
    custom: bool = False                       # freeform (Responses "custom") tool


@dataclasses.dataclass
class ToolResult:
    call_id: str
    name: str                                  # the function answered, from the history
    parts: List[Any]                           # Text and Media
    is_error: bool = False
    where: str = ""
    cache: Optional[Dict[str, Any]] = None


@dataclasses.dataclass
class Turn:
    role: str                                  # "user", "assistant" or "system"
    parts: List[Any]


@dataclasses.dataclass
class Tool:
    name: str
    description: str = ""
    schema: Optional[Dict[str, Any]] = None    # JSON Schema of the arguments
    custom: bool = False                       # freeform text input (Codex's apply_patch)
    server: str = ""                           # run by the upstream: web_search, web_fetch...
    cache: Optional[Dict[str, Any]] = None
    optional: bool = False                     # a server tool offered by default: left out
                                               # where the upstream cannot run it


@dataclasses.dataclass
class Think:
    """What the client asked of reasoning: an effort word, an exact budget, or `dynamic`
    (Gemini's -1, Anthropic's adaptive). effort "none" turns it off."""
    effort: str = ""
    budget: Optional[int] = None
    dynamic: bool = False
    summary: str = ""                          # Responses reasoning.summary


@dataclasses.dataclass
class Chat:
    """A request in the internal form."""
    model: str = ""
    system: List[Text] = dataclasses.field(default_factory=list)
    turns: List[Turn] = dataclasses.field(default_factory=list)
    tools: List[Tool] = dataclasses.field(default_factory=list)
    tool_choice: str = ""                      # "", auto, any, none, tool
    tool_name: str = ""                        # with tool_choice "tool"
    parallel: Optional[bool] = None
    max_tokens: Optional[int] = None
    cap_includes_reasoning: bool = True        # max_tokens also pays for thinking
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    seed: Optional[int] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    stop: List[str] = dataclasses.field(default_factory=list)
    think: Optional[Think] = None
    output: Optional[Dict[str, Any]] = None    # {"type": "json_schema"|"json_object", ...}
    stream: Optional[bool] = None
    include_usage: bool = True                 # OpenAI clients: stream_options.include_usage
    user: str = ""
    n: int = 1
    extra: Dict[str, Any] = dataclasses.field(default_factory=dict)   # client-format echoes


@dataclasses.dataclass
class Usage:
    input: int = 0                             # all prompt tokens, cached ones included
    cached: int = 0                            # read from a prompt cache
    cache_write: int = 0                       # written to a prompt cache
    output: int = 0                            # all output tokens, reasoning included
    reasoning: int = 0
    total: int = 0                             # as the upstream said, else input + output

    def sum(self) -> int:
        return self.total or self.input + self.output


@dataclasses.dataclass
class Answer:
    """A whole (non-stream) answer in the internal form."""
    id: str
    parts: List[Any]                           # Reasoning, Text, ToolCall in order
    stop: str                                  # a canonical stop reason (STOPS)
    usage: Usage


# Canonical stop reasons; each format has one table in and one table out.
STOPS = ("end", "stop_sequence", "length", "tool", "refusal", "pause", "context")

# Reasoning effort <-> thinking budget, one table for every format. The budgets are
# the common suggestions: Anthropic needs >= 1024 (it raises smaller ones); 24576 is
# Gemini 2.5 Flash's ceiling; xhigh and max use Anthropic's common 32k.
EFFORT_BUDGETS = {"minimal": 512, "low": 1024, "medium": 8192, "high": 24576, "xhigh": 32768,
                  "max": 32768}
EFFORTS = ("none",) + tuple(EFFORT_BUDGETS)
OPENAI_EFFORT = {"max": "xhigh"}           # OpenAI's highest effort is xhigh; Anthropic's, max


def budget_of(think: Think) -> Optional[int]:
    """The thinking budget a Think asks for; 0 for off, None for 'the model decides'."""
    if think.effort == "none":
        return 0
    if think.budget is not None:
        return think.budget
    return EFFORT_BUDGETS.get(think.effort)


def effort_of(think: Think) -> str:
    """The effort word of a Think: given, else from its budget (<= 1024 low, <= 8192
    medium, else high: the three every reasoning API accepts); "" when dynamic."""
    if think.effort:
        return think.effort
    if think.budget is None:
        return ""
    if think.budget <= 0:
        return "none"
    return "low" if think.budget <= 1024 else "medium" if think.budget <= 8192 else "high"


OPAQUE_TAG = "pp1:"
OPAQUE_TAG_B64 = "cHAxO"                   # how base64 of "pp1:..." always begins


def carry(value: str, origin: str, client: str, redacted: bool = False) -> str:
    """An opaque value as a client of format `client` keeps it: unchanged when the
    client's own format made it, else tagged with its origin, so that it finds its way
    back to an upstream of that format and never to another. Gemini's thoughtSignature
    is bytes in base64 (google-genai refuses anything else): the tagged value is too."""
    if not value or (origin == client and not redacted):
        return value
    tagged = f"{OPAQUE_TAG}{origin}{'!' if redacted else ''}:{value}"
    return base64.b64encode(tagged.encode()).decode() if client == "gemini" else tagged


def uncarry(value: Any, client: str) -> Tuple[str, str, bool]:
    """(origin, value, redacted) of an opaque value a client sent back."""
    if not isinstance(value, str) or not value:
        return "", "", False
    if client == "gemini" and value.startswith(OPAQUE_TAG_B64):
        with contextlib.suppress(ValueError):
            decoded = base64.b64decode(value, validate=True).decode()
            value = decoded if decoded.startswith(OPAQUE_TAG) else value
    if value.startswith(OPAQUE_TAG) and value.count(":") >= 2:
        _, origin, raw = value.split(":", 2)
        return origin.rstrip("!"), raw, origin.endswith("!")
    return client, value, False


def carried(value: Any, client: str) -> bool:
    """An opaque value tagged on its way to a client (another format made it, or it was
    redacted): never one for an upstream of the client's own format to verify."""
    if not isinstance(value, str) or not value:
        return False
    origin, raw, redacted = uncarry(value, client)
    return origin != client or redacted or raw != value


def merged_turns(turns: Sequence[Turn]) -> List[Turn]:
    """Adjacent turns of one role merged (chat templates of vLLM and Ollama, Anthropic and
    Gemini all want user and assistant to alternate); empty turns dropped; in a user
    turn tool results come first (each answers the assistant turn before it)."""
    out: List[Turn] = []
    held: List[Turn] = []                  # system turns between a call and its results

    def add(turn: Turn) -> None:
        if not turn.parts:
            return
        if out and out[-1].role == turn.role:
            out[-1] = Turn(turn.role, out[-1].parts + turn.parts)
        else:
            out.append(Turn(turn.role, list(turn.parts)))
    for turn in turns:
        if turn.role == "system" and out and out[-1].role == "assistant" and \
                any(isinstance(p, ToolCall) for p in out[-1].parts):
            held.append(turn)              # (OpenAI wants a call's results right after it:
            continue                       # the system text waits until they came)
        add(turn)
        if turn.role == "user":
            for waiting in held:
                add(waiting)
            held = []
    for waiting in held:
        add(waiting)
    for turn in out:
        if turn.role == "user" and any(isinstance(p, ToolResult) for p in turn.parts):
            turn.parts.sort(key=lambda p: not isinstance(p, ToolResult))
    return out


def system_texts(chat: Chat) -> List[Text]:
    """The system prompt, with system turns from mid-conversation appended in order (for
    formats that take system text in one place only)."""
    texts = list(chat.system)
    for turn in chat.turns:
        if turn.role == "system":
            texts += [p for p in turn.parts if isinstance(p, Text)]
    return texts


def json_text(obj: Any) -> str:
    return dumps(obj).decode("utf-8")


def count(value: Any) -> int:
    """A token count as given, or 0 for anything that is not a positive whole number."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


_UNSAFE_ID = re.compile(r"[^a-zA-Z0-9_-]")


def safe_id(value: Any, fallback: str) -> str:
    """A tool or message id every API accepts (^[a-zA-Z0-9_-]+$). Deterministic, so a
    tool call and its result map alike without state (the same foreign id, the same
    safe id)."""
    text = value if isinstance(value, str) else ""
    return _UNSAFE_ID.sub("_", text) or fallback


# Tool names each API accepts: OpenAI and Anthropic ^[a-zA-Z0-9_-]{1,64}$; Gemini
# ^[A-Za-z_][A-Za-z0-9_.:-]{0,63}$ (ai.google.dev FunctionDeclaration.name). Clients
# send others (Gemini CLI's MCP tools hold dots, Codex's namespaced tools pass 64).
_GEMINI_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.:-]{0,63}\Z")
_TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")


@functools.lru_cache(maxsize=1024)
def stand_in_name(name: str) -> str:
    """A name every API accepts for one it may not: the invalid characters as "_", cut
    to fit, and a hash of the whole name so that two names never meet."""
    safe = _UNSAFE_ID.sub("_", name)[:54]
    safe = safe if safe[:1].isalpha() or safe[:1] == "_" else "_" + safe[:53]
    return f"{safe}_{hashlib.sha256(name.encode('utf-8', JSON_ESCAPE)).hexdigest()[:8]}"


def upstream_tool_names(chat: Chat, fmt: str) -> Chat:
    """The request with every tool name the upstream's API refuses replaced by its stand-in,
    in the tools, the tool choice and the history alike; the answer's calls are named
    back (names_back). Most requests need none: then the same Chat."""
    valid = (_GEMINI_NAME if fmt == "gemini" else _TOOL_NAME).match
    named = {t.name for t in chat.tools if not t.server}
    if "" in named:
        raise ClientError("a tool has an empty name: every API needs one")
    named.update([p.name for turn in chat.turns for p in turn.parts     # (the history can be
                  if p.__class__ is ToolCall or p.__class__ is ToolResult] + [chat.tool_name])   # long)
    renamed = {name: stand_in_name(name) for name in named if name and not valid(name)}
    if not renamed:
        return chat

    def part(p: Any) -> Any:
        return dataclasses.replace(p, name=renamed[p.name]) if isinstance(
            p, (ToolCall, ToolResult)) and p.name in renamed else p
    return dataclasses.replace(
        chat, tools=[dataclasses.replace(t, name=renamed.get(t.name, t.name)) for t in chat.tools],
        tool_name=renamed.get(chat.tool_name, chat.tool_name),
        turns=[Turn(turn.role, [part(p) for p in turn.parts]) for turn in chat.turns])


def names_back(ask: Optional[Chat]) -> Dict[str, str]:
    """Stand-in -> the client's own tool name, for the answer's calls."""
    return _names_back(tuple(t.name for t in ask.tools) if ask is not None else ())


@functools.lru_cache(maxsize=64)           # (a client sends the same tools every turn)
def _names_back(names: Tuple[str, ...]) -> Dict[str, str]:
    return {stand_in_name(name): name for name in names
            if name and not (_TOOL_NAME.match(name) and _GEMINI_NAME.match(name))}


_DATA_URL = re.compile(r"^data:([^;,]+)?((?:;[^;,]*)*?);base64,(.*)$", re.S)


def media_from_url(url: Any, where: str, name: str = "", mime: str = "") -> Media:
    """A data: URL as inline data, an http(s):// or gs:// URL as a reference; any other
    value is refused here, whatever the upstream."""
    text = url if isinstance(url, str) else ""
    match = _DATA_URL.match(text)
    if match:
        return Media(match.group(1) or mime or "application/octet-stream", data=match.group(3),
                     name=name, where=where)
    if text.startswith(("http://", "https://")):
        return Media(mime or _mime_of(text), url=text, name=name, where=where)
    if text.startswith("gs://"):
        return Media(mime, url=text, name=name, where=where)
    raise ClientError(f"{where} is {_short(text[:60])}; send a base64 data: URL or an http(s) URL")


def _mime_of(url: str) -> str:
    ext = url.rsplit("?", 1)[0].rsplit(".", 1)[-1].lower()
    return {"png": "image/png", "jpg": "image/jpeg", "jpeg": "image/jpeg", "gif": "image/gif",
            "webp": "image/webp", "pdf": "application/pdf"}.get(ext, "image/jpeg")


def data_url(media: Media) -> str:
    return media.url or f"data:{media.mime};base64,{media.data}"


def tool_args(arguments: Any) -> Dict[str, Any]:
    """Tool arguments (a JSON string, or an object from lax servers) as an object. Invalid
    JSON or a non-object becomes {}: every API needs an object, and a half-parsed guess
    could run the wrong command."""
    if isinstance(arguments, dict):
        return arguments
    try:
        value = loads_json(arguments) if isinstance(arguments, str) and arguments.strip() else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _whole_arguments(text: str) -> bool:
    """Streamed arguments that are a whole JSON object (or none at all)."""
    try:
        return not text.strip() or isinstance(loads_json(text), dict)
    except ValueError:
        return False


def _list_or_empty(value: Any) -> List[Any]:
    return value if isinstance(value, list) else []


def as_list(value: Any, where: str) -> List[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ClientError(f"{where} must be an array, not {_json_type(value)}: send a list")
    return value


def result_text(parts: Sequence[Any], joiner: str = "") -> str:
    return joiner.join(p.text for p in parts if isinstance(p, Text))


CUSTOM_TOOL_SCHEMA = {"type": "object", "properties": {"input": {"type": "string"}},
                      "required": ["input"]}


def call_arguments(call: ToolCall) -> Dict[str, Any]:
    """A tool call's arguments as an object: a freeform tool's raw text rides in "input"
    (the one string parameter it is declared with for JSON-only upstreams)."""
    if call.custom:
        return {"input": call.args if isinstance(call.args, str) else json_text(call.args)}
    return call.args if isinstance(call.args, dict) else tool_args(call.args)


STREAM_CUT = "upstream ended the stream before {end}: the answer is incomplete, retry"
SERVER_TOOLS = {"web_search": "web search", "web_fetch": "web fetch",
                "code_execution": "code execution"}


_TOOLS_LEFT_OUT: set = set()              # (tool, upstream format) already warned about


def server_tool_left_out(tool: Tool, upstream: str) -> bool:
    """A server tool this upstream cannot run: left out when the client offers it by
    default (Codex lists web_search on every turn), with a warning once per process;
    refused when the client asked for it."""
    kind = SERVER_TOOLS.get(tool.server, tool.server)
    if tool.optional:
        if (tool.name, upstream) not in _TOOLS_LEFT_OUT:
            _TOOLS_LEFT_OUT.add((tool.name, upstream))
            log.warning("the %s tool %r is left out of requests to %s upstreams, which cannot "
                        "run it (said once)", kind, tool.name, FORMATS[upstream].title)
        return True
    raise ClientError(f"tool {tool.name!r} is a {kind} tool that the provider runs itself, and "
                      f"{FORMATS[upstream].title} upstreams cannot run it; route this model to "
                      "a provider that can, or leave the tool out")


def named(provider: str, message: str) -> str:
    """An error message with the provider's name before it, once."""
    return f"{provider}: {message}" if provider and not message.startswith(provider + ": ") \
        else message


CUT_OFF = ("length", "context")          # stop reasons of an answer the output cap cut short


_EVENT_DECODER = json.JSONDecoder()


def event_object(data: str) -> Optional[Dict[str, Any]]:
    """An upstream stream event's JSON object; None for anything else (keep-alives and
    comments some servers send), which the readers skip. raw_decode first: an event is
    nearly always exactly one object, and this is the hot path of translated streams."""
    try:
        obj, end = _EVENT_DECODER.raw_decode(data)
    except (ValueError, RecursionError):
        obj, end = None, -1
    if end != len(data):                   # whitespace around it, or not JSON
        try:
            obj = loads_json(data)
        except ValueError:
            return None
    return obj if isinstance(obj, dict) else None


def stream_error_of(obj: Dict[str, Any]) -> Tuple[int, str]:
    """(HTTP status, message) of an in-stream {"error": ...} from any upstream."""
    err = obj.get("error")
    if not isinstance(err, dict):
        return 502, str(err)
    code = err.get("code")
    status = code if isinstance(code, int) and 400 <= code <= 599 else (
        ANTHROPIC_ERROR_STATUS.get(str(err.get("type")), 502))
    message = str(err.get("message") or json_text(err))
    if isinstance(code, str) and code and not code.isdigit() and code not in message:
        message = f"{code}: {message}"
    return status, message


class StreamWriter:
    """What the stream writers of every client format share. A reader (or replay) calls
    start, then text, reasoning, signature and tool calls (tool_start, tool_args and
    tool_end by key, or tool_call whole), then stop and end, or fail at any point; each
    returns [(event, data)] in the client's format. stop, end and fail act once, and
    nothing follows end or fail; a format's own part of them is _stop, _end and _fail."""

    failed = False                         # ended by fail()
    provider = ""                          # named in the errors it writes

    def __init__(self, model: str, input_estimate: int = 0, ask: Optional[Chat] = None):
        self.model, self.names = model, names_back(ask)
        self.started = self.done = False
        self.stopped = ""                  # the stop reason, once given
        self.usage: Optional[Usage] = None

    def _begin(self) -> List[Tuple[str, str]]:
        return [] if self.started else self.start(short_hash(self.model), None)

    def tool_call(self, call_id: str, name: str, arguments: str, signature: str = "",
                  origin: str = "") -> List[Tuple[str, str]]:
        """A whole call as its start, arguments and end (a writer that keeps the call's
        signature sends that before it)."""
        key = object()
        return self.tool_start(key, call_id, name) + (
            self.tool_args(key, arguments) if arguments else []) + self.tool_end(key)

    def stop(self, reason: str) -> List[Tuple[str, str]]:
        if self.stopped or self.done:
            return []
        self.stopped = reason
        return self._stop(reason)

    def end(self, usage: Optional[Usage]) -> List[Tuple[str, str]]:
        if self.done:
            return []
        out = self.stop("end")
        self.done, self.usage = True, usage or self.usage
        return out + self._end(usage)

    def fail(self, status: int, message: str) -> List[Tuple[str, str]]:
        if self.done:
            return []
        self.done = self.failed = True
        return self._fail(status, named(self.provider, message))


class StreamReader:
    """What the stream readers of every upstream format share: feed(event, data) takes the
    upstream's events (a format's own part, _feed, those that are JSON objects) and returns
    the writer's; close() at the body's end ends a stream that had its stop reason (only
    the end marker was missing) and fails any other."""

    fmt = ""                               # the upstream format it reads
    stopped = False                        # the upstream gave its stop reason
    usage: Optional[Usage] = None          # the upstream's usage so far

    def __init__(self, writer: StreamWriter) -> None:
        self.w = writer

    def feed(self, event: str, data: str) -> List[Tuple[str, str]]:
        obj = None if self.w.done else event_object(data)
        return [] if obj is None else self._feed(obj, event, data)

    def close(self) -> List[Tuple[str, str]]:
        if self.w.done:
            return []
        if self.stopped:
            return self.w.end(self.usage)
        return self.w.fail(502, STREAM_CUT.format(end=FORMATS[self.fmt].end_marker))


# -- 7.2 OpenAI Chat Completions -------------------------------------------------
# https://platform.openai.com/docs/api-reference/chat and .../chat-streaming

OPENAI_STOP_IN = {"stop": "end", "length": "length", "tool_calls": "tool",
                  "function_call": "tool", "content_filter": "refusal"}
OPENAI_STOP_OUT = {"end": "stop", "stop_sequence": "stop", "length": "length",
                   "tool": "tool_calls", "refusal": "content_filter", "pause": "stop",
                   "context": "length"}
OPENAI_TOOL_CHOICES = {"auto": "auto", "required": "any", "none": "none"}
OPENAI_AUDIO_FORMATS = {"audio/wav": "wav", "audio/x-wav": "wav", "audio/mpeg": "mp3",
                        "audio/mp3": "mp3"}
OPENAI_NUMBERS = ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty")


def modern_openai_request(body: Dict[str, Any]) -> Dict[str, Any]:
    """OpenAI's legacy function calling (`functions`, `function_call`, assistant
    `function_call`, role "function" messages) in its `tools` form, so one reader
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
        out["messages"] = _modern_messages(messages)
    return out


def _modern_messages(messages: List[Any]) -> List[Any]:
    out: List[Any] = []
    open_calls: List[Tuple[Any, str]] = []
    for message in messages:
        if isinstance(message, dict) and isinstance(message.get("function_call"), dict):
            call_id = f"call_{len(out)}"
            open_calls.append((message["function_call"].get("name"), call_id))
            message = dict(message, tool_calls=list(message.get("tool_calls") or []) + [
                {"id": call_id, "type": "function", "function": message["function_call"]}])
            del message["function_call"]
        elif isinstance(message, dict) and message.get("role") == "function":
            match = next((c for c in open_calls if c[0] == message.get("name")), None)
            if match:
                open_calls.remove(match)
            message = {"role": "tool", "content": message.get("content") or "",
                       "tool_call_id": match[1] if match else f"call_{len(out)}"}
        out.append(message)
    return out


def read_openai_request(body: Dict[str, Any]) -> Chat:
    """A Chat Completions request in the internal form. System and developer messages
    stay where they are (formats with one system slot collect them in order)."""
    body = modern_openai_request(body)
    chat = Chat(model=body["model"] if isinstance(body.get("model"), str) else "")
    names: Dict[str, str] = {}
    for i, message in enumerate(as_list(body.get("messages"), "messages")):
        if not isinstance(message, dict):
            raise ClientError(f"messages[{i}] must be an object, got {_short(message)}")
        chat.turns.append(_openai_turn(message, i, names))
    chat.tools = [_openai_tool(t, i) for i, t in enumerate(as_list(body.get("tools"), "tools"))]
    _openai_choice(body, chat)
    _openai_settings(body, chat)
    return chat


def _openai_turn(message: Dict[str, Any], i: int, names: Dict[str, str]) -> Turn:
    role, where = message.get("role"), f"messages[{i}]"
    if role in ("system", "developer"):
        return Turn("system", [Text(t) for t in [_openai_text(message.get("content"),
                                                               where + ".content")] if t])
    if role == "user":
        return Turn("user", _openai_parts(message.get("content"), where + ".content"))
    if role == "assistant":
        return Turn("assistant", _openai_assistant(message, where, i, names))
    if role == "tool":
        call_id = safe_id(message.get("tool_call_id"), "toolu_missing")
        parts = _openai_parts(message.get("content"), where + ".content")
        return Turn("user", [ToolResult(call_id, names.get(call_id, ""), parts, where=where)])
    raise ClientError(f"{where}.role is {_short(role)}; use system, developer, user, assistant, "
                      "tool or function")


def _openai_text(content: Any, where: str) -> str:
    """Text of a content that may hold only text (a string or text parts)."""
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for j, part in enumerate(as_list(content, where)):
        if not isinstance(part, dict) or part.get("type") not in ("text", "input_text",
                                                                   "output_text", "refusal"):
            raise ClientError(f"{where}[{j}]: only text parts are allowed here, not "
                              f"{_short(part)}: send text")
        texts.append(part.get("text") or part.get("refusal") or "")
    return "".join(texts)


def _openai_parts(content: Any, where: str) -> List[Any]:
    if content is None or isinstance(content, str):
        return [Text(content)] if content else []
    parts: List[Any] = []
    for j, part in enumerate(as_list(content, where)):
        at = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if isinstance(part, str) or kind in ("text", "input_text", "output_text", "refusal"):
            text = part if isinstance(part, str) else part.get("text", part.get("refusal"))
            parts += [Text(text)] if isinstance(text, str) and text else []
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            parts.append(media_from_url(url, f"{at}.image_url.url"))
        elif kind == "input_audio":
            audio = part.get("input_audio") if isinstance(part.get("input_audio"), dict) else {}
            parts.append(Media(f"audio/{audio.get('format') or 'wav'}",
                               data=str(audio.get("data") or ""), where=at))
        elif kind == "file":
            parts.append(_openai_file(part, at))
        else:
            raise ClientError(f"{at}: content part type {_short(kind)} cannot be translated; "
                              "send text, image_url, input_audio or file parts")
    return parts


def _openai_file(part: Dict[str, Any], at: str) -> Media:
    file = part.get("file") if isinstance(part.get("file"), dict) else {}
    if not isinstance(file.get("file_data"), str):
        raise ClientError(f"{at}: a file part needs file_data (a data: URL); file ids of "
                          "OpenAI's Files API cannot reach another provider")
    return media_from_url(file["file_data"], f"{at}.file.file_data",
                          name=str(file.get("filename") or ""))


def openai_reasoning(message: Dict[str, Any]) -> List[Reasoning]:
    """A message's reasoning: reasoning_content (DeepSeek, Kimi, vLLM) or reasoning
    (OpenRouter, Ollama, newer vLLM), with OpenRouter's reasoning_details kept whole as
    its signature: they must come back unchanged on a tool turn
    (https://openrouter.ai/docs/use-cases/reasoning-tokens#preserving-reasoning-blocks)."""
    text = message.get("reasoning_content") or message.get("reasoning")
    text = text if isinstance(text, str) else ""
    details = message.get("reasoning_details")
    if isinstance(details, list) and details:
        return [Reasoning(text, json_text(details), "openai")]
    return [Reasoning(text)] if text else []


def _openai_assistant(message: Dict[str, Any], where: str, i: int,
                      names: Dict[str, str]) -> List[Any]:
    parts: List[Any] = openai_reasoning(message)
    text = _openai_text(message.get("content"), where + ".content")
    parts += [Text(text)] if text else []
    for j, call in enumerate(as_list(message.get("tool_calls"), where + ".tool_calls")):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) \
                or not function["name"]:
            raise ClientError(f"{where}.tool_calls[{j}] needs function.name; send tool calls "
                              'as {"id", "type": "function", "function": {"name", "arguments"}}')
        call_id = safe_id(call.get("id"), f"toolu_{i}_{j}")
        names[call_id] = function["name"]
        parts.append(ToolCall(call_id, function["name"], tool_args(function.get("arguments"))))
    return parts


def _openai_tool(tool: Any, i: int) -> Tool:
    function = tool.get("function") if isinstance(tool, dict) else None
    if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not (
            isinstance(function, dict) and isinstance(function.get("name"), str)):
        raise ClientError(f"tools[{i}] is not a function tool with a name; send "
                          '{"type": "function", "function": {"name", "parameters"}}')
    schema = function.get("parameters")
    return Tool(function["name"], function.get("description") or "",
                schema if isinstance(schema, dict) else None)


def _openai_choice(body: Dict[str, Any], chat: Chat) -> None:
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        function = choice.get("function") if isinstance(choice.get("function"), dict) else {}
        chat.tool_choice, chat.tool_name = "tool", str(function.get("name") or "")
    elif isinstance(choice, str) and choice in OPENAI_TOOL_CHOICES:
        chat.tool_choice = OPENAI_TOOL_CHOICES[choice]
    elif choice is not None:
        raise ClientError(f"tool_choice {choice!r} is unknown: use auto, required, none or "
                          '{"type":"function","function":{"name":...}}')
    if isinstance(body.get("parallel_tool_calls"), bool):
        chat.parallel = body["parallel_tool_calls"]


def _openai_settings(body: Dict[str, Any], chat: Chat) -> None:
    limit = count(body.get("max_completion_tokens")) or count(body.get("max_tokens"))
    chat.max_tokens = limit or None
    for key in OPENAI_NUMBERS + ("top_k",):
        if _is_number(body.get(key)):
            setattr(chat, key, body[key])
    stop = body.get("stop")
    chat.stop = [stop] if isinstance(stop, str) else [s for s in stop if isinstance(s, str)] \
        if isinstance(stop, list) else []
    chat.output = _openai_output(body.get("response_format"))
    effort = body.get("reasoning_effort")
    if effort is not None:
        if effort not in EFFORTS:
            raise ClientError(f"reasoning_effort {effort!r} is unknown: use one of "
                              + ", ".join(EFFORTS))
        chat.think = Think(effort=effort)
    if isinstance(body.get("stream"), bool):
        chat.stream = body["stream"]
    options = body.get("stream_options") if isinstance(body.get("stream_options"), dict) else {}
    chat.include_usage = options.get("include_usage") is True
    chat.user = body["user"] if isinstance(body.get("user"), str) else ""
    chat.n = count(body.get("n")) or 1


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _openai_output(fmt: Any) -> Optional[Dict[str, Any]]:
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        spec = fmt.get("json_schema") if isinstance(fmt.get("json_schema"), dict) else {}
        return {"type": "json_schema", "schema": spec.get("schema") or {"type": "object"},
                "name": spec.get("name") or "response", "strict": spec.get("strict")}
    return None


def write_openai_request(chat: Chat) -> Dict[str, Any]:
    """The internal form as a Chat Completions request. top_k never goes (OpenAI itself
    refuses it); reasoning goes as reasoning_content on its assistant message (DeepSeek
    and Kimi in thinking mode need it back on tool-call turns)."""
    out: Dict[str, Any] = {"model": chat.model} if chat.model else {}
    messages: List[Dict[str, Any]] = []
    system = result_text(chat.system, "\n")
    if system:
        messages.append({"role": "system", "content": system})
    for turn in merged_turns(chat.turns):
        messages += _openai_messages(turn)
    out["messages"] = messages
    if chat.max_tokens:
        out["max_tokens"] = chat.max_tokens
    for key in OPENAI_NUMBERS:
        if getattr(chat, key) is not None:
            out[key] = getattr(chat, key)
    if chat.stop:
        out["stop"] = chat.stop
    if chat.stream is not None:
        out["stream"] = chat.stream
        if chat.stream:                    # usage for the proxy's counters and the client
            out["stream_options"] = {"include_usage": True}
    _openai_tools_out(chat, out)
    effort = effort_of(chat.think) if chat.think else ""
    if effort and effort != "none":        # (left out, not "none": models before GPT-5.1 refuse it)
        out["reasoning_effort"] = OPENAI_EFFORT.get(effort, effort)
    if chat.output:
        out["response_format"] = _openai_format_out(chat.output)
    if chat.user:
        out["user"] = chat.user
    return out


def _openai_messages(turn: Turn) -> List[Dict[str, Any]]:
    if turn.role == "system":
        return [{"role": "system", "content": result_text(turn.parts, "\n")}]
    if turn.role == "assistant":
        return _openai_assistant_out(turn.parts)
    tools, extra = [], []
    for part in turn.parts:
        if isinstance(part, ToolResult):
            message, carried = _openai_tool_message(part, len(extra))
            tools.append(message)
            extra += carried
    parts = extra + [_openai_part(p) for p in turn.parts if isinstance(p, (Text, Media))]
    if not parts:
        return tools
    content: Any = parts
    if all(p["type"] == "text" for p in parts):
        content = "\n".join(p["text"] for p in parts)
    return tools + [{"role": "user", "content": content}]


def _openai_part(part: Any) -> Dict[str, Any]:
    if isinstance(part, Text):
        return {"type": "text", "text": part.text}
    if part.url:
        if not part.url.startswith(("http://", "https://")):
            raise ClientError(f"{part.where}: {printable(part.url, 80)!r} cannot be sent to an "
                              "OpenAI-compatible upstream: send the file inline")
        return {"type": "image_url", "image_url": {"url": part.url}}
    if part.kind == "image":
        return {"type": "image_url", "image_url": {"url": data_url(part)}}
    if part.mime in OPENAI_AUDIO_FORMATS:
        return {"type": "input_audio", "input_audio": {"data": part.data,
                                                       "format": OPENAI_AUDIO_FORMATS[part.mime]}}
    return {"type": "file", "file": {"filename": part.name or "file." + part.mime.split("/")[-1],
                                     "file_data": data_url(part)}}


def _openai_tool_message(result: ToolResult, carried: int) -> Tuple[Dict[str, Any], list]:
    """A tool result as a `tool` message, plus the media it carried, which go to a user
    message after it: most servers take only text in `tool` messages."""
    texts, extra = [], []
    for part in result.parts:
        if isinstance(part, Text):
            texts.append(part.text)
        else:
            extra.append(_openai_part(part))
            texts.append(f"[{'image' if part.kind == 'image' else 'file'} "
                         f"{carried + len(extra)} follows in the next message]")
    text = "\n\n".join(texts)
    if result.is_error:                    # no OpenAI field: say it in the text
        text = f"Error: {text}" if text else "Error"
    return {"role": "tool", "tool_call_id": result.call_id, "content": text}, extra


def _openai_assistant_out(parts: List[Any]) -> List[Dict[str, Any]]:
    texts = [p.text for p in parts if isinstance(p, Text)]
    thoughts = [p.text for p in parts if isinstance(p, Reasoning) and p.text]
    details = [d for p in parts if isinstance(p, Reasoning) and p.origin == "openai" and p.signature
               for d in _json_list(p.signature)]
    calls = [{"id": p.id, "type": "function",
              "function": {"name": p.name, "arguments": json_text(call_arguments(p))}}
             for p in parts if isinstance(p, ToolCall)]
    if not texts and not calls and not thoughts:
        return []
    message: Dict[str, Any] = {"role": "assistant", "content": "".join(texts)}
    if thoughts:
        message["reasoning_content"] = "\n".join(thoughts)
    if details:
        message["reasoning_details"] = details
    if calls:
        message["tool_calls"] = calls
    return [message]


def _json_list(text: str) -> List[Any]:
    try:
        value = loads_json(text)
    except ValueError:
        return []
    return value if isinstance(value, list) else []


def _openai_tools_out(chat: Chat, out: Dict[str, Any]) -> None:
    tools = []
    for tool in chat.tools:
        if tool.server and server_tool_left_out(tool, "openai"):
            continue
        schema = dict(CUSTOM_TOOL_SCHEMA if tool.custom else tool.schema or {"type": "object"})
        if schema.get("type") == "object" and "properties" not in schema:
            schema["properties"] = {}
        function: Dict[str, Any] = {"name": tool.name}
        if tool.description:
            function["description"] = tool.description
        function["parameters"] = schema
        tools.append({"type": "function", "function": function})
    if not tools:
        return
    out["tools"] = tools
    if chat.tool_choice == "tool":
        out["tool_choice"] = {"type": "function", "function": {"name": chat.tool_name}}
    elif chat.tool_choice:
        out["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}[chat.tool_choice]
    if chat.parallel is not None:
        out["parallel_tool_calls"] = chat.parallel


def _openai_format_out(output: Dict[str, Any]) -> Dict[str, Any]:
    if output["type"] == "json_object":
        return {"type": "json_object"}
    spec = {"name": output.get("name") or "response", "schema": output.get("schema") or {}}
    if output.get("strict") is not None:
        spec["strict"] = output["strict"]
    return {"type": "json_schema", "json_schema": spec}


def read_openai_usage(usage: Any) -> Optional[Usage]:
    if not isinstance(usage, dict) or not any(k in usage for k in ("prompt_tokens",
                                                                    "completion_tokens")):
        return None
    details = usage.get("prompt_tokens_details") if isinstance(
        usage.get("prompt_tokens_details"), dict) else {}
    output = usage.get("completion_tokens_details") if isinstance(
        usage.get("completion_tokens_details"), dict) else {}
    write = (usage.get("cache_creation_input_tokens") or details.get("cache_write_tokens")
             or details.get("cache_creation_input_tokens"))
    cached = details.get("cached_tokens") or usage.get("prompt_cache_hit_tokens")   # (DeepSeek's)
    return Usage(count(usage.get("prompt_tokens")), count(cached),
                 count(write), count(usage.get("completion_tokens")),
                 count(output.get("reasoning_tokens")), count(usage.get("total_tokens")))


def write_openai_usage(usage: Usage) -> Dict[str, Any]:
    return {"prompt_tokens": usage.input, "completion_tokens": usage.output,
            "total_tokens": usage.sum(), "prompt_tokens_details": {"cached_tokens": usage.cached},
            "completion_tokens_details": {"reasoning_tokens": usage.reasoning}}


def read_openai_response(body: Dict[str, Any]) -> Answer:
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        message, _ = upstream_message(dumps(body))
        raise UpstreamError(f"answered without choices: {message}")
    message = choices[0].get("message") if isinstance(choices[0].get("message"), dict) else {}
    parts: List[Any] = openai_reasoning(message)
    text = _content_text(message.get("content")) or _content_text(message.get("refusal"))
    parts += [Text(text)] if text else []
    calls = message.get("tool_calls") if isinstance(message.get("tool_calls"), list) else []
    if isinstance(message.get("function_call"), dict):     # legacy single-function answer
        calls = calls + [{"function": message["function_call"]}]
    for i, call in enumerate(c for c in calls if isinstance(c, dict)):
        function = call.get("function") if isinstance(call.get("function"), dict) else {}
        fallback = f"toolu_{safe_id(body.get('id'), 'x')}_{i}"   # (as OpenAIStreamReader)
        parts.append(ToolCall(safe_id(call.get("id"), fallback), str(function.get("name") or ""),
                              tool_args(function.get("arguments"))))
    return Answer(str(body.get("id") or short_hash(json_text(body))), parts,
                  OPENAI_STOP_IN.get(choices[0].get("finish_reason"), "end"),
                  read_openai_usage(body.get("usage")) or Usage())


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content
                       if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def write_openai_response(answer: Answer, model: str, ask: Optional[Chat] = None) -> Dict[str, Any]:
    message = _openai_assistant_out(answer.parts)[:1] or [{"role": "assistant", "content": ""}]
    reply = message[0]
    if reply.get("tool_calls") and not any(isinstance(p, Text) for p in answer.parts):
        reply["content"] = None
    finish = "tool_calls" if reply.get("tool_calls") and answer.stop not in CUT_OFF else \
        OPENAI_STOP_OUT.get(answer.stop, "stop")
    return {"id": _prefixed(answer.id, "chatcmpl-"), "object": "chat.completion",
            "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": reply, "logprobs": None, "finish_reason": finish}],
            "usage": write_openai_usage(answer.usage)}


def _prefixed(value: str, prefix: str) -> str:
    value = safe_id(value, short_hash(value or "x"))
    return value if value.startswith(prefix) else prefix + value


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


class _Fragments:
    """One streamed OpenAI tool call: its id and name may come late or repeat, its
    arguments in pieces. `pending` until it can start (name known, and id known or
    arguments begun); buffered arguments are bounded by that one call."""

    def __init__(self, key: int) -> None:
        self.key, self.id, self.name, self.state = key, "", "", "pending"   # -> open -> closed
        self.buffered: List[str] = []
        self.depth = _JsonDepth()

    @property
    def startable(self) -> bool:
        return bool(self.name and (self.id or self.buffered))


class OpenAIStreamReader(StreamReader):
    """Chat Completions chunks in (the upstream's), the writer's events out. Lines that
    are not JSON are skipped (keep-alives of some servers); the end is [DONE], a usage
    chunk after the finish_reason, or the close after a finish_reason."""

    fmt = "openai"

    def __init__(self, writer: StreamWriter) -> None:
        super().__init__(writer)
        self.calls: Dict[Any, _Fragments] = {}
        self.order: List[_Fragments] = []
        self.resp_id = ""
        self.details: Dict[Tuple[Any, Any], Dict[str, Any]] = {}   # OpenRouter's, merged

    def feed(self, event: str, data: str) -> List[Tuple[str, str]]:
        data = data.strip()
        if self.w.done or not data:
            return []
        if data == "[DONE]":
            return self._stop("stop") + self.w.end(self.usage)
        chunk = event_object(data)
        if chunk is None:
            return []
        if chunk.get("error") is not None:
            return self.w.fail(*stream_error_of(chunk))
        out: List[Tuple[str, str]] = []
        choices = chunk.get("choices")
        if isinstance(choices, list) and choices and isinstance(choices[0], dict):
            if not self.w.started:
                self.resp_id = str(chunk.get("id") or "")
                out += self.w.start(self.resp_id or short_hash(data), None)
            out += self._choice(choices[0])
        usage = read_openai_usage(chunk.get("usage"))
        if usage:
            self.usage = usage
            if self.stopped and not choices:
                out += self.w.end(usage)
        return out

    def _choice(self, choice: Dict[str, Any]) -> List[Tuple[str, str]]:
        if self.stopped:
            return []
        delta = choice.get("delta") if isinstance(choice.get("delta"), dict) else {}
        out: List[Tuple[str, str]] = []
        reasoning = delta.get("reasoning_content") or delta.get("reasoning")
        if isinstance(reasoning, str) and reasoning:
            out += self.w.reasoning(reasoning)
        details = delta.get("reasoning_details")
        if isinstance(details, list) and details:
            self._details(details)
        elif self.details and (delta.get("content") or delta.get("tool_calls") or
                               choice.get("finish_reason")):       # (OpenRouter puts an empty
            out += self._signed()                                   # list on every text delta)
        text = delta.get("content") or delta.get("refusal")
        if isinstance(text, str) and text:
            out += self.w.text(text)
        items = delta.get("tool_calls")
        for position, item in enumerate(items if isinstance(items, list) else []):
            if isinstance(item, dict):
                out += self._fragment(item, position)
        reason = choice.get("finish_reason")
        if reason == "error":
            return out + self.w.fail(502, 'upstream finished with finish_reason "error"')
        return out + self._stop(reason) if reason else out

    def _details(self, items: List[Any]) -> None:
        """reasoning_details deltas merged by index and type (a text and an encrypted
        detail may share an index): texts joined, other fields kept."""
        for position, item in enumerate(i for i in items if isinstance(i, dict)):
            index = item.get("index", position)
            key = (index, item["type"]) if item.get("type") else next(
                (k for k in reversed(list(self.details)) if k[0] == index), (index, None))
            merged = self.details.setdefault(key, {})
            for key, value in item.items():
                if key in ("text", "summary", "data") and isinstance(value, str):
                    merged[key] = merged.get(key, "") + value
                elif value is not None:
                    merged[key] = value

    def _signed(self) -> List[Tuple[str, str]]:
        """The merged reasoning_details, as the signature of the reasoning they end."""
        details, self.details = list(self.details.values()), {}
        return self.w.signature(json_text(details), "openai")

    def _stop(self, reason: str) -> List[Tuple[str, str]]:
        if self.stopped:
            return []
        out: List[Tuple[str, str]] = self._signed() if self.details else []
        for call in self.order:
            if call.state == "pending":
                out += self._open(call)
            if call.state == "open":
                call.state = "closed"
                out += self.w.tool_end(call.key)
        self.stopped = True
        return out + self.w.stop(OPENAI_STOP_IN.get(reason, "end"))

    def _fragment(self, item: Dict[str, Any], position: int) -> List[Tuple[str, str]]:
        index = item.get("index") if isinstance(item.get("index"), int) else position
        function = item.get("function") if isinstance(item.get("function"), dict) else {}
        new_id = item.get("id") if isinstance(item.get("id"), str) else ""
        call = self.calls.get(index)
        if call is None or (new_id and call.id and new_id != call.id):   # index reused
            call = self.calls[index] = _Fragments(len(self.order))
            self.order.append(call)
        call.id = call.id or new_id
        name = function.get("name")
        call.name = call.name or (name if isinstance(name, str) else "")   # a repeat is ignored
        arguments = function.get("arguments")
        if isinstance(arguments, (dict, list)):
            arguments = json_text(arguments)
        arguments = arguments if isinstance(arguments, str) else ""
        if call.state == "closed":
            return []                      # after its end nothing valid can follow
        if call.state == "open":
            return self._arguments(call, arguments) if arguments else []
        if arguments:
            call.buffered.append(arguments)
        return self._open(call) if call.startable else []

    def _open(self, call: _Fragments) -> List[Tuple[str, str]]:
        call_id = safe_id(call.id, "") or f"toolu_{safe_id(self.resp_id, 'x')}_{call.key}"
        call.state = "open"
        out = self.w.tool_start(call.key, call_id, call.name or f"tool_{call.key}")
        arguments, call.buffered = "".join(call.buffered), []
        return out + self._arguments(call, arguments) if arguments else out

    def _arguments(self, call: _Fragments, arguments: str) -> List[Tuple[str, str]]:
        call.depth.feed(arguments)
        out = self.w.tool_args(call.key, arguments)
        if call.depth.complete:
            call.state = "closed"
            out += self.w.tool_end(call.key)
        return out


class OpenAIStreamWriter(StreamWriter):
    """The writer's calls in, chat.completion.chunk data out: a role chunk first,
    content, reasoning_content and tool_calls deltas (tool indexes count tool calls from
    0), the finish chunk, the usage chunk (choices: []) when the client asked for it
    with stream_options.include_usage, then [DONE]. A failure is one error chunk and no
    [DONE], so that no client can take a cut answer for a finished one."""

    def __init__(self, model: str, input_estimate: int = 0, ask: Optional[Chat] = None):
        super().__init__(model, input_estimate, ask)
        self.created = int(time.time())
        self.include_usage = ask.include_usage if ask is not None else True
        self.tools: Dict[Any, int] = {}
        self.argued: set = set()           # the tool calls that had arguments
        self._base = ""

    def start(self, resp_id: str, usage: Optional[Usage]) -> List[Tuple[str, str]]:
        if self.started:
            return []
        self.started = True
        base = json_text({"id": _prefixed(resp_id, "chatcmpl-"), "object": "chat.completion.chunk",
                          "created": self.created, "model": self.model})
        self._base = base[:-1] + ',"choices":[{"index":0,"delta":'
        return [self._chunk({"role": "assistant", "content": ""})]

    def _chunk(self, delta: Dict[str, Any], finish: Optional[str] = None) -> Tuple[str, str]:
        return "", self._base + json_text(delta) + ',"finish_reason":%s}]}' % (
            json_text(finish) if finish else "null")

    def _begin(self) -> List[Tuple[str, str]]:
        return [] if self.started else self.start("", None)

    def text(self, text: str) -> List[Tuple[str, str]]:
        # The hot path of every translated stream: one string format, no dict.
        out = self._begin()
        out.append(("", self._base + '{"content":' + _JSON.encode(text) + '},"finish_reason":null}]}'))
        return out

    def reasoning(self, text: str) -> List[Tuple[str, str]]:
        return self._begin() + [self._chunk({"reasoning_content": text})] if text else []

    def signature(self, value: str, origin: str, redacted: bool = False) -> List[Tuple[str, str]]:
        return []                          # Chat Completions has no place for it

    def tool_start(self, key: Any, call_id: str, name: str,
                   arguments: str = "") -> List[Tuple[str, str]]:
        index = self.tools[key] = len(self.tools)
        return self._begin() + [self._chunk({"tool_calls": [{
            "index": index, "id": call_id, "type": "function",
            "function": {"name": self.names.get(name, name), "arguments": arguments}}]})]

    def tool_args(self, key: Any, fragment: str) -> List[Tuple[str, str]]:
        if not fragment or key not in self.tools:
            return []
        self.argued.add(key)
        return [self._chunk({"tool_calls": [{"index": self.tools[key],
                                             "function": {"arguments": fragment}}]})]

    def tool_end(self, key: Any) -> List[Tuple[str, str]]:
        # A call without arguments has "{}" (a JSON object), as OpenAI sends it
        return self.tool_args(key, "{}") if key in self.tools and key not in self.argued else []

    def tool_call(self, call_id: str, name: str, arguments: str, signature: str = "",
                  origin: str = "") -> List[Tuple[str, str]]:
        return self.tool_start(object(), call_id, name, arguments)    # (one chunk: all of it)

    def _stop(self, reason: str) -> List[Tuple[str, str]]:
        finish = "tool_calls" if self.tools and reason not in CUT_OFF else \
            OPENAI_STOP_OUT.get(reason, "stop")
        return self._begin() + [self._chunk({}, finish)]

    def _end(self, usage: Optional[Usage]) -> List[Tuple[str, str]]:
        out = []
        if self.include_usage:
            out.append(("", self._base.split(',"choices"')[0] + ',"choices":[],"usage":'
                        + json_text(write_openai_usage(self.usage or Usage())) + "}"))
        return out + [("", "[DONE]")]

    def _fail(self, status: int, message: str) -> List[Tuple[str, str]]:
        return [("", json_text(_openai_error(status, message)))]


# -- 7.3 Anthropic Messages -------------------------------------------------------
# https://docs.anthropic.com/en/api/messages and .../messages-streaming

ANTHROPIC_STOP_IN = {"end_turn": "end", "stop_sequence": "stop_sequence", "max_tokens": "length",
                     "tool_use": "tool", "refusal": "refusal", "pause_turn": "pause",
                     "model_context_window_exceeded": "context"}
ANTHROPIC_STOP_OUT = {v: k for k, v in ANTHROPIC_STOP_IN.items()}
ANTHROPIC_DEFAULT_MAX_TOKENS = 8192      # Anthropic requires max_tokens; other clients may omit
                                         # it (Codex always does): each model's own cap where
# the name says which (docs.claude.com, models overview; a larger one is a 400, a smaller
# one cuts long edits short), else 8192; an entry's maxOutputTokens clamps it anyway.
# Only from the 4.5 models on: earlier ones refuse input + max_tokens over the window, so a
# larger default would fail long sessions early.
ANTHROPIC_MODEL_CAPS = ((re.compile(r"claude-3-(?:haiku|opus|sonnet)-"), 4096),
                        (re.compile(r"claude-(?:opus|sonnet|haiku)-(?:4-[5-9]|[5-9])"), 64000))


def anthropic_default_cap(model: str) -> int:
    return next((cap for name, cap in ANTHROPIC_MODEL_CAPS if name.search(model)),
                ANTHROPIC_DEFAULT_MAX_TOKENS)
ANTHROPIC_PLACEHOLDER_TEXT = "(continue)"   # Anthropic needs a first user turn, no empty text
BILLING_HEADER_PREFIX = "x-anthropic-billing-header:"   # Claude Code's attribution text: it
                                         # means nothing to another provider (CLIProxyAPI drops it)
JSON_OBJECT_INSTRUCTION = "Respond with one JSON object and nothing else."
ANTHROPIC_CHOICES = {"auto": "auto", "any": "any", "tool": "tool", "none": "none"}
ANTHROPIC_SERVER_TOOLS = {"web_search": "web_search_20250305", "web_fetch": "web_fetch_20250910"}


def read_anthropic_request(body: Dict[str, Any]) -> Chat:
    """A Messages request in the internal form. Mid-conversation system messages (the
    mid-conversation-system beta Claude Code uses) become system turns in place."""
    chat = Chat(model=body["model"] if isinstance(body.get("model"), str) else "")
    chat.system = [t for t in _anthropic_texts(body.get("system"), "system")
                   if not t.text.startswith(BILLING_HEADER_PREFIX)]
    names: Dict[str, str] = {}
    for i, message in enumerate(as_list(body.get("messages"), "messages")):
        role = message.get("role") if isinstance(message, dict) else None
        where = f"messages[{i}]"
        if role not in ("user", "assistant", "system"):
            # Anthropic's own wording: clients (Claude Code) recognise it and recover.
            raise ClientError(f"{where}: Unexpected role {json_text(role)}. The Messages API "
                              "accepts a top-level `system` parameter and \"user\" or "
                              "\"assistant\" as an input message role")
        blocks = _anthropic_blocks(message.get("content"), where + ".content")
        chat.turns.append(Turn(role, [p for j, b in enumerate(blocks) for p in _anthropic_part(
            b, f"{where}.content[{j}]", role, names, j)]))
    chat.tools = [_anthropic_tool(t) for t in as_list(body.get("tools"), "tools")
                  if isinstance(t, dict)]
    _anthropic_choice(body.get("tool_choice"), chat)
    _anthropic_settings(body, chat)
    return chat


def _anthropic_blocks(content: Any, where: str) -> List[Dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return [b for b in as_list(content, where) if isinstance(b, dict)]


def _anthropic_texts(content: Any, where: str) -> List[Text]:
    return [Text(b["text"], b.get("cache_control")) for b in _anthropic_blocks(content, where)
            if b.get("type") == "text" and isinstance(b.get("text"), str) and b["text"]]


def _anthropic_part(block: Dict[str, Any], where: str, role: str, names: Dict[str, str],
                    position: int = 0) -> List[Any]:
    kind = block.get("type")
    if kind == "text":
        text = block.get("text")
        return [Text(text, block.get("cache_control"))] if isinstance(text, str) and text else []
    if kind in ("image", "document"):
        return [_anthropic_media(block, where)]
    if kind == "tool_use":
        name = block.get("name")
        if not isinstance(name, str) or not name:
            raise ClientError(f"{where}: a tool_use needs a \"name\"; add the tool's name")
        call_id = safe_id(block.get("id"), f"toolu_{position}")
        names[call_id] = name
        args = block.get("input") if isinstance(block.get("input"), dict) else {}
        return [ToolCall(call_id, name, args)]
    if kind == "tool_result":
        call_id = safe_id(block.get("tool_use_id"), "toolu_missing")
        parts = [p for j, b in enumerate(_anthropic_blocks(block.get("content") or [],
                                                           where + ".content"))
                 for p in _anthropic_part(b, f"{where}.content[{j}]", role, names)
                 if isinstance(p, (Text, Media))]
        return [ToolResult(call_id, names.get(call_id, ""), parts, block.get("is_error") is True,
                           where, block.get("cache_control"))]
    if kind in ("thinking", "redacted_thinking") and role == "assistant":
        redacted = kind == "redacted_thinking"
        origin, value, was_redacted = uncarry(block.get("data" if redacted else "signature"),
                                              "anthropic")
        return [Reasoning("" if redacted else str(block.get("thinking") or ""), value, origin,
                          redacted or was_redacted)]
    return []                              # server-tool blocks and anything newer


def _anthropic_media(block: Dict[str, Any], where: str) -> Any:
    source = block.get("source") if isinstance(block.get("source"), dict) else {}
    origin, kind = source.get("type"), block.get("type")
    name = block.get("title") if isinstance(block.get("title"), str) else ""
    if origin == "base64":
        mime = source.get("media_type") or ("image/png" if kind == "image" else "application/pdf")
        return Media(str(mime), data=str(source.get("data") or ""), name=name, where=where,
                     cache=block.get("cache_control"))
    if origin == "url":
        return media_from_url(source.get("url"), where, name,
                              "application/pdf" if kind == "document" else "")
    if origin == "text":
        return Text(str(source.get("data") or ""), block.get("cache_control"))
    if origin == "content":
        return Text("\n".join(t.text for t in _anthropic_texts(source.get("content"), where)))
    raise ClientError(f"{where}: a {kind} with source type {origin!r} cannot be translated for "
                      "another provider; send it as base64 data instead")


def _anthropic_tool(tool: Dict[str, Any]) -> Tool:
    """A client tool; a typed tool without input_schema (web_search_20250305...) is a
    server tool the upstream must run itself."""
    kind = str(tool.get("type") or "")
    if isinstance(tool.get("input_schema"), dict) or kind in ("", "custom"):
        schema = tool.get("input_schema") if isinstance(tool.get("input_schema"), dict) else None
        return Tool(str(tool.get("name") or ""), str(tool.get("description") or ""), schema,
                    cache=tool.get("cache_control"))
    server = next((s for s in ("web_search", "web_fetch", "code_execution") if kind.startswith(s)),
                  kind)
    # Tool search (Claude Code's ENABLE_TOOL_SEARCH) only spares context: elsewhere it is
    # left out and the deferred tools go as ordinary ones (defer_loading is not sent on).
    return Tool(str(tool.get("name") or kind), server=server,
                optional=kind.startswith("tool_search_tool_"))


def _anthropic_choice(choice: Any, chat: Chat) -> None:
    if choice is None:
        return
    kind = choice.get("type") if isinstance(choice, dict) else None
    if not isinstance(kind, str) or kind not in ANTHROPIC_CHOICES:
        raise ClientError(f"tool_choice {_short(choice)} is unknown: use type auto, any, tool or none")
    chat.tool_choice = kind
    chat.tool_name = str(choice.get("name") or "") if kind == "tool" else ""
    if choice.get("disable_parallel_tool_use") is True:
        chat.parallel = False


def _anthropic_settings(body: Dict[str, Any], chat: Chat) -> None:
    chat.max_tokens = count(body.get("max_tokens")) or None
    for key in ("temperature", "top_p", "top_k"):
        if _is_number(body.get(key)):
            setattr(chat, key, body[key])
    chat.stop = [s for s in body.get("stop_sequences") or [] if isinstance(s, str)] \
        if isinstance(body.get("stop_sequences"), list) else []
    if isinstance(body.get("stream"), bool):
        chat.stream = body["stream"]
    metadata = body.get("metadata") if isinstance(body.get("metadata"), dict) else {}
    chat.user = metadata["user_id"] if isinstance(metadata.get("user_id"), str) else ""
    config = body.get("output_config") if isinstance(body.get("output_config"), dict) else {}
    chat.think = _anthropic_think(body.get("thinking"), config.get("effort"))
    fmt = config.get("format") or body.get("output_format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        chat.output = {"type": "json_schema", "schema": fmt.get("schema") or {"type": "object"},
                       "name": fmt.get("name") or "response"}


def _anthropic_think(thinking: Any, effort: Any) -> Optional[Think]:
    """enabled -> that budget; adaptive -> the model decides, at output_config.effort;
    disabled or absent -> nothing asked (an effort alone is still an effort)."""
    effort = effort if effort in EFFORTS else ""
    kind = thinking.get("type") if isinstance(thinking, dict) else None
    if kind == "enabled":
        return Think(budget=count(thinking.get("budget_tokens")) or ANTHROPIC_MIN_THINKING_BUDGET)
    if kind == "adaptive":
        return Think(effort=effort, dynamic=True)
    return Think(effort=effort) if effort and kind != "disabled" else None


def write_anthropic_request(chat: Chat) -> Dict[str, Any]:
    """The internal form as a Messages request: system text collected in order, tool
    results first in their user turn, a placeholder user turn first when needed; only
    Anthropic's own signatures are replayed (a foreign thinking block is dropped)."""
    if chat.n > 1:
        raise ClientError(f'"n" is {chat.n}: Anthropic upstreams return one choice; send n=1 '
                          "or leave it out")
    out: Dict[str, Any] = {"model": chat.model} if chat.model else {}
    messages = [{"role": t.role, "content": blocks} for t in merged_turns(
        [t for t in chat.turns if t.role != "system"]) for blocks in [_anthropic_blocks_out(t)]
        if blocks]
    if not messages or messages[0]["role"] != "user":
        messages.insert(0, {"role": "user",
                            "content": [{"type": "text", "text": ANTHROPIC_PLACEHOLDER_TEXT}]})
    out["messages"] = messages
    system = [_anthropic_text_out(t) for t in system_texts(chat)]
    if chat.output and chat.output["type"] == "json_object":
        system.append({"type": "text", "text": JSON_OBJECT_INSTRUCTION})
    if system:
        out["system"] = system
    if chat.stop:
        out["stop_sequences"] = chat.stop
    if chat.stream is not None:
        out["stream"] = chat.stream
    if chat.user:
        out["metadata"] = {"user_id": chat.user}
    _anthropic_tools_out(chat, out)
    last = next((m["content"] for m in reversed(messages) if m["role"] == "assistant"), [])
    if chat.think and any(b["type"] == "tool_use" for b in last) and \
            last[0]["type"] not in ("thinking", "redacted_thinking"):
        # Anthropic refuses thinking while the tool turn it continues does not start with a
        # signed thinking block (one made by another provider, or by a client that keeps
        # none, cannot be sent): this request goes without thinking.
        chat = dataclasses.replace(chat, think=None)
    _anthropic_budget_and_sampling(chat, out)
    if chat.output and chat.output["type"] == "json_schema":
        out["output_config"] = {"format": {"type": "json_schema", "schema": chat.output["schema"]}}
    _anthropic_cache_marks(out)
    return out


CACHEABLE = ("text", "image", "document", "tool_use", "tool_result")   # (thinking is not)
NO_PROMPT_CACHE = re.compile(r"claude-3-(?:haiku|opus|sonnet)-|claude-3-5-sonnet")   # (a 400 on
#   Bedrock, and on Anthropic for some: "does not support cache_control")


def _anthropic_cache_marks(out: Dict[str, Any]) -> None:
    """Prompt caching for clients of APIs that cache on their own (OpenAI, Gemini): Claude
    caches only up to blocks marked cache_control, so an agent's turns (Codex, Gemini CLI,
    Cursor) paid the whole prompt each time. Marked, when the request marks nothing: the
    tools, the system prompt, and the last block of the last two user turns, where the
    next turn's prefix ends (4 marks, Anthropic's most; under the model's minimum length
    nothing is cached and nothing is charged extra)."""
    tools, system = out.get("tools") or [], out.get("system") or []
    users = [m["content"] for m in out["messages"] if m["role"] == "user"][-2:]
    if NO_PROMPT_CACHE.search(str(out.get("model") or "")) or \
            any("cache_control" in b for b in itertools.chain(tools, system, *users)):
        return
    blocks = [tools[-1:], system[-1:]] + [[b for b in content if b["type"] in CACHEABLE][-1:]
                                         for content in users]
    for block in itertools.chain(*blocks):
        block["cache_control"] = {"type": "ephemeral"}


def _anthropic_text_out(text: Text) -> Dict[str, Any]:
    block: Dict[str, Any] = {"type": "text", "text": text.text}
    if text.cache:
        block["cache_control"] = text.cache
    return block


def _anthropic_blocks_out(turn: Turn) -> List[Dict[str, Any]]:
    blocks = []
    for part in turn.parts:
        if isinstance(part, Text):         # (Anthropic refuses whitespace-only text blocks)
            blocks += [_anthropic_text_out(part)] if part.text.strip() else []
        elif isinstance(part, Media):
            blocks.append(_anthropic_media_out(part))
        elif isinstance(part, ToolCall):
            blocks.append({"type": "tool_use", "id": part.id, "name": part.name,
                           "input": call_arguments(part)})
        elif isinstance(part, ToolResult):
            blocks.append(_anthropic_result_out(part))
        elif isinstance(part, Reasoning) and part.origin == "anthropic" and part.signature:
            blocks.append({"type": "redacted_thinking", "data": part.signature} if part.redacted
                          else {"type": "thinking", "thinking": part.text,
                                "signature": part.signature})
    return blocks


def _anthropic_media_out(media: Media) -> Dict[str, Any]:
    kind = "image" if media.kind == "image" or not media.mime else "document"
    if kind == "document" and media.mime not in ("application/pdf", "text/plain"):
        raise ClientError(f"{media.where}: {media.mime or 'this file'} cannot be sent to an "
                          "Anthropic upstream: send images or PDF documents")
    if media.data:                         # (image/jpg is common and not a registered type)
        mime = "image/jpeg" if media.mime == "image/jpg" else media.mime
        source = {"type": "base64", "media_type": mime, "data": media.data}
    elif media.url.startswith(("http://", "https://")):
        source = {"type": "url", "url": media.url}
    else:
        raise ClientError(f"{media.where}: {media.url!r} cannot be sent to an Anthropic "
                          "upstream: send the file inline or by an http(s) URL")
    block: Dict[str, Any] = {"type": kind, "source": source}
    if media.cache:
        block["cache_control"] = media.cache
    return block


def _anthropic_result_out(result: ToolResult) -> Dict[str, Any]:
    block: Dict[str, Any] = {"type": "tool_result", "tool_use_id": result.call_id}
    inner = [_anthropic_text_out(p) if isinstance(p, Text) else _anthropic_media_out(p)
             for p in result.parts if not isinstance(p, Text) or p.text]
    if inner:
        block["content"] = ("".join(b["text"] for b in inner)
                            if all(b["type"] == "text" and "cache_control" not in b for b in inner)
                            else inner)
    if result.is_error:
        block["is_error"] = True
    if result.cache:
        block["cache_control"] = result.cache
    return block


def _anthropic_tools_out(chat: Chat, out: Dict[str, Any]) -> None:
    tools = []
    for tool in chat.tools:
        if tool.server:
            if tool.server not in ANTHROPIC_SERVER_TOOLS:
                server_tool_left_out(tool, "anthropic")
                continue
            tools.append({"type": ANTHROPIC_SERVER_TOOLS[tool.server], "name": tool.server})
            continue
        schema = dict(CUSTOM_TOOL_SCHEMA if tool.custom else tool.schema or {})
        schema.setdefault("type", "object")
        if "properties" not in schema:
            schema["properties"] = {}
        entry: Dict[str, Any] = {"name": tool.name}
        if tool.description:
            entry["description"] = tool.description
        entry["input_schema"] = schema
        if tool.cache:
            entry["cache_control"] = tool.cache
        tools.append(entry)
    if not tools:
        return
    out["tools"] = tools
    choice: Optional[Dict[str, Any]] = {"type": chat.tool_choice} if chat.tool_choice else None
    if choice and chat.tool_choice == "tool":
        choice["name"] = chat.tool_name
    if chat.parallel is False and (choice or {}).get("type") != "none":
        choice = dict(choice or {"type": "auto"}, disable_parallel_tool_use=True)
    if choice:
        out["tool_choice"] = choice


def _anthropic_budget_and_sampling(chat: Chat, out: Dict[str, Any]) -> None:
    """max_tokens, thinking and sampling together, because they constrain each other:
    the budget must be >= 1024 and below max_tokens; a budget never outgrows a cap
    that already pays for reasoning (OpenAI's max_completion_tokens); with thinking on,
    no temperature, top_p or top_k, and no forced tool; without it, temperature or
    top_p, never both (current Claude models refuse the pair)."""
    cap = chat.max_tokens
    budget = budget_of(chat.think) if chat.think else None
    forced = chat.tool_choice in ("any", "tool")
    if budget and not forced:
        budget = max(budget, ANTHROPIC_MIN_THINKING_BUDGET)
        if cap is None:
            cap = anthropic_default_cap(chat.model)
            cap = cap if cap > budget else cap + budget
        elif not chat.cap_includes_reasoning:
            cap += budget
        elif budget >= cap:
            budget = cap // 2 if cap // 2 >= ANTHROPIC_MIN_THINKING_BUDGET else 0
        if budget:
            out["max_tokens"] = cap
            out["thinking"] = {"type": "enabled", "budget_tokens": budget}
            return
    out["max_tokens"] = chat.max_tokens or anthropic_default_cap(chat.model)
    if chat.temperature is not None:
        out["temperature"] = min(chat.temperature, 1)       # OpenAI and Gemini go up to 2
    elif chat.top_p is not None:
        out["top_p"] = chat.top_p
    if chat.top_k is not None:
        out["top_k"] = chat.top_k


def read_anthropic_usage(usage: Any) -> Optional[Usage]:
    if not isinstance(usage, dict):
        return None
    cached, write = count(usage.get("cache_read_input_tokens")), count(
        usage.get("cache_creation_input_tokens"))
    return Usage(count(usage.get("input_tokens")) + cached + write, cached, write,
                 count(usage.get("output_tokens")))


def write_anthropic_usage(usage: Usage) -> Dict[str, int]:
    return {"input_tokens": max(0, usage.input - usage.cached - usage.cache_write),
            "output_tokens": usage.output, "cache_creation_input_tokens": usage.cache_write,
            "cache_read_input_tokens": usage.cached}


def read_anthropic_response(body: Dict[str, Any]) -> Answer:
    if body.get("type") == "error" or not isinstance(body.get("content"), list):
        message, _ = upstream_message(dumps(body))
        raise UpstreamError(f"answered without content: {message}")
    parts: List[Any] = []
    for block in body["content"]:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text" and block.get("text"):
            parts.append(Text(str(block["text"])))
        elif kind == "thinking":
            parts.append(Reasoning(str(block.get("thinking") or ""), str(block.get("signature") or ""),
                                   "anthropic"))
        elif kind == "redacted_thinking":
            parts.append(Reasoning("", str(block.get("data") or ""), "anthropic", True))
        elif kind == "tool_use":
            parts.append(ToolCall(safe_id(block.get("id"), f"toolu_{len(parts)}"),
                                  str(block.get("name") or ""),
                                  block.get("input") if isinstance(block.get("input"), dict) else {}))
    return Answer(str(body.get("id") or short_hash(json_text(body))), parts,
                  ANTHROPIC_STOP_IN.get(body.get("stop_reason"), "end"),
                  read_anthropic_usage(body.get("usage")) or Usage())


def write_anthropic_response(answer: Answer, model: str, ask: Optional[Chat] = None) -> Dict[str, Any]:
    content: List[Dict[str, Any]] = []
    for part in answer.parts:
        if isinstance(part, Reasoning):
            value = carry(part.signature, part.origin, "anthropic", part.redacted)
            content.append({"type": "thinking", "thinking": part.text, "signature": value}
                           if not (part.redacted and part.origin == "anthropic")
                           else {"type": "redacted_thinking", "data": part.signature})
        elif isinstance(part, Text):
            if content and content[-1]["type"] == "text":
                content[-1]["text"] += part.text
            else:
                content.append({"type": "text", "text": part.text})
        elif isinstance(part, ToolCall):
            if part.signature:             # (a signed call: as the stream writer does)
                content.append({"type": "thinking", "thinking": "",
                                "signature": carry(part.signature, part.origin, "anthropic")})
            content.append({"type": "tool_use", "id": part.id, "name": part.name,
                            "input": call_arguments(part)})
    tools = any(b["type"] == "tool_use" for b in content)
    return {"id": _prefixed(answer.id, "msg_"), "type": "message", "role": "assistant",
            "model": model, "content": content, "stop_reason": anthropic_stop(answer.stop, tools),
            "stop_sequence": None, "usage": write_anthropic_usage(answer.usage)}


def anthropic_stop(stop: str, tools: bool) -> str:
    """tool_use whenever a tool_use block went out, never without one (Claude Code loops
    or hangs on a wrong stop reason); but an answer cut off by the output cap says so,
    even mid tool call, as Anthropic's own API does (its input may be incomplete)."""
    if tools and stop not in CUT_OFF:
        return "tool_use"
    reason = ANTHROPIC_STOP_OUT.get(stop, "end_turn")
    return "end_turn" if reason == "tool_use" else reason


class AnthropicStreamReader(StreamReader):
    """Messages events in (the upstream's), the writer's events out. The end is
    message_stop; an error event fails the stream; ping and newer events are skipped."""

    fmt = "anthropic"

    def __init__(self, writer: StreamWriter) -> None:
        super().__init__(writer)
        self.counts: Dict[str, Any] = {}           # the usage fields so far
        self.blocks: Dict[Any, str] = {}           # open block index -> its kind
        self.whole: set = set()                    # tool blocks whose input came in the start

    def _feed(self, obj: Dict[str, Any], event: str, data: str) -> List[Tuple[str, str]]:
        handler = self.HANDLERS.get(str(obj.get("type") or event))
        return handler(self, obj) if handler else []

    def _usage(self, usage: Any) -> None:
        """Each usage field's last non-null value wins."""
        if isinstance(usage, dict):
            self.counts.update((k, v) for k, v in usage.items() if v is not None)

    def _message_start(self, obj: Dict[str, Any]) -> List[Tuple[str, str]]:
        message = obj.get("message") if isinstance(obj.get("message"), dict) else {}
        self._usage(message.get("usage"))
        return self.w.start(str(message.get("id") or short_hash(json_text(obj))),
                            read_anthropic_usage(message.get("usage")))

    def _block_start(self, obj: Dict[str, Any]) -> List[Tuple[str, str]]:
        block = obj.get("content_block") if isinstance(obj.get("content_block"), dict) else {}
        index, kind = obj.get("index"), block.get("type")
        self.blocks[index] = str(kind)
        if kind == "redacted_thinking":
            return self.w.signature(str(block.get("data") or ""), "anthropic", True)
        if kind != "tool_use":
            return []
        call_id = safe_id(block.get("id"), f"toolu_{index}")   # (as read_anthropic_response)
        if isinstance(block.get("input"), dict) and block["input"]:
            self.whole.add(index)                  # complete already: no deltas follow
            return self.w.tool_call(call_id, str(block.get("name") or ""),
                                    json_text(block["input"]))
        return self.w.tool_start(index, call_id, str(block.get("name") or ""))

    def _block_delta(self, obj: Dict[str, Any]) -> List[Tuple[str, str]]:
        delta = obj.get("delta") if isinstance(obj.get("delta"), dict) else {}
        kind = delta.get("type")
        if kind == "text_delta" and isinstance(delta.get("text"), str) and delta["text"]:
            return self.w.text(delta["text"])
        if kind == "thinking_delta" and isinstance(delta.get("thinking"), str):
            return self.w.reasoning(delta["thinking"])
        if kind == "signature_delta" and delta.get("signature"):
            return self.w.signature(str(delta["signature"]), "anthropic")
        if kind == "input_json_delta" and delta.get("partial_json") \
                and obj.get("index") not in self.whole:
            return self.w.tool_args(obj.get("index"), str(delta["partial_json"]))
        return []                                  # citations_delta and anything newer

    def _block_stop(self, obj: Dict[str, Any]) -> List[Tuple[str, str]]:
        index = obj.get("index")
        if self.blocks.pop(index, "") == "tool_use" and index not in self.whole:
            return self.w.tool_end(index)
        return []

    def _message_delta(self, obj: Dict[str, Any]) -> List[Tuple[str, str]]:
        self._usage(obj.get("usage"))
        delta = obj.get("delta") if isinstance(obj.get("delta"), dict) else {}
        reason = delta.get("stop_reason")
        return self.w.stop(ANTHROPIC_STOP_IN.get(reason, "end")) if reason else []

    def _message_stop(self, obj: Dict[str, Any]) -> List[Tuple[str, str]]:
        return self.w.end(read_anthropic_usage(self.counts))

    def _error(self, obj: Dict[str, Any]) -> List[Tuple[str, str]]:
        return self.w.fail(*stream_error_of(obj))

    HANDLERS = {"message_start": _message_start, "content_block_start": _block_start,
                "content_block_delta": _block_delta, "content_block_stop": _block_stop,
                "message_delta": _message_delta, "message_stop": _message_stop,
                "error": _error}


class _PendingCall:
    def __init__(self, call_id: str, name: str) -> None:
        self.id, self.name, self.args, self.ended = call_id, name, [], False


class AnthropicStreamWriter(StreamWriter):
    """The writer's calls in, Messages events out in the documented order. Blocks never interleave:
    text and thinking open and close as the kind of content changes; a tool call that
    starts while another is still receiving arguments (OpenAI's parallel calls) is held
    and sent whole once the open one is complete. message_delta carries the stop reason
    (tool_use whenever a tool_use block went out, never otherwise) and the usage."""

    def __init__(self, model: str, input_estimate: int = 0, ask: Optional[Chat] = None):
        super().__init__(model, input_estimate, ask)
        self.input_estimate, self.tools = input_estimate, False
        self.index = 0
        self.open = ""                             # "text", "thinking", "tool_use" or ""
        self.open_key: Any = None
        self.held_signature = ""
        self.calls: Dict[Any, _PendingCall] = {}   # tool calls not yet sent, by key
        self.queue: List[Any] = []

    @staticmethod
    def _event(kind: str, **fields: Any) -> Tuple[str, str]:
        return kind, json_text({"type": kind, **fields})

    def start(self, resp_id: str, usage: Optional[Usage]) -> List[Tuple[str, str]]:
        if self.started:
            return []
        self.started, self.usage = True, usage
        counts = write_anthropic_usage(usage) if usage else {
            "input_tokens": self.input_estimate, "cache_read_input_tokens": 0}
        message = {"id": _prefixed(resp_id, "msg_"), "type": "message", "role": "assistant",
                   "content": [], "model": self.model, "stop_reason": None, "stop_sequence": None,
                   "usage": {"input_tokens": counts["input_tokens"], "output_tokens": 0,
                             "cache_read_input_tokens": counts["cache_read_input_tokens"]}}
        return [self._event("message_start", message=message)]

    def _open(self, kind: str, block: Dict[str, Any]) -> List[Tuple[str, str]]:
        out = self._begin() + self._close()
        self.open = kind
        return out + [self._event("content_block_start", index=self.index, content_block=block)]

    def _close(self) -> List[Tuple[str, str]]:
        if not self.open:
            return []
        out = []
        if self.open == "thinking" and self.held_signature:
            out.append(self._event("content_block_delta", index=self.index, delta={
                "type": "signature_delta", "signature": self.held_signature}))
        out.append(self._event("content_block_stop", index=self.index))
        self.index, self.open, self.open_key, self.held_signature = self.index + 1, "", None, ""
        return out

    def text(self, text: str) -> List[Tuple[str, str]]:
        out = [] if self.open == "text" else self._open("text", {"type": "text", "text": ""})
        # The hot path of every translated stream: one string format, no dict.
        out.append(("content_block_delta", '{"type":"content_block_delta","index":%d,"delta":'
                    '{"type":"text_delta","text":%s}}' % (self.index, _JSON.encode(text))))
        return out

    def reasoning(self, text: str) -> List[Tuple[str, str]]:
        # (a signed block is whole: thinking after its signature is a block of its own)
        out = [] if self.open == "thinking" and not (text and self.held_signature) else \
            self._open("thinking", {"type": "thinking", "thinking": "", "signature": ""})
        if text:
            out.append(self._event("content_block_delta", index=self.index,
                                   delta={"type": "thinking_delta", "thinking": text}))
        return out

    def signature(self, value: str, origin: str, redacted: bool = False) -> List[Tuple[str, str]]:
        if redacted and origin == "anthropic":
            return self._open("redacted_thinking", {"type": "redacted_thinking", "data": value}) \
                + self._close()
        out = self.reasoning("") if self.open != "thinking" else []
        self.held_signature = carry(value, origin, "anthropic", redacted)
        return out

    def tool_start(self, key: Any, call_id: str, name: str) -> List[Tuple[str, str]]:
        self.calls[key] = _PendingCall(call_id, self.names.get(name, name))
        self.queue.append(key)
        return self._flush()

    def tool_args(self, key: Any, fragment: str) -> List[Tuple[str, str]]:
        if key == self.open_key and self.open == "tool_use":
            return [self._event("content_block_delta", index=self.index,
                                delta={"type": "input_json_delta", "partial_json": fragment})]
        if key in self.calls:
            self.calls[key].args.append(fragment)
        return []

    def tool_end(self, key: Any) -> List[Tuple[str, str]]:
        if key in self.calls:
            self.calls[key].ended = True
        if key == self.open_key:
            self.open_key = ("ended", key)          # complete: the next call may start
        return self._flush()

    def tool_call(self, call_id: str, name: str, arguments: str, signature: str = "",
                  origin: str = "") -> List[Tuple[str, str]]:
        # A call's own signature (Gemini 3 signs its functionCall parts) rides in an empty
        # thinking block before it: the client sends it back, and Gemini gets it again.
        out = self._close() + self.signature(signature, origin) if signature else []
        out += super().tool_call(call_id, name, arguments)
        complete = self.open == "tool_use" and isinstance(self.open_key, tuple)   # (went out whole)
        return out + self._close() if complete else out

    def _flush(self) -> List[Tuple[str, str]]:
        """Start held calls while no call is still receiving arguments."""
        out: List[Tuple[str, str]] = []
        while self.queue and not (self.open == "tool_use" and not isinstance(self.open_key, tuple)):
            key = self.queue.pop(0)
            call = self.calls.pop(key)
            out += self._open("tool_use", {"type": "tool_use", "id": call.id, "name": call.name,
                                           "input": {}})
            self.tools, self.open_key = True, key
            arguments = "".join(call.args)
            out += self.tool_args(key, arguments) if arguments else []
            if call.ended:
                self.open_key = ("ended", key)
        return out

    def _stop(self, reason: str) -> List[Tuple[str, str]]:
        out = self._begin()
        for key in self.queue:
            self.calls[key].ended = True
        if self.open == "tool_use":
            self.open_key = ("ended", self.open_key)
        return out + self._flush() + self._close()

    def _end(self, usage: Optional[Usage]) -> List[Tuple[str, str]]:
        reason = anthropic_stop(self.stopped, self.tools)
        counts = write_anthropic_usage(usage) if usage else {"output_tokens": 0}
        return [self._event("message_delta", delta={"stop_reason": reason, "stop_sequence": None},
                            usage=counts),
                self._event("message_stop")]

    def _fail(self, status: int, message: str) -> List[Tuple[str, str]]:
        return self._close() + [("error", json_text(_anthropic_error(status, message)))]


# -- 7.4 Gemini -------------------------------------------------------------------
# https://ai.google.dev/api/generate-content and .../gemini-api/docs/thought-signatures.
# Gemini has no tool-call ids: they are derived from the answer (never from a clock or a
# counter kept between requests), and a functionResponse is matched to its call by the
# request's own history.

# Keys a Gemini function `parameters` Schema accepts; any other is a 400.
GEMINI_SCHEMA_KEYS = frozenset({
    "type", "format", "title", "description", "nullable", "enum", "maxItems", "minItems",
    "properties", "required", "minProperties", "maxProperties", "minLength", "maxLength",
    "pattern", "example", "anyOf", "propertyOrdering", "default", "items", "minimum", "maximum"})
GEMINI_SCHEMA_FORMATS = frozenset({"enum", "date-time", "float", "double", "int32", "int64"})
GEMINI_MAX_STOP_SEQUENCES = 5
GEMINI_MIN_THINKING_BUDGET = 128         # Gemini 2.5 Pro's smallest budget
# Google's documented stand-in for a thoughtSignature a proxy cannot give back: without
# one on the first functionCall of a turn, Gemini 3 answers 400.
GEMINI_DUMMY_SIGNATURE = "skip_thought_signature_validator"
GEMINI_SAFETY_FINISHES = ("SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII",
                          "IMAGE_SAFETY", "LANGUAGE")
GEMINI_STOP_IN = {"STOP": "end", "MAX_TOKENS": "length",
                  **{r: "refusal" for r in GEMINI_SAFETY_FINISHES}}
GEMINI_STOP_OUT = {"end": "STOP", "stop_sequence": "STOP", "tool": "STOP", "pause": "STOP",
                   "length": "MAX_TOKENS", "context": "MAX_TOKENS", "refusal": "SAFETY"}
GEMINI_MODES = {"auto": "AUTO", "any": "ANY", "tool": "ANY", "none": "NONE"}
GEMINI_CHOICES = {"AUTO": "auto", "ANY": "any", "NONE": "none", "VALIDATED": "auto"}
GEMINI_SERVER_TOOLS = {"googleSearch": "web_search", "google_search": "web_search",
                       "googleSearchRetrieval": "web_search", "urlContext": "web_fetch",
                       "url_context": "web_fetch", "codeExecution": "code_execution",
                       "code_execution": "code_execution"}
GEMINI_TOOLS_OUT = {"web_search": "googleSearch", "web_fetch": "urlContext",
                    "code_execution": "codeExecution"}
GEMINI_LEVELS = {"minimal": "minimal", "low": "low", "medium": "medium", "high": "high",
                 "xhigh": "high", "max": "high"}
# generationConfig field <-> internal form field, both directions.
GEMINI_GENERATION = (("maxOutputTokens", "max_tokens"), ("temperature", "temperature"),
                     ("topP", "top_p"), ("topK", "top_k"), ("seed", "seed"),
                     ("presencePenalty", "presence_penalty"),
                     ("frequencyPenalty", "frequency_penalty"))


def gemini_schema(schema: Any, defs: Optional[Dict[str, Any]] = None,
                  seen: Tuple[str, ...] = ()) -> Dict[str, Any]:
    """A JSON Schema cut down to the subset Gemini's `parameters` accepts (ai.google.dev/api/caching#Schema): local
    $refs inlined (a cycle becomes a bare object), allOf merged, oneOf read as anyOf,
    null types folded into nullable, const/enum kept only as strings."""
    if not isinstance(schema, dict):
        return {}
    if defs is None:
        defs = {name: sub for key in ("definitions", "$defs") if isinstance(schema.get(key), dict)
                for name, sub in schema[key].items()}
    ref = schema.get("$ref")
    if isinstance(ref, str):
        name = ref.rsplit("/", 1)[-1]
        if name in seen or not isinstance(defs.get(name), dict):
            return {"type": "object"}
        return gemini_schema({**defs[name], **{k: v for k, v in schema.items() if k != "$ref"}},
                             defs, seen + (name,))
    for branch in schema.get("allOf") or []:
        schema = _merge_schema(schema, branch if isinstance(branch, dict) else {})
    out = {k: v for k, v in schema.items() if k in GEMINI_SCHEMA_KEYS
           and k not in ("type", "properties", "items", "anyOf", "enum", "format", "required")}
    _schema_type(schema, out)
    _schema_enum(schema, out)
    if isinstance(schema.get("format"), str) and schema["format"] in GEMINI_SCHEMA_FORMATS:
        out["format"] = schema["format"]
    if out.get("type") == "array" and not isinstance(schema.get("items"), (dict, list)):
        out["items"] = {"type": "string"}  # (Gemini refuses an array without items; JSON
                                           # Schema's "anything" has no Gemini form)
    if isinstance(schema.get("properties"), dict) and schema["properties"]:
        out["properties"] = {name: gemini_schema(sub, defs, seen)       # names are data
                             for name, sub in schema["properties"].items()}
        required = [r for r in _list_or_empty(schema.get("required"))
                    if isinstance(r, str) and r in out["properties"]]
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
    """Gemini enums are strings: keep const/enum only when every value is one (dropping
    is allowed; stringifying would make the model answer "1" for 1)."""
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
    """A Gemini Schema as standard JSON Schema: lower-case types, nullable as a null type;
    Gemini's own propertyOrdering and OpenAPI's example left out (JSON Schema has
    neither, and strict validators refuse what they do not know)."""
    if not isinstance(schema, dict):
        return {}
    out = {k: v for k, v in schema.items() if k not in ("propertyOrdering", "example")}
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


# Google's JSON takes proto field names as well as lowerCamelCase, and google-genai
# (Python) sends some so: "inlineData": {"mime_type": ...}, "thinking_config", "any_of"
# (https://protobuf.dev/programming-guides/json/). The values that are the user's own data
# keep their keys: call arguments, function results, property names, raw JSON schemas.
# (a tool's own argument names, such as file_path, are left alone, and cost no walk)
_SNAKE_KEY = re.compile(rb'_(?:data|type|uri|call|response|signature|instruction|config|thoughts|'
                        rb'budget|level|tokens|p|k|sequences|schema|declarations|of|items|length|'
                        rb'ordering|names|settings|content|count|penalty|modalities|request|'
                        rb'properties|metadata|execution|search|retrieval|context|logprobs|'
                        rb'resolution)"\s*:')
_GEMINI_RAW = ("args", "example", "default", "labels", "responseJsonSchema", "parametersJsonSchema",
               "responseJsonSchemaForTools", "$defs", "definitions", "patternProperties",
               "partMetadata")


def gemini_camel_case(body: Dict[str, Any], raw: bytes) -> Optional[Dict[str, Any]]:
    """The body with every field name in lowerCamelCase; None when it has none other."""
    if not _SNAKE_KEY.search(raw):
        return None
    changed = [False]

    def camel(obj: Any, parent: str = "") -> Any:
        if isinstance(obj, list):
            return [camel(item, parent) for item in obj]
        if not isinstance(obj, dict):
            return obj
        out = {}
        for key, value in obj.items():
            name = re.sub(r"_([a-z0-9])", lambda m: m.group(1).upper(), key) if "_" in key else key
            changed[0] |= name != key
            if name in _GEMINI_RAW or (name == "response" and parent == "functionResponse"):
                out[name] = value
            elif name == "properties" and isinstance(value, dict):
                out[name] = {prop: camel(schema) for prop, schema in value.items()}
            else:
                out[name] = camel(value, name)
        return out
    out = camel(body)
    return out if changed[0] else None


def read_gemini_request(body: Dict[str, Any]) -> Chat:
    """A generateContent body in the internal form (model and streaming come from the
    path). A call's id is its own, else call_<n> (n counts calls in this request); a
    functionResponse answers the earliest unanswered call with its id, else its name."""
    chat = Chat(cap_includes_reasoning=False)
    instruction = body.get("systemInstruction") or body.get("system_instruction")
    parts = instruction.get("parts") if isinstance(instruction, dict) else None
    parts = as_list([parts] if isinstance(parts, dict) else parts, "systemInstruction.parts")
    chat.system = [Text(p["text"]) for p in parts
                   if isinstance(p, dict) and isinstance(p.get("text"), str) and p["text"]]
    pending: List[Tuple[str, str]] = []
    for i, content in enumerate(as_list(body.get("contents"), "contents")):
        role = content.get("role", "user") if isinstance(content, dict) else None
        if role not in ("user", "model"):
            raise ClientError(f"contents[{i}]: role {role!r} is not user or model: use one of them")
        items: List[Any] = []
        for j, part in enumerate(as_list(content.get("parts"), f"contents[{i}].parts")):
            if isinstance(part, dict):
                _gemini_item(part, f"contents[{i}].parts[{j}]", pending, items)
        chat.turns.append(Turn("assistant" if role == "model" else "user", items))
    restored_reasoning(chat.turns)
    _gemini_tools(body, chat)
    _gemini_settings(body, chat)
    return chat


def _gemini_media(part: Any, where: str) -> Optional["Media"]:
    """An inlineData or fileData part as Media; None for any other."""
    if not isinstance(part, dict):
        return None
    if isinstance(part.get("inlineData"), dict):
        data = part["inlineData"]
        return Media(str(data.get("mimeType") or ""), data=str(data.get("data") or ""), where=where)
    if isinstance(part.get("fileData"), dict):
        data = part["fileData"]
        return Media(str(data.get("mimeType") or ""), url=str(data.get("fileUri") or ""),
                     where=where)
    return None


def _gemini_item(part: Dict[str, Any], where: str, pending: List[Tuple[str, str]],
                 items: List[Any]) -> None:
    if isinstance(part.get("functionCall"), dict):
        call = part["functionCall"]
        call_id = safe_id(call.get("id"), "") or f"call_{len(pending)}"
        pending.append((call_id, str(call.get("name"))))
        origin, signature, _ = uncarry(part.get("thoughtSignature"), "gemini")
        args = call.get("args")
        items.append(ToolCall(call_id, str(call.get("name")), args if isinstance(args, dict) else {},
                              signature, origin))
    elif isinstance(part.get("functionResponse"), dict):
        answer = part["functionResponse"]
        text, is_error = _result_text(answer.get("response"))
        # (Gemini 3 takes a result's images as its own parts: Gemini CLI sends them so)
        media = [m for i, p in enumerate(_list_or_empty(answer.get("parts")))
                 for m in [_gemini_media(p, f"{where}.functionResponse.parts[{i}]")] if m]
        items.append(ToolResult(_answered_id(pending, answer, where), str(answer.get("name") or ""),
                                ([Text(text)] if text else []) + media, is_error, where))
    elif isinstance(part.get("inlineData"), dict) or isinstance(part.get("fileData"), dict):
        items.append(_gemini_media(part, where))
    elif part.get("thought") is True:
        origin, signature, redacted = uncarry(part.get("thoughtSignature"), "gemini")
        last = items[-1] if items else None
        if isinstance(last, Reasoning) and not last.signature:
            last.text += str(part.get("text") or "")
            last.signature, last.origin, last.redacted = signature, origin, redacted
        else:
            items.append(Reasoning(str(part.get("text") or ""), signature, origin, redacted))
    elif isinstance(part.get("text"), str) and part["text"]:
        items.append(Text(part["text"]))


def _answered_id(pending: List[Tuple[str, str]], answer: Dict[str, Any], where: str) -> str:
    wanted = safe_id(answer.get("id"), "")
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
            return (value if isinstance(value, str) else json_text(value)), key == "error"
    return json_text(response if response is not None else {}), False


def _gemini_tools(body: Dict[str, Any], chat: Chat) -> None:
    for i, tool in enumerate(as_list(body.get("tools"), "tools")):
        if not isinstance(tool, dict):
            continue
        for decl in as_list(tool.get("functionDeclarations") or tool.get("function_declarations"),
                            f"tools[{i}].functionDeclarations"):
            if isinstance(decl, dict):
                schema = decl.get("parametersJsonSchema")     # (Gemini CLI's may say "OBJECT")
                schema = json_schema_from_gemini(schema if isinstance(schema, dict) and schema
                                                 else decl.get("parameters"))
                chat.tools.append(Tool(str(decl.get("name") or ""), str(decl.get("description") or ""),
                                       schema or {"type": "object", "properties": {}}))
        chat.tools += [Tool(key, server=kind) for key, kind in GEMINI_SERVER_TOOLS.items()
                       if key in tool]
    config = body.get("toolConfig") if isinstance(body.get("toolConfig"), dict) else {}
    calling = config.get("functionCallingConfig") if isinstance(
        config.get("functionCallingConfig"), dict) else {}
    chat.tool_choice = GEMINI_CHOICES.get(str(calling.get("mode") or "").upper(), "")
    names = calling.get("allowedFunctionNames") or []
    if chat.tool_choice == "any" and isinstance(names, list) and len(names) == 1:
        chat.tool_choice, chat.tool_name = "tool", str(names[0])


def _gemini_settings(body: Dict[str, Any], chat: Chat) -> None:
    config = body.get("generationConfig") if isinstance(body.get("generationConfig"), dict) else {}
    if config.get("candidateCount") not in (None, 1):
        raise ClientError(f"candidateCount={config['candidateCount']!r} is not supported for this "
                          "upstream: send 1")
    for source, target in GEMINI_GENERATION:
        if _is_number(config.get(source)):
            value = config[source]         # (google-genai sends an integer field as 3.0)
            setattr(chat, target, int(value) if target in ("max_tokens", "top_k", "seed") and
                    isinstance(value, float) and value.is_integer() else value)
    stops = config.get("stopSequences")
    chat.stop = [s for s in stops if isinstance(s, str)] if isinstance(stops, list) else []
    schema = config.get("responseJsonSchema") or config.get("response_json_schema")
    schema = schema if isinstance(schema, dict) else config.get("responseSchema")
    if isinstance(schema, dict):           # (Gemini CLI's helpers write Type.OBJECT: "OBJECT")
        schema = json_schema_from_gemini(schema)
        chat.output = {"type": "json_schema", "schema": schema, "name": "response"}
    elif config.get("responseMimeType") == "application/json":
        chat.output = {"type": "json_object"}
    chat.think = _gemini_think(config.get("thinkingConfig"))
    if isinstance(body.get("stream"), bool):
        chat.stream = body["stream"]


def _gemini_think(config: Any) -> Optional[Think]:
    """thinkingLevel (any case) is an effort; a thinkingBudget above 0 an exact budget,
    0 off, -1 dynamic (the model decides: nothing to ask of another provider)."""
    if not isinstance(config, dict):
        return None
    level = str(config.get("thinkingLevel") or "").lower()
    if level:
        if level not in EFFORTS:
            raise ClientError(f"thinkingLevel {config['thinkingLevel']!r} is unknown: use MINIMAL, "
                              "LOW, MEDIUM or HIGH")
        return Think(effort=level)
    budget = config.get("thinkingBudget")
    if not isinstance(budget, int) or isinstance(budget, bool):
        return None
    if budget < 0:
        return Think(dynamic=True)
    return Think(effort="none") if budget == 0 else Think(budget=budget)


def write_gemini_request(chat: Chat) -> Dict[str, Any]:
    """The internal form as a generateContent body. Signatures go back only where Gemini
    made them; the first functionCall of each model turn without one gets Google's
    documented stand-in."""
    if chat.n > 1:
        raise ClientError(f'"n" is {chat.n}: Gemini upstreams return one choice here; send n=1 '
                          "or leave it out")
    contents = []
    for turn in merged_turns([t for t in chat.turns if t.role != "system"]):
        parts = _gemini_parts_out(turn)
        if parts:
            contents.append({"role": "model" if turn.role == "assistant" else "user", "parts": parts})
    if not contents or contents[0]["role"] != "user":   # (a model turn first is refused:
        contents.insert(0, {"role": "user", "parts": [{"text": ANTHROPIC_PLACEHOLDER_TEXT}]})
    out: Dict[str, Any] = {"contents": contents}
    system = [{"text": t.text} for t in system_texts(chat)]
    declarations = [_gemini_declaration(t) for t in chat.tools if not t.server]
    generation = _gemini_generation_out(chat)
    if declarations and "responseMimeType" in generation and GEMINI_2.search(chat.model):
        # Gemini 2.x refuses JSON mode beside functions ("Function calling with a response
        # mime type: 'application/json' is unsupported"): the schema goes in the instructions
        schema, _ = generation.pop("responseJsonSchema", None), generation.pop("responseMimeType")
        system.append({"text": JSON_OBJECT_INSTRUCTION + (
            f" It follows this JSON Schema: {json_text(schema)}" if schema else "")})
    if system:
        out["systemInstruction"] = {"parts": system}
    tools: List[Dict[str, Any]] = [{"functionDeclarations": declarations}] if declarations else []
    # Gemini 2.x refuses built-in tools beside function declarations: a default one goes.
    tools += [{GEMINI_TOOLS_OUT[t.server]: {}} for t in chat.tools if t.server in GEMINI_TOOLS_OUT
              and not (t.optional and declarations)]
    for tool in chat.tools:
        if tool.server and tool.server not in GEMINI_TOOLS_OUT:
            server_tool_left_out(tool, "gemini")
    if tools:
        out["tools"] = tools
    if declarations and chat.tool_choice:
        config: Dict[str, Any] = {"mode": GEMINI_MODES[chat.tool_choice]}
        if chat.tool_choice == "tool" and chat.tool_name:
            config["allowedFunctionNames"] = [chat.tool_name]
        out["toolConfig"] = {"functionCallingConfig": config}
    if generation:
        out["generationConfig"] = generation
    return out


def _gemini_parts_out(turn: Turn) -> List[Dict[str, Any]]:
    parts: List[Dict[str, Any]] = []
    carried = ""                               # a Gemini signature waiting for its functionCall
    for part in turn.parts:
        if isinstance(part, Text):
            parts += [{"text": part.text}] if part.text else []
        elif isinstance(part, Media):
            parts.append(_gemini_media_out(part))
        elif isinstance(part, Reasoning) and part.origin == "gemini" and part.signature:
            if part.text:
                parts.append({"text": part.text, "thought": True, "thoughtSignature": part.signature})
            else:
                carried = part.signature
        elif isinstance(part, ToolCall):
            call: Dict[str, Any] = {"functionCall": {"name": part.name, "args": call_arguments(part)}}
            signature = part.signature if part.origin == "gemini" else carried
            if signature:
                call["thoughtSignature"] = signature
            carried = ""
            parts.append(call)
        elif isinstance(part, ToolResult):
            parts += _gemini_result_out(part)
    calls = [p for p in parts if "functionCall" in p]
    if turn.role == "assistant" and calls:
        calls[0].setdefault("thoughtSignature", GEMINI_DUMMY_SIGNATURE)
    return parts


def _gemini_media_out(media: Media) -> Dict[str, Any]:
    if media.data:
        return {"inlineData": {"mimeType": media.mime, "data": media.data}}
    if media.url.startswith("gs://"):
        return {"fileData": {"fileUri": media.url, **({"mimeType": media.mime} if media.mime else {})}}
    raise ClientError(f"{media.where}: URL {printable(media.url, 80)!r} cannot be sent to a Gemini "
                      "upstream: send the file inline (a data: URL or base64) or as a gs:// URI")


def _gemini_result_out(result: ToolResult) -> List[Dict[str, Any]]:
    if not result.name:
        raise ClientError(f"{result.where} answers tool call {result.call_id!r}, which no earlier "
                          "assistant message holds: send the assistant tool call before its result")
    text = result_text(result.parts, "\n")
    response = {"error" if result.is_error else "result": text}
    extra = [_gemini_media_out(p) for p in result.parts if isinstance(p, Media)]
    return [{"functionResponse": {"name": result.name, "response": response}}] + extra


def _gemini_declaration(tool: Tool) -> Dict[str, Any]:
    decl: Dict[str, Any] = {"name": tool.name}
    if tool.description:
        decl["description"] = tool.description
    params = gemini_schema(CUSTOM_TOOL_SCHEMA if tool.custom else tool.schema)
    if params.get("properties"):            # no parameters at all for a no-argument tool
        decl["parameters"] = params
    return decl


GEMINI_3 = re.compile(r"gemini-(?:[3-9]|\d\d)")     # models that take thinking levels
GEMINI_2 = re.compile(r"gemini-[12]\.")                # ...and that refuse JSON mode beside functions


def _gemini_generation_out(chat: Chat) -> Dict[str, Any]:
    config: Dict[str, Any] = {}
    for target, source in GEMINI_GENERATION:
        if getattr(chat, source) is not None:
            config[target] = getattr(chat, source)
    if chat.stop:
        config["stopSequences"] = chat.stop[:GEMINI_MAX_STOP_SEQUENCES]
    if chat.output:
        config["responseMimeType"] = "application/json"
        if chat.output["type"] == "json_schema":
            config["responseJsonSchema"] = chat.output.get("schema") or {}
    if chat.think:
        config["thinkingConfig"] = _gemini_thinking_out(chat)
    return config


def _gemini_thinking_out(chat: Chat) -> Dict[str, Any]:
    """Gemini 3 takes a level, Gemini 2.5 a budget (https://ai.google.dev/gemini-api/docs/thinking);
    a budget stays under a client's cap that pays for reasoning too."""
    think, model = chat.think or Think(), chat.model
    if think.dynamic and not think.effort:
        return {"thinkingBudget": -1, "includeThoughts": True}
    if think.effort == "none":
        return {"thinkingBudget": 0}
    if think.effort and think.budget is None and GEMINI_3.search(model):
        return {"thinkingLevel": GEMINI_LEVELS.get(think.effort, "high"), "includeThoughts": True}
    budget = budget_of(think) or ANTHROPIC_MIN_THINKING_BUDGET
    if chat.cap_includes_reasoning and chat.max_tokens and budget >= chat.max_tokens:
        budget = max(chat.max_tokens // 2, GEMINI_MIN_THINKING_BUDGET)
    return {"thinkingBudget": budget, "includeThoughts": True}


def read_gemini_usage(meta: Any) -> Optional[Usage]:
    if not isinstance(meta, dict):
        return None
    prompt, candidates = count(meta.get("promptTokenCount")), count(meta.get("candidatesTokenCount"))
    thoughts = count(meta.get("thoughtsTokenCount"))
    return Usage(prompt, count(meta.get("cachedContentTokenCount")), 0, candidates + thoughts,
                 thoughts, count(meta.get("totalTokenCount")))


def write_gemini_usage(usage: Usage) -> Dict[str, int]:
    out = {"promptTokenCount": usage.input, "candidatesTokenCount": max(0, usage.output - usage.reasoning),
           "totalTokenCount": usage.sum()}
    if usage.cached:
        out["cachedContentTokenCount"] = usage.cached
    if usage.reasoning:
        out["thoughtsTokenCount"] = usage.reasoning
    return out


def _gemini_candidate_parts(body: Dict[str, Any]) -> List[Dict[str, Any]]:
    candidates = body.get("candidates")
    candidate = candidates[0] if isinstance(candidates, list) and candidates and \
        isinstance(candidates[0], dict) else {}
    content = candidate.get("content") if isinstance(candidate.get("content"), dict) else {}
    parts = content.get("parts")
    return [p for p in parts if isinstance(p, dict)] if isinstance(parts, list) else []


def _gemini_finish(body: Dict[str, Any]) -> Optional[str]:
    """The chunk's finishReason; a prompt blocked before generation counts as SAFETY."""
    candidates = body.get("candidates")
    if isinstance(candidates, list) and candidates and isinstance(candidates[0], dict) \
            and candidates[0].get("finishReason"):
        return str(candidates[0]["finishReason"])
    feedback = body.get("promptFeedback")
    return "SAFETY" if isinstance(feedback, dict) and feedback.get("blockReason") else None


def gemini_call_id(response_id: str, n: int, call: Dict[str, Any]) -> str:
    """A tool-call id for a Gemini functionCall: its own id when it has one (Vertex), else
    derived from the response id, the call's position, name and args, so the same answer
    always gets the same ids and two answers almost never share one."""
    if call.get("id"):
        return safe_id(call["id"], "call_0")
    return "call_" + short_hash(f"{response_id}|{n}|{call.get('name')}|{json_text(call.get('args') or {})}")


def read_gemini_response(body: Dict[str, Any]) -> Answer:
    response_id = str(body.get("responseId") or "")
    parts: List[Any] = []
    calls = 0
    for part in _gemini_candidate_parts(body):
        last = parts[-1] if parts else None
        signature = str(part.get("thoughtSignature") or "")
        if isinstance(part.get("functionCall"), dict):
            call = part["functionCall"]
            args = call.get("args") if isinstance(call.get("args"), dict) else {}
            parts.append(ToolCall(gemini_call_id(response_id, calls, call), str(call.get("name")),
                                  args, signature, "gemini" if signature else ""))
            calls += 1
        elif part.get("thought") is True:
            if not isinstance(last, Reasoning) or last.signature:
                last = Reasoning()
                parts.append(last)
            last.text += str(part.get("text") or "")
            if signature:
                last.signature, last.origin = signature, "gemini"
        elif part.get("text"):
            if isinstance(last, Text):
                last.text += str(part["text"])
            else:
                parts.append(Text(str(part["text"])))
    finish = _gemini_finish(body)
    return Answer(response_id or short_hash(json_text(body)), parts,
                  "tool" if calls else GEMINI_STOP_IN.get(finish or "", "end"),
                  read_gemini_usage(body.get("usageMetadata")) or Usage())


def _gemini_answer(parts: List[Dict[str, Any]], finish: Optional[str], usage: Optional[Usage],
                   model: str, response_id: str) -> Dict[str, Any]:
    """A GenerateContentResponse (whole answer or stream chunk). A finishing answer with
    no parts carries one empty text part, as Google's own final chunks do."""
    parts = parts or ([{"text": ""}] if finish else [])
    candidate: Dict[str, Any] = {"content": {"role": "model", "parts": parts}, "index": 0}
    if finish:
        candidate["finishReason"] = finish
    out: Dict[str, Any] = {"candidates": [candidate]}
    if usage is not None:
        out["usageMetadata"] = write_gemini_usage(usage)
    out.update({"modelVersion": model, "responseId": response_id})
    return out


# An answer's reasoning rides on its first functionCall as that call's thoughtSignature
# (tagged "pp1:reasoning:"): Gemini CLI keeps no thought parts in its history, yet DeepSeek
# and Kimi refuse a tool turn without its reasoning_content, and Anthropic keeps thinking
# on only for a tool turn that opens with its signed thinking block.
REASONING_CARRIED = "reasoning"


def carried_reasoning(blocks: Sequence[Reasoning]) -> str:
    return carry(json_text([{"t": b.text, "s": b.signature, "o": b.origin, "r": b.redacted}
                            for b in blocks]), REASONING_CARRIED, "gemini")


def restored_reasoning(turns: List[Turn]) -> None:
    """The reasoning calls carried (on ToolCall.signature, origin REASONING_CARRIED), back
    at the start of their turn, unless the client kept the thought parts themselves
    somewhere in that run of model turns (google-genai keeps each streamed chunk as one)."""
    kept, first = False, None
    for turn in turns:
        if turn.role != "assistant":
            kept, first = False, None
            continue
        first = first or turn                  # (the run's turns are merged into one later)
        kept = kept or any(isinstance(p, Reasoning) for p in turn.parts)
        for call in [p for p in turn.parts if isinstance(p, ToolCall) and p.origin == REASONING_CARRIED]:
            value, call.signature, call.origin = call.signature, "", ""
            try:
                saved = loads_json(value)
            except ValueError:
                continue
            if isinstance(saved, list) and not kept:
                first.parts[:0] = [Reasoning(str(b.get("t") or ""), str(b.get("s") or ""),
                                             str(b.get("o") or ""), b.get("r") is True)
                                   for b in saved if isinstance(b, dict)]
                kept = True


def _gemini_call_part(call_id: str, name: str, args: Any, signature: str = "") -> Dict[str, Any]:
    """The upstream's call id rides along as functionCall.id; Gemini clients send it back
    on the functionResponse, which pairs them exactly (_answered_id)."""
    call: Dict[str, Any] = {"id": call_id} if call_id else {}
    part: Dict[str, Any] = {"functionCall": dict(call, name=name, args=args)}
    if signature:
        part["thoughtSignature"] = signature
    return part


def _gemini_part_out(part: Any) -> Optional[Dict[str, Any]]:
    if isinstance(part, Text):
        return {"text": part.text}
    if isinstance(part, Reasoning):
        out: Dict[str, Any] = {"text": part.text, "thought": True}
        if part.signature:
            out["thoughtSignature"] = carry(part.signature, part.origin, "gemini", part.redacted)
        return out
    if isinstance(part, ToolCall):
        return _gemini_call_part(part.id, part.name, call_arguments(part),
                                 carry(part.signature, part.origin, "gemini"))
    return None


def write_gemini_response(answer: Answer, model: str, ask: Optional[Chat] = None) -> Dict[str, Any]:
    parts = [p for p in map(_gemini_part_out, answer.parts) if p is not None]
    thoughts = [p for p in answer.parts if isinstance(p, Reasoning)]
    first = next((p for p in parts if "functionCall" in p), None)
    if thoughts and first is not None and "thoughtSignature" not in first:
        first["thoughtSignature"] = carried_reasoning(thoughts)
    return _gemini_answer(parts, GEMINI_STOP_OUT.get(answer.stop, "STOP"), answer.usage, model,
                          answer.id)


class GeminiStreamReader(StreamReader):
    """Gemini alt=sse chunks in (the upstream's), the writer's events out. Each chunk
    holds new parts only; functionCall parts arrive whole; the last chunk(s) carry the
    finishReason and the full usageMetadata. Lines that are not JSON are skipped."""

    fmt = "gemini"

    def __init__(self, writer: StreamWriter) -> None:
        super().__init__(writer)
        self.response_id, self.calls = "", 0

    def _feed(self, obj: Dict[str, Any], event: str, data: str) -> List[Tuple[str, str]]:
        if "error" in obj:
            return self.w.fail(*stream_error_of(obj))
        out: List[Tuple[str, str]] = []
        meta = obj.get("usageMetadata")
        if not self.w.started:
            self.response_id = str(obj.get("responseId") or "")
            known = isinstance(meta, dict) and "promptTokenCount" in meta
            out += self.w.start(self.response_id or short_hash(data),
                                read_gemini_usage(meta) if known else None)
        if isinstance(meta, dict):
            self.usage = read_gemini_usage(meta)
        if not self.stopped:
            out += self._parts(_gemini_candidate_parts(obj))
            finish = _gemini_finish(obj)
            if finish:                     # (calls arrive whole: with one, a tool turn,
                self.stopped = True        # as read_gemini_response says too)
                out += self.w.stop("tool" if self.calls else GEMINI_STOP_IN.get(finish, "end"))
        if self.stopped and isinstance(meta, dict):
            out += self.w.end(self.usage)
        return out

    def _parts(self, parts: List[Dict[str, Any]]) -> List[Tuple[str, str]]:
        out: List[Tuple[str, str]] = []
        for part in parts:
            signature = str(part.get("thoughtSignature") or "")
            if isinstance(part.get("functionCall"), dict):
                call = part["functionCall"]
                out += self.w.tool_call(gemini_call_id(self.response_id, self.calls, call),
                                        str(call.get("name")), json_text(call.get("args") or {}),
                                        signature, "gemini")
                self.calls += 1
            elif part.get("thought") is True:
                out += self.w.reasoning(str(part.get("text") or ""))
                out += self.w.signature(signature, "gemini") if signature else []
            elif part.get("text"):     # an empty text part carries only a signature
                out += self.w.text(str(part["text"]))
        return out


class GeminiStreamWriter(StreamWriter):
    """The writer's calls in, Gemini alt=sse chunks out: "" events, no [DONE]. Text and
    thoughts go out as they come; each tool call whole once its arguments are complete,
    with the next event (only the stop reason says whether the output cap cut it short:
    Gemini never sends a partial call, and Gemini CLI would run one with {}); the
    finishReason and usage in the last chunk."""

    def __init__(self, model: str, input_estimate: int = 0, ask: Optional[Chat] = None):
        super().__init__(model, input_estimate, ask)
        self.response_id = ""
        self.calls: Dict[Any, _PendingCall] = {}
        self.ended: List[_PendingCall] = []         # calls complete, not sent yet
        self.thoughts: List[Reasoning] = []         # the answer's reasoning, for its first call

    def _chunk(self, parts: List[Dict[str, Any]], finish: Optional[str] = None,
               usage: Optional[Usage] = None) -> Tuple[str, str]:
        return "", json_text(_gemini_answer(parts, finish, usage, self.model, self.response_id))

    def _call(self, call_id: str, name: str, args: Any, signature: str = "") -> Tuple[str, str]:
        """A functionCall chunk; the first one carries the answer's reasoning."""
        if not signature and self.thoughts:    # (the answer's first call, as a whole answer)
            signature = carried_reasoning(self.thoughts)
        self.thoughts = []
        return self._chunk([_gemini_call_part(call_id, name, args, signature)])

    def start(self, resp_id: str, usage: Optional[Usage]) -> List[Tuple[str, str]]:
        self.started, self.response_id = True, resp_id
        return []

    def _released(self) -> List[Tuple[str, str]]:
        ended, self.ended = self.ended, []
        return [self._call(call.id, call.name, tool_args("".join(call.args))) for call in ended]

    def text(self, text: str) -> List[Tuple[str, str]]:
        return self._released() + [self._chunk([{"text": text}])]

    def reasoning(self, text: str) -> List[Tuple[str, str]]:
        if not text:
            return []
        out = self._released()
        if not self.thoughts or self.thoughts[-1].signature:
            self.thoughts.append(Reasoning())
        self.thoughts[-1].text += text
        return out + [self._chunk([{"text": text, "thought": True}])]

    def signature(self, value: str, origin: str, redacted: bool = False) -> List[Tuple[str, str]]:
        out = self._released()
        if not self.thoughts or self.thoughts[-1].signature:
            self.thoughts.append(Reasoning())
        self.thoughts[-1].signature, self.thoughts[-1].origin, self.thoughts[-1].redacted = \
            value, origin, redacted
        return out + [self._chunk([{"text": "", "thought": True,
                                                 "thoughtSignature": carry(value, origin, "gemini",
                                                                           redacted)}])]

    def tool_start(self, key: Any, call_id: str, name: str) -> List[Tuple[str, str]]:
        self.calls[key] = _PendingCall(call_id, self.names.get(name, name))
        return []

    def tool_args(self, key: Any, fragment: str) -> List[Tuple[str, str]]:
        if key in self.calls:
            self.calls[key].args.append(fragment)
        return []

    def tool_end(self, key: Any) -> List[Tuple[str, str]]:
        if key in self.calls:
            self.ended.append(self.calls.pop(key))
        return []

    def tool_call(self, call_id: str, name: str, arguments: str, signature: str = "",
                  origin: str = "") -> List[Tuple[str, str]]:
        return self._released() + [self._call(call_id, self.names.get(name, name), tool_args(arguments),
                                              carry(signature, origin, "gemini"))]

    def _stop(self, reason: str) -> List[Tuple[str, str]]:
        for key in list(self.calls):
            self.tool_end(key)
        if reason in CUT_OFF:              # a call the cap cut mid-arguments goes no further
            self.ended = [call for call in self.ended if _whole_arguments("".join(call.args))]
        return self._released()

    def _end(self, usage: Optional[Usage]) -> List[Tuple[str, str]]:
        return self._released() + [self._chunk([], GEMINI_STOP_OUT.get(self.stopped, "STOP"),
                                               self.usage)]

    def _fail(self, status: int, message: str) -> List[Tuple[str, str]]:
        # (whole calls held go first, as they came)
        return self._released() + [("error", json_text(_gemini_error(status, message)))]


# -- 7.5 OpenAI Responses ----------------------------------------------------------
# https://platform.openai.com/docs/api-reference/responses and .../responses-streaming.
# A client format (Codex CLI speaks nothing else), and an upstream one only for a relay
# to a server that speaks it natively: the proxy keeps no conversation state.

NAMESPACE_JOIN = "__"                     # a namespace's tools as flat function names
TOOL_SEARCH = "tool_search"               # the client's tool search, as a function
RESPONSES_INCOMPLETE = {"length": "max_output_tokens", "context": "max_output_tokens",
                        "refusal": "content_filter"}
RESPONSES_ECHO = ("instructions", "max_output_tokens", "parallel_tool_calls", "reasoning",
                  "store", "temperature", "text", "tool_choice", "tools", "top_p", "metadata")
RESPONSES_HOSTED_TOOLS = ("web_search", "web_search_preview", "file_search", "code_interpreter",
                          "image_generation", "mcp", "computer_use_preview", "local_shell",
                          "shell", "apply_patch")


def read_responses_request(body: Dict[str, Any]) -> Chat:
    """A Responses request in the internal form. previous_response_id and store: true
    need state this proxy does not keep, so they are refused here: a relay to an upstream
    that speaks Responses never reads the request."""
    if body.get("previous_response_id") or body.get("conversation"):
        raise ClientError('"previous_response_id" refers to a response this proxy does not keep; '
                          'send the whole conversation in "input" with "store": false (as Codex '
                          "does), or route the model to an upstream that speaks the Responses API")
    if body.get("store") is True:
        raise ClientError('"store": true asks to keep the response, and this upstream cannot: '
                          'send "store": false, or route the model to an upstream that speaks '
                          "the Responses API")
    chat = Chat(model=body["model"] if isinstance(body.get("model"), str) else "")
    if isinstance(body.get("instructions"), str) and body["instructions"]:
        chat.system = [Text(body["instructions"])]
    _responses_tools(as_list(body.get("tools"), "tools"), chat)
    given = body.get("input")
    if isinstance(given, str):
        chat.turns = [Turn("user", [Text(given)] if given else [])]
    elif not isinstance(given, list):
        raise ClientError(f'"input" must be a string or a list of items, got {_short(given)}')
    else:
        names: Dict[str, str] = {}
        for i, item in enumerate(as_list(given, "input")):
            if not isinstance(item, dict):
                raise ClientError(f"input[{i}] must be an object, got {_short(item)}")
            chat.turns += _responses_item(item, f"input[{i}]", names, chat)
    _responses_settings(body, chat)
    return chat


def _responses_item(item: Dict[str, Any], where: str, names: Dict[str, str], chat: Chat) -> List[Turn]:
    kind = item.get("type") or ("message" if "role" in item else None)
    if kind == "message":
        return [_responses_message(item, where)]
    if kind in ("function_call", "custom_tool_call"):
        call_id = safe_id(item.get("call_id"), f"call_{len(names)}")
        name = str(item.get("name") or "")
        if item.get("namespace"):
            name = f"{item['namespace']}{NAMESPACE_JOIN}{name}"
        names[call_id] = name
        custom = kind == "custom_tool_call"
        args = str(item.get("input") or "") if custom else tool_args(item.get("arguments"))
        return [Turn("assistant", [ToolCall(call_id, name, args, custom=custom)])]
    if kind == "local_shell_call":         # (a relayed codex-mini's; history for the others)
        call_id = safe_id(item.get("call_id"), f"call_{len(names)}")
        names[call_id] = "local_shell"
        action = item.get("action") if isinstance(item.get("action"), dict) else {}
        return [Turn("assistant", [ToolCall(call_id, "local_shell",
                                            {k: v for k, v in action.items() if k != "type"})])]
    if kind == "tool_search_call":
        call_id = safe_id(item.get("call_id"), f"call_{len(names)}")
        names[call_id] = TOOL_SEARCH
        return [Turn("assistant", [ToolCall(call_id, TOOL_SEARCH, tool_args(item.get("arguments")))])]
    if kind == "tool_search_output":
        # The tools found join the request's tools, as the Responses API makes them callable.
        found = as_list(item.get("tools"), where + ".tools")
        _responses_tools(found, chat, where + ".tools")
        names_found = [str(t.get("name")) for t in found if isinstance(t, dict)]
        text = "Tools loaded: " + ", ".join(names_found) if names_found else "No tools found."
        call_id = safe_id(item.get("call_id"), "call_missing")
        return [Turn("user", [ToolResult(call_id, TOOL_SEARCH, [Text(text)], where=where)])]
    if kind in ("function_call_output", "custom_tool_call_output"):
        call_id = safe_id(item.get("call_id"), "call_missing")
        output = item.get("output")
        parts = [Text(output)] if isinstance(output, str) and output else \
            _responses_parts(output, where + ".output") if isinstance(output, list) else []
        return [Turn("user", [ToolResult(call_id, names.get(call_id, ""), parts, where=where)])]
    if kind == "reasoning":
        texts = [p.get("text") for p in as_list(item.get("summary"), where + ".summary")
                 + as_list(item.get("content"), where + ".content")
                 if isinstance(p, dict) and isinstance(p.get("text"), str)]
        origin, value, redacted = uncarry(item.get("encrypted_content"), "responses")
        return [Turn("assistant", [Reasoning("\n".join(texts), value, origin, redacted)])]
    if kind == "item_reference":
        raise ClientError(f"{where}: an item_reference needs the response this proxy does not "
                          "keep; send the item itself")
    log.debug("%s: %s items have no meaning for this upstream; left out", where, printable(str(kind)))
    return []


def _responses_message(item: Dict[str, Any], where: str) -> Turn:
    role = item.get("role")
    content = item.get("content")
    parts = ([Text(content)] if content else []) if isinstance(content, str) else \
        _responses_parts(content, where + ".content")
    if role in ("system", "developer"):
        return Turn("system", [p for p in parts if isinstance(p, Text)])
    if role not in ("user", "assistant"):
        raise ClientError(f"{where}.role is {_short(role)}; use user, assistant, system or developer")
    return Turn(role, parts)


def _responses_parts(content: Any, where: str) -> List[Any]:
    parts: List[Any] = []
    for j, part in enumerate(as_list(content, where)):
        at, kind = f"{where}[{j}]", part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text", "refusal"):
            text = part.get("text", part.get("refusal"))
            parts += [Text(text)] if isinstance(text, str) and text else []
        elif kind == "input_image" and part.get("image_url"):
            parts.append(media_from_url(part["image_url"], f"{at}.image_url"))
        elif kind == "input_file" and (part.get("file_data") or part.get("file_url")):
            parts.append(media_from_url(part.get("file_data") or part.get("file_url"),
                                        f"{at}.file_data", name=str(part.get("filename") or ""),
                                        mime="application/pdf"))
        elif kind == "input_audio" and isinstance(part.get("input_audio"), dict):
            audio = part["input_audio"]
            parts.append(Media(f"audio/{audio.get('format') or 'wav'}", data=str(audio.get("data") or ""),
                               where=at))
        else:
            raise ClientError(f"{at}: content part {_short(part)} cannot be translated: send "
                              "input_text, input_image or input_file with data or a URL")
    return parts


def _responses_tools(tools: List[Any], chat: Chat, where: str = "tools") -> None:
    """Function tools as they are; freeform `custom` tools (Codex's apply_patch) as one
    string parameter; a namespace's tools flattened to <namespace>__<name>; the client's
    tool_search as a function whose calls go back as tool_search_call items; tools the
    upstream must run itself (web search and the like) as server tools."""
    namespaces = chat.extra.setdefault("namespaces", {})
    for i, tool in enumerate(tools):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind == "namespace":
            for child in as_list(tool.get("tools"), f"{where}[{i}].tools"):
                flat = f"{tool.get('name')}{NAMESPACE_JOIN}{child.get('name')}"
                namespaces[flat] = (str(tool.get("name")), str(child.get("name")))
                chat.tools.append(_responses_tool(dict(child, name=flat), f"{where}[{i}]"))
        else:
            made = _responses_tool(tool, f"{where}[{i}]")
            chat.tools += [made] if made is not None else []
    chat.extra["custom"] = {t.name for t in chat.tools if t.custom}


def _responses_tool(tool: Any, where: str) -> Optional[Tool]:
    kind = tool.get("type", "function") if isinstance(tool, dict) else None
    if kind == "function" and isinstance(tool.get("name"), str):
        schema = tool.get("parameters")
        return Tool(tool["name"], str(tool.get("description") or ""),
                    schema if isinstance(schema, dict) else None)
    if kind == "custom" and isinstance(tool.get("name"), str):
        description = str(tool.get("description") or "")
        fmt = tool.get("format") if isinstance(tool.get("format"), dict) else {}
        if fmt.get("type") == "grammar" and fmt.get("definition"):
            description += (f"\n\nThe input is raw text in this {fmt.get('syntax', '')} grammar, "
                            f"not JSON:\n{fmt['definition']}")
        return Tool(tool["name"], description, custom=True)
    if kind == "tool_search" and tool.get("execution", "client") == "client":
        schema = tool.get("parameters")
        return Tool(TOOL_SEARCH, str(tool.get("description") or "Search for more tools."),
                    schema if isinstance(schema, dict) else {
                        "type": "object", "properties": {"query": {"type": "string"}}})
    if kind in RESPONSES_HOSTED_TOOLS:         # model capabilities in OpenAI's API: offered
        return Tool(str(kind), optional=True,    # where the upstream has them
                    server="web_search" if kind.startswith("web_search") else str(kind))
    if not isinstance(kind, str) or kind in ("function", "custom"):
        raise ClientError(f"{where}: tool {_short(tool)} cannot be translated: a function or "
                          "custom tool needs a name")
    log.warning("%s: a %r tool runs on OpenAI's servers only; left out for this upstream",
                where, printable(kind, 40))
    return None


def _responses_settings(body: Dict[str, Any], chat: Chat) -> None:
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        kind = choice.get("type")
        if kind in ("function", "custom") and choice.get("name"):
            chat.tool_choice, chat.tool_name = "tool", str(choice["name"])
        elif kind == "allowed_tools":
            chat.tool_choice = {"required": "any"}.get(choice.get("mode"), "auto")
        else:
            chat.tool_choice = "auto"
    elif isinstance(choice, str) and choice in OPENAI_TOOL_CHOICES:
        chat.tool_choice = OPENAI_TOOL_CHOICES[choice]
    if isinstance(body.get("parallel_tool_calls"), bool):
        chat.parallel = body["parallel_tool_calls"]
    chat.max_tokens = count(body.get("max_output_tokens")) or None
    for key in ("temperature", "top_p"):
        if _is_number(body.get(key)):
            setattr(chat, key, body[key])
    reasoning = body.get("reasoning") if isinstance(body.get("reasoning"), dict) else {}
    if reasoning.get("effort") in EFFORTS:
        chat.think = Think(effort=reasoning["effort"], summary=str(reasoning.get("summary") or ""))
    text = body.get("text") if isinstance(body.get("text"), dict) else {}
    fmt = text.get("format") if isinstance(text.get("format"), dict) else {}
    if fmt.get("type") == "json_schema":
        chat.output = {"type": "json_schema", "schema": fmt.get("schema") or {"type": "object"},
                       "name": fmt.get("name") or "response", "strict": fmt.get("strict")}
    elif fmt.get("type") == "json_object":
        chat.output = {"type": "json_object"}
    if isinstance(body.get("stream"), bool):
        chat.stream = body["stream"]
    user = body.get("user") or body.get("safety_identifier")
    chat.user = user if isinstance(user, str) else ""
    chat.extra["echo"] = {k: body[k] for k in RESPONSES_ECHO if k in body}


def write_responses_request(chat: Chat) -> Dict[str, Any]:
    """The internal form as a Responses request, for a server that speaks it (wireApi
    "responses"): stateless (store: false, the whole conversation in input), with the
    encrypted reasoning asked back so that it can travel with the next turn."""
    out: Dict[str, Any] = {"model": chat.model} if chat.model else {}
    system = result_text(chat.system, "\n")
    if system:
        out["instructions"] = system
    items: List[Dict[str, Any]] = []
    custom = {t.name for t in chat.tools if t.custom}
    for turn in merged_turns(chat.turns):
        items += _responses_items_out(turn, custom)
    out["input"] = items
    out["store"] = False
    if chat.max_tokens:
        out["max_output_tokens"] = chat.max_tokens
    for key in ("temperature", "top_p"):
        if getattr(chat, key) is not None:
            out[key] = getattr(chat, key)
    if chat.stream is not None:
        out["stream"] = chat.stream
    _responses_tools_out(chat, out)
    effort = effort_of(chat.think) if chat.think else ""
    if effort:
        out["reasoning"] = {"effort": OPENAI_EFFORT.get(effort, effort)}
        if effort != "none":
            out["reasoning"]["summary"] = chat.think.summary or "auto"
            out["include"] = ["reasoning.encrypted_content"]
    if chat.output:
        fmt = _openai_format_out(chat.output)
        out["text"] = {"format": dict(fmt.get("json_schema", {}), type=fmt["type"])}
    return out


def _responses_items_out(turn: Turn, custom: set) -> List[Dict[str, Any]]:
    if turn.role == "system":
        return [{"type": "message", "role": "developer",
                 "content": [{"type": "input_text", "text": result_text(turn.parts, "\n")}]}]
    items: List[Dict[str, Any]] = []
    if turn.role == "assistant":
        for part in turn.parts:
            if isinstance(part, Reasoning) and part.origin == "responses" and part.signature:
                items.append({"type": "reasoning", "encrypted_content": part.signature,
                              "summary": [{"type": "summary_text", "text": part.text}]
                              if part.text else []})
            elif isinstance(part, Text):
                if items and items[-1]["type"] == "message":
                    items[-1]["content"][0]["text"] += part.text
                else:
                    items.append({"type": "message", "role": "assistant", "content": [
                        {"type": "output_text", "text": part.text}]})
            elif isinstance(part, ToolCall) and (part.custom or part.name in custom):
                items.append({"type": "custom_tool_call", "call_id": part.id, "name": part.name,
                              "input": part.args if isinstance(part.args, str)
                              else str(call_arguments(part).get("input", ""))})
            elif isinstance(part, ToolCall):
                items.append({"type": "function_call", "call_id": part.id, "name": part.name,
                              "arguments": json_text(call_arguments(part))})
        return items
    for part in turn.parts:
        if isinstance(part, ToolResult):
            output: Any = [_responses_part_out(p) for p in part.parts]
            if all(p["type"] == "input_text" for p in output):
                output = "\n\n".join(p["text"] for p in output)
                output = (f"Error: {output}" if output else "Error") if part.is_error else output
            kind = "custom_tool_call_output" if part.name in custom else "function_call_output"
            items.append({"type": kind, "call_id": part.call_id, "output": output})
    content = [_responses_part_out(p) for p in turn.parts if isinstance(p, (Text, Media))]
    return items + ([{"type": "message", "role": "user", "content": content}] if content else [])


def _responses_part_out(part: Any) -> Dict[str, Any]:
    if isinstance(part, Text):
        return {"type": "input_text", "text": part.text}
    if part.kind == "image":
        return {"type": "input_image", "image_url": data_url(part), "detail": "auto"}
    if part.url:
        return {"type": "input_file", "file_url": part.url}
    return {"type": "input_file", "file_data": data_url(part),
            "filename": part.name or "file." + part.mime.split("/")[-1]}


def _responses_tools_out(chat: Chat, out: Dict[str, Any]) -> None:
    tools: List[Dict[str, Any]] = []
    for tool in chat.tools:
        if tool.server:
            if tool.server == "web_search":
                tools.append({"type": "web_search"})
            else:
                server_tool_left_out(tool, "responses")
        elif tool.custom:
            tools.append({"type": "custom", "name": tool.name, "description": tool.description})
        else:
            schema = dict(tool.schema or {"type": "object"})
            if schema.get("type") == "object" and "properties" not in schema:
                schema["properties"] = {}
            tools.append({"type": "function", "name": tool.name, "description": tool.description,
                          "parameters": schema, "strict": False})
    if not tools:
        return
    out["tools"] = tools
    if chat.tool_choice == "tool":
        out["tool_choice"] = {"type": "function", "name": chat.tool_name}
    elif chat.tool_choice:
        out["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}[chat.tool_choice]
    if chat.parallel is not None:
        out["parallel_tool_calls"] = chat.parallel


def read_responses_response(body: Dict[str, Any]) -> Answer:
    """A Responses answer (from an upstream that answered a stream request whole)."""
    if not isinstance(body.get("output"), list):
        message, _ = upstream_message(dumps(body))
        raise UpstreamError(f"answered without output: {message}")
    parts: List[Any] = []
    for item in body["output"]:
        kind = item.get("type") if isinstance(item, dict) else None
        if kind == "message":
            parts += [p for p in _responses_parts(item.get("content") or [], "output")
                      if isinstance(p, Text)]
        elif kind in ("function_call", "custom_tool_call", "reasoning"):
            parts += [p for turn in _responses_item(item, "output", {}, Chat()) for p in turn.parts]
    usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
    details = usage.get("input_tokens_details") or {}
    reasoning = (usage.get("output_tokens_details") or {}).get("reasoning_tokens")
    incomplete = (body.get("incomplete_details") or {}).get("reason")
    stop = "tool" if any(isinstance(p, ToolCall) for p in parts) else \
        {"max_output_tokens": "length", "content_filter": "refusal"}.get(incomplete, "end")
    return Answer(str(body.get("id") or short_hash(json_text(body))), parts, stop,
                  Usage(count(usage.get("input_tokens")), count(details.get("cached_tokens")), 0,
                        count(usage.get("output_tokens")), count(reasoning),
                        count(usage.get("total_tokens"))))


def write_responses_usage(usage: Optional[Usage]) -> Optional[Dict[str, Any]]:
    if usage is None:
        return None
    return {"input_tokens": usage.input, "input_tokens_details": {"cached_tokens": usage.cached},
            "output_tokens": usage.output,
            "output_tokens_details": {"reasoning_tokens": usage.reasoning},
            "total_tokens": usage.sum()}


def responses_object(resp_id: str, model: str, ask: Optional[Chat], status: str,
                     output: List[Dict[str, Any]], usage: Optional[Usage], created: int,
                     **extra: Any) -> Dict[str, Any]:
    """The response object: what was asked for echoed, as OpenAI does."""
    echo = ask.extra.get("echo", {}) if ask is not None else {}
    out = {"id": resp_id, "object": "response", "created_at": created, "status": status,
           "background": False, "error": None, "incomplete_details": None,
           "instructions": echo.get("instructions"), "max_output_tokens": echo.get("max_output_tokens"),
           "model": model, "output": output,
           "parallel_tool_calls": echo.get("parallel_tool_calls", True),
           "previous_response_id": None,
           "reasoning": echo.get("reasoning") or {"effort": None, "summary": None},
           "store": echo.get("store", False), "temperature": echo.get("temperature", 1.0),
           "text": echo.get("text") or {"format": {"type": "text"}},
           "tool_choice": echo.get("tool_choice", "auto"), "tools": echo.get("tools", []),
           "top_p": echo.get("top_p", 1.0), "truncation": "disabled",
           "usage": write_responses_usage(usage), "user": None,
           "metadata": echo.get("metadata") or {}}
    out.update(extra)
    return out


def _responses_call_item(call_id: str, name: str, arguments: Any, ask: Optional[Chat],
                         status: str = "completed") -> Dict[str, Any]:
    """A tool call as its output item: a freeform tool's call as custom_tool_call with its
    raw input unwrapped, a namespaced one split back into name and namespace."""
    custom = ask.extra.get("custom", set()) if ask is not None else set()
    namespaces = ask.extra.get("namespaces", {}) if ask is not None else {}
    if name == TOOL_SEARCH and ask is not None and any(t.name == TOOL_SEARCH for t in ask.tools):
        return {"id": f"tsc_{call_id}", "type": "tool_search_call", "status": status,
                "call_id": call_id, "execution": "client",
                "arguments": arguments if isinstance(arguments, dict) else tool_args(arguments)}
    if name in custom:
        args = arguments if isinstance(arguments, dict) else tool_args(arguments)
        raw = arguments if isinstance(arguments, str) and not args else args.get("input", "")
        item: Dict[str, Any] = {"id": f"ctc_{call_id}", "type": "custom_tool_call",
                                "status": status, "call_id": call_id, "name": name,
                                "input": raw if isinstance(raw, str) else json_text(raw)}
    else:
        item = {"id": f"fc_{call_id}", "type": "function_call", "status": status,
                "call_id": call_id, "name": name,
                "arguments": arguments if isinstance(arguments, str) else json_text(arguments)}
    if name in namespaces:
        item["namespace"], item["name"] = namespaces[name]
    return item


def _responses_reasoning_item(item_id: str, text: str, signature: str, origin: str,
                              redacted: bool) -> Dict[str, Any]:
    item: Dict[str, Any] = {"id": item_id, "type": "reasoning",
                            "summary": [{"type": "summary_text", "text": text}] if text else []}
    if signature:
        item["encrypted_content"] = carry(signature, origin, "responses", redacted)
    return item


def _responses_message_item(item_id: str, text: str, status: str = "completed") -> Dict[str, Any]:
    return {"id": item_id, "type": "message", "status": status, "role": "assistant",
            "content": [{"type": "output_text", "annotations": [], "logprobs": [], "text": text}]}


def write_responses_response(answer: Answer, model: str, ask: Optional[Chat] = None) -> Dict[str, Any]:
    resp_id = _prefixed(answer.id, "resp_")
    output: List[Dict[str, Any]] = []
    for n, part in enumerate(answer.parts):
        if isinstance(part, Reasoning):
            output.append(_responses_reasoning_item(f"rs_{resp_id[5:]}_{n}", part.text,
                                                    part.signature, part.origin, part.redacted))
        elif isinstance(part, Text):
            if output and output[-1]["type"] == "message":
                output[-1]["content"][0]["text"] += part.text
            else:
                output.append(_responses_message_item(f"msg_{resp_id[5:]}_{n}", part.text))
        elif isinstance(part, ToolCall):
            if part.signature:             # (a signed call: as the stream writer does)
                output.append(_responses_reasoning_item(f"rs_{resp_id[5:]}_{n}s", "", part.signature,
                                                        part.origin, False))
            output.append(_responses_call_item(part.id, part.name, part.args if part.custom
                                               else call_arguments(part), ask))
    reason = RESPONSES_INCOMPLETE.get(answer.stop)
    return responses_object(resp_id, model, ask, "incomplete" if reason else "completed", output,
                            answer.usage, int(time.time()),
                            incomplete_details={"reason": reason} if reason else None)


RESPONSES_FAILURES = {"rate_limit_exceeded": 429, "context_length_exceeded": 400}   # code -> status


def responses_error_code(status: int, message: str) -> str:
    """The code Codex acts on: rate limits retried with their delay, a context overflow
    not retried (it compacts), everything else retried."""
    if status == 429:
        return "rate_limit_exceeded"
    return "context_length_exceeded" if _CONTEXT_OVERFLOW.search(message) else "server_error"


class ResponsesStreamWriter(StreamWriter):
    """The writer's calls in, Responses events out, in the grammar the SDK's stream helper
    checks: response.created first; each item added, its deltas, its done, with dense
    output_index and content_index; a terminal response.completed (or .incomplete) with
    the full output and usage; a failure as error then response.failed. Every event
    carries its type and sequence_number; the response is nested under "response"."""

    def __init__(self, model: str, input_estimate: int = 0, ask: Optional[Chat] = None):
        super().__init__(model, input_estimate, ask)
        self.ask, self.seq, self.created, self.id = ask, 0, int(time.time()), ""
        self.output: List[Optional[Dict[str, Any]]] = []     # finished items by output_index
        self.message: Optional[Dict[str, Any]] = None        # the open message item
        self.thought: Optional[Dict[str, Any]] = None        # the open reasoning item
        self.calls: Dict[Any, Dict[str, Any]] = {}           # open tool items by key

    def _event(self, kind: str, **fields: Any) -> Tuple[str, str]:
        self.seq += 1
        return kind, json_text({"type": kind, "sequence_number": self.seq - 1, **fields})

    def _response(self, status: str, **extra: Any) -> Dict[str, Any]:
        return responses_object(self.id, self.model, self.ask, status,
                                [i for i in self.output if i is not None], self.usage,
                                self.created, **extra)

    def start(self, resp_id: str, usage: Optional[Usage]) -> List[Tuple[str, str]]:
        if self.started:
            return []
        self.started, self.id = True, _prefixed(resp_id, "resp_")
        response = self._response("in_progress")
        return [self._event("response.created", response=response),
                self._event("response.in_progress", response=response)]

    def _add(self, item: Dict[str, Any]) -> Tuple[int, List[Tuple[str, str]]]:
        index = len(self.output)
        self.output.append(None)
        return index, [self._event("response.output_item.added", output_index=index, item=item)]

    def text(self, text: str) -> List[Tuple[str, str]]:
        out = self._begin()
        if self.message is None:
            out += self._close_thought("completed")
            item_id = f"msg_{self.id[5:]}_{len(self.output)}"
            index, added = self._add({"id": item_id, "type": "message", "status": "in_progress",
                                      "role": "assistant", "content": []})
            self.message = {"index": index, "id": item_id, "text": []}
            out += added + [self._event("response.content_part.added", item_id=item_id,
                                        output_index=index, content_index=0, part={
                                            "type": "output_text", "annotations": [],
                                            "logprobs": [], "text": ""})]
        self.message["text"].append(text)
        return out + [self._event("response.output_text.delta", item_id=self.message["id"],
                                  output_index=self.message["index"], content_index=0,
                                  delta=text, logprobs=[])]

    def _close_message(self, status: str) -> List[Tuple[str, str]]:
        if self.message is None:
            return []
        m, self.message = self.message, None
        text = "".join(m["text"])
        part = {"type": "output_text", "annotations": [], "logprobs": [], "text": text}
        item = _responses_message_item(m["id"], text, status)
        self.output[m["index"]] = item
        common = {"item_id": m["id"], "output_index": m["index"], "content_index": 0}
        return [self._event("response.output_text.done", text=text, logprobs=[], **common),
                self._event("response.content_part.done", part=part, **common),
                self._event("response.output_item.done", output_index=m["index"], item=item)]

    def _open_thought(self) -> List[Tuple[str, str]]:
        if self.thought is not None:
            return []
        out = self._begin() + self._close_message("completed")
        item_id = f"rs_{self.id[5:]}_{len(self.output)}"
        index, added = self._add({"id": item_id, "type": "reasoning", "summary": []})
        self.thought = {"index": index, "id": item_id, "text": [], "signature": ("", "", False)}
        return out + added

    def reasoning(self, text: str) -> List[Tuple[str, str]]:
        if not text:
            return []
        signed = self.thought is not None and self.thought["signature"][0]
        out = (self._close_thought("completed") if signed else []) + self._open_thought()
        t = self.thought                   # (a signed thought is whole: more is a new one)
        if not t["text"]:
            out.append(self._event("response.reasoning_summary_part.added", item_id=t["id"],
                                   output_index=t["index"], summary_index=0,
                                   part={"type": "summary_text", "text": ""}))
        t["text"].append(text)
        return out + [self._event("response.reasoning_summary_text.delta", item_id=t["id"],
                                  output_index=t["index"], summary_index=0, delta=text)]

    def signature(self, value: str, origin: str, redacted: bool = False) -> List[Tuple[str, str]]:
        out = self._open_thought()
        self.thought["signature"] = (value, origin, redacted)
        return out + (self._close_thought("completed") if redacted else [])

    def _close_thought(self, status: str) -> List[Tuple[str, str]]:
        if self.thought is None:
            return []
        t, self.thought = self.thought, None
        text = "".join(t["text"])
        out = []
        if t["text"]:
            common = {"item_id": t["id"], "output_index": t["index"], "summary_index": 0}
            out += [self._event("response.reasoning_summary_text.done", text=text, **common),
                    self._event("response.reasoning_summary_part.done",
                                part={"type": "summary_text", "text": text}, **common)]
        item = _responses_reasoning_item(t["id"], text, *t["signature"])
        self.output[t["index"]] = item
        return out + [self._event("response.output_item.done", output_index=t["index"], item=item)]

    def tool_start(self, key: Any, call_id: str, name: str) -> List[Tuple[str, str]]:
        out = self._begin() + self._close_message("completed") + self._close_thought("completed")
        name = self.names.get(name, name)
        item = _responses_call_item(call_id, name, "", self.ask, "in_progress")
        index, added = self._add(item)
        self.calls[key] = {"index": index, "item": item, "name": name, "args": []}
        return out + added

    def tool_args(self, key: Any, fragment: str) -> List[Tuple[str, str]]:
        call = self.calls.get(key)
        if call is None or not fragment:
            return []
        call["args"].append(fragment)
        if call["item"]["type"] != "function_call":
            return []                      # raw input (custom) or arguments come whole at the end
        return [self._event("response.function_call_arguments.delta", item_id=call["item"]["id"],
                            output_index=call["index"], delta=fragment)]

    def tool_end(self, key: Any, status: str = "completed") -> List[Tuple[str, str]]:
        call = self.calls.pop(key, None)
        if call is None:
            return []
        arguments = "".join(call["args"]) or "{}"
        item = _responses_call_item(call["item"]["call_id"], call["name"], arguments, self.ask, status)
        self.output[call["index"]] = item
        common = {"item_id": item["id"], "output_index": call["index"]}
        if item["type"] == "custom_tool_call":
            out = [self._event("response.custom_tool_call_input.delta", delta=item["input"], **common),
                   self._event("response.custom_tool_call_input.done", input=item["input"], **common)]
        elif item["type"] == "tool_search_call":
            out = []                       # no events of its own: the done item carries it
        else:
            out = [self._event("response.function_call_arguments.done", arguments=arguments,
                               name=item["name"], **common)]
        return out + [self._event("response.output_item.done", output_index=call["index"], item=item)]

    def tool_call(self, call_id: str, name: str, arguments: str, signature: str = "",
                  origin: str = "") -> List[Tuple[str, str]]:
        # (a call's own signature: a reasoning item before it)
        out = self._close_thought("completed") + self.signature(signature, origin) if signature else []
        return out + super().tool_call(call_id, name, arguments)

    def _stop(self, reason: str) -> List[Tuple[str, str]]:
        status = "incomplete" if reason in RESPONSES_INCOMPLETE else "completed"
        out = self._begin() + self._close_thought(status) + self._close_message(status)
        for key in list(self.calls):
            out += self.tool_end(key, status)
        return out

    def _end(self, usage: Optional[Usage]) -> List[Tuple[str, str]]:
        self.usage = self.usage or Usage()
        reason = RESPONSES_INCOMPLETE.get(self.stopped)
        if reason:
            return [self._event("response.incomplete", response=self._response(
                "incomplete", incomplete_details={"reason": reason}))]
        return [self._event("response.completed", response=self._response("completed"))]

    def _fail(self, status: int, message: str) -> List[Tuple[str, str]]:
        code = responses_error_code(status, message)
        return self._begin() + [self._event("error", code=code, message=message, param=None),
                                self._event("response.failed", response=self._response(
                                    "failed", error={"code": code, "message": message}))]


class ResponsesStreamReader(StreamReader):
    """Responses events in (from a server that speaks it), the writer's events out.
    Items are keyed by output_index; text, reasoning summaries and function arguments
    stream as deltas, a custom tool's raw input and a reasoning item's encrypted content
    come with the item's done event. The end is response.completed (or .incomplete);
    response.failed and error fail the stream."""

    fmt = "responses"

    def __init__(self, writer: StreamWriter) -> None:
        super().__init__(writer)
        self.items: Dict[Any, Dict[str, Any]] = {}     # open items by output_index
        self.calls = 0

    def _feed(self, obj: Dict[str, Any], event: str, data: str) -> List[Tuple[str, str]]:
        kind = str(obj.get("type") or event)
        response = obj.get("response") if isinstance(obj.get("response"), dict) else {}
        if kind in ("response.created", "response.in_progress"):
            return self.w.start(str(response.get("id") or short_hash(data)), None)
        if kind in ("response.completed", "response.incomplete"):
            return self._end(response)
        if kind in ("response.failed", "error"):
            error = response.get("error") if kind == "response.failed" else obj
            error = error if isinstance(error, dict) else {}
            code, message = error.get("code"), error.get("message") or (
                "upstream response failed" if kind == "response.failed" else data)
            return self.w.fail(RESPONSES_FAILURES.get(code if isinstance(code, str) else "", 502),
                               f"{code}: {message}" if isinstance(code, str) else str(message))
        out = [] if self.w.started else self.w.start(short_hash(data), None)
        handler = self.HANDLERS.get(kind)
        return out + handler(self, obj) if handler else out

    def _added(self, obj: Dict[str, Any]) -> List[Tuple[str, str]]:
        item = obj.get("item") if isinstance(obj.get("item"), dict) else {}
        index = obj.get("output_index")
        self.items[index] = {"type": item.get("type"), "text": False}
        if item.get("type") in ("function_call", "custom_tool_call"):
            self.calls += 1
            name = str(item.get("name") or "")
            if item.get("namespace"):
                name = f"{item['namespace']}{NAMESPACE_JOIN}{name}"
            return self.w.tool_start(index, safe_id(item.get("call_id"), f"call_{index}"), name)
        return []

    def _delta(self, obj: Dict[str, Any], write: Callable[[str], List[Tuple[str, str]]]
               ) -> List[Tuple[str, str]]:
        delta = obj.get("delta")
        if not isinstance(delta, str) or not delta:
            return []
        self.items.setdefault(obj.get("output_index"), {})["text"] = True
        return write(delta)

    def _text(self, obj: Dict[str, Any]) -> List[Tuple[str, str]]:
        return self._delta(obj, self.w.text)

    def _reasoning(self, obj: Dict[str, Any]) -> List[Tuple[str, str]]:
        item = self.items.setdefault(obj.get("output_index"), {})
        part, delta = obj.get("summary_index", obj.get("content_index")), obj.get("delta")
        if not isinstance(delta, str) or not delta:
            return []
        if "part" in item and part != item["part"]:      # a new part: a new line, as the
            obj = dict(obj, delta="\n" + delta)           # whole item's parts are joined
        item["part"] = part
        return self._delta(obj, self.w.reasoning)

    def _arguments(self, obj: Dict[str, Any]) -> List[Tuple[str, str]]:
        item = self.items.get(obj.get("output_index"))
        delta = obj.get("delta")
        if item is None or not isinstance(delta, str) or not delta:
            return []
        item["text"] = True
        return self.w.tool_args(obj.get("output_index"), delta)

    def _done(self, obj: Dict[str, Any]) -> List[Tuple[str, str]]:
        item = obj.get("item") if isinstance(obj.get("item"), dict) else {}
        index = obj.get("output_index")
        seen = self.items.pop(index, None) or {"text": False}
        kind, out = item.get("type"), []
        if kind == "reasoning":
            if not seen.get("text"):
                texts = [p.get("text") for p in item.get("summary") or [] if isinstance(p, dict)]
                out += self.w.reasoning("\n".join(t for t in texts if isinstance(t, str)))
            if item.get("encrypted_content"):
                out += self.w.signature(str(item["encrypted_content"]), "responses")
        elif kind in ("function_call", "custom_tool_call"):
            if not seen.get("text"):
                whole = item.get("input") if kind == "custom_tool_call" else item.get("arguments")
                out += self.w.tool_args(index, whole if isinstance(whole, str) else "")
            out += self.w.tool_end(index)
        elif kind == "message" and not seen.get("text"):
            out += self.w.text(result_text(_responses_parts(item.get("content") or [], "output")))
        return out

    def _end(self, response: Dict[str, Any]) -> List[Tuple[str, str]]:
        body = dict(response, output=response.get("output") or [])
        answer = read_responses_response(body)
        stop = answer.stop if answer.stop != "end" or not self.calls else "tool"
        return self.w.stop(stop) + self.w.end(answer.usage)

    HANDLERS = {"response.output_item.added": _added, "response.output_text.delta": _text,
                "response.refusal.delta": _text,
                "response.reasoning_summary_text.delta": _reasoning,
                "response.reasoning_text.delta": _reasoning,
                "response.function_call_arguments.delta": _arguments,
                "response.custom_tool_call_input.delta": _arguments,
                "response.output_item.done": _done}


# -- 7.6 Composition: TRANSLATORS, whole answers replayed as streams, StreamPipe ----

@dataclasses.dataclass(frozen=True)
class Codec:
    """One format's readers and writers."""
    read_request: Callable[[Dict[str, Any]], Chat]
    write_request: Callable[[Chat], Dict[str, Any]]
    read_response: Callable[[Dict[str, Any]], Answer]
    write_response: Callable[[Answer, str, Optional[Chat]], Dict[str, Any]]
    stream_reader: Callable[[Any], Any]              # writer -> reader of this format's stream
    stream_writer: Callable[..., Any]                # (model, input_estimate, ask) -> writer


CODECS: Dict[str, Codec] = {
    "openai": Codec(read_openai_request, write_openai_request, read_openai_response,
                    write_openai_response, OpenAIStreamReader, OpenAIStreamWriter),
    "anthropic": Codec(read_anthropic_request, write_anthropic_request, read_anthropic_response,
                       write_anthropic_response, AnthropicStreamReader, AnthropicStreamWriter),
    "gemini": Codec(read_gemini_request, write_gemini_request, read_gemini_response,
                    write_gemini_response, GeminiStreamReader, GeminiStreamWriter),
    "responses": Codec(read_responses_request, write_responses_request, read_responses_response,
                       write_responses_response, ResponsesStreamReader, ResponsesStreamWriter),
}


@dataclasses.dataclass(frozen=True)
class Translator:
    """How a client format reaches an upstream format: the client's reader composed with
    the upstream's writer, and back. request(body) -> upstream body; response(body,
    model) -> client body; stream(model, input_estimate) -> a reader with feed(event,
    data) and close(), both returning [(event, data)] in the client's format."""
    client: str
    upstream: str

    @functools.cached_property              # (asked several times per request)
    def passthrough(self) -> bool:
        return self.client == self.upstream

    def read(self, body: Dict[str, Any]) -> Chat:
        return CODECS[self.client].read_request(body)

    def write(self, chat: Chat) -> Dict[str, Any]:
        return CODECS[self.upstream].write_request(upstream_tool_names(chat, self.upstream))

    def request(self, body: Dict[str, Any]) -> Dict[str, Any]:
        return self.write(self.read(body))

    def response(self, body: Dict[str, Any], model: str, ask: Optional[Chat] = None) -> Dict[str, Any]:
        answer, names = CODECS[self.upstream].read_response(body), names_back(ask)
        for part in answer.parts if names else ():
            if isinstance(part, ToolCall):
                part.name = names.get(part.name, part.name)
        return CODECS[self.client].write_response(answer, model, ask)

    def writer(self, model: str, input_estimate: int = 0, ask: Optional[Chat] = None) -> Any:
        return CODECS[self.client].stream_writer(model, input_estimate, ask)

    def stream(self, model: str, input_estimate: int = 0, ask: Optional[Chat] = None) -> Any:
        return CODECS[self.upstream].stream_reader(self.writer(model, input_estimate, ask))

    def replay(self, body: Dict[str, Any], model: str, input_estimate: int = 0,
               ask: Optional[Chat] = None) -> List[Tuple[str, str]]:
        """A whole answer as the client's stream: for an upstream that ignored stream:true."""
        return replay(CODECS[self.upstream].read_response(body),
                      self.writer(model, input_estimate, ask))


TRANSLATORS: Dict[Tuple[str, str], Translator] = {
    (client, upstream): Translator(client, upstream) for client in CODECS for upstream in CODECS}


def replay(answer: Answer, writer: Any) -> List[Tuple[str, str]]:
    """Feed a whole answer to a stream writer, part by part."""
    out = writer.start(answer.id, answer.usage)
    for part in answer.parts:
        if isinstance(part, Reasoning):
            out += writer.reasoning(part.text) if part.text else []
            out += writer.signature(part.signature, part.origin, part.redacted) \
                if part.signature else []
        elif isinstance(part, Text):
            out += writer.text(part.text)
        elif isinstance(part, ToolCall):
            out += writer.tool_call(part.id, part.name, json_text(call_arguments(part)),
                                    part.signature, part.origin)
    return out + writer.stop(answer.stop) + writer.end(answer.usage)


MEDIA_TOKENS = 1000         # an image or document inline: the APIs count it by its size in
#   pixels or pages, not bytes (Gemini 258 a 768-px tile, Anthropic about 1,600 at most for an
#   image); its base64 counted as text would be hundreds of thousands of tokens, and a
#   client's context meter would think the window full.
_MEDIA_DATA = (b'"data":"', b";base64,")     # inline data: Gemini, Anthropic, data: URLs


def estimate_tokens(body: Dict[str, Any]) -> int:
    """A heuristic, not a tokenizer: UTF-8 bytes of the JSON of the prompt parts
    (system, messages, tools, Gemini contents, Responses input) divided by 4, rounded up,
    each inline image or document as MEDIA_TOKENS. English text and JSON average close to
    4 bytes a token for current models."""
    parts = {k: body[k] for k in ("system", "messages", "tools", "contents", "systemInstruction",
                                  "system_instruction", "prompt", "input", "instructions") if k in body}
    if not parts:
        return 0
    text = dumps(parts)
    size, media = len(text), 0
    for marker in _MEDIA_DATA:              # (found by C-speed scans: bodies can be MBs)
        at = text.find(marker)
        while at >= 0:
            start = at + len(marker)
            end = text.find(b'"', start)
            if end - start > 4 * MEDIA_TOKENS:
                size, media = size - (end - start), media + 1
            at = text.find(marker, max(end, start))
    return (size + 3) // 4 + media * MEDIA_TOKENS


def local_count(fmt: str, body: Dict[str, Any]) -> Dict[str, Any]:
    """A token count answered here for an upstream that cannot count: an estimate."""
    if fmt == "gemini":                    # (countTokens may wrap a whole request)
        inner = body.get("generateContentRequest") or body.get("generate_content_request")
        return {"totalTokens": estimate_tokens(inner if isinstance(inner, dict) else body)}
    if fmt == "responses":
        return {"object": "response.input_tokens", "input_tokens": estimate_tokens(body)}
    return {"input_tokens": estimate_tokens(body)}


def foreign_reasoning_dropped(fmt: str, body: Dict[str, Any]) -> bool:
    """For a same-format relay: opaque values another format made (tagged pp1:) and
    thinking without a signature (made from another provider's reasoning) cannot be
    verified by this upstream, so they go; a Gemini call keeps Google's stand-in in
    their place (Gemini 3 refuses a call without one). `body` is a copy of the client's
    top level: what changes below it is copied first, since a failover to another format
    reads the client's body again. True if the body changed."""
    if fmt == "anthropic":                 # (a body of the wrong shape goes on as it is: the
        messages = _list_or_empty(body.get("messages"))     # upstream says what is wrong)
        kept = [dict(m, content=[b for b in m["content"] if not _foreign_thinking(b)])
                if isinstance(m, dict) and isinstance(m.get("content"), list) and
                any(_foreign_thinking(b) for b in m["content"]) else m for m in messages]
        changed = any(a is not b for a, b in zip(kept, messages))
    elif fmt == "responses" and isinstance(body.get("input"), list):
        kept = [i for i in body["input"] if not _foreign_reasoning_item(i, body.get("store"))]
        changed = len(kept) != len(body["input"])
        body["input"] = kept
        return changed
    elif fmt == "gemini":
        contents = _list_or_empty(body.get("contents"))
        kept = [_gemini_own_parts(c) for c in contents]
        changed = any(a is not b for a, b in zip(kept, contents))
    else:
        return False
    if changed:
        body["messages" if fmt == "anthropic" else "contents"] = kept
    return changed


def _gemini_own_parts(content: Any) -> Any:
    """A Gemini content without signatures another format made (a copy, if it has any)."""
    parts = content.get("parts") if isinstance(content, dict) else None
    own, changed = [], False
    for part in parts if isinstance(parts, list) else ():
        foreign = [k for k in ("thoughtSignature", "thought_signature")     # (both spellings)
                   if isinstance(part, dict) and carried(part.get(k), "gemini")]
        if foreign:
            part, changed = {k: v for k, v in part.items() if k not in foreign}, True
            if "functionCall" in part or "function_call" in part:
                part["thoughtSignature"] = GEMINI_DUMMY_SIGNATURE
        own.append(part)
    return dict(content, parts=own) if changed else content


def _foreign_reasoning_item(item: Any, store: Any) -> bool:
    """A Responses reasoning item another format made: its encrypted_content tagged pp1:,
    or none at all while store is false (OpenAI then has nothing to look its id up in:
    the item came from reasoning without a signature, such as DeepSeek's)."""
    if not isinstance(item, dict) or item.get("type") != "reasoning":
        return False
    value = item.get("encrypted_content")
    return carried(value, "responses") if value else store is False


def _foreign_thinking(block: Any) -> bool:
    if not isinstance(block, dict) or block.get("type") not in ("thinking", "redacted_thinking"):
        return False
    value = block.get("signature" if block["type"] == "thinking" else "data")
    return not value or carried(value, "anthropic")


# The shape of event nearly every upstream sends: "event:" then one "data:" line, LF
# only. split() on it gives [between, event, data, between, ...]: where nothing is
# between, the text was such events alone.
_SIMPLE_EVENTS = re.compile(r"(?:event: ?([^\n:]*)\n)?data: ?([^\n]*)\n\n")


class SSEDecoder:
    """Upstream SSE bytes -> (event type, data) pairs."""

    def __init__(self) -> None:
        self._splitter = SSESplitter()

    def feed(self, data: bytes) -> List[Tuple[str, str]]:
        splitter = self._splitter
        buf = splitter.take(data)
        if buf is None:
            return []
        if b"\r" not in buf:              # the common case: no loop over events here
            end = buf.rfind(b"\n\n") + 2
            text = buf[:end].decode("utf-8", "replace") if end > 1 else ""
            parts = _SIMPLE_EVENTS.split(text)
            if not any(parts[::3]):
                splitter.rest = buf[end:] if end > 1 else buf
                return [(event or "message", value)
                        for event, value in zip(parts[1::3], parts[2::3])]
        splitter.rest = b""
        return [e for e in map(parse_sse_event, splitter.feed(buf)) if e]

    def close(self) -> List[Tuple[str, str]]:
        return [e for e in map(parse_sse_event, self._splitter.close()) if e]


class EventRelay:
    """Decoded events of the client's own format relayed as they are (Bedrock's frames to
    an Anthropic client), ending with an error event if they stop before the end."""

    failed = False                         # ended by fail()
    provider = ""                          # named in the errors it writes

    def __init__(self, fmt: str, model: str = "") -> None:
        self.fmt = FORMATS[fmt]
        self.model = model if fmt == "anthropic" else ""   # for message_start (renamed_opening)
        self.done = self.started = False
        self.skip: List[str] = []
        self.recent: List[bytes] = []
        self.tokens = NO_TOKENS

    @property
    def usage(self) -> Optional[Usage]:
        tokens = self.tokens
        return None if tokens == NO_TOKENS else Usage(
            tokens[0] or 0, tokens[2] or 0, output=tokens[1] or 0, reasoning=tokens[3] or 0)

    def feed(self, event: str, data: str) -> List[Tuple[str, str]]:
        if self.done or not event:
            return []
        if '"usage' in data:               # (each event says some counts: they add up)
            self.tokens = merged_tokens(self.tokens, usage_counts(event_object(data)))
        if event in self.skip:             # the commit sent its own opening events
            self.skip.remove(event)
            return []
        self.started = True
        if self.model:
            data, self.model = renamed_opening(data, self.model) if event == "message_start" else data, ""
        self.recent = (self.recent + [self.fmt.encode(event, data)])[-3:]
        self.done = self.fmt.finished(self.recent)
        return [(event, data)]

    def close(self) -> List[Tuple[str, str]]:
        return [] if self.done else self.fail(502, STREAM_CUT.format(end=self.fmt.end_marker))

    def fail(self, status: int, message: str) -> List[Tuple[str, str]]:
        self.done = self.failed = True
        return [("error", json_text(self.fmt.error(status, named(self.provider, message), "")))]


def event_error(data: str) -> Tuple[int, str]:
    """(status, message) of an upstream's error event: {"error": {...}} (Anthropic, OpenAI,
    Gemini) or Responses' {"type": "error", "message"}; the data itself otherwise."""
    obj = event_object(data)
    if obj and isinstance(obj.get("error"), dict):
        return stream_error_of(obj)
    return 502, printable(str(obj["message"]) if obj and obj.get("message") else data, 200)


def renamed_opening(data: str, model: str) -> str:
    """An Anthropic message_start with the model name the client asked for, as a relayed
    whole answer has it. Claude Code strips the thinking blocks of every earlier answer
    whose model is not the one it now asks for (signatures are bound to a model), and
    Anthropic then refuses the tool turn those blocks had to open: with an alias (an
    Azure deployment, a Bedrock id) every tool loop with thinking failed."""
    obj = event_object(data)
    message = obj.get("message") if obj and obj.get("type") == "message_start" else None
    if not isinstance(message, dict) or message.get("model") in (None, model):
        return data
    return json_text(dict(obj, message=dict(message, model=model)))


def check_opening(event: str, data: str) -> None:
    """A stream whose first event is an error (Anthropic's overloaded_error inside a 200)
    failed before anything reached the client: an UpstreamError, so that the client gets
    an HTTP error, or the next credential its turn."""
    if event == "error" or data.lstrip().startswith('{"error"'):
        status, message = event_error(data)
        error = UpstreamError(message, status, failover=status in FAILOVER_STATUSES)
        error.unanswered = True
        raise error


class StreamPipe:
    """Upstream stream bytes in, client stream bytes out: a decoder (SSE, or Bedrock's
    event stream), a reader of the upstream's events feeding a writer of the client's,
    and the client format's framing. The writer owns the end of the stream: fail()
    ends it with the client format's own error."""

    def __init__(self, decoder: Any, reader: Any, client: str) -> None:
        self.decoder, self.reader = decoder, reader
        self.writer = getattr(reader, "w", reader)
        self.fmt = FORMATS[client]
        self.encode = self.fmt.encode
        self.held: List[Tuple[str, str]] = []   # the first read's events after the first

    def first(self, data: bytes) -> bytes:
        """The client's first event, made of the upstream's first events alone: the rest
        of a read that brought a whole burst is translated after that went out (relay
        feeds b"" for it), not before. An error event before anything else is an HTTP
        error instead."""
        events = self.decoder.feed(data)
        if events:
            check_opening(*events[0])
        for i in range(len(events)):
            out = self._out(events[i:i + 1])
            if out:
                self.held = events[i + 1:]
                return out
        return b""

    def feed(self, data: bytes) -> bytes:
        events, self.held = self.held + self.decoder.feed(data), []
        return self._out(events)

    def close(self) -> bytes:
        return self._out(self.decoder.close(), closing=True)

    def fail(self, status: int, message: str) -> bytes:
        return self.fmt.events(self.writer.fail(status, message))

    @property
    def usage(self) -> Optional[Usage]:
        """What the answer used so far; events still held count too (read at the end:
        a client that left before they went out)."""
        if self.held:
            with contextlib.suppress(Exception):
                self.feed(b"")
        return self.writer.usage

    @property
    def failed(self) -> bool:
        return self.writer.failed

    @property
    def complete(self) -> bool:
        """The client's stream has had its last event."""
        return self.writer.done and not self.writer.failed

    def ended(self, out: bytes) -> bool:
        return self.complete               # (the writer knows: it wrote the last event)

    def committed(self) -> None:
        """The client's stream was opened before the upstream answered: a relayed
        upstream's own opening event must not come twice."""
        if isinstance(self.reader, EventRelay):
            self.reader.skip = list(self.reader.fmt.opening)

    def _out(self, events: List[Tuple[str, str]], closing: bool = False) -> bytes:
        out: List[Tuple[str, str]] = []
        for event, data in events:
            out += self.reader.feed(event, data)
        if closing:
            out += self.reader.close()
        encode = self.encode
        return b"".join([encode(e, d) for e, d in out])


# =============================================================================
# 8. Routing
# Strategy: a model name to the credentials that serve it. Router is built from
# one Config and never changes (a reload builds a new one): mappings first (an
# exact name wins over a wildcard), then aliases, prefixes and the keys that
# serve any claude-*/gemini-* name, minus excludedModels. Balancer holds the only
# mutable state, cooldowns and round-robin turns, and orders the targets.
# =============================================================================

@dataclasses.dataclass(frozen=True)
class Target:
    cred: Credential
    model: str                             # the upstream's model name
    max_output_tokens: Optional[int] = None
    context_window: Optional[int] = None


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
        self.by_name: Dict[str, List[Target]] = {}     # an aliased entry's own name
        self.wildcard_creds: List[Credential] = []
        for cred in config.credentials:
            entries = cred.models or tuple(ModelEntry(m, m) for m in BUILTIN_MODELS.get(cred.api, ()))
            for entry in entries:
                if _excluded(cred, entry.name, entry.alias):
                    continue
                target = Target(cred, entry.name, entry.max_output_tokens, entry.context_window)
                self._add(self.table, entry.alias, target)
                if entry.name != entry.alias:
                    self._add(self.by_name, entry.name, target)
                if cred.prefix:
                    self._add(self.table, f"{cred.prefix}/{entry.alias}", target)
            if not cred.models and cred.api in MODEL_PREFIX:
                self.wildcard_creds.append(cred)
        self.exact_maps = {m.source: m for m in config.mappings if "*" not in m.source}
        self.wild_maps = [m for m in config.mappings if "*" in m.source]

    @staticmethod
    def _add(table: Dict[str, List[Target]], name: str, target: Target) -> None:
        targets = table.setdefault(name, [])
        if target not in targets:
            targets.append(target)

    def lookup(self, name: str) -> List[Target]:
        """Every target serving `name`: listed names first (an alias; else an aliased
        entry's own name, the one the provider knows, which a client set up for that
        provider may still send), then keys serving claude-*/gemini-*."""
        found = list(self.table.get(name) or self.by_name.get(name, ()))
        for cred in self.wildcard_creds:
            model = name
            if cred.prefix and model.startswith(cred.prefix + "/"):
                model = model[len(cred.prefix) + 1:]
            if model.startswith(MODEL_PREFIX[cred.api]) and not _excluded(cred, model):
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
        import difflib                     # (only for this error: 0.2 MB less while serving)
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
        self.shared: Optional[Callable[[str, Cooldown], None]] = None   # tells other workers

    def plan(self, route: Route, strategy: str, session: str = ""
             ) -> Tuple[List[Target], List[Tuple[Target, Cooldown]]]:
        """(targets to try in order, targets cooling down with why). Cooldowns divert
        traffic, never block it: when every target is cooling down, the one whose
        cooldown ends first is tried anyway, so the client gets the upstream's own answer
        (and its Retry-After) rather than the proxy's refusal. Under round-robin a
        session key (one conversation) always starts at the same credential, so the
        upstream's prompt cache stays warm."""
        now = self.clock()
        ready, cooling = [], []
        for target in route.targets:
            cool = self.cooldowns.get(target.cred.key)
            if cool and cool.until > now:
                cooling.append((target, cool))
            else:
                ready.append(target)
        if not ready:
            ready = [min(cooling, key=lambda pair: pair[1].until)[0]]
        if strategy == "round-robin" and len(ready) > 1:
            if session:
                start = int(short_hash(session), 16) % len(ready)
            else:
                start = self._turn.get(route.routed, 0)
                self._turn[route.routed] = start + 1
            start %= len(ready)
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
        if self.shared is not None:
            self.shared(cred.key, cool)
        return cool

    def learn(self, key: str, seconds_left: float, status: int, reason: str) -> None:
        """A cooldown another worker learned; kept unless this one ends later already."""
        until = self.clock() + seconds_left
        known = self.cooldowns.get(key)
        if known is None or known.until < until - 0.5:
            self.cooldowns[key] = Cooldown(until, status, reason)


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
# 9. Upstreams
# Strategy: what it takes to talk to each kind of upstream. 9.1 is Amazon
# Bedrock's wire (SigV4 written with hmac and hashlib, the binary event stream
# decoded incrementally with both CRCs checked), pure functions of their inputs.
# 9.2 is the HTTP/1.1 client on the event loop itself: connections kept alive
# and reused through a pool keyed by (scheme, host, port, proxy); outbound
# proxies http:// (CONNECT for https) and socks5:// (handshakes on a worker
# thread); socket errors become UpstreamError with the fix in the message.
# (http.client on worker threads cost ~700 us of CPU and two thread handoffs a
# request, and could not meet the latency and throughput targets.) 9.3 has one
# adapter per dialect (OpenAI-compatible, Anthropic, Azure AI Foundry, Bedrock,
# Gemini): each builds its requests, explains its errors, supplies its stream
# decoder and its `check` probe. Nothing else in the file tests a dialect.
# =============================================================================

# -- 9.1 Amazon Bedrock's wire ---------------------------------------------------------

BEDROCK_ANTHROPIC_VERSION = "bedrock-2023-05-31"
# Betas Bedrock accepts in the body's anthropic_beta; others make it answer 400
# ValidationException. Claude Code's context_management and output_config.effort need
# theirs there too, else Bedrock refuses the field ("Extra inputs are not permitted").
BEDROCK_BETA_PREFIXES = ("interleaved-thinking-", "context-1m-", "computer-use-",
                         "token-efficient-tools-", "fine-grained-tool-streaming-",
                         "context-management-", "effort-", "compact-", "tool-search-tool-")
BEDROCK_BETA_NAMES = {"advanced-tool-use-2025-11-20": "tool-search-tool-2025-10-19"}   # (Bedrock's)
BEDROCK_ERRORS = {   # x-amzn-ErrorType -> (HTTP status for the client, Anthropic error type)
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
    segment, ':' kept raw as the AWS SDKs send it."""
    action = "count-tokens" if op == "count" else (
        "invoke-with-response-stream" if stream else "invoke")
    return f"/model/{urllib.parse.quote(model, safe=':')}/{action}"


def bedrock_body(body: Dict[str, Any], beta_header: str) -> Dict[str, Any]:
    """An Anthropic Messages body as Bedrock's InvokeModel takes it."""
    out = {k: v for k, v in body.items() if k not in ("model", "stream")}
    out["anthropic_version"] = BEDROCK_ANTHROPIC_VERSION
    betas = [BEDROCK_BETA_NAMES.get(b.strip(), b.strip()) for b in beta_header.split(",")]
    betas = [b for b in dict.fromkeys(betas) if b.startswith(BEDROCK_BETA_PREFIXES)]
    if betas:
        out["anthropic_beta"] = betas
    return out


def bedrock_count_body(body: Dict[str, Any], beta_header: str) -> Dict[str, Any]:
    """CountTokens wraps the InvokeModel body, base64-encoded."""
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
        return AwsCredentials(environ["AWS_ACCESS_KEY_ID"].strip(),       # (as the SDKs do:
                              environ["AWS_SECRET_ACCESS_KEY"].strip(),   # an exported value
                              environ.get("AWS_SESSION_TOKEN", "").strip())   # may end in a space)
    return None


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode("utf-8"), hashlib.sha256).digest()


def sigv4_sign(method: str, url: str, headers: Dict[str, str], body: bytes,
               creds: AwsCredentials, region: str, amz_date: str,
               service: str = "bedrock") -> Dict[str, str]:
    """AWS Signature Version 4
    (https://docs.aws.amazon.com/IAM/latest/UserGuide/create-signed-request.html): the headers to add (X-Amz-Date, X-Amz-Security-Token,
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
    """Incremental decoder of application/vnd.amazon.eventstream: feed(bytes) ->
    [(headers, payload)] for each complete message, both CRC32s verified."""

    def __init__(self) -> None:
        self._buf = b""
        self._broken: Optional[UpstreamError] = None

    def feed(self, data: bytes) -> List[Tuple[Dict[str, Any], bytes]]:
        """The complete messages; a corrupt one ends the stream, but only after the good
        messages before it went out (as botocore's decoder does)."""
        if self._broken is not None:
            raise self._broken
        out: List[Tuple[Dict[str, Any], bytes]] = []
        try:
            self._frames(data, out)
        except UpstreamError as exc:
            if not out:
                raise
            self._broken, self._buf = exc, b""
        return out

    def close(self) -> None:
        if self._broken is not None:
            raise self._broken

    def _frames(self, data: bytes, out: List[Tuple[Dict[str, Any], bytes]]) -> None:
        import zlib
        buf = self._buf + data if self._buf else data
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
            data = base64.b64decode(loads_json(payload)["bytes"]).decode("utf-8")
            obj = loads_json(data)
            kind = obj.get("type")
            if "\n" in data or "\r" in data:        # one SSE data line: compact JSON
                data = json_text(obj)
            return kind if isinstance(kind, str) and kind.isprintable() and kind else "message", data
        except (ValueError, KeyError, TypeError, AttributeError):
            return "error", error_body("anthropic", 502, "malformed Bedrock chunk").decode()
    if kind == "event":
        return "", ""                      # other event types carry nothing for the client
    name = headers.get(":exception-type") or headers.get(":error-code") or "InternalServerException"
    try:
        message = loads_json(payload).get("message") or headers.get(":error-message") or name
    except (ValueError, AttributeError):
        message = headers.get(":error-message") or name
    _, err_type = BEDROCK_ERRORS.get(name[:1].upper() + name[1:], (500, "api_error"))
    return "error", error_body("anthropic", 500, f"{name}: {message}", err_type).decode("utf-8")


def bedrock_error(status: int, error_type_header: str, body: bytes) -> Tuple[int, bytes]:
    """A Bedrock HTTP error as (status, Anthropic error body), by its x-amzn-ErrorType."""
    name = (error_type_header or "").split(":")[0]
    try:
        obj = loads_json(body)
    except ValueError:
        obj = {}
    if not name and isinstance(obj, dict):
        name = str(obj.get("__type") or obj.get("code") or "").split("#")[-1]
    message = (obj.get("message") or obj.get("Message")) if isinstance(obj, dict) else None
    message = message or body.decode("utf-8", "replace")[:300] or f"HTTP {status}"
    new_status, err_type = BEDROCK_ERRORS.get(name, (status, ""))
    text = f"{name}: {message}" if name else str(message)
    return new_status, error_body("anthropic", new_status, text, err_type)


# -- 9.2 The HTTP client ---------------------------------------------------------------


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
        self.idle_since = 0.0              # when it went back to the pool
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
        """An idle connection the server has not closed (EOF arrives as at_eof), holding no
        bytes nobody asked for: bytes past the body (a wrong Content-Length), or sent while
        it was idle (a 408 before a close), would be read as the next request's answer."""
        return not self.writer.transport.is_closing() and not self.reader.at_eof() \
            and not self.reader._buffer         # (asyncio has no public peek at it)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._limit = 0.0
        self.writer.transport.abort()


def parse_response_head(head: bytes) -> Tuple[str, int, List[Tuple[str, str]]]:
    """(version, status, lower-case headers) of an upstream response head. A field line
    without a name, folded (leading whitespace) or holding NUL, CR or LF (which could
    forge a header) is left out; the rest of the head is still used.
    status-line = HTTP-version SP status-code SP [ reason-phrase ]   (RFC 9112 4)"""
    text = head.decode("latin-1").strip("\r\n")              # tolerate stray CRLFs
    lines = text.split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit() \
            or not parts[1].isascii():
        raise UpstreamError(f"upstream sent a malformed status line {printable(parts[0], 60)!r}")
    fields = lines[1:]
    if "\x00" in text or not text.count("\r") == text.count("\n") == len(fields):
        fields = [line for line in fields if not _CONTROL_IN_FIELD.search(line)]
    return parts[0], int(parts[1]), [
        (name.strip().lower(), value.strip(" \t")) for name, colon, value in
        (line.partition(":") for line in fields) if colon and name and name[0] not in " \t"]


_CONTROL_IN_FIELD = re.compile("[\x00\r\n]")


def response_length(headers: List[Tuple[str, str]], link: "_Link") -> str:
    """The one Content-Length of a response that may repeat it ("5, 5" or two fields, as
    RFC 9110 8.6 allows when they agree); any other value cannot frame the body (RFC 9112
    6.3): the connection is closed and the answer fails at once, not at a timeout."""
    values = {v.strip() for k, value in headers if k == "content-length"
              for v in value.split(",") if v.strip()}
    if len(values) == 1:
        length = values.pop()
        if length.isdigit() and length.isascii() and len(length) <= 15:
            return length
    link.close()
    raise UpstreamError(f"upstream sent an invalid Content-Length "
                        f"{printable(', '.join(sorted(values)), 60)!r}", 502)


class UpstreamResponse:
    """A response whose body is still on the wire: read it with read1()/read_all(),
    then release() it to the pool, or abort() it."""

    def __init__(self, client: "UpstreamClient", key: tuple, link: _Link, version: str,
                 status: int, headers: List[Tuple[str, str]], req: UpstreamRequest):
        self._client, self._key, self._link, self.req = client, key, link, req
        self.status, self.headers = status, headers
        self._first = dict(reversed(headers))   # each name's first value, for header()
        self.aborted = self.released = False
        self.done = self.ending = False
        te = self.header("transfer-encoding").lower()
        length = self.header("content-length").strip()
        self._chunked = ChunkedDecoder(1 << 62) if "chunked" in te else None
        if length and not self._chunked and (not (length.isdigit() and length.isascii()) or
                                             len(self._first) < len(headers)):
            length = response_length(headers, link)
        self._left = int(length) if length and not self._chunked else -1
        connection = self.header("connection").lower()
        self.will_close = "close" in connection or (version == "HTTP/1.0" and
                                                    "keep-alive" not in connection) or \
            bool(length and self._chunked)         # both: a smuggling sign (RFC 9112 6.3)
        if status in (204, 304) or req.method == "HEAD" or self._left == 0:
            self.done, self._left = True, 0
        elif self._left < 0 and not self._chunked:
            self.will_close = True         # delimited by the close of the connection
        link.arm(req.read_timeout)

    def header(self, name: str) -> str:
        return self._first.get(name, "")

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

    def expect_end(self) -> None:
        """The stream's last event came, so its body should end now: an upstream that holds
        it open is let go after STREAM_END_GRACE of silence, not readTimeoutSeconds."""
        if not self.done and not self.ending:
            self.ending = True
            self._link.arm(STREAM_END_GRACE)

    def _broken(self, why: str) -> UpstreamError:
        """The error for a body that cannot be read to its end; the connection is closed."""
        self._link.close()
        if self.aborted:
            return UpstreamError(CLIENT_GONE, 499, self.req.provider)
        if self._link.timed_out and self.ending:
            return UpstreamError(f"upstream held the stream open {STREAM_END_GRACE:g}s after "
                                 "its last event", 502, self.req.provider)
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
        if self.released:
            return
        self.released = True
        if self.done and not self.will_close and not self.aborted:
            self._link.disarm()
            self._client._release(self._key, self._link)
        else:
            self._link.close()

    def abort(self) -> None:
        """Close the upstream connection now (the client went away, or the body is
        not wanted): the model stops spending tokens. Nothing, once released."""
        if not self.released:
            self.aborted = self.released = True
            self._link.close()


@remembered                              # the same few URLs serve every request
def url_parts(url: str) -> Tuple[str, str, int, str, str]:
    """(scheme, host, port, netloc, path with query) of an upstream URL."""
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    path = (parts.path or "/") + ("?" + parts.query if parts.query else "")
    return parts.scheme, parts.hostname or "", port, parts.netloc, path


class UpstreamClient:
    """Keep-alive connections to upstreams, pooled by (scheme, host, port, proxy), all
    on the event loop. Outbound proxies: http:// (CONNECT tunnel for https) and socks5://;
    their handshakes run on a worker thread, TLS and HTTP on the loop."""

    def __init__(self, ssl_context: Optional[ssl.SSLContext] = None):
        self._ssl = ssl_context
        self._idle: Dict[tuple, List[_Link]] = {}

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
            link = idle.pop()              # the most recently used first
            if link.usable and link.loop.time() - link.idle_since < POOL_IDLE_SECONDS:
                return link
            link.close()
        return None

    def _release(self, key: tuple, link: _Link) -> None:
        idle = self._idle.setdefault(key, [])
        now = link.loop.time()
        while idle and now - idle[0].idle_since >= POOL_IDLE_SECONDS:
            idle.pop(0).close()            # the longest idle, past reuse: closed now
        if len(idle) < POOL_IDLE_PER_HOST and link.usable:
            link.idle_since = now
            idle.append(link)
        else:
            link.close()

    async def open(self, req: UpstreamRequest) -> UpstreamResponse:
        """Send the request; return once the status and headers arrived."""
        scheme, host, port, netloc, path = url_parts(req.url)
        proxy = req.proxy
        absolute = bool(proxy and not proxy.scheme.startswith("socks") and scheme == "http")
        target = req.url if absolute else path
        headers = {"host": netloc, "accept-encoding": "identity"}
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
                    if status == 101:               # (only ever after an Upgrade, never sent)
                        raise UpstreamError(f"upstream at {where} switched protocols (101) "
                                            "though no upgrade was asked for", 502, req.provider)
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
                # Windows resolves "localhost" to ::1 first, and a refused connect takes 2 s
                # there before 127.0.0.1 is tried (Ollama, vLLM, LM Studio listen on IPv4):
                # race the two. Only there: racing every connect failed test_soak on 3.8 (RSS).
                race = {"happy_eyeballs_delay": 0.25} if os.name == "nt" and host == "localhost" \
                    else {}
                opening = asyncio.open_connection(host, port, limit=limit, **race, **tls)
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
        return _Link(reader, writer)

    def close(self) -> None:
        idle, self._idle = self._idle, {}
        for links in idle.values():
            for link in links:
                link.close()


_REFUSED = re.compile(r"\[(?:Errno (?:111|61|10061)|WinError (?:1225|10061))\]")


def _all_refused(exc: BaseException) -> bool:
    """asyncio's "Multiple exceptions: ..." for a name with several addresses (localhost:
    ::1 and 127.0.0.1), when every one refused."""
    text = str(exc)
    return type(exc) is OSError and text.startswith("Multiple exceptions: ") and \
        len(_REFUSED.findall(text)) == text.count("Connect call failed") > 0


def connect_error(exc: BaseException, req: UpstreamRequest, where: str) -> BaseException:
    """A failed connect as an UpstreamError whose message says what to check."""
    via = f" via proxy {req.proxy.host}:{req.proxy.port}" if req.proxy else ""
    if _all_refused(exc):                  # (asyncio's one error for ::1 and 127.0.0.1)
        exc = ConnectionRefusedError(str(exc))
    if isinstance(exc, ConnectionRefusedError) and req.proxy:   # (the proxy's own socket)
        return UpstreamError(f"the outbound proxy {req.proxy.host}:{req.proxy.port} refused "
                             f"the connection (to reach {where}): is it running, and are "
                             "proxyUrl and its port right?", 502, req.provider, req.url)
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


# -- 9.3 Upstream adapters: one per dialect ------------------------------------------

RESPONSES_PATHS = {"generate": "/responses", "count": "/responses/input_tokens"}
FORWARDED_HEADERS = {
    "openai": ("accept", "user-agent", "http-referer", "x-title", "openai-beta"),
    "anthropic": ("accept", "user-agent", "anthropic-beta"),
    "gemini": ("accept", "user-agent"),
}


def proxy_for(config: Config, cred: Credential, url: str,
              environ: Dict[str, str]) -> Optional[ProxySpec]:
    explicit = cred.proxy_url or config.proxy_url
    if explicit:
        return parse_proxy(explicit, config.proxy_username, config.proxy_password)
    if config.use_system_proxy:
        parts = urllib.parse.urlsplit(url)
        return parse_proxy(system_proxy(parts.scheme, parts.hostname or "", environ))
    return None


class Upstream:
    """An OpenAI-compatible server (OpenRouter, Groq, DeepSeek, Ollama, vLLM, LiteLLM...):
    Bearer auth, {baseUrl}/chat/completions. Each dialect below says how it differs.
    An adapter is built once per config, so per-request work is only the body and URL."""
    api = "openai"
    paths = {"generate": "/chat/completions", "completions": "/completions",
             "embeddings": "/embeddings"}
    listing = "/models"                    # what `check` asks for (answers for every model)
    base_advice = ("baseUrl must include the version segment, e.g. https://openrouter.ai/api/v1 "
                   "or http://localhost:11434/v1; the proxy appends /chat/completions "
                   "(/responses for wireApi \"responses\")")

    def __init__(self, cred: Credential, config: Config, environ: Dict[str, str]) -> None:
        self.cred, self.name = cred, cred.name
        self.host = (urllib.parse.urlsplit(cred.base_url).hostname or "").lower()
        self.proxy = proxy_for(config, cred, cred.base_url, environ)
        self.timeouts = (config.connect_timeout, config.first_byte_timeout, config.read_timeout)
        self.environ = environ
        self.headers = {"content-type": "application/json", "accept": "application/json",
                        "user-agent": f"proxypal/{__version__}"}
        self.headers.update(self.auth_headers())
        for name, value in cred.headers:
            name = name.lower()
            if name.startswith("x-amz-"):     # AWS signing material: used to sign, never sent
                continue
            if name == "authorization":       # a configured Authorization replaces the key
                for key in ("x-api-key", "api-key"):
                    self.headers.pop(key, None)
            self.headers[name] = value
        self.configured = {k.lower() for k, _ in cred.headers}

    def auth_headers(self) -> Dict[str, str]:
        return {"authorization": f"Bearer {self.cred.api_key}"} if self.cred.api_key else {}

    def api_for(self, client: str, op: str = "generate") -> str:
        """The format this upstream is spoken to in, for a client of format `client`: the
        Responses API for every client when its entry says wireApi "responses", and for
        Responses clients of OpenAI itself by default (it speaks both); else its own."""
        wire = self.cred.wire_api
        if op in RESPONSES_PATHS and (wire == "responses" or (
                client == "responses" and not wire and self.host == "api.openai.com")):
            return "responses"
        return self.api

    def serves(self, op: str, api: str = "") -> bool:
        return op in (RESPONSES_PATHS if api == "responses" else self.paths)

    def url(self, op: str, model: str, stream: bool, query: str, api: str = "") -> str:
        return self.cred.base_url + (RESPONSES_PATHS if api == "responses" else self.paths)[op]

    def body(self, op: str, model: str, body: Dict[str, Any], stream: bool,
             translated: bool) -> Dict[str, Any]:
        """The upstream's body from the (translated or relayed) client body."""
        body["model"] = model
        if translated and self.host == "api.openai.com":
            # OpenAI itself takes only max_completion_tokens from its reasoning models, and
            # no reasoning_content in history; every other compatible server knows max_tokens.
            if "max_tokens" in body:
                body.setdefault("max_completion_tokens", body.pop("max_tokens"))
            for message in body.get("messages") or ():
                message.pop("reasoning_content", None)
                message.pop("reasoning_details", None)
        return body

    def request(self, op: str, model: str, body: Dict[str, Any], stream: bool,
                client: Dict[str, str], query: str = "", translated: bool = True,
                api: str = "", as_sent: Optional[Tuple[Dict[str, Any], bytes]] = None
                ) -> UpstreamRequest:
        """`as_sent`: a relayed client's (body, bytes). When the upstream's body is that
        body unchanged (same model, nothing left out), the client's bytes go as they are:
        no re-encoding of what is often a 100+ KB agent request."""
        out = self.body(op, model, body, stream, translated)
        payload = as_sent[1] if as_sent is not None and out == as_sent[0] else dumps(out)
        headers = dict(self.headers)
        for name in FORWARDED_HEADERS[self.api]:
            if name in client and name not in self.configured:
                headers[name] = client[name]
        self.add_client_headers(headers, client)
        return UpstreamRequest("POST", self.url(op, model, stream, query, api), headers, payload,
                               self.name, self.proxy, *self.timeouts)

    def add_client_headers(self, headers: Dict[str, str], client: Dict[str, str]) -> None:
        pass

    def error(self, status: int, resp_headers: List[Tuple[str, str]], body: bytes) -> Tuple[int, bytes]:
        """An upstream error as (status, body) in the upstream's own API format."""
        return status, body

    def answer(self, op: str, body: bytes) -> bytes:
        """A successful non-stream body in the upstream's API format."""
        return body

    def decoder(self, content_type: str) -> Any:
        return SSEDecoder() if content_type == "text/event-stream" else None

    def hint(self, status: int, url: str, body: bytes, model: str, requested: str) -> str:
        """The troubleshooting advice for an upstream error status."""
        if status in (401, 403):
            return f"check the apiKey of provider {self.cred.label}"
        sizes = overflow_sizes(upstream_message(body)[0]) if status == 400 else None
        if sizes and sizes[0] < sizes[2]:
            return (f"the prompt fits the model's window, the output cap beside it does not: ask "
                    f"for fewer output tokens, or set maxOutputTokens of '{model}' in "
                    f"{self.cred.path}.models")
        if status != 404:
            return ""
        try:
            loads_json(body)
            api_answered = True
        except ValueError:
            api_answered = False
        if api_answered and b"model" in body.lower():
            return (f"the upstream does not know model '{model}': check the names in "
                    f"{self.cred.path}.models (aliases map client names to upstream names)")
        return f"check baseUrl in {self.cred.path} (tried {url}): {self.base_advice}"

    def probes(self) -> List[Tuple[List[str], UpstreamRequest]]:
        """What to ask to prove each configured model works: the models listing where the
        API has one (it answers for all models), else the smallest possible request."""
        names = [m.name for m in self.cred.models if not _excluded(self.cred, m.name, m.alias)]
        if self.listing:
            headers = dict(self.headers)
            self.add_client_headers(headers, {})
            return [(names or ["(any)"], UpstreamRequest(
                "GET", self.cred.base_url + self.listing, headers, b"", self.name,
                self.proxy, *self.timeouts))]
        body = {"max_tokens": 1, "messages": [{"role": "user", "content": "ping"}]}
        return [([name], self.request("generate", name, dict(body), False, {}))
                for name in names or ["claude-haiku-4-5"]]


class AnthropicUpstream(Upstream):
    """Anthropic's own API: x-api-key, anthropic-version (the client's, else the only
    current one), the client's anthropic-beta as sent (never injected)."""
    api = "anthropic"
    paths = {"generate": "/v1/messages", "count": "/v1/messages/count_tokens"}
    listing = "/v1/models?limit=1000"
    base_advice = ("give baseUrl without /v1, e.g. https://<resource>.services.ai.azure.com/"
                   "anthropic; the proxy appends /v1/messages")

    def __init__(self, cred: Credential, config: Config, environ: Dict[str, str]) -> None:
        super().__init__(cred, config, environ)
        if self.host != "api.anthropic.com":
            self.listing = ""              # not every Anthropic-format server lists models

    def auth_headers(self) -> Dict[str, str]:
        return {"x-api-key": self.cred.api_key} if self.cred.api_key else {}

    def add_client_headers(self, headers: Dict[str, str], client: Dict[str, str]) -> None:
        if "anthropic-version" not in self.configured:
            headers["anthropic-version"] = client.get("anthropic-version") or DEFAULT_ANTHROPIC_VERSION

    def hint(self, status: int, url: str, body: bytes, model: str, requested: str) -> str:
        if status == 404 and b"DeploymentNotFound" in body:
            return (f"deployment '{model}' does not exist there: add model aliasing, e.g. "
                    f'"models": [{{"name": "<deployment name>", "alias": "{requested}"}}]')
        return super().hint(status, url, body, model, requested)

    def url(self, op: str, model: str, stream: bool, query: str, api: str = "") -> str:
        url = self.cred.base_url + self.paths[op]
        if "beta=true" in query.split("&"):
            url += "?beta=true"                # the SDK's client.beta.messages
        return url

    def body(self, op: str, model: str, body: Dict[str, Any], stream: bool,
             translated: bool) -> Dict[str, Any]:
        body["model"] = model
        return self.sampling(body)

    def sampling(self, body: Dict[str, Any]) -> Dict[str, Any]:
        """Current Claude models refuse temperature and top_p together: temperature stays."""
        if "temperature" in body and "top_p" in body:
            log.debug("%s: top_p %s left out: temperature and top_p together are refused",
                      self.name, printable(str(body["top_p"]), 20))
            del body["top_p"]
        return body


class AzureUpstream(AnthropicUpstream):
    """Azure AI Foundry's Anthropic endpoint: the key as x-api-key and api-key; an unknown
    deployment is a plain 404 the user fixes with model aliasing
    (https://platform.claude.com/docs/en/build-with-claude/claude-in-microsoft-foundry)."""

    def auth_headers(self) -> Dict[str, str]:
        key = self.cred.api_key
        return {"x-api-key": key, "api-key": key} if key else {}

    def hint(self, status: int, url: str, body: bytes, model: str, requested: str) -> str:
        if status == 404 and b"type\":\"error" not in body.replace(b" ", b""):
            body = b"DeploymentNotFound"   # Azure's plain 404 for an unknown deployment
        return super().hint(status, url, body, model, requested)


class BedrockUpstream(AnthropicUpstream):
    """Amazon Bedrock's InvokeModel for Anthropic models: the model in the path, the body
    without model and stream, signed with SigV4 from the x-amz-* headers (or the AWS_*
    environment), or the apiKey as a Bedrock API key; answers streamed as
    application/vnd.amazon.eventstream; errors named by x-amzn-ErrorType
    (https://docs.aws.amazon.com/bedrock/latest/userguide/model-parameters-anthropic-claude-messages-request-response.html)."""
    listing = ""

    def auth_headers(self) -> Dict[str, str]:
        return {}

    def request(self, op: str, model: str, body: Dict[str, Any], stream: bool,
                client: Dict[str, str], query: str = "", translated: bool = True,
                api: str = "", as_sent: Optional[Tuple[Dict[str, Any], bytes]] = None
                ) -> UpstreamRequest:
        beta = client.get("anthropic-beta", "")
        body = self.sampling(body)
        payload = dumps(bedrock_count_body(body, beta) if op == "count" else bedrock_body(body, beta))
        url = self.cred.base_url + bedrock_path(model, op, stream)
        accept = "x-amzn-bedrock-accept" if stream and op != "count" else "accept"
        sent = {"content-type": "application/json", accept: "application/json",
                "host": urllib.parse.urlsplit(url).netloc}
        creds = aws_credentials(self.cred.headers, self.environ)
        if creds:
            sent.update(sigv4_sign("POST", url, sent, payload, creds, self.cred.bedrock_region,
                                   amz_date()))
        elif self.cred.api_key:
            sent["authorization"] = f"Bearer {self.cred.api_key}"
        sent["user-agent"] = client.get("user-agent", f"proxypal/{__version__}")
        for name, value in self.cred.headers:   # e.g. X-Amzn-Bedrock-GuardrailIdentifier; unsigned
            if not name.lower().startswith("x-amz-") and name.lower() not in sent:
                sent[name.lower()] = value
        return UpstreamRequest("POST", url, sent, payload, self.name, self.proxy, *self.timeouts)

    def error(self, status: int, resp_headers: List[Tuple[str, str]], body: bytes) -> Tuple[int, bytes]:
        error_type = next((v for k, v in resp_headers if k == "x-amzn-errortype"), "")
        return bedrock_error(status, error_type, body)

    def answer(self, op: str, body: bytes) -> bytes:
        if op != "count":
            return body
        try:                               # CountTokens' {"inputTokens": N}
            return dumps({"input_tokens": int(loads_json(body)["inputTokens"])})
        except (ValueError, KeyError, TypeError):
            raise UpstreamError("Bedrock CountTokens answered without inputTokens") from None

    def decoder(self, content_type: str) -> Any:
        if content_type == "application/vnd.amazon.eventstream":
            return BedrockDecoder()
        return super().decoder(content_type)


class GeminiUpstream(Upstream):
    """The Gemini API: x-goog-api-key, the model in the path, alt=sse for streams
    (https://ai.google.dev/api/generate-content)."""
    api = "gemini"
    paths = {"generate": ":generateContent", "count": ":countTokens"}
    listing = "/v1beta/models?pageSize=1000"
    base_advice = "baseUrl should be https://generativelanguage.googleapis.com"

    def auth_headers(self) -> Dict[str, str]:
        return {"x-goog-api-key": self.cred.api_key}

    def url(self, op: str, model: str, stream: bool, query: str, api: str = "") -> str:
        method = ":streamGenerateContent?alt=sse" if stream and op == "generate" else self.paths[op]
        return f"{self.cred.base_url}/v1beta/models/{urllib.parse.quote(model, safe='')}{method}"

    def body(self, op: str, model: str, body: Dict[str, Any], stream: bool,
             translated: bool) -> Dict[str, Any]:
        return body


ADAPTERS: Dict[str, Callable[..., Upstream]] = {
    "openai": Upstream, "anthropic": AnthropicUpstream, "azure": AzureUpstream,
    "bedrock": BedrockUpstream, "gemini": GeminiUpstream}


def make_upstreams(config: Config, environ: Dict[str, str]) -> Dict[str, Upstream]:
    """One adapter per entry, by its path: two entries with the same key and URL may still
    differ in wireApi or proxyUrl (their cooldowns are shared: Credential.key)."""
    return {cred.path: ADAPTERS[cred.dialect](cred, config, environ) for cred in config.credentials}


class BedrockDecoder:
    """Bedrock event-stream bytes -> the Anthropic (event type, data) pairs they carry."""

    def __init__(self) -> None:
        self._decoder = EventStreamDecoder()

    def feed(self, data: bytes) -> List[Tuple[str, str]]:
        return [e for e in (bedrock_event(h, p) for h, p in self._decoder.feed(data)) if e[0]]

    def close(self) -> List[Tuple[str, str]]:
        self._decoder.close()              # (a corrupt frame after the last good ones)
        if self._decoder.pending:
            raise UpstreamError("Bedrock event stream ended inside a frame")
        return []


# =============================================================================
# 10. Server
# Strategy: the asyncio edge, as a pipeline of small parts. A Connection reads
# heads and bodies under the wire limits and writes replies (10.1). ENDPOINTS
# is the one table of routes: dispatch answers 404 and 405 (with Allow) from it
# (10.2). Handlers return a Reply, or a StreamReply for the relay, instead of
# writing (10.3). A ModelCall plans (pure), runs the attempts (failover and
# cooldowns) and answers (10.4); relay() is the one loop for every stream
# (10.5). Server holds the lifecycle, reload and the request records (10.6).
# Errors become answers in the client's format; nothing here stops the server.
# =============================================================================

# -- 10.1 Replies and the connection ------------------------------------------------

@dataclasses.dataclass
class Reply:
    """A whole answer. Connection.write_reply alone decides the framing."""
    status: int
    body: bytes = b""
    headers: Sequence[Tuple[str, str]] = ()
    content_type: str = "application/json"


@dataclasses.dataclass
class StreamReply:
    """An answer still arriving from an upstream: relay() writes it event by event."""
    resp: "UpstreamResponse"
    pipe: Any                              # RelayPipe or StreamPipe
    headers: List[Tuple[str, str]]
    first: bytes = b""                     # the client's bytes made of the first read
    content_type: str = "text/event-stream"


@dataclasses.dataclass
class Record:
    """What one request did, for the request log and the usage counters."""
    id: str
    fmt: str
    method: str
    path: str
    t0: float
    model: str = ""
    routed: str = ""
    upstream_model: str = ""
    provider: str = ""
    status: int = 0
    upstream_status: Optional[int] = None
    ttfb: Optional[float] = None
    tokens: Tokens = NO_TOKENS             # input, output, cached, reasoning
    error: str = ""

    def count(self, usage: Any) -> None:
        """Keep the token counts an answer reported: a Usage, or Tokens."""
        if isinstance(usage, Usage):
            usage = (usage.input, usage.output, usage.cached, usage.reasoning)
        if usage:
            self.tokens = merged_tokens(self.tokens, usage)


@dataclasses.dataclass(frozen=True)
class Setup:
    """What a request runs on, swapped whole on reload: in-flight requests keep theirs."""
    config: Config
    router: "Router"
    upstreams: Dict[str, "Upstream"]


@dataclasses.dataclass
class Call:
    """One request in flight: the request, its client format, its setup and its record."""
    conn: "Connection"
    req: Request
    fmt: str
    setup: Setup
    record: Record
    keep_alive: bool = True
    has_body: bool = False
    body_read: bool = False
    started: bool = False                  # response head sent
    client_gone: bool = False
    logged: bool = False
    on_gone: Callable[[], Any] = lambda: None   # what the client leaving should stop
    on_answered: Callable[["Call"], Any] = lambda call: None   # counted before the last write

    @property
    def config(self) -> Config:
        return self.setup.config


class Connection:
    """One client connection: buffered reads with the wire limits, and response writes."""

    def __init__(self, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer
        self.loop = asyncio.get_running_loop()     # (each get_running_loop() is a getpid())
        peer = writer.get_extra_info("peername")
        self.peer = peer[0] if isinstance(peer, tuple) else "local"
        self.buf = b""
        self.busy = False
        self.eof = False
        self.expired = False                 # a timeout ended the input (see _arm)
        self.phase = ""
        self._deadline = math.inf
        self._body_deadline = math.inf
        self._timer: Optional[asyncio.TimerHandle] = None

    # Timeouts: one deadline per connection rather than asyncio.wait_for around each read
    # (a task per read). Its timer is moved only when the deadline comes earlier than the
    # timer; a timer that fires before the deadline just sets itself again. When the
    # deadline passes, reading stops and the pending read sees the end of input, with
    # `expired` saying why.
    def _arm(self, seconds: float, phase: str) -> None:
        loop = self.loop
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
        loop = self.loop
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
        try:
            data = await self.reader.read(READ_SIZE)
        except (ConnectionError, OSError):  # a reset: the client is gone, as after a close
            data = b""
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
                if self.buf[:1] == b"\x16":     # a TLS handshake record: ClientHello
                    raise WireError("this port speaks plain HTTP: use http://, not https://")
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
        self._body_deadline = self.loop.time() + BODY_TOTAL_TIMEOUT
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
        left = self._body_deadline - self.loop.time()
        self._arm(min(BODY_IDLE_TIMEOUT, max(left, 0.0)), "body")
        data = await self._read()
        self.disarm()
        if self.expired:
            if left <= BODY_IDLE_TIMEOUT:
                raise WireError(f"request body not received within {BODY_TOTAL_TIMEOUT:g}s", 408)
            raise WireError(f"request body stalled for {BODY_IDLE_TIMEOUT:g}s", 408)
        return data

    async def drain(self) -> None:
        """writer.drain(), but a client that reads nothing for CLIENT_WRITE_TIMEOUT is
        dropped rather than holding its stream (and the upstream's) forever."""
        transport = self.writer.transport
        size = transport.get_write_buffer_size()
        if size == 0 and not transport.is_closing():
            return                         # all sent (as usual): drain() would not wait
        if size <= WRITE_BUFFER_HIGH:
            return await self.writer.drain()
        self._arm(CLIENT_WRITE_TIMEOUT, "write")
        try:
            await self.writer.drain()
        finally:
            self.disarm()

    async def watch_disconnect(self, on_gone: Callable[[], None]) -> None:
        """While an answer is being made, notice the client going away at once. The end
        of its input counts as leaving (a closed or half-closed client, as nginx sees
        it), unless it pipelined more requests first: then it waits for their answers."""
        while len(self.buf) <= MAX_HEADER_BLOCK:
            data = await self.reader.read(READ_SIZE)
            if not data:
                self.eof = True
                if not self.buf:
                    on_gone()
                return
            self.buf += data               # a pipelined request: kept for later


    def write_reply(self, call: Call, reply: Reply) -> None:
        """The one place a whole answer is framed: Content-Length, HEAD, keep-alive, CORS."""
        call.record.status = reply.status
        if call.has_body and not call.body_read:
            call.keep_alive = False        # the unread body would pass for the next request
        headers = [] if reply.status == 204 else [
            ("Content-Type", reply.content_type), ("Content-Length", str(len(reply.body)))]
        headers += list(reply.headers) + cors_headers(call.req, call.config)
        head = response_head(reply.status, headers, call.keep_alive, call.req.version)
        call.on_answered(call)
        self.writer.write(head if call.req.method == "HEAD" or reply.status == 204
                          else head + reply.body)
        call.started = True


def error_reply(call: Call, exc: ProxypalError) -> Reply:
    """The client's answer for an error; any secret an upstream echoed in it masked."""
    message = call.record.error = mask_secrets(exc.message, call.config.secrets, patterns=False)
    headers = list(exc.headers)
    delay = retry_after_seconds(next((v for k, v in headers if k.lower() == "retry-after"), ""))
    body, headers = retry_hints(call.fmt, exc.status, error_body(call.fmt, exc.status, message,
                                                                 code=exc.code), headers, delay)
    return Reply(client_status(call.fmt, exc.status), body, headers)


# -- 10.2 Endpoints and dispatch ----------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Endpoint:
    method: str
    pattern: str                           # a path; {name} matches a segment up to a ':',
                                           # {name+} the rest
    handler: Callable[..., Any]            # async (server, call, params) -> Reply | StreamReply
    gate: str = "local"                    # "": open; "local": the client keys; "management"
    op: str = ""                           # the model operation, for model endpoints
    fmt: str = ""                          # the client format the path speaks

    @property
    def regex(self) -> Any:
        return _endpoint_regex(self.pattern)


@functools.lru_cache(maxsize=None)
def _endpoint_regex(pattern: str) -> Any:
    regex = re.sub(r"\\\{(\w+)\\\+\\\}", r"(?P<\1>.+)", re.escape(pattern))
    regex = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/:]+)", regex)
    return re.compile(regex + r"\Z")


def dispatch(endpoints: Sequence[Endpoint], method: str, path: str) -> Tuple[Endpoint, Dict[str, str]]:
    """The endpoint for a request, or the 404 or 405 (with Allow) the table implies."""
    matched = []
    for endpoint in endpoints:
        match = endpoint.regex.match(path)
        if match:
            if endpoint.method == method or (method == "HEAD" and endpoint.method == "GET"):
                return endpoint, match.groupdict()
            matched.append(endpoint.method)
    if matched:
        allowed = ", ".join(dict.fromkeys(m for e in matched for m in (
            (e, "HEAD") if e == "GET" else (e,))))
        raise ClientError(f"method {method} is not allowed on {printable(path, 80)}; use {allowed}",
                          405, [("Allow", allowed)])
    raise no_route(method, path)


def no_route(method: str, path: str) -> ClientError:
    if path.rstrip("/") in ("/chat/completions", "/messages", "/models", "/embeddings",
                            "/responses"):
        error = ClientError(f"no such route {method} {printable(path, 80)}: set your client's "
                            "base URL to http://HOST:PORT/v1 for OpenAI clients, or "
                            "http://HOST:PORT (no /v1) for Anthropic clients", 404)
    else:
        error = ClientError(f"no such route {method} {printable(path, 80)}; this proxy serves "
                            "POST /v1/chat/completions, POST /v1/messages, GET /v1/models and "
                            "the Gemini /v1beta routes", 404)
    error.code = ""                        # a wrong URL, not a model OpenAI lacks
    return error


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


def check_local_key(req: Request, config: Config) -> None:
    """The gate of the model API: the proxy's own keys, and no foreign web page while the
    public default key works."""
    origin = req.header("origin")
    if origin and not origin_allowed(origin, config):
        # A web page the user visits must not spend their keys with the public local
        # key, not even through a 'simple' request that skips the CORS preflight.
        raise ProxypalError(f"requests from the web page {printable(origin, 80)!r} are "
                            f"refused while the public key {DEFAULT_LOCAL_KEY!r} is "
                            'accepted: set "proxyApiKey" to a secret to allow them', 403)
    key = presented_key(req)
    if not key:
        raise ProxypalError("missing API key: send 'Authorization: Bearer <key>' or "
                            "'x-api-key: <key>' with the proxy's key (proxyApiKey in "
                            "config.json; default proxypal-local)", 401)
    if not key_matches(key, config.local_keys):
        raise ProxypalError("invalid API key: use the proxy's own key (proxyApiKey or "
                            "apiKeys in config.json), not an upstream's", 401)
    relayed = key == DEFAULT_LOCAL_KEY and not_from_here(req)
    if relayed:
        raise ProxypalError(f"the public key {DEFAULT_LOCAL_KEY!r} is accepted only from this "
                            f"machine, and this request {relayed}: set \"proxyApiKey\" to a "
                            "secret for clients that reach the proxy that way", 403)


FORWARDING_HEADERS = ("forwarded", "x-forwarded-for", "x-real-ip")


def not_from_here(req: Request) -> str:
    """Why a request may come from another machine, or "": its connection does, a reverse
    proxy on this machine (nginx) says it passed it on, or its Host names another machine."""
    if not is_loopback(req.peer):
        return "comes from another machine"
    if any(name in req.headers for name in FORWARDING_HEADERS):
        return "was passed on by a reverse proxy (Forwarded, X-Forwarded-For or X-Real-IP)"
    host = req.header("host")
    if host and names_another_machine(host):
        return (f"names the host {printable(host, 80)!r} (a tunnel, a container, or a web "
                "page whose name was pointed at this machine)")
    return ""


@functools.lru_cache(maxsize=64)
def names_another_machine(host: str) -> bool:
    """A Host header naming a machine by a dotted name other than this one's, or by an
    address other than loopback. A web page can point its own name at 127.0.0.1 (DNS
    rebinding) and then call the proxy as that name; a tunnel (ngrok, cloudflared, ssh -R)
    connects from this machine for clients anywhere. A bare name ("myhost") stays local:
    public DNS cannot answer for it."""
    name = host[1:host.find("]")] if host.startswith("[") else host.partition(":")[0]
    name = name.rstrip(".").lower()
    if not name or name in LOCAL_NAMES or name.endswith(".localhost") or is_loopback(name) \
            or name == socket.gethostname().lower():
        return False
    if name.replace(".", "").isdigit():    # 127.1 is 127.0.0.1 to inet_aton, as to curl
        with contextlib.suppress(OSError):
            return socket.inet_aton(name)[0] not in (0, 127)
    try:
        return not ipaddress.ip_address(name).is_unspecified     # (0.0.0.0 is this one)
    except ValueError:
        return "." in name


# This machine's names in the hosts files of Linux distributions (/etc/hosts).
LOCAL_NAMES = frozenset(("localhost", "localhost.localdomain", "localhost4",
                         "localhost4.localdomain4", "localhost6", "localhost6.localdomain6",
                         "ip6-localhost", "ip6-loopback"))


def check_page(req: Request, config: Config) -> None:
    """The page itself holds no secret; like its API it is shown to this machine only,
    unless allowRemoteManagement."""
    elsewhere = "" if config.allow_remote_management else not_from_here(req)
    if elsewhere:
        raise ProxypalError(f"the management page answers only this machine, and this "
                            f"request {elsewhere}; set allowRemoteManagement to true "
                            "to allow others", 403)


def check_management_key(req: Request, config: Config) -> None:
    """The management API's gate: this machine (unless allowRemoteManagement) and the
    management key in a header (never a cookie: another web page cannot send it)."""
    check_page(req, config)
    if not config.management_key:
        raise ProxypalError('the management API is off: set "managementKey" in config.json '
                            "and send it as X-Management-Key", 403)
    auth = req.header("authorization")
    given = req.header("x-management-key") or (auth[7:].strip()
                                               if auth[:7].lower() == "bearer " else "")
    if not given or not key_matches(given, (config.management_key,)):
        raise ProxypalError("missing or wrong management key (X-Management-Key)", 401)


GATES = {"": lambda req, config: None, "local": check_local_key,
         "management": check_management_key, "page": check_page}


def cors_headers(req: Request, config: Config) -> List[Tuple[str, str]]:
    """CORS for browser clients. With the public default key only loopback pages may
    call the proxy, so a web page cannot spend the user's upstream keys."""
    origin = req.header("origin")
    if not origin or not origin_allowed(origin, config) or req.path.startswith("/v0/management/"):
        return []                          # (the page is same-origin: its API needs no CORS)
    return [("Access-Control-Allow-Origin", origin), ("Vary", "Origin"),
            ("Access-Control-Expose-Headers", "request-id, x-request-id, retry-after")]


def origin_allowed(origin: str, config: Config) -> bool:
    """Pages on loopback always; other sites only when the public default key is off."""
    try:
        host = urllib.parse.urlsplit(origin).hostname or ""
    except ValueError:
        return False
    return is_loopback(host) or DEFAULT_LOCAL_KEY not in config.local_keys


def preflight(call: Call) -> Reply:
    """The CORS preflight answer; write_reply adds the origin itself."""
    headers = []
    if cors_headers(call.req, call.config):
        asked = call.req.header("access-control-request-headers")
        headers += [("Access-Control-Allow-Methods", "GET, POST, OPTIONS"),
                    ("Access-Control-Allow-Headers", asked or "authorization, content-type, "
                     "x-api-key, anthropic-version, anthropic-beta"),
                    ("Access-Control-Max-Age", "600")]
    if call.has_body:                      # never read: it must not pass for a request
        call.keep_alive = False
    return Reply(204, headers=headers)


# -- 10.3 Handlers ------------------------------------------------------------------

async def handle_health(server: "Server", call: Call, params: Dict[str, str]) -> Reply:
    return Reply(200, b'{"status":"ok"}')


def google_sdk(call: Call) -> bool:
    """A Google SDK's request on a path it shares with OpenAI's: google-genai (Python) lists
    and gets models at /v1/models unless told v1beta, with its key as x-goog-api-key (or
    ?key=); it reads only Gemini's shape there ({"models": [...]})."""
    if "x-goog-api-key" in call.req.headers or "key" in call.req.query_params():
        call.fmt = "gemini"                # (its errors too)
        return True
    return False


async def handle_models(server: "Server", call: Call, params: Dict[str, str]) -> Reply:
    if google_sdk(call):
        return await handle_gemini_models(server, call, params)
    payload = models_payload(call.setup.router, server.started_at)
    if "client_version" in call.req.query_params():
        # Codex asks for its own catalogue ({"models": [ModelInfo...]}). Each ModelInfo must
        # carry base_instructions, which Codex then uses *instead of* its own system prompt;
        # without it Codex rejects the whole catalogue. An empty catalogue keeps Codex's
        # prompt and its built-in model metadata; the names are in "data" and in --model.
        payload["models"] = []
    return Reply(200, dumps(payload))


async def handle_model(server: "Server", call: Call, params: Dict[str, str]) -> Reply:
    if google_sdk(call):
        return await handle_gemini_model(server, call, params)
    name = urllib.parse.unquote(params["id"])
    router = call.setup.router
    if not router.resolve(name).targets:
        raise unknown_model(call.setup, name)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(server.started_at))
    return Reply(200, dumps(model_item(router, name, server.started_at, stamp)))


async def handle_gemini_models(server: "Server", call: Call, params: Dict[str, str]) -> Reply:
    return Reply(200, dumps(gemini_models_payload(call.setup.router)))


async def handle_gemini_model(server: "Server", call: Call, params: Dict[str, str]) -> Reply:
    """GET /v1beta/models/{model}: the google-genai SDKs' models.get."""
    name = urllib.parse.unquote(params["id"])
    if not call.setup.router.resolve(name).targets:
        raise unknown_model(call.setup, name)
    return Reply(200, dumps(gemini_model_item(name)))


async def handle_model_call(server: "Server", call: Call, params: Dict[str, str]) -> Any:
    endpoint_op = params.get("op", "")
    if "method" in params:                 # Gemini: /v1beta/models/{model}:{method}
        endpoint_op = FORMATS["gemini"].paths.get(params["method"], "")
        if not endpoint_op:
            raise no_route(call.req.method, call.req.path)
    body = await call.conn.read_body(call.req, int(call.config.max_body_mb * 1024 * 1024))
    call.body_read = True
    model_call = ModelCall(server, call, endpoint_op, urllib.parse.unquote(params.get("model", "")))
    local = model_call.plan(body)
    if local is not None:
        return local
    if not model_call.stream:
        return await run_plain_call(call, model_call)
    return await run_stream_call(call, model_call)


def model_endpoints() -> List[Endpoint]:
    """The POST endpoint of every operation every client format has (FORMATS)."""
    out = []
    for fmt in FORMATS.values():
        if fmt.name == "gemini":           # google-genai uses /v1 unless told /v1beta
            out += [Endpoint("POST", f"/{version}/models/{{model+}}:{{method}}", handle_model_call,
                             fmt="gemini") for version in ("v1beta", "v1")]
            continue
        for path, op in fmt.paths.items():
            out.append(Endpoint("POST", path, handle_model_call, op=op, fmt=fmt.name))
    return out


ENDPOINTS: List[Endpoint] = [
    Endpoint("GET", "/health", handle_health, gate=""),
    Endpoint("HEAD", "/", handle_health, gate=""),
    Endpoint("GET", "/v1/models", handle_models),
    Endpoint("GET", "/v1/models/", handle_models),
    Endpoint("GET", "/v1/models/{id+}", handle_model),
    Endpoint("GET", "/v1beta/models", handle_gemini_models, fmt="gemini"),
    Endpoint("GET", "/v1beta/models/", handle_gemini_models, fmt="gemini"),
    Endpoint("GET", "/v1beta/models/{id}", handle_gemini_model, fmt="gemini"),
] + model_endpoints()


def unknown_model(setup: Setup, name: str) -> ProxypalError:
    config = setup.config
    if not config.credentials:
        where = config.path or default_config_path()
        state = "" if config.loaded else " (the file does not exist)"
        return ProxypalError(f"no auth available: no provider is configured; add one to "
                             f"{where}{state} (claudeApiKeys, geminiApiKeys or "
                             "ampOpenaiProviders); the proxy picks the change up within "
                             "seconds", 503)
    near = setup.router.nearest(name)
    hint = f"; did you mean {', '.join(repr(n) for n in near)}?" if near else \
        "; GET /v1/models lists the names this proxy serves"
    return ClientError(f"Invalid model {printable(name, 100)!r}: it is not in any provider's "
                       f"models list{hint}", 404)


def models_payload(router: "Router", created: int) -> Dict[str, Any]:
    """/v1/models in a shape both the openai and the anthropic SDK parse."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created))
    data = [model_item(router, name, created, stamp) for name in router.names()]
    return {"object": "list", "data": data, "has_more": False,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None}


def gemini_models_payload(router: "Router") -> Dict[str, Any]:
    """GET /v1beta/models in Gemini's shape, for Gemini CLI and the Google SDKs."""
    return {"models": [gemini_model_item(name) for name in router.names()]}


def gemini_model_item(name: str) -> Dict[str, Any]:
    return {"name": f"models/{name}", "baseModelId": name, "displayName": name,
            "supportedGenerationMethods": ["generateContent", "streamGenerateContent", "countTokens"]}


def model_item(router: "Router", name: str, created: int, stamp: str) -> Dict[str, Any]:
    route = router.resolve(name)
    owner = route.targets[0].cred.name if route.targets else "proxypal"
    item = {"id": name, "object": "model", "created": created, "owned_by": owner,
            "type": "model", "display_name": name, "created_at": stamp}
    target = route.targets[0] if route.targets else None
    if target and target.context_window:   # Anthropic's Models API fields (context meters)
        item["max_input_tokens"] = target.context_window
    if target and target.max_output_tokens:
        item["max_tokens"] = target.max_output_tokens
    return item


# -- 10.4 A model call: plan, run, answer ---------------------------------------------

@dataclasses.dataclass(frozen=True)
class Attempt:
    target: "Target"
    upstream: "Upstream"
    translator: Translator


SESSION_HEADERS = ("x-claude-code-session-id", "session_id", "conversation_id")


def session_key(req: Request, body: Dict[str, Any]) -> str:
    """What ties requests of one conversation together, for credential affinity: Claude
    Code's session header, Codex's prompt_cache_key or session_id, Gemini CLI's
    session_id, else nothing."""
    for name in SESSION_HEADERS:
        if req.headers.get(name):
            return req.headers[name]
    value = body.get("prompt_cache_key") or body.get("session_id")
    return value if isinstance(value, str) else ""


def _bounded_int(text: str) -> int:
    if len(text) > MAX_JSON_DIGITS:
        raise ValueError("digits")
    return int(text)


# Python 3.11+ refuses such numbers itself, at no cost; older ones get the check per int.
_JSON_INT = None if hasattr(sys, "get_int_max_str_digits") else _bounded_int


def parse_body(raw: bytes) -> Dict[str, Any]:
    if not raw.strip():
        raise ClientError("request body is empty; send a JSON object")
    try:
        body = json.loads(raw, parse_int=_JSON_INT)
    except UnicodeDecodeError:
        raise ClientError("request body is not UTF-8 JSON") from None
    except json.JSONDecodeError as exc:
        raise ClientError(f"request body is not valid JSON: {exc.msg} at line {exc.lineno}, "
                          f"column {exc.colno}") from None
    except RecursionError:
        raise ClientError("request body nests too deeply to be a real API request") from None
    except ValueError as exc:
        if "digits" in str(exc):
            raise ClientError(f"request body has a number of more than {MAX_JSON_DIGITS} "
                              "digits") from None
        raise ClientError(f"request body is not usable JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ClientError(f"request body must be a JSON object, got {_json_type(body)}")
    return body


class ModelCall:
    """One request for a model. plan() is pure: the body, the route, the attempts in
    order (each with its upstream adapter and translator). run() is the only code that
    awaits an upstream: failover and cooldowns. answer() turns the upstream's answer into
    the client's: a Reply, or a StreamReply for the relay. Anything but a ProxypalError
    escaping them is a bug (Server.handle answers 500 and keeps serving)."""

    def __init__(self, server: "Server", call: Call, op: str, path_model: str = "") -> None:
        self.server, self.call, self.setup = server, call, call.setup
        self.op, self.path_model = op, path_model
        self.stream = op == "stream"
        self.body: Dict[str, Any] = {}
        self.raw = b""                         # the body as the client sent it, while it says
                                               # what a relay sends
        self.sent = b""                        # the body as the client sent it
        self.chat: Optional[Chat] = None       # the client's request, read once if translated
        self.requested = ""
        self.attempts: List[Attempt] = []
        self.writer: Any = None                # the client's stream writer, once committed
        self.pipe_made: Any = None

    def plan(self, raw: bytes) -> Optional[Reply]:
        """The attempts to make; a Reply when the proxy answers alone (a local count)."""
        body = self.body = parse_body(raw)
        # UTF-8 without a BOM may go on as sent; json.loads also took UTF-16 or -32
        self.raw = raw if raw[:3] != b"\xef\xbb\xbf" and b"\x00" not in raw[:4] else b""
        self.sent = raw                        # (gemini_camel_case looks at it)
        model = self.path_model or body.get("model")
        if not isinstance(model, str) or not model.strip():
            raise ClientError('"model" is required and must be a non-empty string'
                              + ("" if "model" not in body else f", got {_short(model)}"))
        if "stream" in body and not isinstance(body["stream"], bool):
            raise ClientError(f'"stream" must be true or false, got {_short(body["stream"])}')
        self.stream = self.stream or body.get("stream") is True
        self.op = "generate" if self.op == "stream" else self.op
        record = self.call.record
        record.model = model
        route = self.setup.router.resolve(model)
        if not route.targets:
            raise unknown_model(self.setup, model)
        record.routed, self.requested = route.routed, route.requested
        fmt = self.call.fmt
        usable = [t for t in route.targets if self.op == "count" or self._upstream(t).serves(
            self.op, self._upstream(t).api_for(fmt, self.op))]
        if not usable:
            first = route.targets[0].cred
            raise ClientError(f"model {model!r} is served by {first.label}, which speaks the "
                              f"{FORMATS[first.api].title} API; {self.call.req.path} cannot reach "
                              "it: call that provider's endpoint instead")
        first = self._upstream(usable[0])
        if self.op == "count" and (first.api_for(fmt, "count") != fmt or not first.serves("count", fmt)):
            record.provider = usable[0].cred.name    # counted here: an estimate
            return Reply(200, dumps(local_count(self.call.fmt, body)))
        if len(usable) < len(route.targets):
            route = dataclasses.replace(route, targets=tuple(usable))
        ready, cooling = self.server.balancer.plan(route, self.setup.config.routing_strategy,
                                                   session_key(self.call.req, body))
        if len(cooling) == len(usable):
            log.warning("%s; trying %s anyway", describe_cooling(cooling, self.server.balancer.clock()),
                        ready[0].cred.label)
        retries = usable[0].cred.request_retry
        retries = self.setup.config.request_retry if retries is None else retries
        self.attempts = [Attempt(t, self._upstream(t),
                                 TRANSLATORS[(fmt, self._upstream(t).api_for(fmt, self.op))])
                         for t in ready[:1 + retries]]
        if log.isEnabledFor(logging.DEBUG):
            log.debug("route %s -> %s via %s", printable(model), route.routed, ", ".join(
                f"{a.target.cred.label} as {a.target.model!r}" for a in self.attempts))
        return None

    def _upstream(self, target: "Target") -> "Upstream":
        return self.setup.upstreams[target.cred.path]

    def ask(self) -> Optional[Chat]:
        """The client's request in the internal form, read once: a writer of the client's
        stream needs it (tool names, custom tools). None for a body only an upstream of
        its own format can judge (relayed as it is)."""
        if self.chat is None:
            with contextlib.suppress(ClientError):
                self.chat = TRANSLATORS[(self.call.fmt, self.call.fmt)].read(self.readable())
        return self.chat

    def readable(self) -> Dict[str, Any]:
        """The client's body for a reader: a Gemini one with Google's proto field names
        (google-genai sends some) in lowerCamelCase. A relay sends it on as it came:
        Google takes both."""
        if self.call.fmt != "gemini":
            return self.body
        return gemini_camel_case(self.body, self.sent) or self.body

    def upstream_request(self, attempt: Attempt) -> UpstreamRequest:
        """The request one attempt sends: the client's body relayed (same format) or
        translated, with the upstream's model name and output cap."""
        target, translator = attempt.target, attempt.translator
        if translator.passthrough:
            out = dict(self.body)
            if foreign_reasoning_dropped(self.call.fmt, out):
                self.raw = b""                 # changed inside: the client's bytes are stale
        else:
            if self.chat is None:
                self.chat = translator.read(self.readable())
            try:
                out = translator.write(dataclasses.replace(
                    self.chat, model=target.model, stream=self.stream,     # the entry's cap is
                    max_tokens=self.chat.max_tokens or target.max_output_tokens))  # the default too
            except ClientError as exc:
                raise ClientError(f"model {self.requested!r} goes to {target.cred.label} "
                                  f"as {target.model!r}: {exc.message}") from None
        if target.max_output_tokens:
            clamp_output_tokens(out, target.max_output_tokens, "interleaved-thinking" in
                                self.call.req.headers.get("anthropic-beta", ""))
        as_sent = (self.body, self.raw) if translator.passthrough and self.raw else None
        return attempt.upstream.request(self.op, target.model, out, self.stream,
                                        self.call.req.headers, self.call.req.query,
                                        not translator.passthrough, translator.upstream, as_sent)

    async def run(self) -> Any:
        record, last_error = self.call.record, None
        for i, attempt in enumerate(self.attempts):
            more, cred = i + 1 < len(self.attempts), attempt.target.cred
            ureq = self.upstream_request(attempt)
            record.provider, record.upstream_model = cred.name, attempt.target.model
            if log.isEnabledFor(logging.DEBUG):
                log.debug("upstream %s %s (%s)", ureq.method, ureq.url, cred.label)
            try:
                resp = await self.server.client.open(ureq)
            except UpstreamError as exc:
                last_error = exc
                log.warning("%s: %s", cred.label, exc.message)
                if more and exc.failover:
                    continue
                raise UpstreamError(f"provider {cred.label} {exc.message}", exc.status,
                                    cred.name, ureq.url) from None
            record.ttfb, record.upstream_status = time.monotonic() - record.t0, resp.status
            if resp.status in FAILOVER_STATUSES:
                self.server.balancer.cool(cred, resp.status,
                                          retry_after_seconds(resp.header("retry-after")))
                if more:
                    log.warning("%s answered %d; trying the next credential", cred.label,
                                resp.status)
                    resp.abort()
                    continue
            try:
                return await self.answer(attempt, resp)
            except UpstreamError as exc:   # nothing of this answer reached the client yet
                resp.abort()
                if exc.status in FAILOVER_STATUSES:     # (an overloaded_error as a 200
                    self.server.balancer.cool(cred, exc.status, None)   # stream's first event)
                if more and exc.failover and exc.unanswered:   # (else the request ran: once)
                    last_error = exc
                    log.warning("%s: %s; trying the next credential", cred.label, exc.message)
                    continue
                raise UpstreamError(f"{cred.name}: {exc.message}", exc.status, cred.name,
                                    ureq.url) from None
            except BaseException:          # cancelled, or a bug: the upstream stops too
                resp.abort()
                raise
        raise last_error or UpstreamError("no credential could be tried")

    async def answer(self, attempt: Attempt, resp: "UpstreamResponse") -> Any:
        if resp.status >= 400:
            body = await resp.read_all(MAX_UPSTREAM_ERROR_BODY, truncate=True)
            return self.error_answer(attempt, resp, body)
        content_type = resp.header("content-type").split(";")[0].strip().lower()
        decoder = attempt.upstream.decoder(content_type)
        headers = passed_headers(resp, attempt.upstream.name)
        if decoder is not None and not self.stream:
            raise UpstreamError(f"answered a request without stream: true with a stream "
                                f"({content_type}), which this proxy does not gather into one "
                                "answer: check the provider's settings, or ask for a stream")
        if decoder is not None:
            pipe = self.pipe_made = self.pipe(attempt, decoder)
            first = b""
            while not first:               # (until a whole event: it may be an error)
                data = await resp.read1()
                if not data:
                    error = UpstreamError("upstream ended the stream before sending any event")
                    error.unanswered = True
                    raise error
                first = pipe.first(data)
            return StreamReply(resp, pipe, headers, first)
        body = attempt.upstream.answer(self.op, await resp.read_all(MAX_UPSTREAM_BODY))
        obj = answer_object(resp, body)
        if self.stream and self.op == "generate":
            return self.replayed_answer(attempt, resp.status, headers, obj)
        return self.json_answer(attempt, resp, body, obj, headers)

    def commit(self) -> bytes:
        """The opening of the client's stream, sent before the upstream answered (a long
        silence): from now on the writer that made it writes the rest."""
        made = self.pipe_made
        if isinstance(made, StreamPipe) and not isinstance(made.reader, EventRelay):
            self.writer = made.writer          # (its stream is under way: one opening)
        else:
            self.writer = self.client_writer()
        if made is not None:
            made.committed()
        return FORMATS[self.call.fmt].events(self.writer.start(
            "msg_" + safe_id(self.call.record.id, "x"), None))

    def client_writer(self) -> Any:
        """A writer of the client's own stream format, for a stream the proxy makes."""
        fmt = self.call.fmt
        return TRANSLATORS[(fmt, fmt)].writer(self.requested or "proxypal",
                                              estimate_tokens(self.body), self.ask())

    def replayed_answer(self, attempt: Attempt, status: int, headers: List[Tuple[str, str]],
                        obj: Dict[str, Any]) -> Reply:
        """A whole answer to a streaming request (an upstream that ignored stream: true)
        as the client's stream."""
        writer = self.writer or attempt.translator.writer(self.requested, estimate_tokens(self.body),
                                                          self.ask())
        events = replay(CODECS[attempt.translator.upstream].read_response(obj), writer)
        self.call.record.count(writer.usage)
        return Reply(status, FORMATS[self.call.fmt].events(events), headers, "text/event-stream")

    def pipe(self, attempt: Attempt, decoder: Any) -> Any:
        fmt, provider = self.call.fmt, attempt.upstream.name
        translator = attempt.translator
        if translator.passthrough and isinstance(decoder, SSEDecoder):
            pipe: Any = RelayPipe(fmt, provider, self.requested)
        else:
            writer = self.writer or translator.writer(self.requested, estimate_tokens(self.body),
                                                      self.chat)
            reader = EventRelay(fmt, self.requested) if translator.passthrough else \
                CODECS[translator.upstream].stream_reader(writer)
            pipe = StreamPipe(decoder, reader, fmt)
            pipe.writer.provider = provider
        if self.writer is not None:
            pipe.committed()
        return pipe

    def json_answer(self, attempt: Attempt, resp: "UpstreamResponse", body: bytes,
                    obj: Dict[str, Any], headers: List[Tuple[str, str]]) -> Reply:
        """A whole answer for the client: relayed with the model name the client asked for,
        or translated."""
        translator = attempt.translator
        if translator.passthrough:
            if self.call.fmt != "gemini" and \
                    isinstance(obj.get("model"), str) and obj["model"] != self.requested:
                obj["model"] = self.requested
                body = dumps(obj)
            self.call.record.count(usage_counts(obj))
            return Reply(resp.status, body, headers,
                         resp.header("content-type") or "application/json")
        out = translator.response(obj, self.requested, self.chat)
        self.call.record.count(usage_counts(out))
        return Reply(resp.status, dumps(out), headers)

    def error_answer(self, attempt: Attempt, resp: "UpstreamResponse", body: bytes) -> Reply:
        upstream = attempt.upstream
        if self.op == "count" and isinstance(upstream, BedrockUpstream):
            return Reply(200, dumps(local_count(self.call.fmt, self.body)))  # not every model counts
        status, body = upstream.error(resp.status, resp.headers, body)
        if not body.strip():               # said by its status alone: "Not Found"
            body = _REASONS.get(status, f"HTTP {status}").encode()
        hint = upstream.hint(status, resp.req.url, body, attempt.target.model, self.requested)
        secrets = self.setup.config.secrets
        message = upstream_message(body)[0] + (f" ({hint})" if hint else "")
        self.call.record.error = mask_secrets(f"{upstream.name}: {message}", secrets)
        log.warning("%s answered %d: %s", attempt.target.cred.label, status, self.call.record.error)
        out, relayed = upstream_error_body(self.call.fmt, upstream.api, status, body,
                                           upstream.name, hint)
        out = mask_secrets(out.decode("utf-8", "replace"), secrets,     # upstreams echo keys back
                           patterns=False).encode("utf-8")
        headers = passed_headers(resp, upstream.name)
        if relayed and hint:
            headers.append(("x-proxypal-hint", printable(mask_secrets(hint, secrets), 300)))
        delay = retry_after_seconds(resp.header("retry-after"))
        if delay is None and status in (429, 503, 529):
            delay = google_retry_delay(body)
            if delay is not None and status == 429:    # (cooled for 30s before the body came)
                self.server.balancer.cool(attempt.target.cred, status, delay)
        out, headers = retry_hints(self.call.fmt, status, out, headers, delay)
        if self.stream and self.call.fmt == "responses" and context_overflow(status, message):
            return self.failed_stream(status, mask_secrets(message, secrets), headers)
        return Reply(client_status(self.call.fmt, status), out, headers)

    def failed_stream(self, status: int, message: str, headers: List[Tuple[str, str]]) -> Reply:
        """An error as a stream that fails: Codex compacts on context_length_exceeded only
        in a response.failed event (codex-api sse/responses.rs); an HTTP 400 stops it."""
        writer = self.writer or self.client_writer()
        writer.provider = self.call.record.provider
        events = writer.start("resp_" + safe_id(self.call.record.id, "x"), None) + \
            writer.fail(status, message)
        return Reply(200, FORMATS[self.call.fmt].events(events), headers, "text/event-stream")


def answer_object(resp: "UpstreamResponse", body: bytes) -> Dict[str, Any]:
    """A successful answer's JSON object; anything else (a captive portal's HTML, a cut
    body) is the upstream's failure, said with what it sent."""
    try:
        obj = loads_json(body)
    except (ValueError, RecursionError):
        obj = None
    if not isinstance(obj, dict):
        kind = resp.header("content-type").split(";")[0].strip() or "no Content-Type"
        encoding = resp.header("content-encoding").strip().lower()
        if encoding not in ("", "identity"):
            raise UpstreamError(f"answered {resp.status} compressed as {printable(encoding, 30)!r} "
                                "though the proxy asked for none (Accept-Encoding: identity); a "
                                "network proxy in between may have done it")
        raise UpstreamError(f"answered {resp.status} with {kind} that is not a JSON object "
                            f"(a login page of a network proxy, or a cut answer?): "
                            f"{printable(body.decode('utf-8', 'replace'), 120)!r}")
    return obj


def passed_headers(resp: "UpstreamResponse", provider: str) -> List[Tuple[str, str]]:
    """The upstream's own headers worth passing on (request ids, rate limits), and the
    name of the provider that answered."""
    return [(k, v) for k, v in resp.headers if k not in HOP_BY_HOP and k not in OWN_HEADERS] + [
        ("x-proxypal-provider", printable(provider, 100))]


def fail_call(call: Call, exc: ProxypalError, writer: Any = None) -> None:
    """An error for a call: its answer, or, once the answer started, the end of its stream
    (by the writer that began it, when there is one: it numbers the events it sent)."""
    if not call.started:
        call.conn.write_reply(call, error_reply(call, exc))
        return
    message = call.record.error = mask_secrets(exc.message, call.config.secrets, patterns=False)
    call.keep_alive = False
    if call.record.status == 0:       # committed, relay never began: end the stream here
        fmt = FORMATS[call.fmt]
        finish_stream(call, fmt.events(writer.fail(exc.status, message)) if writer is not None
                      else fmt.stream_error(exc.status, message), True)


async def run_plain_call(call: Call, model_call: "ModelCall") -> Any:
    """Run a non-streaming model call while watching the client: one that leaves (or
    half-closes) before the answer stops the upstream request at once, rather than
    leaving it to run up the user's tokens for an answer nobody reads."""
    task = asyncio.current_task(call.conn.loop)

    def gone() -> None:
        call.client_gone = True
        if task is not None:
            task.cancel()
    watch = ClientWatch(call, gone, model_call.server.alarms)
    try:
        return await model_call.run()
    except asyncio.CancelledError:
        if not call.client_gone:
            raise                      # shutdown
        call.record.error, call.keep_alive = CLIENT_GONE, False
        return None
    finally:
        await watch.stop()


async def run_stream_call(call: Call, model_call: "ModelCall") -> Any:
    """Run a streaming model call while watching the client, so that one that leaves
    while the model is still thinking (Claude Code's Esc) cancels the upstream request
    at once, and while timing the upstream: silent for firstByteCommitSeconds, the
    client gets 200 and its stream's opening event, then keep-alives, rather than a
    bare wait (Claude Code resends a request after ~300 s of silence). Before that
    bound, an upstream error keeps its real status."""
    task = asyncio.current_task(call.conn.loop)

    def gone() -> None:
        call.client_gone = True
        call.on_gone()
    if task is not None:
        call.on_gone = task.cancel         # until the relay takes over
    watch = ClientWatch(call, gone, model_call.server.alarms)
    committing = Committing(call, model_call) if call.config.first_byte_commit else None
    try:
        try:
            reply = await model_call.run()
        finally:
            call.on_gone = Call.on_gone    # the run is over: nothing of it to cancel
            if committing:
                committing.stop()
        if isinstance(reply, StreamReply):
            await relay(call, reply)
        elif call.started and reply.status < 400:   # committed, and answered whole (an
            call.record.status = reply.status        # upstream that ignored stream: true):
            finish_stream(call, reply.body, False)   # its events, replayed, end the stream
        elif call.started:             # committed: the error goes in the stream
            fail_call(call, ProxypalError(upstream_message(reply.body)[0], reply.status),
                      model_call.writer)
        else:
            return reply
    except ProxypalError as exc:
        if not call.started:
            raise
        fail_call(call, exc, model_call.writer)
    except asyncio.CancelledError:
        if not call.client_gone:
            raise                      # shutdown
        call.record.error, call.keep_alive = CLIENT_GONE, False
    finally:
        await watch.stop()
    return None


class Alarms:
    """Deadlines that nearly always pass cancelled (a call's client watch, a stream's
    commit): one loop timer serves them all, set for the earliest. A loop timer made and
    cancelled per request costs more: asyncio keeps each cancelled timer in its heap
    until its time. An alarm is an object with `when` (a loop time) and `ring()`. A
    removed one lets go of the alarm at once; its small entry leaves the heap when it
    reaches the top, or when most of the heap is such entries."""

    def __init__(self) -> None:
        self.heap: List[List[Any]] = []       # [when, order, alarm or None once removed]
        self.entries: Dict[Any, List[Any]] = {}     # the alarms not rung nor removed
        self.order = itertools.count()     # (alarms of the same time ring as added)
        self.timer: Optional[asyncio.TimerHandle] = None
        self.at = math.inf                 # the timer's time

    def add(self, loop: asyncio.AbstractEventLoop, alarm: Any) -> None:
        entry = self.entries[alarm] = [alarm.when, next(self.order), alarm]
        heapq.heappush(self.heap, entry)
        if alarm.when < self.at:
            self._set(loop, alarm.when)

    def remove(self, alarm: Any) -> None:
        entry = self.entries.pop(alarm, None)
        if entry is not None:
            entry[2] = None
            if len(self.heap) > 2 * len(self.entries) + 64:
                self.heap[:] = [e for e in self.heap if e[2] is not None]   # (in place:
                heapq.heapify(self.heap)                                     # _due may run)

    def _set(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer, self.at = loop.call_at(when, self._due, loop), when

    def _due(self, loop: asyncio.AbstractEventLoop) -> None:
        self.timer, self.at = None, math.inf
        now, heap = loop.time(), self.heap
        while heap and (heap[0][0] <= now or heap[0][2] is None):
            alarm = heapq.heappop(heap)[2]
            if alarm is not None:          # (due, and not removed, even by one rung before it)
                del self.entries[alarm]
                try:
                    alarm.ring()
                except Exception as exc:   # reported as a timer's would be; the rest ring
                    loop.call_exception_handler({"message": "an alarm failed", "exception": exc})
        if heap and heap[0][0] < self.at:
            self._set(loop, heap[0][0])

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer, self.at = None, math.inf


class ClientWatch:
    """Notices a client leaving while its call runs: once the call has lasted
    WATCH_CLIENT_AFTER, a task reads the connection (watch_disconnect) and calls `gone`
    when it ends. Quick calls cost an alarm, not a task."""

    def __init__(self, call: Call, gone: Callable[[], None], alarms: Alarms) -> None:
        self.conn, self.gone, self.alarms = call.conn, gone, alarms
        self.task: Optional["asyncio.Task[Any]"] = None
        self.when = call.conn.loop.time() + WATCH_CLIENT_AFTER
        alarms.add(call.conn.loop, self)

    def ring(self) -> None:
        self.task = asyncio.ensure_future(self.conn.watch_disconnect(self.gone))

    async def stop(self) -> None:
        self.alarms.remove(self)
        if self.task is not None:
            await _stop(self.task)


class Committing:
    """A streaming call whose upstream is silent: at firstByteCommitSeconds the stream's
    head and opening event go out, then the format's keep-alive every
    COMMIT_PING_SECONDS (KeepAlive) until the upstream answers."""

    def __init__(self, call: Call, model_call: "ModelCall") -> None:
        self.call, self.model_call = call, model_call
        self.pings: Optional[KeepAlive] = None
        self.alarms = model_call.server.alarms
        self.when = call.conn.loop.time() + call.config.first_byte_commit
        self.alarms.add(call.conn.loop, self)

    def ring(self) -> None:
        call, ping = self.call, FORMATS[self.call.fmt].ping
        if call.started or call.conn.writer.transport.is_closing():
            return
        chunked = call.req.version == "HTTP/1.1"
        head, out = stream_head(call, [], "text/event-stream"), self.model_call.commit() or ping
        log.info("%s: no answer within %gs, sent the stream's opening; waiting on",
                 call.record.id, call.config.first_byte_commit)
        call.conn.writer.write(head + (chunk(out) if chunked else out))
        self.pings = KeepAlive(call.conn.writer, COMMIT_PING_SECONDS, chunked, ping)

    def stop(self) -> None:
        self.alarms.remove(self)
        if self.pings:
            self.pings.stop()


# -- 10.5 The relay -------------------------------------------------------------------

def complete_json(data: str) -> bool:
    if data.strip() == "[DONE]":
        return True
    try:
        loads_json(data)
    except ValueError:
        return False
    return True


def _error_object(data: str) -> bool:
    obj = event_object(data) if data[:1] == "{" else None
    return bool(obj) and isinstance(obj.get("error"), dict)


def _is_event(block: bytes) -> bool:
    """A block that is an event: not blank lines alone, nor a comment."""
    block = block.lstrip(b"\r\n")
    return bool(block) and not (block[:1] == b":" and b"data" not in block)


class RelayPipe:
    """Same format on both sides: SSE bytes relayed event by event, untouched; each
    complete event goes out as soon as it arrived. A stream that ends without its
    format's last event gets an error event, not a quiet truncation."""

    held = ()                              # (a relayed read goes out whole at once)

    def __init__(self, fmt: str, provider: str, model: str = "") -> None:
        self.fmt, self.provider = FORMATS[fmt], provider
        self.model = model if fmt == "anthropic" else ""   # for message_start (renamed_opening)
        self.splitter = SSESplitter()
        self.recent: List[bytes] = []      # the last few events: where the end markers are
        self.tokens = NO_TOKENS
        self.failed = False
        self.skip: List[bytes] = []        # opening events the commit already sent

    @property
    def usage(self) -> Tokens:
        return self.tokens

    @property
    def complete(self) -> bool:
        """The client's stream has had its last event."""
        return not self.failed and self.fmt.finished(self.recent)

    def ended(self, out: bytes) -> bool:
        """These bytes, just relayed, end with the stream's last event."""
        last = self.fmt.last_event          # (from the last event's start: Responses' last
        start = out.rfind(b"\n\n", 0, len(out) - 2)   # event repeats the whole answer)
        return last is not None and not self.failed and bool(last.search(out, max(start, 0)))

    def committed(self) -> None:
        self.skip = list(self.fmt.opening)

    def first(self, data: bytes) -> bytes:
        out, start = self.feed(data), 0
        while True:                        # the first event that is not a comment
            end = _SSE_BOUNDARY.search(out, start)
            if end is None:
                return out
            block = out[start:end.end()]
            if block[:1] != b":":          # (a comment's block: the next one, then)
                if b"error" in block:      # (only an error needs parsing)
                    check_opening(*(parse_sse_event(block) or ("", "")))
                return out
            start = end.end()

    def feed(self, data: bytes) -> bytes:
        """The complete events of what arrived, as one piece. The common case (LF line
        ends, nothing to skip) is cut at the last blank line and only its last events and
        the ones that mention usage are looked at: a burst of hundreds of events costs
        a few scans, not a parse each."""
        splitter = self.splitter
        buf = splitter.take(data)
        if buf is None:
            return b""
        if self.skip or b"\r" in buf:
            splitter.rest = b""
            return self._feed_events(buf)
        cut = buf.rfind(b"\n\n") + 2
        if cut < 2:
            splitter.rest = buf
            return b""
        out, splitter.rest = (buf, b"") if cut == len(buf) else (buf[:cut], buf[cut:])
        if self.model:
            out = self._renamed(out)
        self.recent = (self.recent + last_events(out))[-3:]
        if b'"usage' in out:
            self.tokens = merged_tokens(self.tokens, stream_usage(out))
        return out

    def _renamed(self, out: bytes) -> bytes:
        """`out` with its message_start naming the model the client asked for; the first
        event that is not a comment ends the search."""
        start = 0
        while True:
            end = _SSE_BOUNDARY.search(out, start)
            if end is None:
                return out
            block = out[start:end.end()]
            if block[:1] != b":":
                self.model, model = "", self.model
                parsed = parse_sse_event(block)
                data = renamed_opening(parsed[1], model) if parsed and parsed[0] == "message_start" \
                    else None
                if data is None or data == parsed[1]:
                    return out             # (as it came: nothing to rename)
                return out[:start] + self.fmt.encode(parsed[0], data) + out[end.end():]
            start = end.end()

    def _feed_events(self, buf: bytes) -> bytes:
        events = self.splitter.feed(buf)
        if self.model and events:
            events = [self._renamed(e) if _is_event(e) else e for e in events]
        out = b"".join(events)
        found = stream_usage(out)          # (before a skip: an opening has input tokens)
        if found != NO_TOKENS:
            self.tokens = merged_tokens(self.tokens, found)
        if self.skip and events:
            events = [e for e in events if not self._skipped(e)]
            out = b"".join(events)
        real = [e for e in events if _is_event(e)]
        if real:
            self.recent = (self.recent + real)[-3:]
        return out

    def close(self) -> bytes:
        out, said = b"", None
        for tail in self.splitter.close():  # a last event left without its blank line
            parsed = parse_sse_event(tail)
            if parsed and _error_object(parsed[1]):
                said = parsed               # (Google's bare error: said below, in its words)
            elif parsed and complete_json(parsed[1]):
                out, self.recent = tail + b"\n\n", (self.recent + [tail])[-3:]
                self.tokens = merged_tokens(self.tokens, stream_usage(tail))
        if self.fmt.finished(self.recent):
            return out
        said = said or (parse_sse_event(self.recent[-1]) if self.recent else None)
        if said and (said[0] == "error" or _error_object(said[1])):  # the upstream's own error
            return out + self.fail(*event_error(said[1]))               # ended it: its words
        return out + self.fail(502, STREAM_CUT.format(end=self.fmt.end_marker))

    def _skipped(self, event: bytes) -> bool:
        parsed = parse_sse_event(event) if self.skip else None
        if parsed and parsed[0] in self.skip:
            self.skip.remove(parsed[0])
            return True
        if parsed:
            self.skip = []                 # another event: the opening is over
        return False

    def fail(self, status: int, message: str) -> bytes:
        self.failed = True
        return self.fmt.stream_error(status, named(self.provider, message),
                                     self.recent[-1] if self.recent else b"")


async def relay(call: Call, reply: StreamReply) -> None:
    """The one loop for every stream: the head (unless a commit sent it) with the first
    bytes ModelCall.answer read, then each read's complete events at once. A client that
    goes away aborts the upstream read."""
    conn, resp, pipe, record = call.conn, reply.resp, reply.pipe, call.record
    call.on_gone = resp.abort              # the client leaving now ends the upstream read
    chunked, end = call.req.version == "HTTP/1.1", FORMATS[call.fmt].end
    pinger: Optional[KeepAlive] = None
    try:
        out, record.status = reply.first, resp.status
        head = b"" if call.started else stream_head(call, reply.headers, reply.content_type)
        if call.config.stream_keepalive_seconds:
            pinger = KeepAlive(conn.writer, call.config.stream_keepalive_seconds, chunked)
        while True:
            if out or head:
                if end in out and pipe.ended(out):
                    resp.expect_end()      # (an upstream that holds it open is let go)
                out = masked(call, out)
                conn.writer.write(head + (chunk(out) if chunked and out else out))
                head = b""
                await conn.drain()
            data = b"" if pipe.held else await resp.read1()    # (held: the first read's
            if not (data or pipe.held):                         # other events, translated
                break                                           # once the first went out)
            if pinger:
                pinger.touch()
            out = pipe.feed(data)
        last = pipe.close()
        record.count(pipe.usage)
        finish_stream(call, last, pipe.failed)
        resp.release()
    except UpstreamError as exc:
        resp.abort()
        if exc.status != 499 and pipe.complete:     # broke after the last event: the
            log.warning("%s: after the stream's end: %s", record.id, exc.message)  # client
            record.count(pipe.usage)                # has the whole answer, and ends it well
            finish_stream(call, b"", False)
            return
        call.keep_alive = False
        record.error = mask_secrets(exc.message, call.config.secrets, patterns=False)
        if exc.status != 499:
            last = pipe.fail(exc.status, exc.message)
            record.count(pipe.usage)
            finish_stream(call, last, True)
    except ConnectionError:                # the client went away while we wrote
        resp.abort()
        record.error, call.keep_alive = CLIENT_GONE, False
    except asyncio.CancelledError:         # shutdown, or the client left: the upstream ends too
        resp.abort()
        raise
    except Exception as exc:               # a bug (e.g. in a translator): end the stream cleanly
        resp.abort()
        log.exception("stream relay failed for %s %s", call.req.method, printable(call.req.path))
        record.error, call.keep_alive = f"internal error ({type(exc).__name__})", False
        finish_stream(call, pipe.fail(500, f"internal error in proxypal ({type(exc).__name__}) "
                                           "while relaying the stream; see the proxy's log"), True)
    finally:
        if pinger:
            pinger.stop()
        record.count(pipe.usage)


def stream_head(call: Call, headers: Sequence[Tuple[str, str]], content_type: str) -> bytes:
    """The head of a streamed answer; it marks the answer started."""
    chunked = call.req.version == "HTTP/1.1"
    call.keep_alive = call.keep_alive and chunked
    head = [("Content-Type", content_type), ("Cache-Control", "no-cache"),
            ("X-Accel-Buffering", "no")]
    head += [("Transfer-Encoding", "chunked")] if chunked else []
    head += list(headers) + cors_headers(call.req, call.config)
    call.started = True
    return response_head(200, head, call.keep_alive, call.req.version)


def masked(call: Call, data: bytes) -> bytes:
    """Stream bytes for the client: an upstream's error event may echo its key. Only a
    read ending with an error event is looked at; a model's text is relayed as it came."""
    tail = max(0, len(data) - ERROR_TAIL)
    if data.find(b"rror", tail) >= 0 and _ERROR_EVENT.search(data, tail):
        return mask_bytes(data, call.config.secrets)
    return data


def finish_stream(call: Call, last: bytes, failed: bool) -> None:
    """A stream's last events and the end of its body (a failed one's too: the SDKs raise
    on the error event, and a body cut short could lose it); every failure is a WARNING
    line."""
    writer, last = call.conn.writer, masked(call, last)
    if failed:
        call.keep_alive = False
        call.record.error = call.record.error or printable(last.decode("utf-8", "replace"), 300)
        log.warning("stream %s %s failed: %s", call.record.id, printable(call.req.path),
                    call.record.error)
    call.on_answered(call)
    if writer.transport.is_closing():
        return
    chunked = call.req.version == "HTTP/1.1"
    ending = b"0\r\n\r\n" if chunked else b""
    writer.write((chunk(last) if chunked and last else last) + ending)


class KeepAlive:
    """While a stream is silent, a keep-alive every `seconds` keeps idle-cutting proxies
    between here and the client open: an SSE comment, or the format's own ping. One
    timer per stream that re-arms itself; a read only notes its time (touch), so there
    is no task or wait per read."""

    def __init__(self, writer: asyncio.StreamWriter, seconds: float, chunked: bool,
                 ping: bytes = b": keep-alive\n\n") -> None:
        self.writer, self.seconds = writer, seconds
        self.ping = chunk(ping) if chunked else ping
        self.loop = asyncio.get_running_loop()
        self.last = self.loop.time()       # the upstream's last bytes, or the last ping
        self.timer = self.loop.call_at(self.last + seconds, self._due)

    def touch(self) -> None:
        self.last = self.loop.time()

    def stop(self) -> None:
        self.timer.cancel()

    def _due(self) -> None:
        now = self.loop.time()
        if now >= self.last + self.seconds - 0.001:    # timers may fire a little early
            if self.writer.transport.is_closing():
                return
            self.writer.write(self.ping)
            self.last = now
        self.timer = self.loop.call_at(self.last + self.seconds, self._due)


# -- 10.6 Usage that survives restarts, the log ring, the management API -------------

USAGE_FILE = "usage.jsonl"               # in the config folder, beside config.json
USAGE_FLUSH_SECONDS = 1.0                # how stale other processes' counts may be
USAGE_FILE_MAX = 4 * 1024 * 1024         # compacted beyond this size
USAGE_PENDING_MAX = 1024 * 1024          # lines kept in memory while the folder refuses
#   them (a read-only config folder: for good); beyond, the oldest go. The counts shown
#   stay right: they are kept apart, in memory.
USAGE_HOURLY_DAYS = 8                    # hours older than this merge into days
USAGE_BIN = 1.2                          # latency histogram bins grow by 20%: percentiles
                                         # are exact to within 20%, at a few bytes each
USAGE_RANGES = {"24h": 86400, "7d": 7 * 86400, "30d": 30 * 86400, "all": None}
LOG_RING_LINES = 2000                    # log lines the page can show
REQUEST_RING = 500                       # request records the page can show


def _usage_bin(seconds: float) -> str:
    tenths = seconds * 10000                 # bins count from 0.1 ms: local upstreams are fast
    return "0" if tenths < 1 else str(int(math.log(tenths, USAGE_BIN)) + 1)


def _bin_percentile(bins: Dict[str, int], fraction: float) -> Optional[float]:
    """The upper edge, in ms, of the histogram bin holding the percentile."""
    total = sum(bins.values())
    if not total:
        return None
    rank, seen = max(1, math.ceil(fraction * total)), 0
    for key in sorted(bins, key=int):
        seen += bins[key]
        if seen >= rank:
            return 0.0 if key == "0" else round(USAGE_BIN ** int(key) / 10, 2)
    return None


def _usage_line(key: Tuple[int, int, str, str, str], bucket: Dict[str, Any]) -> bytes:
    line = dict(bucket, t=key[0], s=key[1], m=key[2], p=key[3])
    if key[4]:
        line["run"] = key[4]
    return json.dumps(line, separators=(",", ":")).encode("utf-8") + b"\n"


def _new_bucket() -> Dict[str, Any]:
    return {"n": 0, "e": {}, "i": 0, "o": 0, "c": 0, "r": 0, "l": {}, "f": {}}


def _add_bucket(into: Dict[str, Any], other: Dict[str, Any]) -> None:
    for key in ("n", "i", "o", "c", "r"):
        value = other.get(key)
        into[key] += value if isinstance(value, int) else 0
    for key in ("e", "l", "f"):
        for name, value in (other.get(key) or {}).items():
            if isinstance(value, int):
                into[key][name] = into[key].get(name, 0) + value


Key = Tuple[int, int, str, str, str]           # hour (or day) start, span, model, provider, run


def _appending(path: str, fd: int, inode: int) -> Tuple[int, int]:
    """(descriptor, inode) of `path` open for appending: `fd` while the path still names
    its file, else the file there now (made if missing). A compaction or rotation
    replaces the file; that is checked by path, as NFS keeps a replaced file that is open
    linked under a .nfs name. The old descriptor is closed only once the new one opened;
    a folder that was removed is made again."""
    try:
        current = os.stat(path).st_ino
    except FileNotFoundError:
        current = -1
    if fd >= 0 and current == inode:
        return fd, inode
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_BINARY", 0)
    try:
        new = os.open(path, flags, 0o600)
    except FileNotFoundError:              # its folder was removed: made again
        os.makedirs(os.path.dirname(path), exist_ok=True)
        new = os.open(path, flags, 0o600)
    if fd >= 0:
        os.close(fd)
    return new, os.fstat(new).st_ino


class UsageStore:
    """Usage per hour, model and provider: requests, errors by status, tokens (input,
    output, cached, reasoning), latency and time-to-first-byte histograms. With a folder,
    each request is one line appended to usage.jsonl there (one O_APPEND write under a
    shared lock) before its record is done, and the counts are what the file holds: they
    survive restarts and kills, and every process writing there (--workers) sees the
    sum. Beyond USAGE_FILE_MAX a flush compacts the file (hours older than
    USAGE_HOURLY_DAYS merged into days) under the exclusive lock and replaces it
    atomically, so no line is lost. `run` names one start of the proxy (its workers
    share it): "since start" counts the lines of this run."""

    def __init__(self, folder: str = "", clock: Callable[[], float] = time.time,
                 run: str = "") -> None:
        self.path = os.path.join(folder, USAGE_FILE) if folder else ""
        self.clock = clock
        self.started = clock()
        self.run = run or secrets.token_hex(4)
        self.tag = secrets.token_hex(4)    # this process's lines, already counted here
        self._own = f',"w":"{self.tag}"'.encode()
        self._line_ends: Dict[Key, str] = {}     # (see _line_end)
        self.totals: Dict[Key, Dict[str, Any]] = {}
        self.pending: List[bytes] = []     # lines not written yet (the folder failed)
        self.refused = False               # the last write failed: flush() retries
        self.dropped = 0                   # lines beyond USAGE_PENDING_MAX, never written
        self.offset, self.identity = 0, b""
        self.compact_at = 0                # a failed compaction waits until the file grows
        self._fd, self._lock = -1, _FolderLock(folder, shared=True) if folder else None
        self._inode = -1                   # of the file open as _fd
        self.error = ""                    # why the file could not be used, for the page
        self.refresh()

    def record(self, record: "Record", latency: float) -> None:
        """Count one request here and, with a file, append its line (tagged as this
        process's: reading it back skips it). Made by hand: this runs per request."""
        key = (int(self.clock() // 3600 * 3600), 3600, record.model, record.provider, self.run)
        bucket = self.totals.get(key) or self.totals.setdefault(key, _new_bucket())
        bucket["n"] += 1
        error = "" if 0 < record.status < 400 else str(record.status or "aborted")
        if error:
            bucket["e"][error] = bucket["e"].get(error, 0) + 1
        tokens = [value or 0 for value in record.tokens]
        for field, value in zip("iocr", tokens):
            bucket[field] += value
        late = _usage_bin(latency)
        bucket["l"][late] = bucket["l"].get(late, 0) + 1
        first = "" if record.ttfb is None else _usage_bin(record.ttfb)
        if first:
            bucket["f"][first] = bucket["f"].get(first, 0) + 1
        if not self.path:
            return
        self.pending.append((
            '{"n":1,"e":{%s},"i":%d,"o":%d,"c":%d,"r":%d,"l":{"%s":1},"f":{%s},%s' % (
                f'"{error}":1' if error else "", *tokens, late, f'"{first}":1' if first else "",
                self._line_end(key))
        ).encode("utf-8", JSON_ESCAPE))
        if not self.refused:               # (else the next flush tries, not every request)
            self._write()

    def _line_end(self, key: Key) -> str:
        """The end of a line of this key (who, when, what), made once per key."""
        end = self._line_ends.get(key)
        if end is None:
            if len(self._line_ends) >= 64:     # (older hours', mostly)
                self._line_ends.clear()
            end = '"w":"%s","t":%d,"s":3600,"m":%s,"p":%s,"run":"%s"}\n' % (
                self.tag, key[0], _JSON.encode(key[2]), _JSON.encode(key[3]), self.run)
            self._line_ends[key] = end
        return end

    # -- the file --------------------------------------------------------------------
    def _write(self) -> None:
        """Append the pending lines; kept for the next try when the folder refuses."""
        data, self.pending = b"".join(self.pending), []
        try:
            with self._lock:
                self._fd, self._inode = _appending(self.path, self._fd, self._inode)
                os.write(self._fd, data)
            self.error, self.refused = "", False
        except OSError as exc:
            self._failed(data, exc)

    def _failed(self, data: bytes, exc: OSError) -> None:
        if len(data) > USAGE_PENDING_MAX:  # refused for long: keep the newest lines
            start = data.index(b"\n", len(data) - USAGE_PENDING_MAX) + 1
            self.dropped += data.count(b"\n", 0, start)
            data = data[start:]
        self.pending.insert(0, data)
        if not self.refused:
            log.warning("usage not saved (kept in memory, retried every %gs): cannot write "
                        "%s: %s", USAGE_FLUSH_SECONDS, self.path, exc.strerror or exc)
        self.refused = True
        self.error = f"cannot write {self.path}: {exc.strerror or exc}" + (
            f" ({self.dropped} lines beyond {size_text(USAGE_PENDING_MAX)} not kept)"
            if self.dropped else "")

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def flush(self) -> None:
        """Retry lines the folder refused, compact when the file is big, read what every
        process appended."""
        if not self.path:
            return
        if self.pending:
            self._write()
        limit = max(USAGE_FILE_MAX, self.compact_at)
        with contextlib.suppress(OSError):
            if os.path.getsize(self.path) > limit:
                try:
                    with _FolderLock(os.path.dirname(self.path)):
                        if os.path.getsize(self.path) > limit:
                            self.close()   # (Windows replaces no file that is open)
                            self._compact()
                except ConfigWriteError as exc:    # a full disk: the file stays whole
                    log.warning("usage file not compacted: %s", exc.message)
                # Next when it grew by a quarter of the limit: a file compacting cannot
                # bring under it, or a full disk, costs one try per quarter, not per flush.
                self.compact_at = os.path.getsize(self.path) + USAGE_FILE_MAX // 4
        self.refresh()

    def refresh(self) -> None:
        """Read what was appended since the last read; all of it again after a compaction."""
        if not self.path:
            return
        try:
            info = os.stat(self.path)
        except FileNotFoundError:          # removed (the counts start again), or never
            if not self.refused:           # made: then the counts here are all there is
                self.totals, self.offset, self.identity = {}, 0, b""
            return
        except OSError as exc:
            self.error = self.error if self.refused else \
                f"cannot read {self.path}: {exc.strerror or exc}"
            return
        try:
            with open(self.path, "rb") as f:
                # A compaction replaces the file and starts it with a line of its own:
                # a changed first line (or a shorter file) means read it all again, this
                # process's own lines included.
                identity, skip = f.readline(200), self._own
                if identity != self.identity or info.st_size < self.offset:
                    self.totals, self.offset, self.identity, skip = {}, 0, identity, b""
                if info.st_size == self.offset:
                    return
                f.seek(self.offset)
                data = f.read(info.st_size - self.offset)
        except OSError as exc:
            self.error = f"cannot read {self.path}: {exc.strerror or exc}"
            return
        end = data.rfind(b"\n") + 1        # a line still being written waits for the next read
        self.offset += end
        self._merge(data[:end], self.totals, skip)

    @staticmethod
    def _merge(data: bytes, into: Dict[Key, Dict[str, Any]], skip: bytes = b"") -> None:
        for line in data.splitlines():
            if skip and skip in line:
                continue
            try:
                item = loads_json(line)
                key = (int(item["t"]), int(item["s"]), str(item["m"]), str(item["p"]),
                       str(item.get("run", "")))
            except (ValueError, KeyError, TypeError):
                continue                   # a torn line from a crash: skipped, not fatal
            _add_bucket(into.setdefault(key, _new_bucket()), item)

    def _compact(self) -> None:
        """Called under the exclusive folder lock: merge every line, hours older than
        USAGE_HOURLY_DAYS into days (which forget their run), replace the file."""
        with open(self.path, "rb") as f:
            data = f.read()
        merged: Dict[Key, Dict[str, Any]] = {}
        self._merge(data, merged)
        cutoff = self.clock() - USAGE_HOURLY_DAYS * 86400
        compact: Dict[Key, Dict[str, Any]] = {}
        for (start, span, model, provider, run), bucket in merged.items():
            if span == 3600 and start < cutoff:
                start, span, run = int(start // 86400 * 86400), 86400, ""
            _add_bucket(compact.setdefault((start, span, model, provider, run), _new_bucket()),
                        bucket)
        text = (json.dumps({"compacted": secrets.token_hex(8)}) + "\n").encode() + b"".join(
            _usage_line(k, b) for k, b in sorted(compact.items()))
        ConfigStore.write_file(self.path, text)

    # -- what the page and the API show ----------------------------------------------
    def window(self, since: Optional[float], run: str = "") -> Dict[str, Any]:
        """Counts per model, per provider and in total, for buckets ending after `since`
        (None: all), or only the lines of one run."""
        self.refresh()
        groups: Dict[str, Dict[str, Dict[str, Any]]] = {"models": {}, "providers": {}}
        total = _new_bucket()
        for (start, span, model, provider, line_run), bucket in list(self.totals.items()):
            if (since is not None and start + span <= since) or (run and line_run != run):
                continue
            for group, name in (("models", model), ("providers", provider)):
                if name:
                    _add_bucket(groups[group].setdefault(name, _new_bucket()), bucket)
            _add_bucket(total, bucket)
        out: Dict[str, Any] = {group: {name: self._stats(b) for name, b in sorted(entries.items())}
                               for group, entries in groups.items()}
        out["total"] = self._stats(total)
        return out

    @staticmethod
    def _stats(bucket: Dict[str, Any]) -> Dict[str, Any]:
        errors = sum(bucket["e"].values())
        return {"requests": bucket["n"], "errors": dict(sorted(bucket["e"].items())),
                "success_rate": round(1 - errors / bucket["n"], 4) if bucket["n"] else None,
                "input_tokens": bucket["i"], "output_tokens": bucket["o"],
                "cached_tokens": bucket["c"], "reasoning_tokens": bucket["r"],
                "latency_ms": {"p50": _bin_percentile(bucket["l"], 0.5),
                               "p95": _bin_percentile(bucket["l"], 0.95)},
                "ttfb_ms": {"p50": _bin_percentile(bucket["f"], 0.5),
                            "p95": _bin_percentile(bucket["f"], 0.95)}}

    def snapshot(self, range_name: str = "") -> Dict[str, Any]:
        """GET /v0/management/usage: since this process started, or over a range."""
        now = self.clock()
        if range_name == "today":
            local = time.localtime(now)
            since: Optional[float] = now - (local.tm_hour * 3600 + local.tm_min * 60 + local.tm_sec)
        elif range_name in USAGE_RANGES:
            span = USAGE_RANGES[range_name]
            since = None if span is None else now - span
        elif range_name:
            raise ClientError(f"range {printable(range_name, 20)!r} is unknown: use today, "
                              + ", ".join(USAGE_RANGES))
        else:
            since = self.started
        out = self.window(since if range_name else None, "" if range_name else self.run)
        out["since"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(since)) if since else None
        out["range"] = range_name or "start"
        out["persisted"] = bool(self.path) and not self.error
        if self.error:
            out["error"] = self.error
        return out


class Journal(logging.Handler):
    """What the page's Logs view shows: the last log lines (the logger's SecretFilter
    runs first, so they arrive masked) and the last requests. In memory for one process;
    with `path` (--workers) every worker appends to one file there, each line tagged with
    its worker, and the view reads the file, so any worker shows all of them."""

    def __init__(self, worker: str = "", path: str = "") -> None:
        super().__init__(logging.DEBUG)
        self.worker, self.path = worker, path
        self.lines: "collections.deque[Dict[str, Any]]" = collections.deque(maxlen=LOG_RING_LINES)
        self.requests: "collections.deque[Tuple[Record, float, float]]" = \
            collections.deque(maxlen=REQUEST_RING)
        self.seq = 0
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self.changed: Optional[asyncio.Event] = None
        self._fd, self._lock = -1, _FolderLock(os.path.dirname(path), shared=True) if path else None
        self._inode = -1                   # of the file open as _fd

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.exc_info:
                message += "\n" + logging.Formatter().formatException(record.exc_info)
        except Exception:                  # a bad log call must not break the caller
            return
        self.seq += 1
        line = {"seq": self.seq, "time": round(record.created, 3), "level": record.levelname,
                "message": message, "worker": self.worker}
        if self.path:
            self._append({"log": line})
        else:
            self.lines.append(line)
        if self.loop is not None and self.changed is not None:
            with contextlib.suppress(RuntimeError):       # the loop is closing
                self.loop.call_soon_threadsafe(self.changed.set)

    def add_request(self, record: "Record", now: float, wall: float) -> None:
        if self.path:
            self._append({"request": dict(request_log_entry(record, now, wall), worker=self.worker)})
        else:
            self.requests.append((record, now, wall))    # made into lines when asked for

    def _append(self, obj: Dict[str, Any]) -> None:
        try:
            with self._lock:               # type: ignore
                self._fd, self._inode = _appending(self.path, self._fd, self._inode)
                os.write(self._fd, dumps(obj) + b"\n")
        except OSError:
            pass                           # the page's view is not worth failing a request

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        super().close()

    def rotate(self) -> None:
        """Keep the shared file under JOURNAL_MAX (called by a flush, exclusive lock)."""
        with contextlib.suppress(OSError):
            if os.path.getsize(self.path) > JOURNAL_MAX:
                with _FolderLock(os.path.dirname(self.path)):
                    os.replace(self.path, self.path + ".1")

    def _shared(self, after: int) -> Tuple[List[Dict[str, Any]], int]:
        """(the journal's items from byte `after` on, the new position); from the last
        JOURNAL_TAIL bytes when `after` is 0 or the file was rotated."""
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                start = after if 0 < after <= size else max(0, size - JOURNAL_TAIL)
                f.seek(start)
                data = f.read(size - start)
        except OSError:
            return [], after
        end = data.rfind(b"\n") + 1
        items = []
        for raw in data[:end].splitlines()[1 if start and start != after else 0:]:
            with contextlib.suppress(ValueError):
                items.append(loads_json(raw))
        return items, start + end

    def since(self, after: int, level: str = "", text: str = "",
              limit: int = LOG_RING_LINES) -> Tuple[List[Dict[str, Any]], int]:
        """(log lines after cursor `after` at `level` or above holding `text`, the cursor
        to ask from next)."""
        floor = logging.getLevelName(level.upper()) if level else 0
        floor = floor if isinstance(floor, int) else 0
        text = text.lower()
        if self.path:
            items, cursor = self._shared(after)
            lines = [item["log"] for item in items if "log" in item]
        else:
            lines, cursor = [line for line in self.lines if line["seq"] > after], self.seq
        found = [line for line in lines if logging.getLevelName(line["level"]) >= floor
                 and (not text or text in line["message"].lower())]
        return found[-limit:], cursor

    def recent_requests(self) -> List[Dict[str, Any]]:
        """The last REQUEST_RING requests as request-log lines, newest first."""
        if self.path:
            items, _ = self._shared(0)
            return [item["request"] for item in reversed(items) if "request" in item][:REQUEST_RING]
        return [request_log_entry(record, now, wall) for record, now, wall in reversed(self.requests)]


JOURNAL_MAX = 2 * 1024 * 1024            # the workers' shared journal rotates beyond this
JOURNAL_TAIL = 512 * 1024                # how much of it the page reads at first


def management_error(status: int, message: str, path: str = "") -> Reply:
    """The management API's error body: {"error": {"message", "path"}}; `path` names the
    config key a validation error is about, for the page to show it beside the field."""
    return Reply(status, dumps({"error": {"message": message, "path": path}}),
                 MANAGEMENT_HEADERS)


MANAGEMENT_HEADERS = (("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff"),
                      ("X-Frame-Options", "DENY"), ("Referrer-Policy", "no-referrer"))


def json_reply(obj: Any, status: int = 200) -> Reply:
    return Reply(status, dumps(obj), MANAGEMENT_HEADERS)


async def management_body(call: Call) -> Dict[str, Any]:
    body = await call.conn.read_body(call.req, int(call.config.max_body_mb * 1024 * 1024))
    call.body_read = True
    try:
        obj = loads_json(body) if body.strip() else {}
    except (ValueError, RecursionError):
        raise ClientError("the body must be a JSON object") from None
    if not isinstance(obj, dict):
        raise ClientError("the body must be a JSON object")
    return obj


async def handle_page(server: "Server", call: Call, params: Dict[str, str]) -> Reply:
    return Reply(200, MANAGEMENT_PAGE_BYTES, PAGE_HEADERS, "text/html; charset=utf-8")


async def handle_state(server: "Server", call: Call, params: Dict[str, str]) -> Reply:
    """The dashboard: counts, each provider's state, the file's version, how clients
    reach this proxy."""
    config = call.config
    now, clock = time.time(), server.balancer.clock()
    latest: Dict[str, Dict[str, Any]] = {}       # each provider's newest request
    for entry in server.journal.recent_requests():
        if entry.get("provider"):
            latest.setdefault(entry["provider"], entry)
    since_start = server.usage.snapshot()
    providers = []
    for cred in config.credentials:
        cool = server.balancer.cooldowns.get(cred.key)
        last = latest.get(cred.name, {})
        providers.append({
            "name": cred.name, "entry": cred.path, "kind": cred.dialect, "base_url": cred.base_url,
            "models": len(cred.models),
            "requests": since_start["providers"].get(cred.name, {}).get("requests", 0),
            "last_status": last.get("status"), "last_error": last.get("error"),
            "last_at": last.get("time"),
            "cooling_until": round(now + cool.until - clock, 1) if cool and cool.until > clock else None,
            "cooling_reason": cool.reason if cool and cool.until > clock else None})
    store = server.config_store()
    version = ""
    if store is not None:
        with contextlib.suppress(ProxypalError):
            version = store.version_of(store.read_bytes())
    host = call.req.header("host") or f"{server.host}:{server.port}"
    return json_reply({
        "version": __version__, "started_at": server.started_at, "now": round(now, 3),
        "base_url": f"http://{host}", "local_key": config.proxy_api_key,
        "local_key_is_default": config.proxy_api_key == DEFAULT_LOCAL_KEY,
        "config": {"path": config.path, "version": version, "loaded": config.loaded,
                   "writable": store is not None, "reload_error": server.reload_error},
        "today": server.usage.snapshot("today")["total"],
        "since_start": since_start["total"],
        "providers": providers, "models": len(server.router.names()),
        "overrides": {SETTING_BY_ATTR[k].key: v for k, v in server.overrides.items()
                      if k in SETTING_BY_ATTR},
        "usage_error": server.usage.error or None})


async def handle_get_config(server: "Server", call: Call, params: Dict[str, str]) -> Reply:
    """The document and its version. A file that is not JSON (a hand edit gone wrong) gives
    the config the proxy runs on, with the broken file's version and `error`: a save
    from the page repairs the file, and the broken text is kept as config.json.bak."""
    store, error = server.config_store(), ""
    raw, version = call.config.raw or {}, ""
    if store is not None:
        try:
            data = store.read_bytes()
        except ConfigError as exc:         # (unreadable: the page says why)
            return management_error(500, exc.message)
        try:
            raw, version = store.document(data)
        except ConfigError as exc:
            version, error = store.version_of(data), exc.message
    settings = [{"key": s.key, "kind": s.kind.__name__, "default": list(s.default)
                 if isinstance(s.default, tuple) else s.default, "low": s.low, "high": s.high,
                 "live": s.live, "help": s.help, "choices": list(s.choices), "secret": s.secret,
                 "override": server.overrides.get(s.attr)} for s in SETTINGS]
    return json_reply({"config": raw, "version": version, "path": call.config.path,
                       "writable": store is not None, "settings": settings, "error": error})


async def handle_put_config(server: "Server", call: Call, params: Dict[str, str]) -> Reply:
    """Save the whole document: validated as the file is, written by ConfigStore (atomic,
    .bak kept), refused when the file changed since `version`, applied at once."""
    body = await management_body(call)
    store = server.config_store()
    if store is None:
        return management_error(409, "this proxy was started from a config object, not a "
                                     "file: there is nothing to save to")
    raw, version = body.get("config"), body.get("version")
    if not isinstance(raw, dict):
        return management_error(400, '"config" must be the whole config as a JSON object')
    if not isinstance(version, str):
        return management_error(400, '"version" must be the version the change was made on '
                                     '(from GET /v0/management/config)')
    try:
        check_management_kept(raw, call.config)
        check_exposure(parse_config(raw), server.host)   # (the address it listens on now,
        config, new_version = store.save(raw, version)   # --host included)
    except ConfigError as exc:
        return management_error(exc.status, exc.message, exc.field)
    except ConfigConflict as exc:
        return management_error(409, exc.message)
    server.apply_saved(config)
    log.info("config saved from the management page: %d providers, %d models",
             len(config.credentials), len(server.router.names()))
    return json_reply({"version": new_version, "providers": len(config.credentials),
                       "models": len(server.router.names())})


def check_management_kept(raw: Dict[str, Any], config: Config) -> None:
    """A save that would lock the page out of its own API is refused."""
    if not isinstance(raw.get("managementKey"), str) or not raw["managementKey"]:
        raise ConfigError("managementKey", "must stay set: without it the page and its API "
                                           "stop working")


async def entry_upstream(server: "Server", call: Call) -> "Upstream":
    """The upstream of a provider entry the page sent ({"list", "entry"}), saved or not,
    validated as the file's entries are (ConfigError names the field)."""
    body = await management_body(call)
    kind, entry = body.get("list"), body.get("entry")
    if not isinstance(kind, str) or kind not in CREDENTIAL_LISTS:
        raise ConfigError("list", "must be " + ", ".join(CREDENTIAL_LISTS))
    cred = _parse_credential(CREDENTIAL_LISTS[kind], entry, f"{kind}[new]")
    config = dataclasses.replace(call.config, credentials=(cred,))
    return list(make_upstreams(config, server.environ).values())[0]


def listed_models(body: bytes) -> Optional[set]:
    """Model ids in an OpenAI, Anthropic or Gemini models listing; None if not one. Ollama
    lists `llama3:latest` for what it serves as `llama3` too (a name without a tag means
    the latest: https://docs.ollama.com/api#model-names)."""
    try:
        obj = loads_json(body)
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
    return ids | {i[:-len(":latest")] for i in ids if i.endswith(":latest")}


async def probe(client: UpstreamClient, upstream: Upstream, names: List[str],
                req: UpstreamRequest, timeout: float) -> List[Dict[str, Any]]:
    """Ask one probe (Upstream.probes) and judge each model it stands for."""
    cred = upstream.cred
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
            hint = upstream.hint(status, req.url, body, name, name)
            why += f" ({hint})" if hint else ""
        rows.append({"provider": cred.name, "entry": cred.path, "base_url": cred.base_url,
                     "model": name, "ok": ok, "status": status or None, "latency_ms": latency,
                     "detail": mask_secrets(why, cred.secrets) if why else ""})
    return rows


async def handle_test_provider(server: "Server", call: Call, params: Dict[str, str]) -> Reply:
    """The `check` probe for one provider entry, saved or not: per model, ok or why not."""
    try:
        upstream = await entry_upstream(server, call)
    except ConfigError as exc:
        return management_error(400, exc.message, exc.field)
    rows: List[Dict[str, Any]] = []
    for names, req in upstream.probes():
        rows += await probe(server.client, upstream, names, req, MANAGEMENT_PROBE_TIMEOUT)
    return json_reply({"ok": bool(rows) and all(r["ok"] for r in rows), "results": rows})


MANAGEMENT_PROBE_TIMEOUT = 20.0          # the page's Test and Fetch models: as `check`


async def handle_fetch_models(server: "Server", call: Call, params: Dict[str, str]) -> Reply:
    """The upstream's own models listing, for the provider form."""
    try:
        upstream = await entry_upstream(server, call)
    except ConfigError as exc:
        return management_error(400, exc.message, exc.field)
    cred = upstream.cred
    if not upstream.listing:
        return management_error(400, f"{cred.name} has no models listing to fetch from "
                                     "(Azure and Bedrock list deployments in their own "
                                     "consoles): type the model names")
    _, req = upstream.probes()[0]
    try:
        resp = await asyncio.wait_for(server.client.open(req), MANAGEMENT_PROBE_TIMEOUT)
        data = await asyncio.wait_for(resp.read_all(MAX_UPSTREAM_BODY, truncate=True),
                                      MANAGEMENT_PROBE_TIMEOUT)
    except asyncio.TimeoutError:
        return management_error(504, f"{req.url} gave no answer within "
                                     f"{MANAGEMENT_PROBE_TIMEOUT:g}s")
    except UpstreamError as exc:
        return management_error(502, mask_secrets(exc.message, cred.secrets))
    listed = listed_models(data) if resp.status == 200 else None
    if listed is None:
        hint = upstream.hint(resp.status, req.url, data, "", "")
        why = f"HTTP {resp.status}: {upstream_message(data)[0]}" + (f" ({hint})" if hint else "")
        return management_error(502, mask_secrets(f"{req.url} answered {why}", cred.secrets))
    return json_reply({"models": sorted(listed)})


def model_routes(config: Config) -> List[Dict[str, Any]]:
    """Every routable name and where it goes: provider, upstream model, mapping applied."""
    router = Router(config)
    rows = []
    for name in router.names():
        route = router.resolve(name)
        for target in route.targets:
            rows.append({"model": name, "provider": target.cred.name, "entry": target.cred.path,
                         "upstream_model": target.model, "format": target.cred.api,
                         "mapping": f"{route.mapping.source} -> {route.mapping.target}"
                         if route.mapping else None, "credentials": len(route.targets)})
    for mapping in router.wild_maps:       # claude-haiku-* -> a model the user has
        targets = router.lookup(mapping.target)
        for target in targets:
            rows.append({"model": mapping.source, "provider": target.cred.name,
                         "entry": target.cred.path, "upstream_model": target.model,
                         "format": target.cred.api, "credentials": len(targets),
                         "mapping": f"{mapping.source} -> {mapping.target}"})
    for cred in router.wildcard_creds:
        rows.append({"model": f"{MODEL_PREFIX[cred.api]}*", "provider": cred.name,
                     "entry": cred.path, "upstream_model": "(the name asked for)",
                     "format": cred.api, "mapping": None, "credentials": 1})
    return rows


async def handle_routes(server: "Server", call: Call, params: Dict[str, str]) -> Reply:
    return json_reply({"routes": model_routes(call.config),
                       "mappings": (call.config.raw or {}).get("ampModelMappings") or []})


async def handle_requests(server: "Server", call: Call, params: Dict[str, str]) -> Reply:
    """The request log of the last REQUEST_RING requests, newest first."""
    secrets = server.setup.config.secrets
    return json_reply({"requests": [
        {k: mask_secrets(v, secrets, patterns=False) if isinstance(v, str) else v
         for k, v in entry.items()} for entry in server.journal.recent_requests()]})


async def handle_usage(server: "Server", call: Call, params: Dict[str, str]) -> Reply:
    server.usage.flush()
    return json_reply(server.usage.snapshot(call.req.query_params().get("range", "")))


async def handle_logs(server: "Server", call: Call, params: Dict[str, str]) -> Reply:
    query = call.req.query_params()
    try:
        after = int(query.get("after") or 0)
    except ValueError:
        raise ClientError('"after" must be a line number') from None
    lines, cursor = server.journal.since(after, query.get("level", ""), query.get("q", ""), 500)
    return json_reply({"lines": lines, "last": cursor})


async def handle_log_tail(server: "Server", call: Call, params: Dict[str, str]) -> None:
    """Server-sent events: every new log line (level and text filtered) as it is logged,
    until the client leaves. Read with fetch(), which can send the key header. Another
    worker's lines are seen by reading the shared journal every TAIL_POLL_SECONDS."""
    query = call.req.query_params()
    level, text = query.get("level", ""), query.get("q", "")
    journal, writer = server.journal, call.conn.writer
    chunked = call.req.version == "HTTP/1.1"
    _, after = journal.since(1 << 62)
    gone = asyncio.Event()
    watcher = asyncio.ensure_future(call.conn.watch_disconnect(gone.set))
    writer.write(stream_head(call, MANAGEMENT_HEADERS, "text/event-stream"))
    call.record.status = 200
    quiet, wait = COMMIT_PING_SECONDS, TAIL_POLL_SECONDS if journal.path else COMMIT_PING_SECONDS
    try:
        out = b": ping\n\n"
        while not gone.is_set() and not server.closing:
            if out:
                writer.write(chunk(out) if chunked else out)
                await call.conn.drain()
            journal.changed.clear()
            waits = [asyncio.ensure_future(journal.changed.wait()), asyncio.ensure_future(gone.wait())]
            await asyncio.wait(waits, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
            for task in waits:
                task.cancel()
            lines, after = journal.since(after, level, text)
            out = b"".join(b"data: " + dumps(line) + b"\n\n" for line in lines)
            quiet = COMMIT_PING_SECONDS if out else quiet - wait
            if quiet <= 0:                 # a comment now and then keeps proxies from idling it out
                out, quiet = b": ping\n\n", COMMIT_PING_SECONDS
    except ConnectionError:
        pass
    finally:
        await _stop(watcher)
        call.keep_alive = False
        finish_stream(call, b"", False)


TAIL_POLL_SECONDS = 0.25                 # the live tail reads the workers' journal this often


ENDPOINTS += [
    Endpoint("GET", "/", handle_page, gate="page"),
    Endpoint("GET", "/v0/management/state", handle_state, gate="management"),
    Endpoint("GET", "/v0/management/config", handle_get_config, gate="management"),
    Endpoint("PUT", "/v0/management/config", handle_put_config, gate="management"),
    Endpoint("POST", "/v0/management/test", handle_test_provider, gate="management"),
    Endpoint("POST", "/v0/management/fetch-models", handle_fetch_models, gate="management"),
    Endpoint("GET", "/v0/management/routes", handle_routes, gate="management"),
    Endpoint("GET", "/v0/management/requests", handle_requests, gate="management"),
    Endpoint("GET", "/v0/management/usage", handle_usage, gate="management"),
    Endpoint("GET", "/v0/management/logs", handle_logs, gate="management"),
    Endpoint("GET", "/v0/management/logs/stream", handle_log_tail, gate="management"),
]


@remembered                              # clients ask for the same few routes
def endpoint_for(method: str, path: str) -> Tuple[Endpoint, Dict[str, str]]:
    """dispatch() over ENDPOINTS (the 404s and 405s it raises are not remembered)."""
    return dispatch(ENDPOINTS, method, path)


# The management page: HTML, CSS and JS in one constant, no external asset (works
# offline). Its inline style and script are allowed by their hashes in the page's
# Content-Security-Policy, and nothing else is: no other script, no frame, no form post.
MANAGEMENT_PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>proxypal</title>
<link rel="icon" href="data:,">
<style>
:root { --bg: #f6f7f9; --panel: #fff; --text: #1d2330; --muted: #5d6677; --line: #d9dde5;
  --accent: #2f6fdf; --accent-text: #fff; --ok: #1d8a4a; --bad: #c6352d; --warn: #b87503;
  --code: #eef1f6; color-scheme: light; }
:root.dark { --bg: #14171d; --panel: #1d2129; --text: #e4e7ee; --muted: #9aa3b5; --line: #323846;
  --accent: #5b8ff0; --accent-text: #0d1017; --ok: #4cc27d; --bad: #ff6b61; --warn: #e0a53a;
  --code: #262b35; color-scheme: dark; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
  background: var(--bg); color: var(--text); }
button, input, select, textarea { font: inherit; color: inherit; }
button { cursor: pointer; border: 1px solid var(--line); background: var(--panel); border-radius: 6px;
  padding: 6px 12px; }
button.primary { background: var(--accent); border-color: var(--accent); color: var(--accent-text); }
button.danger { color: var(--bad); }
button.link { border: none; background: none; color: var(--accent); padding: 2px 4px; }
button:disabled { opacity: .55; cursor: default; }
input, select, textarea { width: 100%; padding: 7px 9px; border: 1px solid var(--line); border-radius: 6px;
  background: var(--panel); }
input[type=checkbox] { width: auto; }
textarea { min-height: 96px; font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 13px; }
code, pre { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 12.5px; }
pre { background: var(--code); padding: 10px; border-radius: 6px; overflow: auto; white-space: pre-wrap;
  word-break: break-all; margin: 6px 0; }
#app { display: flex; min-height: 100vh; }
nav { width: 190px; flex: none; background: var(--panel); border-right: 1px solid var(--line); padding: 14px 10px; }
nav h1 { font-size: 17px; margin: 2px 8px 14px; }
nav button { display: block; width: 100%; text-align: left; border: none; background: none; margin: 2px 0; }
nav button.on { background: var(--code); font-weight: 600; }
main { flex: 1; min-width: 0; padding: 18px 22px 60px; }
header { display: flex; gap: 10px; align-items: center; flex-wrap: wrap; margin-bottom: 14px; }
header h2 { margin: 0; font-size: 20px; flex: 1; }
.panel { background: var(--panel); border: 1px solid var(--line); border-radius: 8px; padding: 14px; margin-bottom: 14px; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(150px, 1fr)); gap: 10px; margin-bottom: 14px; }
.card { background: var(--panel); border: 1px solid var(--line); border-radius: 8px; padding: 10px 12px; }
.card b { display: block; font-size: 20px; }
.muted { color: var(--muted); }
.ok { color: var(--ok); } .bad { color: var(--bad); } .warn { color: var(--warn); }
table { width: 100%; border-collapse: collapse; }
th, td { text-align: left; padding: 6px 8px; border-bottom: 1px solid var(--line); vertical-align: top; }
th { font-weight: 600; color: var(--muted); font-size: 12.5px; }
.scroll { overflow-x: auto; }
.tabs { display: flex; gap: 4px; border-bottom: 1px solid var(--line); margin-bottom: 12px; flex-wrap: wrap; }
.tabs button { border: none; border-bottom: 2px solid transparent; border-radius: 0; background: none; }
.tabs button.on { border-bottom-color: var(--accent); font-weight: 600; }
.entry { display: flex; gap: 12px; align-items: flex-start; justify-content: space-between; flex-wrap: wrap; }
.entry .actions { display: flex; gap: 6px; flex-wrap: wrap; }
.field { margin-bottom: 12px; }
.field label { display: block; font-weight: 600; margin-bottom: 4px; }
.field .help { color: var(--muted); font-size: 12.5px; margin-top: 3px; }
.field .error { color: var(--bad); font-size: 12.5px; margin-top: 3px; }
.secret { display: flex; gap: 6px; }
.secret button { flex: none; }
.row { display: flex; gap: 8px; align-items: center; margin-bottom: 6px; }
.row > * { flex: 1; }
.row > button, .row > input[type=checkbox] { flex: none; }
.modal { position: fixed; inset: 0; background: rgba(0,0,0,.45); display: flex; align-items: flex-start;
  justify-content: center; padding: 30px 12px; overflow: auto; z-index: 5; }
.modal .panel { width: 100%; max-width: 560px; }
.modal h3 { margin-top: 0; }
.buttons { display: flex; gap: 8px; justify-content: space-between; margin-top: 16px; flex-wrap: wrap; }
.notice { padding: 9px 12px; border-radius: 6px; margin-bottom: 12px; border: 1px solid var(--line); background: var(--panel); }
.notice.bad { border-color: var(--bad); } .notice.warn { border-color: var(--warn); } .notice.ok { border-color: var(--ok); }
#toast { position: fixed; right: 16px; bottom: 16px; max-width: 420px; z-index: 9; pointer-events: none; }
#log { max-height: 60vh; min-height: 200px; }
.badge { display: inline-block; font-size: 11.5px; padding: 1px 7px; border-radius: 10px; border: 1px solid var(--line); color: var(--muted); }
.login { max-width: 420px; margin: 12vh auto; }
.hidden { display: none !important; }
@media (max-width: 700px) {
  #app { display: block; }
  nav { width: auto; border-right: none; border-bottom: 1px solid var(--line); display: flex; overflow-x: auto; padding: 8px; }
  nav h1 { margin: 6px 10px 6px 4px; font-size: 15px; }
  nav button { width: auto; white-space: nowrap; }
  main { padding: 12px; }
}
</style>
</head>
<body>
<div id="app" class="hidden">
  <nav id="nav"><h1>proxypal</h1></nav>
  <main>
    <header><h2 id="title"></h2><span id="where" class="muted"></span>
      <button id="theme" title="Light or dark">◐</button><button id="logout">Lock</button></header>
    <div id="banner"></div>
    <div id="page"></div>
  </main>
</div>
<div id="login" class="login panel hidden">
  <h2>proxypal</h2>
  <p>Enter the management key. It was printed when the proxy first started, and it is
  <code>managementKey</code> in the config file.</p>
  <div class="field"><label for="login-key">Management key</label>
    <div class="secret"><input id="login-key" type="password" autocomplete="current-password"></div>
    <div id="login-error" class="error"></div></div>
  <button id="login-go" class="primary">Open</button>
</div>
<div id="modal-root"></div>
<div id="toast"></div>
<script>
"use strict";
const $ = (sel, root) => (root || document).querySelector(sel);
const KINDS = {claudeApiKeys: "Claude", ampOpenaiProviders: "OpenAI Compatible", geminiApiKeys: "Gemini"};
const PAGES = ["dashboard", "keys", "models", "logs", "usage", "settings"];
const PAGE_TITLES = {dashboard: "Dashboard", keys: "API Keys", models: "Models", logs: "Logs",
  usage: "Usage", settings: "Settings"};
const S = {key: sessionStorage.getItem("proxypal-key") || "", page: "dashboard", tab: "claudeApiKeys",
  cfg: null, version: "", settings: [], writable: true, state: null, editing: false, changedOnDisk: false,
  tail: null, logLevel: "INFO", logText: "", usageRange: "24h", timer: 0};

/* Elements are built from text only: nothing typed by the user is ever parsed as HTML. */
function h(tag, props, ...kids) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") el.className = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k in el && k !== "list") el[k] = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const kid of kids.flat(9)) {
    if (kid === null || kid === undefined || kid === false) continue;
    el.append(kid instanceof Node ? kid : document.createTextNode(String(kid)));
  }
  return el;
}
const clone = (x) => JSON.parse(JSON.stringify(x));
const fmt = (n) => n === null || n === undefined ? "–" : Number(n).toLocaleString();
const ms = (n) => n === null || n === undefined ? "–" : `${fmt(n)} ms`;
const pct = (r) => r === null || r === undefined ? "–" : `${(r * 100).toFixed(1)}%`;
const clock = (t) => new Date(t * 1000).toLocaleTimeString();
function masked(key) {
  if (!key) return "(none)";
  return key.length <= 8 ? "••••" : `${key.slice(0, 4)}••••${key.slice(-4)}`;
}

async function api(method, path, body) {
  const opts = {method, headers: {"X-Management-Key": S.key}};
  if (body !== undefined) { opts.headers["Content-Type"] = "application/json"; opts.body = JSON.stringify(body); }
  const resp = await fetch(path, opts);
  let data = null;
  try { data = await resp.json(); } catch (e) { data = null; }
  if (resp.status === 401) { lock("The management key was not accepted."); throw new Error("locked"); }
  if (!resp.ok) {
    const err = new Error((data && data.error && data.error.message) || `HTTP ${resp.status}`);
    err.status = resp.status; err.path = data && data.error && data.error.path;
    throw err;
  }
  return data;
}

function toast(text, kind) {
  const el = h("div", {class: `notice ${kind || "ok"}`}, text);
  $("#toast").append(el);
  setTimeout(() => el.remove(), kind === "bad" ? 9000 : 3500);
}

function lock(why) {
  S.key = ""; sessionStorage.removeItem("proxypal-key"); stopTail();
  clearInterval(S.timer);
  $("#app").classList.add("hidden"); $("#login").classList.remove("hidden");
  $("#login-error").textContent = why || "";
  $("#login-key").focus();
}

async function unlock() {
  S.key = $("#login-key").value.trim();
  if (!S.key) { $("#login-error").textContent = "Type the key first."; return; }
  try { await loadConfig(); } catch (e) {
    if (e.message !== "locked") $("#login-error").textContent = e.message;
    return;
  }
  sessionStorage.setItem("proxypal-key", S.key);
  $("#login-key").value = "";
  $("#login").classList.add("hidden"); $("#app").classList.remove("hidden");
  S.timer = setInterval(poll, 3000);
  await poll();
  show(location.hash.slice(1) || "dashboard");
}

async function loadConfig() {
  const data = await api("GET", "/v0/management/config");
  S.cfg = data.config; S.version = data.version; S.settings = data.settings; S.writable = data.writable;
  S.cfgError = data.error;
  S.changedOnDisk = false;
}

async function poll() {
  try { S.state = await api("GET", "/v0/management/state"); } catch (e) { return; }
  $("#where").textContent = `${S.state.base_url} · proxypal ${S.state.version}`;
  const disk = S.state.config.version;
  if (disk && disk !== S.version && !S.saving) {
    if (S.editing) { S.changedOnDisk = true; }
    else { await loadConfig(); toast("The config file changed on disk; the page shows the new one.", "warn"); render(); return; }
  }
  drawBanner();
  if (S.page === "dashboard") render();
}

function drawBanner() {
  const b = $("#banner"); b.replaceChildren();
  const st = S.state;
  if (st && st.config.reload_error)
    b.append(h("div", {class: "notice bad"}, `The config file has an error; the proxy keeps running on the last good one: ${st.config.reload_error}` +
      (S.cfgError ? " This page shows the last good one: a save replaces the file, and keeps the broken one as config.json.bak." : "")));
  if (S.changedOnDisk)
    b.append(h("div", {class: "notice warn"}, "The config file changed on disk while you were editing. Saving now would be refused: ",
      h("button", {class: "link", onclick: async () => { closeModal(); await loadConfig(); render(); }}, "reload it"), " and redo the change."));
  if (!S.writable)
    b.append(h("div", {class: "notice warn"}, "This proxy was started without a config file: the page can show its settings but not save them."));
  if (st && st.usage_error) b.append(h("div", {class: "notice warn"}, `Usage is not being saved: ${st.usage_error}`));
}

/* Every change: a copy of the document, changed, sent with the version it was made on. */
async function save(change, okText) {
  const next = clone(S.cfg);
  change(next);
  S.saving = true;
  try {
    const res = await api("PUT", "/v0/management/config", {config: next, version: S.version});
    S.cfg = next; S.version = res.version; S.changedOnDisk = false;
    toast(okText || "Saved. The proxy uses it now.");
    return true;
  } catch (e) {
    if (e.message === "locked") return false;
    if (e.status === 409) { S.changedOnDisk = true; drawBanner(); }
    showError(e);
    return false;
  } finally { S.saving = false; }
}

function showError(e) {
  const spot = e.path && document.querySelector(`[data-error="${CSS.escape(e.path)}"]`);
  if (spot) { spot.textContent = e.message; spot.scrollIntoView({block: "center"}); }
  const general = $("#form-error");
  if (general && !spot) general.textContent = e.message;
  toast(e.message, "bad");
}

function show(page) {
  if (!PAGES.includes(page)) page = "dashboard";
  if (S.page === "logs" && page !== "logs") stopTail();
  S.page = page; location.hash = page;
  for (const b of document.querySelectorAll("nav button")) b.classList.toggle("on", b.dataset.page === page);
  $("#title").textContent = PAGE_TITLES[page];
  render();
}

function render() {
  const root = $("#page");
  if (!S.cfg) return;
  const draw = {dashboard: drawDashboard, keys: drawKeys, models: drawModels, logs: drawLogs,
    usage: drawUsage, settings: drawSettings}[S.page];
  root.replaceChildren(...[draw()].flat(9));
  drawBanner();
}

/* -- Dashboard ------------------------------------------------------------------ */
function drawDashboard() {
  const st = S.state;
  if (!st) return h("p", {class: "muted"}, "Loading…");
  const card = (label, value, id) => h("div", {class: "card", id}, h("span", {class: "muted"}, label), h("b", {}, value));
  const cards = h("div", {class: "cards"},
    card("Requests today", fmt(st.today.requests), "card-today"),
    card("Since start", fmt(st.since_start.requests), "card-start"),
    card("Success today", pct(st.today.success_rate)),
    card("Tokens in", fmt(st.today.input_tokens)), card("Tokens out", fmt(st.today.output_tokens)),
    card("Cached", fmt(st.today.cached_tokens)));
  const rows = st.providers.map((p) => h("tr", {},
    h("td", {}, p.name, h("div", {class: "muted"}, p.entry)), h("td", {}, p.kind), h("td", {}, h("code", {}, p.base_url)),
    h("td", {}, p.cooling_until ? h("span", {class: "warn"}, `cooling down until ${clock(p.cooling_until)} (${p.cooling_reason})`)
      : p.last_error ? h("span", {class: "bad"}, `last error ${p.last_status || ""}: ${p.last_error}`)
      : p.last_status ? h("span", {class: "ok"}, `ok (${p.last_status})`) : h("span", {class: "muted"}, "no requests yet"))));
  const providers = h("div", {class: "panel"}, h("h3", {}, `Providers (${st.providers.length}) · ${st.models} model names`),
    st.providers.length ? h("div", {class: "scroll"}, h("table", {}, h("tr", {}, h("th", {}, "provider"), h("th", {}, "kind"), h("th", {}, "base URL"), h("th", {}, "status")), rows))
      : h("p", {}, "No provider yet. ", h("button", {class: "link", onclick: () => show("keys")}, "Add one under API Keys"), "."));
  return [cards, providers, drawSnippets(st)];
}

function drawSnippets(st) {
  const base = st.base_url;
  const shown = st.local_key_is_default || S.revealLocal;
  const key = shown ? st.local_key : "YOUR_PROXY_KEY";
  const block = (title, text, id) => h("div", {}, h("div", {class: "row"}, h("b", {}, title),
    h("button", {class: "link", onclick: () => navigator.clipboard.writeText(text).then(() => toast("Copied."))}, "Copy")),
    h("pre", {id}, text));
  return h("div", {class: "panel", id: "snippets"}, h("h3", {}, "Point your clients here"),
    st.local_key_is_default ? null : h("p", {}, "Your clients use the proxy key (proxyApiKey). ",
      h("button", {class: "link", onclick: () => { S.revealLocal = !S.revealLocal; render(); }}, S.revealLocal ? "Hide it" : "Show it")),
    block("Claude Code (bash, zsh)", `export ANTHROPIC_BASE_URL=${base} ANTHROPIC_AUTH_TOKEN=${key}\nclaude`, "snip-claude"),
    block("Claude Code (PowerShell)", `$env:ANTHROPIC_BASE_URL = "${base}"; $env:ANTHROPIC_AUTH_TOKEN = "${key}"\nclaude`),
    block("Codex CLI (~/.codex/config.toml, then export PROXYPAL_API_KEY=" + key + ")",
      `model = "MODEL_NAME"\nmodel_provider = "proxypal"\n\n[model_providers.proxypal]\nname = "proxypal"\nbase_url = "${base}/v1"\nenv_key = "PROXYPAL_API_KEY"\nwire_api = "responses"`, "snip-codex"),
    block("Gemini CLI (env)", `export GOOGLE_GEMINI_BASE_URL=${base} GEMINI_API_KEY=${key}\ngemini`),
    block("Gemini CLI (~/.gemini/settings.json)", `{ "security": { "auth": { "selectedType": "gemini-api-key" } } }`),
    block("OpenAI SDKs and tools", `export OPENAI_BASE_URL=${base}/v1 OPENAI_API_KEY=${key}`));
}

/* -- API Keys --------------------------------------------------------------------- */
function drawKeys() {
  const tabs = h("div", {class: "tabs"}, Object.entries(KINDS).map(([list, label]) =>
    h("button", {class: S.tab === list ? "on" : "", "data-tab": list, onclick: () => { S.tab = list; render(); }},
      `${label} (${(S.cfg[list] || []).length})`)));
  const list = S.cfg[S.tab] || [];
  const addLabel = {claudeApiKeys: "Add Claude API Key", ampOpenaiProviders: "Add Provider", geminiApiKeys: "Add Gemini API Key"}[S.tab];
  const entries = list.map((entry, i) => drawEntry(S.tab, entry, i));
  return [tabs, h("div", {class: "row"}, h("p", {class: "muted"}, tabHelp(S.tab)),
    h("button", {class: "primary", id: "add-entry", disabled: !S.writable, onclick: () => openForm(S.tab, -1)}, addLabel)),
    entries.length ? entries : h("p", {class: "muted"}, "None yet.")];
}

function tabHelp(list) {
  return {claudeApiKeys: "Anthropic, Azure AI Foundry and Amazon Bedrock keys (Anthropic Messages API).",
    ampOpenaiProviders: "OpenRouter, Groq, DeepSeek, Ollama, vLLM, LiteLLM, LocalAI and any OpenAI-compatible server.",
    geminiApiKeys: "Google Gemini API keys."}[list];
}

function entryTitle(list, e) {
  if (list === "ampOpenaiProviders") return e.name || "(no name)";
  const base = e.baseUrl || (list === "geminiApiKeys" ? "generativelanguage.googleapis.com" : "api.anthropic.com");
  return e.name || base.replace(/^https?:\/\//, "");
}

function modelNames(e) {
  return (e.models || []).map((m) => typeof m === "string" ? m : m.alias && m.alias !== m.name ? `${m.name} as ${m.alias}` : m.name);
}

function drawEntry(list, e, i) {
  const path = `${list}[${i}]`;
  const off = e.disabled === true;
  const key = h("code", {}, masked(e.apiKey));
  let revealed = false;
  const eye = h("button", {class: "link eye", title: "Show or hide the key", onclick: () => {
    revealed = !revealed; key.textContent = revealed ? (e.apiKey || "(none)") : masked(e.apiKey);
    eye.textContent = revealed ? "Hide" : "Show"; }}, "Show");
  const result = h("div", {class: "muted"});
  const names = modelNames(e);
  return h("div", {class: "panel", "data-entry": path},
    h("div", {class: "entry"},
      h("div", {}, h("b", {}, entryTitle(list, e)), " ", off ? h("span", {class: "badge"}, "disabled") : null,
        h("div", {class: "muted"}, e.baseUrl || "default base URL"),
        h("div", {}, "Key ", key, eye),
        h("div", {class: "muted"}, names.length ? `${names.length} model${names.length > 1 ? "s" : ""}: ${names.slice(0, 6).join(", ")}${names.length > 6 ? ", …" : ""}` : "built-in model list")),
      h("div", {class: "actions"},
        h("button", {onclick: () => testEntry(list, e, result)}, "Test"),
        h("button", {disabled: !S.writable, onclick: () => openForm(list, i)}, "Edit"),
        h("button", {disabled: !S.writable, onclick: () => save((c) => { if (off) delete c[list][i].disabled; else c[list][i].disabled = true; },
          off ? "Enabled." : "Disabled: the proxy no longer uses it.").then(render)}, off ? "Enable" : "Disable"),
        h("button", {class: "danger", disabled: !S.writable, onclick: () => {
          if (confirm(`Remove ${entryTitle(list, e)}?`)) save((c) => { c[list].splice(i, 1); }, "Removed.").then(render); }}, "Remove"))),
    result);
}

async function testEntry(list, entry, out) {
  out.textContent = "Testing…"; out.className = "muted";
  try {
    const res = await api("POST", "/v0/management/test", {list, entry});
    out.replaceChildren(...res.results.map((r) => h("div", {class: r.ok ? "ok" : "bad"},
      `${r.ok ? "✓" : "✗"} ${r.model} · ${r.latency_ms} ms${r.detail ? " · " + r.detail : ""}`)));
    out.className = "";
  } catch (e) { out.textContent = e.message; out.className = "bad"; }
}

/* -- the provider forms ------------------------------------------------------------ */
function field(label, input, opts) {
  opts = opts || {};
  return h("div", {class: "field"}, h("label", {for: input.id}, label, opts.required ? " *" : ""),
    opts.wrap || input, opts.help ? h("div", {class: "help"}, opts.help) : null,
    h("div", {class: "error", "data-error": opts.path || ""}));
}

function secretInput(id, value, placeholder) {
  const input = h("input", {id, type: "password", value: value || "", placeholder: placeholder || "", autocomplete: "off", spellcheck: false});
  const eye = h("button", {type: "button", class: "eye", title: "Show or hide", onclick: () => {
    input.type = input.type === "password" ? "text" : "password"; eye.textContent = input.type === "password" ? "Show" : "Hide"; }}, "Show");
  return [input, h("div", {class: "secret"}, input, eye)];
}

function closeModal() { $("#modal-root").replaceChildren(); S.editing = false; }

function modal(title, body, buttons) {
  S.editing = true;
  const box = h("div", {class: "modal", onclick: (ev) => { if (ev.target === box) closeModal(); }},
    h("div", {class: "panel", role: "dialog"}, h("h3", {}, title), body, h("div", {id: "form-error", class: "error"}), h("div", {class: "buttons"}, buttons)));
  $("#modal-root").replaceChildren(box);
  const first = box.querySelector("input, textarea, select");
  if (first) first.focus();
}

function modelsText(e) { return modelNames(e).join("\n"); }

function parseModels(text, old) {
  const previous = (old || []).filter((m) => typeof m === "object");
  return text.split("\n").map((l) => l.trim()).filter(Boolean).map((line) => {
    const m = line.match(/^(.+?)\s+as\s+(.+)$/);
    const name = m ? m[1].trim() : line, alias = m ? m[2].trim() : name;
    const kept = previous.find((p) => p.name === name && (p.alias || p.name) === alias);
    if (kept) return kept;
    return alias === name ? name : {name, alias};
  });
}

function bedrockOf(e) { return /bedrock-runtime\./.test(e.baseUrl || "") || Object.keys(e.headers || {}).some((k) => k.toLowerCase().startsWith("x-amz-")); }

function openForm(list, index) {
  const editing = index >= 0;
  const e = editing ? clone(S.cfg[list][index]) : {};
  const path = editing ? `${list}[${index}]` : `${list}[${(S.cfg[list] || []).length}]`;
  const [keyInput, keyWrap] = secretInput("f-apiKey", e.apiKey, list === "ampOpenaiProviders" ? "sk-…" : "");
  const bulk = h("textarea", {id: "f-apiKeys", class: "hidden", placeholder: "one key per line"});
  const bulkToggle = editing ? null : h("button", {type: "button", class: "link", id: "f-bulk", onclick: () => {
    bulk.classList.toggle("hidden"); keyWrap.classList.toggle("hidden"); }}, "Add several keys (one per line)");
  const base = h("input", {id: "f-baseUrl", value: e.baseUrl || "", spellcheck: false,
    placeholder: {claudeApiKeys: "https://api.anthropic.com", ampOpenaiProviders: "https://openrouter.ai/api/v1", geminiApiKeys: "https://generativelanguage.googleapis.com"}[list]});
  const proxyUrl = h("input", {id: "f-proxyUrl", value: e.proxyUrl || "", placeholder: "http://proxy.corp:8080 or socks5://…", spellcheck: false});
  const body = [];
  const getters = [];
  if (list === "ampOpenaiProviders") {
    const name = h("input", {id: "f-name", value: e.name || "", placeholder: "OpenRouter"});
    const models = h("textarea", {id: "f-models", value: modelsText(e), placeholder: "openai/gpt-4-turbo\nanthropic/claude-3-opus", spellcheck: false});
    const fetchOut = h("span", {class: "muted"});
    const fetchBtn = h("button", {type: "button", id: "f-fetch", onclick: async () => {
      fetchOut.textContent = "Fetching…";
      try {
        const res = await api("POST", "/v0/management/fetch-models", {list, entry: collect()});
        const have = new Set(models.value.split("\n").map((l) => l.trim()).filter(Boolean));
        const added = res.models.filter((m) => !have.has(m));
        models.value = [...have, ...added].join("\n");
        fetchOut.textContent = `${res.models.length} models listed, ${added.length} added. Remove the ones you do not want.`;
      } catch (err) { fetchOut.textContent = err.message; }
    }}, "Fetch models");
    const prefix = h("input", {id: "f-prefix", value: e.prefix || "", placeholder: "groq"});
    const wire = h("select", {id: "f-wireApi"}, h("option", {value: ""}, "Chat Completions (default)"), h("option", {value: "responses"}, "Responses API"));
    wire.value = e.wireApi || "";
    body.push(field("Name", name, {required: true, path: `${path}.name`}),
      field("Base URL", base, {required: true, path: `${path}.baseUrl`, help: "With its version segment, e.g. https://openrouter.ai/api/v1 or http://localhost:11434/v1."}),
      field("API Key", keyInput, {required: true, wrap: h("div", {}, keyWrap, bulk, bulkToggle), path: `${path}.apiKey`, help: "Empty for local servers that need none."}),
      field("Models (one per line)", models, {required: true, path: `${path}.models`, wrap: h("div", {}, models, h("div", {class: "row"}, fetchBtn, fetchOut)),
        help: "Clients ask for these names. \"name as alias\" lets clients use another name."}),
      h("details", {}, h("summary", {}, "More"), field("Prefix", prefix, {path: `${path}.prefix`, help: "Models also answer as prefix/model."}),
        field("Wire API", wire, {path: `${path}.wireApi`, help: "Responses: the server speaks OpenAI's Responses API."}),
        field("Proxy URL", proxyUrl, {path: `${path}.proxyUrl`})));
    getters.push((x) => { x.name = name.value.trim(); x.models = parseModels(models.value, e.models);
      set(x, "prefix", prefix.value.trim()); set(x, "wireApi", wire.value); });
  } else if (list === "claudeApiKeys") {
    const rows = h("div", {id: "f-aliases"});
    const addRow = (m) => {
      const name = h("input", {class: "f-alias-name", value: m ? m.name || "" : "", placeholder: "Name (deployment / model id upstream)"});
      const alias = h("input", {class: "f-alias-alias", value: m ? m.alias || m.name || "" : "", placeholder: "Alias (what clients ask for)"});
      const row = h("div", {class: "row"}, name, alias, h("button", {type: "button", class: "danger", title: "Remove", onclick: () => row.remove()}, "✕"));
      row.original = m && typeof m === "object" ? m : null;
      rows.append(row);
    };
    for (const m of e.models || []) addRow(typeof m === "string" ? {name: m, alias: m} : m);
    const headers = e.headers || {};
    const aws = {};
    const awsFields = [["x-amz-access-key", "Access key ID", false], ["x-amz-secret-key", "Secret access key", true],
      ["x-amz-region", "Region", false], ["x-amz-session-token", "Session token (optional)", true]].map(([hk, label, secret]) => {
      const id = `f-${hk}`;
      if (secret) { const [i, w] = secretInput(id, headers[hk]); aws[hk] = i; return field(label, i, {wrap: w, path: `${path}.headers.${hk}`}); }
      aws[hk] = h("input", {id, value: headers[hk] || "", spellcheck: false}); return field(label, aws[hk], {path: `${path}.headers.${hk}`});
    });
    const awsBox = h("div", {class: bedrockOf(e) ? "" : "hidden", id: "f-aws"}, h("p", {class: "muted"}, "Amazon Bedrock: requests are signed with these AWS keys (SigV4); they are never sent as headers. Without them the API key is sent as a Bedrock API key."), awsFields);
    const kind = h("select", {id: "f-kind", onchange: () => {
      awsBox.classList.toggle("hidden", kind.value !== "bedrock");
      base.placeholder = {anthropic: "https://api.anthropic.com", azure: "https://YOUR-RESOURCE.services.ai.azure.com/anthropic", bedrock: "https://bedrock-runtime.us-east-1.amazonaws.com"}[kind.value];
    }}, h("option", {value: "anthropic"}, "Anthropic"), h("option", {value: "azure"}, "Azure AI Foundry"), h("option", {value: "bedrock"}, "Amazon Bedrock"));
    kind.value = bedrockOf(e) ? "bedrock" : /azure/.test(e.baseUrl || "") ? "azure" : "anthropic";
    body.push(field("Kind", kind, {help: "Fills the hints; the base URL decides."}),
      field("API Key", keyInput, {required: true, wrap: h("div", {}, keyWrap, bulk, bulkToggle), path: `${path}.apiKey`}),
      field("Base URL (optional)", base, {path: `${path}.baseUrl`, help: "Without /v1. Azure AI Foundry: https://{RESOURCE}.services.ai.azure.com/anthropic"}),
      field("Proxy URL (optional)", proxyUrl, {path: `${path}.proxyUrl`}), awsBox,
      h("div", {class: "field"}, h("label", {}, "Models (aliasing)"), h("div", {class: "help"}, "Name: the model or deployment upstream. Alias: what clients such as Claude Code ask for. No rows: the built-in Claude list."),
        rows, h("button", {type: "button", id: "f-add-alias", onclick: () => addRow(null)}, "+ Add Model Alias"), h("div", {class: "error", "data-error": `${path}.models`})));
    getters.push((x) => {
      x.models = [...rows.children].map((row) => {
        const name = row.querySelector(".f-alias-name").value.trim(), alias = row.querySelector(".f-alias-alias").value.trim() || name;
        if (!name) return null;
        return Object.assign(row.original ? clone(row.original) : {}, {name, alias});
      }).filter(Boolean);
      if (!x.models.length) delete x.models;
      const hs = Object.assign({}, x.headers || {});
      for (const [hk, input] of Object.entries(aws)) { const v = input.value.trim(); if (v && kind.value === "bedrock") hs[hk] = v; else delete hs[hk]; }
      if (Object.keys(hs).length) x.headers = hs; else delete x.headers;
    });
  } else {
    const models = h("textarea", {id: "f-models", value: modelsText(e), placeholder: "gemini-2.5-pro\ngemini-2.5-flash", spellcheck: false});
    body.push(field("API Key", keyInput, {required: true, wrap: h("div", {}, keyWrap, bulk, bulkToggle), path: `${path}.apiKey`}),
      field("Base URL (optional)", base, {path: `${path}.baseUrl`}),
      field("Models (one per line, optional)", models, {path: `${path}.models`, help: "Empty: the built-in Gemini list and any gemini-* name."}),
      field("Proxy URL (optional)", proxyUrl, {path: `${path}.proxyUrl`}));
    getters.push((x) => { const m = parseModels(models.value, e.models); if (m.length) x.models = m; else delete x.models; });
  }
  function set(x, k, v) { if (v) x[k] = v; else delete x[k]; }
  function collect() {
    const x = clone(e);
    x.apiKey = keyInput.value.trim();
    set(x, "baseUrl", base.value.trim()); set(x, "proxyUrl", proxyUrl.value.trim());
    for (const g of getters) g(x);
    return x;
  }
  const testOut = h("div", {class: "muted"});
  body.push(testOut);
  const title = editing ? `Edit ${entryTitle(list, e)}` : {claudeApiKeys: "Add Claude API Key", ampOpenaiProviders: "Add OpenAI-Compatible Provider", geminiApiKeys: "Add Gemini API Key"}[list];
  const submit = editing ? "Save" : {claudeApiKeys: "Add Key", ampOpenaiProviders: "Add Provider", geminiApiKeys: "Add Key"}[list];
  modal(title, body, [h("button", {type: "button", id: "f-cancel", onclick: closeModal}, "Cancel"),
    h("div", {class: "actions row"}, h("button", {type: "button", id: "f-test", onclick: () => testEntry(list, collect(), testOut)}, "Test"),
      h("button", {type: "button", class: "primary", id: "f-submit", onclick: async () => {
        for (const el of document.querySelectorAll(".modal .error")) el.textContent = "";
        const entry = collect();
        const keys = !editing && !bulk.classList.contains("hidden") ? bulk.value.split("\n").map((k) => k.trim()).filter(Boolean) : null;
        const ok = await save((c) => {
          c[list] = c[list] || [];
          if (editing) c[list][index] = entry;
          else if (keys && keys.length) for (const k of keys) c[list].push(Object.assign(clone(entry), {apiKey: k}));
          else c[list].push(entry);
        }, editing ? "Saved. The proxy uses it now." : "Added. The proxy uses it now.");
        if (ok) { closeModal(); render(); }
      }}, submit))]);
}

/* -- Models ---------------------------------------------------------------------------- */
function drawModels() {
  const routesBox = h("div", {class: "panel scroll"}, h("p", {class: "muted"}, "Loading…"));
  api("GET", "/v0/management/routes").then((data) => {
    routesBox.replaceChildren(h("h3", {}, "Where each model name goes"), data.routes.length ? h("table", {id: "routes"},
      h("tr", {}, ["model", "provider", "entry", "upstream model", "mapping"].map((c) => h("th", {}, c))),
      data.routes.map((r) => h("tr", {}, h("td", {}, h("code", {}, r.model)), h("td", {}, r.provider), h("td", {class: "muted"}, r.entry),
        h("td", {}, h("code", {}, r.upstream_model)), h("td", {class: "muted"}, r.mapping || ""))))
      : h("p", {}, "No model names yet: add a provider under API Keys."));
  }).catch((e) => routesBox.replaceChildren(h("p", {class: "bad"}, e.message)));
  const rows = h("div", {id: "mappings"});
  const addRow = (m) => {
    const from = h("input", {class: "m-from", value: m ? m.from || m.alias || "" : "", placeholder: "claude-haiku-*"});
    const to = h("input", {class: "m-to", value: m ? m.to || m.name || "" : "", placeholder: "a model name you have"});
    const on = h("input", {type: "checkbox", class: "m-on", checked: !m || m.enabled !== false, title: "enabled"});
    const row = h("div", {class: "row"}, from, h("span", {class: "muted"}, "→"), to, on, h("button", {class: "danger", onclick: () => row.remove()}, "✕"));
    row.original = m; rows.append(row);
  };
  for (const m of S.cfg.ampModelMappings || []) addRow(m);
  const mappings = h("div", {class: "panel"}, h("h3", {}, "Model mappings"),
    h("p", {class: "muted"}, "Send a requested name to another model, possibly at another provider. * matches anything: claude-haiku-* catches Claude Code's background calls. An exact name wins over a pattern."),
    rows, h("div", {class: "error", "data-error": "ampModelMappings"}),
    h("div", {class: "buttons"}, h("button", {onclick: () => addRow(null)}, "+ Add mapping"),
      h("button", {class: "primary", id: "save-mappings", disabled: !S.writable, onclick: () => save((c) => {
        c.ampModelMappings = [...rows.children].map((row) => {
          const from = row.querySelector(".m-from").value.trim(), to = row.querySelector(".m-to").value.trim();
          if (!from || !to) return null;
          const out = row.original ? clone(row.original) : {};
          delete out.name; delete out.alias;
          return Object.assign(out, {from, to, enabled: row.querySelector(".m-on").checked});
        }).filter(Boolean);
      }, "Mappings saved.").then((ok) => ok && render())}, "Save mappings")));
  return [routesBox, mappings];
}

/* -- Logs -------------------------------------------------------------------------------- */
function drawLogs() {
  const level = h("select", {id: "log-level", onchange: () => { S.logLevel = level.value; startTail(); }},
    ["DEBUG", "INFO", "WARNING", "ERROR"].map((l) => h("option", {value: l}, l)));
  level.value = S.logLevel;
  const text = h("input", {id: "log-text", value: S.logText, placeholder: "filter text", oninput: () => { S.logText = text.value; startTail(); }});
  const lines = h("pre", {id: "log"});
  const requests = h("div", {class: "panel scroll"}, h("p", {class: "muted"}, "Loading…"));
  setTimeout(() => { startTail(); loadRequests(requests); }, 0);
  return [h("div", {class: "panel"}, h("div", {class: "row"}, level, text,
      h("button", {onclick: () => { lines.textContent = ""; }}, "Clear")),
    h("p", {class: "muted"}, "Live: new lines appear as they are logged (secrets masked). DEBUG lines appear when Debug Mode is on (Settings)."),
    lines),
    h("div", {class: "row"}, h("h3", {}, "Requests"), h("button", {onclick: () => loadRequests(requests)}, "Refresh")), requests];
}

async function loadRequests(box) {
  try {
    const data = await api("GET", "/v0/management/requests");
    if (!data.requests.length) { box.replaceChildren(h("p", {class: "muted"}, "No requests yet.")); return; }
    const detail = h("pre", {class: "hidden", id: "request-detail"});
    box.replaceChildren(h("table", {id: "requests"}, h("tr", {}, ["time", "format", "model → upstream", "provider", "status", "latency", "first byte", "tokens in/out"].map((c) => h("th", {}, c))),
      data.requests.map((r) => h("tr", {onclick: () => { detail.textContent = JSON.stringify(r, null, 2); detail.classList.remove("hidden"); }},
        h("td", {}, r.time.slice(11, 19)), h("td", {}, r.format), h("td", {}, `${r.model || "–"} → ${r.upstream_model || "–"}`),
        h("td", {}, r.provider || "–"), h("td", {class: r.status >= 400 || !r.status ? "bad" : "ok"}, r.status || "aborted"),
        h("td", {}, ms(r.latency_ms)), h("td", {}, ms(r.ttfb_ms)), h("td", {}, `${fmt(r.input_tokens)} / ${fmt(r.output_tokens)}`)))), detail);
  } catch (e) { box.replaceChildren(h("p", {class: "bad"}, e.message)); }
}

function stopTail() { if (S.tail) { S.tail.abort(); S.tail = null; } }

async function startTail() {
  stopTail();
  const ctl = new AbortController(); S.tail = ctl;
  const out = $("#log"); if (!out) return;
  out.textContent = "";
  const q = new URLSearchParams({level: S.logLevel, q: S.logText});
  try {
    const first = await api("GET", `/v0/management/logs?${q}`);
    for (const line of first.lines) appendLine(out, line);
    const resp = await fetch(`/v0/management/logs/stream?${q}`, {headers: {"X-Management-Key": S.key}, signal: ctl.signal});
    const reader = resp.body.getReader(), dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buf += dec.decode(value, {stream: true});
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const block = buf.slice(0, cut); buf = buf.slice(cut + 2);
        if (block.startsWith("data: ")) appendLine(out, JSON.parse(block.slice(6)));
      }
    }
  } catch (e) { if (e.name !== "AbortError" && e.message !== "locked") out.append(`(live tail stopped: ${e.message})\n`); }
}

function appendLine(out, line) {
  const stick = out.scrollTop + out.clientHeight >= out.scrollHeight - 20;
  const tag = line.worker ? ` [${line.worker}]` : "";
  const el = h("span", {class: line.level === "ERROR" ? "bad" : line.level === "WARNING" ? "warn" : line.level === "DEBUG" ? "muted" : ""},
    `${new Date(line.time * 1000).toLocaleTimeString()} ${line.level}${tag} ${line.message}\n`);
  out.append(el);
  while (out.childNodes.length > 2000) out.firstChild.remove();
  if (stick) out.scrollTop = out.scrollHeight;
}

/* -- Usage ------------------------------------------------------------------------------- */
function drawUsage() {
  const box = h("div", {}, h("p", {class: "muted"}, "Loading…"));
  const ranges = h("div", {class: "tabs"}, ["24h", "7d", "30d", "all"].map((r) =>
    h("button", {class: S.usageRange === r ? "on" : "", "data-range": r, onclick: () => { S.usageRange = r; render(); }}, r === "all" ? "All" : r)));
  api("GET", `/v0/management/usage?range=${S.usageRange}`).then((u) => {
    const table = (title, group, id) => h("div", {class: "panel scroll"}, h("h3", {}, title),
      Object.keys(group).length ? h("table", {id}, h("tr", {}, ["name", "requests", "errors", "success", "tokens in", "out", "cached", "reasoning", "latency p50 / p95", "first byte p50 / p95"].map((c) => h("th", {}, c))),
        Object.entries(group).map(([name, s]) => h("tr", {}, h("td", {}, h("code", {}, name)), h("td", {}, fmt(s.requests)),
          h("td", {class: Object.keys(s.errors).length ? "bad" : ""}, Object.entries(s.errors).map(([k, v]) => `${k}: ${v}`).join(", ") || "–"),
          h("td", {}, pct(s.success_rate)), h("td", {}, fmt(s.input_tokens)), h("td", {}, fmt(s.output_tokens)), h("td", {}, fmt(s.cached_tokens)),
          h("td", {}, fmt(s.reasoning_tokens)), h("td", {}, `${ms(s.latency_ms.p50)} / ${ms(s.latency_ms.p95)}`), h("td", {}, `${ms(s.ttfb_ms.p50)} / ${ms(s.ttfb_ms.p95)}`))))
        : h("p", {class: "muted"}, "No requests in this range."));
    box.replaceChildren(h("div", {class: "cards"}, h("div", {class: "card"}, h("span", {class: "muted"}, "Requests"), h("b", {id: "usage-total"}, fmt(u.total.requests))),
      h("div", {class: "card"}, h("span", {class: "muted"}, "Success"), h("b", {}, pct(u.total.success_rate))),
      h("div", {class: "card"}, h("span", {class: "muted"}, "Tokens in / out"), h("b", {}, `${fmt(u.total.input_tokens)} / ${fmt(u.total.output_tokens)}`))),
      table("Per model", u.models, "usage-models"), table("Per provider", u.providers, "usage-providers"),
      h("p", {class: "muted"}, u.persisted ? "Kept across restarts in usage.jsonl beside the config file." : "Not saved to disk: it starts again with the proxy."));
  }).catch((e) => box.replaceChildren(h("p", {class: "bad"}, e.message)));
  return [ranges, box];
}

/* -- Settings ---------------------------------------------------------------------------- */
const SETTING_LABELS = {debug: "Debug Mode", requestLogging: "Request Logging", loggingToFile: "Log to File",
  logsMaxTotalSizeMb: "Log folder cap (MB)", requestRetry: "Request retries", routingStrategy: "Routing strategy",
  proxyUrl: "Outbound proxy URL", proxyUsername: "Outbound proxy user", proxyPassword: "Outbound proxy password",
  useSystemProxy: "Use the system proxy", streamKeepaliveSeconds: "Stream keep-alive (s)",
  firstByteCommitSeconds: "First-byte commit (s)", connectTimeoutSeconds: "Connect timeout (s)",
  firstByteTimeoutSeconds: "First-byte timeout (s)", readTimeoutSeconds: "Read timeout (s)", maxBodyMb: "Largest request (MB)",
  proxyApiKey: "Proxy key (clients)", apiKeys: "More client keys", managementKey: "Management key",
  allowRemoteManagement: "Allow remote management", port: "Port", host: "Listen address"};
const SETTING_ORDER = ["debug", "requestLogging", "loggingToFile", "logsMaxTotalSizeMb", "requestRetry", "routingStrategy"];

function drawSettings() {
  const inputs = {};
  const ordered = [...S.settings].sort((a, b) => (SETTING_ORDER.includes(a.key) ? SETTING_ORDER.indexOf(a.key) : 99) -
    (SETTING_ORDER.includes(b.key) ? SETTING_ORDER.indexOf(b.key) : 99));
  const rows = ordered.map((s) => {
    const id = `s-${s.key}`;
    const value = s.key in S.cfg ? S.cfg[s.key] : s.default;
    let input, wrap;
    if (s.kind === "bool") { input = h("input", {id, type: "checkbox", checked: !!value}); }
    else if (s.choices.length) { input = h("select", {id}, s.choices.map((c) => h("option", {value: c}, c))); input.value = value; }
    else if (s.kind === "list") { input = h("textarea", {id, value: (value || []).join("\n"), placeholder: "one per line"}); }
    else if (s.secret) { [input, wrap] = secretInput(id, value); }
    else { input = h("input", {id, value: value === null || value === undefined ? "" : value, inputMode: s.kind === "str" ? "text" : "decimal"}); }
    inputs[s.key] = input;
    const notes = [s.live ? null : h("span", {class: "badge"}, "applies after a restart"),
      s.override !== null && s.override !== undefined ? h("span", {class: "badge warn"}, `set on the command line (${JSON.stringify(s.override)}): it wins over this value`) : null];
    const name = [SETTING_LABELS[s.key] || s.key, " ", h("code", {class: "muted"}, s.key)];
    const label = s.kind === "bool" ? h("label", {for: id}, input, " ", name) : h("label", {for: id}, name);
    return h("div", {class: "field", "data-setting": s.key}, label, s.kind === "bool" ? null : (wrap || input),
      h("div", {class: "help"}, s.help, " ", notes), h("div", {class: "error", "data-error": s.key}));
  });
  const form = h("div", {class: "panel"}, rows, h("div", {class: "buttons"}, h("span"),
    h("button", {class: "primary", id: "save-settings", disabled: !S.writable, onclick: () => save((c) => {
      for (const s of S.settings) {
        const input = inputs[s.key];
        let v;
        if (s.kind === "bool") v = input.checked;
        else if (s.kind === "list") v = input.value.split("\n").map((x) => x.trim()).filter(Boolean);
        else if (s.kind === "int" || s.kind === "float") { if (input.value.trim() === "") { delete c[s.key]; continue; } v = Number(input.value); if (Number.isNaN(v)) v = input.value; }
        else v = input.value;
        const old = s.key in c ? c[s.key] : s.default;
        if (JSON.stringify(v) !== JSON.stringify(old)) c[s.key] = v;
      }
    }, "Settings saved.").then((ok) => ok && render())}, "Save settings")));
  const raw = h("textarea", {id: "raw-json", spellcheck: false});
  raw.style.minHeight = "420px";
  const rawBox = h("div", {class: "hidden"}, raw, h("div", {class: "error", id: "raw-error", "data-error": ""}),
    h("div", {class: "buttons"}, h("button", {onclick: () => { rawBox.classList.add("hidden"); openRaw.classList.remove("hidden"); S.editing = false; }}, "Close"),
      h("button", {class: "primary", id: "save-raw", disabled: !S.writable, onclick: () => {
        let doc;
        try { doc = JSON.parse(raw.value); } catch (e) { $("#raw-error").textContent = `Not valid JSON: ${e.message}`; return; }
        if (!doc || typeof doc !== "object" || Array.isArray(doc)) { $("#raw-error").textContent = "The config must be a JSON object."; return; }
        save((c) => { for (const k of Object.keys(c)) delete c[k]; Object.assign(c, doc); }, "Config file saved.").then((ok) => { if (ok) { S.editing = false; render(); } });
      }}, "Validate and save")));
  const openRaw = h("button", {id: "open-raw", onclick: () => { raw.value = JSON.stringify(S.cfg, null, 2); rawBox.classList.remove("hidden"); openRaw.classList.add("hidden"); S.editing = true; }}, "Edit the whole file as JSON (shows every key in full)");
  return [form, h("div", {class: "panel"}, h("h3", {}, "config.json"), h("p", {class: "muted"}, S.state ? S.state.config.path : ""), openRaw, rawBox)];
}

/* -- start ------------------------------------------------------------------------------- */
function theme(dark) { document.documentElement.classList.toggle("dark", dark); }
theme(localStorage.getItem("proxypal-theme") ? localStorage.getItem("proxypal-theme") === "dark" : matchMedia("(prefers-color-scheme: dark)").matches);
$("#theme").addEventListener("click", () => { const dark = !document.documentElement.classList.contains("dark"); theme(dark); localStorage.setItem("proxypal-theme", dark ? "dark" : "light"); });
for (const p of PAGES) $("#nav").append(h("button", {"data-page": p, onclick: () => show(p)}, PAGE_TITLES[p]));
$("#login-go").addEventListener("click", unlock);
$("#login-key").addEventListener("keydown", (ev) => { if (ev.key === "Enter") unlock(); });
$("#logout").addEventListener("click", () => lock(""));
window.addEventListener("hashchange", () => { if (S.cfg && location.hash.slice(1) !== S.page) show(location.hash.slice(1)); });
if (S.key) { $("#login-key").value = S.key; unlock(); } else lock("");
</script>
</body>
</html>
"""


def _csp_source(page: str, tag: str) -> str:
    body = re.search(f"<{tag}>(.*?)</{tag}>", page, re.S).group(1)   # type: ignore
    return "'sha256-" + base64.b64encode(hashlib.sha256(body.encode("utf-8")).digest()).decode() + "'"


MANAGEMENT_PAGE_BYTES = MANAGEMENT_PAGE.encode("utf-8")
PAGE_HEADERS = MANAGEMENT_HEADERS + (("Content-Security-Policy", (
    f"default-src 'none'; script-src {_csp_source(MANAGEMENT_PAGE, 'script')}; "
    f"style-src {_csp_source(MANAGEMENT_PAGE, 'style')}; connect-src 'self'; img-src 'self' data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")),)


# -- 10.7 The server ------------------------------------------------------------------

class CooldownFile:
    """The cooldowns of every process on one config folder (--workers): one learned here
    is written to state.json (replaced atomically, expired ones dropped), and the file is
    read back when it changes, so a key one worker saw rate-limited rests in all."""

    def __init__(self, path: str, balancer: "Balancer") -> None:
        self.path, self.balancer, self.stamp = path, balancer, (0, 0)
        balancer.shared = self.share

    def _read(self) -> Dict[str, Any]:
        try:
            with open(self.path, "rb") as f:
                state = loads_json(f.read())
        except (OSError, ValueError):
            return {}
        known = state.get("cooldowns") if isinstance(state, dict) else None
        now = time.time()
        return {k: v for k, v in (known if isinstance(known, dict) else {}).items()
                if isinstance(v, dict) and _is_number(v.get("until")) and v["until"] > now}

    def share(self, key: str, cool: "Cooldown") -> None:
        now = time.time()
        try:
            with _FolderLock(os.path.dirname(self.path)):
                cooldowns = self._read()
                cooldowns[key] = {"until": round(now + cool.until - self.balancer.clock(), 3),
                                  "status": cool.status, "reason": cool.reason}
                ConfigStore.write_file(self.path, dumps({"cooldowns": cooldowns}))
        except ProxypalError as exc:
            log.debug("cooldown not shared with other workers: %s", exc.message)

    def learn(self) -> None:
        try:
            info = os.stat(self.path)
        except OSError:
            return
        if (info.st_mtime_ns, info.st_size) == self.stamp:
            return
        self.stamp, now = (info.st_mtime_ns, info.st_size), time.time()
        for key, cool in self._read().items():
            status = cool.get("status")
            self.balancer.learn(key, cool["until"] - now, status if isinstance(status, int) else 0,
                                str(cool.get("reason") or ""))



def request_log_entry(record: Record, now: Optional[float] = None,
                      wall: Optional[float] = None) -> Dict[str, Any]:
    """The request log line, as a dict (pure given the two clocks)."""
    now = time.monotonic() if now is None else now
    wall = time.time() if wall is None else wall
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(wall)) + f".{int(wall % 1 * 1000):03d}",
        "id": record.id, "format": record.fmt, "method": record.method,
        "path": printable(record.path), "model": printable(record.model) or None,
        "routed": record.routed or None, "upstream_model": record.upstream_model or None,
        "provider": record.provider or None, "status": record.status,
        "upstream_status": record.upstream_status,
        "latency_ms": round((now - record.t0) * 1000, 1),
        "ttfb_ms": round(record.ttfb * 1000, 1) if record.ttfb is not None else None,
        "input_tokens": record.tokens[0], "output_tokens": record.tokens[1],
        "cached_tokens": record.tokens[2], "reasoning_tokens": record.tokens[3],
        "error": printable(record.error, 300) or None,
    }


def guess_path(buf: bytes) -> str:
    """The path of a request whose head could not be parsed, to answer in its format."""
    match = re.match(rb"[A-Z]{3,7} (?:https?://[^/ ?\r\n]*)?(/[^ ?\r\n]{0,200})", buf)
    return match.group(1).decode("latin-1") if match else "/"


def check_target(req: Request, own_host: str) -> None:
    """Origin-form only, or absolute-form naming this server: never an open proxy."""
    if req.method == "CONNECT":
        raise WireError("CONNECT is refused: proxypal is an API proxy, not a forward proxy", 405)
    if req.target.startswith(("http://", "https://")):
        parts = urllib.parse.urlsplit(req.target)
        if not (is_loopback(parts.hostname or "") or parts.hostname == own_host):
            raise WireError(f"absolute-form request for another host "
                            f"{printable(parts.hostname or '', 60)!r} is refused: proxypal "
                            "is not a forward proxy")
    elif not req.target.startswith("/") and not (req.method == "OPTIONS" and req.target == "*"):
        raise WireError(f"invalid request target {printable(req.target, 60)!r}")


class Listener:
    """The listening socket. Windows' proactor closes a listening socket for good when one
    accept fails (WinError 64, ERROR_NETNAME_DELETED, from a client that reset before it
    was accepted: CPython gh-93821), and the proxy would seem to run while it answers no
    one: check() notices and listens again on the same port, every CONFIG_POLL_SECONDS."""

    def __init__(self, on_connection: Callable[..., Any]) -> None:
        self.on_connection = on_connection
        self.server: Optional[asyncio.AbstractServer] = None
        self.host, self.port = "", 0
        self.error = ""                    # why listening again failed: the next check retries
        self.reopening: Optional[asyncio.Task] = None
        self.closed = self.reuse_port = False

    async def open(self, host: str, port: int, reuse_port: bool = False,
                   sock: Optional[socket.socket] = None) -> None:
        where: Dict[str, Any] = {"sock": sock} if sock is not None else \
            {"host": host, "port": port, "reuse_port": reuse_port or None}
        self.server = await asyncio.start_server(self.on_connection, limit=MAX_HEADER_BLOCK * 2,
                                                 **where)
        self.host, self.port = host, self.server.sockets[0].getsockname()[1]
        self.reuse_port = reuse_port

    def check(self) -> None:
        server = self.server
        if server is not None and not self.reopening and not self.closed and (
                self.error or any(s.fileno() == -1 for s in server.sockets)):
            self.reopening = asyncio.get_running_loop().create_task(self._reopen(server))

    async def _reopen(self, old: asyncio.AbstractServer) -> None:
        with contextlib.suppress(ValueError, OSError):   # (its socket is closed already)
            old.close()
        try:
            await self.open(self.host, self.port, self.reuse_port)
            if self.closed:                # (the proxy stopped meanwhile)
                self.close()
                return
            log.warning("the listening socket on port %d was closed (an accept failed); "
                        "listening again", self.port)
            self.error = ""
        except OSError as exc:
            if repr(exc) != self.error:
                log.error("the listening socket on port %d was closed and cannot be opened "
                          "again (tried again every %gs): %s", self.port, CONFIG_POLL_SECONDS, exc)
            self.error = repr(exc)
        finally:
            self.reopening = None

    def close(self) -> None:
        self.closed = True
        if self.server is not None:
            with contextlib.suppress(ValueError, OSError):
                self.server.close()


class Server:
    """A running proxy. Create with `await start(config)`; stop with `await close()`."""

    def __init__(self, config: Config, clock: Callable[[], float] = time.monotonic,
                 environ: Optional[Dict[str, str]] = None, worker: str = "", run: str = ""):
        check_exposure(config, config.host)
        # Without a managementKey (a config built in code) the page still works, with a
        # key made for this run: main() makes and saves one for a config file.
        self.management_key = config.management_key or new_management_key()
        config = dataclasses.replace(config, management_key=self.management_key)
        self.environ = dict(os.environ if environ is None else environ)
        self.setup = Setup(config, Router(config), make_upstreams(config, self.environ))
        self.balancer = Balancer(clock)
        self.client = UpstreamClient()
        self.alarms = Alarms()
        self.secret_filter = SecretFilter()
        self.secret_filter.secrets = config.secrets
        self.started_at = int(time.time())
        folder = os.path.dirname(os.path.abspath(config.path)) if config.path else ""
        self.usage = UsageStore(folder, run=run)
        # Cooldowns reach the other processes on this config folder through a small file.
        self.cooldown_file = CooldownFile(os.path.join(folder, STATE_FILE), self.balancer) \
            if folder else None
        # --workers: the page's log lines and requests go through one journal file
        self.journal = Journal(worker, os.path.join(folder, "logs", "journal.jsonl")
                               if worker and folder else "")
        self.reload_error = ""
        self._store = ConfigStore(config.path) if config.path else None
        self._stamp = (0, 0)
        self._flusher: Optional[asyncio.Task] = None
        self._requests = 0
        self._id_prefix = f"{os.getpid():x}-"
        self.host, self.port = config.host, config.port
        self.closing = False
        self.overrides: Dict[str, Any] = {}    # command-line values that beat the file
        self._watch: Optional[asyncio.Task] = None
        self._guard: Optional[asyncio.Task] = None
        self.listener = Listener(self._on_connection)
        self._connections: Dict[asyncio.Task, Connection] = {}

    @property
    def config(self) -> Config:
        return self.setup.config

    @property
    def router(self) -> "Router":
        return self.setup.router

    # -- lifecycle ---------------------------------------------------------------
    async def listen(self, host: str, port: int, reuse_port: bool = False,
                     sock: Optional[socket.socket] = None) -> None:
        check_exposure(self.config, host)
        await self.listener.open(host, port, reuse_port, sock)
        self.host, self.port = host, self.listener.port
        log.addFilter(self.secret_filter)
        loop = asyncio.get_running_loop()
        if sock is None:                   # (workers share one socket: Linux, no proactor)
            self._guard = loop.create_task(self._every(CONFIG_POLL_SECONDS, self.listener.check))
        self.journal.loop, self.journal.changed = loop, asyncio.Event()
        log.addHandler(self.journal)
        if self.config.path:
            self._stamp = self._config_stamp()
            self._watch = loop.create_task(self._every(CONFIG_POLL_SECONDS, self._watch_config))
            self._flusher = loop.create_task(self._every(USAGE_FLUSH_SECONDS, self._flush_usage))

    def config_store(self) -> Optional[ConfigStore]:
        """The writer of the config file this proxy runs on; None when built in code."""
        return self._store
    def apply(self, config: Config) -> None:
        """Switch to a new config: requests already running finish on the old one."""
        config = dataclasses.replace(config, **self.overrides)
        if not config.management_key:      # removed from the file: the page keeps working
            config = dataclasses.replace(config, management_key=self.management_key)
        self.management_key = config.management_key
        check_exposure(config, self.host)
        self.setup = Setup(config, Router(config), make_upstreams(config, self.environ))
        self.secret_filter.secrets = config.secrets
        if LOGGING_OWNED:                  # logging is main()'s: only adjust what it set up
            log.setLevel(logging.DEBUG if config.debug else logging.INFO)

    def apply_saved(self, config: Config) -> None:
        """A config the page saved: applied now, not when the file watcher sees it."""
        self.apply(config)
        self.reload_error = ""
        self._stamp = self._config_stamp()

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
            self.reload_error = exc.message
            log.error("config reload failed, keeping the running config: %s", exc.message)
            return False
        except Exception:                  # a bug must not stop future reloads
            log.exception("config reload failed, keeping the running config")
            return False
        self.reload_error = ""
        log.info("config reloaded from %s: %d providers, %d models", config.path,
                 len(config.credentials), len(self.router.names()))
        return True

    def _config_stamp(self) -> Tuple[int, int]:
        try:
            info = os.stat(self.config.path)
            return info.st_mtime_ns, info.st_size
        except OSError:
            return 0, 0

    @staticmethod
    async def _every(seconds: float, step: Callable[[], None]) -> None:
        """Run step every `seconds` while the server runs. A step that fails is logged
        (once while it fails the same way) and run again next time: a background task
        that died would end config reloads or the usage counts for good."""
        failing = ""
        while True:
            await asyncio.sleep(seconds)
            try:
                step()
                failing = ""
            except Exception as exc:
                if repr(exc) != failing:
                    log.exception("%s failed; tried again every %gs", step.__name__, seconds)
                failing = repr(exc)

    def _watch_config(self) -> None:
        """Poll the config file's mtime and size (no watcher dependency), and the
        cooldowns other workers shared."""
        now = self._config_stamp()
        if now != self._stamp and now != (0, 0):
            self._stamp = now
            self.reload()
        if self.cooldown_file is not None:
            self.cooldown_file.learn()

    def _flush_usage(self) -> None:
        self.usage.flush()
        if self.journal.path:
            self.journal.rotate()

    async def close(self, grace: float = SHUTDOWN_GRACE) -> None:
        """Stop accepting, let in-flight requests finish for up to `grace` s, then stop."""
        self.closing = True
        for task in (self._watch, self._flusher, self._guard):
            if task is not None:
                task.cancel()
        self.listener.close()
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
        self.alarms.close()
        self.usage.flush()
        log.removeFilter(self.secret_filter)
        log.removeHandler(self.journal)
        self.journal.close()
        self.usage.close()

    # -- connections -------------------------------------------------------------
    async def _on_connection(self, reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        conn = Connection(reader, writer)
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
    async def _linger_close(conn: "Connection") -> None:
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

    def _call(self, conn: "Connection", req: Request) -> Call:
        self._requests += 1
        fmt = format_of_path(req.path)
        record = Record(f"{self._id_prefix}{self._requests:x}", fmt, req.method, req.path,
                        time.monotonic())
        return Call(conn, req, fmt, self.setup, record, keep_alive=req.keep_alive,
                    on_answered=self._log)

    async def _serve_connection(self, conn: "Connection") -> None:
        first = True
        while not self.closing:
            call = None
            try:
                req = await conn.read_head(first)
                if req is None:
                    return
                conn.busy = True
                call = self._call(conn, req)
                req.framing = body_framing(req)      # refused before any route looks at it
                call.has_body = req.framing[0] != "none"
                await self.handle(call)
            except WireError as exc:
                if call is None:
                    path = guess_path(conn.buf)
                    call = self._call(conn, Request("GET", path, path, "", "HTTP/1.1", {}, [], False))
                call.keep_alive = False
                if not call.started:
                    conn.write_reply(call, error_reply(call, exc))
            finally:
                conn.busy = False
            if call is not None:           # (answers are counted before their last write:
                self._log(call)            # this catches the calls that ended otherwise)
            try:
                await conn.drain()
            except ConnectionError:
                if call is not None:
                    call.keep_alive = False
                conn.eof = True
            if not call or not call.keep_alive or (conn.eof and not conn.buf):
                return
            first = False

    # -- the request pipeline ----------------------------------------------------
    async def handle(self, call: Call) -> None:
        req = call.req
        try:
            check_target(req, self.host)
            if self.closing:
                call.keep_alive = False
            if req.method == "OPTIONS":
                return call.conn.write_reply(call, preflight(call))
            endpoint, params = endpoint_for(req.method, strip_amp_prefix(req.path))
            GATES[endpoint.gate](req, call.config)
            reply = await endpoint.handler(self, call, dict(params, op=endpoint.op))
            if reply is not None:
                call.conn.write_reply(call, reply)
        except WireError:
            raise
        except ProxypalError as exc:
            fail_call(call, exc)
        except RecursionError:             # a body nested just under json's own limit
            fail_call(call, ClientError("request body nests too deeply to be a real API "
                                         "request"))
        except Exception as exc:           # a bug: answer 500 and keep serving
            log.exception("unexpected error handling %s %s", req.method, printable(req.path))
            fail_call(call, ProxypalError(f"internal error in proxypal ({type(exc).__name__}); "
                                           "see the proxy's log", 500))

    # -- records -----------------------------------------------------------------
    def _log(self, call: Call) -> None:
        """Count a finished call once: usage (on disk before the answer's last bytes go
        out, so an answer a client got is never lost), the journal, the request log."""
        if call.logged:
            return
        call.logged = True
        record = call.record
        now = time.monotonic()
        latency = now - record.t0
        if record.routed:                  # (not names no provider serves: clients choose those)
            self.usage.record(record, latency)
        if not record.path.startswith("/v0/management/"):
            self.journal.add_request(record, now, time.time())
        if call.config.request_logging and not record.path.startswith("/v0/management/"):
            # (the page's own polling would fill the log: it is left out)
            log.info("%s", json.dumps(request_log_entry(record, now), ensure_ascii=False))
        elif log.isEnabledFor(logging.DEBUG):
            log.debug("%s %s -> %d %s in %.1f ms", record.method, printable(record.path),
                      record.status, record.provider or "-", latency * 1000)


async def _stop(task: "asyncio.Task[Any]") -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


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


def shown_path(path: str) -> str:
    """A file's path as printed, with where the file really is when that differs: the
    Microsoft Store's Python keeps what it writes under %APPDATA% in a folder of its own
    package (LocalCache\\Roaming) that Notepad and other programs do not see; realpath()
    finds it (docs.python.org/3/using/windows.html, "Known issues")."""
    if not path or not os.path.exists(path):
        return path
    real = os.path.realpath(path)
    same = os.path.normcase(real) == os.path.normcase(os.path.abspath(path))
    return path if same else f"{path} (the file is at {real})"


def banner(server: Server, new_key: str = "") -> str:
    """What a person starting the proxy needs: where it listens, what it read, the page
    (with its key when it was made just now: printed this once), the client lines."""
    config = server.config
    router = server.router
    host = server.host if ":" not in server.host else f"[{server.host}]"
    base = f"http://{host}:{server.port}"
    local = "127.0.0.1" if server.host in ("0.0.0.0", "::", "") else host
    page = f"http://{local}:{server.port}/"
    if new_key:
        page += f"  (management key: {new_key}" + (
            f"; saved as managementKey in {config.path})" if config.loaded
            else "; not saved: it works until the proxy stops)")
    else:
        page += f"  (management key: managementKey in {config.path or 'your config'})"
    shown = shown_path(config.path) or "given in code"
    if config.loaded and not config.credentials:
        where = f"config: {shown} (no providers yet: add one on the page, " \
                "or in the file)"
    elif config.loaded:
        where = f"config: {shown} ({len(config.credentials)} providers, " \
                f"{len(router.names())} models)"
    else:
        where = (f"config: {config.path or '(none)'} not found: no providers yet; "
                 "create it (python proxypal.py init, or see README); it is picked up "
                 "within seconds")
    key = config.proxy_api_key if config.proxy_api_key == DEFAULT_LOCAL_KEY else "<your proxyApiKey>"
    return "\n".join([
        f"proxypal {__version__} listening on {base}",
        where,
        f"management page: {page}",
        *client_lines(base, key),
    ])


def client_lines(base: str, key: str, windows: bool = os.name == "nt") -> List[str]:
    """The lines that point clients at the proxy, in the shell of this system (cmd.exe
    and PowerShell have no `export`)."""
    if windows:                            # (single quotes: PowerShell expands $ in double)
        key = "'" + key.replace("'", "''") + "'"
        return [f"  $env:ANTHROPIC_BASE_URL = '{base}'; $env:ANTHROPIC_AUTH_TOKEN = {key}",
                f"  $env:OPENAI_BASE_URL = '{base}/v1'; $env:OPENAI_API_KEY = {key}"]
    return [f"  export ANTHROPIC_BASE_URL={base} ANTHROPIC_AUTH_TOKEN={key}",
            f"  export OPENAI_BASE_URL={base}/v1 OPENAI_API_KEY={key}"]


def _stop_on_ctrl_c(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> Any:
    """Where the loop has no add_signal_handler (Windows), a KeyboardInterrupt would leave
    it, and asyncio.run (before 3.11) cancels every task, in-flight requests included. A
    plain handler sets `stop` instead (the proactor wakes on signals); a second Ctrl-C
    interrupts at once. Returns the handler it replaced (None when it could not)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def interrupt(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        loop.call_soon_threadsafe(stop.set)
    with contextlib.suppress(ValueError, OSError):
        return signal.signal(signal.SIGINT, interrupt)
    return None


def serve(config: Any = None, host: Optional[str] = None, port: Optional[int] = None,
          print_banner: bool = True, overrides: Optional[Dict[str, Any]] = None,
          sock: Optional[socket.socket] = None, note: str = "", reuse_port: bool = False,
          new_key: str = "", worker: str = "", run: str = "") -> int:
    """Run the proxy until SIGINT/SIGTERM (Ctrl-C), then stop gracefully: stop accepting,
    let in-flight requests finish for up to SHUTDOWN_GRACE seconds. SIGHUP reloads the
    config file at once (it is also polled). Returns 0."""
    async def running() -> None:
        cfg = _as_config(config)
        server = Server(cfg, worker=worker, run=run)
        server.overrides = dict(overrides or {})
        await server.listen(cfg.host if host is None else host,
                            cfg.port if port is None else port, reuse_port=reuse_port, sock=sock)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        previous: Any = None
        for name, action in (("SIGINT", stop.set), ("SIGTERM", stop.set),
                             ("SIGHUP", server.reload)):
            try:
                loop.add_signal_handler(getattr(signal, name), action)
            except (NotImplementedError, AttributeError, RuntimeError, ValueError):
                if name == "SIGINT":       # (Windows)
                    previous = _stop_on_ctrl_c(loop, stop)
        if print_banner:
            print(banner(server, new_key) + (f"\n{note}" if note else ""), flush=True)
        elif reuse_port:
            log.info("worker %d serving on port %d", os.getpid(), server.port)
        try:
            await stop.wait()
        finally:
            log.info("stopping: letting in-flight requests finish (up to %gs)", SHUTDOWN_GRACE)
            try:
                await server.close()
            finally:
                if previous is not None:
                    signal.signal(signal.SIGINT, previous)
    try:
        asyncio.run(running())
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
    """Write STARTER_CONFIG at `path` through ConfigStore; an existing file is never
    touched, and the file appears whole or not at all."""
    if not ConfigStore(path).create(STARTER_CONFIG):
        print(f"proxypal: {path} already exists; init never overwrites a config. Edit it, or "
              "pass --config with a new path.", file=sys.stderr)
        return 1
    print(f"wrote {shown_path(path)}\nnext: copy a provider from \"_templates\" into its list, add your "
          "key, then run: python proxypal.py")
    return 0


def run_check(config: Config, timeout: float, as_json: bool, environ: Dict[str, str]) -> int:
    """Probe every provider and model in parallel; exit 0 when all pass, 1 otherwise."""
    async def everything() -> List[Dict[str, Any]]:
        client = UpstreamClient()
        jobs = [probe(client, upstream, names, req, timeout)
                for upstream in make_upstreams(config, environ).values()
                for names, req in upstream.probes()]
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
        os.makedirs(folder, 0o700, exist_ok=True)   # (a log line may quote what a client
        with contextlib.suppress(OSError):           # sent: only its owner reads the folder)
            os.chmod(folder, 0o700)
        each = config.logs_max_total_size_mb * 1024 * 1024 // (LOG_FILE_BACKUPS + 1)
        handlers.append(logging.handlers.RotatingFileHandler(
            os.path.join(folder, "proxypal.log"), maxBytes=max(each, 64 * 1024),
            backupCount=LOG_FILE_BACKUPS, encoding="utf-8",
            **({"errors": "backslashreplace"} if sys.version_info >= (3, 9) else {})))
    for handler in handlers:
        handler.setFormatter(formatter)
    global LOGGING_OWNED
    LOGGING_OWNED = True
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
                  argv: Sequence[str], new_key: str = "") -> int:
    """N processes, each a full proxy, sharing one port through SO_REUSEPORT; the kernel
    spreads connections. They share what a user sees through the config folder: usage,
    cooldowns, the page's journal, config saves."""
    if not hasattr(socket, "SO_REUSEPORT"):
        log.warning("--workers needs SO_REUSEPORT, which this OS does not have; "
                    "running a single process")
        return serve(config, overrides=overrides, new_key=new_key)
    check_exposure(config, config.host)
    family = socket.getaddrinfo(config.host, config.port, type=socket.SOCK_STREAM)[0][0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((config.host, config.port))
    port = sock.getsockname()[1]
    rest = [a for a in argv if a != "--worker"]
    run = secrets.token_hex(4)             # one run: "since start" counts every worker's
    children = [subprocess_worker(rest, port, run) for _ in range(count - 1)]
    try:
        return serve(config, overrides=dict(overrides, port=port), sock=sock,
                     note=f"workers: {count} processes share port {port}", new_key=new_key,
                     worker=str(os.getpid()), run=run)
    finally:
        for child in children:
            child.terminate()
        for child in children:
            try:
                child.wait(SHUTDOWN_GRACE + 2)
            except Exception:              # still running: it had its chance
                child.kill()


def subprocess_worker(argv: Sequence[str], port: int, run: str) -> Any:
    import subprocess
    args = list(argv)
    for flag in ("--workers", "--port"):   # the worker serves the parent's port, alone
        while flag in args:
            i = args.index(flag)
            del args[i:i + 2]
    args = [a for a in args if not a.startswith(("--workers=", "--port="))]
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), *args,
                             "--port", str(port), "--worker"], env=dict(os.environ, PROXYPAL_RUN=run))


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # A redirected stdout (a file, a pipe, Git Bash's mintty) is in the ANSI code page on
    # Windows with errors="strict": a path or a name outside it would end the command.
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(errors="backslashreplace")   # type: ignore
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
        setup_logging(dataclasses.replace(config, **overrides))
        if not args.worker:                # workers get the key their parent saved
            config, new_key = ensure_management_key(config)
        else:
            new_key = ""
        config = dataclasses.replace(config, **overrides)
        for key in config.unknown_keys:
            log.debug("config key %r is not used by proxypal; ignored", key)
        if args.workers > 1:
            return serve_workers(config, overrides, args.workers, argv, new_key)
        return serve(config, overrides=overrides, print_banner=not args.worker,
                     reuse_port=args.worker, new_key=new_key,
                     worker=str(os.getpid()) if args.worker else "",
                     run=env.get("PROXYPAL_RUN", "") if args.worker else "")
    except ConfigError as exc:
        print(f"proxypal: invalid config: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:                # `models | head` read what it wanted: fine
        with contextlib.suppress(OSError):  # (and no second error when Python flushes
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # stdout at exit:
        return 0                            # docs.python.org/3/library/signal.html#note-on-sigpipe)
    except OSError as exc:
        print(f"proxypal: cannot start: {exc}", file=sys.stderr)
        return 1


def start_lean(argv: Sequence[str], compiled: Any) -> None:
    """Run as a script, CPython keeps the whole file's syntax tree (about 20 MB) until the
    script returns, which for a server is its whole life. So on POSIX, `python
    proxypal.py [serve] ...` replaces itself (same pid, arguments and interpreter flags)
    with an interpreter that runs this file as module `proxypal`: from `compiled`, the
    code the script was compiled to, handed over in an unlinked temporary file (no
    second compile, no bytecode file written), or, when no such file can be made, by
    importing the file by its path. Not on Windows, whose exec starts another process
    and lets the console go on (start lean there with `python -m proxypal` from the
    file's folder), and not while a debugger or profiler watches this process.
    `python -m proxypal` is lean already."""
    if os.name != "posix" or not sys.executable or getattr(sys, "frozen", False) \
            or (argv and argv[0] in COMMANDS[1:]) or __spec__ is not None \
            or sys.gettrace() is not None or sys.getprofile() is not None:
        return                             # (frozen: sys.executable is the app itself)
    import marshal
    import subprocess
    flags = subprocess._args_from_interpreter_flags()   # -u, -B, -X ..., -W ...: kept
    path = os.path.abspath(__file__)
    try:
        handoff = tempfile.TemporaryFile()             # unlinked: nothing is left behind
        handoff.write(marshal.dumps(compiled))
        handoff.flush()
        os.set_inheritable(handoff.fileno(), True)
        code = ("import marshal,os,sys,types;m=sys.modules['proxypal']=types.ModuleType("
                "'proxypal');m.__file__=%r;f=os.fdopen(%d,'rb');f.seek(0);c=marshal.loads("
                "f.read());f.close();exec(c,m.__dict__);sys.exit(m.main())"
                % (path, handoff.fileno()))
    except (OSError, ValueError):          # no temporary folder: compile once more there
        code = ("import importlib.util as u,sys;s=u.spec_from_file_location('proxypal',%r);"
                "m=sys.modules['proxypal']=u.module_from_spec(s);s.loader.exec_module(m);"
                "m.return_freed_memory();sys.exit(m.main())" % path)
    try:
        os.execv(sys.executable, [sys.executable, *flags, "-c", code, *argv])
    except OSError:                        # cannot exec: serve from here, as before
        pass


def return_freed_memory() -> None:
    """glibc's allocator keeps what the compiler freed (when there was no cached bytecode
    to load) unless asked to give it back; other C libraries manage it their own way."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            ctypes.CDLL(None).malloc_trim(0)
        except (ImportError, OSError, AttributeError):  # no ctypes, or not glibc (musl)
            pass


if __name__ == "__main__":
    start_lean(sys.argv[1:], sys._getframe().f_code)
    return_freed_memory()
    sys.exit(main())
