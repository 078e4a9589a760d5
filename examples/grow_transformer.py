"""Grow your own small transformer on a generated sequence task, in your own training loop.

Task (generated, no download): sequences of 12 tokens over a vocabulary of 8; the label is
how many of the other 11 tokens equal the first one, capped at 3 (4 classes). It needs
attention (compare with the first token) and a non-linear read-out (count). The host is a
one-layer `nn.TransformerEncoder` of width 16 with a mean-pool head. The same loop runs
twice with the same seed and epochs: once as it is, once with `esper.grow` (the lines
marked `# esper`), where the heuristic germinates a seed (a token-wise bottleneck MLP) at
an encoder layer's output when validation loss plateaus.

    .venv/bin/python examples/grow_transformer.py [--epochs 30] [--seed 0]
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from esper.grow import BuiltinKernels, Grower, GrowthConfig, KasminaConfig, heuristic_controller

VOCAB, LENGTH, CLASSES = 8, 12, 4


class TinyTransformer(nn.Module):
    def __init__(self, d: int = 16, layers: int = 1) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d)
        self.pos = nn.Parameter(torch.randn(LENGTH, d) * 0.1)
        layer = nn.TransformerEncoderLayer(d, nhead=2, dim_feedforward=2 * d, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, CLASSES)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.encoder(self.embed(tokens) + self.pos)
        return self.head(h[:, 0])  # read out at the first token, the one being counted


def data(seed: int, n: int = 6000):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, VOCAB, (n, LENGTH), generator=g)
    y = (x[:, 1:] == x[:, :1]).sum(1).clamp(max=CLASSES - 1)
    return (x[:4000], y[:4000]), (x[4000:5000], y[4000:5000]), (x[5000:], y[5000:])


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    model.eval()
    logits = model(x)
    model.train()
    return float(F.cross_entropy(logits, y)), float((logits.argmax(1) == y).float().mean())


def run(grow: bool, epochs: int, seed: int) -> dict:
    (x, y), (x_val, y_val), (x_te, y_te) = data(seed)
    torch.manual_seed(seed)
    model = TinyTransformer()
    loader = DataLoader(TensorDataset(x, y), batch_size=128, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    # Per epoch, a cosine as a LambdaLR (the scheduler issue 9 found broken under growth).
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.5 * (1 + math.cos(math.pi * e / epochs)))
    grower = None
    if grow:  # esper
        grower = Grower(model, sites=[nn.TransformerEncoderLayer], example_input=x[:8],  # esper
                        optimizer=opt, scheduler=sched, loss_fn=F.cross_entropy,  # esper
                        held_out=(x_val, y_val),  # esper
                        controller=heuristic_controller(warmup_epochs=3, plateau_window=2,  # esper
                                                        plateau_threshold=0.05, fossilize_epochs=1),  # esper
                        kernels=BuiltinKernels(["bottleneck_mlp"]),  # esper
                        kasmina=KasminaConfig(incubation=30, blend_duration=60),  # esper
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
