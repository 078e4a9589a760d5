"""UrzaLibrary core: verification before storage, records, queries, outcomes."""

from __future__ import annotations

from pathlib import Path

import pytest

from esper.blueprints import blueprint_id, site_key, site_signature
from esper.blueprints.artifact import SigningKey
from esper.errors import (
    ArtifactError,
    BlueprintError,
    DataLossError,
    InvalidArgumentError,
    NotFoundError,
    OutOfRangeError,
    UntrustedKeyError,
)
from esper.urza.blobs import BlobStore
from esper.urza.library import TrustedKeySource, UrzaLibrary
from esper.urza.store.sqlite import SqliteStore
from generated.esper.common.v1 import blueprint_pb2
from generated.esper.urza.v1 import urza_service_pb2 as pb
from tests.unit.urza.kernels_helper import blueprint, flip_byte, make_artifact


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return SigningKey.generate()


@pytest.fixture
def keys_dir(tmp_path: Path, key: SigningKey) -> Path:
    d = tmp_path / "keys"
    d.mkdir()
    (d / "tezzeret.pem").write_bytes(key.public_pem())
    return d


@pytest.fixture
def lib(tmp_path: Path, keys_dir: Path) -> UrzaLibrary:
    library = UrzaLibrary(SqliteStore(tmp_path / "urza.db"), BlobStore(tmp_path / "blobs"),
                          TrustedKeySource(keys_dir))
    yield library
    library.close()


def _blob_files(lib: UrzaLibrary) -> list[Path]:
    return [p for p in lib.blobs.root.rglob("*") if p.is_file()]


def test_put_blueprint_is_content_addressed(lib: UrzaLibrary) -> None:
    bp = blueprint("bottleneck_mlp")
    bp.blueprint_id = "ignored-on-input"
    bp_id, created = lib.put_blueprint(bp)
    assert bp_id == blueprint_id(bp) and created is True
    assert lib.put_blueprint(bp) == (bp_id, False)
    got = lib.get_blueprint(bp_id)
    assert got.blueprint_id == bp_id and got.ir == bp.ir
    listed, token = lib.list_blueprints(tags=["mlp"])
    assert [b.blueprint_id for b in listed] == [bp_id] and token == ""


def test_put_blueprint_rejects_invalid_ir_naming_the_field(lib: UrzaLibrary) -> None:
    bp = blueprint("bottleneck_mlp")
    bp.ir.nodes[1].op = "exec_python"
    with pytest.raises(BlueprintError, match="exec_python") as err:
        lib.put_blueprint(bp)
    assert err.value.field.startswith("blueprint.ir")
    cyclic = blueprint("bottleneck_mlp")
    cyclic.ir.nodes[0].inputs[:] = ["up"]
    with pytest.raises(BlueprintError):
        lib.put_blueprint(cyclic)
    assert lib.list_blueprints()[0] == []


def test_put_kernel_verifies_then_stores_record(lib: UrzaLibrary, key: SigningKey) -> None:
    lib.put_blueprint(blueprint("lowrank_adapter"))
    kernel_id, data, site = make_artifact(key, tags=("fast",))
    assert lib.put_kernel(data) == (kernel_id, True)
    assert lib.put_kernel(data) == (kernel_id, False)
    rec = lib.kernel_record(kernel_id)
    assert rec.artifact_size == len(data)
    assert rec.manifest.site == site
    assert rec.manifest.profile.parameters > 0
    assert rec.blueprint.name == "lowrank_adapter"
    assert list(rec.manifest.tags) == ["fast"]
    assert lib.read_kernel(kernel_id).data == data
    assert lib.store.get_kernel(kernel_id).row.site_key == site_key(site)


@pytest.mark.parametrize("where", ["manifest", "signature", "ir", "weights"])
def test_tampered_artifact_is_rejected_and_nothing_is_written(
        lib: UrzaLibrary, key: SigningKey, where: str) -> None:
    from generated.esper.common.v1 import kernel_pb2

    _, data, _ = make_artifact(key)
    art = kernel_pb2.KernelArtifact.FromString(data)
    part = bytearray(getattr(art, where))
    part[len(part) // 2] ^= 0x01
    setattr(art, where, bytes(part))
    with pytest.raises(ArtifactError) as err:
        lib.put_kernel(art.SerializeToString())
    assert not isinstance(err.value, UntrustedKeyError) or where == "manifest"
    assert _blob_files(lib) == []
    assert lib.store.kernel_ids() == []


def test_untrusted_key_is_refused_until_its_public_key_is_trusted(
        lib: UrzaLibrary, keys_dir: Path) -> None:
    stranger = SigningKey.generate()
    _, data, _ = make_artifact(stranger)
    with pytest.raises(UntrustedKeyError, match=stranger.key_id):
        lib.put_kernel(data)
    assert _blob_files(lib) == []
    # A signer that publishes its key after Urza started is picked up on its next upload.
    (keys_dir / "late.pem").write_bytes(stranger.public_pem())
    kernel_id, created = lib.put_kernel(data)
    assert created and kernel_id.startswith("sha256:")


def test_declared_size_and_hash_must_match(lib: UrzaLibrary, key: SigningKey) -> None:
    _, data, _ = make_artifact(key)
    with pytest.raises(InvalidArgumentError, match="total_size") as err:
        lib.put_kernel(data, expected_size=len(data) + 1)
    assert err.value.field == "header.total_size"
    with pytest.raises(InvalidArgumentError, match="artifact_sha256") as err:
        lib.put_kernel(data, expected_sha256="0" * 64)
    assert err.value.field == "header.artifact_sha256"


def test_read_kernel_errors(lib: UrzaLibrary, key: SigningKey) -> None:
    kernel_id, data, _ = make_artifact(key)
    lib.put_kernel(data)
    assert lib.read_kernel(kernel_id, offset=len(data)).data == data
    with pytest.raises(OutOfRangeError, match=f"offset={len(data) + 1}"):
        lib.read_kernel(kernel_id, offset=len(data) + 1)
    with pytest.raises(NotFoundError):
        lib.read_kernel("sha256:" + "0" * 64)
    blob = lib.blobs.path_for(lib.kernel_record(kernel_id).artifact_sha256)
    blob.write_bytes(flip_byte(blob.read_bytes(), 100))
    with pytest.raises(DataLossError, match="corrupt"):
        lib.read_kernel(kernel_id)
    with pytest.raises(DataLossError, match="missing"):
        lib.read_kernel(kernel_id)  # quarantined: the listing remains, the bytes do not
    lib.put_kernel(data)  # re-upload repairs it
    assert lib.read_kernel(kernel_id).data == data


def test_query_by_site_and_outcome_order(lib: UrzaLibrary, key: SigningKey) -> None:
    k16, d16, s16 = make_artifact(key, channels=16)
    k32, d32, _ = make_artifact(key, channels=32)
    kmlp, dmlp, _ = make_artifact(key, name="bottleneck_mlp", channels=16)
    for d in (d16, d32, dmlp):
        lib.put_kernel(d)
    recs, _ = lib.query_kernels(site=s16)
    assert {r.kernel_id for r in recs} == {k16, kmlp}
    small, _ = lib.query_kernels(site=s16, max_parameters=lib.kernel_record(k16).manifest.profile.parameters)
    assert [r.kernel_id for r in small] == [k16]

    def report(kid: str, contribution: float, fate: int) -> pb.FieldReport:
        return pb.FieldReport(kernel_id=kid, run_id="r1", slot_id="body.0",
                              contribution=contribution, fate=fate)

    assert lib.record_outcome(report(kmlp, 0.3, pb.SEED_FATE_FOSSILIZED), "a") is True
    assert lib.record_outcome(report(kmlp, 0.3, pb.SEED_FATE_FOSSILIZED), "a") is False
    assert lib.record_outcome(report(k16, -0.2, pb.SEED_FATE_PRUNED), "b") is True
    assert lib.record_outcome(report(k16, -0.2, pb.SEED_FATE_PRUNED)) is True  # no key: new
    recs, _ = lib.query_kernels()
    assert [r.kernel_id for r in recs] == [kmlp, k32, k16]
    assert recs[0].stats.outcomes == 1 and recs[0].stats.fossilized == 1
    assert recs[2].stats.mean_contribution == pytest.approx(-0.2)
    assert recs[2].stats.pruned == 2
    with pytest.raises(NotFoundError):
        lib.record_outcome(report("sha256:" + "1" * 64, 0.0, pb.SEED_FATE_PRUNED))


def test_blueprint_layout_must_validate(lib: UrzaLibrary) -> None:
    conv = blueprint("conv3x3_residual")
    bad = blueprint_pb2.Blueprint()
    bad.CopyFrom(conv)
    bad.layouts.append(site_signature("NC", 8).layout)  # a conv2d IR cannot run on (N, C)
    with pytest.raises(BlueprintError, match="declares layout NC"):
        lib.put_blueprint(bad)
    assert lib.put_blueprint(conv)[1] is True
