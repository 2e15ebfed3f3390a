"""The crop decoder: decode and preprocess crops in worker threads while the model
embeds on the calling one.

Pillow decoding and resizing release the GIL, so a small thread pool keeps the model
fed. Only a bounded window of crops is in flight at any time (inputs can be a night's
million files) and results come back in input order. The batch command embeds with
:func:`embed_crops`; the daemon's intake stage decodes with :func:`prepare`.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Generator, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .embed import RGB, Embedder
from .images import DEFAULT_MAX_PIXELS, DecodeError, load_rgb
from .oomsplit import OomSplitter
from .records import Crop, EmbedBatch, Embedded, Prepared, Skipped

# Batches' worth of crops decoded ahead of the model; a third batch is being assembled.
BATCHES_AHEAD = 2


def record_name(path: Path) -> str:
    """The name a file is known, stored and reported under: its path as text.

    Linux file names are bytes; one that is not valid UTF-8 would decode to lone
    surrogates, which SQLite, JSON logs and UTF-8 CSV readers all reject. Such
    bytes are written as ``\\xNN`` escapes instead (``crop_\\xff.png``), so the
    crop is still clustered and the same file always gets the same name.
    """
    text = str(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return os.fsencode(text).decode("utf-8", "backslashreplace")
    return text


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
) -> Generator[EmbedBatch, None, None]:
    """Embed ``crops`` in order, decoding in ``workers`` threads, ``batch_size`` at a time.

    A batch is yielded once it has ``batch_size`` prepared crops (or ``batch_size``
    skipped ones, so a run of bad files cannot pile up), and at the end. Undecodable
    files come back as ``Skipped``, and so does a crop on which the model runs out
    of memory alone (a batch that runs out is halved and retried, see
    :class:`~crop_clusterd.oomsplit.OomSplitter`); any other error propagates. At most about three
    batches of crops are held at once, however long ``crops`` is.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    # Load here so a missing model fails at once, on this thread, not inside a worker.
    embedder.load()
    splitter = OomSplitter(embedder)
    limit = batch_size * BATCHES_AHEAD
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
                yield _embed_batch(splitter, prepared, skipped)
                prepared, skipped = [], []
        if prepared or skipped:
            yield _embed_batch(splitter, prepared, skipped)
    finally:
        # On an error or an abandoned generator, drop queued work instead of finishing it.
        pool.shutdown(wait=True, cancel_futures=True)


def _embed_batch(
    splitter: OomSplitter, prepared: list[Prepared], skipped: list[Skipped]
) -> EmbedBatch:
    if not prepared:
        return EmbedBatch(embedded=(), skipped=tuple(skipped))
    result = splitter.embed([p.tensor for p in prepared])
    embedded = tuple(
        Embedded(prepared[row].crop, np.array(vector, dtype=np.float32))
        for row, vector in zip(result.rows, result.vectors, strict=True)
    )
    failed = tuple(Skipped(prepared[row].crop.name, reason) for row, reason in result.failed)
    return EmbedBatch(embedded=embedded, skipped=(*skipped, *failed))
