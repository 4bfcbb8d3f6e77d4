"""What our JPEG-decoded CIFAR-10 costs (issue 20): pFedHN's CNN trained centrally on the stored
images (JPEG, quality ≈ 75) and on the same images passed once more through JPEG at lower
qualities (50, 25). The slope of test accuracy against quality bounds what the stored images'
own compression costs: JPEG loses less per pass at higher quality, so the drop from 75 to 50 is
an over-estimate of the drop from lossless to 75 when it is small. Also the central accuracy of
this CNN on our data, to set beside the ≈ 0.7 usually quoted for it on the original CIFAR-10.

    python experiments/jpeg_cost.py --data ../shared/datasets/cifar10_jpeg --epochs 10 \
        --out experiments/results/jpeg_cost
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.datasets import load_cifar10  # noqa: E402
from tasks.models import PFedHNCNN  # noqa: E402

MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
STD = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)


def recompress(x: np.ndarray, quality: int) -> np.ndarray:
    """``x`` uint8 [N, 3, H, W] through one JPEG encode/decode at ``quality`` (Pillow)."""
    from PIL import Image

    out = np.empty_like(x)
    for i in range(len(x)):
        buf = io.BytesIO()
        Image.fromarray(x[i].transpose(1, 2, 0)).save(buf, format="JPEG", quality=quality)
        out[i] = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")).transpose(2, 0, 1)
    return out


def prepare(x: np.ndarray) -> torch.Tensor:
    return (torch.from_numpy(x).float() / 255 - MEAN) / STD


def train(x_tr, y_tr, x_te, y_te, epochs: int, seed: int) -> list[float]:
    """SGD (lr 0.01, momentum 0.9, wd 5e-4, batch 64; pFedHN's CNN): test accuracy after each epoch."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = PFedHNCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    accs = []
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(x_tr), generator=g).split(64):
            opt.zero_grad()
            F.cross_entropy(model(x_tr[idx]), y_tr[idx]).backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            pred = torch.cat([model(b).argmax(1) for b in x_te.split(1000)])
        accs.append(float((pred == y_te).float().mean()))
    return accs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--qualities", type=int, nargs="*", default=[50, 25])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = load_cifar10(args.data)
    x_tr, x_te = np.asarray(data.x_train), np.asarray(data.x_test)
    y_tr, y_te = torch.as_tensor(data.y_train), torch.as_tensor(data.y_test)
    result = {"epochs": args.epochs, "seed": args.seed, "optimizer": "SGD lr 0.01 momentum 0.9 wd 5e-4, batch 64",
              "train_images": len(x_tr), "test_images": len(x_te), "runs": {}}
    for quality in [None, *args.qualities]:
        name = "stored (JPEG q~75)" if quality is None else f"stored + one JPEG pass at q={quality}"
        t0 = time.time()
        tr = x_tr if quality is None else recompress(x_tr, quality)
        te = x_te if quality is None else recompress(x_te, quality)
        accs = train(prepare(tr), y_tr, prepare(te), y_te, args.epochs, args.seed)
        result["runs"][name] = {"test_accuracy_per_epoch": accs, "final": accs[-1], "best": max(accs),
                                "seconds": round(time.time() - t0, 1)}
        print(json.dumps({name: result["runs"][name]}), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
