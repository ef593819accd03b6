"""Routing: names to targets, mappings, prefixes, exclusions, strategies and cooldowns,
with an injected clock (no sleeping, no sockets)."""
from __future__ import annotations

import pytest

import seed
from helpers import proxypal


def router(raw):
    return proxypal.Router(proxypal.parse_config(raw))


SEED_ROUTES = [
    ("claude-opus-4-5-20251101", "claudeApiKeys[0]", "claude-opus-4-5"),
    ("claude-sonnet-4-5-20250929", "claudeApiKeys[0]", "claude-sonnet-4-5"),
    ("haiku-fast", "claudeApiKeys[1]", "claude-3-haiku-20240307"),
    ("gemini-2.5-pro", "geminiApiKeys[0]", "gemini-2.5-pro"),
    ("gemini-2.5-flash", "geminiApiKeys[0]", "gemini-2.5-flash"),
    ("openai/gpt-4-turbo", "ampOpenaiProviders[0]", "openai/gpt-4-turbo"),
    ("anthropic/claude-3-opus", "ampOpenaiProviders[0]", "anthropic/claude-3-opus"),
    ("llama3-70b-8192", "ampOpenaiProviders[1]", "llama3-70b-8192"),
    ("mixtral-8x7b-32768", "ampOpenaiProviders[1]", "mixtral-8x7b-32768"),
    ("llama3", "ampOpenaiProviders[2]", "llama3"),
    ("codellama", "ampOpenaiProviders[2]", "codellama"),
]


@pytest.mark.parametrize("name,path,model", SEED_ROUTES, ids=[r[0] for r in SEED_ROUTES])
def test_seed_section_6_routes(name, path, model):
    route = router(seed.SECTION_6).resolve(name)
    assert [(t.cred.path, t.model) for t in route.targets] == [(path, model)]


def test_unknown_model_has_no_targets_and_near_names():
    r = router(seed.SECTION_6)
    assert r.resolve("gpt-5").targets == ()
    assert "llama3" in r.nearest("llama-3")


def test_claude_key_without_models_serves_builtin_and_any_claude_name():
    r = router({"claudeApiKeys": [{"apiKey": "k", "excludedModels": ["claude-3-*"]}]})
    assert r.resolve("claude-sonnet-4-5").targets[0].model == "claude-sonnet-4-5"
    assert r.resolve("claude-future-9").targets[0].model == "claude-future-9"
    assert r.resolve("claude-3-7-sonnet-20250219").targets == ()      # excluded
    assert r.resolve("gpt-4").targets == ()
    assert "claude-opus-4-5" in r.names()


def test_an_aliased_entrys_own_name_routes_too_after_every_alias():
    """The seed's Azure entries alias deployment names; a Claude Code still set up for
    Foundry (ANTHROPIC_DEFAULT_OPUS_MODEL=claude-opus-4-5) sends the deployment's name."""
    r = router({"claudeApiKeys": [
        {"apiKey": "k1", "baseUrl": "https://azure.example/anthropic", "models": [
            {"name": "claude-opus-4-5", "alias": "claude-opus-4-5-20251101"},
            {"name": "claude-opus-4-5", "alias": "claude-sonnet-4-5-20250929"}]},
        {"apiKey": "k2", "models": [{"name": "claude-haiku-4-5", "alias": "claude-opus-4-5"}]}]})
    assert [(t.cred.path, t.model) for t in r.resolve("claude-opus-4-5-20251101").targets] == [
        ("claudeApiKeys[0]", "claude-opus-4-5")]
    # an alias wins over another entry's name: the second key's alias takes the name here
    assert [(t.cred.path, t.model) for t in r.resolve("claude-opus-4-5").targets] == [
        ("claudeApiKeys[1]", "claude-haiku-4-5")]
    r = router({"claudeApiKeys": [{"apiKey": "k1", "models": [
        {"name": "claude-opus-4-5", "alias": "claude-opus-4-5-20251101"}]}]})
    assert [t.model for t in r.resolve("claude-opus-4-5").targets] == ["claude-opus-4-5"]
    assert r.names() == ["claude-opus-4-5-20251101"]         # listed under the alias alone


def test_prefix_and_exclusion():
    r = router({"ampOpenaiProviders": [
        {"name": "A", "baseUrl": "http://a/v1", "models": ["m1", {"name": "up-2", "alias": "m2"}],
         "prefix": "a", "excludedModels": ["up-*"]}]})
    assert r.resolve("a/m1").targets[0].model == "m1"
    assert r.resolve("m2").targets == ()                               # excluded by its name
    assert set(r.names()) == {"m1", "a/m1"}


def test_several_credentials_serve_one_name_in_config_order():
    r = router({"claudeApiKeys": [{"apiKey": "k1", "models": ["c"]}, {"apiKey": "k2", "models": ["c"]}]})
    assert [t.cred.api_key for t in r.resolve("c").targets] == ["k1", "k2"]


MAPPINGS = {"ampOpenaiProviders": [{"name": "P", "baseUrl": "http://p/v1", "models": ["big", "small"]}],
            "ampModelMappings": [{"from": "claude-haiku-*", "to": "small"},
                                 {"from": "claude-haiku-4-5-20251001", "to": "big"},
                                 {"from": "ghost", "to": "not-served"},
                                 {"name": "small", "alias": "tiny"}]}


@pytest.mark.parametrize("requested,routed,model", [
    ("claude-haiku-4-5-20251001", "big", "big"),        # exact beats the wildcard listed first
    ("claude-haiku-3", "small", "small"),
    ("tiny", "small", "small"),                          # ProxyPal's {name, alias}
    ("big", "big", "big"),
], ids=["exact-wins", "wildcard", "name-alias", "unmapped"])
def test_mappings(requested, routed, model):
    route = router(MAPPINGS).resolve(requested)
    assert (route.routed, route.targets[0].model) == (routed, model)


def test_mapping_to_unserved_name_falls_back_to_requested():
    assert router(MAPPINGS).resolve("ghost").targets == ()
    assert "tiny" in router(MAPPINGS).names() and "ghost" not in router(MAPPINGS).names()


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


TWO = {"claudeApiKeys": [{"apiKey": "k1", "models": ["c"]}, {"apiKey": "k2", "models": ["c"]},
                         {"apiKey": "k3", "models": ["c"]}]}


def keys(targets):
    return [t.cred.api_key for t in targets]


def test_round_robin_rotates_fill_first_does_not():
    route = router(TWO).resolve("c")
    balancer = proxypal.Balancer(Clock())
    assert [keys(balancer.plan(route, "round-robin")[0]) for _ in range(4)] == [
        ["k1", "k2", "k3"], ["k2", "k3", "k1"], ["k3", "k1", "k2"], ["k1", "k2", "k3"]]
    assert [keys(balancer.plan(route, "fill-first")[0])[0] for _ in range(3)] == ["k1", "k1", "k1"]


def test_cooldowns():
    clock = Clock()
    route = router(TWO).resolve("c")
    balancer = proxypal.Balancer(clock)
    creds = [t.cred for t in route.targets]
    assert balancer.cool(creds[0], 429, 30).until == 1030
    assert balancer.cool(creds[1], 401, None).until == 1000 + proxypal.COOLDOWN_AUTH
    assert balancer.cool(creds[2], 429, 100000).until == 1000 + proxypal.COOLDOWN_RETRY_AFTER_CAP
    assert balancer.cool(creds[2], 500, None) is None            # 5xx: fail over, no rest
    ready, cooling = balancer.plan(route, "fill-first")
    assert [t.cred.api_key for t, _ in cooling] == ["k1", "k2", "k3"]
    assert keys(ready) == ["k1"]            # all cooling: the one that ends first, not a refusal
    text = proxypal.describe_cooling(cooling, clock.now, wall=0)
    assert "claudeApiKeys[0]) rate limited (429)" in text and "(30s)" in text
    assert "claudeApiKeys[1]) rejected the key (401)" in text and "(300s)" in text
    clock.now = 1031
    assert keys(balancer.plan(route, "fill-first")[0]) == ["k1"]


@pytest.mark.parametrize("value,expected", [
    ("30", 30.0), ("0", 0.0), ("", None), ("soon", None),
    ("Wed, 21 Oct 2015 07:28:00 GMT", 60.0),
], ids=["seconds", "zero", "empty", "garbage", "http-date"])
def test_retry_after(value, expected):
    now = 1445412420.0   # 60 s before the date above
    assert proxypal.retry_after_seconds(value, now) == expected


def test_retry_after_a_date_the_clock_cannot_place_is_no_advice(monkeypatch):
    import email.utils

    class Far:                                     # Windows' localtime refuses years past 3000
        def timestamp(self):
            raise OSError(22, "Invalid argument")
    monkeypatch.setattr(email.utils, "parsedate_to_datetime", lambda value: Far())
    assert proxypal.retry_after_seconds("Fri, 01 Jan 3001 00:00:00 -0000") is None


def test_clamp_output_tokens():
    body = {"max_tokens": 32000, "max_completion_tokens": 100, "generationConfig": {"maxOutputTokens": 9000}}
    proxypal.clamp_output_tokens(body, 8192)
    assert body == {"max_tokens": 8192, "max_completion_tokens": 100,
                    "generationConfig": {"maxOutputTokens": 8192}}


def test_a_session_sticks_to_one_credential_under_round_robin():
    route = router(TWO).resolve("c")
    balancer = proxypal.Balancer(Clock())
    firsts = {keys(balancer.plan(route, "round-robin", "session-a")[0])[0] for _ in range(6)}
    assert len(firsts) == 1
    others = {keys(balancer.plan(route, "round-robin", f"s{n}")[0])[0] for n in range(40)}
    assert len(others) == 3                  # different sessions spread over every key
    plain = [keys(balancer.plan(route, "round-robin")[0])[0] for _ in range(3)]
    assert sorted(plain) == ["k1", "k2", "k3"]
