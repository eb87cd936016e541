"""The opt-in exact-match response cache in a real Redis: a hit replays the stream as a stream."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from agentmesh.common.v1 import common_pb2
from agentmesh.llm.v1 import llm_pb2
from tests.llm.support import CALCULATOR, catalogue_router, openai_deployment, stream, user


def cached(text: str, **routing: object) -> llm_pb2.StreamGenerateRequest:
    return llm_pb2.StreamGenerateRequest(
        model="chat", messages=[user(text)], tools=[CALCULATOR],
        options=llm_pb2.GenerationOptions(max_tokens=200, temperature=0.0),
        routing=llm_pb2.RoutingOptions(cache=True, **routing))


async def test_a_hit_replays_the_same_events_without_calling_the_provider(tmp_path, openai_fake, redis_settings):
    turn = {"text": "Let me compute.", "text_chunks": 3, "usage": {"input_tokens": 40, "output_tokens": 12},
            "tool_calls": [{"id": "call_1", "name": "calculator", "arguments": {"expression": "6*7"}, "fragments": 3}]}
    openai_fake.enqueue(dict(turn), dict(turn), dict(turn))
    catalogue = {"models": {"chat": {"deployments": [
        openai_deployment("primary", openai_fake, input_usd_per_mtok=1.0, output_usd_per_mtok=2.0)]}}}
    async with catalogue_router(tmp_path / "c.yaml", catalogue, **redis_settings) as stub:
        first = await stream(stub, cached("What is 6*7?"))
        second = await stream(stub, cached("What is 6*7?"))
        other_tenant = [e async for e in stub.StreamGenerate(cached("What is 6*7?"), metadata=(("x-tenant-id", "b"),),
                                                            timeout=10)]
        not_opted_in = await stream(stub, llm_pb2.StreamGenerateRequest(
            model="chat", messages=[user("What is 6*7?")], tools=[CALCULATOR],
            options=llm_pb2.GenerationOptions(max_tokens=200, temperature=0.0)))
    assert first.error is None and second.error is None
    assert not first.metadata.cached and first.metadata.attempts == 1
    assert second.metadata.cached and second.metadata.attempts == 0 and second.metadata.deployment == "primary"
    # The same events, the same boundaries, in the same order — replayed as a stream.
    assert second.events[1:-1] == first.events[1:-1]
    assert second.kinds() == first.kinds() == ["metadata"] + ["text_delta"] * 3 + ["tool_call_delta"] * 4 + [
        "usage", "finish"]
    assert first.of("finish")[0].cost_usd == pytest.approx((40 * 1.0 + 12 * 2.0) / 1e6)
    assert second.of("finish")[0].cost_usd == 0.0 and second.of("finish")[0].usage == first.of("finish")[0].usage
    assert not other_tenant[0].metadata.cached  # tenants never share entries
    assert len(openai_fake.requests) == 3  # first, other tenant, not opted in: the hit called nothing
    assert not_opted_in.metadata.cached is False


async def test_entries_expire_and_failed_or_extractive_answers_are_not_stored(tmp_path, openai_fake, redis_settings):
    openai_fake.enqueue({"text": "first"}, {"text": "after expiry"}, {"status": 500}, {"text": "stored now"},
                        {"text": "a b c d", "text_chunks": 4, "cut_after": 2}, {"text": "complete"})
    catalogue = {"models": {"chat": {"deployments": [openai_deployment("primary", openai_fake)]}}}
    async with catalogue_router(tmp_path / "c.yaml", catalogue, **redis_settings) as stub:
        assert (await stream(stub, cached("ttl", cache_ttl_s=1))).text == "first"
        await asyncio.sleep(1.2)
        again = await stream(stub, cached("ttl"))
        assert again.text == "after expiry" and not again.metadata.cached
        fell_back = await stream(stub, cached("fallback"))
        assert fell_back.metadata.provider == "extractive"
        llm = await stream(stub, cached("fallback"))
        assert llm.text == "stored now" and not llm.metadata.cached  # the extractive answer was not cached
        cut = await stream(stub, cached("cut"))
        assert cut.error.code() == grpc.StatusCode.UNAVAILABLE
        complete = await stream(stub, cached("cut"))
        assert complete.text == "complete" and not complete.metadata.cached  # the cut stream was not cached
        assert (await stream(stub, cached("cut"))).metadata.cached


async def test_cache_without_redis_is_a_failed_precondition(openai_fake):
    from tests.llm.support import router

    async with router(provider="openai", openai_base_url=openai_fake.base_url, openai_api_key="sk-test") as stub:
        result = await stream(stub, llm_pb2.StreamGenerateRequest(
            messages=[user("hi")], routing=llm_pb2.RoutingOptions(cache=True)))
    assert result.error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "AGENTMESH_LLM_REDIS_URL" in result.error.details()
    assert openai_fake.requests == []


def test_cache_key_normalizes_struct_order_and_separates_requests():
    from google.protobuf import struct_pb2

    from agentmesh.services.llm.cache import cache_key
    from agentmesh.services.llm.providers.base import GenerationRequest

    def gen(args: dict, temperature: float | None = 0.2, tenant_messages: str = "q") -> GenerationRequest:
        s = struct_pb2.Struct()
        s.update(args)
        messages = [user(tenant_messages), common_pb2.Message(role=common_pb2.ROLE_ASSISTANT, tool_calls=[
            common_pb2.ToolCall(id="c1", name="calculator", arguments=s)])]
        return GenerationRequest(model="", messages=messages, tools=[], context=[], max_tokens=10,
                                 temperature=temperature, timeout_s=5)

    a = cache_key("p", "t", "chat", gen({"x": 1, "y": "z"}))
    assert a == cache_key("p", "t", "chat", gen({"y": "z", "x": 1}))
    assert a != cache_key("p", "t2", "chat", gen({"x": 1, "y": "z"}))
    assert a != cache_key("p", "t", "other", gen({"x": 1, "y": "z"}))
    assert a != cache_key("p", "t", "chat", gen({"x": 1, "y": "z"}, temperature=0.3))
    assert a != cache_key("p", "t", "chat", gen({"x": 1, "y": "z"}, tenant_messages="q2"))


async def test_a_hit_counts_against_rpm_but_not_tpm_nor_the_deployment(tmp_path, openai_fake, redis_settings):
    import redis.asyncio as aioredis

    openai_fake.enqueue({"text": "cached answer", "usage": {"input_tokens": 40, "output_tokens": 12}})
    catalogue = {"models": {"chat": {"deployments": [openai_deployment("primary", openai_fake, rpm=1, tpm=5000)]}},
                 "limits": {"tenants": {"acme": {"rpm": 3, "tpm": 1000}}}}
    acme = (("x-tenant-id", "acme"),)
    async with catalogue_router(tmp_path / "c.yaml", catalogue, **redis_settings) as stub:
        answers = [[e async for e in stub.StreamGenerate(cached("Cache me."), metadata=acme, timeout=10)]
                   for _ in range(3)]
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            [e async for e in stub.StreamGenerate(cached("Cache me."), metadata=acme, timeout=10)]
    assert [a[0].metadata.cached for a in answers] == [False, True, True]
    # The two hits were requests (the tenant's 3 per minute are used up) ...
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "tenant 'acme' reached its limit of 3 requests per minute" in refused.value.details()
    # ... but used no upstream tokens and did not touch the deployment's own RPM (1) or TPM.
    client = aioredis.Redis.from_url(redis_settings["redis_url"])
    prefix = f"{redis_settings['redis_prefix']}:{{adm}}"
    tenant_tpm = int(await client.get(f"{prefix}:t:acme:tpm:sum"))
    deployment_rpm = await client.zcard(f"{prefix}:d:primary:rpm")
    deployment_tpm = int(await client.get(f"{prefix}:d:primary:tpm:sum"))
    await client.aclose()
    assert tenant_tpm == deployment_tpm == 52 and deployment_rpm == 1
    assert len(openai_fake.requests) == 1
