"""Every public RPC of every AgentMesh service, read from the generated descriptors.

The list is not written down anywhere in the tests: it is every method of every service of every
``agentmesh.<domain>.v<N>`` contract module in gen/python, so an RPC added to a proto is fuzzed
as soon as the code is regenerated.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from pathlib import Path

import agentmesh
from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor as d

from agentmesh.services.runtime.settings import SERVICE_NAMES

KIND_OF_SERVICE = {name: kind for kind, name in SERVICE_NAMES.items()}


@dataclass(frozen=True)
class Rpc:
    """One method of one service."""

    method: d.MethodDescriptor

    @property
    def service(self) -> str:
        return self.method.containing_service.full_name

    @property
    def path(self) -> str:
        """The gRPC method path, ``/package.Service/Method``."""
        return f"/{self.service}/{self.method.name}"

    @property
    def full_name(self) -> str:
        return self.method.full_name

    @property
    def kind(self) -> str | None:
        """The mesh service kind serving it (None for a service no process serves yet)."""
        return self.kind_of(self.service)

    @staticmethod
    def kind_of(service: str) -> str | None:
        return KIND_OF_SERVICE.get(service)

    @property
    def request(self) -> d.Descriptor:
        return self.method.input_type

    @property
    def response(self) -> d.Descriptor:
        return self.method.output_type

    @property
    def client_streaming(self) -> bool:
        return self.method.client_streaming

    @property
    def server_streaming(self) -> bool:
        return self.method.server_streaming

    @property
    def http(self) -> http_pb2.HttpRule | None:
        """The ``google.api.http`` rule of the method, when it is exposed as JSON over HTTP."""
        options = self.method.GetOptions()
        if not options.HasExtension(annotations_pb2.http):
            return None
        return options.Extensions[annotations_pb2.http]

    def __str__(self) -> str:
        return f"{self.method.containing_service.name}.{self.method.name}"


def contract_modules() -> list:
    """Every generated ``*_pb2`` module of an ``agentmesh.<domain>.v<N>`` package."""
    modules = []
    for root in agentmesh.__path__:
        for path in sorted(Path(root).glob("*/v*/*_pb2.py")):
            domain, version = path.parent.parent.name, path.parent.name
            if re.fullmatch(r"v\d+", version):
                modules.append(importlib.import_module(f"agentmesh.{domain}.{version}.{path.stem}"))
    return modules


def all_rpcs() -> list[Rpc]:
    """Every method of every service the contracts declare, sorted by name."""
    rpcs = []
    for module in contract_modules():
        for service in module.DESCRIPTOR.services_by_name.values():
            rpcs.extend(Rpc(method) for method in service.methods)
    return sorted(rpcs, key=lambda r: r.full_name)


@dataclass(frozen=True)
class HttpRoute:
    """A JSON-over-HTTP route of an RPC (one ``google.api.http`` binding)."""

    rpc: Rpc
    verb: str
    template: str
    body: str

    @property
    def variables(self) -> list[str]:
        return re.findall(r"\{([^}=]+)(?:=[^}]*)?\}", self.template)

    def __str__(self) -> str:
        return f"{self.verb.upper()} {self.template}"


def http_routes(rpcs: list[Rpc]) -> list[HttpRoute]:
    """Every HTTP binding (``additional_bindings`` included) of ``rpcs``."""
    routes = []
    for rpc in rpcs:
        rule = rpc.http
        if rule is None:
            continue
        for binding in [rule, *rule.additional_bindings]:
            verb = binding.WhichOneof("pattern")
            if verb is None:
                continue
            template = binding.custom.path if verb == "custom" else getattr(binding, verb)
            routes.append(HttpRoute(rpc, binding.custom.kind if verb == "custom" else verb, template, binding.body))
    return routes
