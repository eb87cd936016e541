"""The demo corpus: the Python standard library's own documentation, read from the running
interpreter, so every machine has a real, sizeable corpus without downloads (DESIGN.md §5).

One :class:`~agentmesh.retrieval.v1.retrieval_pb2.Document` per module:
- ``id``: ``python-stdlib:<module>`` (e.g. ``python-stdlib:json``);
- ``title``: the module name, plus the first sentence of its docstring when that is short;
- ``source``: ``https://docs.python.org/<major>.<minor>/library/<module>.html``;
- ``text``: the module docstring, then for each public function and class (sorted by name) its
  signature and docstring, and for each class its own public methods and properties likewise
  (members inherited from a base are left to the base's own module);
- ``metadata``: ``module`` and ``python_version``.

Output is deterministic for one interpreter: members are sorted and default values are printed
by :func:`_stable_repr` (sets sorted; objects whose ``repr`` holds an address or machine state,
such as ``os.environ``, by name or type), so the text does not depend on the process, its hash
seed or its environment, and re-ingesting the corpus finds every document unchanged.

``DEFAULT_MODULES`` (45 modules) gives 849 chunks (200-token chunks, 40 overlap) from 464 kB of
text on CPython 3.11.7. Measured on the 2-core build machine (shared with other jobs): embedding
runs at 17-23 chunks/s (all-MiniLM-L6-v2 on the CPU, batches of 32), so ingesting the default
corpus into an empty Milvus Lite collection takes 41-50 s; re-ingesting it unchanged about 3 s.
``all_modules=True`` gives about 200 documents and 1.3 MB of text (roughly 2 minutes of embedding).
"""

from __future__ import annotations

import contextlib
import enum
import importlib
import inspect
import io
import os
import re
import sys
import warnings
from collections.abc import Iterator
from types import ModuleType

from agentmesh.retrieval.v1 import retrieval_pb2

DOCUMENT_ID_PREFIX = "python-stdlib:"

#: Well-known modules a Python developer asks about; about a minute of ingestion on 2 cores.
DEFAULT_MODULES: tuple[str, ...] = (
    "abc", "argparse", "asyncio", "base64", "bisect", "collections", "concurrent.futures",
    "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "enum", "functools",
    "glob", "gzip", "hashlib", "heapq", "html", "http.client", "itertools", "json", "logging",
    "math", "os.path", "pathlib", "pickle", "queue", "random", "re", "secrets", "shutil",
    "socket", "sqlite3", "statistics", "string", "subprocess", "tempfile", "textwrap",
    "threading", "time", "typing", "urllib.parse", "uuid",
)

#: Never imported by ``all_modules``: they act on import (open a browser, print, need a display
#: or a terminal), are development tooling rather than library, or are a setuptools shim.
_SKIP_MODULES = frozenset({
    "antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test", "lib2to3",
    "ensurepip", "venv", "readline", "distutils", "pydoc_data", "xxlimited", "xxlimited_35",
    "xxsubtype", "msvcrt", "winreg", "winsound", "nt", "_winapi",
})

#: A full stop that ends a sentence (not the ones inside "a.k.a. priority queue").
_SENTENCE_BREAK = re.compile(r"\.\s+(?=[A-Z])")


_LITERALS = (type(None), bool, int, float, complex, str, bytes)


def _stable_repr(value: object) -> str:
    """A default value as text that is the same in every process of one interpreter.

    Literals (and tuples, lists, dicts and sets of them, sets sorted) print as ``repr``; enum
    members as ``repr``; functions and classes by qualified name; ``os.environ`` by name (its
    ``repr`` is the whole environment); any other object as ``<TypeName object>``, because its
    ``repr`` may hold an address, a file descriptor or machine state.
    """
    if isinstance(value, _LITERALS):
        return repr(value)
    if isinstance(value, (set, frozenset)):
        items = ", ".join(sorted(_stable_repr(v) for v in value))
        return f"{type(value).__name__}({{{items}}})" if items else f"{type(value).__name__}()"
    if type(value) is list:
        return "[" + ", ".join(_stable_repr(v) for v in value) + "]"
    if type(value) is tuple:
        items = [_stable_repr(v) for v in value]
        return f"({items[0]},)" if len(items) == 1 else "(" + ", ".join(items) + ")"
    if type(value) is dict:
        return "{" + ", ".join(f"{_stable_repr(k)}: {_stable_repr(v)}" for k, v in value.items()) + "}"
    if isinstance(value, enum.Enum):
        return repr(value)
    if value is os.environ:
        return "os.environ"
    if inspect.isclass(value) or inspect.isroutine(value):
        module = getattr(value, "__module__", None)
        name = getattr(value, "__qualname__", None) or getattr(value, "__name__", "?")
        return f"{module}.{name}" if module else name
    return f"<{type(value).__qualname__} object>"


class _Literal:
    """Stands in for a default value so ``str(Signature)`` prints ``text`` verbatim."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return self.text


def _signature(obj: object) -> str:
    """``(a, b=1, *, c=None)`` or ``(...)`` when the object has no introspectable signature."""
    try:
        sig = inspect.signature(obj)  # type: ignore[arg-type]
    except Exception:  # noqa: BLE001 - C signatures may name constants that exist only at run time
        return "(...)"
    params = [
        p if p.default is inspect.Parameter.empty else p.replace(default=_Literal(_stable_repr(p.default)))
        for p in sig.parameters.values()
    ]
    return str(sig.replace(parameters=params))


def _doc(obj: object) -> str:
    """The object's own docstring, dedented (empty when it has none)."""
    doc = getattr(obj, "__doc__", None)
    return inspect.cleandoc(doc) if isinstance(doc, str) else ""


def _summary(doc: str) -> str:
    """First sentence of the first paragraph of ``doc`` when it is short, else ''."""
    first = " ".join(doc.split("\n\n", 1)[0].split())
    sentence = _SENTENCE_BREAK.split(first, 1)[0].rstrip(".")
    return sentence if 0 < len(sentence) <= 80 else ""


def _public_members(module: ModuleType) -> list[tuple[str, object]]:
    """Public functions and classes of ``module`` (its ``__all__``, else the names it defines)."""
    names = getattr(module, "__all__", None)
    if not isinstance(names, (list, tuple)):
        names = [n for n in dir(module) if not n.startswith("_")]
        defined_here = True
    else:
        defined_here = False
    out = []
    for name in sorted(set(names)):
        try:
            obj = getattr(module, name, None)
        except Exception:  # noqa: BLE001 - a lazy attribute that fails to resolve is not documented
            continue
        if not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        owner = getattr(obj, "__module__", None) or ""
        if defined_here and not _belongs_to(owner, module.__name__):
            continue  # re-exported from elsewhere (``from os import path`` etc.)
        out.append((name, obj))
    return out


def _belongs_to(owner: str, module: str) -> bool:
    """Whether an object defined in ``owner`` is part of ``module``'s own API: the module itself,
    a submodule, or its C accelerator (``_bisect`` for ``bisect``)."""
    return any(owner == m or owner.startswith(m + ".") for m in (module, "_" + module))


def _class_members(cls: type) -> list[tuple[str, object]]:
    """The class's own public methods and properties, in definition order."""
    out = []
    for name, attr in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(attr, (staticmethod, classmethod)):
            attr = attr.__func__
        if inspect.isroutine(attr) or isinstance(attr, property):
            out.append((name, attr))
    return out


def module_text(module: ModuleType, name: str | None = None) -> str:
    """The documentation text of ``module`` described in the module docstring; ``name`` is the
    name it was imported under (``os.path`` is really ``posixpath``)."""
    name = name or module.__name__
    parts = [f"Module {name} (Python {sys.version_info.major}.{sys.version_info.minor} standard library)"]
    if doc := _doc(module):
        parts.append(doc)
    for member_name, obj in _public_members(module):
        qual = f"{name}.{member_name}"
        if inspect.isclass(obj):
            parts.append(f"class {qual}{_signature(obj)}")
            if doc := _doc(obj):
                parts.append(doc)
            for attr_name, attr in _class_members(obj):
                if isinstance(attr, property):
                    parts.append(f"property {qual}.{attr_name}")
                else:
                    parts.append(f"{qual}.{attr_name}{_signature(attr)}")
                if doc := _doc(attr):
                    parts.append(doc)
        else:
            parts.append(f"{qual}{_signature(obj)}")
            if doc := _doc(obj):
                parts.append(doc)
    return "\n\n".join(parts) + "\n"


def module_document(module: ModuleType, name: str | None = None) -> retrieval_pb2.Document:
    """``module``'s documentation as a :class:`retrieval_pb2.Document` (see the module docstring);
    ``name`` is the name it was imported under (default ``module.__name__``)."""
    name = name or module.__name__
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    summary = _summary(_doc(module))
    return retrieval_pb2.Document(
        id=DOCUMENT_ID_PREFIX + name,
        title=f"{name} — {summary}" if summary else name,
        source=f"https://docs.python.org/{version}/library/{name}.html",
        text=module_text(module, name),
        metadata={"module": name, "python_version": version},
    )


def _import_quietly(name: str) -> ModuleType | None:
    """Import ``name`` with warnings and stdout/stderr suppressed; None when it fails."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            return importlib.import_module(name)
        except Exception:  # noqa: BLE001 - platform-specific or optional modules fail to import
            return None


def all_module_names() -> list[str]:
    """Every public top-level stdlib module of this interpreter that ``all_modules`` considers."""
    return sorted(
        n for n in sys.stdlib_module_names if not n.startswith("_") and n not in _SKIP_MODULES
    )


def stdlib_documents(modules: list[str] | None = None, all_modules: bool = False) -> Iterator[retrieval_pb2.Document]:
    """Documents for ``modules`` (default :data:`DEFAULT_MODULES`), or for every importable public
    top-level stdlib module when ``all_modules`` is true (``modules`` is then ignored).

    Raises ``ValueError`` for a name in ``modules`` that is not importable (a typo should not
    silently shrink the corpus); with ``all_modules`` such modules are skipped. A module is
    emitted once even when listed twice. Imports swap ``sys.stdout``/``sys.stderr`` while they
    run, so call this from a CLI or a test, not from a server's threads.
    """
    names = all_module_names() if all_modules else list(modules if modules is not None else DEFAULT_MODULES)
    seen: set[str] = set()
    for name in names:
        if name in seen:
            continue
        seen.add(name)
        module = _import_quietly(name)
        if module is None:
            if all_modules:
                continue
            raise ValueError(f"cannot import standard library module {name!r}")
        yield module_document(module, name)
