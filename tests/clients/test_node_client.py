"""The TypeScript example (clients/node) against a real mesh through the real Envoy gateway.

`npm ci` (when node_modules is missing or older than the lock file) and `tsc` build it from
gen/ts; then `node dist/run.js` streams runs through the gateway over gRPC (HTTP/2): one mesh for
the module (Redis, Milvus Lite, real embeddings, the five services, Envoy in dev mode), whose LLM
router talks with the official `openai` SDK to a local fake speaking OpenAI's streaming wire
format, so a run has a real tool call, a streamed answer citing a retrieved chunk, and usage.
Node.js is required: without it these tests fail, saying so.
"""

from __future__ import annotations

import os
import re
import signal
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from agentmesh.retrieval.v1 import retrieval_pb2, retrieval_pb2_grpc
from agentmesh.services.cli.processes import free_port
from agentmesh.services.retrieval.corpus import stdlib_documents
from tests.e2e.mesh import local_mesh, tenant_md
from tests.fakes.openai_server import FakeOpenAIServer

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]
NODE_DIR = ROOT / "clients" / "node"
TENANT = "node"
QUESTION = "How do I parse a JSON string into a Python object?"
#: The answer the fake model streams after the tool call, in TEXT_PIECES deltas TEXT_DELAY_S apart.
ANSWER = "Parse it with json.loads, which returns the Python object [1]; and six times seven is 42."
TEXT_PIECES = 8
TEXT_DELAY_S = 0.25


def _run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=NODE_DIR, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def example() -> list[str]:
    """The command that runs the built example: install (when needed) and build it first."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.fail("Node.js 20+ and npm are required for the TypeScript client example (clients/node): "
                    "install them (e.g. apt-get install nodejs npm) and run the tests again")
    major = int(_run([node, "--version"]).stdout.strip().lstrip("v").split(".")[0])
    assert major >= 20, f"clients/node needs Node.js 20 or newer, found {major}"
    installed = NODE_DIR / "node_modules" / ".package-lock.json"
    lock = NODE_DIR / "package-lock.json"
    if not installed.exists() or installed.stat().st_mtime < lock.stat().st_mtime:
        done = _run([npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"])
        assert done.returncode == 0, f"npm ci failed:\n{done.stdout}\n{done.stderr}"
    done = _run([npm, "run", "--silent", "build"])
    assert done.returncode == 0, f"tsc failed:\n{done.stdout}\n{done.stderr}"
    return [node, str(NODE_DIR / "dist" / "run.js")]


@pytest.fixture(scope="module")
def fake():
    """The fake OpenAI server; each test queues the turns it needs."""
    with FakeOpenAIServer([], api_key="sk-node") as server:
        yield server


@pytest.fixture(scope="module")
def mesh(tmp_path_factory, fake):
    env = {
        "AGENTMESH_LLM_PROVIDER": "openai",
        "OPENAI_BASE_URL": fake.base_url,
        "OPENAI_API_KEY": "sk-node",
        "AGENTMESH_LLM_MODEL": "gpt-4o-mini",
        "AGENTMESH_LLM_FALLBACK_TO_EXTRACTIVE": "false",  # a fallback would hide a broken path
    }
    with local_mesh(tmp_path_factory.mktemp("mesh-node"), env) as m:
        documents = list(stdlib_documents(modules=["json"]))
        with grpc.insecure_channel(m.gateway) as channel:
            stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)
            result = stub.IngestDocuments(
                (retrieval_pb2.IngestDocumentsRequest(document=d) for d in documents),
                metadata=tenant_md(TENANT), timeout=300,
            )
        assert result.documents_received == len(documents)
        yield m


@dataclass
class Outcome:
    returncode: int
    stdout: str
    stderr: str
    #: time.monotonic() when the first answer bytes were read from stdout, and when it exited.
    first_output_at: float | None
    exited_at: float


def run_example(cmd: list[str], *args: str, interrupt_after_output: bool = False, timeout: float = 180) -> Outcome:
    """Run the example, reading stdout as it is written (to time the first answer bytes)."""
    env = {k: v for k, v in os.environ.items() if k not in ("AGENTMESH_API_KEY", "AGENTMESH_TOKEN", "AGENTMESH_GATEWAY")}
    proc = subprocess.Popen([*cmd, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    out: list[bytes] = []
    first: list[float] = []
    err: list[bytes] = []

    def read_stdout() -> None:
        while chunk := os.read(proc.stdout.fileno(), 65536):
            if not first:
                first.append(time.monotonic())
                if interrupt_after_output:
                    proc.send_signal(signal.SIGINT)
            out.append(chunk)

    readers = [threading.Thread(target=read_stdout), threading.Thread(target=lambda: err.append(proc.stderr.read()))]
    for reader in readers:
        reader.start()
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    exited = time.monotonic()
    for reader in readers:
        reader.join(timeout=10)
    return Outcome(proc.returncode, b"".join(out).decode(), b"".join(err).decode(), first[0] if first else None, exited)


def gateway_args(mesh, session: str, *extra: str) -> list[str]:
    return ["--gateway", mesh.gateway, "--tenant", TENANT, "--session", session, *extra]


def test_run_streams_answer_tool_call_citation_and_usage(example, mesh, fake):
    fake.enqueue(
        {"tool_calls": [{"id": "call_node_1", "name": "calculator", "arguments": {"expression": "6*7"}, "fragments": 3}],
         "usage": {"input_tokens": 150, "output_tokens": 20}},
        {"text": ANSWER, "text_chunks": TEXT_PIECES, "chunk_delay_s": TEXT_DELAY_S,
         "usage": {"input_tokens": 210, "output_tokens": 16}},
    )
    r = run_example(example, *gateway_args(mesh, "node-s1", "--question", QUESTION, "--tools", "calculator"))
    assert r.returncode == 0, r.stderr
    assert fake.pending_turns == 0, "both model calls were made"

    # The answer alone on stdout, as the concatenation of the streamed deltas.
    assert r.stdout == ANSWER + "\n"
    # Printed as the deltas arrived: the first ones came out well before the last one was sent.
    assert r.first_output_at is not None
    assert r.exited_at - r.first_output_at >= (TEXT_PIECES - 1) * TEXT_DELAY_S * 0.6, "the answer was buffered"

    notes = r.stderr.splitlines()
    assert re.fullmatch(r"run [0-9a-f]{32} started \(agent agentmesh, session node-s1, request \S+\)", notes[0]), r.stderr
    assert "memory: 0 messages, 0 tokens (0 left out)" in notes
    assert any(re.fullmatch(r"retrieval: \d+ chunks \(python-stdlib:json\)", n) for n in notes), r.stderr
    assert "step 1: openai/gpt-4o-mini" in notes and "step 2: openai/gpt-4o-mini" in notes
    # The tool call, with its arguments reassembled from fragments, and its result (a Value).
    assert 'tool call call_node_1: calculator({"expression":"6*7"})' in notes
    result = next(n for n in notes if n.startswith("tool result call_node_1: calculator -> "))
    assert re.search(r'"result":42\b', result) and re.search(r"\(\d+ ms\)$", result), result
    assert notes.index('tool call call_node_1: calculator({"expression":"6*7"})') < notes.index(result)
    # The turn appended to memory: the question, the tool call, its result and the answer.
    assert f"final: COMPLETED after 2 step(s), {TEXT_PIECES} text deltas, session version 4" in notes, r.stderr
    assert any(re.fullmatch(r"usage: 360 input \+ 36 output = 396 tokens, cost \$\d+\.\d{6}", n) for n in notes), r.stderr
    citation = r'citation \[1\] python-stdlib:json "json" \(https://docs\.python\.org/[0-9.]+/library/json\.html\)'
    assert any(re.fullmatch(citation, n) for n in notes), r.stderr
    # The unary call afterwards reads the turn back from memory.
    assert any(re.fullmatch(r"session node-s1: version 4, 4 messages in context, \d+ tokens", n) for n in notes), r.stderr


@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        (["--session", "bad session", "--question", QUESTION], "INVALID_ARGUMENT (3)", "session_id must be"),
        (["--session", "node-bad", "--question", QUESTION, "--max-steps", "99"], "INVALID_ARGUMENT (3)", "max_steps"),
        (["--session", "node-bad", "--question", QUESTION, "--timeout-ms", "200"], "DEADLINE_EXCEEDED (4)", "needs at least"),
    ],
    ids=["bad-session", "max-steps", "short-deadline"],
)
def test_refused_run_exits_non_zero_with_the_grpc_code(example, mesh, fake, args, code, words):
    r = run_example(example, "--gateway", mesh.gateway, "--tenant", TENANT, *args)
    assert r.returncode == 1, r.stderr
    assert r.stdout == ""
    last = r.stderr.splitlines()[-1]
    assert last.startswith(f"error: {code}: ") and words in last, r.stderr
    assert fake.pending_turns == 0 and not any(n.startswith("final:") for n in r.stderr.splitlines())


def test_ctrl_c_cancels_the_run_down_to_the_provider_stream(example, mesh, fake):
    fake.enqueue({"text": "word " * 60, "text_chunks": 60, "chunk_delay_s": 0.25})
    before = len(fake.requests)
    r = run_example(example, *gateway_args(mesh, "node-cancel", "--question", QUESTION), interrupt_after_output=True)
    assert r.returncode == 130, r.stderr
    assert r.stderr.splitlines()[-1] == "interrupted: the call was cancelled"
    assert r.exited_at - r.first_output_at < 10, "the client stopped right away, not at the end of the answer"
    # The cancellation went through Envoy, the orchestrator and the router to the provider call.
    assert fake.wait_for_outcome(before, timeout_s=30) == "client_disconnected"


def test_unreachable_gateway_is_unavailable(example):
    r = run_example(example, "--gateway", f"127.0.0.1:{free_port()}", "--session", "s", "--question", QUESTION)
    assert r.returncode == 1
    assert re.match(r"error: UNAVAILABLE \(14\): ", r.stderr.splitlines()[-1]), r.stderr


def test_bad_arguments_exit_2_with_usage(example):
    r = run_example(example, "--question", QUESTION)
    assert r.returncode == 2
    assert r.stderr.startswith("--session is required\nusage: node dist/run.js")
