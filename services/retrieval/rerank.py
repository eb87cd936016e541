"""Rerankers: re-score search candidates against the query with a stronger model.

:class:`Reranker` is the interface. The one implementation, :class:`HttpReranker`, calls a
rerank API in the shape Cohere introduced and most servers copied (``POST`` with
``{"model", "query", "documents": [...], "top_n"}`` → ``{"results": [{"index",
"relevance_score"}, ...]}``): Cohere ``/v2/rerank``, Jina ``/v1/rerank``, vLLM ``/v1/rerank``,
Infinity ``/rerank``. Cross-encoders such as ``BAAI/bge-reranker-base`` served by vLLM or
Infinity are the usual choice. The service has no local reranker: no cross-encoder weights ship
with it, and a stand-in that only reorders by the retrieval score would be a fake.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

import grpc
import httpx2

from agentmesh.services.runtime.errors import ServiceError


class Reranker(abc.ABC):
    """Scores ``(query, text)`` pairs; higher is more relevant."""

    #: Shown in logs and errors.
    name: str

    @abc.abstractmethod
    async def rerank(self, query: str, texts: Sequence[str], timeout_s: float) -> list[float]:
        """One score per text, in the order given. ``timeout_s`` bounds the whole call.
        Raises ``ServiceError`` (UNAVAILABLE, DEADLINE_EXCEEDED or FAILED_PRECONDITION)."""

    async def close(self) -> None:
        """Release connections."""


class HttpReranker(Reranker):
    """A Cohere-compatible rerank endpoint (see the module docstring).

    ``url``: the full endpoint (e.g. ``http://vllm:8000/v1/rerank``); ``model``: sent as
    ``model``; ``api_key``: sent as ``Authorization: Bearer``, when set. Errors: 401/403 and
    400/404/422 answers are FAILED_PRECONDITION (the service's configuration), a timeout is
    DEADLINE_EXCEEDED, anything else (unreachable, 429, 5xx, a malformed answer) UNAVAILABLE.
    """

    def __init__(self, url: str, *, model: str = "", api_key: str = ""):
        self.url = url
        self.model = model
        self.name = f"rerank API at {url}" + (f" (model {model})" if model else "")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx2.AsyncClient(headers=headers)

    async def rerank(self, query: str, texts: Sequence[str], timeout_s: float) -> list[float]:
        if not texts:
            return []
        body = {"query": query, "documents": list(texts), "top_n": len(texts), "return_documents": False}
        if self.model:
            body["model"] = self.model
        try:
            response = await self._client.post(self.url, json=body, timeout=timeout_s)
        except httpx2.TimeoutException as exc:
            raise ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED, f"{self.name} timed out after {timeout_s:.1f} s") from exc
        except httpx2.HTTPError as exc:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, f"{self.name} is unreachable: {exc}") from exc
        if response.status_code != 200:
            code = (grpc.StatusCode.FAILED_PRECONDITION if response.status_code in (400, 401, 403, 404, 422)
                    else grpc.StatusCode.UNAVAILABLE)
            raise ServiceError(code, f"{self.name} answered {response.status_code}: {response.text[:300]}")
        try:
            results = response.json()["results"]
            scores: dict[int, float] = {int(r["index"]): float(r["relevance_score"]) for r in results}
        except (ValueError, KeyError, TypeError) as exc:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, f"{self.name} sent a malformed answer: {exc}") from exc
        if sorted(scores) != list(range(len(texts))):
            raise ServiceError(grpc.StatusCode.UNAVAILABLE,
                               f"{self.name} scored {len(scores)} of {len(texts)} documents")
        return [scores[i] for i in range(len(texts))]

    async def close(self) -> None:
        await self._client.aclose()
