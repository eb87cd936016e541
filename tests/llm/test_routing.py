"""Routing over a catalogue: failover before the first token, retries, strategies, context-window
fallback, pinning, circuit breakers — real routers against the fake providers."""

from __future__ import annotations

import asyncio
import random

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from agentmesh.common.v1 import common_pb2
from agentmesh.llm.v1 import llm_pb2
from agentmesh.services.llm.catalogue import CircuitBreakerConfig, DeploymentConfig
from agentmesh.services.llm.counting import Tokenizers
from agentmesh.services.llm.providers.extractive import ExtractiveProvider
from agentmesh.services.llm.routing import Circuit, CircuitBreaker, Runtime, order
from tests.fakes.openai_server import FakeOpenAIServer
from tests.llm.support import catalogue_router, chunk, openai_deployment, stream, user

STOP = common_pb2.FINISH_REASON_STOP
HELLO = llm_pb2.StreamGenerateRequest(model="chat", messages=[user("Say hello.")])


@pytest.fixture
def fakes():
    with FakeOpenAIServer(api_key="sk-test") as a, FakeOpenAIServer(api_key="sk-test") as b:
        yield a, b


def two_deployments(a, b, *, strategy="fallback", a_extra=None, b_extra=None, **model):
    return {"models": {"chat": {
        "strategy": strategy,
        "deployments": [openai_deployment("primary", a, **(a_extra or {})),
                        openai_deployment("secondary", b, **(b_extra or {}))],
        **model,
    }}}


def retry_delay_s(err: grpc.aio.AioRpcError) -> float | None:
    status = rpc_status.from_call(err)
    for detail in status.details if status else ():
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return info.retry_delay.ToMilliseconds() / 1000
    return None


async def test_500_on_the_primary_fails_over_invisibly(tmp_path, fakes):
    a, b = fakes
    a.enqueue({"status": 500, "error_message": "The server had an error"})
    b.enqueue({"text": "Hello from the secondary.", "text_chunks": 3})
    async with catalogue_router(tmp_path / "c.yaml", two_deployments(a, b)) as stub:
        result = await stream(stub, HELLO)
    assert result.error is None
    assert result.kinds() == ["metadata"] + ["text_delta"] * 3 + ["usage", "finish"]
    meta = result.metadata
    assert (meta.deployment, meta.model, meta.requested_model, meta.attempts) == ("secondary", "secondary-model", "chat", 2)
    assert meta.notice == ""  # a failover before the first token is invisible
    assert result.text == "Hello from the secondary."
    assert [r["outcome"] for r in a.requests] == ["failed"] and [r["outcome"] for r in b.requests] == ["completed"]
    assert a.bodies[0]["model"] == "primary-model" and b.bodies[0]["model"] == "secondary-model"


async def test_429_with_retry_after_is_retried_on_the_same_deployment(tmp_path, fakes):
    a, b = fakes
    a.enqueue({"status": 429, "retry_after": 1, "error_message": "Rate limit reached"}, {"text": "second try worked"})
    catalogue = two_deployments(a, b, a_extra={"max_retries": 2})
    loop = asyncio.get_running_loop()
    async with catalogue_router(tmp_path / "c.yaml", catalogue) as stub:
        start = loop.time()
        result = await stream(stub, HELLO)
        elapsed = loop.time() - start
    assert result.error is None and result.text == "second try worked"
    assert (result.metadata.deployment, result.metadata.attempts) == ("primary", 2)
    assert 1.0 <= elapsed < 3.0  # waited exactly the retry-after, not a backoff of its own
    assert len(a.requests) == 2 and b.requests == []


async def test_a_retry_after_longer_than_allowed_fails_over_at_once(tmp_path, fakes):
    a, b = fakes
    a.enqueue({"status": 429, "retry_after": 30})
    b.enqueue({"text": "from b"})
    loop = asyncio.get_running_loop()
    async with catalogue_router(tmp_path / "c.yaml", two_deployments(a, b, a_extra={"max_retries": 3}),
                                max_retry_after_s=5) as stub:
        start = loop.time()
        result = await stream(stub, HELLO)
        assert loop.time() - start < 2
    assert result.metadata.deployment == "secondary" and len(a.requests) == 1


async def test_every_deployment_rate_limited_is_resource_exhausted_with_retry_info(tmp_path, fakes):
    a, b = fakes
    a.enqueue({"status": 429, "retry_after": 20})
    b.enqueue({"status": 429, "retry_after": 7})
    async with catalogue_router(tmp_path / "c.yaml", two_deployments(a, b), fallback_to_extractive=False) as stub:
        result = await stream(stub, HELLO)
    assert result.events == []
    assert result.error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    details = result.error.details()
    assert "every deployment of 'chat' failed before answering" in details
    assert "primary (openai): HTTP 429" in details and "secondary (openai): HTTP 429" in details
    assert "retry after 7 s" in details
    assert retry_delay_s(result.error) == pytest.approx(7.0)


async def test_retries_back_off_but_never_past_the_callers_deadline(tmp_path, fakes):
    a, b = fakes
    a.enqueue(*[{"status": 503, "error_message": "overloaded"}] * 20)
    catalogue = {"models": {"chat": {"deployments": [openai_deployment("primary", a, max_retries=10)]}}}
    loop = asyncio.get_running_loop()
    async with catalogue_router(tmp_path / "c.yaml", catalogue, fallback_to_extractive=False, retry_base_s=0.2,
                                retry_max_s=0.4) as stub:
        start = loop.time()
        result = await stream(stub, HELLO, timeout=1.5)
        elapsed = loop.time() - start
    assert result.error.code() == grpc.StatusCode.UNAVAILABLE  # the router's own status, before the deadline
    assert result.error.details() == "openai failed before answering: HTTP 503: overloaded"
    assert elapsed < 1.5
    assert 2 <= len(a.requests) <= 10  # retried (with jittered backoff), and stopped for the deadline


async def test_slow_first_token_times_out_and_fails_over(tmp_path, fakes):
    a, b = fakes
    a.enqueue({"text": "too late", "first_token_delay_s": 3})
    b.enqueue({"text": "on time"})
    loop = asyncio.get_running_loop()
    catalogue = two_deployments(a, b, a_extra={"first_token_timeout_s": 0.4})
    async with catalogue_router(tmp_path / "c.yaml", catalogue) as stub:
        start = loop.time()
        result = await stream(stub, HELLO)
        elapsed = loop.time() - start
    assert result.error is None and result.text == "on time"
    assert result.metadata.deployment == "secondary" and result.metadata.notice == ""
    assert elapsed < 2.0
    # The slow upstream request was abandoned (its connection closed), not left running.
    assert await asyncio.to_thread(a.wait_for_outcome, 0, 5.0) == "client_disconnected"


async def test_error_event_after_a_200_before_any_token_fails_over(tmp_path, fakes):
    a, b = fakes
    a.enqueue({"text": "never shown", "error_after": 0, "error_message": "The model is overloaded"})
    b.enqueue({"text": "fine"})
    async with catalogue_router(tmp_path / "c.yaml", two_deployments(a, b)) as stub:
        result = await stream(stub, HELLO)
    assert result.error is None and result.text == "fine" and result.metadata.deployment == "secondary"
    assert a.requests[0]["outcome"] == "error_event"


async def test_stream_cut_after_tokens_ends_with_status_and_priced_partial_usage(tmp_path, fakes):
    a, b = fakes
    a.enqueue({"text": "one two three four five six", "text_chunks": 6, "cut_after": 3})
    b.enqueue({"text": "must not be used"})
    catalogue = two_deployments(a, b, a_extra={"input_usd_per_mtok": 2.0, "output_usd_per_mtok": 8.0})
    async with catalogue_router(tmp_path / "c.yaml", catalogue) as stub:
        result = await stream(stub, HELLO)
    # After the first token there is no failover: the caller already has part of an answer.
    assert result.kinds() == ["metadata", "text_delta", "text_delta", "text_delta", "interrupted"]
    assert result.error.code() == grpc.StatusCode.UNAVAILABLE
    assert "stream was cut after 3 deltas" in result.error.details()
    (cut,) = result.of("interrupted")
    usage = cut.partial_usage
    assert (cut.sent_deltas, usage.output_tokens) == (3, 3)
    assert usage.input_tokens > 0 and cut.usage_estimated
    assert cut.cost_usd == pytest.approx((usage.input_tokens * 2.0 + usage.output_tokens * 8.0) / 1e6)
    assert b.requests == []
    assert dict(result.error.trailing_metadata())["agentmesh-sent-deltas"] == "3"


async def test_context_window_fallback_and_too_long_prompts(tmp_path, fakes):
    a, b = fakes
    b.enqueue({"text": "the long-context model answered"})
    catalogue = {"models": {
        "small": {"deployments": [openai_deployment("small-1", a, model="gpt-4o", context_window=120)],
                  "context_window_fallbacks": ["large"]},
        "large": {"deployments": [openai_deployment("large-1", b, model="gpt-4o", context_window=2000)]},
    }}
    long_text = "word " * 300  # ~300 tokens: fits only the large window
    async with catalogue_router(tmp_path / "c.yaml", catalogue) as stub:
        short = stub.CountTokens(llm_pb2.CountTokensRequest(model="small", messages=[user("hi")]), timeout=5)
        assert (await short).context_window_tokens == 120
        fitted = await stream(stub, llm_pb2.StreamGenerateRequest(
            model="small", messages=[user(long_text)], options=llm_pb2.GenerationOptions(max_tokens=100)))
        too_long = await stream(stub, llm_pb2.StreamGenerateRequest(
            model="small", messages=[user(long_text * 8)], options=llm_pb2.GenerationOptions(max_tokens=100)))
    assert fitted.error is None and fitted.metadata.deployment == "large-1"
    assert fitted.metadata.requested_model == "small"
    assert a.requests == []
    assert too_long.error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "does not fit the context window" in too_long.error.details()
    assert "small-1: 120" in too_long.error.details() and "large-1: 2000" in too_long.error.details()


async def test_pinned_deployment_and_request_fallback_list(tmp_path, fakes):
    a, b = fakes
    b.enqueue({"text": "pinned to b"})
    a.enqueue({"status": 500})
    b.enqueue({"text": "b via the request's fallback list"})
    catalogue = {"models": {"chat": {"deployments": [openai_deployment("primary", a)]},
                            "other": {"deployments": [openai_deployment("secondary", b)]}}}
    async with catalogue_router(tmp_path / "c.yaml", catalogue, fallback_to_extractive=False) as stub:
        pinned = await stream(stub, llm_pb2.StreamGenerateRequest(
            messages=[user("hi")], routing=llm_pb2.RoutingOptions(deployment="secondary")))
        via_list = await stream(stub, llm_pb2.StreamGenerateRequest(
            model="chat", messages=[user("hi")], routing=llm_pb2.RoutingOptions(fallback_models=["other"])))
        unknown = await stream(stub, llm_pb2.StreamGenerateRequest(
            messages=[user("hi")], routing=llm_pb2.RoutingOptions(deployment="nope")))
        bad_fallback = await stream(stub, llm_pb2.StreamGenerateRequest(
            messages=[user("hi")], routing=llm_pb2.RoutingOptions(fallback_models=["nope"])))
        unknown_model = await stream(stub, llm_pb2.StreamGenerateRequest(model="gpt-9", messages=[user("hi")]))
    assert pinned.text == "pinned to b" and pinned.metadata.deployment == "secondary"
    assert via_list.text == "b via the request's fallback list" and via_list.metadata.attempts == 2
    assert unknown.error.code() == grpc.StatusCode.NOT_FOUND and "deployments: primary, secondary" in unknown.error.details()
    assert bad_fallback.error.code() == grpc.StatusCode.NOT_FOUND and "'nope'" in bad_fallback.error.details()
    assert unknown_model.error.code() == grpc.StatusCode.NOT_FOUND
    assert "use one of: chat, other, extractive" in unknown_model.error.details()


async def test_every_deployment_down_falls_back_to_extractive_with_a_notice(tmp_path, fakes):
    a, b = fakes
    a.enqueue({"status": 500})
    b.enqueue({"status": 502})
    request = llm_pb2.StreamGenerateRequest(
        model="chat", messages=[user("How do I pretty-print JSON?")],
        context=[chunk(1, "json", "Use the indent parameter of json.dumps to pretty-print JSON.")])
    async with catalogue_router(tmp_path / "c.yaml", two_deployments(a, b)) as stub:
        result = await stream(stub, request)
    assert result.error is None
    assert (result.metadata.provider, result.metadata.deployment, result.metadata.attempts) == ("extractive", "extractive", 3)
    assert "Every deployment failed before answering (primary (openai): HTTP 500" in result.metadata.notice
    assert "secondary (openai): HTTP 502" in result.metadata.notice
    assert "indent parameter" in result.text


async def test_breaker_opens_skips_the_deployment_and_recovers(tmp_path, fakes):
    a, b = fakes
    breaker = {"window_s": 30, "min_requests": 2, "failure_rate": 0.5, "open_s": 1.0}
    catalogue = two_deployments(a, b, a_extra={"circuit_breaker": breaker})
    a.enqueue({"status": 500}, {"status": 500})
    b.enqueue(*[{"text": f"b answer {i}"} for i in range(3)])
    async with catalogue_router(tmp_path / "c.yaml", catalogue) as stub:
        for _ in range(2):
            result = await stream(stub, HELLO)
            assert result.metadata.deployment == "secondary"
        models = await stub.ListModels(llm_pb2.ListModelsRequest(), timeout=5)
        states = {d.name: d.circuit_state for d in models.models[0].deployments}
        assert states == {"primary": llm_pb2.CIRCUIT_STATE_OPEN, "secondary": llm_pb2.CIRCUIT_STATE_CLOSED}
        skipped = await stream(stub, HELLO)
        assert skipped.metadata.deployment == "secondary" and skipped.metadata.attempts == 1
        assert len(a.requests) == 2  # open: the primary was not called at all
        await asyncio.sleep(1.1)
        models = await stub.ListModels(llm_pb2.ListModelsRequest(), timeout=5)
        assert models.models[0].deployments[0].circuit_state == llm_pb2.CIRCUIT_STATE_HALF_OPEN
        a.enqueue({"text": "primary is back"})
        probe = await stream(stub, HELLO)
        assert probe.text == "primary is back" and probe.metadata.deployment == "primary"
        models = await stub.ListModels(llm_pb2.ListModelsRequest(), timeout=5)
        assert models.models[0].deployments[0].circuit_state == llm_pb2.CIRCUIT_STATE_CLOSED
        assert models.models[0].deployments[0].ttft_ewma_ms > 0


async def test_azure_deployment_uses_the_azure_route_and_key_header(tmp_path, fakes, monkeypatch):
    a, _ = fakes
    a.enqueue({"text": "hello from azure"})
    monkeypatch.setenv("AZURE_KEY", "sk-test")
    catalogue = {"models": {"chat": {"deployments": [{
        "name": "azure-east", "provider": "azure", "model": "my-gpt4o", "base_url": a.url,
        "api_key_env": "AZURE_KEY", "api_version": "2024-10-21"}]}}}
    async with catalogue_router(tmp_path / "c.yaml", catalogue) as stub:
        result = await stream(stub, HELLO)
    assert result.error is None and result.text == "hello from azure"
    assert result.metadata.provider == "azure" and result.metadata.model == "my-gpt4o"
    request = a.requests[0]
    assert request["path"] == "/openai/deployments/my-gpt4o/chat/completions?api-version=2024-10-21"
    assert request["headers"]["api-key"] == "sk-test" and "authorization" not in request["headers"]


# --- strategies and the breaker, without a server ------------------------------------------------


def _runtimes(*configs: dict) -> list[Runtime]:
    tokenizer = Tokenizers().for_model("extractive", "")
    return [Runtime(DeploymentConfig(provider="openai", **c), ExtractiveProvider(),
                    CircuitBreaker(CircuitBreakerConfig()), tokenizer) for c in configs]


def test_weighted_order_follows_the_weights():
    runtimes = _runtimes({"name": "heavy", "weight": 3}, {"name": "light", "weight": 1}, {"name": "never", "weight": 0})
    rng = random.Random(7)
    firsts = [order("weighted", runtimes, lambda r: 0.0, rng)[0].name for _ in range(4000)]
    assert firsts.count("never") == 0
    assert 0.72 < firsts.count("heavy") / 4000 < 0.78  # 3 / (3 + 1)
    assert order("weighted", runtimes, lambda r: 0.0, rng)[-1].name == "never"


def test_least_in_flight_latency_and_cost_orders():
    a, b, c = _runtimes({"name": "a", "input_usd_per_mtok": 5}, {"name": "b", "input_usd_per_mtok": 1},
                        {"name": "c", "input_usd_per_mtok": 3})
    a.in_flight, b.in_flight, c.in_flight = 4, 9, 0
    rng = random.Random(1)
    assert [r.name for r in order("least_in_flight", [a, b, c], lambda r: 0.0, rng)] == ["c", "a", "b"]
    a.observe_ttft(0.30)
    b.observe_ttft(0.10)
    b.observe_ttft(0.60)  # moving average: 0.10 + 0.2 * (0.60 - 0.10) = 0.20
    assert b.ttft_ewma_s == pytest.approx(0.20)
    assert [r.name for r in order("lowest_latency", [a, b, c], lambda r: 0.0, rng)] == ["c", "b", "a"]  # c unmeasured
    price = {"a": 5, "b": 1, "c": 3}
    assert [r.name for r in order("lowest_cost", [a, b, c], lambda r: price[r.name], rng)] == ["b", "c", "a"]
    assert [r.name for r in order("fallback", [a, b, c], lambda r: 0.0, rng)] == ["a", "b", "c"]


def test_circuit_breaker_states():
    now = [0.0]
    changes = []
    breaker = CircuitBreaker(CircuitBreakerConfig(window_s=10, min_requests=4, failure_rate=0.5, open_s=5),
                             on_change=changes.append, clock=lambda: now[0])
    for ok in (True, True, False):
        assert breaker.allow()
        breaker.record(ok)
    assert breaker.state is Circuit.CLOSED  # 1 of 3: below min_requests
    breaker.record(False)  # 2 of 4 failed = 50 %
    assert breaker.state is Circuit.OPEN and not breaker.allow()
    assert breaker.retry_in_s() == pytest.approx(5)
    now[0] = 5.0
    assert breaker.state is Circuit.HALF_OPEN
    assert breaker.allow() and not breaker.allow()  # one probe at a time
    breaker.record(False)
    assert breaker.state is Circuit.OPEN  # the probe failed: open again
    now[0] = 10.0
    assert breaker.allow()
    breaker.release()  # the probe was cancelled: no verdict, another probe may go
    assert breaker.allow()
    breaker.record(True)
    assert breaker.state is Circuit.CLOSED
    assert changes == [Circuit.OPEN, Circuit.HALF_OPEN, Circuit.OPEN, Circuit.HALF_OPEN, Circuit.CLOSED]
    now[0] = 100.0  # old outcomes leave the window
    for _ in range(3):
        breaker.record(True)
    breaker.record(False)
    assert breaker.state is Circuit.CLOSED  # 1 failure of 4 = 25 %


async def test_every_circuit_open_is_unavailable_with_retry_info(tmp_path, fakes):
    a, _ = fakes
    a.enqueue({"status": 500})
    breaker = {"window_s": 30, "min_requests": 1, "failure_rate": 1.0, "open_s": 5}
    catalogue = {"models": {"chat": {"deployments": [openai_deployment("primary", a, circuit_breaker=breaker)]}}}
    async with catalogue_router(tmp_path / "c.yaml", catalogue, fallback_to_extractive=False) as stub:
        failed = await stream(stub, HELLO)
        skipped = await stream(stub, HELLO)
    assert failed.error.code() == grpc.StatusCode.UNAVAILABLE and "HTTP 500" in failed.error.details()
    assert skipped.error.code() == grpc.StatusCode.UNAVAILABLE
    assert "no deployment of 'chat' can be called now (circuit open: primary)" in skipped.error.details()
    assert 4 < retry_delay_s(skipped.error) <= 5
    assert len(a.requests) == 1
