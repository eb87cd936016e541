"""Two router processes sharing one Redis never admit more tokens per minute than the limit."""

from __future__ import annotations

import asyncio
import sys
import time

import grpc
import pytest
import redis.asyncio as aioredis
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from agentmesh.llm.v1 import llm_pb2, llm_pb2_grpc
from agentmesh.services.cli.processes import free_port, spawn
from agentmesh.services.runtime.clients import check_health
from tests.fakes.streaming_server import FastOpenAIServer
from tests.llm.support import user, write_catalogue

pytestmark = pytest.mark.timeout(180)

TPM = 3000
MAX_TOKENS = 60
COMPLETION_TOKENS = 20  # the fake streams 20 one-word chunks and reports them as the completion
LOAD_S = 4.0
WORKERS_PER_REPLICA = 16


async def _wait_serving(address: str, proc, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    async with grpc.aio.insecure_channel(address) as channel:
        while not await check_health(channel):
            assert proc.alive(), f"router exited at start:\n{proc.log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"router not SERVING:\n{proc.log_path.read_text()[-3000:]}"
            await asyncio.sleep(0.1)


async def _worker(stub: llm_pb2_grpc.LLMServiceStub, until: float, results: list) -> None:
    request = llm_pb2.StreamGenerateRequest(model="chat", messages=[user("Count to twenty please.")],
                                            options=llm_pb2.GenerationOptions(max_tokens=MAX_TOKENS))
    metadata = (("x-tenant-id", "shared"),)
    while time.monotonic() < until:
        finish = None
        try:
            async for event in stub.StreamGenerate(request, metadata=metadata, timeout=20):
                if event.HasField("finish"):
                    finish = event.finish
            results.append(("ok", finish.usage.total_tokens))
        except grpc.aio.AioRpcError as err:
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
            status = rpc_status.from_call(err)
            retry = error_details_pb2.RetryInfo()
            assert status is not None and any(d.Unpack(retry) for d in status.details if d.Is(retry.DESCRIPTOR))
            results.append(("refused", retry.retry_delay.ToMilliseconds()))
            await asyncio.sleep(0.05)


async def test_two_router_processes_share_one_tpm_limit(tmp_path, redis_settings):
    fake = await FastOpenAIServer(tokens=COMPLETION_TOKENS, first_token_ms=40, token_ms=2).start()
    catalogue = write_catalogue(tmp_path / "catalogue.yaml", {
        "models": {"chat": {"deployments": [{"name": "fast", "provider": "openai", "model": "gpt-4o",
                                             "base_url": fake.base_url}]}},
        "limits": {"default_tenant": {"tpm": TPM}},
    })
    procs, addresses = [], []
    try:
        for i in range(2):
            port = free_port()
            env = {"AGENTMESH_LLM_PORT": str(port), "AGENTMESH_LLM_CATALOGUE": catalogue,
                   "AGENTMESH_LLM_REDIS_URL": redis_settings["redis_url"],
                   "AGENTMESH_LLM_REDIS_PREFIX": redis_settings["redis_prefix"],
                   "AGENTMESH_LLM_FALLBACK_TO_EXTRACTIVE": "false", "AGENTMESH_LLM_LOG_LEVEL": "WARNING",
                   "HF_HUB_OFFLINE": "1"}
            procs.append(spawn(f"router-{i}", [sys.executable, "-m", "agentmesh.services.cli.main", "serve", "llm"],
                               tmp_path / "logs", env))
            addresses.append(f"127.0.0.1:{port}")
        for proc, address in zip(procs, addresses, strict=True):
            await _wait_serving(address, proc)

        results: list[list] = [[], []]
        channels = [grpc.aio.insecure_channel(a) for a in addresses]
        until = time.monotonic() + LOAD_S
        await asyncio.gather(*(
            _worker(llm_pb2_grpc.LLMServiceStub(channels[r]), until, results[r])
            for r in range(2) for _ in range(WORKERS_PER_REPLICA)
        ))
        for channel in channels:
            await channel.close()
    finally:
        for proc in procs:
            proc.stop()
        await fake.stop()

    admitted = [[n for kind, n in replica if kind == "ok"] for replica in results]
    refused = [[n for kind, n in replica if kind == "refused"] for replica in results]
    used = sum(map(sum, admitted))
    per_call = admitted[0][0]
    # Both replicas served and both refused: the load really was split across them.
    assert all(admitted) and all(refused), (list(map(len, admitted)), list(map(len, refused)))
    # The offered load was far above the limit (what each replica alone would have let through).
    assert (len(admitted[0]) + len(refused[0]) + len(admitted[1]) + len(refused[1])) * per_call > 2 * TPM
    # The limit held across the two processes...
    assert used <= TPM, f"admitted {used} tokens in one window, limit {TPM}"
    # ...and was used up, not refused wholesale: at most one reservation (prompt + max_tokens) short.
    assert used >= TPM - 2 * (MAX_TOKENS + 20), used
    # Retry delays point at the moment the oldest reservations leave the one-minute window.
    assert all(0 < ms <= 60_000 for r in refused for ms in r)
    # Every admitted call was reconciled in Redis to the usage its provider reported.
    client = aioredis.Redis.from_url(redis_settings["redis_url"])
    window = int(await client.get(f"{redis_settings['redis_prefix']}:{{adm}}:t:shared:tpm:sum"))
    await client.aclose()
    assert window == used
