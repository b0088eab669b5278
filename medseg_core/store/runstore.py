"""Embedded SQLite run store: runs, rounds, per-site metrics, rejected
updates and the per-site privacy ledger.

SQLite is the store because a hospital aggregator must run without a database
server, the file is one artefact to back up or audit, and WAL mode gives
crash-safe commits for the round loop. Every write is idempotent on its
natural key (run, round, site, ...) so a resumed run never writes a row twice.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["LedgerRow", "RunStore"]

logger = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id      TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    config_json TEXT NOT NULL,
    versions_json TEXT NOT NULL,
    git_rev     TEXT,
    started_at  REAL NOT NULL,
    finished_at REAL,
    status      TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS rounds (
    run_id      TEXT NOT NULL REFERENCES runs(run_id),
    round       INTEGER NOT NULL,
    started_at  REAL NOT NULL,
    finished_at REAL,
    n_sampled   INTEGER,
    n_accepted  INTEGER,
    n_rejected  INTEGER,
    train_loss  REAL,
    val_dice    REAL,
    epsilon_max REAL,
    PRIMARY KEY (run_id, round)
);
CREATE TABLE IF NOT EXISTS site_metrics (
    run_id      TEXT NOT NULL REFERENCES runs(run_id),
    round       INTEGER NOT NULL,
    site_id     TEXT NOT NULL,
    phase       TEXT NOT NULL,          -- 'train' or 'evaluate'
    split       TEXT NOT NULL,          -- 'train', 'val' or 'test'
    num_examples INTEGER,
    loss        REAL,
    dice        REAL,
    hd95        REAL,
    seconds     REAL,
    PRIMARY KEY (run_id, round, site_id, phase, split)
);
CREATE TABLE IF NOT EXISTS rejected_updates (
    run_id      TEXT NOT NULL REFERENCES runs(run_id),
    round       INTEGER NOT NULL,
    site_id     TEXT NOT NULL,
    node_id     TEXT,               -- Flower node ids are uint64
    kind        TEXT NOT NULL,          -- 'validation' or 'error-reply'
    reason      TEXT NOT NULL,
    PRIMARY KEY (run_id, round, site_id, kind)
);
CREATE TABLE IF NOT EXISTS privacy_ledger (
    run_id      TEXT NOT NULL REFERENCES runs(run_id),
    site_id     TEXT NOT NULL,
    round       INTEGER NOT NULL,
    noise_multiplier REAL NOT NULL,
    max_grad_norm REAL NOT NULL,
    sample_rate REAL NOT NULL,
    steps       INTEGER NOT NULL,
    epsilon     REAL NOT NULL,
    delta       REAL NOT NULL,
    accountant  TEXT NOT NULL,
    PRIMARY KEY (run_id, site_id, round)
);
"""


@dataclass(frozen=True)
class LedgerRow:
    """One site's privacy spend for one round (epsilon is cumulative)."""

    site_id: str
    round: int
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps: int
    epsilon: float
    delta: float
    accountant: str


class RunStore:
    """Thin, idempotent writer/reader over one SQLite file.

    Parameters
    ----------
    path
        Database file; created with its schema if absent.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.executescript(_SCHEMA)

    def close(self) -> None:
        """Close the connection."""
        self._conn.close()

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield self._conn
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    # ----------------------------------------------------------------- writes
    def start_run(
        self,
        run_id: str,
        *,
        name: str,
        config: Mapping[str, Any],
        versions: Mapping[str, str],
        git_rev: str | None,
    ) -> bool:
        """Register a run; returns False if it already existed (a resume)."""
        with self._tx() as c:
            existed = c.execute("SELECT 1 FROM runs WHERE run_id=?", (run_id,)).fetchone()
            c.execute(
                "INSERT INTO runs(run_id, name, config_json, versions_json, git_rev,"
                " started_at, status) VALUES (?,?,?,?,?,?, 'running')"
                " ON CONFLICT(run_id) DO UPDATE SET status='running', finished_at=NULL",
                (run_id, name, json.dumps(config, default=str), json.dumps(versions),
                 git_rev, time.time()),
            )
        return existed is None

    def finish_run(self, run_id: str, status: str = "completed") -> None:
        """Mark a run finished with ``status``."""
        with self._tx() as c:
            c.execute(
                "UPDATE runs SET finished_at=?, status=? WHERE run_id=?",
                (time.time(), status, run_id),
            )

    def start_round(self, run_id: str, rnd: int) -> None:
        """Record that round ``rnd`` began (idempotent)."""
        with self._tx() as c:
            c.execute(
                "INSERT INTO rounds(run_id, round, started_at) VALUES (?,?,?)"
                " ON CONFLICT(run_id, round) DO UPDATE SET started_at=excluded.started_at,"
                " finished_at=NULL",
                (run_id, rnd, time.time()),
            )

    def finish_round(
        self,
        run_id: str,
        rnd: int,
        *,
        n_sampled: int,
        n_accepted: int,
        n_rejected: int,
        train_loss: float | None,
        val_dice: float | None,
        epsilon_max: float | None,
    ) -> None:
        """Record a completed round's summary."""
        with self._tx() as c:
            c.execute(
                "UPDATE rounds SET finished_at=?, n_sampled=?, n_accepted=?, n_rejected=?,"
                " train_loss=?, val_dice=?, epsilon_max=? WHERE run_id=? AND round=?",
                (time.time(), n_sampled, n_accepted, n_rejected, train_loss, val_dice,
                 epsilon_max, run_id, rnd),
            )

    def add_site_metrics(
        self,
        run_id: str,
        rnd: int,
        site_id: str,
        *,
        phase: str,
        split: str,
        num_examples: int | None = None,
        loss: float | None = None,
        dice: float | None = None,
        hd95: float | None = None,
        seconds: float | None = None,
    ) -> None:
        """Upsert one site's metrics for a round and phase."""
        with self._tx() as c:
            c.execute(
                "INSERT OR REPLACE INTO site_metrics VALUES (?,?,?,?,?,?,?,?,?,?)",
                (run_id, rnd, site_id, phase, split, num_examples, loss, dice, hd95, seconds),
            )

    def add_rejection(
        self, run_id: str, rnd: int, site_id: str, *, node_id: int | None, kind: str, reason: str
    ) -> None:
        """Log an update rejected by validation or an error reply from a site."""
        with self._tx() as c:
            c.execute(
                "INSERT OR REPLACE INTO rejected_updates VALUES (?,?,?,?,?,?)",
                (run_id, rnd, site_id, None if node_id is None else str(node_id), kind, reason),
            )

    def add_ledger(self, run_id: str, row: LedgerRow) -> bool:
        """Append a privacy-ledger row; returns False if (run, site, round) exists.

        WARNING: the ledger is append-only. A row is never overwritten: a
        replayed round after a crash keeps the first record.
        """
        with self._tx() as c:
            cur = c.execute(
                "INSERT INTO privacy_ledger VALUES (?,?,?,?,?,?,?,?,?,?)"
                " ON CONFLICT(run_id, site_id, round) DO NOTHING",
                (run_id, row.site_id, row.round, row.noise_multiplier, row.max_grad_norm,
                 row.sample_rate, row.steps, row.epsilon, row.delta, row.accountant),
            )
            return cur.rowcount == 1

    # ------------------------------------------------------------------ reads
    def run(self, run_id: str) -> dict[str, Any] | None:
        """The run's row as a dict, or None."""
        row = self._conn.execute("SELECT * FROM runs WHERE run_id=?", (run_id,)).fetchone()
        return dict(row) if row else None

    def rounds(self, run_id: str) -> list[dict[str, Any]]:
        """All rounds of a run, in order."""
        rows = self._conn.execute(
            "SELECT * FROM rounds WHERE run_id=? ORDER BY round", (run_id,)
        ).fetchall()
        return [dict(r) for r in rows]

    def last_completed_round(self, run_id: str) -> int:
        """Highest round with ``finished_at`` set (0 if none)."""
        row = self._conn.execute(
            "SELECT MAX(round) FROM rounds WHERE run_id=? AND finished_at IS NOT NULL",
            (run_id,),
        ).fetchone()
        return int(row[0] or 0)

    def site_metrics(self, run_id: str, *, phase: str | None = None) -> list[dict[str, Any]]:
        """Per-site metric rows, optionally for one phase."""
        q = "SELECT * FROM site_metrics WHERE run_id=?"
        args: tuple[Any, ...] = (run_id,)
        if phase:
            q += " AND phase=?"
            args += (phase,)
        return [dict(r) for r in self._conn.execute(q + " ORDER BY round, site_id", args)]

    def rejections(self, run_id: str) -> list[dict[str, Any]]:
        """Rejected updates and error replies of a run."""
        rows = self._conn.execute(
            "SELECT * FROM rejected_updates WHERE run_id=? ORDER BY round, site_id", (run_id,)
        ).fetchall()
        return [dict(r) for r in rows]

    def ledger(self, run_id: str, site_id: str | None = None) -> list[LedgerRow]:
        """Privacy ledger rows, ordered by site then round."""
        q = "SELECT * FROM privacy_ledger WHERE run_id=?"
        args: tuple[Any, ...] = (run_id,)
        if site_id is not None:
            q += " AND site_id=?"
            args += (site_id,)
        rows = self._conn.execute(q + " ORDER BY site_id, round", args).fetchall()
        return [
            LedgerRow(
                site_id=r["site_id"], round=r["round"], noise_multiplier=r["noise_multiplier"],
                max_grad_norm=r["max_grad_norm"], sample_rate=r["sample_rate"],
                steps=r["steps"], epsilon=r["epsilon"], delta=r["delta"],
                accountant=r["accountant"],
            )
            for r in rows
        ]

    def max_epsilon(self, run_id: str) -> dict[str, float]:
        """Per-site run-level epsilon: the MAX over that site's ledger rows.

        WARNING: never an average. A site's epsilon is what its accountant
        reported last (it only grows); max guards against out-of-order rows.
        """
        rows = self._conn.execute(
            "SELECT site_id, MAX(epsilon) FROM privacy_ledger WHERE run_id=? GROUP BY site_id",
            (run_id,),
        ).fetchall()
        return {r[0]: float(r[1]) for r in rows}
