"""The generated API reference (gen/docs) documents every service, RPC, message, field, enum and
value of every AgentMesh package, with their comments, streaming kinds and HTTP bindings, and is
up to date with protos/. What must be there is computed from the descriptors the build produced
(gen/descriptors.binpb) and from protoc's source info, never from a list written here."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
from google.api import annotations_pb2
from google.protobuf import descriptor_pb2

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "gen" / "docs"


def _generator():
    """scripts/generate_proto_docs.py as a module (scripts/ is not a package)."""
    name = "generate_proto_docs"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / "generate_proto_docs.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # its dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="module")
def build_set() -> descriptor_pb2.FileDescriptorSet:
    """The descriptor set scripts/generate_protos.sh wrote (the gateway's transcoding input)."""
    return descriptor_pb2.FileDescriptorSet.FromString((ROOT / "gen" / "descriptors.binpb").read_bytes())


@pytest.fixture(scope="module")
def agentmesh_files(build_set) -> list[descriptor_pb2.FileDescriptorProto]:
    files = [f for f in build_set.file if f.package.startswith("agentmesh.")]
    assert {f.package for f in files} >= {
        "agentmesh.agent.v1", "agentmesh.common.v1", "agentmesh.llm.v1",
        "agentmesh.memory.v1", "agentmesh.retrieval.v1", "agentmesh.tools.v1",
    }
    return files


def _page(package: str) -> str:
    path = DOCS / f"{package}.md"
    assert path.is_file(), f"{path} is missing: run scripts/generate_protos.sh"
    return path.read_text(encoding="utf-8")


def _anchor(name: str) -> str:
    return f'<a id="{name}"></a>'


def _messages(prefix: str, messages):  # noqa: ANN001, ANN202
    for message in messages:
        if message.options.map_entry:
            continue
        name = f"{prefix}.{message.name}"
        yield name, message
        yield from _messages(name, message.nested_type)


def test_docs_are_generated_from_the_current_protos(tmp_path):
    generator = _generator()
    generator.write(generator.render(generator.load_descriptor_set()), tmp_path)
    fresh = {p.name: p.read_text(encoding="utf-8") for p in tmp_path.glob("*.md")}
    committed = {p.name: p.read_text(encoding="utf-8") for p in DOCS.glob("*.md")}
    assert sorted(fresh) == sorted(committed)
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"gen/docs is stale ({', '.join(stale)}): run scripts/generate_protos.sh"


def test_every_service_and_rpc_with_its_streaming_kind_and_http_binding(agentmesh_files):
    index = (DOCS / "README.md").read_text(encoding="utf-8")
    rpcs = 0
    for file in agentmesh_files:
        page = _page(file.package)
        assert f"[`{file.package}`]({file.package}.md)" in index
        for service in file.service:
            full = f"{file.package}.{service.name}"
            assert _anchor(full) in page
            for method in service.method:
                rpcs += 1
                section = page.split(_anchor(f"{full}.{method.name}"), 1)
                assert len(section) == 2, f"{full}.{method.name} is not documented"
                body = section[1].split('<a id="', 1)[0]
                request = ("stream " if method.client_streaming else "") + method.input_type.split(".")[-1]
                response = ("stream " if method.server_streaming else "") + method.output_type.split(".")[-1]
                assert f"rpc {method.name}({request}) returns ({response})" in body
                kind = {
                    (False, False): "unary", (False, True): "server streaming",
                    (True, False): "client streaming", (True, True): "bidirectional streaming",
                }[(method.client_streaming, method.server_streaming)]
                assert f"- Kind: {kind}" in body
                assert f"- gRPC path: `/{full}/{method.name}`" in body
                if method.options.HasExtension(annotations_pb2.http):
                    rule = method.options.Extensions[annotations_pb2.http]
                    verb = rule.WhichOneof("pattern")
                    assert f"- HTTP: `{verb.upper()} {getattr(rule, verb)}" in body
                assert f"#{full}.{method.name}" in index
    assert rpcs >= 30


def test_every_message_field_enum_and_value(agentmesh_files):
    for file in agentmesh_files:
        page = _page(file.package)
        for name, message in _messages(file.package, file.message_type):
            section = page.split(_anchor(name), 1)
            assert len(section) == 2, f"message {name} is not documented"
            body = section[1].split('<a id="', 1)[0]
            if not message.field:
                assert "No fields." in body
            for f in message.field:
                assert re.search(rf"^\| `{f.name}` \| {f.number} \| .+\|$", body, re.M), f"{name}.{f.name} missing"
        enums = [(f"{file.package}.{e.name}", e) for e in file.enum_type]
        for name, message in _messages(file.package, file.message_type):
            enums += [(f"{name}.{e.name}", e) for e in message.enum_type]
        for name, enum in enums:
            section = page.split(_anchor(name), 1)
            assert len(section) == 2, f"enum {name} is not documented"
            body = section[1].split('<a id="', 1)[0]
            for value in enum.value:
                assert f"| `{value.name}` | {value.number} |" in body, f"{name}.{value.name} missing"


def test_comments_are_carried_over():
    """Every commented service, RPC, message, field, enum and value shows its comment."""
    generator = _generator()
    checked = 0
    for file in generator.load_descriptor_set().file:
        if not file.package.startswith("agentmesh."):
            continue
        flat = " ".join(_page(file.package).split())
        for location in file.source_code_info.location:
            if not location.leading_comments.strip() or location.path[0] not in (4, 5, 6):
                continue
            # The first words of the comment, whitespace-normalized (tables join the lines).
            words = " ".join(location.leading_comments.split()[:8]).replace("|", "\\|")
            assert words in flat, f"comment {words!r} of {file.name} path {list(location.path)} is missing"
            checked += 1
    assert checked > 300


def test_every_link_points_at_an_anchor():
    anchor = re.compile(r'<a id="([^"]+)"></a>')
    anchors = {p.name: set(anchor.findall(p.read_text(encoding="utf-8"))) for p in DOCS.glob("*.md")}
    for path in DOCS.glob("*.md"):
        for target, name in re.findall(r"\]\(([^)#]*)#([^)]+)\)", path.read_text(encoding="utf-8")):
            if target.startswith("http"):
                continue
            page = target or path.name
            assert name in anchors.get(page, set()), f"{path.name}: link to {page}#{name} has no target"
