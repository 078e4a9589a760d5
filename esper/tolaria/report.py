"""A run's report: Markdown with PNG plots, built only from its event log.

Everything shown is read from the EventEnvelopes the run emitted (the same ones
`WatchRun` streams), so the report cannot disagree with what the run did.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from generated.esper.common.v1 import seed_pb2
from generated.esper.oona.v1 import events_pb2

# Lifecycle transitions the report marks on every plot: stage entered → (label, colour, marker).
_MARKS: dict[int, tuple[str, str, str]] = {
    seed_pb2.SEED_STAGE_GERMINATED: ("germinate", "tab:green", "^"),
    seed_pb2.SEED_STAGE_FOSSILIZED: ("fossilize", "tab:blue", "s"),
    seed_pb2.SEED_STAGE_PRUNED: ("prune", "tab:red", "v"),
}


@dataclass(kw_only=True)
class Mark:
    epoch: int
    slot_id: str
    kind: str
    blueprint_id: str
    reason: str


@dataclass(kw_only=True)
class RunHistory:
    """The parts of an event log a report needs, in event order."""

    run_id: str = ""
    epochs: list[events_pb2.EpochMetrics] = field(default_factory=list)
    marks: list[Mark] = field(default_factory=list)
    lifecycle: list[events_pb2.EventEnvelope] = field(default_factory=list)
    degradations: list[events_pb2.EventEnvelope] = field(default_factory=list)
    decisions: int = 0
    decisions_rejected: int = 0
    final_state: str = ""
    final_detail: str = ""
    started_at: float | None = None
    ended_at: float | None = None

    @classmethod
    def from_events(cls, events: Iterable[events_pb2.EventEnvelope]) -> RunHistory:
        h = cls()
        by_epoch: dict[int, events_pb2.EpochMetrics] = {}
        for env in events:
            h.run_id = h.run_id or env.run_id
            t = env.emitted_at.ToNanoseconds() / 1e9
            h.started_at = t if h.started_at is None else min(h.started_at, t)
            h.ended_at = t if h.ended_at is None else max(h.ended_at, t)
            kind = env.WhichOneof("payload")
            if kind == "epoch_metrics":
                # A resumed worker re-runs epochs after its checkpoint: the later one wins.
                by_epoch[env.epoch_metrics.epoch] = env.epoch_metrics
            elif kind == "lifecycle":
                h.lifecycle.append(env)
                mark = _MARKS.get(env.lifecycle.to_stage)
                if mark is not None:
                    h.marks.append(
                        Mark(
                            epoch=env.epoch,
                            slot_id=env.lifecycle.slot_id,
                            kind=mark[0],
                            blueprint_id=env.lifecycle.blueprint_id,
                            reason=env.lifecycle.reason,
                        )
                    )
            elif kind == "degradation":
                h.degradations.append(env)
            elif kind == "decision":
                h.decisions += sum(
                    1 for d in env.decision.decisions if d.kind != 1  # DECISION_KIND_WAIT
                )
                h.decisions_rejected += len(env.decision.rejected)
            elif kind == "run_state":
                h.final_state = env.run_state.state
                h.final_detail = env.run_state.detail
        h.epochs = [by_epoch[e] for e in sorted(by_epoch)]
        return h

    @property
    def slots(self) -> list[str]:
        # Protobuf maps have no order; sorted names keep colours stable across runs.
        return sorted({s for m in self.epochs for s in m.alphas})


def write_report(
    events: Iterable[events_pb2.EventEnvelope], out_dir: Path, *, title: str = "Esper growth run"
) -> Path:
    """Write report.md and its PNGs under `out_dir`; returns the Markdown file's path."""
    import matplotlib

    matplotlib.use("Agg")
    h = RunHistory.from_events(events)
    out_dir.mkdir(parents=True, exist_ok=True)
    pngs = {
        "training": _plot_training(h, out_dir / "training.png"),
        "alpha": _plot_alpha(h, out_dir / "alpha.png"),
        "parameters": _plot_parameters(h, out_dir / "parameters.png"),
    }
    md = out_dir / "report.md"
    md.write_text(_markdown(h, title, pngs))
    return md


# ---- plots ---------------------------------------------------------------------------
def _epochs(h: RunHistory) -> list[int]:
    return [m.epoch for m in h.epochs]


def _draw_marks(ax, h: RunHistory, *, with_labels: bool) -> None:
    drawn: set[str] = set()
    for m in h.marks:
        _, colour, _ = next(v for v in _MARKS.values() if v[0] == m.kind)
        label = m.kind if with_labels and m.kind not in drawn else None
        drawn.add(m.kind)
        ax.axvline(m.epoch, color=colour, linestyle="--", linewidth=1.2, alpha=0.8, label=label)


def _plot_training(h: RunHistory, path: Path) -> Path:
    import matplotlib.pyplot as plt

    x = _epochs(h)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.5))
    ax_loss.plot(x, [m.train_loss for m in h.epochs], "-o", ms=3, label="train loss")
    ax_loss.plot(x, [m.val_loss for m in h.epochs], "-o", ms=3, label="validation loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("cross-entropy loss")
    ax_loss.set_title("Loss")
    _draw_marks(ax_loss, h, with_labels=True)
    ax_loss.legend(fontsize=8)
    ax_loss.grid(alpha=0.3)
    ax_acc.plot(x, [100 * m.val_accuracy for m in h.epochs], "-o", ms=3, color="tab:purple",
                label="validation accuracy")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy (%)")
    ax_acc.set_title("Validation accuracy")
    _draw_marks(ax_acc, h, with_labels=True)
    for m in h.marks:
        # Name the slot next to each marker so several seeds stay tellable apart.
        ax_acc.annotate(m.slot_id, (m.epoch, ax_acc.get_ylim()[0]), rotation=90, fontsize=7,
                        xytext=(2, 4), textcoords="offset points", va="bottom")
    ax_acc.legend(fontsize=8, loc="best")
    ax_acc.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_alpha(h: RunHistory, path: Path) -> Path:
    import matplotlib.pyplot as plt

    x = _epochs(h)
    fig, ax = plt.subplots(figsize=(8, 4))
    for slot in h.slots:
        ax.plot(x, [m.alphas.get(slot, 0.0) for m in h.epochs], "-o", ms=3, label=slot)
    _draw_marks(ax, h, with_labels=False)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("epoch")
    ax.set_ylabel("alpha (blend weight)")
    ax.set_title("Seed blend weight per slot (dashed: germinate / fossilize / prune)")
    if h.slots:
        ax.legend(fontsize=8, title="slot", title_fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_parameters(h: RunHistory, path: Path) -> Path:
    import matplotlib.pyplot as plt

    x = _epochs(h)
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.step(x, [m.parameters for m in h.epochs], where="post", color="tab:orange", label="parameters")
    _draw_marks(ax, h, with_labels=True)
    ax.set_xlabel("epoch")
    ax.set_ylabel("trainable parameters")
    ax.set_title("Model size over the run")
    ax.ticklabel_format(axis="y", style="plain", useOffset=False)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---- markdown --------------------------------------------------------------------------
def _stage(v: int) -> str:
    return seed_pb2.SeedStage.Name(v).removeprefix("SEED_STAGE_").lower()


def _markdown(h: RunHistory, title: str, pngs: dict[str, Path]) -> str:
    first = h.epochs[0] if h.epochs else None
    last = h.epochs[-1] if h.epochs else None
    best = max(h.epochs, key=lambda m: m.val_accuracy) if h.epochs else None
    count = {k: sum(1 for m in h.marks if m.kind == k) for k in ("germinate", "fossilize", "prune")}
    wall = (h.ended_at - h.started_at) if h.started_at is not None and h.ended_at is not None else 0.0
    lines = [f"# {title}", "", f"Run `{h.run_id}` — final state **{h.final_state or 'unknown'}**"]
    if h.final_detail:
        lines.append(f"({h.final_detail})")
    lines += ["", "## Summary", "", "| metric | value |", "|---|---|"]
    if last is not None and first is not None and best is not None:
        lines += [
            f"| epochs | {last.epoch} of {last.total_epochs} |",
            f"| final validation accuracy | {100 * last.val_accuracy:.2f}% |",
            f"| best validation accuracy | {100 * best.val_accuracy:.2f}% (epoch {best.epoch}) |",
            f"| final validation loss | {last.val_loss:.4f} |",
            f"| parameters (first → last epoch) | {first.parameters:,} → {last.parameters:,} |",
            f"| training FLOPs | {last.train_flops:.3e} |",
            (f"| mean control cost per boundary | "
             f"{sum(m.control_ms for m in h.epochs) / len(h.epochs):.2f} ms |"),
            f"| training time (sum of epochs) | {sum(m.epoch_seconds for m in h.epochs):.1f} s |",
        ]
    lines += [
        f"| wall time (first to last event) | {wall:.1f} s |",
        (f"| seeds germinated / fossilized / pruned | "
         f"{count['germinate']} / {count['fossilize']} / {count['prune']} |"),
        f"| controller actions (non-WAIT) / rejected | {h.decisions} / {h.decisions_rejected} |",
        f"| degradation events | {len(h.degradations)} |",
        "",
        "## Plots",
        "",
        f"![loss and accuracy]({pngs['training'].name})",
        "",
        f"![alpha per slot]({pngs['alpha'].name})",
        "",
        f"![parameters]({pngs['parameters'].name})",
        "",
        "## Seed lifecycle",
        "",
    ]
    if h.lifecycle:
        lines += ["| epoch | slot | transition | blueprint | reason |", "|---|---|---|---|---|"]
        for env in h.lifecycle:
            lc = env.lifecycle
            lines.append(
                f"| {env.epoch} | `{lc.slot_id}` | {_stage(lc.from_stage)} → {_stage(lc.to_stage)} "
                f"| `{lc.blueprint_id or '-'}` | {lc.reason or '-'} |"
            )
    else:
        lines.append("No seed changed stage in this run.")
    if h.degradations:
        lines += ["", "## Degradations", "", "| epoch | component | kind | detail |", "|---|---|---|---|"]
        for env in h.degradations:
            d = env.degradation
            lines.append(f"| {env.epoch} | {d.component} | {d.kind} | {d.detail} |")
    return "\n".join(lines) + "\n"
