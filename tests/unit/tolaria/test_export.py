"""`esper export <run>`: a run's grown model from its last checkpoint, folded, saved, reloaded."""

from __future__ import annotations

from pathlib import Path

import torch

from esper.cli import main
from esper.grow import BuiltinKernels, fixed_controller, load_exported
from esper.tolaria.trainer import build_job, build_trainer

from .conftest import FAST_KASMINA, tiny_config


def _run(root: Path, *, fossilize_after: int, epochs: int = 4):
    """A finished run laid out as the platform keeps it: <data>/tolaria/runs/<id>/{config.pb, checkpoints/}."""
    cfg = tiny_config(epochs=epochs, controller="fixed")
    run_dir = root / "tolaria" / "runs" / "run-export"
    run_dir.mkdir(parents=True)
    (run_dir / "config.pb").write_bytes(cfg.to_proto().SerializeToString())
    trainer = build_trainer(cfg, run_id=run_dir.name, checkpoint_dir=run_dir / "checkpoints",
                            kernels=BuiltinKernels(["bottleneck_mlp"]), kasmina=FAST_KASMINA,
                            controller=fixed_controller(germinate_epochs=(1,),
                                                        fossilize_after_epochs=fossilize_after))
    trainer.run()
    return cfg, run_dir, trainer


def test_export_of_a_run_reloads_to_the_wrapped_models_outputs(tmp_path: Path, capsys) -> None:
    cfg, run_dir, trainer = _run(tmp_path / "data", fossilize_after=1)
    assert trainer.grower.fossilized() and not [s for s in trainer.grower.live().values() if s != "FOSSILIZED"]
    out = tmp_path / "grown"
    assert main(["export", run_dir.name, "--data-dir", str(tmp_path / "data"), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.safetensors"]
    said = capsys.readouterr().out
    assert "1 fossilized seed(s) folded in" in said and "checkpoint after epoch 4" in said
    # The job's model, rebuilt by its registered function, takes the export; it computes
    # what the wrapped model of the run computed.
    plain = load_exported(build_job(cfg).model, out).eval()
    x = next(iter(trainer.job.val_loader))[0]
    trainer.model.eval()
    with torch.no_grad():
        assert (plain(x) - trainer.model(x)).abs().max() <= 1e-6
    assert not any(type(m).__module__.startswith("esper.kasmina") for m in plain.modules())


def test_seeds_in_flight_are_refused_unless_dropped_and_a_run_without_checkpoints_is_named(
        tmp_path: Path, capsys) -> None:
    _, run_dir, trainer = _run(tmp_path / "data", fossilize_after=50, epochs=3)
    assert trainer.grower.live() and not trainer.grower.fossilized()
    assert main(["export", str(run_dir), "--out", str(tmp_path / "a")]) == 2
    assert "not fossilized" in capsys.readouterr().err
    assert main(["export", str(run_dir), "--out", str(tmp_path / "b"), "--drop-live"]) == 0
    assert "left out live seed(s)" in capsys.readouterr().out
    for ckpt in (run_dir / "checkpoints").iterdir():
        ckpt.unlink()
    assert main(["export", str(run_dir), "--out", str(tmp_path / "c")]) == 2
    assert "has no checkpoint" in capsys.readouterr().err
    assert main(["export", "run-nope", "--data-dir", str(tmp_path / "data")]) == 2
    assert "no run 'run-nope'" in capsys.readouterr().err
