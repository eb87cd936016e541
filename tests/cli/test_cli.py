"""The `agentmesh` commands as a person runs them: exit codes, messages and output shape."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import grpc
import psutil
import pytest
from google.protobuf import struct_pb2
from typer.testing import CliRunner

from agentmesh.agent.v1 import agent_pb2, agent_pb2_grpc
from agentmesh.common.v1 import common_pb2
from agentmesh.services.cli import runner
from agentmesh.services.cli.main import app
from agentmesh.services.runtime import context as ctx
from agentmesh.services.runtime.errors import ServiceError
from agentmesh.services.runtime.server import Service
from agentmesh.services.runtime.settings import ServiceSettings
from tests.support import running_service

pytestmark = pytest.mark.timeout(180)

cli = CliRunner()


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("AGENTMESH_HOME", str(tmp_path))
    return runner.RunPaths(tmp_path / ".agentmesh")


async def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> tuple[int, str, str]:
    """Run ``python -m agentmesh.services.cli.main *args`` as a real process."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agentmesh.services.cli.main", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env={**os.environ, **(env or {})},
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode, out.decode(), err.decode()


# ----------------------------------------------------------------------------- serve / up / down


def test_serve_unknown_kind_fails_clearly():
    result = cli.invoke(app, ["serve", "billing"])
    assert result.exit_code == 2
    assert "unknown service kind 'billing'; choose one of: orchestrator, llm, retrieval, memory, tools" in result.output


def test_serve_with_invalid_configuration_fails_clearly(monkeypatch):
    monkeypatch.setenv("AGENTMESH_TOOLS_PORT", "not-a-port")
    result = cli.invoke(app, ["serve", "tools"])
    assert result.exit_code == 2
    assert "invalid tools configuration" in result.output and "port" in result.output


def test_down_when_nothing_runs_says_so(home):
    result = cli.invoke(app, ["down"])
    assert result.exit_code == 0
    assert result.output.strip() == f"no mesh is running from {home.root}"


def test_status_when_nothing_runs(home):
    result = cli.invoke(app, ["status"])
    assert result.exit_code == 1
    assert f"no mesh is running from {home.root}" in result.output
    result = cli.invoke(app, ["status", "--json"])
    assert result.exit_code == 1
    assert json.loads(result.output) == {"running": False, "root": str(home.root), "components": []}


def _record_of(popen: subprocess.Popen, name: str) -> runner.ProcessRecord:
    return runner.ProcessRecord(name, popen.pid, psutil.Process(popen.pid).create_time(), "/dev/null", "127.0.0.1:1")


def _state(home: runner.RunPaths, processes: list[runner.ProcessRecord]) -> runner.MeshState:
    return runner.MeshState(
        root=str(home.root), started_at="2026-01-01T00:00:00Z", mode="detached", runner_pid=os.getpid(),
        ports=runner.MeshPorts.free().as_dict(), redis_url="redis://127.0.0.1:1/0", milvus_uri="x.db",
        processes=processes, ready=True,
    )


def test_state_file_round_trip_and_liveness(home):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = _record_of(sleeper, "memory")
        # A record whose pid exists but belongs to another process (pid reuse): never "running".
        reused = runner.ProcessRecord("llm", os.getpid(), psutil.Process().create_time() - 100, "/dev/null")
        state = _state(home, [live, reused])
        runner.write_state(home, state)
        assert not list(home.run.glob("*.tmp"))  # written atomically, no leftovers

        loaded = runner.read_state(home)
        assert loaded.to_json() == state.to_json()
        assert [p.name for p in loaded.live()] == ["memory"]

        sleeper.kill()
        sleeper.wait()
        assert runner.read_state(home).live() == []
    finally:
        sleeper.kill()


def test_down_removes_a_stale_state_and_never_signals_a_reused_pid(home):
    # The only recorded pid is this test process, with another start time: it must not be killed.
    reused = runner.ProcessRecord("orchestrator", os.getpid(), psutil.Process().create_time() - 100, "/dev/null")
    runner.write_state(home, _state(home, [reused]))
    result = cli.invoke(app, ["down"])
    assert result.exit_code == 0
    assert "no mesh is running" in result.output
    assert not home.state.exists()


def test_down_stops_what_the_state_file_names(home):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    runner.write_state(home, _state(home, [_record_of(sleeper, "tools")]))
    result = cli.invoke(app, ["down", "--timeout", "5"])
    assert result.exit_code == 0, result.output
    assert f"stopped tools (pid {sleeper.pid})" in result.output
    assert result.output.strip().endswith("mesh stopped")
    assert sleeper.wait(5) == -15  # SIGTERM was enough
    assert not home.state.exists()


def test_up_when_a_mesh_runs_says_so_and_starts_nothing(home):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        runner.write_state(home, _state(home, [_record_of(sleeper, "orchestrator")]))
        result = cli.invoke(app, ["up", "--detach"])
        assert result.exit_code == 0
        assert f"a mesh is already running from {home.root}" in result.output
        assert runner.read_state(home).started_at == "2026-01-01T00:00:00Z"
        assert not list(home.logs.glob("*.log"))
    finally:
        sleeper.kill()


def test_unreadable_state_file_is_named(home):
    home.run.mkdir(parents=True)
    home.state.write_text("{not json")
    result = cli.invoke(app, ["down"])
    assert result.exit_code == 1
    assert f"cannot read {home.state}" in result.output


# ------------------------------------------------------------------------------------------ chat


class ScriptedAgent(agent_pb2_grpc.AgentServiceServicer):
    """An AgentService.Run that plays back the events of a turn with one tool call, so the CLI's
    rendering of every event kind can be checked; ``input == "fail"`` ends the stream with
    UNAVAILABLE after the first text delta."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str]] = []  # (tenant, session, input)

    async def Run(self, request, context):  # noqa: N802 - gRPC method name
        self.seen.append((ctx.current_tenant(), request.session_id, request.input))
        chunk = common_pb2.Chunk(chunk_id="operator#0", document_id="operator", title="operator",
                                 source="python://stdlib/operator", text="operator.mul(a, b)")
        args = struct_pb2.Struct()
        args.update({"expression": "17*23"})
        events = [
            agent_pb2.RunResponse(started=agent_pb2.RunStarted(run_id="run-1", session_id=request.session_id, request_id="req-1")),
            agent_pb2.RunResponse(memory_loaded=agent_pb2.MemoryLoaded(messages=2, tokens=40)),
            agent_pb2.RunResponse(retrieval=agent_pb2.RetrievalCompleted(chunks=[chunk])),
            agent_pb2.RunResponse(step_started=agent_pb2.StepStarted(step=1, provider="openai", model="gpt-4o-mini", is_llm=True)),
            agent_pb2.RunResponse(text_delta=agent_pb2.TextDelta(text="Let me compute.")),
            agent_pb2.RunResponse(tool_call=agent_pb2.ToolCallStarted(tool_call=common_pb2.ToolCall(id="call_1", name="calculator", arguments=args))),
            agent_pb2.RunResponse(tool_progress=agent_pb2.ToolCallProgress(tool_call_id="call_1", message="evaluating", fraction=0.5)),
            agent_pb2.RunResponse(tool_result=agent_pb2.ToolCallCompleted(tool_call_id="call_1", name="calculator", output=struct_pb2.Value(number_value=391), duration_ms=3)),
            agent_pb2.RunResponse(step_started=agent_pb2.StepStarted(step=2, provider="openai", model="gpt-4o-mini", is_llm=True)),
            agent_pb2.RunResponse(text_delta=agent_pb2.TextDelta(text="17 × 23 = ")),
            agent_pb2.RunResponse(text_delta=agent_pb2.TextDelta(text="391 [1].")),
            agent_pb2.RunResponse(final=agent_pb2.RunCompleted(
                status=agent_pb2.RUN_STATUS_COMPLETED, output="17 × 23 = 391 [1].",
                usage=common_pb2.Usage(input_tokens=120, output_tokens=12, total_tokens=132),
                citations=[common_pb2.Citation(index=1, chunk=chunk)], steps=2, session_version=3)),
        ]
        for n, event in enumerate(events, 1):
            event.sequence = n
            yield event
            if request.input == "fail" and event.WhichOneof("event") == "text_delta":
                raise ServiceError(grpc.StatusCode.UNAVAILABLE, "the provider stream was cut after the first token")
            await asyncio.sleep(0.01)


class ScriptedOrchestrator(Service):
    kind = "orchestrator"

    def __init__(self) -> None:
        super().__init__(ServiceSettings(readiness_interval_s=0.2, grace_period_s=1.0))
        self.agent = ScriptedAgent()

    def register(self, server) -> None:
        agent_pb2_grpc.add_AgentServiceServicer_to_server(self.agent, server)


async def test_chat_prints_the_stream_then_citations_and_usage():
    service = ScriptedOrchestrator()
    async with running_service(service) as address:
        code, out, err = await run_cli(
            "chat", "What is 17 * 23?", "--session", "s-1", "--gateway", address, "--tenant", "acme"
        )
    assert code == 0, err
    assert service.agent.seen == [("acme", "s-1", "What is 17 * 23?")]
    assert out.splitlines() == [
        "run run-1 · request req-1",
        "memory: 2 messages (40 tokens)",
        "retrieved 1 chunk: [1] operator",
        "step 1 · openai/gpt-4o-mini",
        "Let me compute.",
        '→ tool calculator({"expression":"17*23"})',
        "  … calculator: evaluating 50%",
        "← calculator 391 (3 ms)",
        "step 2 · openai/gpt-4o-mini",
        "17 × 23 = 391 [1].",
        "citations:",
        "  [1] operator — python://stdlib/operator",
        "usage: 120 input + 12 output = 132 tokens · 2 steps · COMPLETED · session version 3",
    ]
    assert err == ""


async def test_chat_prints_a_failed_stream_as_error_with_exit_code_1():
    async with running_service(ScriptedOrchestrator()) as address:
        code, out, err = await run_cli("chat", "fail", "--session", "s-2", "--gateway", address)
    assert code == 1
    assert out.splitlines()[-1] == "Let me compute."  # the partial answer stays, on its own line
    assert err.strip() == "error: UNAVAILABLE: the provider stream was cut after the first token"


async def test_chat_without_a_gateway_is_unavailable():
    from agentmesh.services.cli.processes import free_port

    code, _, err = await run_cli("chat", "hi", "--session", "s", "--gateway", f"127.0.0.1:{free_port()}", "--timeout", "3")
    assert code == 1
    assert err.startswith("error: UNAVAILABLE: ")


# ---------------------------------------------------------------------------------------- ingest


async def test_ingest_streams_the_corpus_and_prints_counts(tmp_path, monkeypatch):
    """Against the real retrieval service (real embeddings, Milvus Lite in tmp_path)."""
    retrieval = pytest.importorskip("agentmesh.services.retrieval.service")
    monkeypatch.setenv("AGENTMESH_RETRIEVAL_MILVUS_URI", str(tmp_path / "milvus.db"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    async with running_service(retrieval.create(), timeout_s=120) as address:
        args = ("ingest", "-m", "json", "-m", "csv", "--gateway", address, "--tenant", "cli-test", "--collection", "cli_docs")
        code, out, err = await run_cli(*args)
        assert code == 0, err
        lines = out.splitlines()
        assert lines[0] == f"ingested 2 documents into collection 'cli_docs' through {address} (tenant cli-test)"
        counts = {" ".join(line.split()[:2]): int(line.split()[2]) for line in lines[1:]}
        assert counts["documents received"] == 2 and counts["documents written"] == 2
        assert counts["chunks written"] > 2

        code, out, _ = await run_cli(*args)  # unchanged documents are not written again
        assert code == 0
        counts = {" ".join(line.split()[:2]): int(line.split()[2]) for line in out.splitlines()[1:]}
        assert counts["documents unchanged"] == 2 and counts["chunks written"] == 0

        code, _, err = await run_cli("ingest", "-m", "no_such_module", "--gateway", address)
        assert code == 2
        assert "no_such_module" in err


def test_ingest_rejects_module_and_all_together():
    result = cli.invoke(app, ["ingest", "-m", "json", "--all"])
    assert result.exit_code == 2
    assert "use --module or --all, not both" in result.output
