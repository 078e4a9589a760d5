"""Urza's metadata storage: one contract (`MetadataStore`), SQLite and PostgreSQL backends."""

from __future__ import annotations

from pathlib import Path

from esper.urza.store.base import (
    BlueprintQuery,
    BlueprintRow,
    FieldReportRow,
    KernelEntry,
    KernelQuery,
    KernelRow,
    KernelStats,
    MetadataStore,
    Page,
)


def open_store(database_url: str | None, sqlite_path: Path) -> MetadataStore:
    """PostgreSQL when `database_url` is a postgresql:// URL, else SQLite at `sqlite_path`."""
    if database_url:
        from esper.urza.store.postgres import PostgresStore  # psycopg only when configured

        return PostgresStore(database_url)
    from esper.urza.store.sqlite import SqliteStore

    return SqliteStore(sqlite_path)


__all__ = [
    "BlueprintQuery",
    "BlueprintRow",
    "FieldReportRow",
    "KernelEntry",
    "KernelQuery",
    "KernelRow",
    "KernelStats",
    "MetadataStore",
    "Page",
    "open_store",
]
