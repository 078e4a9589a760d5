"""The contracts hold: buf lint is clean, generated/ is fresh, nothing breaks the released
contract (the committed baseline image) or main's protos."""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
BUF = Path(sys.executable).parent / "buf"


def _gen_protos():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import gen_protos
    finally:
        sys.path.pop(0)
    return gen_protos


def build_image(proto_root: Path, out: Path) -> None:
    """A buf image of every .proto under proto_root, built the way gen_protos builds it."""
    from grpc_tools import protoc

    gp = _gen_protos()
    desc = out.with_suffix(".validate.binpb")
    desc.write_bytes(gp.validate_descriptor_set())
    files = sorted(str(p.relative_to(proto_root)) for p in proto_root.rglob("*.proto"))
    rc = protoc.main([
        "grpc_tools.protoc", f"--descriptor_set_in={desc}", f"-I{proto_root}",
        f"-I{Path(protoc.__file__).parent / '_proto'}", "--include_imports", "--include_source_info",
        f"--descriptor_set_out={out}", *files,
    ])
    assert rc == 0, f"protoc failed on {proto_root}"


def _git(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["git", *args], cwd=ROOT, check=False, capture_output=True)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("img") / "image.binpb"
    build_image(ROOT / "proto", out)
    return out


def test_buf_lint_is_clean(image: Path) -> None:
    r = subprocess.run([str(BUF), "lint", str(image), "--path", "esper"], cwd=ROOT, check=False, capture_output=True, text=True)
    assert r.returncode == 0, f"buf lint found problems:\n{r.stdout}{r.stderr}"


def test_buf_lint_catches_a_violation(tmp_path: Path) -> None:
    # The lint gate must be able to fail: an enum without an *_UNSPECIFIED zero value.
    (tmp_path / "esper/bad/v1").mkdir(parents=True)
    (tmp_path / "esper/bad/v1/bad.proto").write_text(
        'syntax = "proto3";\npackage esper.bad.v1;\nenum Color { RED = 0; }\n')
    build_image(tmp_path, tmp_path / "bad.binpb")
    r = subprocess.run([str(BUF), "lint", str(tmp_path / "bad.binpb"), "--path", "esper"],
                       cwd=ROOT, check=False, capture_output=True, text=True)
    assert r.returncode != 0
    assert "UNSPECIFIED" in r.stdout + r.stderr


def test_generated_code_is_up_to_date() -> None:
    r = subprocess.run([sys.executable, str(ROOT / "scripts/gen_protos.py"), "--check"],
                       cwd=ROOT, check=False, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "up to date" in r.stdout


def _base_ref() -> str | None:
    """main when it exists (on main itself: its HEAD, so uncommitted edits are checked)."""
    for ref in ("main", "HEAD"):
        if _git("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}").returncode == 0:
            return ref
    return None


def test_buf_breaking_against_main(image: Path, tmp_path: Path) -> None:
    ref = _base_ref()
    if ref is None:
        pytest.skip("no git history here to compare against")
    archive = _git("archive", "--format=tar", ref, "proto")
    if archive.returncode != 0:
        pytest.skip(f"{ref} has no proto/ yet ({archive.stderr.decode().strip()})")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(tmp_path, filter="data")
    against = tmp_path / "against.binpb"
    build_image(tmp_path / "proto", against)
    r = subprocess.run([str(BUF), "breaking", str(image), "--against", str(against), "--path", "esper"],
                       cwd=ROOT, check=False, capture_output=True, text=True)
    assert r.returncode == 0, f"proto/ breaks {ref}'s contracts:\n{r.stdout}{r.stderr}"


def test_buf_breaking_detects_a_renumbered_field(image: Path, tmp_path: Path) -> None:
    # Renumbering a field of a copy of today's contracts must be reported as breaking.
    import shutil

    shutil.copytree(ROOT / "proto", tmp_path / "proto")
    f = tmp_path / "proto/esper/urza/v1/urza_service.proto"
    text = f.read_text()
    old = 'string blueprint_id = 1 [(buf.validate.field).string.pattern = "^bp-[0-9a-f]{16}$"];'
    assert old in text
    f.write_text(text.replace(old, old.replace("= 1 [", "= 7 ["), 1))
    changed = tmp_path / "changed.binpb"
    build_image(tmp_path / "proto", changed)
    r = subprocess.run([str(BUF), "breaking", str(changed), "--against", str(image), "--path", "esper"],
                       cwd=ROOT, check=False, capture_output=True, text=True)
    assert r.returncode != 0
    assert "GetBlueprintRequest" in r.stdout + r.stderr


# ---- the released contract: a baseline image that a change cannot move by itself -------

BASELINE = ROOT / "proto" / "baseline" / "v1.binpb"


def _breaking(image: Path, against: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BUF), "breaking", str(image), "--against", str(against), "--path", "esper"],
                          cwd=ROOT, check=False, capture_output=True, text=True)


def test_buf_breaking_against_the_committed_baseline(image: Path) -> None:
    # main's HEAD is the very tree under test once a change is committed, so comparing with
    # it cannot fail on main; the baseline moves only by `gen_protos.py --write-baseline`.
    assert BASELINE.is_file(), f"{BASELINE} is missing: `python scripts/gen_protos.py --write-baseline`"
    r = _breaking(image, BASELINE)
    assert r.returncode == 0, (
        f"proto/ breaks the released contract {BASELINE.relative_to(ROOT)}:\n{r.stdout}{r.stderr}"
        "Evolve protos additively (new fields/messages/RPCs, `reserved`, `deprecated`).")


def test_the_baseline_covers_the_contract_files() -> None:
    # A baseline without the services' files would let any change of them through.
    from google.protobuf import descriptor_pb2

    fds = descriptor_pb2.FileDescriptorSet.FromString(BASELINE.read_bytes())
    names = {f.name for f in fds.file if f.name.startswith("esper/")}
    for part in ("urza", "tamiyo", "tolaria", "tezzeret", "karn"):
        assert f"esper/{part}/v1/{part}_service.proto" in names, sorted(names)
    assert len(names) >= 10


def test_a_breaking_change_against_the_baseline_is_caught(tmp_path: Path) -> None:
    # A deliberate breaking change in a copy of proto/: a field renamed and another one
    # removed from messages the released contract has. The baseline gate must report both.
    import shutil

    shutil.copytree(ROOT / "proto", tmp_path / "proto")
    f = tmp_path / "proto/esper/tolaria/v1/tolaria_service.proto"
    text = f.read_text()
    assert "uint64 global_step = 5;" in text and "uint64 last_sequence = 13;" in text
    text = text.replace("uint64 global_step = 5;", "uint64 global_steps = 5;", 1)
    text = text.replace("uint64 last_sequence = 13;\n", "", 1)
    f.write_text(text)
    changed = tmp_path / "changed.binpb"
    build_image(tmp_path / "proto", changed)
    r = _breaking(changed, BASELINE)
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert "global_step" in out and "last_sequence" in out, out


def test_each_committed_baseline_keeps_the_one_before(tmp_path: Path) -> None:
    # Updating the baseline is deliberate, never a way to wave a breaking change through:
    # every version of it in git history must be compatible with its predecessor.
    rel = str(BASELINE.relative_to(ROOT))
    log = _git("log", "--format=%H", "--", rel)
    commits = log.stdout.decode().split() if log.returncode == 0 else []
    if len(commits) < 2:
        pytest.skip(f"{rel} has {len(commits)} committed version(s): nothing to compare yet")
    versions = []
    for i, sha in enumerate(reversed(commits)):
        blob = _git("show", f"{sha}:{rel}")
        if blob.returncode != 0:  # the commit deleted it
            continue
        path = tmp_path / f"baseline-{i}.binpb"
        path.write_bytes(blob.stdout)
        versions.append((sha[:12], path))
    for (old_sha, old), (new_sha, new) in zip(versions, versions[1:]):
        r = _breaking(new, old)
        assert r.returncode == 0, f"baseline {new_sha} breaks baseline {old_sha}:\n{r.stdout}{r.stderr}"
