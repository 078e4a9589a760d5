"""Grow your own MLP on a scikit-learn tabular data set, in your own training loop.

A deliberately narrow MLP (hidden width 8) on `sklearn.datasets.make_classification`
(4 classes, 20 features, clusters that need non-linear boundaries). The same loop runs
twice with the same seed and epochs: once as it is, once with `esper.grow` (the lines
marked `# esper`), where the heuristic germinates a bottleneck MLP seed after the hidden
activation when validation loss plateaus, and fossilizes or prunes it by its measured
counterfactual contribution.

    .venv/bin/python examples/grow_tabular_mlp.py [--epochs 30] [--seed 0]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from sklearn.datasets import make_classification
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from esper.grow import BuiltinKernels, Grower, GrowthConfig, KasminaConfig, heuristic_controller


class MLP(nn.Module):
    def __init__(self, features: int, classes: int, hidden: int = 8) -> None:
        super().__init__()
        self.inp = nn.Linear(features, hidden)
        self.act = nn.ReLU()
        self.hidden = nn.Linear(hidden, hidden)
        self.act2 = nn.ReLU()
        self.out = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.act2(self.hidden(self.act(self.inp(x)))))


def data(seed: int):
    x, y = make_classification(n_samples=4000, n_features=20, n_informative=12, n_redundant=4,
                               n_classes=4, n_clusters_per_class=3, class_sep=1.0, random_state=seed)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
    x_tr, x_val, y_tr, y_val = train_test_split(x_tr, y_tr, test_size=0.2, random_state=seed, stratify=y_tr)
    scaler = StandardScaler().fit(x_tr)
    t = lambda a: torch.tensor(scaler.transform(a), dtype=torch.float32)
    return ((t(x_tr), torch.tensor(y_tr)), (t(x_val), torch.tensor(y_val)), (t(x_te), torch.tensor(y_te)))


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    model.eval()
    logits = model(x)
    model.train()
    return float(F.cross_entropy(logits, y)), float((logits.argmax(1) == y).float().mean())


def run(grow: bool, epochs: int, seed: int) -> dict:
    (x, y), (x_val, y_val), (x_te, y_te) = data(seed)
    torch.manual_seed(seed)
    model = MLP(x.shape[1], 4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    grower = None
    if grow:  # esper
        grower = Grower(model, sites=["act", "act2"], example_input=x[:8], optimizer=opt,  # esper
                        scheduler=sched, loss_fn=F.cross_entropy, held_out=(x_val, y_val),  # esper
                        controller=heuristic_controller(warmup_epochs=3, plateau_window=2,  # esper
                                                        plateau_threshold=0.05, fossilize_epochs=1,  # esper
                                                        prune_threshold=0.01),  # esper
                        kernels=BuiltinKernels(["bottleneck_mlp"]),  # esper
                        kasmina=KasminaConfig(incubation=40, blend_duration=80),  # esper
                        config=GrowthConfig(max_seeds=2, total_epochs=epochs))  # esper
    for _ in range(epochs):
        total = 0.0
        for xb, yb in loader:
            opt.zero_grad()
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            opt.step()
            if grower:
                grower.step()  # esper
            total += loss.item() * len(yb)
        sched.step()
        val_loss, val_acc = evaluate(model, x_val, y_val)
        if grower:
            report = grower.end_epoch(train_loss=total / len(y), val_loss=val_loss,  # esper
                                      val_accuracy=val_acc)  # esper
            if report.applied:
                print(f"  {report}")
    test_loss, test_acc = evaluate(model, x_te, y_te)
    out = {"test_acc": test_acc, "test_loss": test_loss,
           "parameters": sum(p.numel() for p in (grower.model if grower else model).parameters())}
    if grower:
        out["fossilized"] = sorted(grower.fossilized())
        out["history"] = [(d["epoch"], d["kind"].removeprefix("DECISION_KIND_").lower(), d["slot"],
                           d["rejected"] or "applied") for d in grower.history.decisions]
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # a tiny model: one thread is fastest (and shares the machine)
    t0 = time.perf_counter()
    static = run(False, args.epochs, args.seed)
    print("growing:")
    grown = run(True, args.epochs, args.seed)
    print(f"\n{'arm':<10} {'test acc':>8} {'test loss':>9} {'params':>7}  seeds fossilized")
    print(f"{'no growth':<10} {static['test_acc']:>8.2%} {static['test_loss']:>9.4f} {static['parameters']:>7}  -")
    print(f"{'growth':<10} {grown['test_acc']:>8.2%} {grown['test_loss']:>9.4f} {grown['parameters']:>7}  "
          f"{', '.join(grown['fossilized']) or 'none'}")
    print(f"decisions: {grown['history']}")
    print(f"({args.epochs} epochs each, seed {args.seed}, {time.perf_counter() - t0:.1f} s)")
    return {"static": static, "grown": grown}


if __name__ == "__main__":
    main()
