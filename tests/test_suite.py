"""shn suite: expansion, up-front validation (unknown methods), skipping finished runs, resuming
from a checkpoint, and going on past a failing run (tiny digits runs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shn.cli import main
from shn.suite import SuiteError, load_suite, run_suite
from tests.conftest import tiny_digits_toml

TINY = tiny_digits_toml("local", rounds=2)


def write(tmp_path: Path, runs: str) -> Path:
    (tmp_path / "tiny.toml").write_text(TINY)
    suite = tmp_path / "suite.toml"
    suite.write_text(f'out = "{tmp_path / "out"}"\n' + runs.replace("CONFIG", str(tmp_path / "tiny.toml")))
    return suite


def test_expansion_layout_and_overrides(tmp_path):
    suite = write(tmp_path, """
set = ["eval_every=2"]
[[runs]]
name = "study"
config = "CONFIG"
seeds = [0, 2]
set = ["rounds=3"]
methods = ["local", { name = "shn-knn", method = "shn", set = ["graph.kind=\\"knn\\""] }]
grid = { "encoder.layers" = [1, 4] }
""")
    jobs, root = load_suite(suite)
    assert root == tmp_path / "out" and len(jobs) == 2 * 2 * 2
    dirs = {str(j.run_dir.relative_to(root)) for j in jobs}
    assert "study/local/encoder.layers=1/seed0" in dirs and "study/shn-knn/encoder.layers=4/seed2" in dirs
    job = next(j for j in jobs if j.variant == "shn-knn" and j.seed == 2 and dict(j.grid)["encoder.layers"] == 4)
    config = job.config()
    assert (config.method, config.seed, config.rounds, config.eval_every) == ("shn", 2, 3, 2)
    assert (config.graph.kind, config.encoder.layers) == ("knn", 4)


def test_variant_seeds_replace_the_entry_seeds(tmp_path):
    suite = write(tmp_path, """
[[runs]]
name = "cmp"
config = "CONFIG"
seeds = [0, 1, 2]
methods = ["pfedhn", { name = "fedavg", method = "fedavg", seeds = [0, 5] }]
""")
    jobs, _ = load_suite(suite)
    assert [(j.variant, j.seed) for j in jobs] == [("pfedhn", 0), ("fedavg", 0), ("pfedhn", 1), ("pfedhn", 2),
                                                   ("fedavg", 5)]
    bad = write(tmp_path, """
[[runs]]
name = "cmp"
config = "CONFIG"
methods = [{ name = "fedavg", method = "fedavg", seeds = [] }]
""")
    with pytest.raises(SuiteError, match=r"methods\['fedavg'\]\.seeds: expected a non-empty list"):
        load_suite(bad)


def test_unknown_method_fails_before_running(tmp_path):
    suite = write(tmp_path, """
[[runs]]
name = "cmp"
config = "CONFIG"
methods = ["local", "nosuchmethod"]
""")
    with pytest.raises(SuiteError, match=r"unknown method.*'nosuchmethod'.*Registered methods: .*pfedhn"):
        run_suite(suite, progress=False)
    assert not (tmp_path / "out").exists()
    assert main(["suite", str(suite), "--no-progress"]) == 2
    bad = write(tmp_path, '[[runs]]\nname = "x"\nconfig = "CONFIG"\nmethods = ["local"]\nset = ["rounds=0"]\n')
    with pytest.raises(SuiteError, match=r"x/local/seed0: rounds: must be > 0"):
        run_suite(bad, progress=False)


def test_skips_finished_resumes_and_survives_a_failing_run(tmp_path, capsys):
    suite = write(tmp_path, """
[[runs]]
name = "broken"
config = "CONFIG"
methods = ["local"]
set = ["clients_per_round=5"]   # valid config, but more than the task's 4 clients: fails when run

[[runs]]
name = "ok"
config = "CONFIG"
methods = ["local"]
seeds = [0, 1]
""")
    out = tmp_path / "out"
    assert main(["suite", str(suite), "--no-progress"]) == 1  # a failed run → non-zero exit at the end
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (result["runs"], result["done"], result["skipped"]) == (3, 2, 0)
    assert result["failed"][0]["run"] == "broken/local/seed0" and "clients_per_round" in result["failed"][0]["error"]
    assert (out / "broken" / "local" / "seed0" / "error.log").is_file()
    finished = {s: (out / "ok" / "local" / f"seed{s}" / "summary.json") for s in (0, 1)}
    stamps = {s: p.stat().st_mtime_ns for s, p in finished.items()}
    before = json.loads(finished[1].read_text())

    again = run_suite(suite, progress=False)
    assert (len(again.done), len(again.skipped), len(again.failed)) == (0, 2, 1)
    assert {s: p.stat().st_mtime_ns for s, p in finished.items()} == stamps

    finished[1].unlink()  # killed after its last checkpoint, before the summary was written
    third = run_suite(suite, only=["ok/"], progress=False)
    assert [j.label for j in third.done] == ["ok/local/seed1"] and len(third.skipped) == 1 and not third.failed
    after = json.loads(finished[1].read_text())
    assert after["metrics"] == before["metrics"]  # resumed from the checkpoint: same numbers
    log = [json.loads(line) for line in (out / "suite_log.jsonl").read_text().splitlines()]
    assert [r["status"] for r in log].count("failed") == 2 and (out / "suite.toml").is_file()


def test_parallel_jobs_give_the_numbers_of_a_serial_suite(tmp_path):
    """--jobs N: (entry, seed) groups in worker processes; same metrics as one process, and a
    failing run still fails only itself."""
    runs = """
[[runs]]
name = "ok"
config = "CONFIG"
methods = ["local", "fedavg"]
seeds = [0, 1]

[[runs]]
name = "broken"
config = "CONFIG"
methods = ["local"]
set = ["clients_per_round=5"]
"""
    serial_dir, parallel_dir = tmp_path / "serial", tmp_path / "parallel"
    serial_dir.mkdir(), parallel_dir.mkdir()
    serial = run_suite(write(serial_dir, runs), progress=False)
    parallel = run_suite(write(parallel_dir, runs), progress=False, jobs=2)
    assert sorted(j.label for j in parallel.done) == sorted(j.label for j in serial.done)
    assert len(parallel.done) == 4 and [j.label for j, _ in parallel.failed] == ["broken/local/seed0"]
    for job in serial.done:
        rel = job.run_dir.relative_to(serial_dir / "out")
        a = json.loads((job.run_dir / "summary.json").read_text())["metrics"]
        b = json.loads((parallel_dir / "out" / rel / "summary.json").read_text())["metrics"]
        assert a == b
    with pytest.raises(SuiteError, match="--jobs"):
        run_suite(write(serial_dir, runs), progress=False, jobs=0)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table from /proc (Linux)")
def test_parallel_workers_stop_when_the_suite_process_is_killed(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    slow = tiny_digits_toml("local", rounds=400)
    (tmp_path / "slow.toml").write_text(slow)
    suite = tmp_path / "suite.toml"
    suite.write_text(f'out = "{tmp_path / "out"}"\n[[runs]]\nname = "s"\nconfig = "{tmp_path / "slow.toml"}"\n'
                     'methods = ["local", "fedavg"]\n')

    def children(pid: int) -> list[int]:
        out = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(stat.parent.name))
        return out

    proc = subprocess.Popen([sys.executable, "-m", "shn.cli", "--threads", "1", "suite", str(suite), "--jobs", "2",
                             "--no-progress"], cwd=Path(__file__).resolve().parents[1],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        workers: list[int] = []
        while time.time() < deadline and len(workers) < 2:
            time.sleep(0.5)
            workers = [c for c in children(proc.pid) if "spawn_main" in Path(f"/proc/{c}/cmdline").read_text(errors="replace")]
        assert len(workers) == 2, "the suite did not start its two workers"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 20
        while time.time() < deadline and any(Path(f"/proc/{w}").exists() for w in workers):
            time.sleep(0.5)
        alive = [w for w in workers if Path(f"/proc/{w}").exists() and "Z" not in
                 Path(f"/proc/{w}/stat").read_text().rsplit(")", 1)[1].split()[0]]
        assert not alive, f"workers {alive} outlived the killed suite process"
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_changed_suite_config_reruns_the_stale_runs_and_keeps_the_old_ones_aside(tmp_path, caplog):
    """`set = ["rounds=2"]` → `["rounds=3"]`: the finished 2-round runs are not reported as done
    ("skipped") but moved to <dir>.stale-1 and run again with 3 rounds; the changed key is logged.
    A change of device or checkpointing alone is not a change of the experiment."""
    runs = '[[runs]]\nname = "cmp"\nconfig = "CONFIG"\nmethods = ["local"]\nset = ["ROUNDS"]\n'
    suite = write(tmp_path, runs.replace("ROUNDS", "rounds=2"))
    run_dir = tmp_path / "out" / "cmp" / "local" / "seed0"
    first = run_suite(suite, progress=False)
    assert len(first.done) == 1 and json.loads((run_dir / "summary.json").read_text())["rounds"] == 2

    suite = write(tmp_path, runs.replace("ROUNDS", "rounds=3"))
    second = run_suite(suite, progress=False)
    assert len(second.done) == 1 and not second.skipped
    assert second.as_dict()["stale_rerun"] == [{"run": "cmp/local/seed0", "changed": ["rounds"]}]
    assert json.loads((run_dir / "summary.json").read_text())["rounds"] == 3
    stale = run_dir.with_name("seed0.stale-1")
    assert json.loads((stale / "summary.json").read_text())["rounds"] == 2  # kept, aside
    assert "cmp/local/seed0" in caplog.text and "rounds" in caplog.text
    log = [json.loads(line) for line in (tmp_path / "out" / "suite_log.jsonl").read_text().splitlines()]
    assert {"status": "stale", "changed": ["rounds"]}.items() <= log[-2].items()

    unchanged = run_suite(suite, progress=False)
    assert len(unchanged.skipped) == 1 and not unchanged.stale
    again = run_suite(suite, progress=False, extra=['device="cpu"', "checkpoint_every=1"])
    assert len(again.skipped) == 1 and not again.stale and not run_dir.with_name("seed0.stale-2").exists()
    other = run_suite(suite, progress=False, extra=["methods.fedavg.lr=0.5"])  # another method's options
    assert len(other.skipped) == 1 and not other.stale
    changed = run_suite(suite, progress=False, extra=["local.lr=0.01"])
    assert [k for _, k in changed.stale] == [["local.lr"]] and run_dir.with_name("seed0.stale-2").is_dir()
