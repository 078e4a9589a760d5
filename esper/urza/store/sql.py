"""The SQL both backends share; each backend supplies connections, locking and dialect."""

from __future__ import annotations

import logging
import time
from abc import abstractmethod
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

from esper.errors import ConfigError, NotFoundError
from esper.urza.store.base import (
    FATE_FOSSILIZED,
    FATE_PRUNED,
    FATE_ROLLED_BACK,
    BlueprintQuery,
    BlueprintRow,
    FieldReportRow,
    KernelEntry,
    KernelQuery,
    KernelRow,
    KernelStats,
    MetadataStore,
    Page,
    next_token,
    page_bounds,
)
from esper.urza.store.migrations import (
    LATEST_VERSION,
    MIGRATIONS,
    SCHEMA_VERSION_TABLE,
    Migration,
    render,
)

log = logging.getLogger(__name__)


class Tx(Protocol):
    """One open transaction: `?` placeholders, rows as tuples."""

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run a statement; returns the number of rows it changed."""

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run a query; returns every row."""


_KERNEL_COLS = (
    "k.kernel_id, k.blueprint_id, k.site_key, k.parameters, k.artifact_sha256, "
    "k.artifact_size, k.manifest, k.created_at, "
    "COALESCE(s.outcomes, 0), COALESCE(s.fossilized, 0), COALESCE(s.pruned, 0), "
    "COALESCE(s.rolled_back, 0), COALESCE(s.sum_contribution, 0), "
    "COALESCE(s.sum_accuracy_delta, 0)"
)


class SqlStore(MetadataStore):
    dialect: str

    @abstractmethod
    def _tx(self, *, write: bool) -> AbstractContextManager[Tx]:
        """A transaction; write transactions are serialised against each other."""

    @abstractmethod
    def _migration_lock(self, tx: Tx) -> None:
        """Take the lock that keeps two openers from migrating at once (inside `tx`)."""

    # -- migrations -------------------------------------------------------------

    def _migrate(self, upto: int = LATEST_VERSION) -> None:
        with self._tx(write=True) as tx:
            self._migration_lock(tx)
            tx.execute(render(SCHEMA_VERSION_TABLE, self.dialect))
            current = tx.query("SELECT COALESCE(MAX(version), 0) FROM schema_version")[0][0]
            if current > LATEST_VERSION:
                raise ConfigError(
                    f"the Urza database is at schema version {current}, newer than this "
                    f"Esper knows ({LATEST_VERSION}); upgrade Esper before opening it"
                )
            pending: list[Migration] = [m for m in MIGRATIONS if current < m.version <= upto]
            for m in pending:
                for statement in m.statements:
                    tx.execute(render(statement, self.dialect))
                tx.execute(
                    "INSERT INTO schema_version (version, description, applied_at) "
                    "VALUES (?, ?, ?)",
                    (m.version, m.description, time.time()),
                )
                log.info("urza %s schema: applied migration %d (%s)", self.backend,
                         m.version, m.description)

    def schema_version(self) -> int:
        with self._tx(write=False) as tx:
            return int(tx.query("SELECT COALESCE(MAX(version), 0) FROM schema_version")[0][0])

    # -- blueprints ---------------------------------------------------------------

    def put_blueprint(self, row: BlueprintRow) -> bool:
        with self._tx(write=True) as tx:
            created = tx.execute(
                "INSERT INTO blueprints (blueprint_id, name, family, data, created_at) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (blueprint_id) DO NOTHING",
                (row.blueprint_id, row.name, row.family, row.data, row.created_at),
            )
            if not created:
                return False
            for tag in dict.fromkeys(row.tags):
                tx.execute("INSERT INTO blueprint_tags (blueprint_id, tag) VALUES (?, ?)",
                           (row.blueprint_id, tag))
            for layout in dict.fromkeys(row.layouts):
                tx.execute("INSERT INTO blueprint_layouts (blueprint_id, layout) VALUES (?, ?)",
                           (row.blueprint_id, int(layout)))
            return True

    def get_blueprint(self, blueprint_id: str) -> BlueprintRow:
        with self._tx(write=False) as tx:
            rows = self._blueprint_rows(
                tx, "SELECT blueprint_id, name, family, data, created_at FROM blueprints "
                "WHERE blueprint_id = ?", (blueprint_id,))
        if not rows:
            raise NotFoundError(f"no blueprint with id {blueprint_id!r} in Urza")
        return rows[0]

    def list_blueprints(self, query: BlueprintQuery) -> Page[BlueprintRow]:
        offset, limit = page_bounds(query)
        where, params = ["1 = 1"], []
        if query.family:
            where.append("b.family = ?")
            params.append(query.family)
        if query.layout:
            where.append("EXISTS (SELECT 1 FROM blueprint_layouts l WHERE "
                         "l.blueprint_id = b.blueprint_id AND l.layout = ?)")
            params.append(int(query.layout))
        if query.tags:
            where.append(_has_all_tags("blueprint_tags", "b.blueprint_id", "blueprint_id",
                                       len(set(query.tags))))
            params.extend(sorted(set(query.tags)))
        sql = (
            "SELECT b.blueprint_id, b.name, b.family, b.data, b.created_at FROM blueprints b "
            f"WHERE {' AND '.join(where)} ORDER BY b.blueprint_id LIMIT ? OFFSET ?"
        )
        with self._tx(write=False) as tx:
            rows = self._blueprint_rows(tx, sql, (*params, limit + 1, offset))
        return Page(items=rows[:limit], next_page_token=next_token(query, offset, limit, len(rows)))

    def _blueprint_rows(self, tx: Tx, sql: str, params: Sequence[Any]) -> list[BlueprintRow]:
        base = tx.query(sql, params)
        if not base:
            return []
        ids = [r[0] for r in base]
        marks = ", ".join("?" * len(ids))
        tags: dict[str, list[str]] = {i: [] for i in ids}
        for bid, tag in tx.query(
            f"SELECT blueprint_id, tag FROM blueprint_tags WHERE blueprint_id IN ({marks}) "
            "ORDER BY blueprint_id, tag", ids):
            tags[bid].append(tag)
        layouts: dict[str, list[int]] = {i: [] for i in ids}
        for bid, layout in tx.query(
            f"SELECT blueprint_id, layout FROM blueprint_layouts WHERE blueprint_id IN ({marks}) "
            "ORDER BY blueprint_id, layout", ids):
            layouts[bid].append(int(layout))
        return [
            BlueprintRow(blueprint_id=bid, name=name, family=family, data=bytes(data),
                         created_at=float(created), tags=tuple(tags[bid]),
                         layouts=tuple(layouts[bid]))
            for bid, name, family, data, created in base
        ]

    # -- kernels -------------------------------------------------------------------

    def put_kernel(self, row: KernelRow) -> bool:
        with self._tx(write=True) as tx:
            created = tx.execute(
                "INSERT INTO kernels (kernel_id, blueprint_id, site_key, parameters, "
                "artifact_sha256, artifact_size, manifest, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (kernel_id) DO NOTHING",
                (row.kernel_id, row.blueprint_id, row.site_key, int(row.parameters),
                 row.artifact_sha256, int(row.artifact_size), row.manifest, row.created_at),
            )
            if not created:
                return False
            for tag in dict.fromkeys(row.tags):
                tx.execute("INSERT INTO kernel_tags (kernel_id, tag) VALUES (?, ?)",
                           (row.kernel_id, tag))
            return True

    def get_kernel(self, kernel_id: str) -> KernelEntry:
        with self._tx(write=False) as tx:
            entries = self._kernel_entries(
                tx, f"SELECT {_KERNEL_COLS} FROM kernels k LEFT JOIN kernel_stats s "
                "ON s.kernel_id = k.kernel_id WHERE k.kernel_id = ?", (kernel_id,))
        if not entries:
            raise NotFoundError(f"no kernel with id {kernel_id!r} in Urza")
        return entries[0]

    def query_kernels(self, query: KernelQuery) -> Page[KernelEntry]:
        offset, limit = page_bounds(query)
        where, params = ["1 = 1"], []
        if query.blueprint_id:
            where.append("k.blueprint_id = ?")
            params.append(query.blueprint_id)
        if query.site_key:
            where.append("k.site_key = ?")
            params.append(query.site_key)
        if query.max_parameters:
            where.append("k.parameters <= ?")
            params.append(int(query.max_parameters))
        if query.tags:
            where.append(_has_all_tags("kernel_tags", "k.kernel_id", "kernel_id",
                                       len(set(query.tags))))
            params.extend(sorted(set(query.tags)))
        real = "DOUBLE PRECISION" if self.dialect == "postgres" else "REAL"
        outcomes = "COALESCE(s.outcomes, 0)"
        score = {
            "mean_contribution":
                f"CASE WHEN {outcomes} > 0 THEN s.sum_contribution / s.outcomes ELSE 0.0 END",
            "fossilized_rate":
                f"CASE WHEN {outcomes} > 0 THEN CAST(s.fossilized AS {real}) / s.outcomes "
                "ELSE 0.0 END",
            "outcomes": outcomes,
            "created": "k.created_at",
        }[query.order_by]
        sql = (
            f"SELECT {_KERNEL_COLS} FROM kernels k LEFT JOIN kernel_stats s "
            f"ON s.kernel_id = k.kernel_id WHERE {' AND '.join(where)} "
            f"ORDER BY {score} DESC, {outcomes} DESC, k.kernel_id ASC LIMIT ? OFFSET ?"
        )
        with self._tx(write=False) as tx:
            entries = self._kernel_entries(tx, sql, (*params, limit + 1, offset))
        return Page(items=entries[:limit],
                    next_page_token=next_token(query, offset, limit, len(entries)))

    def kernel_ids(self) -> list[str]:
        with self._tx(write=False) as tx:
            return [r[0] for r in tx.query("SELECT kernel_id FROM kernels ORDER BY kernel_id")]

    def _kernel_entries(self, tx: Tx, sql: str, params: Sequence[Any]) -> list[KernelEntry]:
        base = tx.query(sql, params)
        if not base:
            return []
        ids = [r[0] for r in base]
        tags: dict[str, list[str]] = {i: [] for i in ids}
        marks = ", ".join("?" * len(ids))
        for kid, tag in tx.query(
            f"SELECT kernel_id, tag FROM kernel_tags WHERE kernel_id IN ({marks}) "
            "ORDER BY kernel_id, tag", ids):
            tags[kid].append(tag)
        out = []
        for r in base:
            row = KernelRow(kernel_id=r[0], blueprint_id=r[1], site_key=r[2],
                            parameters=int(r[3]), artifact_sha256=r[4], artifact_size=int(r[5]),
                            manifest=bytes(r[6]), created_at=float(r[7]), tags=tuple(tags[r[0]]))
            stats = KernelStats(outcomes=int(r[8]), fossilized=int(r[9]), pruned=int(r[10]),
                                rolled_back=int(r[11]), sum_contribution=float(r[12]),
                                sum_accuracy_delta=float(r[13]))
            out.append(KernelEntry(row=row, stats=stats))
        return out

    # -- field reports -------------------------------------------------------------

    def record_outcome(self, report: FieldReportRow) -> bool:
        with self._tx(write=True) as tx:
            if not tx.query("SELECT 1 FROM kernels WHERE kernel_id = ?", (report.kernel_id,)):
                raise NotFoundError(
                    f"report.kernel_id={report.kernel_id!r}: no such kernel in Urza; "
                    "record outcomes only for kernels fetched from it"
                )
            created = tx.execute(
                "INSERT INTO field_reports (request_id, kernel_id, run_id, slot_id, task, "
                "contribution, accuracy_delta, fate, germinated_epoch, ended_epoch, parameters, "
                "rejected_by_gate, rolled_back, recorded_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (request_id) DO NOTHING",
                (report.request_id, report.kernel_id, report.run_id, report.slot_id,
                 report.task, float(report.contribution), float(report.accuracy_delta),
                 int(report.fate), int(report.germinated_epoch), int(report.ended_epoch),
                 int(report.parameters), int(report.rejected_by_gate),
                 int(report.rolled_back), float(report.recorded_at)),
            )
            if not created:
                return False
            # Aggregates are updated in the same transaction as the report, so stats
            # always equal the reports they summarise, even with concurrent writers.
            tx.execute(
                "INSERT INTO kernel_stats (kernel_id, outcomes, fossilized, pruned, rolled_back, "
                "sum_contribution, sum_accuracy_delta) VALUES (?, 1, ?, ?, ?, ?, ?) "
                "ON CONFLICT (kernel_id) DO UPDATE SET "
                "outcomes = kernel_stats.outcomes + 1, "
                "fossilized = kernel_stats.fossilized + excluded.fossilized, "
                "pruned = kernel_stats.pruned + excluded.pruned, "
                "rolled_back = kernel_stats.rolled_back + excluded.rolled_back, "
                "sum_contribution = kernel_stats.sum_contribution + excluded.sum_contribution, "
                "sum_accuracy_delta = kernel_stats.sum_accuracy_delta + "
                "excluded.sum_accuracy_delta",
                (report.kernel_id, int(report.fate == FATE_FOSSILIZED),
                 int(report.fate == FATE_PRUNED),
                 int(report.fate == FATE_ROLLED_BACK or report.rolled_back),
                 float(report.contribution), float(report.accuracy_delta)),
            )
            return True

    def field_reports(self, kernel_id: str) -> list[FieldReportRow]:
        with self._tx(write=False) as tx:
            rows = tx.query(
                "SELECT request_id, kernel_id, run_id, slot_id, task, contribution, "
                "accuracy_delta, fate, germinated_epoch, ended_epoch, parameters, "
                "rejected_by_gate, rolled_back, recorded_at FROM field_reports "
                "WHERE kernel_id = ? ORDER BY recorded_at, request_id", (kernel_id,))
        return [
            FieldReportRow(request_id=r[0], kernel_id=r[1], run_id=r[2], slot_id=r[3], task=r[4],
                           contribution=float(r[5]), accuracy_delta=float(r[6]), fate=int(r[7]),
                           germinated_epoch=int(r[8]), ended_epoch=int(r[9]),
                           parameters=int(r[10]), rejected_by_gate=bool(r[11]),
                           rolled_back=bool(r[12]), recorded_at=float(r[13]))
            for r in rows
        ]


def _has_all_tags(table: str, outer_id: str, id_col: str, n: int) -> str:
    marks = ", ".join("?" * n)
    return (f"{outer_id} IN (SELECT {id_col} FROM {table} WHERE tag IN ({marks}) "
            f"GROUP BY {id_col} HAVING COUNT(DISTINCT tag) = {n})")

