"""Multi-agent workflows from the YAML, each agent answered by its own scripted model turns: a
supervisor handing a task off to a specialist, a sequential pipeline, a parallel fan-out with an
aggregator. Every event names the agent (and invocation, and step) it comes from."""

from __future__ import annotations

import json
import time

import pytest

from agentmesh.agent.v1 import agent_pb2
from tests.orchestrator.conftest import Mesh, collect, kinds, of_kind, tenant_md

pytestmark = pytest.mark.timeout(120)


def by_invocation(events: list[agent_pb2.RunResponse], invocation: str) -> list[str]:
    return [e.WhichOneof("event") for e in events if e.invocation_id == invocation]


async def test_the_supervisor_hands_a_task_to_a_specialist_and_answers_with_its_result(mesh: Mesh, agent_stub):
    task = "When was the fourth Eddystone Lighthouse completed, and how long did it stand?"
    mesh.fake.script(
        "lead",
        {"tool_calls": [{"id": "call_handoff", "name": "transfer_to_researcher", "arguments": {"task": task}}]},
        {"text": "It was completed in 1759 and stood for 118 years.", "text_chunks": 2},
    )
    mesh.fake.script(
        "researcher",
        {"tool_calls": [{"id": "call_years", "name": "calculator", "arguments": {"expression": "1877-1759"}}]},
        {"text": "Completed in 1759 [1]; it stood 118 years.", "text_chunks": 2},
    )
    request = agent_pb2.RunRequest(session_id="team-1", input="Tell me about the Eddystone Lighthouse.", agent="team")
    events = await collect(agent_stub.Run(request, metadata=tenant_md(), timeout=60))

    (handoff,) = of_kind(events, "handoff")
    assert (handoff.from_agent, handoff.to_agent, handoff.to_invocation_id) == ("lead", "researcher", "researcher")
    assert handoff.tool_call_id == "call_handoff" and handoff.task == task
    started = {s.agent: s for s in of_kind(events, "agent_started")}
    assert started["lead"].role == agent_pb2.AGENT_ROLE_SUPERVISOR
    assert started["researcher"].role == agent_pb2.AGENT_ROLE_SPECIALIST
    assert started["researcher"].parent_invocation_id == "lead" and started["researcher"].input == task
    # The specialist's whole run nests inside the supervisor's handoff call.
    assert by_invocation(events, "researcher") == [
        "agent_started", "retrieval",
        "step_started", "tool_call", "tool_result", "step_completed",
        "step_started", "text_delta", "text_delta", "step_completed", "agent_completed",
    ]
    assert all(e.agent == "researcher" for e in events if e.invocation_id == "researcher")
    # The specialist retrieved for its own task, with its own settings (top_k: 1).
    (retrieval,) = of_kind([e for e in events if e.invocation_id == "researcher"], "retrieval")
    assert [c.document_id for c in retrieval.chunks] == ["lighthouse"]
    k = kinds(events)
    handoff_result = next(e for e in events if e.WhichOneof("event") == "tool_result" and e.invocation_id == "lead")
    assert events.index(handoff_result) > max(i for i, e in enumerate(events) if e.invocation_id == "researcher")
    assert handoff_result.agent == "lead" and handoff_result.step == 1
    result = handoff_result.tool_result
    assert not result.is_error and result.name == "transfer_to_researcher"
    assert dict(result.output.struct_value) == {
        "agent": "researcher", "status": "COMPLETED", "output": "Completed in 1759 [1]; it stood 118 years."
    }

    # What the models saw: the supervisor is offered the handoff tools only; the specialist gets
    # its task as the user message and the calculator; the supervisor gets the answer back.
    lead_first, lead_second = (r["body"] for r in mesh.fake.requests_of("lead")[-2:])
    assert sorted(t["function"]["name"] for t in lead_first["tools"]) == ["transfer_to_researcher", "transfer_to_writer"]
    assert json.loads(lead_second["messages"][-1]["content"])["output"].startswith("Completed in 1759")
    researcher_first = mesh.fake.requests_of("researcher")[-2]["body"]
    assert researcher_first["messages"][-1] == {"role": "user", "content": task}
    assert [t["function"]["name"] for t in researcher_first["tools"]] == ["calculator"]
    system = researcher_first["messages"][0]
    assert system["role"] == "system" and system["content"].startswith("agent=researcher. Find facts")
    assert "[1] The Eddystone Lighthouse" in system["content"]  # its retrieved chunk, numbered for citing
    assert "system" not in [m["role"] for m in lead_first["messages"][1:]]  # the lead has no context

    final = events[-1].final
    assert k[-1] == "final" and final.status == agent_pb2.RUN_STATUS_COMPLETED
    assert final.output == "It was completed in 1759 and stood for 118 years." and final.steps == 4
    assert final.session_version >= 2  # the input and the supervisor's answer


async def test_a_sequential_pipeline_hands_each_answer_to_the_next_stage(mesh: Mesh, agent_stub):
    mesh.fake.script("researcher", {"text": "Notes: completed 1759; granite; stood until 1877."})
    mesh.fake.script("writer", {"text": "Smeaton's tower, finished in 1759, stood until 1877."})
    request = agent_pb2.RunRequest(session_id="report-1", input="Write about the lighthouse.", agent="report")
    events = await collect(agent_stub.Run(request, metadata=tenant_md(), timeout=60))
    started = of_kind(events, "agent_started")
    completed = of_kind(events, "agent_completed")
    assert [s.agent for s in started] == ["researcher", "writer"]
    assert all(s.role == agent_pb2.AGENT_ROLE_STAGE for s in started)
    assert [c.status for c in completed] == [agent_pb2.RUN_STATUS_COMPLETED] * 2
    k = kinds(events)
    assert k.index("agent_completed") < [i for i, x in enumerate(k) if x == "agent_started"][1]  # one after the other
    writer_input = started[1].input
    assert writer_input.startswith("Write about the lighthouse.")
    assert "Output of the previous stage (researcher)" in writer_input and "stood until 1877" in writer_input
    assert mesh.fake.requests_of("writer")[-1]["body"]["messages"][-1]["content"] == writer_input
    final = events[-1].final
    assert final.status == agent_pb2.RUN_STATUS_COMPLETED and final.steps == 2
    assert final.output == "Smeaton's tower, finished in 1759, stood until 1877."


async def test_a_parallel_fan_out_runs_the_branches_at_once_then_aggregates(mesh: Mesh, agent_stub):
    slow = {"chunk_delay_s": 0.15, "text_chunks": 6}
    mesh.fake.script("optimist", {"text": "Build it: it saves ships and lives.", **slow})
    mesh.fake.script("skeptic", {"text": "Do not: granite is costly and slow.", **slow})
    mesh.fake.script("judge", {"text": "Build it; safety outweighs cost."})
    request = agent_pb2.RunRequest(session_id="panel-1", input="Should we build a lighthouse?", agent="panel")
    started_at = time.monotonic()
    events = await collect(agent_stub.Run(request, metadata=tenant_md(), timeout=60))
    elapsed = time.monotonic() - started_at

    deltas = [e.agent for e in events if e.WhichOneof("event") == "text_delta" and e.agent != "judge"]
    assert set(deltas) == {"optimist", "skeptic"}
    first_skeptic = deltas.index("skeptic")
    last_optimist = len(deltas) - 1 - deltas[::-1].index("optimist")
    first_optimist = deltas.index("optimist")
    last_skeptic = len(deltas) - 1 - deltas[::-1].index("skeptic")
    assert first_skeptic < last_optimist and first_optimist < last_skeptic, deltas  # interleaved: concurrent
    assert elapsed < 2 * 6 * 0.15  # less than the two branches one after the other
    started = {s.agent: s for s in of_kind(events, "agent_started")}
    assert started["optimist"].role == started["skeptic"].role == agent_pb2.AGENT_ROLE_BRANCH
    assert started["judge"].role == agent_pb2.AGENT_ROLE_AGGREGATOR
    judge_input = started["judge"].input
    assert "### optimist (COMPLETED)\nBuild it: it saves ships and lives." in judge_input
    assert "### skeptic (COMPLETED)\nDo not: granite is costly and slow." in judge_input
    judge_events = [i for i, e in enumerate(events) if e.agent == "judge" and e.invocation_id]
    branch_done = [i for i, e in enumerate(events) if e.WhichOneof("event") == "agent_completed" and e.agent != "judge"]
    assert min(judge_events) > max(branch_done)  # the aggregator runs once both branches finished
    final = events[-1].final
    assert final.status == agent_pb2.RUN_STATUS_COMPLETED and final.output == "Build it; safety outweighs cost."
    assert final.steps == 3
