"""Circuit breakers shared through a real Redis: two breaker objects on two connections stand for
two router replicas (the two-process version is in test_replicas.py)."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from agentmesh.services.cli.processes import free_port
from agentmesh.services.llm.breakers import BreakerStore, SharedCircuitBreaker
from agentmesh.services.llm.catalogue import CircuitBreakerConfig
from agentmesh.services.llm.routing import Circuit

pytestmark = pytest.mark.timeout(60)

RULES = CircuitBreakerConfig(window_s=30, min_requests=2, failure_rate=0.5, open_s=1.0)


class Replica:
    """One replica's breaker of deployment ``d`` on its own Redis connection."""

    def __init__(self, url: str, prefix: str, sync_s: float = 0.05):
        self.client = aioredis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2)
        self.tasks: list[asyncio.Task] = []
        self.changes: list[Circuit] = []
        self.breaker = SharedCircuitBreaker("d", RULES, BreakerStore(self.client, prefix), sync_s=sync_s,
                                            spawn=self._spawn, on_change=self.changes.append)

    def _spawn(self, coroutine) -> None:
        self.tasks.append(asyncio.ensure_future(coroutine))

    async def settle(self) -> None:
        """Wait for the background refreshes and releases started so far."""
        await asyncio.gather(*self.tasks)
        self.tasks.clear()

    async def close(self) -> None:
        await self.settle()
        await self.client.aclose()


@pytest.fixture
async def replicas(redis_settings):
    pair = [Replica(redis_settings["redis_url"], redis_settings["redis_prefix"]) for _ in range(2)]
    yield pair
    for replica in pair:
        await replica.close()


async def test_one_replicas_failures_open_the_circuit_for_the_other(replicas):
    one, two = replicas[0].breaker, replicas[1].breaker
    # Successes are counted locally and travel with the next write: ten successes, then two
    # failures, are 2 of 12 (below 50 %) — the circuit stays closed.
    for _ in range(10):
        permit = await one.acquire()
        assert permit is True
        await one.report(permit, True)
    for _ in range(2):
        await one.report(await one.acquire(), False)
    assert one.state is Circuit.CLOSED
    # Seven more failures: 9 of 19, still closed; the eighth makes 10 of 20 = 50 % → open, for both.
    for _ in range(7):
        await one.report(True, False)
    assert one.state is Circuit.CLOSED
    await one.report(True, False)
    assert one.state is Circuit.OPEN
    assert await two.acquire() is False  # two never used the deployment: it reads the state first
    assert two.state is Circuit.OPEN and 0 < two.retry_in_s() <= RULES.open_s
    await replicas[1].settle()
    # After open_s exactly one replica gets the probe; the other keeps skipping the deployment.
    await asyncio.sleep(RULES.open_s + 0.05)
    assert two.state is Circuit.HALF_OPEN
    probe = await two.acquire()
    assert isinstance(probe, str)
    assert await one.acquire() is False and await two.acquire() is False  # one probe at a time, everywhere
    # A probe given back (cancelled call) lets the next probe go; its failure re-opens for both.
    two.release(probe)
    await replicas[1].settle()
    probe = await one.acquire()
    assert isinstance(probe, str)
    await one.report(probe, False)
    assert one.state is Circuit.OPEN
    await asyncio.sleep(0.06)  # two's view is older than its sync interval: refreshed in the background
    assert await two.acquire() is False
    await replicas[1].settle()
    assert two.state is Circuit.OPEN
    # A successful probe closes it for both.
    await asyncio.sleep(RULES.open_s + 0.05)
    probe = await one.acquire()
    await one.report(probe, True)
    assert one.state is Circuit.CLOSED
    assert await two.acquire() is True  # two's view said "due for a probe": Redis says closed
    assert replicas[0].changes == [Circuit.OPEN, Circuit.HALF_OPEN, Circuit.OPEN, Circuit.HALF_OPEN, Circuit.CLOSED]


async def test_a_probe_whose_replica_vanished_is_taken_over_after_its_lease(replicas):
    one, two = replicas[0].breaker, replicas[1].breaker
    for _ in range(2):
        await one.report(True, False)
    await asyncio.sleep(RULES.open_s + 0.05)
    # The lease is long enough that a stalled CI machine cannot let it run out before `two` asks.
    lease_s = 2.0
    leased_at = asyncio.get_running_loop().time()
    probe = await one.acquire(lease_s=lease_s)  # replica one then "dies": no verdict, no release
    assert isinstance(probe, str)
    assert await two.acquire() is False
    await asyncio.sleep(leased_at + lease_s + 0.05 - asyncio.get_running_loop().time())
    assert isinstance(await two.acquire(), str)


async def test_without_redis_each_replica_decides_alone(redis_settings):
    dead = Replica(f"redis://127.0.0.1:{free_port()}/0", redis_settings["redis_prefix"])
    breaker = dead.breaker
    permit = await breaker.acquire()  # Redis refuses the connection: the local breaker decides
    assert permit is True
    await breaker.report(permit, False)
    await breaker.report(await breaker.acquire(), False)
    assert breaker.state is Circuit.OPEN and await breaker.acquire() is False
    assert dead.changes == [Circuit.OPEN]
    await dead.close()
