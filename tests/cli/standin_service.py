"""A stand-in for one AgentMesh service process, run by the runner tests as
``python -m tests.cli.standin_service <kind>``.

It is a real server of the shared runtime (health, reflection, interceptors, graceful SIGTERM) on
the port the runner gives it (``AGENTMESH_<KIND>_PORT``), SERVING as soon as it starts, and it
records the environment it was started with in ``$AGENTMESH_STANDIN_DIR/<kind>.json`` so a test
can check what the runner passed. It lets the runner be tested without loading models.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

from agentmesh.services.runtime.server import Service, serve
from agentmesh.services.runtime.settings import ServiceSettings

RECORDED_PREFIXES = ("AGENTMESH_", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "PYTHONUNBUFFERED")


class StandIn(Service):
    def __init__(self, kind: str):
        self.kind = kind
        prefix = f"AGENTMESH_{kind.upper()}_"
        super().__init__(
            ServiceSettings(
                host=os.environ[prefix + "HOST"], port=int(os.environ[prefix + "PORT"]),
                readiness_interval_s=0.2, grace_period_s=2.0,
            )
        )

    def register(self, server) -> None:  # health and reflection only
        pass


def main() -> None:
    kind = sys.argv[1]
    folder = Path(os.environ["AGENTMESH_STANDIN_DIR"])
    env = {k: v for k, v in os.environ.items() if k.startswith(RECORDED_PREFIXES)}
    (folder / f"{kind}.json").write_text(json.dumps(env))
    asyncio.run(serve(StandIn(kind)))


if __name__ == "__main__":
    main()
