"""Cold-start kernel choice (issue 12 point 3): the heuristic with the full catalog, with
and without probes, against every single blueprint, on MNIST-1D and digits CNNs.

    .venv/bin/python benchmarks/cold_start.py --task mnist1d [--tuning | --quick] [--out DIR]

Prints a Markdown table per arm (mean ± std over seeds of test accuracy, parameters,
training and decision FLOPs, which kernels were germinated) and the paired difference of
each catalog arm from the best single blueprint; see esper/experiments/cold_start.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from esper.experiments.cold_start import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
