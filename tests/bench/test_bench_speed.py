"""``stadi bench speed`` on the CPU: the harness end to end on a tiny model, 2 Gloo ranks, 1 run, the slow
rank emulated by --slowdown pacing instead of CUDA MPS (kept small: the suite runs on 2 shared cores)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from stadi_bench.speed import STRATEGIES_MEASURED, merge, summarize


def test_bench_speed_cpu_smoke(model_cache: Path, tmp_path: Path) -> None:
    from stadi.cli import main

    rc = main(["bench", "speed", "--device", "cpu", "--size", "tiny", "--models", "sd3", "--height", "64",
               "--steps", "4", "--warmup-steps", "1", "--min-effective-steps", "2", "--runs", "1",
               "--warmup-runs", "0", "--slowdown", "1=2", "--threads", "1", "--cache-dir", str(model_cache),
               "--out-dir", str(tmp_path), "--name", "smoke", "--no-plot"])
    assert rc == 0
    doc = json.loads((tmp_path / "smoke.json").read_text())
    assert doc["ranks"] == 2 and doc["slowdown_kind"] == "paced" and "partial" not in doc
    assert doc["command"].startswith("stadi bench speed")
    assert set(doc["levels"]) == {"1", "2"}
    for level in doc["levels"].values():
        res = level["models"]["sd3"]
        assert list(res["strategies"]) == doc["strategies"] == [n for n in STRATEGIES_MEASURED if n != "stadi+cfg"]
        single = res["strategies"]["single"]
        assert len(single["per_rank_latency_ms"]) == 2 and res["ideal_ms"] < single["latency_ms"]
        for name in ("patch", "cfg", "stadi", "auto"):
            st = res["strategies"][name]
            assert st["latency_ms"] > 0 and len(st["wall_ms"][0]) == 2 and len(st["breakdown"]) == 2
            assert st["psnr"] > 10 and not math.isnan(st["ssim"])
    # the paced rank is slower on its own: its measured speed is lower at the slow level
    speeds = doc["levels"]["2"]["models"]["sd3"]["measured_speeds"]
    assert speeds[1] < speeds[0]
    summary = doc["summary"]
    assert summary["worst_stadi_over_ideal"] > 0
    assert set(summary["stadi_vs_patch_reduction"]["sd3"]) == {"1", "2"}
    assert "sd3" in summary["homogeneous_speedup"]
    merged = merge([tmp_path / "smoke.json"], tmp_path / "merged.json")
    assert merged["summary"] == summary


def test_summarize_targets() -> None:
    levels = {
        "100": {"models": {"sd3": {"ideal_ms": 1000.0, "strategies": {
            "single": {"latency_ms": 2000.0}, "patch": {"latency_ms": 1200.0, "psnr": 30.0},
            "cfg": {"latency_ms": 1100.0}, "stadi": {"latency_ms": 1050.0, "psnr": 29.5},
            "auto": {"latency_ms": 1100.0}}}}},
        "25": {"models": {"sd3": {"ideal_ms": 1600.0, "strategies": {
            "patch": {"latency_ms": 4000.0}, "stadi": {"latency_ms": 1800.0}}}}},
    }
    s = summarize(levels)
    assert s["worst_stadi_over_ideal"] == 1.125
    assert s["stadi_vs_patch_reduction"]["sd3"] == {"100": 0.125, "25": 0.55}
    assert s["homogeneous_speedup"]["sd3"] == round(2000 / 1050, 4)
    assert s["psnr_patch_minus_stadi_db"]["sd3"] == {"100": 0.5}


def test_strategies_option() -> None:
    from stadi_bench.speed import _strategies

    assert _strategies("all", 2) == ["single", "patch", "cfg", "stadi", "hybrid", "auto"]
    assert _strategies("all", 4) == ["single", "patch", "cfg", "stadi", "stadi+cfg", "auto"]
    assert _strategies("stadi, patch", 2) == ["single", "patch", "stadi"]  # table order; single always runs
    with pytest.raises(ValueError, match="--strategies: unknown fast; allowed: all or some of single, patch"):
        _strategies("stadi,fast", 2)


def test_levels_slow_the_last_ranks() -> None:
    from stadi_bench.speed import _mps_level, level_slowdowns

    assert level_slowdowns("50", 2) == {1: "50"}
    assert level_slowdowns(_mps_level(" 050/25"), 4) == {2: "50", 3: "25"}  # rank 0 stays the fastest
    with pytest.raises(ValueError, match="slows 2 ranks; with 2 ranks at most 1"):
        level_slowdowns("50/25", 2)
    with pytest.raises(ValueError, match="--levels: '50/0' is not a percentage of the SMs"):
        _mps_level("50/0")


def test_a_failing_level_keeps_what_it_measured(model_cache: Path, tmp_path: Path) -> None:
    """Ranks that fail on the second model still leave the first model's figures (and the error) behind."""
    from stadi_bench.speed import launch_level

    doc = {"model": {"family": "sd3", "source": "random://tiny", "dtype": "float32"}, "prompts": ["a cat"],
           "height": 64, "width": 64, "steps": 3, "guidanceScale": 5.0, "seed": 1,
           "parallelism": {"warmupSteps": 1, "minEffectiveSteps": 2}, "output": {"uri": "file:///tmp/x"}}
    broken = dict(doc, steps=0)  # fails validation inside the ranks, after the first model was measured
    config = {"level": "1", "device": "cpu", "models": [doc, broken], "prompt": "a cat", "seed": 1,
              "cache_dir": str(model_cache), "warmup_runs": 0, "runs": 1, "strategies": ["single", "patch"],
              "out": str(tmp_path / "level-1.json"), "threads": 1}
    data = launch_level(2, config, tmp_path, {}, {}, 300.0)
    assert "failed with exit codes" in data["error"]
    assert set(data["models"]) == {"sd3"}
    assert data["models"]["sd3"]["strategies"]["patch"]["latency_ms"] > 0
    with pytest.raises(RuntimeError, match="failed with exit codes"):
        launch_level(2, dict(config, models=[broken], out=str(tmp_path / "none.json")), tmp_path, {}, {}, 300.0)
