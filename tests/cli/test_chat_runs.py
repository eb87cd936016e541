"""`agentmesh chat --agent` and `agentmesh runs show|approve|reject|cancel` as a person runs them
(a real process each), against a real orchestrator: Redis, the LLM router talking to the scripted
OpenAI fake, memory and tools in this process. Retrieval is not started (the agent does not
retrieve), so the orchestrator reports NOT_SERVING but answers every call, and the CLI talks to
it directly (`--gateway` is any AgentService address)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest

from agentmesh.agent.v1 import agent_pb2, agent_pb2_grpc
from agentmesh.services.cli.processes import free_port, start_redis
from agentmesh.services.llm.service import LLMService, LLMSettings
from agentmesh.services.memory.service import MemoryService, MemorySettings
from agentmesh.services.orchestrator.agents import load_catalog
from agentmesh.services.orchestrator.service import OrchestratorService, OrchestratorSettings
from agentmesh.services.runtime.settings import MeshSettings
from agentmesh.services.tools.service import ToolsService, ToolsSettings
from tests.fakes.openai_server import FakeOpenAIServer
from tests.support import running_service

pytestmark = pytest.mark.timeout(120)

AGENTS = """\
agents:
  guarded:
    instructions: Compute, but ask before each calculation.
    tools: [{name: calculator, requires_approval: true}]
    retrieval: {enabled: false}
    memory: {enabled: false}
"""
_RUN_LINE = re.compile(r"^run ([0-9a-f]{32}) · request ", re.M)


@dataclass
class Orchestrator:
    address: str
    fake: FakeOpenAIServer


@pytest.fixture(scope="module")
async def orchestrator(tmp_path_factory) -> AsyncIterator[Orchestrator]:
    root = tmp_path_factory.mktemp("cli-runs")
    port = free_port()
    redis = start_redis(port, root / "redis", root / "logs", appendonly=False)
    redis_url = f"redis://127.0.0.1:{port}/0"
    fake = FakeOpenAIServer([]).start()
    (root / "models.yaml").write_text(
        "default_model: chat\nmodels:\n  chat:\n    deployments:\n"
        f"      - {{name: fake, provider: openai, model: gpt-4o-mini, base_url: '{fake.base_url}'}}\n"
    )
    (root / "agents.yaml").write_text(AGENTS)
    stack = contextlib.AsyncExitStack()
    try:
        llm = await stack.enter_async_context(running_service(
            LLMService(LLMSettings(catalogue=str(root / "models.yaml"), fallback_to_extractive=False))
        ))
        memory = await stack.enter_async_context(running_service(MemoryService(
            MemorySettings(redis_url=redis_url, facts_enabled=False, compaction_trigger_tokens=0),
            mesh=MeshSettings(llm_address=llm),
        )))
        tools = await stack.enter_async_context(running_service(ToolsService(
            ToolsSettings(python_enabled=False, redis_url=redis_url)
        )))
        mesh = MeshSettings(llm_address=llm, memory_address=memory, tools_address=tools,
                            retrieval_address=f"127.0.0.1:{free_port()}")
        service = OrchestratorService(
            OrchestratorSettings(redis_url=redis_url, tools_cache_s=0), mesh, catalog=load_catalog(root / "agents.yaml")
        )
        address = await stack.enter_async_context(running_service(service, wait_serving=False))
        async with grpc.aio.insecure_channel(address) as channel:  # answering (NOT_SERVING: no retrieval)
            for _ in range(200):
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await agent_pb2_grpc.AgentServiceStub(channel).ListAgents(agent_pb2.ListAgentsRequest(), timeout=1)
                    break
                await asyncio.sleep(0.05)
        yield Orchestrator(address, fake)
    finally:
        await stack.aclose()
        fake.stop()
        redis.stop()


async def agentmesh(o: Orchestrator, *args: str) -> tuple[int, str, str]:
    """``agentmesh *args --gateway <orchestrator> --tenant acme`` as a process: (exit code, stdout, stderr)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTMESH_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agentmesh.services.cli.main", *args, "--gateway", o.address, "--tenant", "acme",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode, out.decode(), err.decode()


def tool_result(line: str) -> dict:
    """The output printed by a ``← calculator {...} (N ms)`` line."""
    match = re.fullmatch(r"← calculator (\{.*\}) \(\d+ ms\)", line)
    assert match, line
    return json.loads(match.group(1))


def calc(call_id: str, expression: str) -> dict:
    return {"id": call_id, "name": "calculator", "arguments": {"expression": expression}}


async def test_chat_prints_the_interrupt_and_runs_approve_continues_the_run(orchestrator: Orchestrator):
    orchestrator.fake.enqueue({"tool_calls": [calc("call_calc", "6*7")]}, {"text": "It is 42."})
    code, out, err = await agentmesh(orchestrator, "chat", "What is 6*7?", "--session", "cli-1", "--agent", "guarded")
    assert code == 0, err
    run_id = _RUN_LINE.search(out).group(1)
    lines = out.splitlines()
    start = lines.index(next(x for x in lines if x.startswith("approval needed")))
    assert re.fullmatch(rf"approval needed for 1 tool call \(run {run_id}, interrupt [0-9a-f]+\):", lines[start])
    assert lines[start + 1:start + 4] == [
        '  call_calc · calculator({"expression":"6*7"}) · agent guarded, step 1',
        f"approve with: agentmesh runs approve {run_id} call_calc --tenant acme",
        f'reject with:  agentmesh runs reject {run_id} call_calc --reason "why" --tenant acme',
    ]
    assert "· INTERRUPTED ·" in lines[-1] and "→ tool" not in out  # the calculator did not run

    code, out, err = await agentmesh(orchestrator, "runs", "show", run_id)
    assert code == 0, err
    first, second = out.splitlines()[:2]
    assert first == f"run {run_id} · agent guarded · session cli-1"
    assert re.fullmatch(r"INTERRUPTED · 1 step · \d+ input \+ \d+ output tokens · events 1\.\.\d+", second), second
    assert "  call_calc · calculator" in out and f"approve with: agentmesh runs approve {run_id} call_calc" in out

    code, out, err = await agentmesh(orchestrator, "runs", "approve", run_id, "call_calc")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "resumed: approved call_calc"
    assert lines[1] == '→ tool calculator({"expression":"6*7"})'
    assert tool_result(lines[2]) == {"text": "42", "expression": "6*7", "result": 42}, lines
    assert "It is 42." in lines and "· COMPLETED ·" in lines[-1]

    # Nothing waits any more.
    code, _, err = await agentmesh(orchestrator, "runs", "approve", run_id)
    assert code == 1 and f"run {run_id} is FINISHED (COMPLETED): it waits for no decision" in err


async def test_every_pending_call_needs_a_decision_and_rejections_reach_the_model(orchestrator: Orchestrator):
    fake = orchestrator.fake
    fake.enqueue({"tool_calls": [calc("call_a", "1+1"), calc("call_b", "2+2")]}, {"text": "Only one ran."})
    code, out, err = await agentmesh(orchestrator, "chat", "Add twice.", "--session", "cli-2", "--agent", "guarded")
    assert code == 0, err
    run_id = _RUN_LINE.search(out).group(1)
    assert f"approve with: agentmesh runs approve {run_id} call_a call_b --tenant acme" in out

    code, _, err = await agentmesh(orchestrator, "runs", "approve", run_id, "call_a")
    assert code == 2 and "every pending call needs a decision; also name call_b" in err
    code, _, err = await agentmesh(orchestrator, "runs", "approve", run_id, "call_x")
    assert code == 2 and "has no pending tool call 'call_x'; it waits for: call_a (calculator), call_b (calculator)" in err

    code, out, err = await agentmesh(
        orchestrator, "runs", "approve", run_id, "call_a", "--reject", "call_b", "--reason", "too costly"
    )
    assert code == 0, err
    assert "resumed: approved call_a, rejected call_b" in out
    results = [tool_result(x) for x in out.splitlines() if x.startswith("← calculator {")]
    assert results == [{"text": "2", "expression": "1+1", "result": 2}]
    assert "← calculator failed: a reviewer rejected this call: too costly; it did not run" in out
    assert "Only one ran." in out
    tool_messages = [m for m in fake.bodies[-1]["messages"] if m["role"] == "tool"]
    assert [m["tool_call_id"] for m in tool_messages] == ["call_a", "call_b"]
    assert "too costly" in tool_messages[1]["content"]


async def test_approve_with_edited_arguments(orchestrator: Orchestrator):
    fake = orchestrator.fake
    fake.enqueue({"tool_calls": [calc("call_e", "6*9"), calc("call_f", "1+1")]}, {"text": "It is 42."})
    code, out, err = await agentmesh(orchestrator, "chat", "Six times seven?", "--session", "cli-5", "--agent", "guarded")
    assert code == 0, err
    run_id = _RUN_LINE.search(out).group(1)
    for edit, words in (
        ("call_e", "use CALL_ID="),
        ("call_e={", "the arguments are not JSON"),
        ("call_e=[1]", "the arguments must be a JSON object, not list"),
        ('call_x={"expression": "1"}', "has no pending tool call 'call_x'"),
    ):
        code, _, err = await agentmesh(orchestrator, "runs", "approve", run_id, "--edit", edit)
        assert code == 2 and words in err, (edit, err)
    code, _, err = await agentmesh(
        orchestrator, "runs", "approve", run_id, "call_e", "--reject", "call_f", "--edit", 'call_f={"expression": "2"}'
    )
    assert code == 2 and "call_f is rejected: --edit goes only with an approval" in err

    code, out, err = await agentmesh(
        orchestrator, "runs", "approve", run_id, "--edit", 'call_e={"expression": "6*7"}'
    )
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "resumed: approved call_e (edited), approved call_f"
    assert '→ tool calculator({"expression":"6*7"})' in lines
    assert sorted(tool_result(x)["result"] for x in lines if x.startswith("← calculator {")) == [2, 42]  # in parallel
    asked = next(m for m in fake.bodies[-1]["messages"] if m.get("tool_calls"))
    assert json.loads(asked["tool_calls"][0]["function"]["arguments"]) == {"expression": "6*7"}


async def test_reject_all_then_cancel_and_bad_names(orchestrator: Orchestrator):
    orchestrator.fake.enqueue({"tool_calls": [calc("call_r", "9*9")]}, {"tool_calls": [calc("call_s", "8*8")]})
    code, out, err = await agentmesh(orchestrator, "chat", "Square nine.", "--session", "cli-3", "--agent", "guarded")
    assert code == 0, err
    run_id = _RUN_LINE.search(out).group(1)
    # Rejecting every pending call (none named): the model asks again, and the run pauses again.
    code, out, err = await agentmesh(orchestrator, "runs", "reject", run_id, "--reason", "no")
    assert code == 0, err
    assert "resumed: rejected call_r" in out and "call_s · calculator" in out and "· INTERRUPTED ·" in out
    code, out, err = await agentmesh(orchestrator, "runs", "cancel", run_id, "--reason", "changed my mind")
    assert code == 0, err
    assert out.strip() == f"run {run_id}: CANCELLED"
    code, out, _ = await agentmesh(orchestrator, "runs", "show", run_id)
    assert "FINISHED (CANCELLED)" in out and "reason: changed my mind" in out

    code, _, err = await agentmesh(orchestrator, "chat", "Hi.", "--session", "cli-4", "--agent", "nobody")
    assert code == 1 and "NOT_FOUND: unknown agent 'nobody'; agents and workflows: guarded" in err
    code, _, err = await agentmesh(orchestrator, "chat", "Hi.", "--session", "cli-4", "--agent", "guarded",
                                   "--model", "chat")
    assert code == 2 and "--agent guarded decides the model and collection" in err
    code, _, err = await agentmesh(orchestrator, "runs", "show", "f" * 32)
    assert code == 1 and f"NOT_FOUND: no run {'f' * 32}" in err
