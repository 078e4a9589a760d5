"""Compute-matched growth benchmark (static-initial, static-final, fixed, random, heuristic).

    .venv/bin/python benchmarks/growth.py --task mnist1d --seeds 5 [--out DIR]

Prints a Markdown table (mean ± std over seeds of test accuracy, parameters, training
FLOPs and its ratio to the static-initial baseline measured in the same run, wall time)
and writes growth.md, growth.png and growth.json; see esper/experiments/growth.py
(the same as `esper bench growth`).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from esper.experiments.growth import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
