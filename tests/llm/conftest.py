from __future__ import annotations

import pytest

from tests.fakes.anthropic_server import FakeAnthropicServer
from tests.fakes.openai_server import FakeOpenAIServer

_PROVIDER_ENV = (
    "OPENAI_API_KEY", "OPENAI_BASE_URL", "ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL", "ANTHROPIC_AUTH_TOKEN",
)


@pytest.fixture(autouse=True)
def _no_provider_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests configure the router explicitly; keys from the developer's shell must not leak in."""
    import os

    for name in list(os.environ):
        if name.startswith("AGENTMESH_LLM_") or name in _PROVIDER_ENV:
            monkeypatch.delenv(name)


@pytest.fixture
def openai_fake():
    with FakeOpenAIServer(api_key="sk-test") as fake:
        yield fake


@pytest.fixture
def anthropic_fake():
    with FakeAnthropicServer(api_key="sk-ant-test") as fake:
        yield fake
