"""The top floor: benchmarks, experiments, the demo and baselines (nothing in `esper/`
imports this package).

* `growth` — the compute-matched growth benchmark (`esper bench growth`);
* `baselines` — the static-final baseline (a grown topology, trained from scratch);
* `controllers` — learned vs heuristic vs baselines on held-out tasks (`esper bench controllers`);
* `fieldreports` — field reports of in-process runs (the learned policy's training data);
* `tamiyo_train` — `esper tamiyo train`;
* `demo` — `esper demo`: the embedded platform grows a model and writes a report;
* `loop` — one training run through `esper.grow` in a plain user loop, with training and
  decision FLOPs counted, and the static-final baseline (the grown topology from step 0);
* `growth_mlp` — the MLP row against GroMo (issue 14): MNIST-1D, the 40→16→16→10 MLP,
  width growth at parallel slots;
* `cold_start` — the heuristic's cold-start kernel choice with the full catalog against
  every single blueprint (issue 12 point 3), MNIST-1D and digits CNNs.

These modules may import any part of Esper; the parts never import them, so experiment
code never becomes a branch in a core module.
"""
