"""Idempotency keys of ExecuteTool, with a real redis-server and with the in-process LRU."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
import redis.asyncio as aioredis
from google.protobuf import json_format, struct_pb2

from agentmesh.services.cli.processes import free_port, start_redis
from agentmesh.services.runtime.errors import unavailable
from agentmesh.services.tools.idempotency import MemoryIdempotencyStore, scoped_key
from agentmesh.services.tools.registry import Tool, ToolError, ToolOutput
from agentmesh.services.tools.service import ToolsService, ToolsSettings
from agentmesh.tools.v1 import tools_pb2, tools_pb2_grpc
from tests.support import running_service


class Counter(Tool):
    """Counts its runs; sleeps ``seconds`` first; fails as asked."""

    name = "counter"
    description = "Counts."
    parameters_schema = {
        "type": "object",
        "properties": {
            "label": {"type": "string"},
            "seconds": {"type": "number"},
            "fail": {"enum": ["status", "error"]},
        },
        "required": ["label"],
    }

    def __init__(self):
        self.runs = 0
        self.finished = 0
        self.cancelled = asyncio.Event()
        self.fail_next_with_status = False

    async def run(self, arguments, progress):
        self.runs += 1
        await progress(f"run {self.runs}", None)
        try:
            await asyncio.sleep(arguments.get("seconds", 0))
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        self.finished += 1
        if arguments.get("fail") == "error":
            raise ToolError(f"failed on run {self.runs}")
        if self.fail_next_with_status:
            self.fail_next_with_status = False
            raise unavailable("a dependency is down")
        return ToolOutput(output={"label": arguments["label"], "run": self.runs})


def request(key: str, tenant_label: str = "a", detach: bool = False, **arguments) -> tools_pb2.ExecuteToolRequest:
    args = struct_pb2.Struct()
    args.update({"label": tenant_label, **arguments})
    return tools_pb2.ExecuteToolRequest(
        name="counter", arguments=args, idempotency_key=key, tool_call_id="call_i", continue_on_disconnect=detach
    )


async def start_then_leave(stub, req, tenant: str = "acme") -> None:
    """Start a call, read its first (progress) event, then go away as a dead client would."""
    call = stub.ExecuteTool(req, metadata=(("x-tenant-id", tenant),), timeout=20)
    first = await call.read()
    assert first.WhichOneof("event") == "progress"
    call.cancel()


async def execute(stub, req, tenant: str = "acme") -> list[tools_pb2.ExecuteToolResponse]:
    return [item async for item in stub.ExecuteTool(req, metadata=(("x-tenant-id", tenant),), timeout=20)]


class RedisServer:
    def __init__(self, root):
        self.port = free_port()
        self.proc = start_redis(self.port, root / "data", root / "logs", appendonly=False)
        self.url = f"redis://127.0.0.1:{self.port}/0"


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("tools-redis"))
    try:
        yield server
    finally:
        server.proc.stop()


@pytest.fixture(scope="module", params=["redis", "memory"])
async def service(request, redis_server) -> AsyncIterator[tuple[tools_pb2_grpc.ToolServiceStub, Counter, str]]:
    counter = Counter()
    url = redis_server.url if request.param == "redis" else ""
    settings = ToolsSettings(redis_url=url, idempotency_ttl_s=600, max_runtime_s=5)
    async with running_service(ToolsService(settings, tools=[counter])) as address:
        async with grpc.aio.insecure_channel(address) as channel:
            yield tools_pb2_grpc.ToolServiceStub(channel), counter, request.param


async def test_a_repeated_key_returns_the_first_result_without_running_again(service):
    stub, counter, kind = service
    before = counter.runs
    first = await execute(stub, request(f"k1-{kind}"))
    assert [i.WhichOneof("event") for i in first] == ["progress", "result"]
    assert counter.runs == before + 1
    assert not first[-1].result.replayed

    again = await execute(stub, request(f"k1-{kind}"))
    assert [i.WhichOneof("event") for i in again] == ["result"]  # no progress: nothing ran
    assert counter.runs == before + 1
    replay = again[-1].result
    assert replay.replayed
    assert json_format.MessageToDict(replay.output) == json_format.MessageToDict(first[-1].result.output)
    assert replay.duration_ms == first[-1].result.duration_ms


async def test_the_same_key_with_other_arguments_is_refused(service):
    stub, counter, kind = service
    await execute(stub, request(f"k2-{kind}", tenant_label="a"))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await execute(stub, request(f"k2-{kind}", tenant_label="b"))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "already used for a call with other arguments" in err.value.details()


async def test_keys_are_scoped_to_the_tenant(service):
    stub, counter, kind = service
    before = counter.runs
    await execute(stub, request(f"k3-{kind}"), tenant="acme")
    other = await execute(stub, request(f"k3-{kind}"), tenant="globex")
    assert not other[-1].result.replayed
    assert counter.runs == before + 2


async def test_a_concurrent_repeat_waits_for_the_first_result(service):
    stub, counter, kind = service
    before = counter.runs
    first, second = await asyncio.gather(
        execute(stub, request(f"k4-{kind}", seconds=0.5)),
        execute(stub, request(f"k4-{kind}", seconds=0.5)),
    )
    assert counter.runs == before + 1
    replayed = [r[-1].result.replayed for r in (first, second)]
    assert sorted(replayed) == [False, True]
    assert first[-1].result.output == second[-1].result.output


async def test_error_results_are_remembered_too(service):
    stub, counter, kind = service
    before = counter.runs
    first = (await execute(stub, request(f"k5-{kind}", fail="error")))[-1].result
    again = (await execute(stub, request(f"k5-{kind}", fail="error")))[-1].result
    assert first.is_error and again.is_error and again.replayed
    assert again.error_message == first.error_message
    assert counter.runs == before + 1


async def test_a_call_that_ended_with_a_status_can_be_retried_with_its_key(service):
    stub, counter, kind = service
    counter.fail_next_with_status = True
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await execute(stub, request(f"k6-{kind}"))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    before = counter.runs
    retry = (await execute(stub, request(f"k6-{kind}")))[-1].result
    assert not retry.replayed and counter.runs == before + 1


async def test_a_malformed_key_is_invalid(service):
    stub, _, _ = service
    for key in ("x" * 129, "tab\there", "ключ"):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await execute(stub, request(key))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_redis_records_are_shared_by_replicas_and_expire(redis_server):
    """Two service instances on one Redis: the second replays what the first ran."""
    settings = dict(redis_url=redis_server.url, idempotency_ttl_s=120)
    one, two = Counter(), Counter()
    async with running_service(ToolsService(ToolsSettings(**settings), tools=[one])) as a:
        async with running_service(ToolsService(ToolsSettings(**settings), tools=[two])) as b:
            async with grpc.aio.insecure_channel(a) as ca, grpc.aio.insecure_channel(b) as cb:
                first = await execute(tools_pb2_grpc.ToolServiceStub(ca), request("shared"))
                second = await execute(tools_pb2_grpc.ToolServiceStub(cb), request("shared"))
    assert (one.runs, two.runs) == (1, 0)
    assert second[-1].result.replayed and second[-1].result.output == first[-1].result.output
    raw = aioredis.Redis.from_url(redis_server.url)
    try:
        ttl = await raw.ttl(scoped_key("acme", "counter", "shared"))
    finally:
        await raw.aclose()
    assert 0 < ttl <= 120


async def test_the_in_process_store_is_a_bounded_lru():
    counter = Counter()
    service = ToolsService(ToolsSettings(idempotency_cache_entries=2), tools=[counter])
    async with running_service(service) as address, grpc.aio.insecure_channel(address) as channel:
        stub = tools_pb2_grpc.ToolServiceStub(channel)
        for key in ("a", "b", "c"):  # "a" is evicted by "c"
            await execute(stub, request(key))
        assert (await execute(stub, request("c")))[-1].result.replayed
        assert not (await execute(stub, request("a")))[-1].result.replayed
    assert counter.runs == 4
    assert isinstance(service.idempotency, MemoryIdempotencyStore)


# ------------------------------------------------------------------------ continue_on_disconnect


async def test_a_call_that_continues_on_disconnect_outlives_its_caller_and_the_retry_gets_its_result(service):
    stub, counter, kind = service
    counter.cancelled.clear()
    before, finished = counter.runs, counter.finished
    await start_then_leave(stub, request(f"d1-{kind}", detach=True, seconds=0.6))
    # The retry (e.g. by the replica that took the caller's run over) waits for the first call.
    retry = (await execute(stub, request(f"d1-{kind}", detach=True, seconds=0.6)))[-1].result
    assert retry.replayed and json_format.MessageToDict(retry.output) == {"label": "a", "run": before + 1}
    assert (counter.runs, counter.finished) == (before + 1, finished + 1)
    assert not counter.cancelled.is_set()


async def test_without_continue_on_disconnect_a_caller_going_away_stops_the_tool(service):
    stub, counter, kind = service
    counter.cancelled.clear()
    before = counter.runs
    await start_then_leave(stub, request(f"d2-{kind}", seconds=5))
    await asyncio.wait_for(counter.cancelled.wait(), 2)
    retry = (await execute(stub, request(f"d2-{kind}")))[-1].result  # the claim was released
    assert not retry.replayed and counter.runs == before + 2


async def test_cancel_tool_call_stops_a_call_whose_caller_still_listens(service):
    stub, counter, kind = service
    counter.cancelled.clear()
    call = stub.ExecuteTool(request(f"d3-{kind}", detach=True, seconds=30), metadata=(("x-tenant-id", "acme"),),
                            timeout=20)
    assert (await call.read()).WhichOneof("event") == "progress"
    reply = await stub.CancelToolCall(
        tools_pb2.CancelToolCallRequest(name="counter", idempotency_key=f"d3-{kind}"), metadata=(("x-tenant-id", "acme"),)
    )
    assert reply.cancelled
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call.read()
    assert err.value.code() == grpc.StatusCode.CANCELLED and "was cancelled" in err.value.details()
    assert counter.cancelled.is_set()
    # Nothing was stored: the key runs the tool again; a finished call is not "cancelled".
    before = counter.runs
    again = (await execute(stub, request(f"d3-{kind}", detach=True)))[-1].result
    assert not again.replayed and counter.runs == before + 1
    reply = await stub.CancelToolCall(
        tools_pb2.CancelToolCallRequest(name="counter", idempotency_key=f"d3-{kind}"), metadata=(("x-tenant-id", "acme"),)
    )
    assert not reply.cancelled


async def test_continue_on_disconnect_needs_a_key_and_cancel_needs_a_name_and_key(service):
    stub, _, _ = service
    bad = request("", detach=True)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await execute(stub, bad)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "needs an idempotency_key" in err.value.details()
    for name, key in (("", "k"), ("counter", ""), ("counter", "x" * 129)):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.CancelToolCall(tools_pb2.CancelToolCallRequest(name=name, idempotency_key=key))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_cancel_tool_call_on_another_replica_stops_a_detached_call(redis_server):
    """The call runs on replica A, its caller is gone; CancelToolCall lands on replica B."""
    settings = dict(redis_url=redis_server.url, idempotency_ttl_s=120, cancel_poll_s=0.1)
    one, two = Counter(), Counter()
    md = (("x-tenant-id", "acme"),)
    async with running_service(ToolsService(ToolsSettings(**settings), tools=[one])) as a:
        async with running_service(ToolsService(ToolsSettings(**settings), tools=[two])) as b:
            async with grpc.aio.insecure_channel(a) as ca, grpc.aio.insecure_channel(b) as cb:
                stub_a, stub_b = tools_pb2_grpc.ToolServiceStub(ca), tools_pb2_grpc.ToolServiceStub(cb)
                await start_then_leave(stub_a, request("remote", detach=True, seconds=30))
                await asyncio.sleep(0.3)
                assert not one.cancelled.is_set()  # the caller left; the call goes on
                started = asyncio.get_running_loop().time()
                reply = await stub_b.CancelToolCall(
                    tools_pb2.CancelToolCallRequest(name="counter", idempotency_key="remote"), metadata=md
                )
                assert reply.cancelled
                await asyncio.wait_for(one.cancelled.wait(), 1.0)
                assert asyncio.get_running_loop().time() - started < 1.0
                # The claim is released (a retry racing the release waits for it): the key runs the
                # tool again, here on B.
                result = [i async for i in stub_b.ExecuteTool(request("remote", detach=True), metadata=md, timeout=20)]
                assert not result[-1].result.replayed and two.runs == 1
