"""Per-tenant / per-API-key admission, spend and budgets in a real Redis."""

from __future__ import annotations

import asyncio
import datetime as dt

import grpc
import pytest
import redis.asyncio as aioredis
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from agentmesh.llm.v1 import llm_pb2, llm_pb2_grpc
from agentmesh.services.cli.processes import free_port, start_redis
from agentmesh.services.llm.admission import Admission, Refusal, Reservation, Scope
from agentmesh.services.llm.catalogue import LimitConfig
from tests.fakes.openai_server import FakeOpenAIServer
from tests.llm.support import catalogue_router, openai_deployment, stream, user


def request(text: str = "hello there", max_tokens: int = 100, model: str = "chat") -> llm_pb2.StreamGenerateRequest:
    return llm_pb2.StreamGenerateRequest(model=model, messages=[user(text)],
                                         options=llm_pb2.GenerationOptions(max_tokens=max_tokens))


def details(err: grpc.aio.AioRpcError) -> tuple[float | None, list[str]]:
    """(RetryInfo delay in s, QuotaFailure subjects) of a status."""
    status = rpc_status.from_call(err)
    delay, subjects = None, []
    for any_ in status.details if status else ():
        if any_.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            any_.Unpack(info)
            delay = info.retry_delay.ToMilliseconds() / 1000
        elif any_.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
            failure = error_details_pb2.QuotaFailure()
            any_.Unpack(failure)
            subjects += [v.subject for v in failure.violations]
    return delay, subjects


def with_tenant(tenant: str, key: str = "") -> tuple[tuple[str, str], ...]:
    md = [("x-tenant-id", tenant)]
    if key:
        md.append(("x-api-key-id", key))
    return tuple(md)


async def call(stub: llm_pb2_grpc.LLMServiceStub, req, metadata=()) -> tuple[list, grpc.aio.AioRpcError | None]:
    events = []
    try:
        async for event in stub.StreamGenerate(req, metadata=metadata, timeout=20):
            events.append(event)
    except grpc.aio.AioRpcError as err:
        return events, err
    return events, None


@pytest.fixture
def fake():
    with FakeOpenAIServer(api_key="sk-test") as server:
        yield server


def chat(fake, limits: dict, **deployment: object) -> dict:
    return {"models": {"chat": {"deployments": [openai_deployment("primary", fake, model="gpt-4o", **deployment)]}},
            "limits": limits}


async def test_tpm_reserves_max_tokens_refuses_with_retry_info_and_reconciles(tmp_path, fake, redis_settings):
    slow = {"text": "slow answer", "first_token_delay_s": 0.6, "usage": {"input_tokens": 10, "output_tokens": 5}}
    fake.enqueue(slow, slow, *[{"text": "ok", "usage": {"input_tokens": 10, "output_tokens": 5}}] * 10)
    limits = {"tenants": {"acme": {"tpm": 500}}}
    async with catalogue_router(tmp_path / "c.yaml", chat(fake, limits), **redis_settings) as stub:
        tokens = (await stub.CountTokens(llm_pb2.CountTokensRequest(model="chat", messages=[user("hello there")]),
                                         timeout=5)).input_tokens
        # Two slow calls at once reserve 2 x (prompt + 200) tokens; a third does not fit in 500.
        first = asyncio.create_task(call(stub, request(max_tokens=200), with_tenant("acme")))
        second = asyncio.create_task(call(stub, request(max_tokens=200), with_tenant("acme")))
        for _ in range(200):  # both admitted once both reached the provider (slow first tokens: still open)
            if len(fake.requests) == 2:
                break
            await asyncio.sleep(0.02)
        events, refused = await call(stub, request(max_tokens=200), with_tenant("acme"))
        assert events == [] and refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "tenant 'acme' reached its limit of 500 tokens per minute" in refused.details()
        delay, subjects = details(refused)
        assert subjects == ["tenant:acme"] and 55 < delay <= 60  # the reservations leave the window in ~60 s
        assert (await first)[1] is None and (await second)[1] is None
        # Reconciled: each call now holds its real usage (15 tokens), not prompt + 200.
        for _ in range(3):
            events, err = await call(stub, request(max_tokens=200), with_tenant("acme"))
            assert err is None, err
        # Another tenant is not limited by acme's window.
        assert (await call(stub, request(max_tokens=200), with_tenant("other")))[1] is None
    assert tokens > 0
    client = aioredis.Redis.from_url(redis_settings["redis_url"])
    total = await client.get(f"{redis_settings['redis_prefix']}:{{adm}}:t:acme:tpm:sum")
    await client.aclose()
    assert int(total) == 5 * 15  # 5 admitted calls, each reconciled to the usage the provider reported


async def test_rpm_per_api_key_and_requests_larger_than_the_limit(tmp_path, fake, redis_settings):
    fake.enqueue(*[{"text": "ok"}] * 10)
    limits = {"api_keys": {"key-1": {"rpm": 2}}, "default_tenant": {"tpm": 1000}}
    async with catalogue_router(tmp_path / "c.yaml", chat(fake, limits), **redis_settings) as stub:
        for _ in range(2):
            assert (await call(stub, request(), with_tenant("t1", "key-1")))[1] is None
        _, refused = await call(stub, request(), with_tenant("t1", "key-1"))
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "api_key 'key-1' reached its limit of 2 requests per minute" in refused.details()
        assert details(refused)[1] == ["api_key:key-1"]
        # A key without an entry is unlimited; the tenant default still applies to everyone.
        assert (await call(stub, request(), with_tenant("t1", "key-2")))[1] is None
        _, too_big = await call(stub, request(max_tokens=1500), with_tenant("t2"))
        assert too_big.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "may use at most 1000 tokens per minute" in too_big.details() and "max_tokens 1500" in too_big.details()
        _, bad_key = await call(stub, request(), with_tenant("t1", "bad key"))
        assert bad_key.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_spend_is_tracked_and_a_spent_budget_refuses(tmp_path, fake, redis_settings):
    # 1000 input + 500 output tokens at $2 / $10 per million = $0.007 per call.
    fake.enqueue(*[{"text": "ok", "usage": {"input_tokens": 1000, "output_tokens": 500}}] * 3)
    limits = {"tenants": {"acme": {"budget_usd": 0.01, "budget_period": "month"}}}
    catalogue = chat(fake, limits, input_usd_per_mtok=2.0, output_usd_per_mtok=10.0)
    async with catalogue_router(tmp_path / "c.yaml", catalogue, **redis_settings) as stub:
        events, err = await call(stub, request(), with_tenant("acme", "k1"))
        assert err is None and events[-1].finish.cost_usd == pytest.approx(0.007)
        assert (await call(stub, request(), with_tenant("acme", "k1")))[1] is None  # spent 0.007 < 0.01
        _, refused = await call(stub, request(), with_tenant("acme", "k1"))
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "tenant 'acme' reached its budget of 0.01 USD per month" in refused.details()
        delay, subjects = details(refused)
        assert subjects == ["tenant:acme"] and 0 < delay <= 31 * 86_400  # until the month ends
        spend = await stub.GetSpend(llm_pb2.GetSpendRequest(), metadata=with_tenant("acme", "k1"), timeout=5)
    (tenant, key) = spend.spends
    assert (tenant.scope, tenant.id, tenant.budget_usd, tenant.period) == ("tenant", "acme", 0.01, "month")
    assert tenant.spent_usd == pytest.approx(0.014) and key.spent_usd == pytest.approx(0.014)
    assert (key.scope, key.id, key.budget_usd) == ("api_key", "k1", 0.0)
    assert len(tenant.period_id) == 7  # YYYY-MM
    assert len(fake.requests) == 2


async def test_spend_shows_what_calls_in_flight_hold_until_they_settle(tmp_path, fake, redis_settings):
    # Worst case held at admission: max_tokens 500 at $10 per million output tokens alone is $0.005.
    fake.enqueue({"text": "ok", "usage": {"input_tokens": 1000, "output_tokens": 20}, "first_token_delay_s": 1.5})
    limits = {"tenants": {"acme": {"budget_usd": 1.0, "budget_period": "day"}}}
    catalogue = chat(fake, limits, input_usd_per_mtok=2.0, output_usd_per_mtok=10.0)
    async with catalogue_router(tmp_path / "c.yaml", catalogue, **redis_settings) as stub:
        in_flight = asyncio.create_task(call(stub, request(max_tokens=500), with_tenant("acme")))
        while not fake.requests:  # admitted (and held) before the provider is called
            await asyncio.sleep(0.02)
        (during,) = (await stub.GetSpend(llm_pb2.GetSpendRequest(), metadata=with_tenant("acme"), timeout=5)).spends
        events, err = await in_flight
        assert err is None
        (after,) = (await stub.GetSpend(llm_pb2.GetSpendRequest(), metadata=with_tenant("acme"), timeout=5)).spends
    assert during.spent_usd == 0.0 and 0.005 <= during.held_usd < 0.006
    # Settled to the real cost: 1000 input + 20 output tokens = $0.0022, nothing held any more.
    assert after.held_usd == 0.0 and after.spent_usd == pytest.approx(0.0022)
    assert events[-1].finish.cost_usd == pytest.approx(0.0022)


async def test_deployment_limits_send_traffic_to_the_next_deployment(tmp_path, redis_settings):
    with FakeOpenAIServer(api_key="sk-test") as a, FakeOpenAIServer(api_key="sk-test") as b:
        a.enqueue(*[{"text": "from a"}] * 5)
        b.enqueue(*[{"text": "from b"}] * 5)
        catalogue = {"models": {"chat": {"deployments": [openai_deployment("a", a, rpm=2), openai_deployment("b", b)]}}}
        async with catalogue_router(tmp_path / "c.yaml", catalogue, **redis_settings) as stub:
            served = [(await stream(stub, request())).metadata.deployment for _ in range(4)]
            models = await stub.ListModels(llm_pb2.ListModelsRequest(), timeout=5)
    assert served == ["a", "a", "b", "b"]
    assert models.models[0].deployments[0].rpm_limit == 2


async def test_limits_without_redis_fail_at_start_and_an_unreachable_redis_refuses(tmp_path, fake):
    from agentmesh.services.llm.catalogue import CatalogueError
    from agentmesh.services.llm.service import LLMService, LLMSettings
    from tests.llm.support import write_catalogue

    path = write_catalogue(tmp_path / "c.yaml", chat(fake, {"default_tenant": {"rpm": 10}}))
    with pytest.raises(CatalogueError, match="AGENTMESH_LLM_REDIS_URL"):
        await LLMService(LLMSettings(catalogue=path)).start()

    port = free_port()
    proc = start_redis(port, tmp_path / "redis", tmp_path / "logs", appendonly=False)
    fake.enqueue({"text": "ok"})
    try:
        async with catalogue_router(tmp_path / "c.yaml", chat(fake, {"default_tenant": {"rpm": 10}}),
                                    redis_url=f"redis://127.0.0.1:{port}/0") as stub:
            assert (await call(stub, request()))[1] is None
            proc.stop()
            _, err = await call(stub, request())
    finally:
        proc.stop()
    assert err.code() == grpc.StatusCode.UNAVAILABLE and "cannot check rate limits" in err.details()


async def test_admission_script_is_exact_over_the_window(redis_settings):
    """Direct script check: reservations fill the TPM window exactly; settle frees the unused part."""
    client = aioredis.Redis.from_url(redis_settings["redis_url"])
    admission = Admission(client, redis_settings["redis_prefix"])
    scope = Scope("tenant", "exact", LimitConfig(tpm=100, rpm=5))
    first = (await admission.admit([scope], 60)).reservation
    second = (await admission.admit([scope], 40)).reservation
    third = await admission.admit([scope], 1)
    assert isinstance(first, Reservation) and isinstance(second, Reservation)
    assert third.reservation is None and third.refusal.violations[0].limit == "tpm"
    assert 59 < third.refusal.retry_after_s <= 60
    await admission.settle(first, 10, 0.0)
    await admission.settle(first, 0, 0.0)  # settling twice has no effect
    assert (await admission.admit([scope], 50)).reservation is not None  # 10 + 40 + 50 = 100
    assert (await admission.admit([scope], 1)).reservation is None
    too_big = await admission.admit([scope], 101)
    assert too_big.reservation is None and too_big.refusal.too_large
    # 0 tokens (a cache hit) still count as a request: 3 were admitted, 2 more fit in 5 per minute.
    for _ in range(2):
        assert (await admission.admit([scope], 0)).reservation is not None
    rpm = await admission.admit([scope], 0)
    assert rpm.reservation is None and [v.limit for v in rpm.refusal.violations] == ["rpm"]
    await client.aclose()


async def test_budget_holds_are_exact_and_optional_scopes_refuse_alone(redis_settings):
    """Direct script check of budget holds: spend + holds never pass the budget; a hold is raised
    under the same reservation only by the difference; settle releases it and books the cost."""
    client = aioredis.Redis.from_url(redis_settings["redis_url"])
    admission = Admission(client, redis_settings["redis_prefix"])
    tenant = Scope("tenant", "hold", LimitConfig(budget_usd=0.01, budget_period="day"))
    deployment = Scope("deployment", "tiny", LimitConfig(rpm=1))
    a = await admission.admit([tenant], 10, hold_usd=0.004, optional=[deployment])
    assert a.reservation is not None and a.refusal is None and a.reservation.held_usd == pytest.approx(0.004)
    assert await admission.held(tenant) == pytest.approx(0.004)
    # The deployment's own RPM (1) is used up: only it refuses, the tenant scope is admitted.
    b = await admission.admit([tenant], 10, hold_usd=0.004, optional=[deployment])
    assert b.reservation is not None and [v.scope.kind for v in b.refusal.violations] == ["deployment"]
    assert list(b.reservation.scopes) == ["t:hold"]
    # 0.004 + 0.004 held: a third worst case of 0.004 does not fit in 0.01; the refusal says why.
    c = await admission.admit([tenant], 10, hold_usd=0.004)
    assert c.reservation is None
    (v,) = c.refusal.violations
    assert (v.limit, v.spent_usd, v.held_usd) == ("budget", 0.0, pytest.approx(0.008))
    assert c.refusal.retry_after_s == 1.0  # only the holds of calls in flight stand in the way
    # Raising a's hold to 0.006 checks only the difference: 0.006 + 0.004 = 0.01 fits exactly.
    raised = await admission.admit([tenant], 10, hold_usd=0.006, reservation=a.reservation)
    assert raised.reservation is a.reservation and a.reservation.held_usd == pytest.approx(0.006)
    assert await admission.held(tenant) == pytest.approx(0.010)
    assert (await admission.admit([tenant], 10, hold_usd=0.007, reservation=b.reservation)).reservation is None
    # Settling releases the hold and books the real cost.
    await admission.settle(a.reservation, 30, 0.001)
    assert await admission.held(tenant) == pytest.approx(0.004)
    assert await admission.spent(tenant) == pytest.approx(0.001)
    # A worst case above the whole budget can never be admitted.
    huge = await admission.admit([tenant], 10, hold_usd=0.02)
    assert huge.reservation is None and huge.refusal.too_large
    # Spend + holds leave 0.005: 0.006 is refused until the period ends (no hold is in the way alone).
    await admission.settle(b.reservation, 30, 0.0)
    late = await admission.admit([tenant], 10, hold_usd=0.0095)
    assert late.reservation is None and 0 < late.refusal.retry_after_s <= 86_400
    await client.aclose()


async def test_an_abandoned_hold_stops_counting_once_expired_without_another_admission(redis_settings):
    """A router that dies mid-call never settles its hold: GetSpend's reading drops the hold once
    its lifetime is over (not only the next admission of that scope)."""
    client = aioredis.Redis.from_url(redis_settings["redis_url"])
    admission = Admission(client, redis_settings["redis_prefix"])
    tenant = Scope("tenant", "abandoned", LimitConfig(budget_usd=1.0, budget_period="day"))
    kept = await admission.admit([tenant], 10, hold_usd=0.25)
    dead = await admission.admit([tenant], 10, hold_usd=0.5)
    assert await admission.held(tenant) == pytest.approx(0.75)
    # The dead router's hold reaches the end of its lifetime (scores are expiry times in ms).
    hold_log = admission._key(tenant, "hold")
    assert await client.zadd(hold_log, {dead.reservation.id: 1}, xx=True, ch=True) == 1
    assert await admission.held(tenant) == pytest.approx(0.25)
    assert await client.hget(admission._key(tenant, "hold:amount"), dead.reservation.id) is None
    await admission.settle(kept.reservation, 10, 0.1)
    assert await admission.held(tenant) == 0.0 and await admission.spent(tenant) == pytest.approx(0.1)
    await client.aclose()


async def test_every_deployment_at_its_own_limit_is_resource_exhausted(tmp_path, fake, redis_settings):
    fake.enqueue({"text": "ok"})
    catalogue = {"models": {"chat": {"deployments": [openai_deployment("only", fake, rpm=1)]}}}
    async with catalogue_router(tmp_path / "c.yaml", catalogue, fallback_to_extractive=False, **redis_settings) as stub:
        assert (await call(stub, request()))[1] is None
        _, refused = await call(stub, request())
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "every deployment of 'chat' is at its own rate limit (own rate limit reached: only)" in refused.details()
    assert 55 < details(refused)[0] <= 60
    assert len(fake.requests) == 1


async def test_a_failover_to_a_pricier_deployment_raises_the_hold_or_skips_it(tmp_path, redis_settings):
    with FakeOpenAIServer(api_key="sk-test") as cheap, FakeOpenAIServer(api_key="sk-test") as pricey:
        catalogue = {"models": {"chat": {"deployments": [
            openai_deployment("cheap", cheap, input_usd_per_mtok=1.0, output_usd_per_mtok=1.0),
            openai_deployment("pricey", pricey, input_usd_per_mtok=100.0, output_usd_per_mtok=100.0)]}},
            "limits": {"tenants": {"acme": {"budget_usd": 0.05, "budget_period": "day"},
                                   "tight": {"budget_usd": 0.01, "budget_period": "day"}}}}
        cheap.enqueue({"status": 500}, {"status": 500})
        pricey.enqueue({"text": "pricey answer", "first_token_delay_s": 0.6, "usage": {"input_tokens": 10,
                                                                                      "output_tokens": 5}})
        client = aioredis.Redis.from_url(redis_settings["redis_url"])
        prefix = redis_settings["redis_prefix"]
        async with catalogue_router(tmp_path / "c.yaml", catalogue, fallback_to_extractive=False,
                                    **redis_settings) as stub:
            prompt = (await stub.CountTokens(llm_pb2.CountTokensRequest(model="chat", messages=[user("hello there")]),
                                             timeout=5)).input_tokens
            # cheap fails before answering; pricey's worst case (prompt + 200 at $100 / Mtok) is held first.
            task = asyncio.create_task(call(stub, request(max_tokens=200), with_tenant("acme")))
            await asyncio.sleep(0.35)
            held = int(await client.get(f"{prefix}:{{adm}}:t:acme:hold:sum")) / 1e9
            events, err = await task
            assert err is None and events[0].metadata.deployment == "pricey"
            assert held == pytest.approx((prompt + 200) * 100 / 1e6, rel=0.05)
            assert events[-1].finish.cost_usd == pytest.approx(15 * 100 / 1e6)
            # A tenant whose whole budget is below pricey's worst case never reaches it.
            events, err = await call(stub, request(max_tokens=200), with_tenant("tight"))
        day = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
        spent = float(await client.get(f"{prefix}:{{adm}}:t:acme:spend:{day}"))
        holds = [await client.get(f"{prefix}:{{adm}}:t:{t}:hold:sum") for t in ("acme", "tight")]
        await client.aclose()
    assert spent == pytest.approx(15 * 100 / 1e6) and [int(h or 0) for h in holds] == [0, 0]
    assert err.code() == grpc.StatusCode.UNAVAILABLE and events == []
    assert "cheap (openai): HTTP 500" in err.details()
    assert "skipped — budget cannot cover its worst-case cost: pricey" in err.details()
    assert len(pricey.requests) == 1 and len(cheap.requests) == 2
