"""`esper tamiyo train`: train Tamiyo's learned policy (`esper.tamiyo.gnn.fit.train_policy`)
from field reports of in-process runs (`esper.experiments.fieldreports.collect_inprocess`,
which runs Tolaria's trainer: the top floor) and/or a live platform's JetStream.

Registered by `esper/experiments/cli.py`. Heavy imports (torch, torch_geometric) stay
inside the command.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from esper.errors import ConfigError

_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    tamiyo = sub.add_parser("tamiyo", help="Tamiyo's learned policy: train it from field reports")
    cmds = tamiyo.add_subparsers(dest="tamiyo", metavar="<command>")
    cmds.required = True
    t = cmds.add_parser(
        "train", help="collect field reports, imitate the heuristic, improve with AWR, write a versioned policy",
        description="Train the GNN policy: field reports (in-process runs under heuristic + ε-exploration "
                    "and/or a live platform's JetStream + Urza), imitation, advantage-weighted regression. "
                    "Writes OUT/<name>-<version>.json + .safetensors and points OUT/<name>.json at it "
                    "(tamiyo settings: policy: gnn, gnn.policy_file: OUT/<name>.json; it hot-reloads). "
                    "The policy is signed (Ed25519) with the key Tezzeret signs kernels with: --signing-key, "
                    "else ESPER_SIGNING_KEY / ESPER_SIGNING_KEY_FILE, else DATA_DIR/tezzeret/signing_key.pem "
                    "(created on first use); its public key is written to the trusted keys directory "
                    "(--trusted-keys, else ESPER_TRUSTED_KEYS_DIR, else DATA_DIR/trusted_keys).")
    t.add_argument("--out", type=Path, required=True, help="output directory of policy files")
    t.add_argument("--name", default="gnn", help="policy file stem (default gnn)")
    t.add_argument("--version", default="", help="policy version (default: UTC timestamp + random suffix)")
    t.add_argument("--collect-runs", type=int, default=0, help="in-process runs per task (0: none)")
    t.add_argument("--tasks", default="mnist1d,spirals", help="comma-separated tasks to collect on")
    t.add_argument("--seeds", default="0-4", help="run seeds, e.g. 0-4 or 0,1,2 (the first N are used)")
    t.add_argument("--epochs", type=int, help="epochs per collected run (default: the task's benchmark setting)")
    t.add_argument("--epsilon", type=float, default=0.2, help="exploration rate of the behaviour policy")
    t.add_argument("--synthetic", type=int, default=600, help="synthetic boundaries for imitation")
    t.add_argument("--steps", type=int, default=200, help="imitation steps per member")
    t.add_argument("--awr-steps", type=int, default=150, help="advantage-weighted steps per member")
    t.add_argument("--beta", type=float, default=0.5, help="AWR temperature (reward units)")
    t.add_argument("--members", type=int, default=4, help="ensemble members")
    t.add_argument("--hidden", type=int, default=32, help="node embedding width")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--jetstream", default="", help="NATS URL: also read field reports a platform published")
    t.add_argument("--urza", default="", help="Urza host:port for the kernels on offer (with --jetstream)")
    t.add_argument("--durable", default="tamiyo-field-reports", help="JetStream durable consumer name")
    t.add_argument("--signing-key", default="", help="Ed25519 private key file (PEM or 64 hex) to sign with")
    t.add_argument("--data-dir", type=Path, default=Path(".esper"),
                   help="the platform's data directory: its Tezzeret key signs when no other key is given")
    t.add_argument("--trusted-keys", default="", help="directory the public key is written to")
    t.set_defaults(func=_train)


def parse_seeds(text: str) -> tuple[int, ...]:
    """"0-4" → (0, 1, 2, 3, 4); "1,5,7" → (1, 5, 7)."""
    out: list[int] = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if m is None:
            raise ConfigError(f"seeds={text!r}: {part!r} is not N or N-M (e.g. 0-4 or 0,1,2)")
        lo, hi = int(m[1]), int(m[2] or m[1])
        if hi < lo:
            raise ConfigError(f"seeds={text!r}: range {part!r} runs backwards")
        out += range(lo, hi + 1)
    return tuple(out)


def _train(args: argparse.Namespace) -> int:
    if args.version and not _VERSION.match(args.version):
        raise ConfigError(f"--version={args.version!r} must match {_VERSION.pattern} (it names files)")
    seeds = parse_seeds(args.seeds)
    from esper.tamiyo.gnn.fit import TrainSpec, train_policy
    from esper.tamiyo.gnn.io import signing_key_for

    spec = TrainSpec.from_dict({
        "tasks": tuple(t for t in args.tasks.split(",") if t), "seeds": seeds,
        "collect_runs": args.collect_runs, "epochs": args.epochs,
        "epsilon": args.epsilon, "synthetic": args.synthetic, "imitation_steps": args.steps,
        "net": {"members": args.members, "hidden": args.hidden}, "awr": {"steps": args.awr_steps, "beta": args.beta},
        "seed": args.seed,
    })
    if args.jetstream and not args.urza:
        raise ConfigError("--jetstream needs --urza host:port (the kernels on offer come from Urza)")
    # After the arguments are known good: finding the key may create the data dir's key.
    key, pub = signing_key_for(args.signing_key or None, data_dir=args.data_dir,
                               trusted_keys_dir=args.trusted_keys or None)
    print(f"signing with key {key.key_id} (public key {pub})")
    reports = []
    if args.jetstream:
        import os

        from esper.tamiyo.fieldreports import UrzaCandidates, read_jetstream

        candidates = UrzaCandidates(args.urza, api_key=os.environ.get("ESPER_API_KEY"))
        try:
            reports = read_jetstream(args.jetstream, candidates, durable=args.durable)
        finally:
            candidates.close()
        print(f"read {len(reports)} run report(s) from {args.jetstream}")
    from esper.experiments.fieldreports import collect_inprocess

    train_policy(spec, args.out, signing_key=key, name=args.name, version=args.version, reports=reports,
                 collector=collect_inprocess)
    return 0


