"""Decode and preprocess crops in worker threads while the model embeds on this one.

Pillow decoding and resizing release the GIL, so a small thread pool keeps the model
fed. Only a bounded window of crops is in flight at any time (inputs can be a night's
million files) and results come back in input order.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from .embed import RGB, Embedder
from .images import DEFAULT_MAX_PIXELS, DecodeError, load_rgb
from .records import Crop, Embedded, Skipped

# Batches' worth of crops decoded ahead of the model; a third batch is being assembled.
_BATCHES_AHEAD = 2


@dataclass(frozen=True)
class Prepared:
    """A decoded crop, preprocessed into the embedder's input tensor (C x H x W)."""

    crop: Crop
    tensor: torch.Tensor


@dataclass(frozen=True)
class EmbedBatch:
    """One model batch worth of results: embedded crops and the ones skipped meanwhile."""

    embedded: tuple[Embedded, ...]
    skipped: tuple[Skipped, ...]


def prepare(
    crop: Crop,
    embedder: Embedder,
    *,
    background: RGB | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Prepared | Skipped:
    """Decode and preprocess one crop; an undecodable file becomes ``Skipped``.

    ``background`` defaults to the embedder's own, so transparency and letterbox
    padding share one colour.
    """
    colour = embedder.options.background if background is None else background
    try:
        image = load_rgb(crop.path, background=colour, max_pixels=max_pixels)
    except DecodeError as exc:
        return Skipped(crop.name, exc.reason)
    return Prepared(crop, embedder.preprocess(image))


def embed_crops(
    crops: Iterable[Crop],
    embedder: Embedder,
    *,
    batch_size: int = 32,
    workers: int = 2,
    background: RGB | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Iterator[EmbedBatch]:
    """Embed ``crops`` in order, decoding in ``workers`` threads, ``batch_size`` at a time.

    A batch is yielded once it has ``batch_size`` prepared crops (or ``batch_size``
    skipped ones, so a run of bad files cannot pile up), and at the end. Undecodable
    files come back as ``Skipped``; any other error propagates. At most about three
    batches of crops are held at once, however long ``crops`` is.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    # Load here so a missing model fails at once, on this thread, not inside a worker.
    embedder.load()
    limit = batch_size * _BATCHES_AHEAD
    source = iter(crops)
    pending: deque[Future[Prepared | Skipped]] = deque()
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="crop-decode")

    def top_up() -> None:
        while len(pending) < limit:
            crop = next(source, None)
            if crop is None:
                return
            pending.append(
                pool.submit(prepare, crop, embedder, background=background, max_pixels=max_pixels)
            )

    prepared: list[Prepared] = []
    skipped: list[Skipped] = []
    try:
        top_up()
        while pending:
            result = pending.popleft().result()
            top_up()
            if isinstance(result, Skipped):
                skipped.append(result)
            else:
                prepared.append(result)
            if len(prepared) >= batch_size or len(skipped) >= batch_size:
                yield _embed_batch(embedder, prepared, skipped)
                prepared, skipped = [], []
        if prepared or skipped:
            yield _embed_batch(embedder, prepared, skipped)
    finally:
        # On an error or an abandoned generator, drop queued work instead of finishing it.
        pool.shutdown(wait=True, cancel_futures=True)


def _embed_batch(
    embedder: Embedder, prepared: list[Prepared], skipped: list[Skipped]
) -> EmbedBatch:
    if not prepared:
        return EmbedBatch(embedded=(), skipped=tuple(skipped))
    vectors = embedder.embed(torch.stack([p.tensor for p in prepared]))
    if vectors.shape[0] != len(prepared):
        raise RuntimeError(
            f"{embedder.name} returned {vectors.shape[0]} vectors for {len(prepared)} crops"
        )
    embedded = tuple(
        Embedded(p.crop, np.array(vectors[i], dtype=np.float32)) for i, p in enumerate(prepared)
    )
    return EmbedBatch(embedded=embedded, skipped=tuple(skipped))
