"""The daemon's running pipeline, as one record the supervisor passes around.

Stages are threads joined by bounded queues (so a burst of files never holds
more than a few batches of decoded images) and stopped by a sentinel that each
stage passes on after its last item (:mod:`.stage`), like watchdog's emitter
and dispatcher:

    watch -> intake (settle, metadata, decode) -> embed (micro-batches, model)
          -> link (assign, commit to the state store) ; snapshot reads the store
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass

from .config import Config
from .embed_stage import EmbedStage
from .flatbug import TimeFormat
from .intake import IntakeOptions, IntakeStage
from .link_stage import LinkStage
from .notify import WatchdogPinger
from .records import IntakeUnit, MicroBatch
from .snapshot import SnapshotWriter
from .stage import Stop
from .store import StateStore
from .watch import Watcher

# Bounded, so a burst of files never holds more than a few batches of decoded images.
EMBED_INBOX_SIZE = 4
LINK_INBOX_SIZE = 2


@dataclass(frozen=True)
class Pipeline:
    """Everything one run of the daemon started, from start-up to shutdown.

    ``store`` is the link stage's writer connection to the state database,
    ``runtime`` a second connection for the published status figures.
    ``failed`` is set by the embed or link stage when it fails (the intake's
    failure stops the daemon directly). ``crops_at_start`` counts the crops
    restored from the state folder.
    """

    store: StateStore
    runtime: StateStore
    intake: IntakeStage
    embed: EmbedStage
    link: LinkStage
    embed_inbox: queue.Queue[IntakeUnit | Stop]
    link_inbox: queue.Queue[MicroBatch | Stop]
    snapshots: SnapshotWriter
    watcher: Watcher
    pinger: WatchdogPinger
    failed: threading.Event
    crops_at_start: int

    def queue_depth(self) -> int:
        """Files found but not yet committed: the intake's backlog plus both inboxes."""
        return self.intake.backlog() + self.embed_inbox.qsize() + self.link_inbox.qsize()


def intake_options(config: Config) -> IntakeOptions:
    """The intake stage's options from the configuration (milliseconds become seconds)."""
    return IntakeOptions(
        root=config.watch.folder,
        recursive=config.watch.recursive,
        settle_s=config.watch.settle_ms / 1000.0,
        rescan_s=config.watch.rescan_s,
        decode_retries=config.watch.decode_retries,
        retry_backoff_s=config.watch.retry_backoff_s,
        metadata=config.with_metadata,
        metadata_wait_s=config.metadata.wait_s,
        time_format=TimeFormat.compile(config.input.time_format),
        workers=config.input.workers,
        batch_size=config.embed.batch_size,
        background=config.input.background_rgb,
        max_pixels=config.input.max_pixels,
    )
