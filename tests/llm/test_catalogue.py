"""The model catalogue: validation with messages naming the field, and reload without restart."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from agentmesh.llm.v1 import llm_pb2
from agentmesh.services.llm.catalogue import CatalogueError, load, parse
from tests.llm.support import catalogue_router, openai_deployment, stream, user, write_catalogue

EXAMPLE = Path(__file__).resolve().parents[2] / "services" / "llm" / "models.example.yaml"
EXAMPLE_KEYS = ("OPENAI_API_KEY", "AZURE_OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GROQ_API_KEY")


def test_the_example_catalogue_is_valid(monkeypatch):
    for name in EXAMPLE_KEYS:
        monkeypatch.setenv(name, f"key-of-{name}")
    catalogue = load(EXAMPLE)
    assert catalogue.default_alias == "chat"
    assert [d.name for d in catalogue.models["chat"].deployments] == ["openai-gpt-4o-mini", "azure-gpt-4o-mini"]
    assert catalogue.models["chat"].deployments[1].api_key == "key-of-AZURE_OPENAI_API_KEY"
    assert catalogue.models["backup"].strategy == "weighted"
    assert catalogue.limits.for_tenant("acme").tpm == 2_000_000
    assert catalogue.limits.for_tenant("someone").rpm == 600  # default_tenant
    assert catalogue.limits.for_api_key("ci-pipeline").budget_period == "day"
    assert "key-of" not in catalogue.model_dump_json()  # keys are never serialized


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("models: {chat: {deployments: [{name: a, provider: openai, api_key: sk-123}]}}",
         "a catalogue never holds an API key"),
        ("models: {chat: {deployments: [{name: a, provider: openai, api_key_env: NOT_SET_ANYWHERE}]}}",
         "reads its API key from NOT_SET_ANYWHERE, which is not set"),
        ("models: {chat: {deployments: [{name: a, provider: gemini}]}}", "models.chat.deployments.0.provider"),
        ("models: {chat: {deployments: [{name: a, provider: openai}], fallbacks: [nope]}}",
         "models.chat.fallbacks names unknown alias 'nope'"),
        ("models: {a: {deployments: [{name: x, provider: openai}]}, b: {deployments: [{name: x, provider: openai}]}}",
         "deployment 'x' is defined in both 'a' and 'b'"),
        ("models: {chat: {deployments: [{name: a, provider: azure, model: m}]}}", "an azure deployment needs base_url"),
        ("models: {chat: {deployments: [{name: a, provider: openai, weight: -1}]}}", "weight"),
        ("models: {chat: {deployments: []}}", "models.chat.deployments"),
        ("models: {chat: {strategy: fastest, deployments: [{name: a, provider: openai}]}}", "strategy"),
        ("models: {extractive: {deployments: [{name: a, provider: openai}]}}", "reserved"),
        ("default_model: nope\nmodels: {chat: {deployments: [{name: a, provider: openai}]}}",
         "default_model 'nope' is not an alias"),
        ("limits: {tenants: {'bad tenant': {rpm: 1}}}", "is not a valid tenant id"),
        ("models: [1, 2]", "models"),
        ("models: {chat: {deployments: [{name: a, provider: openai, colour: blue}]}}", "colour"),
        ("models: {chat", "not valid YAML"),
    ],
)
def test_invalid_catalogues_name_the_problem(text, fragment):
    with pytest.raises(CatalogueError, match=None) as raised:
        parse(text, "catalogue.yaml")
    assert fragment in str(raised.value)
    assert str(raised.value).startswith("catalogue.yaml")


async def test_a_bad_catalogue_stops_the_start_with_its_message(tmp_path):
    from agentmesh.services.llm.service import LLMService, LLMSettings

    path = tmp_path / "bad.yaml"
    path.write_text("models: {chat: {deployments: [{name: a, provider: openai, api_key: sk-1}]}}")
    with pytest.raises(CatalogueError, match="never holds an API key"):
        await LLMService(LLMSettings(catalogue=str(path))).start()
    with pytest.raises(CatalogueError, match="cannot read the catalogue"):
        await LLMService(LLMSettings(catalogue=str(tmp_path / "missing.yaml"))).start()


async def test_the_catalogue_reloads_without_restart_and_a_bad_edit_keeps_the_old_one(tmp_path, openai_fake):
    path = tmp_path / "catalogue.yaml"
    openai_fake.enqueue({"text": "from one"}, {"text": "from two"}, {"text": "still two"})
    first = {"models": {"one": {"deployments": [openai_deployment("d1", openai_fake)]}}}
    errors_before = REGISTRY.get_sample_value("agentmesh_llm_catalogue_reloads_total", {"result": "error"}) or 0

    async def aliases(stub) -> list[str]:
        return [m.name for m in (await stub.ListModels(llm_pb2.ListModelsRequest(), timeout=5)).models]

    async def wait_for(stub, expected: list[str]) -> None:
        for _ in range(100):
            if await aliases(stub) == expected:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"aliases stayed {await aliases(stub)}, expected {expected}")

    async with catalogue_router(path, first, catalogue_reload_s=0.1) as stub:
        assert (await stream(stub, llm_pb2.StreamGenerateRequest(messages=[user("hi")]))).text == "from one"
        write_catalogue(path, {"default_model": "two", "models": {
            "one": {"deployments": [openai_deployment("d1", openai_fake)]},
            "two": {"deployments": [openai_deployment("d2", openai_fake, weight=5)]}}})
        await wait_for(stub, ["one", "two", "extractive"])
        result = await stream(stub, llm_pb2.StreamGenerateRequest(messages=[user("hi")]))
        assert (result.text, result.metadata.deployment) == ("from two", "d2")
        path.write_text("models: {two: {deployments: [{name: d2, provider: openai, api_key: leaked}]}}")
        for _ in range(100):
            errors = REGISTRY.get_sample_value("agentmesh_llm_catalogue_reloads_total", {"result": "error"}) or 0
            if errors > errors_before:
                break
            await asyncio.sleep(0.05)
        assert errors == errors_before + 1
        assert await aliases(stub) == ["one", "two", "extractive"]  # the previous catalogue stays in use
        still = await stream(stub, llm_pb2.StreamGenerateRequest(messages=[user("hi")]))
        assert still.text == "still two"
    assert [b["model"] for b in openai_fake.bodies] == ["d1-model", "d2-model", "d2-model"]


async def test_list_models_describes_aliases_deployments_and_strategies(tmp_path, openai_fake, redis_settings):
    catalogue = {"models": {"chat": {"strategy": "lowest_latency", "fallbacks": ["cheap"], "deployments": [
        openai_deployment("d1", openai_fake, model="gpt-4o", rpm=10, tpm=1000, input_usd_per_mtok=2.5,
                          output_usd_per_mtok=10, context_window=128000, first_token_timeout_s=3, total_timeout_s=60)]},
        "cheap": {"deployments": [openai_deployment("d2", openai_fake)]}}}
    async with catalogue_router(tmp_path / "c.yaml", catalogue, **redis_settings) as stub:
        models = (await stub.ListModels(llm_pb2.ListModelsRequest(), timeout=5)).models
    chat, cheap, extractive = models
    assert (chat.name, chat.provider, chat.is_llm, chat.is_default) == ("chat", "openai", True, True)
    assert chat.strategy == llm_pb2.ROUTING_STRATEGY_LOWEST_LATENCY and list(chat.fallback_models) == ["cheap"]
    (d1,) = chat.deployments
    assert (d1.name, d1.upstream_model, d1.base_url) == ("d1", "gpt-4o", openai_fake.base_url)
    assert (d1.rpm_limit, d1.tpm_limit, d1.context_window_tokens) == (10, 1000, 128000)
    assert (d1.input_usd_per_million_tokens, d1.output_usd_per_million_tokens) == (2.5, 10)
    assert (d1.first_token_timeout_ms, d1.total_timeout_ms) == (3000, 60000)
    assert d1.circuit_state == llm_pb2.CIRCUIT_STATE_CLOSED and d1.in_flight == 0 and d1.ttft_ewma_ms == 0
    assert not cheap.is_default and (extractive.name, extractive.is_llm) == ("extractive", False)
