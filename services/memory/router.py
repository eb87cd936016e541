"""The memory service's client of the LLM router (``agentmesh.llm.v1.LLMService``).

Compaction and fact extraction call the router's ``Generate`` like any other service would: with
the caller's request id and tenant (``outgoing_metadata()``) and a deadline derived from the
caller's (``downstream_timeout``); background work runs with no caller deadline, so it gets
``timeout_s``. The router's model aliases (``ListModels``) are cached for ``capability_ttl_s``
seconds: whether it fronts a language model (the default model's ``is_llm``) and how each alias
counts tokens (tokenizers.py) are read from them.
"""

from __future__ import annotations

import time

import grpc

from agentmesh.llm.v1 import llm_pb2
from agentmesh.services.runtime.clients import Downstream
from agentmesh.services.runtime.context import downstream_timeout, outgoing_metadata
from agentmesh.services.runtime.errors import from_downstream

#: Model name that makes the router answer with its extractive provider.
EXTRACTIVE_MODEL = "extractive"


class RouterClient:
    """``Generate`` and the capability check against the router at ``downstream.llm``."""

    def __init__(self, downstream: Downstream, *, timeout_s: float = 60.0, capability_ttl_s: float = 30.0):
        self.downstream = downstream
        self.timeout_s = timeout_s
        self.capability_ttl_s = capability_ttl_s
        self._models: llm_pb2.ListModelsResponse | None = None
        self._checked_at = 0.0

    async def models(self, timeout_s: float = 5.0) -> llm_pb2.ListModelsResponse:
        """The router's model aliases and their deployments (``ListModels``), asked again once
        ``capability_ttl_s`` passed; the call waits at most ``timeout_s`` seconds. Raises the
        router's status (UNAVAILABLE when it cannot be reached)."""
        now = time.monotonic()
        if self._models is None or now - self._checked_at > self.capability_ttl_s:
            try:
                reply = await self.downstream.llm.ListModels(
                    llm_pb2.ListModelsRequest(),
                    metadata=outgoing_metadata(),
                    timeout=downstream_timeout(min(self.timeout_s, timeout_s)),
                )
            except grpc.aio.AioRpcError as err:
                raise from_downstream("llm", err) from err
            self._models, self._checked_at = reply, now
        return self._models

    async def is_llm(self) -> bool:
        """True when the router's default model is a language model. Raises the router's
        status (UNAVAILABLE when it cannot be reached)."""
        return any(m.is_default and m.is_llm for m in (await self.models()).models)

    async def generate(self, request: llm_pb2.GenerateRequest) -> llm_pb2.GenerateResponse:
        """One ``Generate``; raises the router's status as :func:`from_downstream` maps it."""
        try:
            return await self.downstream.llm.Generate(
                request, metadata=outgoing_metadata(), timeout=downstream_timeout(self.timeout_s, reserve_s=0.05)
            )
        except grpc.aio.AioRpcError as err:
            raise from_downstream("llm", err) from err
