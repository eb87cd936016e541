"""Two router processes sharing one Redis: one TPM limit, one budget and one circuit breaker per
deployment hold across both (the module starts the pair once)."""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from dataclasses import dataclass

import grpc
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from agentmesh.llm.v1 import llm_pb2, llm_pb2_grpc
from agentmesh.services.cli.processes import Proc, free_port, spawn
from agentmesh.services.runtime.clients import check_health
from tests.fakes.openai_server import FakeOpenAIServer
from tests.fakes.streaming_server import FastOpenAIServer
from tests.llm.support import openai_deployment, user, write_catalogue

pytestmark = pytest.mark.timeout(180)

TPM = 3000
MAX_TOKENS = 60
COMPLETION_TOKENS = 20  # the fast fake streams 20 one-word chunks and reports them as the completion
LOAD_S = 4.0
WORKERS_PER_REPLICA = 16
BUDGET_USD = 0.05
USD_PER_MTOK = 100.0  # input and output: a call of ~24 real tokens costs ~0.0024 USD, its worst case ~0.007
BREAKER = {"window_s": 30, "min_requests": 2, "failure_rate": 0.5, "open_s": 2.0}
SYNC_S = 0.2


@dataclass
class Pair:
    stubs: list[llm_pb2_grpc.LLMServiceStub]
    redis_url: str
    prefix: str
    flaky_a: FakeOpenAIServer
    flaky_b: FakeOpenAIServer

    async def redis_get(self, suffix: str) -> bytes | None:
        client = aioredis.Redis.from_url(self.redis_url)
        try:
            return await client.get(f"{self.prefix}:{suffix}")
        finally:
            await client.aclose()


async def _wait_serving(address: str, proc: Proc, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    async with grpc.aio.insecure_channel(address) as channel:
        while not await check_health(channel):
            assert proc.alive(), f"router exited at start:\n{proc.log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"router not SERVING:\n{proc.log_path.read_text()[-3000:]}"
            await asyncio.sleep(0.1)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def pair(tmp_path_factory, redis_server):
    """Two ``agentmesh serve llm`` processes on one catalogue and one Redis: alias ``chat`` (the fast
    fake, free) with tenant ``shared`` limited to TPM tokens per minute, alias ``priced`` (the same
    fake at USD_PER_MTOK) with tenant ``budgeted`` limited to BUDGET_USD a day, alias ``flaky``
    (two scripted fakes, the first with a quick breaker)."""
    tmp = tmp_path_factory.mktemp("replicas")
    fast = await FastOpenAIServer(tokens=COMPLETION_TOKENS, first_token_ms=40, token_ms=2).start()
    prefix = f"test:{uuid.uuid4().hex[:12]}"
    procs: list[Proc] = []
    channels: list[grpc.aio.Channel] = []
    with FakeOpenAIServer(api_key="sk-test") as flaky_a, FakeOpenAIServer(api_key="sk-test") as flaky_b:
        catalogue = write_catalogue(tmp / "catalogue.yaml", {
            "models": {
                "chat": {"deployments": [{"name": "fast", "provider": "openai", "model": "gpt-4o",
                                          "base_url": fast.base_url}]},
                "priced": {"deployments": [{"name": "fast-priced", "provider": "openai", "model": "gpt-4o",
                                            "base_url": fast.base_url, "input_usd_per_mtok": USD_PER_MTOK,
                                            "output_usd_per_mtok": USD_PER_MTOK}]},
                "flaky": {"deployments": [openai_deployment("flaky-a", flaky_a, circuit_breaker=BREAKER),
                                          openai_deployment("flaky-b", flaky_b)]},
            },
            "limits": {"tenants": {"shared": {"tpm": TPM},
                                   "budgeted": {"budget_usd": BUDGET_USD, "budget_period": "day"}}},
        })
        try:
            addresses = []
            for i in range(2):
                port = free_port()
                env = {"AGENTMESH_LLM_PORT": str(port), "AGENTMESH_LLM_CATALOGUE": catalogue,
                       "AGENTMESH_LLM_REDIS_URL": redis_server, "AGENTMESH_LLM_REDIS_PREFIX": prefix,
                       "AGENTMESH_LLM_FALLBACK_TO_EXTRACTIVE": "false", "AGENTMESH_LLM_LOG_LEVEL": "WARNING",
                       "AGENTMESH_LLM_BREAKER_SYNC_S": str(SYNC_S), "FAKE_OPENAI_KEY": "sk-test",
                       "HF_HUB_OFFLINE": "1"}
                procs.append(spawn(f"router-{i}", [sys.executable, "-m", "agentmesh.services.cli.main", "serve", "llm"],
                                   tmp / "logs", env))
                addresses.append(f"127.0.0.1:{port}")
            for proc, address in zip(procs, addresses, strict=True):
                await _wait_serving(address, proc)
            channels = [grpc.aio.insecure_channel(a) for a in addresses]
            yield Pair([llm_pb2_grpc.LLMServiceStub(c) for c in channels], redis_server, prefix, flaky_a, flaky_b)
        finally:
            for channel in channels:
                await channel.close()
            for proc in procs:
                proc.stop()
            await fast.stop()


def _status_details(err: grpc.aio.AioRpcError) -> tuple[float | None, list[str]]:
    """(RetryInfo delay in s, QuotaFailure subjects)."""
    status = rpc_status.from_call(err)
    delay, subjects = None, []
    for detail in status.details if status else ():
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            delay = info.retry_delay.ToMilliseconds() / 1000
        elif detail.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
            failure = error_details_pb2.QuotaFailure()
            detail.Unpack(failure)
            subjects += [v.subject for v in failure.violations]
    return delay, subjects


async def _worker(stub: llm_pb2_grpc.LLMServiceStub, model: str, tenant: str, until: float, results: list) -> None:
    request = llm_pb2.StreamGenerateRequest(model=model, messages=[user("Count to twenty please.")],
                                            options=llm_pb2.GenerationOptions(max_tokens=MAX_TOKENS))
    while time.monotonic() < until:
        finish = None
        try:
            async for event in stub.StreamGenerate(request, metadata=(("x-tenant-id", tenant),), timeout=20):
                if event.HasField("finish"):
                    finish = event.finish
            results.append(("ok", finish))
        except grpc.aio.AioRpcError as err:
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
            results.append(("refused", err))
            await asyncio.sleep(0.05)


async def _load(pair: Pair, model: str, tenant: str) -> tuple[list[list], list[list]]:
    """Both replicas under WORKERS_PER_REPLICA concurrent callers for LOAD_S: (finishes, refusals)
    per replica."""
    results: list[list] = [[], []]
    until = time.monotonic() + LOAD_S
    await asyncio.gather(*(_worker(pair.stubs[r], model, tenant, until, results[r])
                           for r in range(2) for _ in range(WORKERS_PER_REPLICA)))
    return ([[x for kind, x in replica if kind == "ok"] for replica in results],
            [[x for kind, x in replica if kind == "refused"] for replica in results])


async def test_two_router_processes_share_one_tpm_limit(pair):
    admitted, refused = await _load(pair, "chat", "shared")
    used = sum(f.usage.total_tokens for replica in admitted for f in replica)
    per_call = admitted[0][0].usage.total_tokens
    # Both replicas served and both refused: the load really was split across them.
    assert all(admitted) and all(refused), (list(map(len, admitted)), list(map(len, refused)))
    # The offered load was far above the limit (what each replica alone would have let through).
    assert (sum(map(len, admitted)) + sum(map(len, refused))) * per_call > 2 * TPM
    # The limit held across the two processes...
    assert used <= TPM, f"admitted {used} tokens in one window, limit {TPM}"
    # ...and was used up, not refused wholesale: at most one reservation (prompt + max_tokens) short.
    assert used >= TPM - 2 * (MAX_TOKENS + 20), used
    # Retry delays point at the moment the oldest reservations leave the one-minute window.
    delays = [_status_details(err)[0] for replica in refused for err in replica]
    assert all(d is not None and 0 < d <= 60 for d in delays)
    # Every admitted call was reconciled in Redis to the usage its provider reported.
    assert int(await pair.redis_get("{adm}:t:shared:tpm:sum")) == used


async def test_concurrent_calls_on_two_replicas_never_overspend_a_budget(pair):
    admitted, refused = await _load(pair, "priced", "budgeted")
    costs = [f.cost_usd for replica in admitted for f in replica]
    spent = sum(costs)
    assert all(admitted) and all(refused), (list(map(len, admitted)), list(map(len, refused)))
    # The first wave alone (every worker at once, real cost each) would have passed the budget.
    assert 2 * WORKERS_PER_REPLICA * min(costs) > BUDGET_USD
    # Worst-case holds kept the two replicas' concurrent calls within the budget...
    assert spent <= BUDGET_USD + 1e-12, f"spent {spent} USD, budget {BUDGET_USD}"
    # ...and the budget was used: what is left is less than one call's worst case.
    worst = MAX_TOKENS * USD_PER_MTOK / 1e6
    assert spent > BUDGET_USD - 2 * worst, spent
    # Redis holds the same spend; no hold outlives its call.
    day = time.strftime("%Y-%m-%d", time.gmtime())
    assert float(await pair.redis_get(f"{{adm}}:t:budgeted:spend:{day}")) == pytest.approx(spent)
    assert int(await pair.redis_get("{adm}:t:budgeted:hold:sum") or 0) == 0
    # Every refusal says what is left, what the call may cost and what to do, with RetryInfo.
    errors = [err for replica in refused for err in replica]
    for err in errors:
        message = err.details()
        assert "tenant 'budgeted' " in message and "USD left of its budget of 0.05 USD per day" in message, message
        assert "worst-case cost of" in message and "max_tokens 60 at the prices of deployment 'fast-priced'" in message
        assert "lower options.max_tokens" in message
        delay, subjects = _status_details(err)
        assert subjects == ["tenant:budgeted"] and delay is not None and 0 < delay <= 86_400
    # Refused while other calls held the rest: retry soon; refused on what was spent: when the day ends.
    held = [err for err in errors if ", 0 held by calls in flight" not in err.details()]
    assert held and all(_status_details(err)[0] == 1.0 for err in held)
    assert any(_status_details(err)[0] > 1.0 for err in errors)


async def _answer(stub: llm_pb2_grpc.LLMServiceStub) -> llm_pb2.ResponseMetadata:
    request = llm_pb2.StreamGenerateRequest(model="flaky", messages=[user("Say hello.")])
    events = [e async for e in stub.StreamGenerate(request, timeout=20)]
    assert events[-1].HasField("finish"), events[-1]
    return events[0].metadata


async def _circuit(stub: llm_pb2_grpc.LLMServiceStub, deployment: str) -> int:
    models = await stub.ListModels(llm_pb2.ListModelsRequest(), timeout=5)
    return next(d.circuit_state for m in models.models for d in m.deployments if d.name == deployment)


async def test_failures_seen_by_one_replica_open_the_breaker_for_both(pair):
    a, b = pair.flaky_a, pair.flaky_b
    a.enqueue({"status": 500}, {"status": 500})
    b.enqueue(*[{"text": f"b answer {i}"} for i in range(12)])
    first, second = pair.stubs
    # Replica 1 sees the two failures (2 of 2 ≥ 50 %): the shared circuit opens.
    for _ in range(2):
        meta = await _answer(first)
        assert (meta.deployment, meta.attempts) == ("flaky-b", 2)
    # Replica 2 never called flaky-a, yet skips it: no third request reaches it.
    meta = await _answer(second)
    assert (meta.deployment, meta.attempts) == ("flaky-b", 1)
    assert len(a.requests) == 2
    assert await _circuit(second, "flaky-a") == llm_pb2.CIRCUIT_STATE_OPEN
    # After open_s both replicas see it half-open, and of six concurrent calls only one probes.
    await asyncio.sleep(BREAKER["open_s"] + 0.1)
    assert await _circuit(first, "flaky-a") == llm_pb2.CIRCUIT_STATE_HALF_OPEN
    assert await _circuit(second, "flaky-a") == llm_pb2.CIRCUIT_STATE_HALF_OPEN
    a.enqueue({"text": "a is back", "first_token_delay_s": 0.5})
    metas = await asyncio.gather(*(_answer(stub) for stub in (first, second) for _ in range(3)))
    assert sorted(m.deployment for m in metas) == ["flaky-a"] + ["flaky-b"] * 5
    assert len(a.requests) == 3
    # The probe succeeded: closed for both replicas.
    await asyncio.sleep(SYNC_S + 0.1)
    a.enqueue({"text": "a again"}, {"text": "a again"})
    for stub in (first, second):
        assert await _circuit(stub, "flaky-a") == llm_pb2.CIRCUIT_STATE_CLOSED
        assert (await _answer(stub)).deployment == "flaky-a"
