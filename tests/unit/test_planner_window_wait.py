"""The wait at a strided window's start in the planner, checked against the 2x H200 runs it was derived from.

bench/results/speed-2xh200-all.json: SDXL and SD3 at 1024^2, 50 steps, CFG, CUDA graphs, two H200s over
NVLink, the second confined to 100%, 50% and 25% of its SMs (CUDA MPS; levels "100", "50", "25"). stadi ran
strides (1, 2) at 50% and (1, 3) at 25%; ``step_ms[run][rank]`` holds every step each rank took,
``measured_speeds`` are the planner's input speeds and ``latency_ms`` the wall time of one image.

Those runs exchanged band context per layer, so every plan here is priced with ``exchange="per-layer"`` (the
planner's default, the bucketed exchange of one collective per window, has no wait to drag: see
test_planner_exchange.py).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import replace
from itertools import combinations
from pathlib import Path
from typing import Any

import pytest

from stadi import families
from stadi.api import Plan
from stadi.families import PROFILES
from stadi.planner import LINKS, Device, PlanRequest, plan
from stadi.planner.evaluate import predict_seconds
from stadi.planner.strategies import _window_busy

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results" / "speed-2xh200-all.json"
COMPARED = ("single", "patch", "cfg", "stadi")
# the strategies those runs could run: auto replays among them (cfg-stride came later)
RAN = ("single", "patch", "cfg", "stadi", "stadi+cfg", "hybrid")
STEPS, WARMUP = 50, 4  # the bench job: 50 steps, warmupSteps 4 (stadi bench speed's defaults)
STRIDED = [("50", "sdxl"), ("50", "sd3"), ("25", "sdxl"), ("25", "sd3")]
EXCHANGE = "per-layer"  # the engine these runs measured


@pytest.fixture(scope="module")
def measured() -> dict[str, Any]:
    return json.loads(RESULTS.read_text())["levels"]


def pool(run: dict[str, Any]) -> list[Device]:
    return [Device("H200", node="local", index=i, speed=v) for i, v in enumerate(run["measured_speeds"])]


def request(family: str, strategy: str = "auto") -> PlanRequest:
    return PlanRequest(family, 1024, 1024, steps=STEPS, warmup_steps=WARMUP, strategy=strategy, exchange=EXCHANGE,
                       among=RAN)


def ran(measured: dict[str, Any], level: str, family: str) -> Plan:
    """The stadi plan the bench ran (rank r on GPU r): its rows and strides from the JSON."""
    run = measured[level]["models"][family]
    doc = run["strategies"]["stadi"]["plan"]
    p = plan(replace(request(family, "stadi"), gpus_min=2, gpus_max=2), pool(run))
    ranks = [r.model_copy(update={"rank": i, "rows": tuple(rows), "stride": k, "gpu_index": i})
             for i, (r, rows, k) in enumerate(zip(p.ranks, doc["rows"], doc["strides"], strict=True))]
    return p.model_copy(update={"ranks": ranks, "sync_period": doc["sync_period"]})


def predicted(measured: dict[str, Any], level: str, family: str) -> tuple[dict[str, float], dict[str, float]]:
    """(predicted, measured) seconds per compared strategy: single, patch and cfg as the planner predicts
    them at the run's speeds, stadi for the plan that ran (its rows came from an earlier cost model)."""
    run = measured[level]["models"][family]
    p = plan(request(family), pool(run))
    out = {s: p.alternatives[s] for s in COMPARED if s != "stadi"}
    out["stadi"] = predict_seconds(ran(measured, level, family), run["measured_speeds"], WARMUP, 4, 20,
                                   LINKS["nvlink"], exchange=EXCHANGE)
    return out, {s: run["strategies"][s]["latency_ms"] / 1e3 for s in COMPARED}


def test_the_wait_needs_strides() -> None:
    """Stride 1 everywhere (P = 1) or one rank: every step exchanges, nothing waits. With strides, the rank
    of the longest local run (L) is busy n * c, every other rank n * c + drag * (L - its own local run)."""
    assert _window_busy([30.0, 60.0], [1, 1], 0.63) == [30.0, 60.0]
    assert _window_busy([30.0], [1], 0.63) == [30.0]
    assert _window_busy([30.0, 60.0], [1, 2], 0.0) == pytest.approx([60.0, 60.0])
    # (1, 2): the slow rank's one step waits the fast rank's one local step
    assert _window_busy([30.0, 60.0], [1, 2], 0.25) == pytest.approx([60.0, 60.0 + 0.25 * 30.0])
    # (1, 2, 4), P = 4: local runs 3 * 10, 1 * 20, 0 * 40 ms; L = 30
    assert _window_busy([10.0, 20.0, 40.0], [1, 2, 4], 0.5) == pytest.approx([40.0, 40.0 + 0.5 * 10, 40.0 + 0.5 * 30])


def test_every_family_has_a_drag_below_one() -> None:
    """A share of the pace: below 1, so that every rank keeps a positive weight in the elastic split."""
    assert all(0.0 <= p.window_wait_drag < 1.0 for p in PROFILES.values())


def test_only_strided_windows_pay_it(measured: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """single, patch, cfg, cfg-stride, stadi+cfg and hybrid predict the same without the drag; stadi with
    strides more."""
    runs = [measured[level]["models"]["sd3"] for level in ("100", "50", "25")]
    with_it = [plan(request("sd3"), pool(run)).alternatives for run in runs]
    monkeypatch.setitem(families.PROFILES, "sd3", replace(PROFILES["sd3"], window_wait_drag=0.0))
    without = [plan(request("sd3"), pool(run)).alternatives for run in runs]
    for a, b in zip(with_it, without, strict=True):
        assert {s: a[s] for s in a if s != "stadi"} == {s: b[s] for s in b if s != "stadi"}
    assert with_it[0]["stadi"] == without[0]["stadi"] == with_it[0]["patch"]  # equal GPUs: stride 1, no wait
    assert with_it[1]["stadi"] > without[1]["stadi"] * 1.1 and with_it[2]["stadi"] > without[2]["stadi"] * 1.1


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_drag_is_the_measured_share(measured: dict[str, Any], family: str) -> None:
    """window_wait_drag is the mean over 50% and 25% of: (the slow rank's strided step - its first window
    start, where every rank starts together and nothing waits) / (k - 1 local steps of the fast rank), the
    median steps of each run, the median over runs. SDXL 0.22 and 0.29, SD3 0.50 and 0.76."""
    shares = []
    for level in ("50", "25"):
        stadi = measured[level]["models"][family]["strategies"]["stadi"]
        period = stadi["plan"]["sync_period"]
        lead = WARMUP + (STEPS - WARMUP) % period  # steps every rank takes before the first full window
        per_run = []
        for fast, slow in stadi["step_ms"]:
            local = statistics.median(fast[i] for i in range(lead + 1, STEPS) if (i - lead) % period)
            per_run.append((statistics.median(slow[lead + 1:]) - slow[lead]) / ((period - 1) * local))
        shares.append(statistics.median(per_run))
    assert PROFILES[family].window_wait_drag == pytest.approx(statistics.mean(shares), abs=0.01), shares


@pytest.mark.parametrize(("level", "family"), STRIDED)
def test_stadi_latency_within_10_percent(measured: dict[str, Any], monkeypatch: pytest.MonkeyPatch, level: str,
                                         family: str) -> None:
    """The plans that ran, predicted at the run's speeds: SDXL 1.777 s (1.847 measured) and SD3 2.089 s
    (2.110) at 50%, SDXL 2.316 s (2.281) and SD3 2.723 s (2.942) at 25%; without the wait 1.657, 1.698,
    2.056 and 2.052 s (down to -30%). The wall time also holds ~60 ms the model leaves out (single: -3%)."""
    pred, latency = predicted(measured, level, family)
    assert pred["stadi"] == pytest.approx(latency["stadi"], rel=0.10)
    monkeypatch.setitem(families.PROFILES, family, replace(PROFILES[family], window_wait_drag=0.0))
    without, _ = predicted(measured, level, family)
    assert abs(without["stadi"] / latency["stadi"] - 1) > abs(pred["stadi"] / latency["stadi"] - 1)
    # the planner's own rows for these speeds are predicted no slower than the rows that ran
    assert plan(request(family, "stadi"), pool(measured[level]["models"][family])).predicted_seconds <= (
        pred["stadi"] + 1e-6)


@pytest.mark.parametrize("level", ["100", "50", "25"])
@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_measured_ranking_reproduced(measured: dict[str, Any], level: str, family: str) -> None:
    """Every pair of single, patch, cfg and stadi whose measured latencies differ by more than 3% is
    predicted in the same order (stadi: the plan that ran). Without the wait, stadi at 25% (2.06 s SDXL,
    2.05 s SD3) was predicted ahead of one GPU (2.10, 2.60 s); measured, it was 2.28 s against 2.16 and 2.94 s
    against 2.68."""
    pred, latency = predicted(measured, level, family)
    for a, b in combinations(COMPARED, 2):
        if abs(latency[a] / latency[b] - 1) > 0.03:
            assert (pred[a] < pred[b]) == (latency[a] < latency[b]), (a, b, pred, latency)


@pytest.mark.parametrize(("level", "family", "best"), [
    ("100", "sdxl", "cfg"), ("100", "sd3", "cfg"),
    ("50", "sdxl", "stadi"), ("50", "sd3", "stadi"),
    ("25", "sdxl", "single"),
])
def test_auto_picks_what_measured_fastest(measured: dict[str, Any], level: str, family: str, best: str) -> None:
    """At the runs' speeds auto takes the strategy that was measured fastest: cfg on equal GPUs, stadi at 50%
    (SDXL 1.85 s against 2.15 s alone, SD3 2.11 against 2.68), one GPU for SDXL at 25% (2.16 s against
    2.28 for stadi). SD3 at 25% is left out: the planner's split there (90/38 rows, predicted 2.33 s) is not
    the one measured (68/60: 2.94 s, predicted 2.72 s)."""
    p = plan(request(family), pool(measured[level]["models"][family]))
    assert p.strategy == best, p.alternatives
