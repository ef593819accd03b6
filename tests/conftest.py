from __future__ import annotations

import pytest

from helpers import MockUpstream, RunningProxy


@pytest.fixture
def upstream():
    """A factory of mock upstreams, all closed after the test."""
    made = []

    def make(respond=None) -> MockUpstream:
        mock = MockUpstream(respond)
        made.append(mock)
        return mock
    yield make
    for mock in made:
        mock.close()


@pytest.fixture
def proxy():
    """A factory of running proxies (config dict or Config), all closed after the test."""
    made = []

    def make(config, **kwargs) -> RunningProxy:
        running = RunningProxy(config, **kwargs)
        made.append(running)
        return running
    yield make
    for running in made:
        running.close()
