"""Embedded run store (SQLite) and privacy ledger."""

from medseg_core.store.runstore import LedgerRow, RunStore

__all__ = ["LedgerRow", "RunStore"]
