"""The ``agentmesh`` command line (the console script points at :data:`app`).

Commands:
  serve <kind>   run one service in this process (what ``up`` starts for each service)
  up [--detach]  start the local mesh: Redis, the five services, the Envoy gateway
  down           stop the local mesh
  status         health of each component of the local mesh
  ingest         stream the demo corpus (stdlib documentation) into the retrieval service
  chat           ask an agent (or workflow: --agent) a question and print the answer as it streams
  runs           a run by id: show it, approve or reject the tool calls it waits for, cancel it
  eval           evaluations (``agentmesh eval retrieval --beir DIR``: nDCG/recall/MRR on a BEIR dataset)

``ingest``, ``chat`` and ``runs`` talk to the gateway: ``--gateway``, else ``$AGENTMESH_GATEWAY_ADDRESS``,
else the gateway of the mesh running from this run folder, else ``127.0.0.1:8080``.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import signal
import sys
import threading
from typing import Any, NoReturn

import typer
from google.protobuf import json_format
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from agentmesh.client import AgentMeshError, AsyncClient, ClientConfig, IngestProgress
from agentmesh.services.cli import runner
from agentmesh.services.eval.cli import eval_app
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


def _client_config(address: str, tenant: str | None) -> ClientConfig:
    """The client configuration: the gateway, the tenant, and the gateway credential from the
    environment — ``AGENTMESH_TOKEN`` (a JWT, sent as ``authorization: Bearer``) or
    ``AGENTMESH_API_KEY`` (sent as ``x-api-key``). A local mesh in dev mode needs neither."""
    try:
        return ClientConfig.from_env(address=address, tenant=tenant)
    except ValueError as exc:
        _fail(str(exc), 2)


def _rpc_failure(exc: AgentMeshError) -> NoReturn:
    _fail(f"{exc.code.name}: {exc.message or 'no details'}")


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
    config = _client_config(address, tenant)
    try:
        reply = asyncio.run(_ingest(config, documents, collection, timeout))
    except AgentMeshError as exc:
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


async def _ingest(config: ClientConfig, documents: list, collection: str, timeout_s: float):  # noqa: ANN202
    progress = Progress(
        SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=err,
    )
    task = progress.add_task("sending documents", total=len(documents))

    def sent(report: IngestProgress) -> None:
        progress.update(task, completed=report.documents_sent)
        if report.documents_sent == len(documents):
            progress.update(task, description="waiting for the retrieval service to embed and write")

    async with AsyncClient(config) as client:
        with progress:
            reply = await client.documents.ingest(documents, collection=collection, on_progress=sent, timeout=timeout_s)
            progress.update(task, description="embedded and written")
            return reply


# --------------------------------------------------------------------------------------- chat


@app.command()
def chat(
    question: str = typer.Argument(..., help="The question or instruction for the agent."),
    session: str = typer.Option(..., "--session", "-s", help="Session id; its memory carries over between turns."),
    gateway: str | None = GATEWAY_OPTION,
    tenant: str | None = TENANT_OPTION,
    user: str = typer.Option(
        "", "--user", "-u",
        help="User the run acts for within the tenant (their session and long-term facts); empty: the gateway's "
        "authenticated subject, else the tenant's default user.",
    ),
    agent: str = typer.Option(
        "", "--agent", "-a",
        help="Agent or workflow to run, by name (the orchestrator's agents YAML; the server lists them when the "
        "name is unknown). Its definition then decides model and collection.",
    ),
    model: str = typer.Option("", "--model", help="Model alias for the LLM router (empty: the router default)."),
    collection: str = typer.Option("", "--collection", help="Collection to ground the answer in."),
    timeout: float = typer.Option(120.0, "--timeout", min=0.001, help="Deadline of the whole run, in seconds."),
) -> None:
    """Ask the agent through the gateway (AgentService.Run) and print the answer as it streams,
    with tool calls and retrieval as dim side lines and the citations and usage at the end.

    A run that pauses for a person's approval of a tool call prints the pending calls and the
    `agentmesh runs approve` / `reject` commands that continue it (exit code 0)."""
    if agent and (model or collection):
        _fail(f"--agent {agent} decides the model and collection: leave out --model and --collection", 2)
    config = _client_config(_gateway_address(gateway), tenant)
    printer = _RunPrinter(tenant=tenant)
    try:
        asyncio.run(_chat(config, question, session, agent, model, collection, timeout, printer, user=user))
    except AgentMeshError as exc:
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
    config: ClientConfig, question: str, session: str, agent: str, model: str, collection: str, timeout_s: float,
    printer: _RunPrinter, *, user: str = "",
) -> None:
    async with AsyncClient(config) as client:
        run = client.agent.run(
            question, session_id=session, user_id=user, agent=agent, model=model, collection=collection,
            timeout=timeout_s,
        )
        async for event in run:
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
    else as dim side lines that always start on a line of their own. ``tenant`` goes into the
    commands printed for an approval interrupt."""

    def __init__(self, run_id: str = "", tenant: str | None = None) -> None:
        self.at_line_start = True
        self.finished = False
        self.tool_names: dict[str, str] = {}
        self.run_id = run_id
        self.tenant = tenant

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
            self.run_id = event.started.run_id
            self.side(f"run {event.started.run_id} · request {event.started.request_id}")
        elif kind == "memory_loaded":
            m = event.memory_loaded
            if m.messages or m.messages_omitted:
                omitted = f", {m.messages_omitted} older omitted" if m.messages_omitted else ""
                self.side(f"memory: {_plural(m.messages, 'message')} ({_plural(m.tokens, 'token')}{omitted})")
            if m.facts:
                self.side(f"memory: {_plural(m.facts, 'fact')} about the user recalled")
            if m.notice:
                self.side(f"memory: {m.notice}")
        elif kind == "interrupt":
            self.end_line()
            for line in _approval_lines(self.run_id, event.interrupt, self.tenant):
                _info(line)
        elif kind == "interrupt_resolved":
            verdicts = [f"{'approved' if d.approved else 'rejected'} {d.tool_call_id}"
                        f"{' (edited)' if d.HasField('arguments') else ''}" for d in event.interrupt_resolved.decisions]
            self.side(f"resumed: {', '.join(verdicts)}")
        elif kind == "resumed":
            self.side(f"run taken over by {event.resumed.replica}: the step in progress runs again")
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
                replayed = ", stored result of the first call" if r.replayed else ""
                self.side(f"← {r.name} {_compact(output)} ({r.duration_ms} ms{replayed})")
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


def _call_spec(approval: Any, approvals: Any) -> str:
    """How a command names a pending call: its tool call id, or ``<invocation>/<id>`` when two
    agents of the run wait with the same id."""
    call_id = approval.tool_call.id
    shared = sum(1 for a in approvals if a.tool_call.id == call_id) > 1
    return f"{approval.invocation_id}/{call_id}" if shared else call_id


def _approval_lines(run_id: str, interrupt: Any, tenant: str | None) -> list[str]:
    """The pending calls of an interrupt and the commands that decide them."""
    approvals = list(interrupt.approvals)
    lines = [f"approval needed for {_plural(len(approvals), 'tool call')} (run {run_id}, interrupt {interrupt.interrupt_id}):"]
    for a in approvals:
        arguments = _compact(json_format.MessageToDict(a.tool_call.arguments))
        lines.append(f"  {_call_spec(a, approvals)} · {a.tool_call.name}({arguments}) · agent {a.agent}, step {a.step}")
    specs = " ".join(_call_spec(a, approvals) for a in approvals)
    where = f" --tenant {tenant}" if tenant else ""
    lines.append(f"approve with: agentmesh runs approve {run_id} {specs}{where}")
    lines.append(f'reject with:  agentmesh runs reject {run_id} {specs} --reason "why"{where}')
    return lines


# --------------------------------------------------------------------------------------- runs

runs_app = typer.Typer(
    help="A run by id (from chat's `run <id>` line): show it, approve or reject the tool calls it waits for, "
    "cancel it.",
    no_args_is_help=True,
)
app.add_typer(runs_app, name="runs")
RUN_ID_ARGUMENT = typer.Argument(..., help="The run id (32 hex digits), as chat prints it.")


def _run_call(coro_factory: Any) -> Any:
    try:
        return asyncio.run(coro_factory())
    except AgentMeshError as exc:
        _rpc_failure(exc)


@runs_app.command("show")
def runs_show(
    run_id: str = RUN_ID_ARGUMENT,
    gateway: str | None = GATEWAY_OPTION,
    tenant: str | None = TENANT_OPTION,
    timeout: float = typer.Option(10.0, "--timeout", min=0.001, help="Deadline of the call, in seconds."),
) -> None:
    """Show a run: where it is, usage, answer, the tool calls it waits for.

    From its last checkpoint (AgentService.GetRun); pending calls come with the commands that
    decide them."""
    from agentmesh.agent.v1 import agent_pb2  # noqa: PLC0415

    config = _client_config(_gateway_address(gateway), tenant)

    async def get() -> Any:
        async with AsyncClient(config) as client:
            return await client.agent.get(run_id, timeout=timeout)

    info = _run_call(get)
    phase = agent_pb2.RunPhase.Name(info.phase).removeprefix("RUN_PHASE_")
    status = agent_pb2.RunStatus.Name(info.status).removeprefix("RUN_STATUS_")
    user = f" · user {info.user_id}" if info.user_id else ""
    _info(f"run {info.run_id} · agent {info.agent} · session {info.session_id}{user}")
    u = info.usage
    _info(
        f"{phase}" + (f" ({status})" if info.status and status != phase else "") + f" · {_plural(info.steps, 'step')} · "
        f"{u.input_tokens} input + {u.output_tokens} output tokens · events {info.first_sequence}..{info.last_sequence}"
    )
    if info.replica:
        _info(f"running on {info.replica}")
    if info.error_message:
        _info(f"reason: {info.error_message}")
    if info.output:
        _info(f"output: {info.output}")
    if info.phase == agent_pb2.RUN_PHASE_INTERRUPTED:
        for line in _approval_lines(info.run_id, info.interrupt, tenant):
            _info(line)


def _decide(info: Any, named: list[str], others: list[str], approve: bool, reason: str,
            edits: dict[str, dict[str, Any]] | None = None) -> list[Any]:
    """One decision per pending call: ``named`` get this command's verdict, ``others`` the
    opposite; without ``named`` every call not in ``others`` gets this command's verdict.
    ``edits``: reviewer arguments of approved calls, by call spec. Exits with a message naming
    the pending calls when a name matches none, several, or a call is left without a decision."""
    from agentmesh.agent.v1 import agent_pb2  # noqa: PLC0415

    approvals = list(info.interrupt.approvals)
    pending = ", ".join(f"{_call_spec(a, approvals)} ({a.tool_call.name})" for a in approvals)

    def index_of(spec: str) -> int:
        hits = [i for i, a in enumerate(approvals) if spec in (a.tool_call.id, f"{a.invocation_id}/{a.tool_call.id}")]
        if not hits:
            _fail(f"run {info.run_id} has no pending tool call {spec!r}; it waits for: {pending}", 2)
        if len(hits) > 1:
            _fail(f"{spec!r} names a pending call of several agents; use INVOCATION/CALL_ID: {pending}", 2)
        return hits[0]

    verdicts: dict[int, bool] = {}
    for specs, verdict in ((named, approve), (others, not approve)):
        for spec in specs:
            index = index_of(spec)
            if index in verdicts:
                _fail(f"tool call {spec!r} is named twice", 2)
            verdicts[index] = verdict
    missing = [i for i in range(len(approvals)) if i not in verdicts]
    if missing and named:
        names = " ".join(_call_spec(approvals[i], approvals) for i in missing)
        _fail(
            f"every pending call needs a decision; also name {names} (e.g. `agentmesh runs "
            f"{'approve' if approve else 'reject'} {info.run_id} {' '.join(named)} {names}`, or "
            f"--{'reject' if approve else 'approve'} {names})", 2,
        )
    for i in missing:
        verdicts[i] = approve
    edited = {index_of(spec): arguments for spec, arguments in (edits or {}).items()}
    for i in edited:
        if not verdicts[i]:
            _fail(f"tool call {_call_spec(approvals[i], approvals)} is rejected: --edit goes only with an approval", 2)
    decisions = []
    for i, a in enumerate(approvals):
        decision = agent_pb2.ToolCallDecision(
            tool_call_id=a.tool_call.id, invocation_id=a.invocation_id, approved=verdicts[i],
            reason="" if verdicts[i] else reason,
        )
        if i in edited:
            decision.arguments.update(edited[i])
        decisions.append(decision)
    return decisions


def _edits(values: list[str]) -> dict[str, dict[str, Any]]:
    """``CALL=JSON`` options as {call spec: arguments object}; exits 2 on a malformed one."""
    out: dict[str, dict[str, Any]] = {}
    for value in values:
        spec, sep, text = value.partition("=")
        if not sep or not spec:
            _fail(f"--edit {value!r}: use CALL_ID='{{\"name\": \"value\"}}' (the call's new JSON arguments)", 2)
        try:
            arguments = json.loads(text)
        except json.JSONDecodeError as exc:
            _fail(f"--edit {spec}: the arguments are not JSON ({exc})", 2)
        if not isinstance(arguments, dict):
            _fail(f"--edit {spec}: the arguments must be a JSON object, not {type(arguments).__name__}", 2)
        if spec in out:
            _fail(f"--edit {spec} is given twice", 2)
        out[spec] = arguments
    return out


def _resolve(run_id: str, named: list[str], others: list[str], approve: bool, reason: str,
             gateway: str | None, tenant: str | None, timeout_s: float,
             edits: dict[str, dict[str, Any]] | None = None) -> None:
    from agentmesh.agent.v1 import agent_pb2  # noqa: PLC0415

    config = _client_config(_gateway_address(gateway), tenant)
    printer = _RunPrinter(run_id=run_id, tenant=tenant)

    async def resolve() -> None:
        async with AsyncClient(config) as client:
            info = await client.agent.get(run_id, timeout=min(timeout_s, 10.0))
            if info.phase != agent_pb2.RUN_PHASE_INTERRUPTED:
                phase = agent_pb2.RunPhase.Name(info.phase).removeprefix("RUN_PHASE_")
                status = agent_pb2.RunStatus.Name(info.status).removeprefix("RUN_STATUS_")
                _fail(f"run {run_id} is {phase}" + (f" ({status})" if info.status else "") +
                      ": it waits for no decision")
            decisions = _decide(info, named, others, approve, reason, edits)
            stream = client.agent.resolve_interrupt(run_id, info.interrupt.interrupt_id, decisions, timeout=timeout_s)
            async for event in stream:
                printer.event(event)

    try:
        asyncio.run(resolve())
    except AgentMeshError as exc:
        printer.end_line()
        _rpc_failure(exc)
    except KeyboardInterrupt:
        printer.end_line()
        err.print("cancelled")
        raise typer.Exit(130) from None
    if not printer.finished:
        printer.end_line()
        _fail("UNKNOWN: the stream ended before its final event")


CALLS_ARGUMENT = typer.Argument(
    None, help="Pending tool call ids (as listed by chat or `runs show`); none = every pending call."
)
REASON_OPTION = typer.Option("", "--reason", help="Why calls are rejected; the model reads it (at most 1000 characters).")


@runs_app.command("approve")
def runs_approve(
    run_id: str = RUN_ID_ARGUMENT,
    calls: list[str] | None = CALLS_ARGUMENT,
    reject: list[str] | None = typer.Option(None, "--reject", help="A pending call to reject instead (repeatable)."),
    edit: list[str] | None = typer.Option(
        None, "--edit", metavar="CALL=JSON",
        help="Run an approved call with these JSON arguments instead of the model's (repeatable).",
    ),
    reason: str = REASON_OPTION,
    gateway: str | None = GATEWAY_OPTION,
    tenant: str | None = TENANT_OPTION,
    timeout: float = typer.Option(120.0, "--timeout", min=0.001, help="Deadline of the rest of the run, in seconds."),
) -> None:
    """Approve tool calls a paused run waits for, and follow the run.

    AgentService.ResolveInterrupt; the run is printed from there on as chat does. Every pending
    call needs a decision: name them all, or none (= all), and reject some with --reject. With
    --edit an approved call runs with the reviewer's arguments, and the model reads it so."""
    _resolve(run_id, list(calls or []), list(reject or []), True, reason, gateway, tenant, timeout,
             _edits(list(edit or [])))


@runs_app.command("reject")
def runs_reject(
    run_id: str = RUN_ID_ARGUMENT,
    calls: list[str] | None = CALLS_ARGUMENT,
    approve: list[str] | None = typer.Option(None, "--approve", help="A pending call to approve instead (repeatable)."),
    reason: str = REASON_OPTION,
    gateway: str | None = GATEWAY_OPTION,
    tenant: str | None = TENANT_OPTION,
    timeout: float = typer.Option(120.0, "--timeout", min=0.001, help="Deadline of the rest of the run, in seconds."),
) -> None:
    """Reject tool calls a paused run waits for, and follow the run.

    Rejected calls do not run; the model is told a reviewer rejected them (and --reason). The run
    then goes on and is printed as chat does; approve some with --approve."""
    _resolve(run_id, list(calls or []), list(approve or []), False, reason, gateway, tenant, timeout)


@runs_app.command("cancel")
def runs_cancel(
    run_id: str = RUN_ID_ARGUMENT,
    reason: str = typer.Option("", "--reason", help="Recorded with the run."),
    gateway: str | None = GATEWAY_OPTION,
    tenant: str | None = TENANT_OPTION,
    timeout: float = typer.Option(10.0, "--timeout", min=0.001, help="Deadline of the call, in seconds."),
) -> None:
    """Cancel a run: stop it wherever it runs, or end it while paused (AgentService.CancelRun)."""
    from agentmesh.agent.v1 import agent_pb2  # noqa: PLC0415

    config = _client_config(_gateway_address(gateway), tenant)

    async def cancel() -> Any:
        async with AsyncClient(config) as client:
            return await client.agent.cancel(run_id, reason=reason, timeout=timeout)

    info = _run_call(cancel)
    status = agent_pb2.RunStatus.Name(info.status).removeprefix("RUN_STATUS_") if info.status else "still stopping"
    _info(f"run {run_id}: {status}")


# --------------------------------------------------------------------------------------- eval

app.add_typer(eval_app, name="eval")

if __name__ == "__main__":
    app()
