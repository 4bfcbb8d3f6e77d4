"""How far did stage 1 move the client embeddings, and do they (or their displacement) know the
client groups? For each three-stage run directory given: the stage-1 embeddings it saved
(``stage2_graph/embeddings.pt``) against their initial values (rebuilt from the run's config and
seed), and the edge homophily w.r.t. the task's client groups of kNN graphs on the final
embeddings and on the centred displacement.

    python experiments/embedding_drift.py experiments/results/cifar10_clustered/cifar10-clustered/shn-knn/seed*
        > experiments/results/cifar10_clustered/embedding_drift.json
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def drift(run_dir: Path, k: int = 5) -> dict:
    from shn.config import load_config
    from shn.graph import edge_homophily, knn_graph
    from shn.pipeline import stage1_config
    from shn.runner import build, make_task
    from tasks.base import client_attribute

    config = load_config(next(run_dir.glob("stage3_*/config.toml")))
    stage1 = stage1_config(config)
    task = make_task(stage1)
    initial = build(replace(stage1, graph=replace(stage1.graph, stage1_cache=None)), task=task)
    start = initial.algorithm.hn.embeddings.weight.detach().double()
    final = torch.load(run_dir / "stage2_graph" / "embeddings.pt", weights_only=True).double()
    moved = final - start
    groups = client_attribute(task, "groups")
    if groups is None:
        raise SystemExit(f"{run_dir}: the task has no client groups")
    sizes = torch.bincount(torch.as_tensor(list(groups)))
    chance = float(((sizes * (sizes - 1)).sum() / (len(groups) * (len(groups) - 1))))

    def homophily(x: torch.Tensor) -> float:
        return edge_homophily(knn_graph(x, k, "cosine"), labels=list(groups))["homophily"]

    return {"run": str(run_dir), "relative_drift": float((moved.norm(dim=1) / start.norm(dim=1)).mean()),
            "homophily_final": homophily(final), "homophily_displacement": homophily(moved - moved.mean(0)),
            "homophily_random_pair": chance, "k": k}


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    print(json.dumps([drift(Path(a)) for a in argv], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
