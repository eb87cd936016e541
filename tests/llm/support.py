"""Helpers for the LLM router tests: a real router served in-process, its stub, stream collection."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
from google.protobuf import struct_pb2

from agentmesh.common.v1 import common_pb2
from agentmesh.llm.v1 import llm_pb2, llm_pb2_grpc
from agentmesh.services.llm.service import LLMService, LLMSettings
from tests.support import running_service

USER, ASSISTANT, SYSTEM, TOOL = (
    common_pb2.ROLE_USER,
    common_pb2.ROLE_ASSISTANT,
    common_pb2.ROLE_SYSTEM,
    common_pb2.ROLE_TOOL,
)

CALCULATOR = common_pb2.ToolDefinition(
    name="calculator",
    description="Evaluate an arithmetic expression.",
    parameters_schema=struct_pb2.Struct(),
)
CALCULATOR.parameters_schema.update(
    {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}
)


@contextlib.asynccontextmanager
async def router(**settings: object) -> AsyncIterator[llm_pb2_grpc.LLMServiceStub]:
    """A real LLMService (settings given explicitly) on a free port, and a stub to it."""
    service = LLMService(LLMSettings(readiness_interval_s=0.2, **settings))
    async with running_service(service) as address:
        async with grpc.aio.insecure_channel(address) as channel:
            yield llm_pb2_grpc.LLMServiceStub(channel)


def user(text: str) -> common_pb2.Message:
    return common_pb2.Message(role=USER, content=text)


def chunk(n: int, title: str, text: str) -> common_pb2.Chunk:
    return common_pb2.Chunk(
        chunk_id=f"doc{n}#0", document_id=f"doc{n}", title=title, source=f"python://stdlib/{title}", text=text
    )


@dataclass
class Streamed:
    """Everything a StreamGenerate call produced."""

    events: list[llm_pb2.StreamGenerateResponse] = field(default_factory=list)
    error: grpc.aio.AioRpcError | None = None

    def kinds(self) -> list[str]:
        return [e.WhichOneof("event") for e in self.events]

    def of(self, kind: str) -> list:
        return [getattr(e, kind) for e in self.events if e.WhichOneof("event") == kind]

    @property
    def text(self) -> str:
        return "".join(d.text for d in self.of("text_delta"))

    @property
    def metadata(self) -> llm_pb2.ResponseMetadata:
        return self.events[0].metadata

    def tool_arguments(self, index: int = 0) -> dict:
        return json.loads("".join(d.arguments_delta for d in self.of("tool_call_delta") if d.index == index))


async def stream(
    stub: llm_pb2_grpc.LLMServiceStub, request: llm_pb2.StreamGenerateRequest, timeout: float = 20.0
) -> Streamed:
    """Read a whole StreamGenerate call, keeping the events received before any error status."""
    result = Streamed()
    call = stub.StreamGenerate(request, timeout=timeout)
    try:
        async for event in call:
            result.events.append(event)
    except grpc.aio.AioRpcError as err:
        result.error = err
    return result


def openai_deployment(name: str, fake, **extra: object) -> dict:
    """A catalogue deployment entry for a fake chat-completions server (key from FAKE_OPENAI_KEY)."""
    return {"name": name, "provider": "openai", "model": f"{name}-model", "base_url": fake.base_url,
            "api_key_env": "FAKE_OPENAI_KEY", **extra}


def anthropic_deployment(name: str, fake, **extra: object) -> dict:
    return {"name": name, "provider": "anthropic", "model": f"{name}-model", "base_url": fake.base_url,
            "api_key_env": "FAKE_ANTHROPIC_KEY", **extra}


def write_catalogue(path, catalogue: dict) -> str:
    """Write ``catalogue`` as YAML to ``path``; returns the path as a string."""
    import yaml

    path.write_text(yaml.safe_dump(catalogue, sort_keys=False))
    return str(path)


@contextlib.asynccontextmanager
async def catalogue_router(path, catalogue: dict, **settings: object) -> AsyncIterator[llm_pb2_grpc.LLMServiceStub]:
    """A real router serving ``catalogue`` (written to ``path``), with the fakes' keys in its environment."""
    import os

    os.environ.setdefault("FAKE_OPENAI_KEY", "sk-test")
    os.environ.setdefault("FAKE_ANTHROPIC_KEY", "sk-ant-test")
    async with router(catalogue=write_catalogue(path, catalogue), **settings) as stub:
        yield stub
