"""Human in the loop: a tool marked ``requires_approval`` pauses the run with an interrupt; the
decision, sent to ANOTHER orchestrator replica after the first one stopped, continues the run
from its checkpoint in Redis."""

from __future__ import annotations

import json

import grpc
import pytest
from google.protobuf import struct_pb2

from agentmesh.agent.v1 import agent_pb2, agent_pb2_grpc
from tests.orchestrator.conftest import Mesh, collect, kinds, of_kind, tenant_md

pytestmark = pytest.mark.timeout(120)

CODE = "print(sum(range(10)))"
STEP_ONE = {
    "tool_calls": [
        {"id": "call_py", "name": "python", "arguments": {"code": CODE}},
        {"id": "call_calc", "name": "calculator", "arguments": {"expression": "9*5"}},
    ],
    "usage": {"input_tokens": 60, "output_tokens": 25},
}


async def test_an_approval_interrupt_is_resolved_on_another_replica_after_a_restart(mesh: Mesh):
    mesh.require_sandbox()
    mesh.fake.script("guarded", STEP_ONE, {"text": "Both give 45.", "usage": {"input_tokens": 120, "output_tokens": 4}})
    request = agent_pb2.RunRequest(session_id="approve-1", input="Add 0..9 two ways.", agent="guarded")
    asked = len(mesh.fake.requests_of("guarded"))
    async with mesh.orchestrator_instance() as first, grpc.aio.insecure_channel(first) as channel:
        paused = await collect(agent_pb2_grpc.AgentServiceStub(channel).Run(request, metadata=tenant_md(), timeout=60))
    # The first replica is gone now.
    run_id = paused[0].started.run_id
    assert kinds(paused)[-3:] == ["tool_result", "interrupt", "final"]
    assert [c.tool_call.id for c in of_kind(paused, "tool_call")] == ["call_calc"]  # the unguarded call ran
    assert of_kind(paused, "tool_result")[0].output.struct_value["result"] == 45
    (interrupt,) = of_kind(paused, "interrupt")
    (approval,) = interrupt.approvals
    assert (approval.invocation_id, approval.agent, approval.step) == ("guarded", "guarded", 1)
    assert approval.tool_call.name == "python" and approval.tool_call.arguments["code"] == CODE
    assert paused[-1].final.status == agent_pb2.RUN_STATUS_INTERRUPTED
    assert len(mesh.fake.requests_of("guarded")) == asked + 1  # nothing went back to the model yet

    async with mesh.orchestrator_instance() as second, grpc.aio.insecure_channel(second) as channel:
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        run = (await stub.GetRun(agent_pb2.GetRunRequest(run_id=run_id), metadata=tenant_md())).run
        assert run.phase == agent_pb2.RUN_PHASE_INTERRUPTED and run.status == agent_pb2.RUN_STATUS_INTERRUPTED
        assert run.interrupt == interrupt and run.last_sequence == paused[-1].sequence and run.replica == ""

        def resolve(*decisions: agent_pb2.ToolCallDecision, interrupt_id: str = interrupt.interrupt_id):
            return stub.ResolveInterrupt(
                agent_pb2.ResolveInterruptRequest(run_id=run_id, interrupt_id=interrupt_id, decisions=decisions),
                metadata=tenant_md(),
                timeout=60,
            )

        with pytest.raises(grpc.aio.AioRpcError) as info:
            await collect(resolve())
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "every pending tool call needs a decision; missing: call_py (guarded)" in info.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await collect(resolve(agent_pb2.ToolCallDecision(tool_call_id="call_py", approved=True), interrupt_id="stale"))
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION

        resumed = await collect(resolve(agent_pb2.ToolCallDecision(tool_call_id="call_py", approved=True)))
        assert resumed[0].sequence == paused[-1].sequence + 1  # one stream, continued
        assert resumed[0].interrupt_resolved.interrupt_id == interrupt.interrupt_id
        result = next(r for r in of_kind(resumed, "tool_result") if r.tool_call_id == "call_py")
        assert not result.is_error and result.output.struct_value["stdout"] == "45\n"
        assert "tool_progress" in kinds(resumed)  # the program's output streamed while it ran
        final = resumed[-1].final
        assert final.status == agent_pb2.RUN_STATUS_COMPLETED and final.output == "Both give 45." and final.steps == 2
        assert (final.usage.input_tokens, final.usage.output_tokens) == (180, 29)  # both model calls

        # The model got both results, in call order.
        second_call = mesh.fake.requests_of("guarded")[-1]["body"]["messages"]
        assert [m.get("tool_call_id") for m in second_call[-2:]] == ["call_py", "call_calc"]
        assert json.loads(second_call[-2]["content"])["stdout"] == "45\n"

        with pytest.raises(grpc.aio.AioRpcError) as info:  # decided once only
            await collect(resolve(agent_pb2.ToolCallDecision(tool_call_id="call_py", approved=True)))
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        # The whole stream, from either replica, is the concatenation of both parts.
        replay = await collect(stub.ResumeRun(agent_pb2.ResumeRunRequest(run_id=run_id), metadata=tenant_md()))
        assert replay == paused + resumed


async def test_a_rejected_call_does_not_run_and_the_model_reads_why(mesh: Mesh, agent_stub):
    mesh.fake.script(
        "guarded",
        {"tool_calls": [{"id": "call_rm", "name": "python", "arguments": {"code": "import shutil"}}]},
        {"text": "Understood, I will not run it."},
    )
    request = agent_pb2.RunRequest(session_id="reject-1", input="Clean up.", agent="guarded")
    paused = await collect(agent_stub.Run(request, metadata=tenant_md(), timeout=60))
    interrupt = of_kind(paused, "interrupt")[0]
    decision = agent_pb2.ToolCallDecision(tool_call_id="call_rm", approved=False, reason="no file deletion")
    resumed = await collect(
        agent_stub.ResolveInterrupt(
            agent_pb2.ResolveInterruptRequest(
                run_id=paused[0].started.run_id, interrupt_id=interrupt.interrupt_id, decisions=[decision]
            ),
            metadata=tenant_md(),
            timeout=60,
        )
    )
    assert "tool_call" not in kinds(resumed)  # it never started
    (result,) = of_kind(resumed, "tool_result")
    assert result.is_error and result.error_message == "a reviewer rejected this call: no file deletion; it did not run"
    tool_message = mesh.fake.requests_of("guarded")[-1]["body"]["messages"][-1]
    assert tool_message["tool_call_id"] == "call_rm" and "no file deletion" in tool_message["content"]
    assert resumed[-1].final.status == agent_pb2.RUN_STATUS_COMPLETED


async def test_an_approval_with_edited_arguments_runs_the_edited_call_and_the_model_reads_it(mesh: Mesh, agent_stub):
    mesh.require_sandbox()
    mesh.fake.script(
        "guarded",
        {"tool_calls": [{"id": "call_edit", "name": "python", "arguments": {"code": "print(6 * 9)"}}]},
        {"text": "It printed 42."},
    )
    request = agent_pb2.RunRequest(session_id="edit-1", input="Print six times seven.", agent="guarded")
    paused = await collect(agent_stub.Run(request, metadata=tenant_md(), timeout=60))
    run_id, interrupt = paused[0].started.run_id, of_kind(paused, "interrupt")[0]

    def resolve(decision: agent_pb2.ToolCallDecision):
        return agent_stub.ResolveInterrupt(
            agent_pb2.ResolveInterruptRequest(run_id=run_id, interrupt_id=interrupt.interrupt_id, decisions=[decision]),
            metadata=tenant_md(),
            timeout=60,
        )

    edited = struct_pb2.Struct()
    edited.update({"code": "print(6 * 7)"})
    refused = [
        (agent_pb2.ToolCallDecision(tool_call_id="call_edit", approved=False, arguments=edited),
         "arguments go only with an approval"),
        (agent_pb2.ToolCallDecision(tool_call_id="call_edit", approved=True,
                                    arguments=struct_pb2.Struct(fields={"code": struct_pb2.Value(string_value="x" * 70_000)})),
         "the limit is 65536"),
    ]
    for decision, words in refused:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await collect(resolve(decision))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in info.value.details()

    resumed = await collect(resolve(agent_pb2.ToolCallDecision(tool_call_id="call_edit", approved=True, arguments=edited)))
    (started,) = of_kind(resumed, "tool_call")
    assert started.tool_call.id == "call_edit" and started.tool_call.arguments["code"] == "print(6 * 7)"
    (result,) = of_kind(resumed, "tool_result")
    assert not result.is_error and result.output.struct_value["stdout"] == "42\n"
    assert resumed[0].interrupt_resolved.decisions[0].arguments == edited
    # The model reads the call as it ran, then its result.
    *_, asked, answered = mesh.fake.requests_of("guarded")[-1]["body"]["messages"]
    assert json.loads(asked["tool_calls"][0]["function"]["arguments"]) == {"code": "print(6 * 7)"}
    assert answered["tool_call_id"] == "call_edit" and json.loads(answered["content"])["stdout"] == "42\n"
    assert resumed[-1].final.status == agent_pb2.RUN_STATUS_COMPLETED


async def test_a_specialist_waiting_for_approval_pauses_the_whole_workflow(mesh: Mesh, agent_stub):
    mesh.require_sandbox()
    task = "Print the sum of 0..9."
    mesh.fake.script(
        "chief",
        {"tool_calls": [{"id": "call_delegate", "name": "transfer_to_guarded", "arguments": {"task": task}}]},
        {"text": "The guarded agent says 45."},
    )
    mesh.fake.script(
        "guarded",
        {"tool_calls": [{"id": "call_sum", "name": "python", "arguments": {"code": CODE}}]},
        {"text": "45"},
    )
    request = agent_pb2.RunRequest(session_id="vetted-1", input="Sum 0..9 with code.", agent="vetted")
    paused = await collect(agent_stub.Run(request, metadata=tenant_md(), timeout=60))
    (interrupt,) = of_kind(paused, "interrupt")
    assert [(a.invocation_id, a.agent, a.tool_call.id) for a in interrupt.approvals] == [("guarded", "guarded", "call_sum")]
    assert paused[-1].final.status == agent_pb2.RUN_STATUS_INTERRUPTED
    assert "agent_completed" not in kinds(paused)  # neither the specialist nor the supervisor finished

    resumed = await collect(
        agent_stub.ResolveInterrupt(
            agent_pb2.ResolveInterruptRequest(
                run_id=paused[0].started.run_id,
                interrupt_id=interrupt.interrupt_id,
                decisions=[agent_pb2.ToolCallDecision(tool_call_id="call_sum", approved=True, invocation_id="guarded")],
            ),
            metadata=tenant_md(),
            timeout=60,
        )
    )
    # The specialist continues where it paused, inside the same handoff: nothing is announced twice.
    assert "handoff" not in kinds(resumed) and "agent_started" not in kinds(resumed)
    assert [c.tool_call.id for c in of_kind(resumed, "tool_call")] == ["call_sum"]
    assert [(e.agent, e.agent_completed.output) for e in resumed if e.WhichOneof("event") == "agent_completed"] == [
        ("guarded", "45"), ("chief", "The guarded agent says 45."),
    ]
    handoff_result = next(r for r in of_kind(resumed, "tool_result") if r.tool_call_id == "call_delegate")
    assert handoff_result.output.struct_value["output"] == "45" and not handoff_result.is_error
    assert resumed[-1].final.status == agent_pb2.RUN_STATUS_COMPLETED
    assert resumed[-1].final.output == "The guarded agent says 45." and resumed[-1].final.steps == 4
