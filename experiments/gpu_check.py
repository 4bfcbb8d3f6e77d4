"""GPU check (≤ 5 minutes): the quick start and one CIFAR-10 round on the GPU against the CPU.

    python experiments/gpu_check.py --cifar ../shared/datasets/cifar10_jpeg --out gpu_check.json

For each workload the same config and seed run on ``cpu`` and on ``cuda``; the script records
client updates per second on each and checks that the results agree within a float tolerance
(cuDNN / cuBLAS reduce in another order than the CPU kernels, so bit equality is not expected):

* quick start (digits, pFedHN, 20 rounds): |Δ test accuracy| ≤ 0.03 and relative |Δ test loss| ≤ 5 %;
* CIFAR-10 (50 clients, pFedHN CNN, one round of 10 clients × 50 local steps, then the generated
  weights of every client): max |Δθ| / max |θ| ≤ 1e-2 after the round (cuDNN convolutions use
  TF32 by default on this class of GPU: 2.4e-3 was measured on an H200);
* SHN on the quick start (given complete graph, 10 rounds) runs on cuda and agrees likewise.

Exit 0 when every check passes; the JSON holds the numbers and the device's name.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import shn  # noqa: E402,F401  (registers methods and tasks)
from shn.config import load_config  # noqa: E402
from shn.runner import build, execute, make_task  # noqa: E402

QUICKSTART = Path(__file__).resolve().parent / "configs" / "quickstart.toml"
CIFAR = Path(__file__).resolve().parent / "configs" / "cifar10_pfedhn.toml"


def timed_run(cfg_path: Path, overrides: list[str], device: str) -> tuple[dict, float, object]:
    config = load_config(cfg_path, overrides + [f'device="{device}"'])
    built = build(config)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    result = execute(built, progress=False)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    return result.summary, elapsed, result


def compare_runs(name: str, cfg_path: Path, overrides: list[str]) -> dict:
    out: dict = {"workload": name, "overrides": overrides}
    for device in ("cpu", "cuda"):
        summary, elapsed, _ = timed_run(cfg_path, overrides, device)
        updates = summary["budget"]["client_updates"]
        out[device] = {"metrics": summary["metrics"], "seconds": round(elapsed, 3),
                       "client_updates_per_s": round(updates / elapsed, 2)}
    a, b = out["cpu"]["metrics"], out["cuda"]["metrics"]
    acc_gap = abs(a["test_accuracy"] - b["test_accuracy"])
    loss_gap = abs(a["test_loss"] - b["test_loss"]) / max(abs(a["test_loss"]), 1e-12)
    out["test_accuracy_gap"], out["test_loss_rel_gap"] = acc_gap, loss_gap
    out["ok"] = acc_gap <= 0.03 and loss_gap <= 0.05
    out["speedup"] = round(out["cuda"]["client_updates_per_s"] / out["cpu"]["client_updates_per_s"], 2)
    return out


def cifar_round(data_dir: str) -> dict:
    overrides = [f'task.data_dir="{data_dir}"', "rounds=1", "clients_per_round=10", "eval_every=1000",
                 'task.partition="dirichlet"', "task.alpha=0.1"]
    base = load_config(CIFAR, overrides)
    task = make_task(base)
    out: dict = {"workload": "cifar10 one round (10 clients x 50 steps, batch 64)"}
    thetas = {}
    from shn.federated.simulation import Simulation, round_rng

    for device in ("cpu", "cuda"):
        config = load_config(CIFAR, overrides + [f'device="{device}"'])
        for _ in range(2):  # the first pass pays CUDA / cuDNN start-up; the second is timed
            built = build(config, task=task)
            sim = Simulation(config, built.algorithm, built.runtime, progress=False)
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with round_rng(config.seed, 1, config.device):
                sim.run_round(1)
            if device == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - t0
        out[device] = {"seconds": round(elapsed, 3), "client_updates_per_s": round(10 / elapsed, 2)}
        w = built.algorithm.weights_for(list(range(task.num_clients)))
        thetas[device] = {k: v.detach().cpu().double() for k, v in w.items()}
    scale = max(float(v.abs().max()) for v in thetas["cpu"].values())
    gap = max(float((thetas["cpu"][k] - thetas["cuda"][k]).abs().max()) for k in thetas["cpu"])
    out["theta_rel_gap"] = gap / scale
    out["ok"] = gap / scale <= 1e-2
    out["speedup"] = round(out["cuda"]["client_updates_per_s"] / out["cpu"]["client_updates_per_s"], 2)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cifar", default="../shared/datasets/cifar10_jpeg", help="CIFAR-10 npz JPEG shards folder")
    ap.add_argument("--out", default="gpu_check.json")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads for the CPU side")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: CUDA is not available on this machine", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "cpu_threads": args.threads,
              "checks": []}
    report["checks"].append(compare_runs("quickstart pfedhn (digits, 20 rounds)", QUICKSTART,
                                         ["rounds=20", "eval_every=20"]))
    report["checks"].append(compare_runs("quickstart shn, complete graph (10 rounds)", QUICKSTART,
                                         ["method=\"shn\"", 'graph.kind="complete"', "rounds=10", "eval_every=10"]))
    if Path(args.cifar).is_dir():
        report["checks"].append(cifar_round(args.cifar))
    else:
        report["cifar_skipped"] = f"{args.cifar} not found"
    report["ok"] = all(c["ok"] for c in report["checks"])
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
