"""Versioned schema migrations, the same numbering on SQLite and PostgreSQL.

Each migration is a list of statements written once with type tokens that each
dialect fills in. A database records every applied migration in `schema_version`;
opening a store applies the pending ones in order, in one transaction, under a lock
that keeps concurrent openers (threads or processes) from applying them twice.
Never edit a released migration: append a new one.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    statements: tuple[str, ...]


TYPES: dict[str, dict[str, str]] = {
    "sqlite": {"blob": "BLOB", "real": "REAL", "bigint": "INTEGER", "least": "MIN",
               "greatest": "MAX"},
    "postgres": {"blob": "BYTEA", "real": "DOUBLE PRECISION", "bigint": "BIGINT",
                 "least": "LEAST", "greatest": "GREATEST"},
}

# A field report's value as the aggregates see it: clipped to [-1, 1]
# (esper.urza.store.base.SCORE_CLIP; a test checks the two agree).
_CLIPPED = "{greatest}(-1.0, {least}(1.0, f.%s))"

SCHEMA_VERSION_TABLE = """
CREATE TABLE IF NOT EXISTS schema_version (
    version INTEGER PRIMARY KEY,
    description TEXT NOT NULL,
    applied_at {real} NOT NULL
)"""

MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "blueprints, kernels, field reports, kernel stats",
        (
            """CREATE TABLE blueprints (
                blueprint_id TEXT PRIMARY KEY,
                name TEXT NOT NULL,
                family TEXT NOT NULL,
                data {blob} NOT NULL,
                created_at {real} NOT NULL
            )""",
            "CREATE INDEX blueprints_family ON blueprints (family)",
            """CREATE TABLE blueprint_tags (
                blueprint_id TEXT NOT NULL REFERENCES blueprints (blueprint_id),
                tag TEXT NOT NULL,
                PRIMARY KEY (blueprint_id, tag)
            )""",
            "CREATE INDEX blueprint_tags_tag ON blueprint_tags (tag)",
            """CREATE TABLE blueprint_layouts (
                blueprint_id TEXT NOT NULL REFERENCES blueprints (blueprint_id),
                layout INTEGER NOT NULL,
                PRIMARY KEY (blueprint_id, layout)
            )""",
            """CREATE TABLE kernels (
                kernel_id TEXT PRIMARY KEY,
                blueprint_id TEXT NOT NULL,
                site_key TEXT NOT NULL,
                parameters {bigint} NOT NULL,
                artifact_sha256 TEXT NOT NULL,
                artifact_size {bigint} NOT NULL,
                manifest {blob} NOT NULL,
                created_at {real} NOT NULL
            )""",
            "CREATE INDEX kernels_blueprint ON kernels (blueprint_id)",
            "CREATE INDEX kernels_site ON kernels (site_key)",
            """CREATE TABLE kernel_tags (
                kernel_id TEXT NOT NULL REFERENCES kernels (kernel_id),
                tag TEXT NOT NULL,
                PRIMARY KEY (kernel_id, tag)
            )""",
            "CREATE INDEX kernel_tags_tag ON kernel_tags (tag)",
            """CREATE TABLE field_reports (
                request_id TEXT PRIMARY KEY,
                kernel_id TEXT NOT NULL REFERENCES kernels (kernel_id),
                run_id TEXT NOT NULL,
                slot_id TEXT NOT NULL,
                task TEXT NOT NULL,
                contribution {real} NOT NULL,
                accuracy_delta {real} NOT NULL,
                fate INTEGER NOT NULL,
                germinated_epoch INTEGER NOT NULL,
                ended_epoch INTEGER NOT NULL,
                parameters {bigint} NOT NULL,
                rejected_by_gate INTEGER NOT NULL,
                rolled_back INTEGER NOT NULL,
                recorded_at {real} NOT NULL
            )""",
            "CREATE INDEX field_reports_kernel ON field_reports (kernel_id, recorded_at)",
            """CREATE TABLE kernel_stats (
                kernel_id TEXT PRIMARY KEY REFERENCES kernels (kernel_id),
                outcomes {bigint} NOT NULL,
                fossilized {bigint} NOT NULL,
                pruned {bigint} NOT NULL,
                rolled_back {bigint} NOT NULL,
                sum_contribution {real} NOT NULL,
                sum_accuracy_delta {real} NOT NULL
            )""",
        ),
    ),
    Migration(
        2,
        "field reports by run (Karn and Tamiyo's training read a run's reports together)",
        ("CREATE INDEX field_reports_run ON field_reports (run_id, kernel_id)",),
    ),
    Migration(
        3,
        "signer key ids, retired blueprints, clipped (robust) outcome sums",
        (
            # '' until the library backfills it from the manifest at open.
            "ALTER TABLE kernels ADD COLUMN key_id TEXT NOT NULL DEFAULT ''",
            "CREATE INDEX kernels_key ON kernels (key_id)",
            "CREATE INDEX kernels_artifact ON kernels (artifact_sha256)",
            "ALTER TABLE blueprints ADD COLUMN retired_at {real}",
            "ALTER TABLE blueprints ADD COLUMN retired_reason TEXT NOT NULL DEFAULT ''",
            "ALTER TABLE kernel_stats ADD COLUMN clipped_contribution {real} NOT NULL DEFAULT 0",
            ("ALTER TABLE kernel_stats ADD COLUMN clipped_accuracy_delta {real} NOT NULL "
             "DEFAULT 0"),
            # Reports recorded before: an infinite contribution counts as +-1 from now on.
            ("UPDATE kernel_stats SET "
             f"clipped_contribution = COALESCE((SELECT SUM({_CLIPPED % 'contribution'}) "
             "FROM field_reports f WHERE f.kernel_id = kernel_stats.kernel_id), 0), "
             f"clipped_accuracy_delta = COALESCE((SELECT SUM({_CLIPPED % 'accuracy_delta'}) "
             "FROM field_reports f WHERE f.kernel_id = kernel_stats.kernel_id), 0)"),
        ),
    ),
)

LATEST_VERSION = MIGRATIONS[-1].version


def render(statement: str, dialect: str) -> str:
    return statement.format(**TYPES[dialect])
