"""The tokenizer GetContext counts with, from the request's ``model`` (``GetContextRequest.model``).

- empty: the service's configured tokenizer (``AGENTMESH_MEMORY_TOKENIZER``), the one of the
  stored counts;
- a tokenizer name: ``o200k_base``, ``cl100k_base`` or ``wordpiece``; any other name shaped like
  an encoding (``p50k_base``, ``foo_base``) is INVALID_ARGUMENT;
- an alias of the LLM router (its ``ListModels``): counted as the router counts the alias's first
  deployment (services/llm/counting.py): an ``openai`` or ``azure`` deployment with the tiktoken
  encoding of its upstream model (approximate when tiktoken does not know that model: then
  ``o200k_base``), any other provider with ``wordpiece``, approximate;
- any other name: :func:`agentmesh.services.runtime.tokens.tokenizer_for` — an OpenAI model
  tiktoken knows gets its encoding (``gpt-4o`` → ``o200k_base``, exact), anything else
  ``wordpiece``, approximate.

The router's aliases are read through :class:`~agentmesh.services.memory.router.RouterClient`.
Only the first read with a model waits for them (at most ``lookup_timeout_s``); the table is then
refreshed in the background every ``refresh_s`` (``retry_s`` while the router has never answered),
and while the router cannot be reached the last table is used — or none: names are then resolved
without aliases. A tiktoken encoding is loaded in a worker thread the first time it is needed
(about 0.2 s and 90 MB of memory per encoding), never on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from agentmesh.llm.v1 import llm_pb2
from agentmesh.services.memory.router import RouterClient
from agentmesh.services.runtime.errors import invalid_argument
from agentmesh.services.runtime.tokens import (
    TIKTOKEN_URLS,
    TOKENIZERS,
    WORDPIECE,
    CounterChoice,
    TokenCounter,
    default_token_counter,
    encoding_for_model,
    tiktoken_counter,
    tokenizer_for,
)

log = logging.getLogger("agentmesh.memory")

#: Longest ``model`` a request may name.
MAX_MODEL_CHARS = 256
#: Router providers counted with tiktoken (the router's own rule, services/llm/counting.py).
OPENAI_PROVIDERS = frozenset({"openai", "azure"})


def alias_tokenizers(reply: llm_pb2.ListModelsResponse) -> dict[str, tuple[str, bool]]:
    """(tokenizer, approximate) of every router alias, from its first deployment."""
    table: dict[str, tuple[str, bool]] = {}
    for model in reply.models:
        first = model.deployments[0] if model.deployments else None
        if first is not None and first.provider in OPENAI_PROVIDERS:
            encoding, known = encoding_for_model(first.upstream_model)
            table[model.name] = (encoding, not known) if encoding in TIKTOKEN_URLS else (WORDPIECE, True)
        else:
            table[model.name] = (WORDPIECE, True)
    return table


class ModelTokenizers:
    """Resolves a request's ``model`` to a :class:`CounterChoice` (see the module docstring).

    ``default``: the configured tokenizer (empty ``model``); ``router``: the router client (None =
    no aliases); ``tiktoken_dir``: a folder of ``*.tiktoken`` files (may be empty)."""

    def __init__(
        self, default: CounterChoice, router: RouterClient | None, *, tiktoken_dir: str = "",
        lookup_timeout_s: float = 1.0, refresh_s: float = 30.0, retry_s: float = 5.0,
    ):
        self.default = default
        self.router = router
        self.tiktoken_dir = tiktoken_dir
        self.lookup_timeout_s = lookup_timeout_s
        self.refresh_s = refresh_s
        self.retry_s = retry_s
        self._aliases: dict[str, tuple[str, bool]] | None = None
        self._first: asyncio.Task | None = None
        self._task: asyncio.Task | None = None
        self._attempted_at = 0.0
        self._counters: dict[str, TokenCounter | None] = {default.tokenizer: default.counter}
        self._loading = asyncio.Lock()

    async def resolve(self, model: str) -> CounterChoice:
        """The counter for ``model``. INVALID_ARGUMENT for a name longer than
        :data:`MAX_MODEL_CHARS`, with control characters, or shaped like an unknown encoding."""
        if not model:
            return self.default
        if len(model) > MAX_MODEL_CHARS or not model.isprintable():
            raise invalid_argument(
                f"model must be at most {MAX_MODEL_CHARS} printable characters: a router alias, a model name or one "
                f"of {', '.join(TOKENIZERS)}"
            )
        try:
            direct = tokenizer_for(model)
        except ValueError as exc:
            raise invalid_argument(f"model {model!r}: {exc}") from exc
        alias = None if model in TOKENIZERS else await self._alias(model)
        name, approximate = alias or direct
        counter = await self._counter(name)
        if counter is None:  # the encoding file is available from no source (logged when tried)
            return CounterChoice(default_token_counter(), True)
        return CounterChoice(counter, approximate)

    async def close(self) -> None:
        """Stop a refresh in flight."""
        for task in (self._first, self._task):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    async def _counter(self, name: str) -> TokenCounter | None:
        if name in self._counters:
            return self._counters[name]
        if name == WORDPIECE:
            return default_token_counter()
        async with self._loading:
            if name not in self._counters:
                self._counters[name] = await asyncio.to_thread(tiktoken_counter, name, self.tiktoken_dir)
        return self._counters[name]

    async def _alias(self, model: str) -> tuple[str, bool] | None:
        if self.router is None:
            return None
        if self._first is None:
            self._first = self._task = asyncio.create_task(self._fetch(), name="memory-router-aliases")
        if not self._first.done():
            # Only until the router first answers (or the first attempt ends): a bounded wait.
            await asyncio.wait({self._first}, timeout=self.lookup_timeout_s)
        elif self._task is not None and self._task.done():
            interval = self.refresh_s if self._aliases is not None else self.retry_s
            if time.monotonic() - self._attempted_at > interval:
                self._task = asyncio.create_task(self._fetch(), name="memory-router-aliases")
        return self._aliases.get(model) if self._aliases is not None else None

    async def _fetch(self) -> None:
        self._attempted_at = time.monotonic()
        try:
            self._aliases = alias_tokenizers(await self.router.models())
        except Exception as exc:  # noqa: BLE001 - names resolve without aliases meanwhile
            log.warning("router aliases unavailable for token counting: %s", exc)
