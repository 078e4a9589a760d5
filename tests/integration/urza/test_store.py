"""One storage suite for Urza's metadata, run on SQLite and on a real PostgreSQL server."""

from __future__ import annotations

import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from esper.errors import ConfigError, InvalidArgumentError, NotFoundError
from esper.urza.store import (
    BlueprintQuery,
    BlueprintRow,
    FieldReportRow,
    KernelQuery,
    KernelRow,
    MetadataStore,
)
from esper.urza.store.base import FATE_FOSSILIZED, FATE_PRUNED, FATE_ROLLED_BACK
from esper.urza.store.migrations import LATEST_VERSION

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[3]

Opener = Callable[..., MetadataStore]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    """Opens (possibly several) stores on one fresh database of the chosen backend."""
    opened: list[MetadataStore] = []
    if request.param == "sqlite":
        from esper.urza.store.sqlite import SqliteStore

        path = tmp_path / "urza.db"

        def opener(**kw: object) -> MetadataStore:
            s = SqliteStore(path, **kw)
            opened.append(s)
            return s

        opener.target = str(path)  # type: ignore[attr-defined]
    else:
        from esper.urza.store.postgres import PostgresStore

        url = request.getfixturevalue("postgres_url")

        def opener(**kw: object) -> MetadataStore:
            s = PostgresStore(url, **kw)
            opened.append(s)
            return s

        opener.target = url  # type: ignore[attr-defined]
    opener.backend = request.param  # type: ignore[attr-defined]
    yield opener
    for s in opened:
        s.close()


@pytest.fixture
def store(open_store: Opener) -> MetadataStore:
    return open_store()


def _bp(i: int, *, family: str = "bottleneck_mlp", tags: tuple[str, ...] = ("mlp",),
        layouts: tuple[int, ...] = (1,)) -> BlueprintRow:
    return BlueprintRow(blueprint_id=f"bp-{i:016x}", name=f"bp{i}", family=family,
                        layouts=layouts, tags=tags, data=b"\x0a\x03bp" + bytes([i]))


def _kernel(i: int, *, bp: int = 1, site: str = "NC/64", params: int = 1000,
            tags: tuple[str, ...] = ()) -> KernelRow:
    return KernelRow(kernel_id=f"sha256:{i:064x}", blueprint_id=f"bp-{bp:016x}", site_key=site,
                     parameters=params, artifact_sha256=f"{i + 7:064x}", artifact_size=100 + i,
                     manifest=b"manifest-" + i.to_bytes(4, "big"), tags=tags)


def _report(kernel: int, *, contribution: float = 0.0, fate: int = FATE_FOSSILIZED,
            request_id: str | None = None, acc: float = 0.0) -> FieldReportRow:
    return FieldReportRow(request_id=request_id or str(uuid.uuid4()),
                          kernel_id=f"sha256:{kernel:064x}", run_id="run-1", slot_id="body.1",
                          contribution=contribution, accuracy_delta=acc, fate=fate)


# -- migrations ------------------------------------------------------------------------


def test_open_applies_every_migration(store: MetadataStore) -> None:
    assert store.schema_version() == LATEST_VERSION == 3


def test_pending_migrations_apply_on_reopen_and_keep_data(open_store: Opener) -> None:
    old = open_store(_migrate_upto=1)
    assert old.schema_version() == 1
    kid = f"sha256:{1:064x}"
    # Rows as a version-1 Urza wrote them, including the infinite contribution it accepted.
    with old._tx(write=True) as tx:  # type: ignore[attr-defined]
        tx.execute("INSERT INTO kernels (kernel_id, blueprint_id, site_key, parameters, "
                   "artifact_sha256, artifact_size, manifest, created_at) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                   (kid, "bp-0000000000000001", "NC/64", 10, "7" * 64, 101, b"m", 0.0))
        for i, c in enumerate((float("inf"), 0.5, -0.25)):
            tx.execute("INSERT INTO field_reports (request_id, kernel_id, run_id, slot_id, "
                       "task, contribution, accuracy_delta, fate, germinated_epoch, "
                       "ended_epoch, parameters, rejected_by_gate, rolled_back, recorded_at) "
                       "VALUES (?, ?, 'r', 's', '', ?, 0.0, 1, 0, 0, 0, 0, 0, 0.0)",
                       (f"old-{i}", kid, c))
        tx.execute("INSERT INTO kernel_stats (kernel_id, outcomes, fossilized, pruned, "
                   "rolled_back, sum_contribution, sum_accuracy_delta) "
                   "VALUES (?, 3, 3, 0, 0, ?, 0.0)", (kid, float("inf")))
    old.close()
    new = open_store()
    assert new.schema_version() == 3
    entry = new.get_kernel(kid)
    assert entry.row.artifact_size == 101 and entry.row.key_id == ""
    # The migration recomputed the robust sums from the stored reports: inf counts as 1.
    assert entry.stats.clipped_contribution == pytest.approx(1.0 + 0.5 - 0.25)
    assert entry.stats.mean_contribution == pytest.approx(1.25 / 3)
    assert new.kernels_without_key_id() == [(kid, b"m")]
    new.set_key_ids({kid: "0123456789abcdef"})
    assert new.get_kernel(kid).row.key_id == "0123456789abcdef"
    assert new.kernels_without_key_id() == []


def test_the_migration_clips_as_the_store_does() -> None:
    from esper.urza.store.base import SCORE_CLIP
    from esper.urza.store.migrations import MIGRATIONS

    assert SCORE_CLIP == 1.0 and "(-1.0, {least}(1.0, f.contribution))" in MIGRATIONS[2].statements[-1]


def test_database_from_a_newer_esper_is_refused(open_store: Opener) -> None:
    s = open_store()
    with s._tx(write=True) as tx:  # type: ignore[attr-defined]
        tx.execute("INSERT INTO schema_version (version, description, applied_at) "
                   "VALUES (?, ?, ?)", (99, "from the future", 0.0))
    with pytest.raises(ConfigError, match="schema version 99"):
        open_store()


def test_concurrent_openers_migrate_once(open_store: Opener) -> None:
    errors: list[BaseException] = []
    stores: list[MetadataStore] = []

    def open_one() -> None:
        try:
            stores.append(open_store())
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with stores[0]._tx(write=False) as tx:  # type: ignore[attr-defined]
        rows = tx.query("SELECT version FROM schema_version ORDER BY version")
    assert [r[0] for r in rows] == [1, 2, 3]


def test_sqlite_opener_waits_for_a_writer_holding_a_fresh_database(tmp_path: Path) -> None:
    """Switching a fresh file to WAL needs an exclusive lock, and SQLite answers BUSY at
    once, without its busy handler, while another connection holds a write lock (its
    deadlock avoidance) -- what several openers of a fresh database race into. The
    opener must wait for that connection, not fail with 'database is locked'."""
    import sqlite3

    from esper.urza.store.sqlite import SqliteStore

    path = tmp_path / "urza.db"
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("CREATE TABLE t (x INTEGER)")
    other.execute("BEGIN IMMEDIATE")  # RESERVED lock, as a second opener mid-switch holds
    other.execute("INSERT INTO t VALUES (1)")
    release = threading.Timer(0.3, lambda: other.execute("COMMIT"))
    release.start()
    try:
        store = SqliteStore(path, busy_timeout_s=10.0)
    finally:
        release.join()
        other.close()
    assert store.schema_version() == LATEST_VERSION
    store.close()


# -- blueprints ------------------------------------------------------------------------


def test_blueprint_put_is_idempotent_and_round_trips(store: MetadataStore) -> None:
    row = _bp(1, tags=("mlp", "cheap"), layouts=(1, 4))
    assert store.put_blueprint(row) is True
    assert store.put_blueprint(row) is False
    got = store.get_blueprint(row.blueprint_id)
    assert (got.data, got.family, got.name) == (row.data, row.family, row.name)
    assert set(got.tags) == {"mlp", "cheap"}
    assert got.layouts == (1, 4)
    with pytest.raises(NotFoundError, match="bp-00000000000000ff"):
        store.get_blueprint("bp-00000000000000ff")


def test_list_blueprints_filters_and_pages(store: MetadataStore) -> None:
    for i in range(5):
        store.put_blueprint(_bp(i, tags=("mlp", "cheap") if i % 2 else ("mlp",), layouts=(1,)))
    store.put_blueprint(_bp(10, family="conv3x3_residual", tags=("conv",), layouts=(2, 3)))

    ids: list[str] = []
    q = BlueprintQuery(page_size=2)
    while True:
        page = store.list_blueprints(q)
        assert len(page.items) <= 2
        ids += [b.blueprint_id for b in page.items]
        if not page.next_page_token:
            break
        q = BlueprintQuery(page_size=2, page_token=page.next_page_token)
    assert ids == sorted(_bp(i).blueprint_id for i in (0, 1, 2, 3, 4, 10))

    cheap = store.list_blueprints(BlueprintQuery(tags=("cheap", "mlp")))
    assert [b.blueprint_id for b in cheap.items] == [_bp(1).blueprint_id, _bp(3).blueprint_id]
    assert [b.family for b in store.list_blueprints(BlueprintQuery(layout=3)).items] == [
        "conv3x3_residual"]
    assert len(store.list_blueprints(BlueprintQuery(family="bottleneck_mlp")).items) == 5


def test_page_token_is_bound_to_its_filter(store: MetadataStore) -> None:
    for i in range(3):
        store.put_blueprint(_bp(i))
    token = store.list_blueprints(BlueprintQuery(page_size=1)).next_page_token
    assert token
    with pytest.raises(InvalidArgumentError, match="different query") as err:
        store.list_blueprints(BlueprintQuery(page_size=1, family="x", page_token=token))
    assert err.value.field == "page_token"
    with pytest.raises(InvalidArgumentError, match="not a token"):
        store.list_blueprints(BlueprintQuery(page_token="garbage!"))
    with pytest.raises(InvalidArgumentError, match="page_size=5000"):
        store.list_blueprints(BlueprintQuery(page_size=5000))


# -- kernels ---------------------------------------------------------------------------


def test_kernel_put_is_idempotent_and_round_trips(store: MetadataStore) -> None:
    row = _kernel(3, tags=("fast", "nc"))
    assert store.put_kernel(row) is True
    assert store.put_kernel(row) is False
    got = store.get_kernel(row.kernel_id)
    assert got.row.manifest == row.manifest
    assert got.row.artifact_sha256 == row.artifact_sha256
    assert got.row.tags == ("fast", "nc")
    assert got.stats.outcomes == 0
    assert store.kernel_ids() == [row.kernel_id]
    with pytest.raises(NotFoundError, match="sha256:0+ff"):
        store.get_kernel(f"sha256:{255:064x}")


def test_query_kernels_filters(store: MetadataStore) -> None:
    store.put_kernel(_kernel(1, bp=1, site="NC/64", params=500, tags=("a", "b")))
    store.put_kernel(_kernel(2, bp=1, site="NC/128", params=2000, tags=("a",)))
    store.put_kernel(_kernel(3, bp=2, site="NC/64", params=1500, tags=("b",)))

    def ids(**kw: object) -> list[int]:
        return sorted(int(e.row.kernel_id[7:], 16) for e in store.query_kernels(
            KernelQuery(**kw)).items)

    assert ids() == [1, 2, 3]
    assert ids(blueprint_id=f"bp-{1:016x}") == [1, 2]
    assert ids(site_key="NC/64") == [1, 3]
    assert ids(tags=("a",)) == [1, 2]
    assert ids(tags=("a", "b")) == [1]
    assert ids(max_parameters=1500) == [1, 3]
    assert ids(blueprint_id=f"bp-{1:016x}", site_key="NC/64", max_parameters=600) == [1]
    assert ids(site_key="NCHW/8/4x4") == []


def test_outcomes_aggregate_idempotently(store: MetadataStore) -> None:
    store.put_kernel(_kernel(1))
    rid = str(uuid.uuid4())
    assert store.record_outcome(_report(1, contribution=0.5, acc=0.02, request_id=rid)) is True
    assert store.record_outcome(_report(1, contribution=0.5, acc=0.02, request_id=rid)) is False
    assert store.record_outcome(_report(1, contribution=-0.1, fate=FATE_PRUNED, acc=-0.01))
    assert store.record_outcome(_report(1, contribution=0.2, fate=FATE_ROLLED_BACK))
    stats = store.get_kernel(f"sha256:{1:064x}").stats
    assert (stats.outcomes, stats.fossilized, stats.pruned, stats.rolled_back) == (3, 1, 1, 1)
    assert stats.mean_contribution == pytest.approx(0.6 / 3)
    assert stats.mean_accuracy_delta == pytest.approx(0.01 / 3)
    assert stats.fossilized_rate == pytest.approx(1 / 3)
    reports = store.field_reports(f"sha256:{1:064x}")
    assert len(reports) == 3 and reports[0].request_id == rid
    with pytest.raises(NotFoundError, match="no such kernel"):
        store.record_outcome(_report(9))


def test_query_orders_by_recorded_outcomes(store: MetadataStore) -> None:
    for k in range(1, 5):
        store.put_kernel(_kernel(k))
    store.record_outcome(_report(1, contribution=0.1))          # mean 0.1, fossil 1/1
    store.record_outcome(_report(2, contribution=0.9, fate=FATE_PRUNED))
    store.record_outcome(_report(2, contribution=0.3))          # mean 0.6, fossil 1/2
    store.record_outcome(_report(3, contribution=-0.4, fate=FATE_PRUNED))  # mean -0.4, 0/1
    # kernel 4: untested, scores 0 (neutral): above the harmful kernel 3

    def order(by: str) -> list[int]:
        page = store.query_kernels(KernelQuery(order_by=by))  # type: ignore[arg-type]
        return [int(e.row.kernel_id[7:], 16) for e in page.items]

    assert order("mean_contribution") == [2, 1, 4, 3]
    assert order("fossilized_rate") == [1, 2, 3, 4]  # 3 and 4 tie at 0: more outcomes first
    assert order("outcomes") == [2, 1, 3, 4]

    seen: list[int] = []
    q = KernelQuery(page_size=3)
    while True:
        page = store.query_kernels(q)
        seen += [int(e.row.kernel_id[7:], 16) for e in page.items]
        if not page.next_page_token:
            break
        q = KernelQuery(page_size=3, page_token=page.next_page_token)
    assert seen == [2, 1, 4, 3]
    with pytest.raises(InvalidArgumentError, match="order_by='best'"):
        KernelQuery(order_by="best")  # type: ignore[arg-type]


# -- concurrency -----------------------------------------------------------------------


def test_concurrent_writers_in_threads_lose_nothing(open_store: Opener) -> None:
    store = open_store()
    store.put_kernel(_kernel(1))
    errors: list[BaseException] = []

    def writer(t: int) -> None:
        try:
            for i in range(25):
                store.record_outcome(_report(1, contribution=float(t), request_id=f"t{t}-{i}"))
                # every thread also retries one id: idempotency under contention
                store.record_outcome(_report(1, contribution=float(t), request_id="shared"))
                store.put_kernel(_kernel(100 + t * 25 + i))
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    stats = store.get_kernel(f"sha256:{1:064x}").stats
    assert stats.outcomes == 8 * 25 + 1
    shared = [r for r in store.field_reports(f"sha256:{1:064x}") if r.request_id == "shared"]
    assert len(shared) == 1
    assert stats.sum_contribution == pytest.approx(25 * sum(range(8)) + shared[0].contribution)
    assert len(store.kernel_ids()) == 1 + 8 * 25


_WRITER = """
import sys
from esper.urza.store.base import FieldReportRow
backend, target, worker = sys.argv[1], sys.argv[2], int(sys.argv[3])
if backend == "sqlite":
    from esper.urza.store.sqlite import SqliteStore as S
else:
    from esper.urza.store.postgres import PostgresStore as S
s = S(target)
for i in range(40):
    s.record_outcome(FieldReportRow(request_id=f"p{worker}-{i}", kernel_id="sha256:" + "0" * 63 + "1",
                                    run_id=f"run-{worker}", slot_id="s", contribution=1.0, fate=1))
s.close()
"""


def test_concurrent_writers_in_processes_lose_nothing(open_store: Opener) -> None:
    store = open_store()
    store.put_kernel(_kernel(1))
    procs = [
        subprocess.Popen([sys.executable, "-c", _WRITER, open_store.backend,  # type: ignore[attr-defined]
                          open_store.target, str(w)], cwd=REPO,  # type: ignore[attr-defined]
                         stderr=subprocess.PIPE)
        for w in range(4)
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
    stats = store.get_kernel(f"sha256:{1:064x}").stats
    assert stats.outcomes == 160
    assert stats.sum_contribution == pytest.approx(160.0)


# -- hardening: typed values, robust scores, retire/delete, signers --------------------


def test_report_values_that_the_columns_cannot_hold_are_invalid_arguments() -> None:
    """NaN broke NOT NULL on SQLite (IntegrityError), 2**63 overflowed BIGINT, an epoch of
    2**32-1 overflows PostgreSQL's INTEGER: each is now refused naming its field."""
    from esper.urza.store.base import INT32_MAX, INT64_MAX

    cases = {
        "report.contribution": {"contribution": float("nan")},
        "report.accuracy_delta": {"accuracy_delta": float("-inf")},
        "report.parameters": {"parameters": INT64_MAX + 1},
        "report.germinated_epoch": {"germinated_epoch": INT32_MAX + 1},
        "report.ended_epoch": {"ended_epoch": 2**32 - 1},
        "report.recorded_at": {"recorded_at": 1e300},
        "report.slot_id": {"slot_id": "s" * 257},
        "report.task": {"task": "t" * 129},
    }
    for field, bad in cases.items():
        kw = {"request_id": "r", "kernel_id": "sha256:1", "run_id": "run", "slot_id": "s",
              "fate": FATE_FOSSILIZED, **bad}
        with pytest.raises(InvalidArgumentError) as err:
            FieldReportRow(**kw)  # type: ignore[arg-type]
        assert err.value.field == field, field
    with pytest.raises(InvalidArgumentError, match=r"max_parameters=9223372036854775808") as err:
        KernelQuery(max_parameters=2**63)
    assert err.value.field == "max_parameters"


def test_the_largest_allowed_values_fit_the_columns(store: MetadataStore) -> None:
    from esper.urza.store.base import INT32_MAX, INT64_MAX, TIMESTAMP_MAX_S

    store.put_kernel(_kernel(1, params=INT64_MAX))
    report = FieldReportRow(request_id="max", kernel_id=f"sha256:{1:064x}", run_id="r" * 128,
                            slot_id="s" * 256, task="t" * 128, contribution=1e308,
                            accuracy_delta=-1e308, fate=FATE_FOSSILIZED,
                            germinated_epoch=INT32_MAX, ended_epoch=INT32_MAX,
                            parameters=INT64_MAX, recorded_at=float(TIMESTAMP_MAX_S))
    assert store.record_outcome(report)
    assert store.field_reports(f"sha256:{1:064x}")[0].parameters == INT64_MAX
    assert [e.row.parameters for e in store.query_kernels(
        KernelQuery(max_parameters=INT64_MAX)).items] == [INT64_MAX]
    stats = store.get_kernel(f"sha256:{1:064x}").stats
    assert stats.mean_contribution == 1.0 and stats.mean_accuracy_delta == -1.0


@pytest.mark.parametrize("token", [
    "eyJhZnRlciI6MWU5OTl9",  # {"after":1e999}
    "not-hex text that fromhex() would choke on",
    "eyJvIjo5MjIzMzcyMDM2ODU0Nzc1ODA4LCJmIjoiMDAwMDAwMDAwMDAwMDAwMCJ9",  # o = 2**63
    "eyJvIjoxZTk5OSwiZiI6IjAwMDAwMDAwMDAwMDAwMDAifQ==",  # o = 1e999
    "eyJvIjotMSwiZiI6IjAwMDAwMDAwMDAwMDAwMDAifQ==",  # o = -1
    "eyJvIjp0cnVlLCJmIjoiMDAwMDAwMDAwMDAwMDAwMCJ9",  # o = true
    "eyJvIjpOYU4sImYiOiIwMDAwMDAwMDAwMDAwMDAwIn0=",  # o = NaN
    "W1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1td",  # nested arrays
    "__8=",  # not UTF-8
    "A" * 300,
])
def test_hand_made_page_tokens_are_refused_naming_the_field(store: MetadataStore,
                                                            token: str) -> None:
    for query in (BlueprintQuery(page_token=token), KernelQuery(page_token=token)):
        call = store.list_blueprints if isinstance(query, BlueprintQuery) else store.query_kernels
        with pytest.raises(InvalidArgumentError) as err:
            call(query)  # type: ignore[arg-type]
        assert err.value.field == "page_token"
        text = str(err.value)
        assert "fromhex" not in text and "Expecting" not in text and token not in text


def test_one_extreme_report_moves_a_rank_by_a_bounded_amount(store: MetadataStore) -> None:
    """One report of contribution=+1e308 (finite, so accepted) once took the worst kernel
    to first place for good. Clipped and shrunk, it moves the score by at most
    score_bound(n): the kernel can only pass kernels within that bound of it."""
    from esper.urza.store.base import score_bound

    # Five kernels with four reports each; scores 0.4, 0.3, 0.2, 0.1, -0.1 (sum / (4 + 1)).
    means = {1: 0.5, 2: 0.375, 3: 0.25, 4: 0.125, 5: -0.125}
    for k, mean in means.items():
        store.put_kernel(_kernel(k))
        for _ in range(4):
            store.record_outcome(_report(k, contribution=mean))

    def ranking() -> list[tuple[int, float]]:
        items = store.query_kernels(KernelQuery()).items
        return [(int(e.row.kernel_id[7:], 16), e.stats.score) for e in items]

    before = ranking()
    assert [k for k, _ in before] == [1, 2, 3, 4, 5]
    worst_before = dict(before)[5]
    store.record_outcome(_report(5, contribution=1e308))
    after = ranking()
    worst_after = dict(after)[5]
    bound = score_bound(4)
    assert 0 < worst_after - worst_before <= bound
    # Only kernels scoring within the bound above it could be passed (here kernels 3 and
    # 4); kernels 1 and 2 cannot be, whatever the report says. In fact it passes none:
    # -0.1 becomes (4 * -0.125 + 1) / 6 = 0.083, still below kernel 4's 0.1.
    passable = {k for k, s in before if worst_before < s < worst_before + bound}
    assert [k for k, _ in after].index(5) >= 4 - len(passable)
    assert [k for k, _ in after][:3] == [1, 2, 3]
    # The mean is winsorised the same way: at most 2 / outcomes away from before.
    stats = store.get_kernel(f"sha256:{5:064x}").stats
    assert stats.mean_contribution == pytest.approx((4 * -0.125 + 1.0) / 5)
    assert stats.sum_contribution == pytest.approx(1e308)  # the raw sum is kept as reported


def test_retire_hides_a_blueprints_kernels_until_restored(store: MetadataStore) -> None:
    store.put_blueprint(_bp(1))
    store.put_blueprint(_bp(2))
    store.put_kernel(_kernel(1, bp=1))
    store.put_kernel(_kernel(2, bp=2))

    def offered(**kw: object) -> list[int]:
        return [int(e.row.kernel_id[7:], 16) for e in store.query_kernels(
            KernelQuery(**kw)).items]  # type: ignore[arg-type]

    assert store.retire_blueprint(_bp(1).blueprint_id, retired=True, reason="regressed")
    assert not store.retire_blueprint(_bp(1).blueprint_id, retired=True)
    assert offered() == [2]
    assert sorted(offered(include_retired=True)) == [1, 2]
    assert store.get_kernel(f"sha256:{1:064x}").row.kernel_id  # still there, still served
    row = store.get_blueprint(_bp(1).blueprint_id)
    assert row.retired_at is not None and row.retired_reason == "regressed"
    assert [b.blueprint_id for b in store.list_blueprints(BlueprintQuery()).items] == [
        _bp(2).blueprint_id]
    assert len(store.list_blueprints(BlueprintQuery(include_retired=True)).items) == 2
    assert store.retire_blueprint(_bp(1).blueprint_id, retired=False)
    assert sorted(offered()) == [1, 2]
    assert store.get_blueprint(_bp(1).blueprint_id).retired_at is None
    with pytest.raises(NotFoundError):
        store.retire_blueprint("bp-00000000000000ff", retired=True)


def test_delete_blueprint_takes_its_kernels_and_reports(store: MetadataStore) -> None:
    store.put_blueprint(_bp(1, tags=("mlp", "x")))
    store.put_blueprint(_bp(2))
    store.put_kernel(_kernel(1, bp=1, tags=("fast",)))
    store.put_kernel(_kernel(2, bp=1))
    store.put_kernel(_kernel(3, bp=2))
    for k in (1, 1, 2, 3):
        store.record_outcome(_report(k, contribution=0.1))
    assert store.delete_blueprint(_bp(1).blueprint_id) == (True, 2, 3)
    assert store.delete_blueprint(_bp(1).blueprint_id) == (False, 0, 0)
    assert store.kernel_ids() == [f"sha256:{3:064x}"]
    with pytest.raises(NotFoundError):
        store.get_blueprint(_bp(1).blueprint_id)
    assert store.field_reports(f"sha256:{1:064x}") == []
    assert store.artifact_shas() == {_kernel(3).artifact_sha256}
    # The id is free again: the same blueprint and kernel can be stored afresh.
    assert store.put_blueprint(_bp(1)) and store.put_kernel(_kernel(1, bp=1))
    assert store.get_kernel(f"sha256:{1:064x}").stats.outcomes == 0


def test_delete_kernel_and_field_reports_recompute_stats(store: MetadataStore) -> None:
    store.put_kernel(_kernel(1))
    store.put_kernel(_kernel(2))
    for run, c in (("good", 0.5), ("good", 0.3), ("poison", 1e300)):
        store.record_outcome(FieldReportRow(request_id=str(uuid.uuid4()),
                                            kernel_id=f"sha256:{1:064x}", run_id=run,
                                            slot_id="s", contribution=c, fate=FATE_FOSSILIZED))
    store.record_outcome(FieldReportRow(request_id=str(uuid.uuid4()),
                                        kernel_id=f"sha256:{2:064x}", run_id="poison",
                                        slot_id="s", contribution=-0.2, fate=FATE_PRUNED))
    assert store.delete_field_reports(run_id="poison") == 2
    s1 = store.get_kernel(f"sha256:{1:064x}").stats
    assert (s1.outcomes, s1.fossilized) == (2, 2)
    assert s1.sum_contribution == pytest.approx(0.8)
    assert s1.clipped_contribution == pytest.approx(0.8)
    assert store.get_kernel(f"sha256:{2:064x}").stats.outcomes == 0
    assert store.delete_field_reports(kernel_id=f"sha256:{1:064x}", run_id="other") == 0
    with pytest.raises(InvalidArgumentError):
        store.delete_field_reports()
    assert store.delete_kernel(f"sha256:{1:064x}") == (True, 2)
    assert store.delete_kernel(f"sha256:{1:064x}") == (False, 0)
    assert store.kernel_ids() == [f"sha256:{2:064x}"]


def test_only_kernels_of_the_given_signers_are_offered(store: MetadataStore) -> None:
    for i, key in ((1, "aaaaaaaaaaaaaaaa"), (2, "bbbbbbbbbbbbbbbb"), (3, "aaaaaaaaaaaaaaaa")):
        row = _kernel(i)
        store.put_kernel(KernelRow(**{**row.__dict__, "key_id": key}))

    def offered(keys: tuple[str, ...] | None, **kw: object) -> list[int]:
        return sorted(int(e.row.kernel_id[7:], 16) for e in store.query_kernels(
            KernelQuery(key_ids=keys, **kw)).items)  # type: ignore[arg-type]

    assert offered(None) == [1, 2, 3]
    assert offered(("aaaaaaaaaaaaaaaa",)) == [1, 3]
    assert offered(()) == []
    # The trusted set is server state: a token from one page still works after it changed.
    page = store.query_kernels(KernelQuery(key_ids=("aaaaaaaaaaaaaaaa",), page_size=1))
    rest = store.query_kernels(KernelQuery(key_ids=("aaaaaaaaaaaaaaaa", "bbbbbbbbbbbbbbbb"),
                                           page_size=1, page_token=page.next_page_token))
    assert len(rest.items) == 1
