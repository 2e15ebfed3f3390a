"""The state database's tables, and the migrations from older versions.

A new database is created at version 2 and migrated like an old one, so every
table has one definition: the version 2 tables here plus each migration's
changes. Migrations run in order, each in one transaction
(:meth:`crop_clusterd.store.StateStore._check_schema`).
"""

from __future__ import annotations

from typing import Final

SCHEMA_VERSION: Final = 4

# The crops table, written once: the schema creates it, the migration rebuilds it.
_CROPS_TABLE = """
crops (
    seq      INTEGER PRIMARY KEY,
    path     TEXT NOT NULL,
    size     INTEGER,
    mtime_ns INTEGER,
    inode    INTEGER,
    content  TEXT,
    retired  INTEGER NOT NULL DEFAULT 0,
    frame    TEXT,
    crop_index INTEGER,
    time     REAL,
    cx       REAL,
    cy       REAL,
    batch    INTEGER NOT NULL,
    cluster  INTEGER NOT NULL,
    added    REAL NOT NULL,
    vector   BLOB NOT NULL
);
"""

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS {_CROPS_TABLE}CREATE TABLE IF NOT EXISTS merges (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    at           REAL NOT NULL,
    batch        INTEGER NOT NULL,
    from_cluster INTEGER NOT NULL,
    into_cluster INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS skipped (
    path     TEXT PRIMARY KEY,
    reason   TEXT NOT NULL,
    size     INTEGER,
    mtime_ns INTEGER,
    at       REAL NOT NULL,
    inode    INTEGER,
    content  TEXT
);
CREATE TABLE IF NOT EXISTS runtime (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""

# Created after the migrations: on an older database these columns do not exist yet.
# The intake looks committed files up by path, content hash, inode (+ size, mtime)
# and, for schema 1 rows without inode and hash, by size and mtime
# (storedfiles.py): one indexed query each, instead of the whole registry held
# in memory. Partial on live rows: retired ones name content that is gone.
# Content hashes are random keys: in one index over the season each micro-batch's
# commit would dirty a leaf page per crop all over it (in the WAL and again at the
# checkpoint), so a night after a big season wrote 1.4x the bytes per crop of a
# fresh one. Led by the session, a night's inserts stay in its own part of the
# index; a look-up by content then seeks once per session (about 2 us each).
INDEXES = """
CREATE INDEX IF NOT EXISTS crops_added ON crops(added);
CREATE UNIQUE INDEX IF NOT EXISTS crops_live_path ON crops(path) WHERE retired = 0;
CREATE UNIQUE INDEX IF NOT EXISTS crops_session_local ON crops(session, local);
CREATE INDEX IF NOT EXISTS merges_session ON merges(session, id);
DROP INDEX IF EXISTS crops_live_content;
CREATE INDEX IF NOT EXISTS crops_session_content ON crops(session, content) WHERE retired = 0;
CREATE INDEX IF NOT EXISTS crops_live_inode ON crops(inode, size, mtime_ns) WHERE retired = 0;
CREATE INDEX IF NOT EXISTS crops_retired ON crops(session, local) WHERE retired = 1;
CREATE INDEX IF NOT EXISTS crops_live_stat ON crops(size, mtime_ns)
    WHERE retired = 0 AND content IS NULL;
CREATE INDEX IF NOT EXISTS skipped_content ON skipped(content);
CREATE INDEX IF NOT EXISTS skipped_inode ON skipped(inode, size, mtime_ns);
CREATE INDEX IF NOT EXISTS skipped_stat ON skipped(size, mtime_ns) WHERE content IS NULL;
"""

# Version 1 -> 2: crops gain inode, content and retired, and a path is unique only
# among live rows, which needs the table rebuilt (SQLite cannot drop a UNIQUE);
# skipped gains inode and content. Old rows get NULL hashes: a moved old crop is
# then recognised by inode, size and mtime only.
_MIGRATE_1_TO_2 = f"""
ALTER TABLE crops RENAME TO crops_v1;
CREATE TABLE {_CROPS_TABLE}
INSERT INTO crops(seq, path, size, mtime_ns, frame, crop_index, time, cx, cy, batch, cluster,
                  added, vector)
    SELECT seq, path, size, mtime_ns, frame, crop_index, time, cx, cy, batch, cluster,
           added, vector FROM crops_v1;
DROP TABLE crops_v1;
DROP INDEX IF EXISTS crops_added;
ALTER TABLE skipped ADD COLUMN inode INTEGER;
ALTER TABLE skipped ADD COLUMN content TEXT;
UPDATE meta SET value = '2' WHERE key = 'schema';
"""

# Version 2 -> 3: sessions (issue 10). Every row gets a session and crops a number
# within it (``local``); cluster ids and merges are local to their session. A state
# from before sessions is one session, "all", whose local numbers are the global
# ones, so its ids are unchanged. A new database is created at version 2 and
# migrated too: one definition of every table.
_MIGRATE_2_TO_3 = """
ALTER TABLE crops ADD COLUMN session TEXT NOT NULL DEFAULT 'all';
ALTER TABLE crops ADD COLUMN local INTEGER;
UPDATE crops SET local = seq;
ALTER TABLE merges ADD COLUMN session TEXT NOT NULL DEFAULT 'all';
ALTER TABLE skipped ADD COLUMN session TEXT NOT NULL DEFAULT 'all';
CREATE TABLE sessions (
    id              TEXT PRIMARY KEY,
    opened          REAL NOT NULL,
    closed          REAL,
    vectors_dropped INTEGER NOT NULL DEFAULT 0
);
INSERT INTO sessions(id, opened) SELECT 'all', min(added) FROM crops HAVING count(*) > 0;
UPDATE meta SET value = '3' WHERE key = 'schema';
"""

# Version 3 -> 4: each crop's frame size (image_width, image_height of its
# metadata, pixels; issue 11), so a restart's replay or checkpoint sees the move
# limits the linker used. Old rows get NULL: unknown, as they were then (track
# estimates the diagonal from the boxes).
_MIGRATE_3_TO_4 = """
ALTER TABLE crops ADD COLUMN fw REAL;
ALTER TABLE crops ADD COLUMN fh REAL;
UPDATE meta SET value = '4' WHERE key = 'schema';
"""
MIGRATIONS = {"1": _MIGRATE_1_TO_2, "2": _MIGRATE_2_TO_3, "3": _MIGRATE_3_TO_4}
