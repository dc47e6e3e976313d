"""The one launcher of local ranks (``stadi_worker.cli.ranks``, on torch's elastic multiprocessing): torchrun's
variables and a rank's own environment, the first failure named and the others stopped, deadlines, and the
worker's settings read from the environment with a bad one named."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
from stadi_worker.cli.ranks import Gang, rank_log, record_failure, run_ranks

# A rank program: writes what it was given, then does what its rank's ACT says.
RANK = '''
import json, os, sys, time
sys.path.insert(0, os.environ["HERE"])
from stadi_worker.cli.ranks import record_failure
rank = int(os.environ["RANK"])
keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SHARED", "MINE")
with open(os.path.join(os.environ["OUT"], f"env{rank}.json"), "w") as f:
    json.dump({k: os.environ.get(k) for k in keys}, f)
act = os.environ.get("ACT", "ok")
if act == "fail":
    after = os.environ.get("AFTER")  # fail only once rank AFTER has failed: an order process start-up cannot swap
    while after is not None and not os.path.exists(os.path.join(os.environ["OUT"], f"failed{after}")):
        time.sleep(0.05)
    time.sleep(float(os.environ.get("DELAY", "0")))
    record_failure(rank, f"rank {rank} gave up")
    print(f"rank {rank} gave up", file=sys.stderr)
    open(os.path.join(os.environ["OUT"], f"failed{rank}"), "w").close()
    sys.exit(3)
if act == "crash":
    print("a last line before the crash", file=sys.stderr)
    os._exit(7)
if act == "hang":
    time.sleep(600)
'''


@pytest.fixture
def program(tmp_path: Path) -> list[str]:
    path = tmp_path / "rank.py"
    path.write_text(RANK)
    return [sys.executable, str(path)]


def env(tmp_path: Path) -> dict[str, str]:
    return {"OUT": str(tmp_path), "HERE": str(Path(__file__).parent), "SHARED": "yes"}


def test_every_rank_gets_torchruns_variables_and_its_own(program: list[str], tmp_path: Path) -> None:
    outcome = run_ranks(program, 3, tmp_path / "logs", 60, env=env(tmp_path), rank_env={1: {"MINE": "one"}})
    assert outcome.ok and outcome.codes == [0, 0, 0] and outcome.failure is None
    seen = [json.loads((tmp_path / f"env{r}.json").read_text()) for r in range(3)]
    assert [(s["RANK"], s["LOCAL_RANK"], s["WORLD_SIZE"]) for s in seen] == [(str(r), str(r), "3") for r in range(3)]
    assert {s["MASTER_ADDR"] for s in seen} == {"127.0.0.1"} and len({s["MASTER_PORT"] for s in seen}) == 1
    assert [s["SHARED"] for s in seen] == ["yes"] * 3 and [s["MINE"] for s in seen] == [None, "one", None]


def test_the_first_failure_is_named_and_the_others_stopped(program: list[str], tmp_path: Path) -> None:
    """Rank 2 fails first, rank 1 a moment later (of its death, as ranks do): rank 2 is reported; rank 0, stuck,
    is stopped instead of waited for."""
    started = time.monotonic()
    outcome = run_ranks(program, 3, tmp_path / "logs", 120, env=env(tmp_path),
                        rank_env={0: {"ACT": "hang"}, 1: {"ACT": "fail", "AFTER": "2", "DELAY": "0.3"},
                                          2: {"ACT": "fail"}})
    assert time.monotonic() - started < 60
    assert not outcome.ok and not outcome.timed_out
    assert outcome.failure is not None and (outcome.failure.rank, outcome.failure.message) == (2, "rank 2 gave up")
    assert outcome.codes[2] == 3 and outcome.codes[0] != 0
    assert "rank 2 gave up" in rank_log(tmp_path / "logs", 2).read_text()


def test_a_crash_without_a_record_reports_its_exit_code_and_last_line(program: list[str], tmp_path: Path) -> None:
    outcome = run_ranks(program, 2, tmp_path / "logs", 60, env=env(tmp_path), rank_env={1: {"ACT": "crash"}})
    assert outcome.failure is not None and outcome.failure.rank == 1
    assert outcome.failure.message == "exit code 7: a last line before the crash"


def test_a_deadline_stops_the_gang(program: list[str], tmp_path: Path) -> None:
    with Gang(program, 2, tmp_path / "logs", env={**env(tmp_path), "ACT": "hang"}) as gang:
        outcome = gang.wait(2)
    assert outcome.timed_out and not outcome.ok and 2 <= outcome.seconds < 30


def test_record_failure_writes_elastics_format(tmp_path: Path) -> None:
    path = tmp_path / "error.json"
    try:
        raise ValueError("bad plan")
    except ValueError as error:
        record_failure(4, "bad plan", error, str(path))
    record = json.loads(path.read_text())
    assert record["rank"] == 4 and record["message"]["message"] == "bad plan"
    assert "ValueError: bad plan" in record["message"]["extraInfo"]["py_callstack"]
    assert int(record["message"]["extraInfo"]["timestamp"]) == int(record["time"])


def test_a_bad_setting_is_named(tmp_path: Path) -> None:
    """``stadi worker`` with an unreadable STADI_* variable: one line naming it, the error recorded."""
    import subprocess

    stadi = Path(sys.executable).parent / "stadi"
    error = tmp_path / "err.json"
    proc = subprocess.run([str(stadi), "worker"], capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "STADI_PROGRESS_INTERVAL": "soon",
                               "TORCHELASTIC_ERROR_FILE": str(error)})
    assert proc.returncode == 1
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("stadi worker rank 0: STADI_PROGRESS_INTERVAL:") and "number" in line
    assert json.loads(error.read_text())["message"]["message"].startswith("STADI_PROGRESS_INTERVAL")
