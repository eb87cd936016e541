"""One real mesh for the fuzz tests: Redis, Milvus Lite, the real embedding model and the five
services, each built by its own ``create()`` from the environment a local mesh gets and served in
this process (so a service's traceback lands in this process's log), with the extractive
provider as the LLM, behind one real Envoy rendered from gateway/envoy.yaml (for the JSON
routes). The mesh is seeded with a session, facts, documents, a collection and a finished run,
whose ids go into the fuzzer's vocabulary so generated requests also reach past "not found".
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections import deque
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import pytest_asyncio

from agentmesh.agent.v1 import agent_pb2, agent_pb2_grpc
from agentmesh.common.v1 import common_pb2
from agentmesh.llm.v1 import llm_pb2, llm_pb2_grpc
from agentmesh.memory.v1 import memory_pb2, memory_pb2_grpc
from agentmesh.retrieval.v1 import retrieval_pb2, retrieval_pb2_grpc
from agentmesh.services.cli.gateway import GatewayOptions, RateLimits
from agentmesh.services.runtime.settings import SERVICE_NAMES
from agentmesh.tools.v1 import tools_pb2, tools_pb2_grpc
from tests.fuzz.seeds import Seeded, seed_requests
from tests.gateway.conftest import Gateway, envoy_in_front_of
from tests.telemetry.conftest import services_in_process

TENANT = "fuzz"
METADATA = (("x-tenant-id", TENANT),)
#: First uid of the python sandbox's range in these tests (other suites use 700k..750k).
SANDBOX_UID_BASE = 760_000
_FOREIGN_ENV = ("OPENAI_API_KEY", "OPENAI_BASE_URL", "ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL",
                "ANTHROPIC_AUTH_TOKEN", "REDIS_URL")
#: JSON keys the built-in tools take, so generated tool arguments sometimes reach a tool.
_ARGUMENT_KEYS = ["code", "expression", "query", "url", "top_k", "session_id", "timeout_s", "collection"]


class ErrorLog(logging.Handler):
    """The last error records the services logged (an INTERNAL's traceback among them)."""

    def __init__(self, keep: int = 5):
        super().__init__(logging.ERROR)
        self.records: deque[str] = deque(maxlen=keep)

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + logging.Formatter().formatException(record.exc_info)
        self.records.append(f"{record.name}: {text}")

    def recent(self) -> str:
        return "\n".join(self.records) or "(nothing logged at ERROR)"


class FuzzMesh:
    """The running mesh and how to reach it (a plain class: Hypothesis prints a failing
    example's arguments, and a dataclass would be printed field by field)."""

    def __init__(self, addresses: dict[str, str], channels: dict[str, grpc.aio.Channel],
                 sync_channels: dict[str, grpc.Channel], gateway: Gateway, http: httpx.AsyncClient, errors: ErrorLog):
        self.addresses = addresses
        self.channels = channels
        #: Blocking channels, for client-streaming calls: the asyncio client may report a request
        #: stream the server ended early as INTERNAL "Internal error from Core" instead of the
        #: server's status (grpc/grpc#36066); the blocking client reports the server's status.
        self.sync_channels = sync_channels
        self.gateway = gateway
        self.http = http
        self.errors = errors
        #: Names and ids the mesh knows (strategies mix them into generated strings).
        self.vocabulary: list[str] = []
        #: Valid requests to mutate, by method full name (seeds.py).
        self.seeds: dict[str, list[Any]] = {}
        #: The strategies.MessageFuzzer of this mesh's vocabulary, once built.
        self.fuzzer: Any = None

    def __repr__(self) -> str:
        return f"FuzzMesh({self.addresses})"


@contextlib.contextmanager
def _clean_environment() -> Iterator[None]:
    """Provider keys or AGENTMESH_* settings from the developer's shell must not change the mesh."""
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k in _FOREIGN_ENV or k.startswith("AGENTMESH_")}
    try:
        yield
    finally:
        os.environ.update(saved)


async def _seed(channels: dict[str, grpc.aio.Channel]) -> tuple[list[str], Seeded]:
    """Create what the fuzzer should be able to name; returns those names and ids."""
    words: list[str] = [TENANT, "fuzz-s1", "fuzz-user", "fuzz_docs", "fuzz-doc", *_ARGUMENT_KEYS]
    memory = memory_pb2_grpc.MemoryServiceStub(channels["memory"])
    appended = await memory.AppendMessages(memory_pb2.AppendMessagesRequest(
        session_id="fuzz-s1", user_id="fuzz-user", idempotency_key="fuzz-key",
        messages=[common_pb2.Message(role=common_pb2.ROLE_USER, content="I live in Lisbon and prefer tea."),
                  common_pb2.Message(role=common_pb2.ROLE_ASSISTANT, content="Noted.")],
    ), metadata=METADATA, timeout=60)
    words += [*appended.message_ids, "fuzz-key"]
    remembered = await memory.RememberFacts(memory_pb2.RememberFactsRequest(
        user_id="fuzz-user", facts=[memory_pb2.FactInput(text="The user lives in Lisbon.")]), metadata=METADATA, timeout=120)
    words += [r.fact_id for r in remembered.results]

    retrieval = retrieval_pb2_grpc.RetrievalServiceStub(channels["retrieval"])
    await retrieval.CreateCollection(retrieval_pb2.CreateCollectionRequest(collection="fuzz_docs"), metadata=METADATA,
                                     timeout=120)
    document = retrieval_pb2.Document(id="fuzz-doc", title="Lighthouses", source="test://fuzz", metadata={"lang": "en"},
                                      text="The Eddystone Lighthouse was completed in 1759 by John Smeaton.")

    for collection in ("", "fuzz_docs"):  # one stream writes one collection
        ingested = await retrieval.IngestDocuments(
            iter([retrieval_pb2.IngestDocumentsRequest(document=document, collection=collection)]),
            metadata=METADATA, timeout=300)
        assert ingested.documents_written == 1, ingested

    tools = await tools_pb2_grpc.ToolServiceStub(channels["tools"]).ListTools(
        tools_pb2.ListToolsRequest(), metadata=METADATA, timeout=30)
    words += [t.name for t in tools.tools]
    models = await llm_pb2_grpc.LLMServiceStub(channels["llm"]).ListModels(
        llm_pb2.ListModelsRequest(), metadata=METADATA, timeout=30)
    words += [m.name for m in models.models] + [d.name for m in models.models for d in m.deployments]
    agent = agent_pb2_grpc.AgentServiceStub(channels["orchestrator"])
    agents = await agent.ListAgents(agent_pb2.ListAgentsRequest(), metadata=METADATA, timeout=30)
    words += [a.name for a in agents.agents]
    run_id = ""
    async for event in agent.Run(agent_pb2.RunRequest(session_id="fuzz-s1", input="When was it completed?"),
                                 metadata=METADATA, timeout=120):
        if event.WhichOneof("event") == "started":
            run_id = event.started.run_id
    words.append(run_id)
    seeded = Seeded(run_id, list(appended.message_ids), [r.fact_id for r in remembered.results])
    return sorted(set(words)), seeded


# Module scope: the mesh's environment (AGENTMESH_* of services_in_process) must not outlive
# the fuzz tests in a whole-suite session.
@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def fuzz_mesh(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[FuzzMesh]:
    root: Path = tmp_path_factory.mktemp("fuzz-mesh")
    env = {
        "AGENTMESH_LLM_PROVIDER": "extractive",
        "AGENTMESH_TOOLS_PYTHON_UID_BASE": str(SANDBOX_UID_BASE),
        "AGENTMESH_TOOLS_PYTHON_SLOTS": "2",
        "AGENTMESH_TOOLS_PYTHON_WALL_S": "10",
        "AGENTMESH_TOOLS_MAX_RUNTIME_S": "15",
    }
    errors = ErrorLog()
    logging.getLogger("agentmesh").addHandler(errors)
    try:
        with _clean_environment():
            async with services_in_process(root, env) as ports:
                upstreams = {kind: f"127.0.0.1:{ports.service(kind)}" for kind in SERVICE_NAMES}
                options = GatewayOptions(rate_limits=RateLimits(run=100_000, admin=100_000, default=100_000))
                async with contextlib.AsyncExitStack() as stack:
                    channels = {
                        kind: await stack.enter_async_context(grpc.aio.insecure_channel(address))
                        for kind, address in upstreams.items()
                    }
                    sync_channels = {
                        kind: stack.enter_context(grpc.insecure_channel(address)) for kind, address in upstreams.items()
                    }
                    gateway = await stack.enter_async_context(envoy_in_front_of(upstreams, root / "envoy", options))
                    http = await stack.enter_async_context(httpx.AsyncClient(base_url=gateway.url, timeout=60))
                    mesh = FuzzMesh(upstreams, channels, sync_channels, gateway, http, errors)
                    mesh.vocabulary, seeded = await _seed(channels)
                    mesh.seeds = seed_requests(seeded)
                    yield mesh
    finally:
        logging.getLogger("agentmesh").removeHandler(errors)
