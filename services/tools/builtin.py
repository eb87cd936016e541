"""The built-in tools that need no sandbox or network of their own: ``calculator``,
``search_documents`` and ``recall_memory`` (``python`` is in ``sandbox.py``, ``http_fetch`` in
``http_fetch.py``).

``calculator`` evaluates arithmetic with an ``ast`` walker (never ``eval``): only number literals,
``+ - * / // % **``, unary ``+``/``-``, parentheses, and whitelisted ``math`` functions and
constants. Limits keep one call cheap: at most :data:`MAX_EXPRESSION_CHARS` characters, at most
:data:`MAX_DEPTH` levels of nesting, and integers of at most :data:`MAX_INT_BITS` bits — checked
BEFORE a power, product or factorial is computed, so ``9**9**9`` is refused instead of computed.
Every refusal or arithmetic failure is a :class:`~agentmesh.services.tools.registry.ToolError`
(an ``is_error`` result the model can read), never a crash.

``search_documents`` calls ``RetrievalService.Search`` with the caller's tenant and a deadline
derived from the caller's (``outgoing_metadata()``, ``downstream_timeout``).

``recall_memory`` reads the session of the run (``ExecuteToolRequest.session_id``) from the
memory service the same way, and returns the earlier messages that share the most words with
the query.
"""

from __future__ import annotations

import ast
import math
import operator
import re
from collections.abc import Callable
from typing import Any

import grpc

from agentmesh.common.v1 import common_pb2
from agentmesh.memory.v1 import memory_pb2
from agentmesh.retrieval.v1 import retrieval_pb2
from agentmesh.services.runtime.clients import Downstream
from agentmesh.services.runtime.context import downstream_timeout, outgoing_metadata
from agentmesh.services.runtime.errors import from_downstream
from agentmesh.services.tools.registry import ProgressCallback, Tool, ToolError, ToolOutput, current_call

# -- calculator ---------------------------------------------------------------------------------

MAX_EXPRESSION_CHARS = 1000
#: Largest integer (operand or result), in bits: about 1233 decimal digits.
MAX_INT_BITS = 4096
#: Deepest nesting of operations and calls.
MAX_DEPTH = 60
#: Largest |ndigits| of round(), which otherwise computes 10**ndigits.
MAX_ROUND_DIGITS = 300

Number = int | float


class CalculatorError(ToolError):
    """The expression is refused or cannot be evaluated."""


def _check(value: Any) -> Number:
    """Refuse results that are not real, finite, or too large."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        if isinstance(value, complex):
            raise CalculatorError("the result is not a real number (e.g. a fractional power of a negative number)")
        raise CalculatorError(f"unexpected result type {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise CalculatorError("the result is too large (floating-point overflow)")
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise CalculatorError(f"the result has more than {MAX_INT_BITS} bits (about 1233 digits); refused")
    return value


def _pow(base: Number, exp: Number) -> Number:
    if isinstance(base, int) and isinstance(exp, int) and exp > 0 and abs(base) > 1:
        # log2(|base| ** exp) = exp * log2|base|: refuse before computing a huge integer.
        if exp * math.log2(abs(base)) > MAX_INT_BITS:
            raise CalculatorError(f"{base}**{exp} would have more than {MAX_INT_BITS} bits; refused")
    return base**exp


def _mul(a: Number, b: Number) -> Number:
    if isinstance(a, int) and isinstance(b, int) and a.bit_length() + b.bit_length() > MAX_INT_BITS + 1:
        raise CalculatorError(f"the product would have more than {MAX_INT_BITS} bits; refused")
    return a * b


def _factorial(n: Number) -> int:
    if isinstance(n, float):
        if not n.is_integer():
            raise CalculatorError("factorial() needs a whole number")
        n = int(n)
    if n < 0:
        raise CalculatorError("factorial() of a negative number is undefined")
    if math.lgamma(n + 1) / math.log(2) > MAX_INT_BITS:
        raise CalculatorError(f"factorial({n}) would have more than {MAX_INT_BITS} bits; refused")
    return math.factorial(n)


def _round(x: Number, ndigits: Number | None = None) -> Number:
    if ndigits is None:
        return round(x)
    if isinstance(ndigits, float):
        if not ndigits.is_integer():
            raise CalculatorError("round() needs a whole number of digits")
        ndigits = int(ndigits)
    if abs(ndigits) > MAX_ROUND_DIGITS:
        raise CalculatorError(f"round() accepts at most {MAX_ROUND_DIGITS} digits either way")
    return round(x, ndigits)


def _gcd(*args: Number) -> int:
    if not all(isinstance(a, int) for a in args):
        raise CalculatorError("gcd() needs whole numbers")
    return math.gcd(*args)


def _log(x: Number, base: Number | None = None) -> float:
    return math.log(x) if base is None else math.log(x, base)


_BINARY: dict[type[ast.operator], Callable[[Number, Number], Number]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: _mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: _pow,
}
_UNARY: dict[type[ast.unaryop], Callable[[Number], Number]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_HINTS: dict[type[ast.AST], str] = {
    ast.BitXor: "'^' is not a power here; write powers as 2**10",
    ast.Attribute: "attribute access (a.b) is not allowed",
    ast.Compare: "comparisons are not supported",
    ast.BoolOp: "'and'/'or' are not supported",
    ast.Subscript: "indexing is not supported",
    ast.Lambda: "lambda is not allowed",
}

#: name -> (function, fewest arguments, most arguments)
FUNCTIONS: dict[str, tuple[Callable[..., Number], int, int]] = {
    "abs": (abs, 1, 1),
    "sqrt": (math.sqrt, 1, 1),
    "cbrt": (math.cbrt, 1, 1),
    "exp": (math.exp, 1, 1),
    "log": (_log, 1, 2),
    "log2": (math.log2, 1, 1),
    "log10": (math.log10, 1, 1),
    "sin": (math.sin, 1, 1),
    "cos": (math.cos, 1, 1),
    "tan": (math.tan, 1, 1),
    "asin": (math.asin, 1, 1),
    "acos": (math.acos, 1, 1),
    "atan": (math.atan, 1, 1),
    "atan2": (math.atan2, 2, 2),
    "sinh": (math.sinh, 1, 1),
    "cosh": (math.cosh, 1, 1),
    "tanh": (math.tanh, 1, 1),
    "hypot": (math.hypot, 1, 16),
    "degrees": (math.degrees, 1, 1),
    "radians": (math.radians, 1, 1),
    "floor": (math.floor, 1, 1),
    "ceil": (math.ceil, 1, 1),
    "trunc": (math.trunc, 1, 1),
    "round": (_round, 1, 2),
    "min": (min, 1, 64),
    "max": (max, 1, 64),
    "factorial": (_factorial, 1, 1),
    "gcd": (_gcd, 1, 64),
}
CONSTANTS: dict[str, float] = {"pi": math.pi, "e": math.e, "tau": math.tau}


def _eval(node: ast.AST, depth: int) -> Number:
    if depth > MAX_DEPTH:
        raise CalculatorError(f"the expression nests deeper than {MAX_DEPTH} levels")
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, int | float):
            raise CalculatorError(f"only numbers are allowed, not {node.value!r}"[:200])
        return _check(node.value)
    if isinstance(node, ast.BinOp):
        op = _BINARY.get(type(node.op))
        if op is None:
            raise CalculatorError(_HINTS.get(type(node.op), f"operator {type(node.op).__name__} is not supported"))
        return _check(op(_eval(node.left, depth + 1), _eval(node.right, depth + 1)))
    if isinstance(node, ast.UnaryOp):
        op = _UNARY.get(type(node.op))
        if op is None:
            raise CalculatorError(f"unary operator {type(node.op).__name__} is not supported")
        return _check(op(_eval(node.operand, depth + 1)))
    if isinstance(node, ast.Name):
        if node.id in CONSTANTS:
            return CONSTANTS[node.id]
        if node.id in FUNCTIONS:
            raise CalculatorError(f"{node.id} is a function; call it, e.g. {node.id}(2)")
        raise CalculatorError(f"unknown name {node.id!r}; constants: {', '.join(CONSTANTS)}")
    if isinstance(node, ast.Call):
        if not isinstance(node.func, ast.Name):
            raise CalculatorError(_HINTS.get(type(node.func), "only the listed functions can be called"))
        name = node.func.id
        if name not in FUNCTIONS:
            raise CalculatorError(f"unknown function {name!r}; functions: {', '.join(FUNCTIONS)}")
        if node.keywords:
            raise CalculatorError(f"{name}() takes no keyword arguments")
        if any(isinstance(a, ast.Starred) for a in node.args):
            raise CalculatorError("argument unpacking (*) is not allowed")
        fn, fewest, most = FUNCTIONS[name]
        if not fewest <= len(node.args) <= most:
            count = str(fewest) if fewest == most else f"{fewest} to {most}"
            raise CalculatorError(f"{name}() takes {count} argument{'s' if most > 1 else ''}, got {len(node.args)}")
        return _check(fn(*(_eval(arg, depth + 1) for arg in node.args)))
    allowed = "use numbers, + - * / // % **, parentheses and functions"
    raise CalculatorError(_HINTS.get(type(node), f"{type(node).__name__} is not allowed: {allowed}"))


def evaluate(expression: str) -> Number:
    """Value of an arithmetic expression. Raises :class:`CalculatorError` with a reason for
    anything refused (syntax, names, limits) or undefined (division by zero, domain errors)."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise CalculatorError(f"the expression has {len(expression)} characters; the limit is {MAX_EXPRESSION_CHARS}")
    if not expression.strip():
        raise CalculatorError("the expression is empty")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as exc:
        raise CalculatorError(f"not a valid expression: {exc.msg} (column {exc.offset})") from None
    except (ValueError, RecursionError, MemoryError) as exc:  # null bytes, parser limits
        raise CalculatorError(f"not a valid expression: {exc}") from None
    try:
        return _eval(tree.body, 0)
    except ZeroDivisionError:
        raise CalculatorError("division by zero") from None
    except OverflowError:
        raise CalculatorError("a number is too large for floating point (overflow)") from None
    except ValueError as exc:  # math domain errors: sqrt(-1), log(0)...
        raise CalculatorError(f"math error: {exc}") from None
    except TypeError as exc:  # e.g. factorial(2.5) reaching math with a float
        raise CalculatorError(f"invalid operands: {exc}") from None


def format_number(value: Number) -> str:
    """Exact decimal text of an int; shortest round-trip text (``repr``) of a float."""
    return str(value) if isinstance(value, int) else repr(value)


class Calculator(Tool):
    """Safe arithmetic (see the module docstring). Output: ``{"expression", "result", "text"}``
    where ``result`` is the value as a JSON number (``null`` for an integer beyond the double
    range; exact up to 2**53) and ``text`` its exact decimal form."""

    name = "calculator"
    description = (
        "Evaluate an arithmetic expression exactly and safely. Supports numbers, + - * / // % ** "
        "(power), unary minus, parentheses, the constants pi, e, tau and the functions "
        + ", ".join(FUNCTIONS)
        + ". Use it for any arithmetic instead of computing in your head."
    )
    parameters_schema = {
        "type": "object",
        "properties": {
            "expression": {
                "type": "string",
                "minLength": 1,
                "maxLength": MAX_EXPRESSION_CHARS,
                "description": "The expression, e.g. '(2 + 3) * sqrt(16) / 7'.",
            }
        },
        "required": ["expression"],
        "additionalProperties": False,
    }
    output_schema = {
        "type": "object",
        "properties": {
            "expression": {"type": "string"},
            "result": {"type": ["number", "null"]},
            "text": {"type": "string"},
        },
        "required": ["expression", "result", "text"],
        "additionalProperties": False,
    }

    async def run(self, arguments: dict[str, Any], progress: ProgressCallback) -> ToolOutput:
        expression = arguments["expression"]
        value = evaluate(expression)
        try:
            number: float | int | None = value if isinstance(value, float) or abs(value) <= 2**53 else float(value)
        except OverflowError:
            number = None
        return ToolOutput(output={"expression": expression, "result": number, "text": format_number(value)})


# -- search_documents ---------------------------------------------------------------------------

class SearchDocuments(Tool):
    """Search the retrieval service for chunks relevant to a query.

    Output: ``{"query", "chunks": [{"chunk_id", "document_id", "title", "source", "score",
    "text"}, ...]}`` best first, and the same chunks as ``ToolResult.chunks`` for citations.
    Errors: a search the retrieval service refuses (INVALID_ARGUMENT, NOT_FOUND) is an error
    result the model can correct; an unreachable or failing retrieval service is the status
    mapped by ``from_downstream`` (UNAVAILABLE, DEADLINE_EXCEEDED...).
    """

    name = "search_documents"
    description = (
        "Search the knowledge base (the documents ingested into AgentMesh) for passages relevant "
        "to a query. Returns the best-matching chunks, best first, each with a chunk_id, title, "
        "source, relevance score and text. Cite what you use."
    )
    parameters_schema = {
        "type": "object",
        "properties": {
            "query": {
                "type": "string",
                "minLength": 1,
                "maxLength": 8192,
                "description": "What to look for, in natural language.",
            },
            "top_k": {
                "type": "integer",
                "minimum": 1,
                "maximum": 20,
                "default": 5,
                "description": "How many chunks to return.",
            },
        },
        "required": ["query"],
        "additionalProperties": False,
    }
    output_schema = {
        "type": "object",
        "properties": {
            "query": {"type": "string"},
            "chunks": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "chunk_id": {"type": "string"},
                        "document_id": {"type": "string"},
                        "title": {"type": "string"},
                        "source": {"type": "string"},
                        "score": {"type": "number"},
                        "text": {"type": "string"},
                    },
                    "required": ["chunk_id", "document_id", "title", "source", "score", "text"],
                },
            },
        },
        "required": ["query", "chunks"],
    }

    def __init__(self, downstream: Downstream, *, timeout_s: float = 10.0, collection: str = ""):
        self._downstream = downstream
        self._timeout_s = timeout_s
        self._collection = collection

    async def run(self, arguments: dict[str, Any], progress: ProgressCallback) -> ToolOutput:
        query = arguments["query"]
        top_k = int(arguments.get("top_k", 5))
        await progress(f"searching documents for {query[:80]!r}", 0.0)
        request = retrieval_pb2.SearchRequest(collection=self._collection, query=query, top_k=top_k)
        try:
            reply = await self._downstream.retrieval.Search(
                request, metadata=outgoing_metadata(), timeout=downstream_timeout(self._timeout_s, reserve_s=0.05)
            )
        except grpc.aio.AioRpcError as err:
            if err.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND):
                raise ToolError(f"the search was refused: {err.details()}") from err
            raise from_downstream("retrieval", err) from err
        chunks = list(reply.chunks)
        await progress(f"found {len(chunks)} chunk{'s' if len(chunks) != 1 else ''}", 1.0)
        output = {
            "query": query,
            "chunks": [
                {
                    "chunk_id": c.chunk_id,
                    "document_id": c.document_id,
                    "title": c.title,
                    "source": c.source,
                    "score": round(c.score, 4),
                    "text": c.text,
                }
                for c in chunks
            ],
        }
        return ToolOutput(output=output, chunks=chunks)


# -- recall_memory ------------------------------------------------------------------------------

_WORD = re.compile(r"\w+")
#: Words that say nothing about what a message is about (English function words).
_STOPWORDS = frozenset(
    "a an and are as at be but by did do does for from had has have he her his how i in is it its me my "
    "no not of on or our she so that the their them then there these they this to was we were what when "
    "where which who why will with you your".split()
)
_ROLES = {
    common_pb2.ROLE_SYSTEM: "system",
    common_pb2.ROLE_USER: "user",
    common_pb2.ROLE_ASSISTANT: "assistant",
    common_pb2.ROLE_TOOL: "tool",
}


def _terms(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if w not in _STOPWORDS}


class RecallMemory(Tool):
    """Recall earlier messages of the run's session that match a query.

    Source today: the session history, through ``MemoryService.GetContext`` (the most recent
    messages that fit ``token_budget``; 0 = the memory service's default), of the call's session
    and user (``ExecuteToolRequest.session_id`` / ``user_id``), with the caller's tenant and a
    deadline derived from the caller's. Messages are scored by the share of the
    query's words (lower-cased, English stop words left out) they contain; those with a score
    above 0 are returned best first, ties most recent first. Output: ``{"query", "session_id",
    "source": "session_history", "messages": [{"role", "content", "score"}, ...]}``.

    Errors: no session on the call, or a session the memory service refuses (bad id), is an
    error result; an unreachable memory service is UNAVAILABLE (``from_downstream``).
    """

    name = "recall_memory"
    description = (
        "Recall what was said earlier in this conversation: returns earlier messages of the current "
        "session that match the query, best match first. Use it when the user refers to something "
        "said before that is no longer in view."
    )
    parameters_schema = {
        "type": "object",
        "properties": {
            "query": {
                "type": "string",
                "minLength": 1,
                "maxLength": 1000,
                "description": "What to look for, e.g. 'the user's shipping address'.",
            },
            "top_k": {"type": "integer", "minimum": 1, "maximum": 20, "default": 5, "description": "Most messages to return."},
        },
        "required": ["query"],
        "additionalProperties": False,
    }
    output_schema = {
        "type": "object",
        "properties": {
            "query": {"type": "string"},
            "session_id": {"type": "string"},
            "source": {"const": "session_history"},
            "messages": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "role": {"enum": ["system", "user", "assistant", "tool"]},
                        "content": {"type": "string"},
                        "score": {"type": "number", "minimum": 0, "maximum": 1},
                    },
                    "required": ["role", "content", "score"],
                },
            },
        },
        "required": ["query", "session_id", "source", "messages"],
    }

    def __init__(self, downstream: Downstream, *, timeout_s: float = 10.0, token_budget: int = 0):
        self._downstream = downstream
        self._timeout_s = timeout_s
        self._token_budget = token_budget

    async def run(self, arguments: dict[str, Any], progress: ProgressCallback) -> ToolOutput:
        query = arguments["query"]
        top_k = int(arguments.get("top_k", 5))
        call = current_call()
        session_id = call.session_id
        if not session_id:
            raise ToolError("there is no conversation to recall: this call belongs to no session")
        request = memory_pb2.GetContextRequest(
            session_id=session_id, user_id=call.user_id, token_budget=self._token_budget
        )
        try:
            reply = await self._downstream.memory.GetContext(
                request, metadata=outgoing_metadata(), timeout=downstream_timeout(self._timeout_s, reserve_s=0.05)
            )
        except grpc.aio.AioRpcError as err:
            if err.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND):
                raise ToolError(f"the memory service refused the session: {err.details()}") from err
            raise from_downstream("memory", err) from err
        wanted = _terms(query)
        scored = []
        for position, message in enumerate(reply.messages):
            if not message.content or message.role not in _ROLES:
                continue
            score = len(wanted & _terms(message.content)) / len(wanted) if wanted else 0.0
            if score > 0:
                scored.append((score, position, message))
        scored.sort(key=lambda item: (-item[0], -item[1]))
        found = [
            {"role": _ROLES[m.role], "content": m.content, "score": round(score, 4)} for score, _, m in scored[:top_k]
        ]
        await progress(f"recalled {len(found)} of {len(reply.messages)} messages", 1.0)
        return ToolOutput(
            output={"query": query, "session_id": session_id, "source": "session_history", "messages": found}
        )


def builtin_tools(
    downstream: Downstream,
    *,
    search_timeout_s: float = 10.0,
    search_collection: str = "",
    memory_timeout_s: float = 10.0,
    recall_token_budget: int = 0,
) -> list[Tool]:
    """The tools every tool service offers."""
    return [
        Calculator(),
        SearchDocuments(downstream, timeout_s=search_timeout_s, collection=search_collection),
        RecallMemory(downstream, timeout_s=memory_timeout_s, token_budget=recall_token_budget),
    ]
