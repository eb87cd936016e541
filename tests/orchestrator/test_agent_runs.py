"""One agent from the YAML, driven over several steps by the scripted model through the real
router, with real tools, memory and Redis: parallel tool calls under the concurrency limit, the
distinct final statuses, a run without an agent name, the checkpoint and event stream it leaves
in Redis, and the statuses of bad requests."""

from __future__ import annotations

import json

import grpc
import pytest
import redis.asyncio as aioredis

from agentmesh.agent.v1 import agent_pb2, agent_pb2_grpc
from agentmesh.memory.v1 import memory_pb2, memory_pb2_grpc
from tests.orchestrator.conftest import Mesh, collect, kinds, of_kind, tenant_md

pytestmark = pytest.mark.timeout(120)


def sleep_call(call_id: str, seconds: float, label: str) -> dict:
    code = f"import time\ntime.sleep({seconds})\nprint({label!r})\n"
    return {"id": call_id, "name": "python", "arguments": {"code": code}, "fragments": 5}


async def session_version(mesh: Mesh, session_id: str) -> int:
    async with grpc.aio.insecure_channel(mesh.mesh.memory_address) as channel:
        reply = await memory_pb2_grpc.MemoryServiceStub(channel).GetContext(
            memory_pb2.GetContextRequest(session_id=session_id), metadata=tenant_md(), timeout=10
        )
    return reply.version


async def test_parallel_tool_calls_run_concurrently_within_the_limit(mesh: Mesh, agent_stub):
    mesh.require_sandbox()
    calls = [sleep_call(f"call_sleep_{i}", 1.0, f"slept {i}") for i in range(3)]

    def script() -> None:
        mesh.fake.script(
            "sleeper",
            {"tool_calls": calls, "usage": {"input_tokens": 40, "output_tokens": 30}},
            {"text": "All three slept.", "usage": {"input_tokens": 90, "output_tokens": 4}},
        )

    # The default limit (4) lets the three one-second programs run at once...
    script()
    request = agent_pb2.RunRequest(session_id="parallel-1", input="Sleep three times.", agent="sleeper")
    events = await collect(agent_stub.Run(request, metadata=tenant_md(), timeout=60))
    k = kinds(events)
    assert k.count("tool_call") == 3 and k.count("tool_result") == 3
    assert max(i for i, x in enumerate(k) if x == "tool_call") < k.index("tool_result")  # all started first
    results = {r.tool_call_id: r for r in of_kind(events, "tool_result")}
    assert all(not r.is_error and r.duration_ms >= 950 for r in results.values()), results
    assert results["call_sleep_2"].output.struct_value["stdout"] == "slept 2\n"
    first_step = of_kind(events, "step_completed")[0]
    # Run one after another the three calls would take >= 2850 ms (3 x 950); the upper bound
    # leaves about 1.5 s for sandbox start-up on a loaded machine and still fails on serial calls.
    assert first_step.tool_calls == 3 and 950 <= first_step.tools_ms < 2500, first_step
    assert first_step.duration_ms >= first_step.model_ms + first_step.tools_ms
    # Every event says where it comes from.
    for e in events:
        assert e.agent == "sleeper"
        assert e.invocation_id == ("" if e.WhichOneof("event") in ("started", "final") else "sleeper")
        if e.WhichOneof("event") in ("tool_call", "tool_result", "tool_progress"):
            assert e.step == 1
        if e.WhichOneof("event") == "step_started":
            assert e.step == e.step_started.step
    final = events[-1].final
    assert final.status == agent_pb2.RUN_STATUS_COMPLETED and final.steps == 2 and final.output == "All three slept."
    # The model got the three results back, in call order.
    second = mesh.fake.requests_of("sleeper")[-1]["body"]
    assert [m["tool_call_id"] for m in second["messages"][-3:]] == ["call_sleep_0", "call_sleep_1", "call_sleep_2"]
    assert json.loads(second["messages"][-1]["content"])["stdout"] == "slept 2\n"

    # ...a replica limited to 2 runs them in two waves.
    script()
    async with mesh.orchestrator_instance(tool_parallelism=2) as address, grpc.aio.insecure_channel(address) as channel:
        limited = await collect(agent_pb2_grpc.AgentServiceStub(channel).Run(request, metadata=tenant_md(), timeout=60))
    step = of_kind(limited, "step_completed")[0]
    assert 1900 <= step.tools_ms < 2900, step
    assert limited[-1].final.status == agent_pb2.RUN_STATUS_COMPLETED


async def test_max_steps_ends_with_its_own_status_after_running_the_last_tools(mesh: Mesh, agent_stub):
    turn = {"tool_calls": [{"name": "calculator", "arguments": {"expression": "2+2"}}]}
    mesh.fake.script("calc", turn, turn, turn, {"text": "never asked for"})
    before = await session_version(mesh, "steps-1")
    request = agent_pb2.RunRequest(session_id="steps-1", input="Keep adding.", agent="calc")
    events = await collect(agent_stub.Run(request, metadata=tenant_md(), timeout=60))
    final = events[-1].final
    assert final.status == agent_pb2.RUN_STATUS_MAX_STEPS and final.steps == 3  # calc allows 3
    assert kinds(events).count("tool_result") == 3 and mesh.fake.pending("calc") == 1
    # The turn is remembered, ending on tool results (never on an unanswered call).
    assert final.session_version == before + 7  # user + 3 x (assistant with call, tool result)


async def test_the_token_budget_stops_the_run_before_the_next_model_call(mesh: Mesh, agent_stub):
    turn = {"tool_calls": [{"name": "calculator", "arguments": {"expression": "1+1"}}]}
    mesh.fake.script(
        "thrifty",
        {**turn, "usage": {"input_tokens": 200, "output_tokens": 20}},  # 220 of 300: go on
        {**turn, "usage": {"input_tokens": 150, "output_tokens": 10}},  # 380: spent
        {"text": "unreachable"},
    )
    request = agent_pb2.RunRequest(session_id="budget-1", input="Add forever.", agent="thrifty")
    events = await collect(agent_stub.Run(request, metadata=tenant_md(), timeout=60))
    final = events[-1].final
    assert final.status == agent_pb2.RUN_STATUS_BUDGET_EXHAUSTED and final.steps == 2
    assert (final.usage.input_tokens, final.usage.output_tokens, final.usage.total_tokens) == (350, 30, 380)
    assert kinds(events).count("tool_result") == 2 and mesh.fake.pending("thrifty") == 1
    run = (await agent_stub.GetRun(agent_pb2.GetRunRequest(run_id=events[0].started.run_id), metadata=tenant_md())).run
    assert run.status == agent_pb2.RUN_STATUS_BUDGET_EXHAUSTED and run.phase == agent_pb2.RUN_PHASE_FINISHED
    assert run.error_message == "run budget: 380 tokens used of a budget of 300"


async def test_the_cost_budget_uses_the_routers_prices(mesh: Mesh, agent_stub):
    turn = {"tool_calls": [{"name": "calculator", "arguments": {"expression": "3*3"}}]}
    mesh.fake.script(
        "pricey",
        {**turn, "usage": {"input_tokens": 150, "output_tokens": 10}},  # $0.15 + $0.02
        {**turn, "usage": {"input_tokens": 100, "output_tokens": 10}},  # + $0.12 = $0.29 of $0.25
        {"text": "unreachable"},
    )
    request = agent_pb2.RunRequest(session_id="budget-2", input="Multiply.", agent="pricey")
    events = await collect(agent_stub.Run(request, metadata=tenant_md(), timeout=60))
    final = events[-1].final
    assert final.status == agent_pb2.RUN_STATUS_BUDGET_EXHAUSTED and final.steps == 2
    assert final.cost_usd == pytest.approx(0.29)


async def test_a_run_without_an_agent_is_todays_run_and_is_stored_in_redis(
    mesh: Mesh, agent_stub, raw_redis: aioredis.Redis
):
    mesh.fake.script(
        "",
        {"tool_calls": [{"id": "call_plain", "name": "calculator", "arguments": {"expression": "6*7"}}]},
        {"text": "Six times seven is 42.", "text_chunks": 3},
    )
    request = agent_pb2.RunRequest(
        session_id="plain-1", input="What is 6 times 7?", tools=["calculator"], disable_retrieval=True
    )
    events = await collect(agent_stub.Run(request, metadata=tenant_md(), timeout=60))
    assert kinds(events) == [
        "started", "memory_loaded",
        "step_started", "tool_call", "tool_result", "step_completed",
        "step_started", "text_delta", "text_delta", "text_delta", "step_completed",
        "final",
    ]
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    assert events[0].started.agent == "agentmesh" and all(e.agent == "agentmesh" for e in events)
    final = events[-1].final
    assert final.status == agent_pb2.RUN_STATUS_COMPLETED and final.output == "Six times seven is 42."
    body = mesh.fake.requests_of("")[-2]["body"]
    assert [t["function"]["name"] for t in body["tools"]] == ["calculator"]
    assert body["messages"][0] == {"role": "user", "content": "What is 6 times 7?"}  # no system prompt added

    # The checkpoint and every event are in Redis, with a TTL; ResumeRun replays them exactly.
    run_id = events[0].started.run_id
    prefix = f"agentmesh:orchestrator:run:{{orch:{run_id}}}"
    state = json.loads(await raw_redis.get(f"{prefix}:state"))
    assert state["phase"] == "finished" and state["sequence"] == len(events)
    assert await raw_redis.xlen(f"{prefix}:events") == len(events)
    assert 0 < await raw_redis.ttl(f"{prefix}:state") <= 7 * 86_400
    assert not await raw_redis.exists(f"{prefix}:lease")  # released at the end
    replay = await collect(
        agent_stub.ResumeRun(agent_pb2.ResumeRunRequest(run_id=run_id), metadata=tenant_md(), timeout=30)
    )
    assert replay == events
    tail = await collect(
        agent_stub.ResumeRun(agent_pb2.ResumeRunRequest(run_id=run_id, after_sequence=9), metadata=tenant_md(), timeout=30)
    )
    assert tail == events[9:]


async def test_bad_requests_get_a_status_that_says_what_to_change(mesh: Mesh, agent_stub):
    async def code_of(call) -> tuple[grpc.StatusCode, str]:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await collect(call) if hasattr(call, "__aiter__") else await call
        return info.value.code(), info.value.details()

    md = tenant_md()
    code, details = await code_of(agent_stub.Run(agent_pb2.RunRequest(session_id="s", input="hi", agent="nobody"), metadata=md))
    assert code == grpc.StatusCode.NOT_FOUND and "unknown agent 'nobody'" in details and "team" in details
    code, details = await code_of(
        agent_stub.Run(agent_pb2.RunRequest(session_id="s", input="hi", agent="calc", model="x", top_k=3), metadata=md)
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "decides model, top_k" in details
    code, details = await code_of(agent_stub.Run(agent_pb2.RunRequest(session_id="s", input="hi", tools=["nope"]), metadata=md))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "unknown tool(s) 'nope'" in details
    code, _ = await code_of(agent_stub.ResumeRun(agent_pb2.ResumeRunRequest(run_id="not-an-id"), metadata=md))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    code, _ = await code_of(agent_stub.GetRun(agent_pb2.GetRunRequest(run_id="0" * 32), metadata=md))
    assert code == grpc.StatusCode.NOT_FOUND

    # A finished run: another tenant cannot see it; it cannot be cancelled or resolved.
    mesh.fake.script("writer", {"text": "Done."})
    events = await collect(agent_stub.Run(agent_pb2.RunRequest(session_id="s", input="hi", agent="writer"), metadata=md))
    run_id = events[0].started.run_id
    code, _ = await code_of(agent_stub.GetRun(agent_pb2.GetRunRequest(run_id=run_id), metadata=tenant_md("other")))
    assert code == grpc.StatusCode.NOT_FOUND
    code, details = await code_of(agent_stub.CancelRun(agent_pb2.CancelRunRequest(run_id=run_id), metadata=md))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "already finished (RUN_STATUS_COMPLETED)" in details
    code, details = await code_of(
        agent_stub.ResolveInterrupt(agent_pb2.ResolveInterruptRequest(run_id=run_id, interrupt_id="x"), metadata=md)
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "not waiting for a decision" in details

    listed = (await agent_stub.ListAgents(agent_pb2.ListAgentsRequest(), metadata=md)).agents
    by_name = {a.name: a for a in listed}
    assert by_name["team"].kind == "supervisor" and list(by_name["team"].members) == ["lead", "researcher", "writer"]
    assert by_name["panel"].members[-1] == "judge" and by_name["calc"].kind == "agent"
