"""Out-of-memory handling for the model's forward: halve the batch and retry.

A GPU shared with other work, a larger model than the batch size was chosen for,
or fragmentation after hours of running can make one forward run out of device
memory. That must cost throughput, never the daemon: :class:`OomSplitter` embeds
a list of prepared crops through :meth:`Embedder.embed`, and when a forward runs
out of memory it frees the allocator's cache, halves the sub-batch and goes on
from the same crop, down to one crop; a crop that fails alone is given back as a
failure (the callers record it as skipped, like an undecodable file). Each call
that needed a split logs ``embed_oom_split`` once (an *episode*), with the sizes
that ran out.

After an episode the splitter keeps the size that worked as a cap for later
calls, so a GPU under steady pressure does not run out on every micro-batch;
after ``recover_after`` calls in a row without running out the cap doubles, until
it no longer limits anything.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from .embed import Embedder
from .log import get_logger

log = get_logger(__name__)

# Calls in a row without running out of memory before a reduced cap doubles again.
RECOVER_AFTER = 20
# How much of the allocator's message a skip reason keeps (it names sizes and totals).
REASON_CHARS = 200


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is a device out-of-memory error from a forward.

    ``torch.cuda.OutOfMemoryError`` (a ``RuntimeError``), or a ``RuntimeError``
    whose message says "out of memory" (older torch and other backends, e.g.
    "MPS backend out of memory").
    """
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def free_device_cache() -> None:
    """Give the CUDA caching allocator's unused blocks back (no-op without CUDA)."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass(frozen=True)
class SplitResult:
    """What :meth:`OomSplitter.embed` made of n crops.

    ``rows`` are the input positions embedded, in order, and ``vectors`` their
    len(rows) x d float32 unit vectors (row i belongs to input ``rows[i]``);
    ``failed`` holds (input position, reason) for each crop that ran out of
    memory alone; ``ran_out_at`` the sizes of the forwards that ran out, in order.
    """

    rows: tuple[int, ...]
    vectors: npt.NDArray[np.float32]
    failed: tuple[tuple[int, str], ...]
    ran_out_at: tuple[int, ...] = ()


class OomSplitter:
    """Embeds crops through ``embedder``, halving the batch on out-of-memory errors.

    One per stage (it keeps the cap between calls); not thread-safe. Errors other
    than out-of-memory propagate unchanged.
    """

    def __init__(self, embedder: Embedder, *, recover_after: int = RECOVER_AFTER) -> None:
        if recover_after < 1:
            raise ValueError(f"recover_after must be at least 1, got {recover_after}")
        self.embedder = embedder
        self.recover_after = recover_after
        self._cap: int | None = None
        self._calls_ok = 0
        self._largest = 0
        self.episodes = 0

    @property
    def cap(self) -> int | None:
        """The most crops one forward gets now; None: no limit (no recent episode)."""
        return self._cap

    def embed(self, tensors: Sequence[torch.Tensor]) -> SplitResult:
        """Embed n C x H x W tensors in order, in forwards of at most :attr:`cap`."""
        n = len(tensors)
        if n == 0:
            return SplitResult((), np.zeros((0, self.embedder.dim), np.float32), ())
        self._largest = max(self._largest, n)
        batch = torch.stack(list(tensors))
        size = n if self._cap is None else min(self._cap, n)
        parts: list[npt.NDArray[np.float32]] = []
        rows: list[int] = []
        failed: list[tuple[int, str]] = []
        ran_out: list[int] = []
        pos = 0
        while pos < n:
            span = min(size, n - pos)
            vectors, message = self._forward(batch[pos : pos + span])
            if vectors is not None:
                parts.append(vectors)
                rows.extend(range(pos, pos + span))
                pos += span
                continue
            ran_out.append(span)
            if span == 1:
                failed.append((pos, f"out of memory embedding this crop alone: {message}"))
                pos += 1
            else:
                size = span // 2
        self._after_call(n, ran_out, size, len(failed))
        dim = parts[0].shape[1] if parts else self.embedder.dim
        stacked = np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)
        return SplitResult(tuple(rows), stacked, tuple(failed), tuple(ran_out))

    def _forward(self, chunk: torch.Tensor) -> tuple[npt.NDArray[np.float32] | None, str]:
        """The chunk's vectors, or None and the error's first line when it ran out."""
        try:
            return self.embedder.embed(chunk), ""
        except RuntimeError as exc:
            if not is_out_of_memory(exc):
                raise
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        # Outside the except block: the traceback (and the tensors its frames hold)
        # is gone, so the cache can really be emptied.
        free_device_cache()
        return None, message[:REASON_CHARS]

    def _after_call(self, n: int, ran_out: list[int], size: int, skipped: int) -> None:
        if ran_out:
            self.episodes += 1
            self._calls_ok = 0
            self._cap = size
            log.warning(
                "embed_oom_split",
                crops=n,
                ran_out_at=ran_out,
                batch_size=size,
                skipped=skipped,
                episode=self.episodes,
                device=str(self.embedder.device),
            )
            return
        if self._cap is None:
            return
        self._calls_ok += 1
        if self._calls_ok >= self.recover_after:
            self._calls_ok = 0
            # Doubled to the largest call seen, the cap would limit nothing: drop it.
            self._cap = None if self._cap * 2 >= self._largest else self._cap * 2
            log.info("embed_batch_cap_raised", batch_size=self._cap)
