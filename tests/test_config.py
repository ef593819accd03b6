"""Config: every key loads, ProxyPal's own file loads unchanged, and every error names
its key path."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import threading

import pytest

import seed
from helpers import proxypal

ConfigError = proxypal.ConfigError


def test_seed_section_6_loads():
    config = proxypal.parse_config(seed.SECTION_6)
    assert [c.api for c in config.credentials] == [
        "anthropic", "anthropic", "gemini", "openai", "openai", "openai"]
    assert [c.dialect for c in config.credentials] == [
        "azure", "anthropic", "gemini", "openai", "openai", "openai"]
    azure = config.credentials[0]
    assert azure.base_url == "https://foundry-resource.services.ai.azure.com/anthropic"
    assert azure.name == "Azure AI Foundry (foundry-resource)"
    assert azure.models[0] == proxypal.ModelEntry("claude-opus-4-5", "claude-opus-4-5-20251101")
    assert dict(azure.headers)["anthropic-version"] == "2023-06-01"
    assert config.credentials[1].name == "Anthropic"
    assert [m.alias for m in config.credentials[2].models] == ["gemini-2.5-pro", "gemini-2.5-flash"]
    assert config.credentials[5].name == "Local Ollama"


def test_proxypal_app_config_loads_unchanged():
    config = proxypal.parse_config(seed.PROXYPAL_APP_CONFIG)
    assert config.request_retry == 3
    assert config.proxy_url == ""
    assert config.mappings == (proxypal.Mapping("claude-sonnet-4-5-20250929", "claude-opus-4-5-20251101"),)
    assert "copilot" in config.unknown_keys and "codexApiKeys" in config.unknown_keys
    assert len(config.credentials) == 1


def test_every_spec_key_loads():
    raw = {
        "port": 9000, "host": "localhost", "proxyApiKey": "local-secret", "apiKeys": ["k2", "k3"],
        "managementKey": "mgmt-secret", "allowRemoteManagement": True, "debug": True,
        "requestLogging": True, "loggingToFile": True, "logsMaxTotalSizeMb": 50,
        "requestRetry": 2, "routingStrategy": "fill-first", "proxyUrl": "http://proxy.corp:3128",
        "proxyUsername": "u", "proxyPassword": "p4ss-word", "useSystemProxy": True,
        "maxBodyMb": 8, "streamKeepaliveSeconds": 15, "connectTimeoutSeconds": 5,
        "firstByteTimeoutSeconds": 120, "readTimeoutSeconds": 60,
        "claudeApiKeys": [{"apiKey": "sk-ant-x", "baseUrl": "https://api.anthropic.com/v1/",
                           "proxyUrl": "socks5://127.0.0.1:1080", "headers": {"X-A": "1"},
                           "models": ["claude-x", {"name": "claude-y", "alias": "y", "maxOutputTokens": 100}],
                           "excludedModels": ["claude-z*"], "prefix": "az", "requestRetry": 1}],
        "geminiApiKeys": [{"apiKey": "AIza", "baseUrl": "https://generativelanguage.googleapis.com/v1beta"}],
        "ampOpenaiProviders": [{"name": "P", "baseUrl": "http://h:1/v1", "apiKey": "", "models": []}],
        "ampModelMappings": [{"from": "a", "to": "b"}, {"name": "c", "alias": "d"},
                             {"from": "x", "to": "y", "enabled": False}],
    }
    c = proxypal.parse_config(raw)
    assert (c.port, c.host, c.proxy_api_key, c.api_keys) == (9000, "localhost", "local-secret", ("k2", "k3"))
    assert c.local_keys == ("local-secret", "k2", "k3")
    assert (c.management_key, c.allow_remote_management, c.debug, c.request_logging) == ("mgmt-secret", True, True, True)
    assert (c.logging_to_file, c.logs_max_total_size_mb, c.request_retry) == (True, 50, 2)
    assert (c.routing_strategy, c.proxy_url, c.proxy_username, c.proxy_password) == (
        "fill-first", "http://proxy.corp:3128", "u", "p4ss-word")
    assert (c.use_system_proxy, c.max_body_mb, c.stream_keepalive_seconds) == (True, 8.0, 15.0)
    assert (c.connect_timeout, c.first_byte_timeout, c.read_timeout) == (5.0, 120.0, 60.0)
    claude = c.credentials[0]
    assert claude.base_url == "https://api.anthropic.com"          # trailing /v1/ tolerated
    assert claude.models[1] == proxypal.ModelEntry("claude-y", "y", 100)
    assert (claude.prefix, claude.request_retry, claude.excluded) == ("az", 1, ("claude-z*",))
    assert c.credentials[1].base_url == "https://generativelanguage.googleapis.com"
    assert c.credentials[2].api_key == ""
    assert c.mappings == (proxypal.Mapping("a", "b"), proxypal.Mapping("d", "c"))
    assert c.unknown_keys == ()
    for secret in ("local-secret", "mgmt-secret", "p4ss-word", "sk-ant-x"):
        assert secret in c.secrets


ERRORS = [
    ("alias-type", {"claudeApiKeys": [{"apiKey": "a"}, {"apiKey": "b", "models": [{"name": "n", "alias": 5}]}]},
     'claudeApiKeys[1].models[0]: "alias" must be a string'),
    ("missing-apikey", {"claudeApiKeys": [{"baseUrl": "https://x"}]}, 'claudeApiKeys[0]: "apiKey" is required'),
    ("openai-missing-name", {"ampOpenaiProviders": [{"baseUrl": "http://h/v1", "models": []}]},
     'ampOpenaiProviders[0]: "name" is required'),
    ("openai-missing-base", {"ampOpenaiProviders": [{"name": "n", "models": []}]},
     'ampOpenaiProviders[0]: "baseUrl" is required'),
    ("openai-missing-models", {"ampOpenaiProviders": [{"name": "n", "baseUrl": "http://h/v1"}]},
     'ampOpenaiProviders[0]: "models" is required'),
    ("bad-url", {"ampOpenaiProviders": [{"name": "n", "baseUrl": "localhost:11434/v1", "models": []}]},
     'ampOpenaiProviders[0]: "baseUrl" must be a URL starting with http:// or https://'),
    ("port-type", {"port": "8317"}, "port: must be a whole number"),
    ("port-range", {"port": 70000}, "port: must be between 0 and 65535"),
    ("bool-as-port", {"port": True}, "port: must be a whole number"),
    ("strategy", {"routingStrategy": "random"}, 'routingStrategy: must be "round-robin" or "fill-first"'),
    ("list-type", {"claudeApiKeys": {"apiKey": "x"}}, "claudeApiKeys: must be a list"),
    ("entry-type", {"geminiApiKeys": ["AIza"]}, "geminiApiKeys[0]: must be an object"),
    ("model-empty", {"ampOpenaiProviders": [{"name": "n", "baseUrl": "http://h/v1", "models": [""]}]},
     "ampOpenaiProviders[0].models[0]: must not be an empty string"),
    ("header-injection", {"claudeApiKeys": [{"apiKey": "a", "headers": {"X": "a\r\nEvil: 1"}}]},
     'claudeApiKeys[0].headers: "X" must not contain line breaks'),
    ("header-name", {"claudeApiKeys": [{"apiKey": "a", "headers": {"Bad Name": "1"}}]},
     "claudeApiKeys[0].headers: 'Bad Name' is not a valid header name"),
    ("mapping-missing-to", {"ampModelMappings": [{"from": "a"}]}, 'ampModelMappings[0]: "to" is required'),
    ("excluded-type", {"claudeApiKeys": [{"apiKey": "a", "excludedModels": [1]}]},
     "claudeApiKeys[0].excludedModels[0]: must be a string"),
    ("max-output", {"ampOpenaiProviders": [{"name": "n", "baseUrl": "http://h/v1",
                                            "models": [{"name": "m", "maxOutputTokens": 0}]}]},
     'ampOpenaiProviders[0].models[0]: "maxOutputTokens" must be at least 1'),
    ("proxy-url", {"proxyUrl": "ftp://x"}, 'proxyUrl: must be a URL starting with http:// or socks5://'),
    ("root-type", [], "must be an object, got a list"),
    # keys clients present in headers: text a header can carry
    ("key-space-at-an-end", {"proxyApiKey": "my key "}, "proxyApiKey: must be text a client can send"),
    ("key-surrogate", {"managementKey": "pp-\ud800"}, "managementKey: holds a lone UTF-16 surrogate"),
    # text that cannot go on the wire, and hosts nothing can connect to
    ("api-key-surrogate", {"claudeApiKeys": [{"apiKey": "sk-\ud83d"}]},
     'claudeApiKeys[0]: "apiKey" holds a lone UTF-16 surrogate'),
    ("header-surrogate", {"claudeApiKeys": [{"apiKey": "a", "headers": {"X": "\udc00"}}]},
     'claudeApiKeys[0].headers: "X" must not contain line breaks, control characters or lone'),
    ("host-label-too-long", {"ampOpenaiProviders": [{"name": "n", "baseUrl": "http://" + "a" * 64 + ".com/v1",
                                                     "models": ["m"]}]},
     'ampOpenaiProviders[0]: "baseUrl" names no host a connection can be made to'),
    ("host-nul", {"ampOpenaiProviders": [{"name": "n", "baseUrl": "http://\x00x/v1", "models": ["m"]}]},
     'ampOpenaiProviders[0]: "baseUrl" names no host'),
    ("host-space", {"ampOpenaiProviders": [{"name": "n", "baseUrl": "http://a b/v1", "models": ["m"]}]},
     'ampOpenaiProviders[0]: "baseUrl" names no host'),
    ("listen-host-nul", {"host": "h\x00"}, "host: must be an IP address or a host name"),
    # secrets are never echoed back in an error
    ("password-type", {"proxyPassword": ["sk-NEW-secret"]}, "proxyPassword: must be a string, got a list"),
    ("url-password", {"proxyUrl": "ftp://u:sk-NEW-secret@h"}, "got 'ftp://***@h'"),
    ("url-password-that-breaks-the-url", {"proxyUrl": "http://user:s3cr/etpw@proxy:8080"},
     "proxyUrl: is not a valid URL: 'http://***@proxy:8080'"),
    ("base-url-user-and-password", {"ampOpenaiProviders": [{"name": "n", "baseUrl": "http://u:pw@h/v1",
                                                            "models": ["m"]}]},
     'ampOpenaiProviders[0]: "baseUrl" must not hold a user name or password'),
    ("key-beyond-latin-1", {"apiKeys": ["ok", "ключ"]}, "apiKeys: must be text a client can send"),
    ("key-control", {"managementKey": "a\tb"}, "managementKey: must be text a client can send"),
    # a field spelled unlike ours would be ignored: an Azure key sent to api.anthropic.com
    ("base-url-spelling", {"claudeApiKeys": [{"apiKey": "a", "baseURL": "https://r.services.ai.azure.com"}]},
     'claudeApiKeys[0]: "baseURL" is not a field: write "baseUrl"'),
    ("api-key-spelling", {"geminiApiKeys": [{"api_key": "AIza"}]},
     'geminiApiKeys[0]: "api_key" is not a field: write "apiKey"'),
    ("proxy-url-spelling", {"ampOpenaiProviders": [{"name": "n", "baseUrl": "http://h/v1", "models": ["m"],
                                                    "proxy-url": "http://p:1"}]},
     'ampOpenaiProviders[0]: "proxy-url" is not a field: write "proxyUrl"'),
]


@pytest.mark.parametrize("raw,message", [(r, m) for _, r, m in ERRORS], ids=[n for n, _, _ in ERRORS])
def test_errors_name_the_key_path(raw, message):
    with pytest.raises(ConfigError) as info:
        proxypal.parse_config(raw)
    assert message in str(info.value)


def test_load_config_missing_file_is_empty(tmp_path):
    config = proxypal.load_config(str(tmp_path / "nope.json"))
    assert not config.loaded and config.credentials == () and config.path.endswith("nope.json")


def test_load_config_bom_and_json_errors(tmp_path):
    path = tmp_path / "config.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(seed.SECTION_6).encode())
    assert len(proxypal.load_config(str(path)).credentials) == 6
    path.write_text('{\n  "port": 8317,\n  "debug": true,,\n}')
    with pytest.raises(ConfigError) as info:
        proxypal.load_config(str(path))
    assert "line 3, column 17" in str(info.value)
    assert path.read_text() == '{\n  "port": 8317,\n  "debug": true,,\n}'   # never rewritten


def test_load_config_uses_env(tmp_path, monkeypatch):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"port": 1234}))
    monkeypatch.setenv("PROXYPAL_CONFIG", str(path))
    assert proxypal.load_config().port == 1234


@pytest.mark.parametrize("platform,environ,expected", [
    ("win32", {"APPDATA": r"C:\Users\u\AppData\Roaming", "HOME": "/h"},
     os.path.join(r"C:\Users\u\AppData\Roaming", "proxypal", "config.json")),
    ("darwin", {"HOME": "/Users/u"}, "/Users/u/Library/Application Support/proxypal/config.json"),
    ("linux", {"HOME": "/home/u"}, "/home/u/.config/proxypal/config.json"),
    ("linux", {"HOME": "/home/u", "XDG_CONFIG_HOME": "/xdg"}, "/xdg/proxypal/config.json"),
], ids=["windows", "macos", "linux", "linux-xdg"])
def test_default_config_path(platform, environ, expected):
    assert proxypal.default_config_path(environ, platform) == expected


def test_example_config_loads():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config = proxypal.load_config(os.path.join(root, "config.example.json"))
    assert config.loaded and len(config.credentials) >= 8
    assert config.unknown_keys == ()
    raw = config.raw                               # "sets every key the proxy reads"
    assert {s.key for s in proxypal.SETTINGS} <= set(raw)
    entries = [e for kind in proxypal.CREDENTIAL_LISTS for e in raw[kind]]
    assert set(proxypal.ENTRY_FIELDS) == {field for e in entries for field in e}
    assert {"name", "alias", "maxOutputTokens", "contextWindow"} == {
        field for e in entries for m in e["models"] if isinstance(m, dict) for field in m}


def test_api_key_with_line_break_is_a_config_error():
    with pytest.raises(proxypal.ConfigError) as info:
        proxypal.parse_config({"ampOpenaiProviders": [{"name": "x", "baseUrl": "http://h/v1",
                                                        "apiKey": "sk-one\nsk-two", "models": []}]})
    assert 'ampOpenaiProviders[0]: "apiKey" must not contain line breaks' in str(info.value)


# -- SETTINGS: one table feeds parsing, known keys and the README ----------------------

def test_settings_table_matches_config_fields_and_defaults():
    fields = {f.name: f.default for f in dataclasses.fields(proxypal.Config)}
    for setting in proxypal.SETTINGS:
        assert setting.attr in fields, setting.key
        default = tuple(setting.default) if setting.kind is list else setting.default
        assert fields[setting.attr] == default, setting.key
        assert setting.help and setting.key in proxypal.KNOWN_KEYS
    parsed = proxypal.parse_config({})
    assert all(getattr(parsed, s.attr) == getattr(proxypal.Config(), s.attr) for s in proxypal.SETTINGS)


def test_readme_config_reference_lists_every_setting():
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md"), encoding="utf-8").read()
    rows = {m.group(1) for m in re.finditer(r"^\| `(\w+)`", readme, re.M)}
    rows |= {k.strip("` ") for line in readme.splitlines() if line.startswith("| `proxyUsername`")
             for k in line.split("|")[1].split(",")}
    missing = [s.key for s in proxypal.SETTINGS if s.key not in rows]
    assert not missing, f"README's config reference lacks {missing}"


# -- ConfigStore: the only writer of the config file ------------------------------------

APP_KEYS = {"theme": "dark", "autoStart": True, "oauthAccounts": [{"id": 1}]}


def store_with(tmp_path, doc):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(doc), encoding="utf-8")
    return proxypal.ConfigStore(str(path)), path


def test_save_keeps_unknown_keys_over_ten_saves_and_keeps_a_bak(tmp_path):
    doc = dict(APP_KEYS, port=8317, ampOpenaiProviders=[
        {"name": "o", "baseUrl": "http://h/v1", "models": ["m"], "appColor": "#fff"}])
    store, path = store_with(tmp_path, doc)
    for n in range(10):
        raw, version = store.read()
        raw["port"] = 9000 + n
        config, new_version = store.save(raw, version)
        assert config.port == 9000 + n and new_version != version
    saved = json.loads(path.read_text())
    assert {k: saved[k] for k in APP_KEYS} == APP_KEYS
    assert saved["ampOpenaiProviders"][0]["appColor"] == "#fff" and saved["port"] == 9009
    assert json.loads((tmp_path / "config.json.bak").read_text())["port"] == 9008
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "config.json.bak"]
    assert proxypal.parse_config(saved).unknown_keys == tuple(sorted(APP_KEYS))


def test_invalid_config_is_refused_before_anything_is_written(tmp_path):
    store, path = store_with(tmp_path, {"port": 1})
    before = path.read_bytes()
    with pytest.raises(ConfigError) as info:
        store.save({"port": "eighty"})
    assert info.value.path == "port"
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["config.json"]


def test_a_failed_write_leaves_the_old_file_intact_and_says_why(tmp_path, monkeypatch):
    store, path = store_with(tmp_path, {"port": 1})
    before = path.read_bytes()

    def disk_full(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(proxypal.os, "fsync", disk_full)
    with pytest.raises(ConfigError) as info:
        store.save({"port": 2})
    assert "cannot write" in info.value.message and "No space left" in info.value.message
    assert "not changed" in info.value.message
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".bak")] == ["config.json"]


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes anywhere")
def test_a_read_only_folder_leaves_the_old_file_intact(tmp_path):
    store, path = store_with(tmp_path, {"port": 1})
    os.chmod(tmp_path, 0o500)
    try:
        with pytest.raises(ConfigError) as info:
            store.save({"port": 2})
        assert "cannot write" in info.value.message and "Permission denied" in info.value.message
    finally:
        os.chmod(tmp_path, 0o700)
    assert json.loads(path.read_text()) == {"port": 1}


def test_a_save_over_a_newer_file_is_refused(tmp_path):
    store, path = store_with(tmp_path, {"port": 1})
    _, version = store.read()
    path.write_text('{"port": 2, "edited": "by hand"}')
    with pytest.raises(proxypal.ConfigConflict) as info:
        store.save({"port": 3}, version)
    assert info.value.status == 409 and "changed since it was read" in info.value.message
    assert json.loads(path.read_text()) == {"port": 2, "edited": "by hand"}


def test_concurrent_saves_never_interleave(tmp_path):
    """Threads doing read-modify-write: each round exactly one wins, the others are told
    to reload; the file is always one whole document."""
    store, path = store_with(tmp_path, {"port": 1, "writers": []})
    barrier = threading.Barrier(4)
    outcomes = []

    def writer(name):
        raw, version = store.read()
        barrier.wait()
        raw["writers"] = raw["writers"] + [name]
        try:
            store.save(raw, version)
            outcomes.append(("saved", name))
        except proxypal.ConfigConflict:
            outcomes.append(("conflict", name))
    threads = [threading.Thread(target=writer, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    saved = [n for what, n in outcomes if what == "saved"]
    assert len(saved) == 1 and len(outcomes) == 4
    assert json.loads(path.read_text())["writers"] == saved


def test_concurrent_saves_from_processes_leave_one_whole_document(tmp_path):
    store, path = store_with(tmp_path, {"port": 1})
    script = ("import json, sys; sys.path.insert(0, sys.argv[1]); import proxypal\n"
              "store = proxypal.ConfigStore(sys.argv[2])\n"
              "for i in range(20): store.save({'port': int(sys.argv[3]), 'pad': 'x' * 20000, 'i': i})\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    procs = [subprocess.Popen([sys.executable, "-c", script, root, str(path), str(1000 + n)])
             for n in range(3)]
    assert all(p.wait(60) == 0 for p in procs)
    final, bak = json.loads(path.read_text()), json.loads((tmp_path / "config.json.bak").read_text())
    assert final["port"] in (1000, 1001, 1002) and len(final["pad"]) == 20000
    assert bak["port"] in (1, 1000, 1001, 1002)


def test_create_never_overwrites(tmp_path):
    path = tmp_path / "sub" / "config.json"
    store = proxypal.ConfigStore(str(path))
    assert store.create({"port": 1}) is True
    assert store.create({"port": 2}) is False
    assert json.loads(path.read_text()) == {"port": 1}
    assert [p.name for p in path.parent.iterdir()] == ["config.json"]


@pytest.mark.parametrize("raw", [
    {"proxyPassword": ["sk-NEW-secret"]}, {"proxyApiKey": ["sk-NEW-secret"]},
    {"apiKeys": "sk-NEW-secret"}, {"proxyUrl": "ftp://u:sk-NEW-secret@h"},
    {"claudeApiKeys": [{"apiKey": ["sk-NEW-secret"]}]},
    {"ampOpenaiProviders": [{"name": "n", "baseUrl": "http://u:sk-NEW-secret@h:xx/v1", "models": []}]},
    {"proxyUrl": "http://user:sk-NEW/secret@proxy:8080"}, {"proxyUrl": "http://user:sk-NEW#secret@proxy:8080"},
    {"geminiApiKeys": "sk-NEW-secret"}, {"claudeApiKeys": "sk-NEW-secret"},    # a key where a list goes
    {"claudeApiKeys": [{"apiKey": "k", "headers": "x-api-key: sk-NEW-secret"}]},
])
def test_a_config_error_never_shows_a_secret(raw):
    with pytest.raises(ConfigError) as info:
        proxypal.parse_config(raw)
    assert "sk-NEW" not in str(info.value) and "secret" not in str(info.value)


@pytest.mark.skipif(not hasattr(os, "symlink") or os.name == "nt", reason="symbolic links")
def test_a_save_through_a_symbolic_link_writes_its_target(tmp_path):
    """A dotfiles setup links config.json to a file kept elsewhere: the link stays, the
    file it names gets the save."""
    (tmp_path / "dotfiles").mkdir()
    target = tmp_path / "dotfiles" / "proxypal.json"
    target.write_text(json.dumps({"port": 8317, "theme": "dark"}))
    link = tmp_path / "config.json"
    os.symlink(target, link)
    store = proxypal.ConfigStore(str(link))
    raw, version = store.read()
    store.save(dict(raw, port=9000), version)
    assert os.path.islink(link)
    assert json.loads(target.read_text()) == {"port": 9000, "theme": "dark"}


def test_a_file_the_next_start_would_refuse_is_never_written(tmp_path):
    """host 0.0.0.0 with the public key: refused at save (the page), but a file that
    has it still loads, for --host 127.0.0.1 to override."""
    store = proxypal.ConfigStore(str(tmp_path / "config.json"))
    with pytest.raises(ConfigError) as info:
        store.save({"host": "0.0.0.0"})
    assert info.value.field == "host" and not (tmp_path / "config.json").exists()
    assert proxypal.parse_config({"host": "0.0.0.0"}).host == "0.0.0.0"


def test_entries_named_after_one_host_are_numbered_and_given_names_kept():
    raw = {"claudeApiKeys": [{"apiKey": "a"}, {"apiKey": "b"}, {"apiKey": "c", "name": "Anthropic 2"},
                             {"apiKey": "d", "name": "Mine"}, {"apiKey": "e", "name": "Mine"}]}
    names = [c.name for c in proxypal.parse_config(raw).credentials]
    assert names == ["Anthropic", "Anthropic 3", "Anthropic 2", "Mine", "Mine"]


def test_switching_an_entry_off_renames_no_other():
    a, b = {"apiKey": "a"}, {"apiKey": "b"}
    on = [(c.path, c.name) for c in proxypal.parse_config({"claudeApiKeys": [a, b]}).credentials]
    off = [(c.path, c.name) for c in proxypal.parse_config(
        {"claudeApiKeys": [dict(a, disabled=True), b]}).credentials]
    assert on == [("claudeApiKeys[0]", "Anthropic"), ("claudeApiKeys[1]", "Anthropic 2")]
    assert off == [("claudeApiKeys[1]", "Anthropic 2")]      # (its usage and history stay its own)


@pytest.mark.parametrize("name,value,secret", [
    ("Ocp-Apim-Subscription-Key", "0123456789abcdef0123456789abcdef", True),
    ("Helicone-Auth", "Bearer sk-helicone-abc", True),
    ("X-Tenant", "t3n4nt-6f1c2a9b8d7e", True),           # named plainly, looks like a token
    ("Helicone-Cache-Enabled", "true", False),           # settings a gateway reads:
    ("cf-aig-cache-ttl", "3600", False),                 # masking them would turn every
    ("x-portkey-provider", "openai", False),             # "true" in an error into ***
    ("anthropic-version", "2023-06-01", False),
    ("x-amz-region", "us-east-1", False),
], ids=["apim", "helicone-auth", "token-like", "true", "number", "word", "version", "region"])
def test_which_header_values_count_as_secrets(name, value, secret):
    cred = proxypal.parse_config({"claudeApiKeys": [{"apiKey": "k", "headers": {name: value}}]}).credentials[0]
    assert (value in cred.secrets) is secret


def test_fields_of_other_tools_in_an_entry_are_kept_and_ignored():
    raw = {"claudeApiKeys": [{"apiKey": "a", "_note": "work key", "priority": 1}]}
    config = proxypal.parse_config(raw)
    assert config.credentials[0].base_url == "https://api.anthropic.com"
    assert config.raw["claudeApiKeys"][0]["_note"] == "work key"


def test_entries_alike_but_for_wire_api_and_proxy_keep_their_own_adapters():
    entry = {"baseUrl": "http://h/v1", "apiKey": "same"}
    config = proxypal.parse_config({"ampOpenaiProviders": [
        dict(entry, name="A", models=["chat-m"]),
        dict(entry, name="B", models=["resp-m"], wireApi="responses", proxyUrl="socks5://127.0.0.1:9")]})
    first, second = config.credentials
    assert first.key == second.key                 # one identity for cooldowns...
    upstreams = proxypal.make_upstreams(config, {})
    assert upstreams[first.path].cred.wire_api == "" and upstreams[first.path].cred.proxy_url == ""
    assert upstreams[second.path].cred.wire_api == "responses"   # ...and an adapter each
