#!/usr/bin/env python3
"""Generate the Markdown reference of the AgentMesh contracts from the protos themselves.

protoc (grpcio-tools) compiles ``protos/agentmesh/**/*.proto`` into a FileDescriptorSet with
source info (``--include_source_info``), so every comment of a service, RPC, message, field,
enum and enum value is at hand next to the types. Written to the output folder:

- ``<package>.md`` for each package (``agentmesh.agent.v1.md``...): its services with every RPC's
  request and response, streaming kind, gRPC path and HTTP binding (``google.api.http``), then
  its messages (fields with number, type, label, oneof and comment) and enums (values);
- ``README.md``: the index of the packages and of every RPC.

Types link to their definition, across pages; ``google.protobuf`` types link to the protobuf
reference. The output depends only on the protos (no dates), so ``scripts/generate_protos.sh
--check`` can compare it with the committed ``gen/docs``.

Usage: scripts/generate_proto_docs.py [--out gen/docs] [--protos protos]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from google.api import annotations_pb2  # registers the google.api.http option before parsing
from google.protobuf import descriptor_pb2
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_PREFIX = "agentmesh."

# SourceCodeInfo path components (field numbers in descriptor.proto).
_FILE_MESSAGE, _FILE_ENUM, _FILE_SERVICE = 4, 5, 6
_MESSAGE_FIELD, _MESSAGE_NESTED, _MESSAGE_ENUM, _MESSAGE_ONEOF = 2, 3, 4, 8
_ENUM_VALUE = 2
_SERVICE_METHOD = 2

_SCALARS = {
    descriptor_pb2.FieldDescriptorProto.TYPE_DOUBLE: "double",
    descriptor_pb2.FieldDescriptorProto.TYPE_FLOAT: "float",
    descriptor_pb2.FieldDescriptorProto.TYPE_INT64: "int64",
    descriptor_pb2.FieldDescriptorProto.TYPE_UINT64: "uint64",
    descriptor_pb2.FieldDescriptorProto.TYPE_INT32: "int32",
    descriptor_pb2.FieldDescriptorProto.TYPE_FIXED64: "fixed64",
    descriptor_pb2.FieldDescriptorProto.TYPE_FIXED32: "fixed32",
    descriptor_pb2.FieldDescriptorProto.TYPE_BOOL: "bool",
    descriptor_pb2.FieldDescriptorProto.TYPE_STRING: "string",
    descriptor_pb2.FieldDescriptorProto.TYPE_BYTES: "bytes",
    descriptor_pb2.FieldDescriptorProto.TYPE_UINT32: "uint32",
    descriptor_pb2.FieldDescriptorProto.TYPE_SFIXED32: "sfixed32",
    descriptor_pb2.FieldDescriptorProto.TYPE_SFIXED64: "sfixed64",
    descriptor_pb2.FieldDescriptorProto.TYPE_SINT32: "sint32",
    descriptor_pb2.FieldDescriptorProto.TYPE_SINT64: "sint64",
}
_PROTOBUF_REFERENCE = "https://protobuf.dev/reference/protobuf/google.protobuf/"


def load_descriptor_set(proto_root: Path = ROOT / "protos") -> descriptor_pb2.FileDescriptorSet:
    """Every ``agentmesh`` proto under ``proto_root`` and its imports, with source info."""
    protos = sorted(str(p.relative_to(proto_root)) for p in (proto_root / "agentmesh").rglob("*.proto"))
    if not protos:
        raise SystemExit(f"no .proto files under {proto_root / 'agentmesh'}")
    well_known = resources.files("grpc_tools") / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "descriptors.binpb"
        code = protoc.main([
            "protoc", f"-I{proto_root}", f"-I{well_known}", "--include_source_info", "--include_imports",
            f"--descriptor_set_out={out}", *protos,
        ])
        if code != 0:
            raise SystemExit(f"protoc failed (exit {code}) on the protos under {proto_root}")
        return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def streaming_kind(method: descriptor_pb2.MethodDescriptorProto) -> str:
    """``unary``, ``server streaming``, ``client streaming`` or ``bidirectional streaming``."""
    if method.client_streaming and method.server_streaming:
        return "bidirectional streaming"
    if method.server_streaming:
        return "server streaming"
    if method.client_streaming:
        return "client streaming"
    return "unary"


def http_bindings(method: descriptor_pb2.MethodDescriptorProto) -> list[str]:
    """The method's ``google.api.http`` bindings as ``VERB /path`` (with ``body: x`` when set)."""
    if not method.options.HasExtension(annotations_pb2.http):
        return []
    rules = [method.options.Extensions[annotations_pb2.http]]
    rules += list(rules[0].additional_bindings)
    bindings = []
    for rule in rules:
        kind = rule.WhichOneof("pattern")
        if kind is None:
            continue
        if kind == "custom":
            verb, path = rule.custom.kind, rule.custom.path
        else:
            verb, path = kind.upper(), getattr(rule, kind)
        text = f"{verb} {path}"
        if rule.body:
            text += f" (body: {rule.body})"
        bindings.append(text)
    return bindings


def _page_name(package: str) -> str:
    return f"{package}.md"


@dataclass
class _Comments:
    """Comments of one file by SourceCodeInfo path."""

    by_path: dict[tuple[int, ...], str] = field(default_factory=dict)

    @classmethod
    def of(cls, file: descriptor_pb2.FileDescriptorProto) -> _Comments:
        comments = cls()
        for location in file.source_code_info.location:
            parts = [_clean(location.leading_comments), _clean(location.trailing_comments)]
            text = "\n\n".join(p for p in parts if p)
            if text:
                comments.by_path[tuple(location.path)] = text
        return comments

    def block(self, path: tuple[int, ...]) -> str:
        """The comment as Markdown paragraphs (empty when there is none)."""
        return self.by_path.get(path, "")

    def cell(self, path: tuple[int, ...]) -> str:
        """The comment on one line, for a table cell."""
        return _cell(self.by_path.get(path, ""))


def _clean(comment: str) -> str:
    # protoc keeps the space after `//` and the line breaks; drop the one space, keep paragraphs.
    lines = [line[1:] if line.startswith(" ") else line for line in comment.rstrip("\n").split("\n")]
    return "\n".join(line.rstrip() for line in lines).strip("\n")


def _cell(text: str) -> str:
    paragraphs = [" ".join(p.split()) for p in text.split("\n\n") if p.strip()]
    return "<br><br>".join(paragraphs).replace("|", "\\|")


class _Types:
    """Where each type is defined, to link field, request and response types."""

    def __init__(self, files: list[descriptor_pb2.FileDescriptorProto]) -> None:
        self.package_of: dict[str, str] = {}
        self.map_entries: dict[str, descriptor_pb2.DescriptorProto] = {}
        for file in files:
            for message in file.message_type:
                self._add_message(file.package, f"{file.package}.{message.name}", message)
            for enum in file.enum_type:
                self.package_of[f"{file.package}.{enum.name}"] = file.package

    def _add_message(self, package: str, name: str, message: descriptor_pb2.DescriptorProto) -> None:
        self.package_of[name] = package
        if message.options.map_entry:
            self.map_entries[name] = message
        for nested in message.nested_type:
            self._add_message(package, f"{name}.{nested.name}", nested)
        for enum in message.enum_type:
            self.package_of[f"{name}.{enum.name}"] = package

    def link(self, type_name: str, from_package: str) -> str:
        """A Markdown link to ``type_name`` (fully qualified, with or without the leading dot)."""
        name = type_name.lstrip(".")
        package = self.package_of.get(name, "")
        short = name.removeprefix(f"{package}.") if package else name
        if package.startswith(PACKAGE_PREFIX):
            page = "" if package == from_package else _page_name(package)
            label = short if package == from_package else name
            return f"[`{label}`]({page}#{name})"
        if name.startswith("google.protobuf."):
            return f"[`{name}`]({_PROTOBUF_REFERENCE}#{short.lower()})"
        return f"`{name}`"

    def field_type(self, f: descriptor_pb2.FieldDescriptorProto, from_package: str) -> str:
        if f.type_name and f.type_name.lstrip(".") in self.map_entries:
            entry = self.map_entries[f.type_name.lstrip(".")]
            key, value = entry.field
            if value.type in _SCALARS:
                return f"`map<{_SCALARS[key.type]}, {_SCALARS[value.type]}>`"
            return f"map&lt;`{_SCALARS[key.type]}`, {self.field_type(value, from_package)}&gt;"
        if f.type in _SCALARS:
            base = f"`{_SCALARS[f.type]}`"
        else:
            base = self.link(f.type_name, from_package)
        if f.label == descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED:
            return f"repeated {base}"
        if f.proto3_optional:
            return f"optional {base}"
        return base


class _Page:
    """The Markdown of one package."""

    def __init__(self, package: str, files: list[descriptor_pb2.FileDescriptorProto], types: _Types) -> None:
        self.package = package
        self.files = files
        self.types = types
        self.comments = {f.name: _Comments.of(f) for f in files}
        self.lines: list[str] = []

    def _w(self, *lines: str) -> None:
        self.lines.extend(lines)

    def _anchor_heading(self, level: int, anchor: str, title: str) -> None:
        self._w(f'<a id="{anchor}"></a>', "", f"{'#' * level} {title}", "")

    def _paragraphs(self, text: str) -> None:
        if text:
            self._w(text, "")

    def render(self) -> str:
        sources = ", ".join(f"`protos/{f.name}`" for f in self.files)
        self._w(f"# {self.package}", "")
        self._w(f"Generated from {sources} by `scripts/generate_proto_docs.py`; do not edit.", "")
        for file in self.files:
            # A comment before `package` (path [2]) or `syntax` (path [12]) describes the file.
            comments = self.comments[file.name]
            self._paragraphs(comments.block((2,)) or comments.block((12,)))
        self._contents()
        for file in self.files:
            comments = self.comments[file.name]
            for i, service in enumerate(file.service):
                self._service(service, comments, (_FILE_SERVICE, i))
        if any(f.message_type for f in self.files):
            self._w("## Messages", "")
            for file in self.files:
                comments = self.comments[file.name]
                for i, message in enumerate(file.message_type):
                    self._message(message, f"{self.package}.{message.name}", comments, (_FILE_MESSAGE, i))
        if any(f.enum_type for f in self.files):
            self._w("## Enums", "")
            for file in self.files:
                comments = self.comments[file.name]
                for i, enum in enumerate(file.enum_type):
                    self._enum(enum, f"{self.package}.{enum.name}", comments, (_FILE_ENUM, i))
        return "\n".join(self.lines).rstrip("\n") + "\n"

    def _contents(self) -> None:
        services = [s for f in self.files for s in f.service]
        messages = [m for f in self.files for m in f.message_type]
        enums = [e for f in self.files for e in f.enum_type]
        for title, items in (("Services", services), ("Messages", messages), ("Enums", enums)):
            if items:
                links = ", ".join(f"[`{x.name}`](#{self.package}.{x.name})" for x in items)
                self._w(f"- **{title}**: {links}")
        self._w("")

    def _service(
        self, service: descriptor_pb2.ServiceDescriptorProto, comments: _Comments, path: tuple[int, ...]
    ) -> None:
        full = f"{self.package}.{service.name}"
        self._anchor_heading(2, full, f"Service `{service.name}`")
        self._paragraphs(comments.block(path))
        self._w("| Method | Request | Response | Kind | HTTP |", "| --- | --- | --- | --- | --- |")
        for method in service.method:
            http = "<br>".join(f"`{b}`" for b in http_bindings(method)) or "—"
            self._w(
                f"| [`{method.name}`](#{full}.{method.name}) | {self.types.link(method.input_type, self.package)} "
                f"| {self.types.link(method.output_type, self.package)} | {streaming_kind(method)} | {http} |"
            )
        self._w("")
        for i, method in enumerate(service.method):
            self._anchor_heading(3, f"{full}.{method.name}", f"`{service.name}.{method.name}`")
            request = ("stream " if method.client_streaming else "") + method.input_type.lstrip(".").split(".")[-1]
            response = ("stream " if method.server_streaming else "") + method.output_type.lstrip(".").split(".")[-1]
            self._w("```proto", f"rpc {method.name}({request}) returns ({response})", "```", "")
            self._w(f"- Kind: {streaming_kind(method)}")
            self._w(f"- gRPC path: `/{full}/{method.name}`")
            self._w(f"- Request: {self.types.link(method.input_type, self.package)}")
            self._w(f"- Response: {self.types.link(method.output_type, self.package)}"
                    + (" (one per stream item)" if method.server_streaming else ""))
            for binding in http_bindings(method):
                self._w(f"- HTTP: `{binding}`")
            self._w("")
            self._paragraphs(comments.block((*path, _SERVICE_METHOD, i)))

    def _message(
        self, message: descriptor_pb2.DescriptorProto, full: str, comments: _Comments, path: tuple[int, ...]
    ) -> None:
        if message.options.map_entry:
            return  # shown as map<K, V> on its field
        self._anchor_heading(3, full, f"`{full.removeprefix(self.package + '.')}`")
        self._paragraphs(comments.block(path))
        # Real oneofs (proto3 `optional` fields get a synthetic one each, not listed).
        in_oneof = [f for f in message.field if f.HasField("oneof_index") and not f.proto3_optional]
        real = sorted({f.oneof_index for f in in_oneof})
        for index in real:
            members = ", ".join(f"`{f.name}`" for f in in_oneof if f.oneof_index == index)
            note = comments.cell((*path, _MESSAGE_ONEOF, index))
            line = f"- oneof `{message.oneof_decl[index].name}`: at most one of {members}."
            self._w(line + (f" {note}" if note else ""))
        if real:
            self._w("")
        if not message.field:
            self._w("No fields.", "")
        else:
            self._w("| Field | Number | Type | Description |", "| --- | --- | --- | --- |")
            for i, f in enumerate(message.field):
                description = comments.cell((*path, _MESSAGE_FIELD, i))
                if f.HasField("oneof_index") and not f.proto3_optional:
                    oneof = message.oneof_decl[f.oneof_index].name
                    description = f"*oneof `{oneof}`.* {description}".rstrip()
                self._w(f"| `{f.name}` | {f.number} | {self.types.field_type(f, self.package)} | {description} |")
            self._w("")
        for i, nested in enumerate(message.nested_type):
            self._message(nested, f"{full}.{nested.name}", comments, (*path, _MESSAGE_NESTED, i))
        for i, enum in enumerate(message.enum_type):
            self._enum(enum, f"{full}.{enum.name}", comments, (*path, _MESSAGE_ENUM, i))

    def _enum(
        self, enum: descriptor_pb2.EnumDescriptorProto, full: str, comments: _Comments, path: tuple[int, ...]
    ) -> None:
        self._anchor_heading(3, full, f"`{full.removeprefix(self.package + '.')}`")
        self._paragraphs(comments.block(path))
        self._w("| Value | Number | Description |", "| --- | --- | --- |")
        for i, value in enumerate(enum.value):
            self._w(f"| `{value.name}` | {value.number} | {comments.cell((*path, _ENUM_VALUE, i))} |")
        self._w("")


def packages(descriptor_set: descriptor_pb2.FileDescriptorSet) -> dict[str, list[descriptor_pb2.FileDescriptorProto]]:
    """The AgentMesh files of the set by package, packages and files sorted by name."""
    by_package: dict[str, list[descriptor_pb2.FileDescriptorProto]] = {}
    for file in descriptor_set.file:
        if file.package.startswith(PACKAGE_PREFIX):
            by_package.setdefault(file.package, []).append(file)
    return {p: sorted(by_package[p], key=lambda f: f.name) for p in sorted(by_package)}


def _index(by_package: dict[str, list[descriptor_pb2.FileDescriptorProto]]) -> str:
    lines = [
        "# AgentMesh API reference",
        "",
        "Generated from `protos/` by `scripts/generate_proto_docs.py` (run by `scripts/generate_protos.sh`);",
        "do not edit. Clients reach every service through the gateway (gateway/README.md); the HTTP",
        "bindings are served by its gRPC-JSON transcoder.",
        "",
        "| Package | Files | Services | Messages | Enums |",
        "| --- | --- | --- | --- | --- |",
    ]
    for package, files in by_package.items():
        services, messages, enums = (
            sum(len(getattr(f, kind)) for f in files) for kind in ("service", "message_type", "enum_type")
        )
        names = ", ".join(f"`{f.name}`" for f in files)
        lines.append(f"| [`{package}`]({_page_name(package)}) | {names} | {services} | {messages} | {enums} |")
    lines += ["", "## Every RPC", "", "| RPC | Kind | HTTP |", "| --- | --- | --- |"]
    for package, files in by_package.items():
        for file in files:
            for service in file.service:
                for method in service.method:
                    full = f"{package}.{service.name}.{method.name}"
                    http = "<br>".join(f"`{b}`" for b in http_bindings(method)) or "—"
                    link = f"[`{service.name}.{method.name}`]({_page_name(package)}#{full})"
                    lines.append(f"| {link} | {streaming_kind(method)} | {http} |")
    return "\n".join(lines) + "\n"


def render(descriptor_set: descriptor_pb2.FileDescriptorSet) -> dict[str, str]:
    """File name -> Markdown, for every page and the index."""
    by_package = packages(descriptor_set)
    types = _Types(list(descriptor_set.file))
    pages = {_page_name(p): _Page(p, files, types).render() for p, files in by_package.items()}
    pages["README.md"] = _index(by_package)
    return pages


def write(pages: dict[str, str], out: Path) -> None:
    """Write ``pages`` into ``out``, removing Markdown files no package produces any more."""
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.md"):
        if stale.name not in pages:
            stale.unlink()
    for name, text in pages.items():
        (out / name).write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "gen" / "docs", help="output folder (default gen/docs)")
    parser.add_argument("--protos", type=Path, default=ROOT / "protos", help="proto root (default protos/)")
    args = parser.parse_args(argv)
    pages = render(load_descriptor_set(args.protos))
    write(pages, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
