"""Grow your own 2-D CNN on scikit-learn's digits (8x8 images), in your own training loop.

A narrow CNN (4 and 8 channels) on `sklearn.datasets.load_digits`. The same loop runs twice
with the same seed and epochs: once as it is, once with `esper.grow` (the lines marked
`# esper`), where the heuristic germinates a 3x3 residual convolution seed after a ReLU when
validation loss plateaus, and fossilizes or prunes it by its counterfactual contribution.
The scheduler (OneCycleLR, per step) keeps working as seeds join and leave the optimizer.

    .venv/bin/python examples/grow_digits_cnn.py [--epochs 30] [--seed 0]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from esper.grow import BuiltinKernels, Grower, GrowthConfig, KasminaConfig, heuristic_controller


class SmallCNN(nn.Module):
    def __init__(self, c1: int = 4, c2: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(c2)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(c2 * 4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu1(self.bn1(self.conv1(x)))
        h = self.relu2(self.bn2(self.conv2(h)))
        return self.fc(self.pool(h).flatten(1))


def data(seed: int):
    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(digits.target)
    idx = list(range(len(y)))
    tr, te = train_test_split(idx, test_size=0.25, random_state=seed, stratify=digits.target)
    tr, val = train_test_split(tr, test_size=0.2, random_state=seed, stratify=digits.target[tr])
    return (x[tr], y[tr]), (x[val], y[val]), (x[te], y[te])


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    model.eval()
    logits = model(x)
    model.train()
    return float(F.cross_entropy(logits, y)), float((logits.argmax(1) == y).float().mean())


def run(grow: bool, epochs: int, seed: int) -> dict:
    (x, y), (x_val, y_val), (x_te, y_te) = data(seed)
    torch.manual_seed(seed)
    model = SmallCNN()
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-2, total_steps=epochs * len(loader))
    grower = None
    if grow:  # esper
        grower = Grower(model, sites=["relu1", "relu2"], example_input=x[:8], optimizer=opt,  # esper
                        scheduler=sched, loss_fn=F.cross_entropy, held_out=(x_val, y_val),  # esper
                        controller=heuristic_controller(warmup_epochs=3, plateau_window=2,  # esper
                                                        plateau_threshold=0.05, fossilize_epochs=1),  # esper
                        kernels=BuiltinKernels(["conv3x3_residual"]),  # esper
                        kasmina=KasminaConfig(incubation=30, blend_duration=60),  # esper
                        config=GrowthConfig(max_seeds=2, total_epochs=epochs))  # esper
    for _ in range(epochs):
        total = 0.0
        for xb, yb in loader:
            opt.zero_grad()
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            opt.step()
            sched.step()
            if grower:
                grower.step()  # esper
            total += loss.item() * len(yb)
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
