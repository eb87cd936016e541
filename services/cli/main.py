"""The ``agentmesh`` command line (the console script points at :data:`app`).

Commands:
  serve <kind>   run one service in this process (what ``up`` starts for each service)
  up [--detach]  start the local mesh: Redis, the five services, the Envoy gateway
  down           stop the local mesh
  status         health of each component of the local mesh
  ingest         stream the demo corpus (stdlib documentation) into the retrieval service
  chat           ask the agent a question and print the answer as it streams
  eval           evaluations (``agentmesh eval retrieval --beir DIR``: nDCG/recall/MRR on a BEIR dataset)

``ingest`` and ``chat`` talk to the gateway: ``--gateway``, else ``$AGENTMESH_GATEWAY_ADDRESS``,
else the gateway of the mesh running from this run folder, else ``127.0.0.1:8080``.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import signal
import sys
import threading
from typing import Any, NoReturn

import grpc
import typer
from google.protobuf import json_format
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from agentmesh.services.cli import runner
from agentmesh.services.eval.cli import eval_app
from agentmesh.services.runtime.clients import channel_options
from agentmesh.services.runtime.context import TENANT_HEADER
from agentmesh.services.runtime.settings import SERVICE_NAMES

app = typer.Typer(
    name="agentmesh",
    help="Run and talk to an AgentMesh: gRPC services for LLM agents behind an Envoy gateway.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

DEFAULT_GATEWAY = "127.0.0.1:8080"
GATEWAY_OPTION = typer.Option(
    None, "--gateway", envvar="AGENTMESH_GATEWAY_ADDRESS", help="host:port of the gateway.", show_default=False
)
TENANT_OPTION = typer.Option(
    None, "--tenant", envvar="AGENTMESH_TENANT",
    help="Tenant sent as x-tenant-id metadata (the server default: 'default').",
)


def _fail(message: str, code: int = 1) -> NoReturn:
    err.print(Text(f"error: {message}"))
    raise typer.Exit(code)


def _info(message: str) -> None:
    out.print(Text(message))


def _side(message: str) -> None:
    out.print(Text(message, style="dim"))


def _gateway_address(option: str | None) -> str:
    if option:
        return option
    try:
        state = runner.read_state(runner.RunPaths.default())
    except runner.MeshError:
        state = None
    if state is not None and state.live():
        return f"{runner.LOCAL_HOST}:{state.ports['gateway']}"
    return DEFAULT_GATEWAY


def _metadata(tenant: str | None) -> tuple[tuple[str, str], ...]:
    """Call metadata: the tenant, and the gateway credential from the environment —
    ``AGENTMESH_TOKEN`` (a JWT, sent as ``authorization: Bearer``) or ``AGENTMESH_API_KEY``
    (sent as ``x-api-key``). A local mesh in dev mode needs neither."""
    md = [(TENANT_HEADER, tenant)] if tenant else []
    if token := os.environ.get("AGENTMESH_TOKEN"):
        md.append(("authorization", f"Bearer {token}"))
    if api_key := os.environ.get("AGENTMESH_API_KEY"):
        md.append(("x-api-key", api_key))
    return tuple(md)


def _rpc_failure(exc: grpc.aio.AioRpcError) -> NoReturn:
    _fail(f"{exc.code().name}: {exc.details() or 'no details'}")


# -------------------------------------------------------------------------------------- serve


@app.command()
def serve(kind: str = typer.Argument(..., help="Service to run: " + ", ".join(SERVICE_NAMES) + ".")) -> None:
    """Run one AgentMesh service in this process until SIGTERM/SIGINT (then drain gracefully).

    Configuration comes from the environment (AGENTMESH_<KIND>_*, see each service's settings).
    """
    if kind not in SERVICE_NAMES:
        _fail(f"unknown service kind {kind!r}; choose one of: {', '.join(SERVICE_NAMES)}", 2)
    module_name = f"agentmesh.services.{kind}.service"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        _fail(f"the {kind} service is not part of this installation ({module_name} is missing)")
    from agentmesh.services.runtime.server import serve as run_service  # noqa: PLC0415 - heavy import

    try:
        service = module.create()
    except ValidationError as exc:
        _fail(f"invalid {kind} configuration:\n{exc}", 2)
    try:
        asyncio.run(run_service(service))
    except Exception as exc:  # noqa: BLE001 - port taken, start-up failed (serve() logged the traceback)
        _fail(f"{kind} stopped: {exc}")


# ------------------------------------------------------------------------------ up/down/status


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


@app.command()
def up(
    detach: bool = typer.Option(False, "--detach", "-d", help="Return once the mesh is up and leave it running."),
    timeout: float = typer.Option(180.0, "--timeout", min=1, help="Seconds to wait for every service to be SERVING."),
) -> None:
    """Start Redis, the five services and the Envoy gateway from the run folder (.agentmesh/).

    Ports: AGENTMESH_<KIND>_PORT, AGENTMESH_GATEWAY_PORT (8080), AGENTMESH_GATEWAY_ADMIN_PORT (9901),
    AGENTMESH_REDIS_PORT (6379). Without --detach, Ctrl-C stops the mesh.
    """
    paths = runner.RunPaths.default()
    try:
        ports = runner.MeshPorts()
    except ValidationError as exc:
        _fail(f"invalid port settings:\n{exc}", 2)
    # SIGTERM while starting: behave like Ctrl-C, so what has started is stopped again.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        state = runner.up(
            paths, ports, timeout_s=timeout, mode="detached" if detach else "foreground", echo=_info
        )
    except runner.MeshAlreadyRunning as exc:
        degraded = len(exc.state.live()) < len(exc.state.processes)
        (err if degraded else out).print(Text(str(exc)))
        raise typer.Exit(1 if degraded else 0) from None
    except runner.MeshError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        err.print("interrupted: stopped what had started")
        raise typer.Exit(130) from None
    finally:
        signal.signal(signal.SIGTERM, previous)

    gateway = f"{runner.LOCAL_HOST}:{state.ports['gateway']}"
    _info(f"mesh up: gateway {gateway}, admin http://{runner.LOCAL_HOST}:{state.ports['admin']}, logs {paths.logs}")
    _info('try: agentmesh ingest && agentmesh chat "How do I parse JSON in Python?" --session demo')
    if detach:
        _info("running in the background; `agentmesh down` stops it")
        return
    _info("press Ctrl-C to stop")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    raise typer.Exit(runner.supervise(paths, state, stop, echo=_info))


@app.command()
def down(
    timeout: float = typer.Option(
        30.0, "--timeout", min=0, help="Seconds each process gets after SIGTERM before SIGKILL."
    ),
) -> None:
    """Stop the mesh started from this run folder: gateway first, then the services, then Redis."""
    paths = runner.RunPaths.default()
    try:
        stopped = runner.down(paths, timeout, echo=_info)
    except runner.MeshError as exc:
        _fail(str(exc))
    if not stopped:
        _info(f"no mesh is running from {paths.root}")
        return
    _info("mesh stopped")


@app.command()
def status(as_json: bool = typer.Option(False, "--json", help="Print the status as JSON.")) -> None:
    """Health of each component; exit code 0 only when all of them are healthy."""
    paths = runner.RunPaths.default()
    try:
        state, rows = runner.status(paths)
    except runner.MeshError as exc:
        _fail(str(exc))
    if state is None:
        if as_json:
            print(json.dumps({"running": False, "root": str(paths.root), "components": []}))
        else:
            _info(f"no mesh is running from {paths.root}")
        raise typer.Exit(1)
    healthy = all(row.ok for row in rows)
    if as_json:
        components = [vars(row) for row in rows]
        print(json.dumps({"running": True, "healthy": healthy, "root": state.root, "started_at": state.started_at,
                          "mode": state.mode, "ports": state.ports, "components": components}, indent=2))
    else:
        table = Table(title=f"AgentMesh at {state.root} (started {state.started_at}, {state.mode})")
        for column in ("component", "pid", "address", "state"):
            table.add_column(column)
        for row in rows:
            style = "green" if row.ok else "red"
            table.add_row(row.name, str(row.pid or "-"), row.address, Text(row.state, style=style))
        out.print(table)
    raise typer.Exit(0 if healthy else 1)


# ------------------------------------------------------------------------------------- ingest


@app.command()
def ingest(
    module: list[str] | None = typer.Option(None, "--module", "-m", help="Stdlib module to ingest (repeatable)."),
    all_modules: bool = typer.Option(False, "--all", help="Ingest every documented stdlib module."),
    collection: str = typer.Option("", "--collection", help="Collection to write to (empty: the service default)."),
    gateway: str | None = GATEWAY_OPTION,
    tenant: str | None = TENANT_OPTION,
    timeout: float = typer.Option(1800.0, "--timeout", min=1, help="Seconds the whole ingestion may take."),
) -> None:
    """Stream the demo corpus (the Python standard library's documentation) into
    RetrievalService.IngestDocuments through the gateway. Without --module/--all: DEFAULT_MODULES."""
    if module and all_modules:
        _fail("use --module or --all, not both", 2)
    try:
        from agentmesh.services.retrieval import corpus  # noqa: PLC0415 - heavy, ingest only
    except ImportError as exc:
        _fail(f"the demo corpus is not available: {exc}")
    with err.status("reading the standard library documentation"):
        try:
            documents = list(corpus.stdlib_documents(modules=module or None, all_modules=all_modules))
        except (ValueError, LookupError, ImportError) as exc:
            _fail(str(exc), 2)
    if not documents:
        _fail("the corpus yielded no documents", 2)
    address = _gateway_address(gateway)
    try:
        reply = asyncio.run(_ingest(address, documents, collection, tenant, timeout))
    except grpc.aio.AioRpcError as exc:
        _rpc_failure(exc)
    where = f"collection '{collection}'" if collection else "the default collection"
    _info(f"ingested {_plural(len(documents), 'document')} into {where} through {address} (tenant {tenant or 'default'})")
    for label, value in (
        ("documents received", reply.documents_received),
        ("documents written", reply.documents_written),
        ("documents unchanged", reply.documents_unchanged),
        ("chunks written", reply.chunks_written),
        ("chunks deleted", reply.chunks_deleted),
    ):
        _info(f"  {label:<20} {value}")


async def _ingest(address: str, documents: list, collection: str, tenant: str | None, timeout_s: float):  # noqa: ANN202
    from agentmesh.retrieval.v1 import retrieval_pb2, retrieval_pb2_grpc  # noqa: PLC0415

    progress = Progress(
        SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=err,
    )
    task = progress.add_task("sending documents", total=len(documents))

    async def requests():  # noqa: ANN202 - async generator of IngestDocumentsRequest
        for document in documents:
            yield retrieval_pb2.IngestDocumentsRequest(collection=collection, document=document)
            # Resumed when gRPC asks for the next message: the previous one has been sent.
            progress.advance(task)
        progress.update(task, description="waiting for the retrieval service to embed and write")

    async with grpc.aio.insecure_channel(address, options=channel_options()) as channel:
        stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)
        with progress:
            reply = await stub.IngestDocuments(requests(), metadata=_metadata(tenant), timeout=timeout_s)
            progress.update(task, description="embedded and written")
            return reply


# --------------------------------------------------------------------------------------- chat


@app.command()
def chat(
    question: str = typer.Argument(..., help="The question or instruction for the agent."),
    session: str = typer.Option(..., "--session", "-s", help="Session id; its memory carries over between turns."),
    gateway: str | None = GATEWAY_OPTION,
    tenant: str | None = TENANT_OPTION,
    model: str = typer.Option("", "--model", help="Model alias for the LLM router (empty: the router default)."),
    collection: str = typer.Option("", "--collection", help="Collection to ground the answer in."),
    timeout: float = typer.Option(120.0, "--timeout", min=0.001, help="Deadline of the whole run, in seconds."),
) -> None:
    """Ask the agent through the gateway (AgentService.Run) and print the answer as it streams,
    with tool calls and retrieval as dim side lines and the citations and usage at the end."""
    address = _gateway_address(gateway)
    printer = _RunPrinter()
    try:
        asyncio.run(_chat(address, question, session, tenant, model, collection, timeout, printer))
    except grpc.aio.AioRpcError as exc:
        printer.end_line()
        _rpc_failure(exc)
    except KeyboardInterrupt:
        printer.end_line()
        err.print("cancelled")
        raise typer.Exit(130) from None
    if not printer.finished:
        printer.end_line()
        _fail("UNKNOWN: the stream ended before its final event")


async def _chat(
    address: str, question: str, session: str, tenant: str | None, model: str, collection: str,
    timeout_s: float, printer: _RunPrinter,
) -> None:
    from agentmesh.agent.v1 import agent_pb2, agent_pb2_grpc  # noqa: PLC0415

    request = agent_pb2.RunRequest(session_id=session, input=question, model=model, collection=collection)
    async with grpc.aio.insecure_channel(address, options=channel_options()) as channel:
        call = agent_pb2_grpc.AgentServiceStub(channel).Run(request, metadata=_metadata(tenant), timeout=timeout_s)
        async for event in call:
            printer.event(event)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _integral(value: Any) -> Any:
    # google.protobuf.Struct numbers are doubles: show 391.0 as 391.
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {k: _integral(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_integral(v) for v in value]
    return value


def _compact(value: Any, limit: int = 200) -> str:
    text = json.dumps(_integral(value), ensure_ascii=False, separators=(",", ":"))
    return text if len(text) <= limit else text[: limit - 1] + "…"


class _RunPrinter:
    """Prints the events of one Run stream: answer text raw and flushed per delta, everything
    else as dim side lines that always start on a line of their own."""

    def __init__(self) -> None:
        self.at_line_start = True
        self.finished = False
        self.tool_names: dict[str, str] = {}

    def end_line(self) -> None:
        if not self.at_line_start:
            sys.stdout.write("\n")
            sys.stdout.flush()
            self.at_line_start = True

    def side(self, line: str) -> None:
        self.end_line()
        _side(line)

    def event(self, event: Any) -> None:  # agent_pb2.RunResponse
        kind = event.WhichOneof("event")
        if kind == "text_delta":
            if event.text_delta.text:
                sys.stdout.write(event.text_delta.text)
                sys.stdout.flush()
                self.at_line_start = event.text_delta.text.endswith("\n")
        elif kind == "started":
            self.side(f"run {event.started.run_id} · request {event.started.request_id}")
        elif kind == "memory_loaded":
            m = event.memory_loaded
            if m.messages or m.messages_omitted:
                omitted = f", {m.messages_omitted} older omitted" if m.messages_omitted else ""
                self.side(f"memory: {_plural(m.messages, 'message')} ({_plural(m.tokens, 'token')}{omitted})")
        elif kind == "retrieval":
            chunks = event.retrieval.chunks
            titles = ", ".join(f"[{i}] {c.title or c.document_id}" for i, c in enumerate(chunks, 1))
            self.side(f"retrieved {_plural(len(chunks), 'chunk')}" + (f": {titles}" if chunks else ""))
        elif kind == "step_started":
            s = event.step_started
            line = f"step {s.step} · {s.provider}/{s.model}" + ("" if s.is_llm else " (not an LLM)")
            self.side(line + (f" · {s.notice}" if s.notice else ""))
        elif kind == "tool_call":
            call = event.tool_call.tool_call
            self.tool_names[call.id] = call.name
            self.side(f"→ tool {call.name}({_compact(json_format.MessageToDict(call.arguments))})")
        elif kind == "tool_progress":
            p = event.tool_progress
            share = f" {p.fraction:.0%}" if p.HasField("fraction") else ""
            self.side(f"  … {self.tool_names.get(p.tool_call_id, p.tool_call_id)}: {p.message}{share}")
        elif kind == "tool_result":
            r = event.tool_result
            if r.is_error:
                self.side(f"← {r.name} failed: {r.error_message} ({r.duration_ms} ms)")
            else:
                output = json_format.MessageToDict(r.output) if r.HasField("output") else None
                self.side(f"← {r.name} {_compact(output)} ({r.duration_ms} ms)")
        elif kind == "final":
            self.final(event.final)

    def final(self, final: Any) -> None:  # agent_pb2.RunCompleted
        from agentmesh.agent.v1 import agent_pb2  # noqa: PLC0415

        self.finished = True
        self.end_line()
        if final.citations:
            _info("citations:")
            for citation in final.citations:
                chunk = citation.chunk
                _info(f"  [{citation.index}] {chunk.title or chunk.document_id} — {chunk.source}")
        u = final.usage
        status = agent_pb2.RunStatus.Name(final.status).removeprefix("RUN_STATUS_")
        _side(
            f"usage: {u.input_tokens} input + {u.output_tokens} output = {u.total_tokens} tokens · "
            f"{_plural(final.steps, 'step')} · {status} · session version {final.session_version}"
        )
        if final.status == agent_pb2.RUN_STATUS_MAX_STEPS:
            err.print("warning: the run reached its step limit while the model still asked for tools")


# --------------------------------------------------------------------------------------- eval

app.add_typer(eval_app, name="eval")

if __name__ == "__main__":
    app()
