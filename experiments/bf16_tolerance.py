"""How far ``local.precision = "bf16"`` moves a local update from fp32 (README, performance).

    python experiments/bf16_tolerance.py                  # 1 thread, about a minute on a quiet core
    python experiments/bf16_tolerance.py --steps 1 5 --clients 8

For each target, 4 clients start from different weights and take K local steps (pFedHN's local
optimiser: lr 5e-3, momentum 0.9, weight decay 5e-5, clipping at 50, batch 64) with the same
minibatches in every column. A cell is the worst, over the target's tensors and clients, of
``||Δ − Δ_fp32|| / ||Δ_fp32||``, Δ = trained − start, against the fp32 loop's Δ_fp32. The bf16
columns are the trainer's modes with bf16; the last column is the fp32 loop with *another draw of
the minibatches*: the difference SGD's own sampling makes, the scale to read the others against.

Targets: pFedHN's CIFAR CNN on random 3×32×32 data (10 classes, 7–50 samples per client — random
labels, so the gradients are mostly noise: a hard case for rounding), and a small CNN and the MLP
on scikit-learn's digits (400 images per client).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shn.config import LocalConfig  # noqa: E402
from shn.federated.grouped import grouped_unsupported  # noqa: E402
from shn.federated.local import ClientStore, LocalTrainer  # noqa: E402
from shn.target import module_params, stack_params  # noqa: E402
from tasks.base import ClientData, classification_loss  # noqa: E402
from tasks.datasets import load_digits  # noqa: E402
from tasks.models import MLP, PFedHNCNN, SmallCNN  # noqa: E402


def random_store(clients: int) -> ClientStore:
    g = torch.Generator().manual_seed(0)
    sizes = [(7, 20, 33, 50)[c % 4] for c in range(clients)]

    def split(n):
        return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)

    return ClientStore({c: ClientData(split(n), split(5), split(5)) for c, n in enumerate(sizes)})


def digits_store(clients: int, per_client: int = 400) -> ClientStore:
    d = load_digits()
    x, y = torch.from_numpy(d.x_train), torch.from_numpy(d.y_train)
    rows = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    data = {}
    for c in range(clients):
        i = rows[(c * per_client + torch.arange(per_client)) % len(y)]
        data[c] = ClientData((x[i], y[i]), (x[i[:5]], y[i[:5]]), (x[i[:5]], y[i[:5]]))
    return ClientStore(data)


TARGETS = {
    "pFedHN CIFAR CNN, random data": (lambda: PFedHNCNN(3, 10), random_store),
    "small CNN, digits": (lambda: SmallCNN(1, 10, 8), digits_store),
    "MLP, digits": (lambda: MLP(64, 10), digits_store),
}


def worst_relative(delta: dict, ref: dict) -> float:
    return max(((delta[k] - ref[k]).flatten(1).norm(dim=1) / ref[k].flatten(1).norm(dim=1)).max().item()
               for k in ref)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", nargs="+", type=int, default=[1, 5, 50], help="local steps K")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    clients = list(range(args.clients))
    modes = ("loop", "vmap", "grouped")
    print("| target | K | " + " | ".join(f"{m} bf16" for m in modes) + " | fp32, other minibatches |")
    print("|---|---|" + "---|" * (len(modes) + 1))
    for name, (build, make_store) in TARGETS.items():
        store = make_store(args.clients)
        starts = []
        for c in clients:
            torch.manual_seed(c)
            starts.append(module_params(build()))
        params = stack_params(starts)
        runnable = [m for m in modes if m != "grouped" or grouped_unsupported(build()) is None]
        for steps in args.steps:
            def delta(mode: str, precision: str, seed: int = 42) -> dict:
                trainer = LocalTrainer(build(), classification_loss, LocalConfig(steps=steps, mode=mode, precision=precision))
                out = trainer.train(params, store, clients, torch.Generator().manual_seed(seed))
                return {k: out.params[k] - params[k] for k in params}

            ref = delta("loop", "fp32")
            cells = [f"{worst_relative(delta(m, 'bf16'), ref):.3f}" if m in runnable else "–" for m in modes]
            other = worst_relative(delta("loop", "fp32", seed=7), ref)
            print(f"| {name} | {steps} | " + " | ".join(cells) + f" | {other:.2f} |", flush=True)


if __name__ == "__main__":
    main()
