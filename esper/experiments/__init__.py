"""The top floor: benchmarks, the demo and baselines (nothing in `esper/` imports this package).

* `growth` — the compute-matched growth benchmark (`esper bench growth`);
* `baselines` — the static-final baseline (a grown topology, trained from scratch);
* `controllers` — learned vs heuristic vs baselines on held-out tasks (`esper bench controllers`);
* `fieldreports` — field reports of in-process runs (the learned policy's training data);
* `tamiyo_train` — `esper tamiyo train`;
* `demo` — `esper demo`: the embedded platform grows a model and writes a report.

These modules may import any part of Esper; the parts never import them, so experiment
code never becomes a branch in a core module.
"""
