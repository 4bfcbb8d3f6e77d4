"""Regenerate the README's paired table from the committed study runs:

    python experiments/study/update_readme.py

Runs `shn compare` over experiments/results/study/<setting>/ (phase-B outputs; for CIFAR-10 its tuned
suite's folder, cifar10-tuned/, once every run of it finished), writes
experiments/results/study/paired/{paired.md,paired.csv} and replaces the block between the
README's `<!-- paired:start -->` and `<!-- paired:end -->` markers with the table (and the
`vsghn`, `control`, `oracle`, `depth` and `heterophily` blocks: SHN against GHN, the learning-rate
control of lr_control.py, the oracle-graph control of cifar10_oracle.toml, and grid_studies.py's tables).
"""

from __future__ import annotations

import re
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from shn.paired import compare, load_runs, markdown, paired_rows  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import grid_studies  # noqa: E402

SETTINGS = ["cifar10-dir0.1", "losloop", "beijing", "chickenpox"]
# a setting's tuned suite, whose results replace the untuned runs once every one of them finished
TUNED = {"cifar10-dir0.1": ("experiments/study/cifar10_tuned.toml", "cifar10-tuned")}


def setting_root(study: Path, setting: str) -> Path:
    """``study/<setting>``, or the folder of its tuned suite once that suite has finished."""
    suite, folder = TUNED.get(setting, (None, None))
    if suite is not None and (ROOT / suite).is_file():
        from shn.suite import load_suite

        jobs, _ = load_suite(ROOT / suite, out=study / folder)
        if all((j.run_dir / "summary.json").is_file() for j in jobs):
            return study / folder
    return study / setting


# SHN against GHN on the same graph: the identity-sheaf ablation
SHN_VS_GHN = [("shn-given", "ghn-given"), ("shn-given-replace", "ghn-given"), ("shn-knn", "ghn-knn")]
# the learning-rate control (lr_control.py): what a graph method's tuned learning rates give pFedHN,
# and what its graph adds on top of them; runs in <setting root>-control/
CONTROL_PAIRS = [("pfedhn-as-shn-knn", "pfedhn"), ("shn-knn", "pfedhn-as-shn-knn"),
                 ("pfedhn-as-ghn-knn", "pfedhn"), ("ghn-knn", "pfedhn-as-ghn-knn")]
# the oracle-graph control (cifar10_oracle.toml): SHN / GHN on the graph of the clients' true label
# distributions, against pFedHN, each other and themselves on the inferred kNN graph; in <root>-oracle/
ORACLE_PAIRS = [("shn-labels", "pfedhn"), ("ghn-labels", "pfedhn"), ("shn-labels", "ghn-labels"),
                ("shn-labels", "shn-knn"), ("ghn-labels", "ghn-knn")]


def control_rows(roots: list[Path], suffix: str = "control", pairs: list = CONTROL_PAIRS) -> list:
    """Rows of ``pairs`` for every setting root with a ``<root>-<suffix>`` folder beside it;
    each row's method reads "method vs reference"."""
    rows = []
    for root in roots:
        control = root.parent / f"{root.name}-{suffix}"
        if not control.is_dir():
            continue
        extra = load_runs(control)
        for setting, runs in load_runs(root).items():
            runs = {**runs, **extra.get(setting, {})}
            for method, ref in pairs:
                if method in runs and ref in runs:
                    rows += [replace(r, method=f"{method} vs {ref}")
                             for r in paired_rows({ref: runs[ref], method: runs[method]}, setting, ref)
                             if r.method == method]
    return rows


def replace_block(text: str, name: str, table: str) -> str:
    block = f"<!-- {name}:start -->\n{table}<!-- {name}:end -->"
    new, n = re.subn(rf"<!-- {name}:start -->.*?<!-- {name}:end -->", lambda _: block, text, flags=re.S)
    if n != 1:
        raise SystemExit(f"README.md: expected one <!-- {name}:start --> … <!-- {name}:end --> block")
    return new


def main() -> None:
    study = ROOT / "experiments" / "results" / "study"
    roots = [r for r in (setting_root(study, s) for s in SETTINGS) if r.is_dir()]
    rows = compare(roots, reference="pfedhn", out=study / "paired")
    table = markdown(rows, "pfedhn")
    vs_ghn = []
    for root in roots:
        for setting, runs in load_runs(root).items():
            for shn, ghn in SHN_VS_GHN:
                if shn in runs and ghn in runs:
                    vs_ghn += [r for r in paired_rows({ghn: runs[ghn], shn: runs[shn]}, setting, ghn) if r.method == shn]
    ghn_table = markdown(vs_ghn, "GHN on the same graph")
    readme = ROOT / "README.md"
    text = replace_block(readme.read_text(), "paired", table)
    text = replace_block(text, "vsghn", ghn_table)
    text = replace_block(text, "control", markdown(control_rows(roots), "the named reference"))
    text = replace_block(text, "oracle", markdown(control_rows(roots, "oracle", ORACLE_PAIRS), "the named reference"))
    for name, study_table in grid_studies.main().items():
        text = replace_block(text, name, study_table)
    readme.write_text(text)
    print(table + "\n" + ghn_table)


if __name__ == "__main__":
    main()
