"""The README's job example is a job: it registers, describes, builds and trains."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

from esper.grow import BuiltinKernels
from esper.jobs.registry import JobRegistry
from esper.tolaria.config import RunConfig
from esper.tolaria.trainer import build_job, build_trainer

README = Path(__file__).resolve().parents[3] / "README.md"


def test_the_readme_job_example_registers_and_trains(monkeypatch) -> None:
    code = re.search(r"```python\n# my_pkg/jobs.py\n(.*?)```", README.read_text(), re.DOTALL).group(1)
    module = types.ModuleType("readme_jobs")
    exec(compile(code, "README.md", "exec"), module.__dict__)  # noqa: S102 - our own README
    monkeypatch.setitem(sys.modules, "readme_jobs", module)
    reg = JobRegistry.discover({"tabular": "readme_jobs:tabular"}, entry_points=False)
    params = {p.name: p for p in reg.describe("tabular").params}
    assert params["act"].choices == ("relu", "gelu") and params["hidden"].doc == "width of the hidden layer."
    cfg = RunConfig.from_dict({"job": "tabular", "job_params": {"act": "gelu"}, "epochs": 2,
                               "controller": "none", "checkpoint_every": 0})
    job = build_job(cfg, reg)
    trainer = build_trainer(cfg, run_id="readme", job=job, kernels=BuiltinKernels())
    assert list(trainer.model.slots) == ["1"]  # the GELU, found by type
    result = trainer.run()
    assert result.completed and result.val_accuracy > 0.8
