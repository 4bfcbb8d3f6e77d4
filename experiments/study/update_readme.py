"""Regenerate the README's paired table from the committed study runs:

    python experiments/study/update_readme.py

Runs `shn compare` over experiments/results/study/<setting>/ (phase-B outputs), writes
experiments/results/study/paired/{paired.md,paired.csv} and replaces the block between the
README's `<!-- paired:start -->` and `<!-- paired:end -->` markers with the table.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from shn.paired import compare, markdown  # noqa: E402

SETTINGS = ["cifar10-dir0.1", "losloop", "beijing", "chickenpox"]


def main() -> None:
    study = ROOT / "experiments" / "results" / "study"
    roots = [study / s for s in SETTINGS if (study / s).is_dir()]
    rows = compare(roots, reference="pfedhn", out=study / "paired")
    table = markdown(rows, "pfedhn")
    readme = ROOT / "README.md"
    text = readme.read_text()
    block = f"<!-- paired:start -->\n{table}<!-- paired:end -->"
    new, n = re.subn(r"<!-- paired:start -->.*?<!-- paired:end -->", lambda _: block, text, flags=re.S)
    if n != 1:
        raise SystemExit("README.md: expected one <!-- paired:start --> … <!-- paired:end --> block")
    readme.write_text(new)
    print(table)


if __name__ == "__main__":
    main()
