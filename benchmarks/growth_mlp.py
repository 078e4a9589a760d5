"""The MLP row against GroMo (issue 14): width growth on MNIST-1D's 40→16→16→10 MLP.

    .venv/bin/python benchmarks/growth_mlp.py [--tuning | --seeds 0,1 | --quick] [--out DIR]

Prints a Markdown table (mean ± std over seeds of test accuracy, parameters, training,
decision and total FLOPs) for static-initial, the heuristic with width blueprints,
static-final, their size-matched variants (≤ 1,640 parameters) and a plain 22×22 MLP, and
whether the issue's targets were met; see esper/experiments/growth_mlp.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from esper.experiments.growth_mlp import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
