"""The SQL both backends share; each backend supplies connections, locking and dialect."""

from __future__ import annotations

import logging
import time
from abc import abstractmethod
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

from esper.errors import ConfigError, InvalidArgumentError, NotFoundError
from esper.urza.store.base import (
    FATE_FOSSILIZED,
    FATE_PRUNED,
    FATE_ROLLED_BACK,
    SCORE_CLIP,
    SCORE_PRIOR_OUTCOMES,
    BlueprintQuery,
    BlueprintRow,
    FieldReportRow,
    KernelEntry,
    KernelQuery,
    KernelRow,
    KernelStats,
    MetadataStore,
    Page,
    clip,
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
    "k.artifact_size, k.manifest, k.created_at, k.key_id, "
    "COALESCE(s.outcomes, 0), COALESCE(s.fossilized, 0), COALESCE(s.pruned, 0), "
    "COALESCE(s.rolled_back, 0), COALESCE(s.sum_contribution, 0), "
    "COALESCE(s.sum_accuracy_delta, 0), COALESCE(s.clipped_contribution, 0), "
    "COALESCE(s.clipped_accuracy_delta, 0)"
)
_BLUEPRINT_COLS = "b.blueprint_id, b.name, b.family, b.data, b.created_at, b.retired_at, " \
    "b.retired_reason"
_RETIRED_BLUEPRINT = ("EXISTS (SELECT 1 FROM blueprints rb WHERE rb.blueprint_id = "
                      "k.blueprint_id AND rb.retired_at IS NOT NULL)")


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
                tx, f"SELECT {_BLUEPRINT_COLS} FROM blueprints b WHERE b.blueprint_id = ?",
                (blueprint_id,))
        if not rows:
            raise NotFoundError(f"no blueprint with id {blueprint_id!r} in Urza")
        return rows[0]

    def retire_blueprint(self, blueprint_id: str, *, retired: bool, reason: str = "",
                         at: float | None = None) -> bool:
        with self._tx(write=True) as tx:
            rows = tx.query("SELECT retired_at FROM blueprints WHERE blueprint_id = ?",
                            (blueprint_id,))
            if not rows:
                raise NotFoundError(f"no blueprint with id {blueprint_id!r} in Urza")
            if (rows[0][0] is not None) == retired:
                return False
            tx.execute("UPDATE blueprints SET retired_at = ?, retired_reason = ? "
                       "WHERE blueprint_id = ?",
                       (float(at if at is not None else time.time()) if retired else None,
                        reason if retired else "", blueprint_id))
            return True

    def delete_blueprint(self, blueprint_id: str) -> tuple[bool, int, int]:
        with self._tx(write=True) as tx:
            kernels = [r[0] for r in tx.query(
                "SELECT kernel_id FROM kernels WHERE blueprint_id = ?", (blueprint_id,))]
            reports = 0
            for kid in kernels:
                reports += self._delete_kernel_rows(tx, kid)
            tx.execute("DELETE FROM blueprint_tags WHERE blueprint_id = ?", (blueprint_id,))
            tx.execute("DELETE FROM blueprint_layouts WHERE blueprint_id = ?", (blueprint_id,))
            deleted = tx.execute("DELETE FROM blueprints WHERE blueprint_id = ?",
                                 (blueprint_id,))
            return bool(deleted), len(kernels), reports

    def list_blueprints(self, query: BlueprintQuery) -> Page[BlueprintRow]:
        offset, limit = page_bounds(query)
        where, params = ["1 = 1"], []
        if not query.include_retired:
            where.append("b.retired_at IS NULL")
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
            f"SELECT {_BLUEPRINT_COLS} FROM blueprints b "
            f"WHERE {' AND '.join(where)} ORDER BY b.blueprint_id LIMIT ? OFFSET ?"
        )
        with self._tx(write=False) as tx:
            rows = self._blueprint_rows(tx, sql, (*params, limit + 1, offset))
        return Page(items=rows[:limit], next_page_token=next_token(query, offset, limit, len(rows)),
                    offset=offset)

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
                         layouts=tuple(layouts[bid]),
                         retired_at=None if retired is None else float(retired),
                         retired_reason=reason)
            for bid, name, family, data, created, retired, reason in base
        ]

    # -- kernels -------------------------------------------------------------------

    def put_kernel(self, row: KernelRow) -> bool:
        with self._tx(write=True) as tx:
            created = tx.execute(
                "INSERT INTO kernels (kernel_id, blueprint_id, site_key, parameters, "
                "artifact_sha256, artifact_size, manifest, created_at, key_id) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (kernel_id) DO NOTHING",
                (row.kernel_id, row.blueprint_id, row.site_key, int(row.parameters),
                 row.artifact_sha256, int(row.artifact_size), row.manifest, row.created_at,
                 row.key_id),
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
        if not query.include_retired:
            where.append(f"NOT {_RETIRED_BLUEPRINT}")
        if query.key_ids is not None:
            if query.key_ids:
                where.append(f"k.key_id IN ({', '.join('?' * len(query.key_ids))})")
                params.extend(sorted(query.key_ids))
            else:
                where.append("1 = 0")  # no trusted signer: nothing can be offered
        if query.tags:
            where.append(_has_all_tags("kernel_tags", "k.kernel_id", "kernel_id",
                                       len(set(query.tags))))
            params.extend(sorted(set(query.tags)))
        real = "DOUBLE PRECISION" if self.dialect == "postgres" else "REAL"
        outcomes = "COALESCE(s.outcomes, 0)"
        score = {
            "score": f"COALESCE(s.clipped_contribution, 0) / ({outcomes} + "
                     f"{SCORE_PRIOR_OUTCOMES})",
            "mean_contribution":
                f"CASE WHEN {outcomes} > 0 THEN s.clipped_contribution / s.outcomes ELSE 0.0 END",
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
                    next_page_token=next_token(query, offset, limit, len(entries)), offset=offset)

    def kernel_ids(self) -> list[str]:
        with self._tx(write=False) as tx:
            return [r[0] for r in tx.query("SELECT kernel_id FROM kernels ORDER BY kernel_id")]

    def delete_kernel(self, kernel_id: str) -> tuple[bool, int]:
        with self._tx(write=True) as tx:
            if not tx.query("SELECT 1 FROM kernels WHERE kernel_id = ?", (kernel_id,)):
                return False, 0
            return True, self._delete_kernel_rows(tx, kernel_id)

    @staticmethod
    def _delete_kernel_rows(tx: Tx, kernel_id: str) -> int:
        """Every row of one kernel (children first: the foreign keys); its report count."""
        reports = tx.execute("DELETE FROM field_reports WHERE kernel_id = ?", (kernel_id,))
        tx.execute("DELETE FROM kernel_stats WHERE kernel_id = ?", (kernel_id,))
        tx.execute("DELETE FROM kernel_tags WHERE kernel_id = ?", (kernel_id,))
        tx.execute("DELETE FROM kernels WHERE kernel_id = ?", (kernel_id,))
        return reports

    def artifact_shas(self) -> set[str]:
        with self._tx(write=False) as tx:
            return {r[0] for r in tx.query("SELECT DISTINCT artifact_sha256 FROM kernels")}

    def kernels_without_key_id(self, limit: int = 1000) -> list[tuple[str, bytes]]:
        with self._tx(write=False) as tx:
            return [(r[0], bytes(r[1])) for r in tx.query(
                "SELECT kernel_id, manifest FROM kernels WHERE key_id = '' ORDER BY kernel_id "
                "LIMIT ?", (limit,))]

    def set_key_ids(self, key_ids: dict[str, str]) -> None:
        with self._tx(write=True) as tx:
            for kid, key_id in key_ids.items():
                tx.execute("UPDATE kernels SET key_id = ? WHERE kernel_id = ?", (key_id, kid))

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
                            manifest=bytes(r[6]), created_at=float(r[7]), key_id=r[8],
                            tags=tuple(tags[r[0]]))
            stats = KernelStats(outcomes=int(r[9]), fossilized=int(r[10]), pruned=int(r[11]),
                                rolled_back=int(r[12]), sum_contribution=float(r[13]),
                                sum_accuracy_delta=float(r[14]),
                                clipped_contribution=float(r[15]),
                                clipped_accuracy_delta=float(r[16]))
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
                "sum_contribution, sum_accuracy_delta, clipped_contribution, "
                "clipped_accuracy_delta) VALUES (?, 1, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (kernel_id) DO UPDATE SET "
                "outcomes = kernel_stats.outcomes + 1, "
                "fossilized = kernel_stats.fossilized + excluded.fossilized, "
                "pruned = kernel_stats.pruned + excluded.pruned, "
                "rolled_back = kernel_stats.rolled_back + excluded.rolled_back, "
                "sum_contribution = kernel_stats.sum_contribution + excluded.sum_contribution, "
                "sum_accuracy_delta = kernel_stats.sum_accuracy_delta + "
                "excluded.sum_accuracy_delta, "
                "clipped_contribution = kernel_stats.clipped_contribution + "
                "excluded.clipped_contribution, "
                "clipped_accuracy_delta = kernel_stats.clipped_accuracy_delta + "
                "excluded.clipped_accuracy_delta",
                (report.kernel_id, int(report.fate == FATE_FOSSILIZED),
                 int(report.fate == FATE_PRUNED),
                 int(report.fate == FATE_ROLLED_BACK or report.rolled_back),
                 float(report.contribution), float(report.accuracy_delta),
                 clip(float(report.contribution)), clip(float(report.accuracy_delta))),
            )
            return True

    def delete_field_reports(self, *, kernel_id: str = "", run_id: str = "") -> int:
        if not kernel_id and not run_id:
            raise InvalidArgumentError(
                "name the field reports to delete: kernel_id, run_id or both",
                field="kernel_id")
        where, params = [], []
        if kernel_id:
            where.append("kernel_id = ?")
            params.append(kernel_id)
        if run_id:
            where.append("run_id = ?")
            params.append(run_id)
        cond = " AND ".join(where)
        with self._tx(write=True) as tx:
            kernels = [r[0] for r in tx.query(
                f"SELECT DISTINCT kernel_id FROM field_reports WHERE {cond}", params)]
            deleted = tx.execute(f"DELETE FROM field_reports WHERE {cond}", params)
            for kid in kernels:
                self._recompute_stats(tx, kid)
            return deleted

    def _recompute_stats(self, tx: Tx, kernel_id: str) -> None:
        """A kernel's aggregates from the reports it has left (after a deletion)."""
        least, greatest = ("MIN", "MAX") if self.dialect == "sqlite" else ("LEAST", "GREATEST")

        def clipped(col: str) -> str:
            return f"COALESCE(SUM({greatest}(-{SCORE_CLIP}, {least}({SCORE_CLIP}, {col}))), 0)"

        rows = tx.query(
            "SELECT COUNT(*), "
            f"COALESCE(SUM(CASE WHEN fate = {FATE_FOSSILIZED} THEN 1 ELSE 0 END), 0), "
            f"COALESCE(SUM(CASE WHEN fate = {FATE_PRUNED} THEN 1 ELSE 0 END), 0), "
            f"COALESCE(SUM(CASE WHEN fate = {FATE_ROLLED_BACK} OR rolled_back = 1 THEN 1 "
            "ELSE 0 END), 0), COALESCE(SUM(contribution), 0), COALESCE(SUM(accuracy_delta), 0), "
            f"{clipped('contribution')}, {clipped('accuracy_delta')} "
            "FROM field_reports WHERE kernel_id = ?", (kernel_id,))
        n, fossilized, pruned, rolled_back, sc, sa, cc, ca = rows[0]
        tx.execute("DELETE FROM kernel_stats WHERE kernel_id = ?", (kernel_id,))
        if n:
            tx.execute(
                "INSERT INTO kernel_stats (kernel_id, outcomes, fossilized, pruned, rolled_back, "
                "sum_contribution, sum_accuracy_delta, clipped_contribution, "
                "clipped_accuracy_delta) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (kernel_id, int(n), int(fossilized), int(pruned), int(rolled_back), float(sc),
                 float(sa), float(cc), float(ca)))

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

