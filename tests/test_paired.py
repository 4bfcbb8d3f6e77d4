"""shn compare / shn.paired: paired differences over seeds, t-intervals against scipy, verdicts
and the suite layout, on synthetic summaries with known values."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from scipy import stats

from shn.cli import main
from shn.paired import compare, paired_rows, t_interval, verdict


def write_run(root: Path, setting: str, method: str, seed: int, best: float, last: float,
              metric: str = "test_mse", updates: int = 600) -> None:
    d = root / setting / method / f"seed{seed}"
    d.mkdir(parents=True)
    (d / "summary.json").write_text(json.dumps({
        "primary_metric": metric, "metrics": {metric: last}, "best_val": {"round": 3, "metrics": {metric: best}},
        "budget": {"client_updates": updates}}))


def test_t_interval_matches_scipy():
    diffs = [0.3, -0.1, 0.4, 0.25, 0.05]
    mean, low, high = t_interval(diffs)
    sem = stats.sem(diffs)
    ref_low, ref_high = stats.t.interval(0.95, len(diffs) - 1, loc=sum(diffs) / 5, scale=sem)
    assert mean == pytest.approx(0.18) and low == pytest.approx(ref_low) and high == pytest.approx(ref_high)


@pytest.mark.parametrize("low,high,up,expected", [(0.1, 0.2, True, "win"), (0.1, 0.2, False, "loss"),
                                                  (-0.2, -0.1, False, "win"), (-0.2, 0.1, True, "tie")])
def test_verdict(low, high, up, expected):
    assert verdict(low, high, up) == expected


def test_pairing_removes_seed_noise_and_orders_reference_first(tmp_path):
    # huge seed-to-seed spread, but method b is always 1.0 below the reference: a clear win (MSE)
    for s, base in enumerate([10.0, 50.0, 90.0, 30.0, 70.0]):
        write_run(tmp_path, "los", "pfedhn", s, base, base + 1)
        write_run(tmp_path, "los", "b", s, base - 1.0 + 0.01 * s, base)
        write_run(tmp_path, "los", "c", s, base + (0.5 if s % 2 else -0.5), base)  # no consistent difference
    write_run(tmp_path, "los", "d", 0, 1.0, 1.0, updates=1200)  # one seed: no interval
    rows = {r.method: r for r in compare([tmp_path], reference="pfedhn", out=tmp_path / "rep")}
    assert list(rows)[0] == "pfedhn" and rows["pfedhn"].verdict == "reference"
    b = rows["b"]
    assert b.n_paired == 5 and b.diff_mean == pytest.approx(-1.0 + 0.02) and b.verdict == "win"
    assert b.ci_high < 0 and b.std > 10  # unpaired stds overlap; the paired interval does not
    assert rows["c"].verdict == "tie"
    assert rows["d"].verdict == "" and rows["d"].diff_mean is None and rows["d"].client_updates == 1200
    assert rows["pfedhn"].last_mean == pytest.approx(51.0)
    md = (tmp_path / "rep" / "paired.md").read_text()
    assert "| los | b | 5 |" in md and "win" in md and (tmp_path / "rep" / "paired.csv").is_file()


def test_accuracy_is_higher_better_and_missing_seeds_are_not_paired(tmp_path):
    for s in range(4):
        write_run(tmp_path, "cifar", "pfedhn", s, 0.5 + 0.01 * s, 0.5, metric="test_accuracy")
        if s != 2:
            write_run(tmp_path, "cifar", "shn", s, 0.6 + 0.012 * s, 0.6, metric="test_accuracy")
    runs = {m: {int(p.name[4:]): json.loads((p / "summary.json").read_text())
                for p in (tmp_path / "cifar" / m).iterdir()} for m in ("pfedhn", "shn")}
    rows = {r.method: r for r in paired_rows(runs, "cifar", "pfedhn")}
    assert rows["shn"].n_paired == 3 and rows["shn"].verdict == "win"
    assert math.isclose(rows["shn"].diff_mean, 0.1 + 0.002 * (0 + 1 + 3) / 3)


def test_cli_compare_and_its_errors(tmp_path, capsys):
    for s in range(3):
        write_run(tmp_path, "x", "pfedhn", s, 1.0 + s, 1.0)
        write_run(tmp_path, "x", "shn", s, 0.5 + s, 1.0)
    assert main(["compare", str(tmp_path), "--reference", "pfedhn"]) == 0
    assert "| x | shn | 3 |" in capsys.readouterr().out
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["compare", str(empty)]) == 2
    assert main(["compare", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err


def test_report_opens_with_the_paired_table(tmp_path):
    from shn.report import build_report

    root = tmp_path / "suite"
    for s in range(3):
        for method, value in (("pfedhn", 0.5), ("shn", 0.6)):
            d = root / "cifar" / method / f"seed{s}"
            d.mkdir(parents=True)
            (d / "summary.json").write_text(json.dumps({
                "method": method, "task": "cifar10", "seed": s, "primary_metric": "test_accuracy",
                "metrics": {"test_accuracy": value + 0.01 * s}, "best_val": {"round": 1, "metrics": {
                    "test_accuracy": value + 0.01 * s + (0.001 * s if method == "shn" else 0.0)}}}))
            (d / "config.toml").write_text(f'method = "{method}"\nseed = {s}\n')
    md = build_report([root], out=tmp_path / "rep", reference="pfedhn").read_text()
    assert md.index("## Paired comparison") < md.index("## Main table")
    assert "| cifar | shn | 3 |" in md and "win" in md and (tmp_path / "rep" / "paired.csv").is_file()


def test_report_shows_the_naive_forecasts_of_forecasting_runs(tmp_path):
    from shn.report import build_report

    d = tmp_path / "runs" / "pfedhn"
    d.mkdir(parents=True)
    (d / "config.toml").write_text('method = "pfedhn"\nseed = 0\n[task]\nname = "traffic"\n')
    (d / "summary.json").write_text(json.dumps({
        "method": "pfedhn", "task": "traffic", "seed": 0, "primary_metric": "test_mse",
        "metrics": {"test_mse": 60.0}, "best_val": {"round": 1, "metrics": {"test_mse": 60.0}},
        "baselines": {"persistence": {"test_mse": 71.38, "test_mae": 4.43},
                      "train_mean": {"test_mse": 161.64, "test_mae": 7.65}}}))
    md = build_report([tmp_path / "runs"], out=tmp_path / "rep").read_text()
    assert "Naive forecasts on the same test targets" in md
    assert "| persistence | 71.38" in md and "| train_mean | 161.6" in md
