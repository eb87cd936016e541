"""The run's user and the tool calls that outlive an orchestrator.

- A tool call in flight when its orchestrator died (SIGKILL, a separate process) keeps running in
  the tool service (``continue_on_disconnect``); the replica that takes the run over repeats the
  call with the same idempotency key and receives the first call's result: the tool's side effect
  (a line appended to a file by the test MCP server's ``tally`` tool) happens once.
- A run acts for a user (``RunRequest.user_id``, else the caller's subject): its session memory is
  that user's, its turn feeds the memory service's fact extraction, an agent with
  ``memory.facts`` recalls those facts into its context (and goes on without them, saying why,
  when the memory service has none to give), and tools get the user too.
- The run store's pipelined Lua scripts survive a Redis that forgot them.
"""

from __future__ import annotations

import asyncio
import hashlib
import time

import grpc
import pytest
from google.protobuf import json_format

from agentmesh.agent.v1 import agent_pb2, agent_pb2_grpc
from agentmesh.client import AsyncClient, Client, ClientConfig
from agentmesh.common.v1 import common_pb2
from agentmesh.memory.v1 import memory_pb2, memory_pb2_grpc
from agentmesh.services.memory.service import MemoryService, MemorySettings
from agentmesh.services.orchestrator.agents import load_catalog
from agentmesh.services.orchestrator.engine import FACTS_HEADER
from agentmesh.services.orchestrator.service import OrchestratorService
from agentmesh.services.runtime.settings import MeshSettings
from tests.orchestrator.conftest import (
    AGENTS_YAML,
    TENANT,
    Mesh,
    collect,
    kinds,
    of_kind,
    orchestrator_process,
    tenant_md,
)
from tests.support import running_service

pytestmark = pytest.mark.timeout(120)


async def test_a_tool_running_when_its_orchestrator_died_runs_once(mesh: Mesh, agent_stub, tmp_path):
    tally = tmp_path / "tally.txt"
    mesh.fake.script(
        "tally",
        {"tool_calls": [{"id": "call_tally", "name": "demo__tally", "arguments": {"path": str(tally), "delay_s": 3}}]},
        {"text": "The tool ran once."},
    )
    request = agent_pb2.RunRequest(
        session_id="tally-1", input="Count once.", agent="tally", on_disconnect=agent_pb2.ON_DISCONNECT_CONTINUE
    )
    async with orchestrator_process(mesh, tmp_path) as (address, proc):
        async with grpc.aio.insecure_channel(address) as channel:
            seen = []
            async for event in agent_pb2_grpc.AgentServiceStub(channel).Run(request, metadata=tenant_md(), timeout=60):
                seen.append(event)
                if event.WhichOneof("event") == "tool_call":
                    break
            deadline = time.monotonic() + 10
            while not (tally.exists() and tally.read_text()):  # the side effect happened...
                assert time.monotonic() < deadline, "the tally tool never ran"
                await asyncio.sleep(0.05)
            proc.popen.kill()  # ...and the tool still sleeps when its orchestrator dies
            proc.popen.wait(10)
    run_id = seen[0].started.run_id

    rest = await collect(
        agent_stub.ResumeRun(
            agent_pb2.ResumeRunRequest(run_id=run_id, after_sequence=seen[-1].sequence), metadata=tenant_md(), timeout=60
        )
    )
    assert "resumed" in kinds(rest)
    (result,) = of_kind(rest, "tool_result")
    # The new replica's call waited for the first one and got its result: the tool ran once.
    assert result.replayed and not result.is_error
    assert json_format.MessageToDict(result.output) == {"result": 1}  # the lines of the file: one
    assert tally.read_text().splitlines() == ["ran"]
    assert rest[-1].final.status == agent_pb2.RUN_STATUS_COMPLETED and rest[-1].final.output == "The tool ran once."
    # The model read the tool's result in the repeated step's conversation.
    messages = mesh.fake.requests_of("tally")[-1]["body"]["messages"]
    assert messages[-1]["role"] == "tool" and messages[-1]["tool_call_id"] == "call_tally"


async def _memory(mesh: Mesh, fn: str, request):
    async with grpc.aio.insecure_channel(mesh.mesh.memory_address) as channel:
        return await getattr(memory_pb2_grpc.MemoryServiceStub(channel), fn)(request, metadata=tenant_md(), timeout=20)


async def _facts_of(mesh: Mesh, user: str, wanted: set[str], timeout_s: float = 30.0) -> set[str]:
    """The user's fact texts once they include ``wanted`` (extraction runs in the background)."""
    deadline = time.monotonic() + timeout_s
    while True:
        reply = await _memory(mesh, "ListFacts", memory_pb2.ListFactsRequest(user_id=user))
        texts = {f.text for f in reply.facts}
        if wanted <= texts or time.monotonic() > deadline:
            return texts
        await asyncio.sleep(0.2)


async def test_the_runs_user_owns_its_memory_and_its_turns_become_facts_an_agent_recalls(mesh: Mesh, agent_stub):
    mesh.fake.script("", {"text": "Noted, I will keep it short."})
    request = agent_pb2.RunRequest(
        session_id="facts-1",
        user_id="alice",
        input="I live in Lisbon. I prefer short answers. Can you remember that?",
        disable_retrieval=True,
        tools=["calculator"],
    )
    events = await collect(agent_stub.Run(request, metadata=tenant_md(), timeout=60))
    assert events[-1].final.status == agent_pb2.RUN_STATUS_COMPLETED and events[-1].final.session_version == 2
    run = (await agent_stub.GetRun(agent_pb2.GetRunRequest(run_id=events[0].started.run_id), metadata=tenant_md())).run
    assert run.user_id == "alice"
    # The turn is alice's session: the same session id of the default user is another, empty one.
    alice = await _memory(mesh, "GetContext", memory_pb2.GetContextRequest(session_id="facts-1", user_id="alice"))
    default = await _memory(mesh, "GetContext", memory_pb2.GetContextRequest(session_id="facts-1"))
    assert (alice.version, default.version) == (2, 0)
    # The memory service extracted alice's facts from the turn (in the background).
    wanted = {"I live in Lisbon.", "I prefer short answers."}
    assert wanted <= await _facts_of(mesh, "alice", wanted)

    # An agent with memory.facts recalls them into its context, in a new session.
    mesh.fake.script("concierge", {"text": "You live in Lisbon."})
    request = agent_pb2.RunRequest(session_id="facts-2", user_id="alice", input="Where do I live?", agent="concierge")
    events = await collect(agent_stub.Run(request, metadata=tenant_md(), timeout=60))
    (loaded,) = of_kind(events, "memory_loaded")
    assert loaded.facts >= 1 and not loaded.notice and loaded.messages == 0
    # (The router's OpenAI adapter joins consecutive system messages: instructions, then facts.)
    system = "\n".join(
        m["content"] for m in mesh.fake.requests_of("concierge")[-1]["body"]["messages"] if m["role"] == "system"
    )
    assert system.startswith("agent=concierge.") and f"{FACTS_HEADER}\n- I live in Lisbon." in system
    assert events[-1].final.output == "You live in Lisbon."

    # Another user of the tenant has no facts: nothing is recalled for them.
    mesh.fake.script("concierge", {"text": "I do not know yet."})
    request = agent_pb2.RunRequest(session_id="facts-2", user_id="bob", input="Where do I live?", agent="concierge")
    events = await collect(agent_stub.Run(request, metadata=tenant_md(), timeout=60))
    assert of_kind(events, "memory_loaded")[0].facts == 0
    body = mesh.fake.requests_of("concierge")[-1]["body"]["messages"]
    assert not any(FACTS_HEADER in m["content"] for m in body if m["role"] == "system")

    # The history is counted in the tokens of the agent's model (GetContextRequest.model): the
    # router alias "chat" (gpt-4o-mini, o200k) counts alice's turn differently from the memory
    # service's default tokenizer, and the run loaded exactly the model's count.
    counted = await _memory(mesh, "GetContext", memory_pb2.GetContextRequest(session_id="facts-1", user_id="alice",
                                                                             model="chat"))
    default = await _memory(mesh, "GetContext", memory_pb2.GetContextRequest(session_id="facts-1", user_id="alice"))
    assert counted.tokens_used != default.tokens_used, "the check cannot tell the tokenizers apart"
    mesh.fake.script("", {"text": "Short answers, Lisbon."})
    request = agent_pb2.RunRequest(session_id="facts-1", user_id="alice", input="What do you know?", model="chat",
                                   disable_retrieval=True)
    events = await collect(agent_stub.Run(request, metadata=tenant_md(), timeout=60))
    (loaded,) = of_kind(events, "memory_loaded")
    assert (loaded.messages, loaded.tokens) == (2, counted.tokens_used), (loaded, counted.tokens_used, default.tokens_used)


async def test_tools_get_the_runs_user(mesh: Mesh, agent_stub):
    """recall_memory reads the run's session of the run's user (ExecuteToolRequest.user_id)."""
    said = common_pb2.Message(role=common_pb2.ROLE_USER, content="My locker code is 4417.")
    await _memory(mesh, "AppendMessages", memory_pb2.AppendMessagesRequest(
        session_id="tools-user", user_id="dora", messages=[said]
    ))
    mesh.fake.script(
        "",
        {"tool_calls": [{"id": "call_recall", "name": "recall_memory", "arguments": {"query": "locker code"}}]},
        {"text": "Your locker code is 4417."},
    )
    request = agent_pb2.RunRequest(
        session_id="tools-user", user_id="dora", input="What is my locker code?", disable_retrieval=True,
        tools=["recall_memory"],
    )
    events = await collect(agent_stub.Run(request, metadata=tenant_md(), timeout=60))
    (result,) = of_kind(events, "tool_result")
    output = json_format.MessageToDict(result.output)
    assert [m["content"] for m in output["messages"]] == ["My locker code is 4417."]


async def test_without_a_user_id_the_run_acts_for_the_callers_subject(mesh: Mesh, agent_stub):
    async def user_of(metadata, user_id: str = "") -> str:
        mesh.fake.script("", {"text": "Hello."})
        request = agent_pb2.RunRequest(
            session_id="subject-1", input="Hi.", user_id=user_id, disable_retrieval=True, tools=["calculator"]
        )
        events = await collect(agent_stub.Run(request, metadata=metadata, timeout=60))
        reply = await agent_stub.GetRun(agent_pb2.GetRunRequest(run_id=events[0].started.run_id), metadata=tenant_md())
        return reply.run.user_id

    assert await user_of(tenant_md() + (("x-subject", "carol@example.com"),)) == "carol@example.com"
    # A subject that is no valid user id maps to one stable user.
    digest = hashlib.sha256(b"auth0|4242").hexdigest()[:32]
    assert await user_of(tenant_md() + (("x-subject", "auth0|4242"),)) == f"sub-{digest}"
    # An explicit user_id wins; no subject and no user_id is the default user.
    assert await user_of(tenant_md() + (("x-subject", "carol@example.com"),), user_id="erin") == "erin"
    assert await user_of(tenant_md()) == ""
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await user_of(tenant_md(), user_id="no spaces please")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "user_id must be" in err.value.details()


async def test_runs_survive_redis_forgetting_its_scripts(mesh: Mesh, agent_stub, raw_redis):
    """The run store sends its Lua scripts by hash (EVALSHA, no SCRIPT EXISTS round trip); a Redis
    that lost them (restarted, failed over) gets them again and the run goes on."""
    await raw_redis.script_flush()
    mesh.fake.script("calc", {"tool_calls": [{"id": "call_1", "name": "calculator", "arguments": {"expression": "2+3"}}]},
                     {"text": "5."})
    request = agent_pb2.RunRequest(session_id="noscript-1", input="2+3?", agent="calc")
    events = await collect(agent_stub.Run(request, metadata=tenant_md(), timeout=60))
    assert events[-1].final.status == agent_pb2.RUN_STATUS_COMPLETED and events[-1].final.output == "5."
    run = (await agent_stub.GetRun(agent_pb2.GetRunRequest(run_id=events[0].started.run_id), metadata=tenant_md())).run
    assert run.phase == agent_pb2.RUN_PHASE_FINISHED and run.last_sequence == events[-1].sequence


async def test_an_agent_recalling_facts_goes_on_without_them_when_memory_has_none(mesh: Mesh):
    """Facts are optional context: a memory service with facts turned off answers RecallFacts with
    FAILED_PRECONDITION, and the run says so in `memory_loaded.notice` and completes."""
    memory = MemoryService(
        MemorySettings(redis_url=mesh.redis_url, facts_enabled=False, compaction_trigger_tokens=0, readiness_interval_s=0.2),
        mesh=MeshSettings(llm_address=mesh.mesh.llm_address),
    )
    async with running_service(memory) as memory_address:
        downstream = mesh.mesh.model_copy(update={"memory_address": memory_address})
        service = OrchestratorService(mesh.settings(), downstream, catalog=load_catalog(AGENTS_YAML))
        async with running_service(service) as address, grpc.aio.insecure_channel(address) as channel:
            mesh.fake.script("concierge", {"text": "I do not remember you yet."})
            request = agent_pb2.RunRequest(session_id="nofacts-1", user_id="alice", input="Where do I live?",
                                           agent="concierge")
            events = await collect(agent_pb2_grpc.AgentServiceStub(channel).Run(request, metadata=tenant_md(), timeout=60))
    (loaded,) = of_kind(events, "memory_loaded")
    assert loaded.facts == 0 and loaded.notice.startswith("facts not recalled: FAILED_PRECONDITION")
    assert events[-1].final.status == agent_pb2.RUN_STATUS_COMPLETED


async def test_the_python_clients_run_for_a_user(mesh: Mesh):
    """``agent.run(user_id=...)`` of both Python clients sends ``RunRequest.user_id``: the run and
    its turn are that user's."""
    config = ClientConfig(address=mesh.orchestrator, tenant=TENANT)
    mesh.fake.script("", {"text": "Hello Carol."}, {"text": "Hello Dave."})
    async with AsyncClient(config) as client:
        stream = client.agent.run("Hi.", session_id="client-user", user_id="carol", disable_retrieval=True)
        final = await stream.result()
        run_ids = [stream.run_id]
    with Client(config) as client:
        sync_stream = client.agent.run("Hi.", session_id="client-user", user_id="dave", disable_retrieval=True)
        sync_final = await asyncio.to_thread(sync_stream.result)
        run_ids.append(sync_stream.run_id)
    assert (final.output, sync_final.output) == ("Hello Carol.", "Hello Dave.")
    async with grpc.aio.insecure_channel(mesh.orchestrator) as channel:
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        users = [(await stub.GetRun(agent_pb2.GetRunRequest(run_id=r), metadata=tenant_md())).run.user_id
                 for r in run_ids]
    assert users == ["carol", "dave"]
    for user in ("carol", "dave"):
        reply = await _memory(mesh, "GetContext", memory_pb2.GetContextRequest(session_id="client-user", user_id=user))
        assert reply.version == 2, (user, reply)
