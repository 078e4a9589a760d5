"""Regenerate generated/ from proto/: Python messages, gRPC stubs, .pyi stubs, and
generated/esper.protoset for clients in other languages.

One command, no network:  python scripts/gen_protos.py [--check] [--seed-buf-cache [DIR]]

`generated/esper.protoset` is a FileDescriptorSet of every esper proto with all it imports
(google/protobuf, google/rpc status and error_details, buf/validate, grpc.health.v1), for
`grpcurl -protoset` and `@grpc/proto-loader`'s loadFileDescriptorSetFromBuffer.

`--seed-buf-cache` puts the protovalidate module that buf.lock pins into buf's module
cache (`$BUF_CACHE_DIR`, default ~/.cache/buf) from `third_party/protovalidate/` (the same
files, checked against the lock's b5 digest first), so that a plain `buf lint` / `buf
build` works on a machine that cannot reach buf.build.

Two problems are solved here, once:
* protovalidate's `buf/validate/validate.proto` is not shipped as source and buf's
  registry is unreachable, so its FileDescriptorProto is taken from the bytes the
  `protovalidate` wheel embeds and handed to protoc as a descriptor set.
* protoc writes absolute imports named after the proto package (`from esper.common.v1
  import ...`), which would resolve to the hand-written `esper/` package. Every generated
  import of `esper.*` and `buf.*` is rewritten to `generated.esper.*` / `generated.buf.*`,
  and so is the module name each `*_pb2` gives its message classes (`__module__`), so
  that pickle finds them where they are imported from (a pickled `SiteSignature` must
  not name the hand-written `esper` package).

`--check` regenerates into a temporary folder and exits 1 if anything differs from
generated/ (CI runs it through the test suite).

`--write-baseline` writes proto/baseline/v1.binpb, the image of the released contract
that `buf breaking` checks proto/ against (tests/unit/contracts). A change cannot move it
by itself: run it deliberately, when a release fixes the contract, and commit the image
on its own (the test also checks that each committed baseline keeps the one before it).
"""

from __future__ import annotations

import argparse
import ast
import filecmp
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
OUT_DIR = ROOT / "generated"
PROTOSET = "esper.protoset"
VENDORED_PROTOVALIDATE = ROOT / "third_party" / "protovalidate"
BUF_LOCK = ROOT / "buf.lock"
BASELINE = PROTO_DIR / "baseline" / "v1.binpb"
_IMPORT_RE = re.compile(r"^(\s*)(from|import) (esper|buf)\.", re.MULTILINE)
_MODULE_NAME_RE = re.compile(r"(BuildTopDescriptorsAndMessages\(DESCRIPTOR, ')(esper|buf)\.")


def validate_descriptor_set() -> bytes:
    """FileDescriptorSet with buf/validate/validate.proto and the WKTs it imports."""
    import protovalidate
    from google.protobuf import descriptor_pb2, duration_pb2, field_mask_pb2, timestamp_pb2

    src = Path(protovalidate.__file__).parent / "_gen/buf/validate/validate_pb.py"
    raw: bytes | None = None
    for node in ast.walk(ast.parse(src.read_text())):
        if (
            isinstance(node, ast.Call)
            and getattr(node.func, "id", None) == "file_desc"
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            raw = node.args[0].value
            break
    if raw is None:
        raise SystemExit(f"could not find validate.proto's descriptor in {src}")
    fds = descriptor_pb2.FileDescriptorSet()
    for mod in (descriptor_pb2, duration_pb2, field_mask_pb2, timestamp_pb2):
        mod.DESCRIPTOR.CopyToProto(fds.file.add())
    fds.file.add().ParseFromString(raw)
    return fds.SerializeToString()


def proto_files() -> list[str]:
    return sorted(str(p.relative_to(PROTO_DIR)) for p in PROTO_DIR.rglob("*.proto"))


def generate(out: Path, *, image: Path | None = None, source_info: bool = True) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        desc = Path(tmp) / "validate.binpb"
        desc.write_bytes(validate_descriptor_set())
        from grpc_tools import protoc

        wkt_include = Path(protoc.__file__).parent / "_proto"
        args = [
            "grpc_tools.protoc",
            f"--descriptor_set_in={desc}",
            f"-I{PROTO_DIR}",
            f"-I{wkt_include}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            f"--pyi_out={out}",
            *proto_files(),
            "buf/validate/validate.proto",
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        write_protoset(out / PROTOSET, desc, wkt_include)
        if image is not None:
            img_args = [
                "grpc_tools.protoc",
                f"--descriptor_set_in={desc}",
                f"-I{PROTO_DIR}",
                f"-I{wkt_include}",
                "--include_imports",
                *(["--include_source_info"] if source_info else []),
                f"--descriptor_set_out={image}",
                *proto_files(),
            ]
            if protoc.main(img_args) != 0:
                raise SystemExit("protoc (image) failed")
    for path in out.rglob("*.py*"):
        if path.suffix in (".py", ".pyi"):
            text = path.read_text()
            new = _IMPORT_RE.sub(r"\1\2 generated.\3.", text)
            new = _MODULE_NAME_RE.sub(r"\1generated.\2.", new)
            if new != text:
                path.write_text(new)
    for d in [out, *[p for p in out.rglob("*") if p.is_dir()]]:
        if d.name != "__pycache__":
            (d / "__init__.py").touch()


def write_protoset(path: Path, validate_set: Path, wkt_include: Path) -> None:
    """Every esper proto and all its imports as one FileDescriptorSet (with source info)."""
    import google.rpc
    from google.protobuf import descriptor_pb2
    from grpc_health.v1 import health_pb2
    from grpc_tools import protoc

    googleapis = Path(next(iter(google.rpc.__path__))).parent.parent
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "set.binpb"
        args = [
            "grpc_tools.protoc",
            f"--descriptor_set_in={validate_set}",
            f"-I{PROTO_DIR}",
            f"-I{googleapis}",
            f"-I{wkt_include}",
            "--include_imports",
            "--include_source_info",
            f"--descriptor_set_out={raw}",
            *proto_files(),
            "google/rpc/status.proto",
            "google/rpc/error_details.proto",
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc (protoset) failed")
        fds = descriptor_pb2.FileDescriptorSet.FromString(raw.read_bytes())
    health_pb2.DESCRIPTOR.CopyToProto(fds.file.add())
    path.write_bytes(fds.SerializeToString(deterministic=True))


def _module_files(root: Path) -> list[Path]:
    """The files buf counts as a module's: .proto files, LICENSE and README.md."""
    return sorted(p for p in root.rglob("*") if p.is_file() and
                  (p.suffix == ".proto" or p.relative_to(root).as_posix() in ("LICENSE", "README.md")))


def b5_digest(root: Path) -> str:
    """buf's b5 digest of a module without dependencies (its .proto files, LICENSE and README.md).

    shake256 of the manifest ("shake256:<hex>  <path>" per file, sorted by path), then
    shake256 of "shake256:<hex of that>", as buf's bufmodule/digest.go computes it.
    """
    import hashlib

    files = _module_files(root)
    manifest = "".join(f"shake256:{hashlib.shake_256(p.read_bytes()).hexdigest(64)}  {p.relative_to(root).as_posix()}\n"
                       for p in sorted(files, key=lambda p: p.relative_to(root).as_posix()))
    files_digest = hashlib.shake_256(manifest.encode()).hexdigest(64)
    return "b5:" + hashlib.shake_256(f"shake256:{files_digest}".encode()).hexdigest(64)


def locked_protovalidate() -> tuple[str, str, str]:
    """(name, commit, digest) of protovalidate in buf.lock."""
    import yaml

    lock = yaml.safe_load(BUF_LOCK.read_text())
    for dep in lock.get("deps", []):
        if dep["name"] == "buf.build/bufbuild/protovalidate":
            return dep["name"], dep["commit"], dep["digest"]
    raise SystemExit(f"{BUF_LOCK} pins no buf.build/bufbuild/protovalidate")


def seed_buf_cache(cache_dir: Path) -> Path:
    """Put the vendored protovalidate module into buf's v3 module cache; returns its dir.

    Raises SystemExit when the vendored files do not hash to buf.lock's digest (buf would
    refuse them too).
    """
    name, commit, digest = locked_protovalidate()
    got = b5_digest(VENDORED_PROTOVALIDATE)
    if got != digest:
        raise SystemExit(f"{VENDORED_PROTOVALIDATE} hashes to {got}, buf.lock pins {digest}")
    registry, owner, module = name.split("/")
    target = cache_dir / "v3" / "modules" / "b5" / registry / owner / module / commit
    files = target / "files"
    if files.exists():
        shutil.rmtree(files)
    for src in _module_files(VENDORED_PROTOVALIDATE):
        dest = files / src.relative_to(VENDORED_PROTOVALIDATE)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
    # module.yaml last: buf treats an entry without it as absent.
    (target / "module.yaml").write_text("version: v1\nfiles_dir: files\n")
    return target


def build_image(path: Path, *, source_info: bool = True) -> None:
    """Write a buf image (FileDescriptorSet, with source info unless told not to) of proto/."""
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp) / "gen", image=path, source_info=source_info)


def _same_tree(a: Path, b: Path) -> list[str]:
    diffs: list[str] = []

    def files(root: Path) -> set[str]:
        return {
            str(p.relative_to(root))
            for p in root.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts
        }

    fa, fb = files(a), files(b)
    diffs += [f"only in generated/: {p}" for p in sorted(fa - fb)]
    diffs += [f"missing from generated/: {p}" for p in sorted(fb - fa)]
    diffs += [f"differs: {p}" for p in sorted(fa & fb) if not filecmp.cmp(a / p, b / p, False)]
    return diffs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="fail if generated/ is stale")
    ap.add_argument("--image", type=Path, help="also write a buf image to this path")
    ap.add_argument("--seed-buf-cache", nargs="?", type=Path, metavar="DIR",
                    const=Path(os.environ.get("BUF_CACHE_DIR") or Path.home() / ".cache" / "buf"),
                    help="put buf.lock's protovalidate into buf's module cache (offline `buf lint`)")
    ap.add_argument("--write-baseline", action="store_true",
                    help=f"write the released-contract image {BASELINE.relative_to(ROOT)} and exit")
    ns = ap.parse_args()
    if ns.write_baseline:
        BASELINE.parent.mkdir(parents=True, exist_ok=True)
        # No source info: buf breaking needs only the descriptors, and the image stays small.
        build_image(BASELINE, source_info=False)
        print(f"wrote {BASELINE.relative_to(ROOT)}; commit it on its own")
        return 0
    if ns.seed_buf_cache is not None:
        print(f"seeded {seed_buf_cache(ns.seed_buf_cache)}")
        return 0
    if ns.image:
        build_image(ns.image)
    if ns.check:
        with tempfile.TemporaryDirectory() as tmp:
            fresh = Path(tmp) / "generated"
            generate(fresh)
            diffs = _same_tree(OUT_DIR, fresh)
        if diffs:
            print("generated/ is stale; run `python scripts/gen_protos.py`:", *diffs, sep="\n  ")
            return 1
        print("generated/ is up to date")
        return 0
    if OUT_DIR.exists():
        shutil.rmtree(OUT_DIR)
    generate(OUT_DIR)
    print(f"wrote {OUT_DIR.relative_to(ROOT)}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
