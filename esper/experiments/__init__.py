"""Experiments and benchmarks' code: the top floor (nothing in `esper` imports it).

* `loop` — one training run through `esper.grow` in a plain user loop, with training and
  decision FLOPs counted, and the static-final baseline (the grown topology from step 0);
* `growth_mlp` — the MLP row against GroMo (issue 14): MNIST-1D, the 40→16→16→10 MLP,
  width growth at parallel slots;
* `cold_start` — the heuristic's cold-start kernel choice with the full catalog against
  every single blueprint (issue 12 point 3), MNIST-1D and digits CNNs.
"""
