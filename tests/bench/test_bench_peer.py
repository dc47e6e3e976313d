"""The peer of ``stadi bench speed --peer xdit`` on the CPU, without xfuser: a stand-in driver takes the place of
``stadi_worker.xdit_driver`` (same arguments, same result file), so launching, MPS variables per rank, timeouts,
failure records, the best per level, the summary, the table and ``--merge`` are checked on real outputs."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import pytest
from stadi_bench import peer_xdit
from stadi_bench.flags import add_speed_arguments as add_arguments
from stadi_bench.peer_xdit import PeerJob
from stadi_bench.speed import format_table, merge, run_bench, summarize

# Stands in for xdit_driver: latency by configuration, pipefusion crashes as xfuser 0.7.0 unpatched did, ring
# hangs. Every rank records its environment beside the result.
FAKE_DRIVER = '''
import json, os, sys, time
from pathlib import Path
argv = sys.argv[1:]
out = Path(argv[argv.index("--json_out") + 1])
rank = os.environ["RANK"]
(out.parent / f"env{rank}.json").write_text(json.dumps({"argv": argv, "rank": rank,
    "world": os.environ["WORLD_SIZE"], "mps": os.environ.get("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE")}))
if "--pipefusion_parallel_degree" in argv:
    print("step 1/4 10.0it/s]")
    raise RuntimeError("The expanded size of the tensor (128) must match the existing size (3072)")
if "--ring_degree" in argv:
    time.sleep(60)
ms = 1140.0 if "--use_torch_compile" in argv else 1590.0 if "--use_cfg_parallel" in argv else 3330.0
if rank == "0":
    out.write_text(json.dumps({"engine": "xDiT xfuser 0.7.0", "latency_ms": ms, "latency_runs_ms": [ms] * 3,
                               "latents_finite": "--ulysses_degree" not in argv,
                               "model": argv[argv.index("--model") + 1]}))
'''


@pytest.fixture
def driver(tmp_path: Path) -> tuple[str, ...]:
    path = tmp_path / "fake_driver.py"
    path.write_text(FAKE_DRIVER)
    return (sys.executable, str(path))


def job(model_dir: Path = Path("/models/random-full-sd3-v2"), family: str = "sd3") -> PeerJob:
    return PeerJob(model_dir=model_dir, family=family, height=1024, width=1024, steps=50, guidance=5.0, seed=42,
                   prompt="a lighthouse", dtype="float16", runs=3, warmup_runs=1)


def test_parse_configs() -> None:
    assert peer_xdit.parse_configs("all") == ["cfg", "cfg-compile", "pipefusion", "ulysses", "ring"]
    assert peer_xdit.parse_configs(" cfg, pipefusion ,") == ["cfg", "pipefusion"]
    with pytest.raises(ValueError, match="unknown tp"):
        peer_xdit.parse_configs("cfg,tp")
    with pytest.raises(ValueError, match="none given"):
        peer_xdit.parse_configs(",")
    # FLUX.1 has no guidance branch: Ulysses, Ring and PipeFusion, each with and without torch.compile
    assert peer_xdit.parse_configs("all", "flux") == ["ulysses", "ulysses-compile", "ring", "ring-compile",
                                                      "pipefusion", "pipefusion-compile"]
    with pytest.raises(ValueError, match="unknown cfg for flux"):
        peer_xdit.parse_configs("cfg", "flux")


def test_driver_argv_carries_the_job_and_the_configuration() -> None:
    argv = peer_xdit.driver_argv("cfg-compile", job(), Path("/w/result.json"))
    opts = dict(zip(argv[0:-2:2], argv[1:-2:2], strict=True))
    assert opts == {"--model": "/models/random-full-sd3-v2", "--height": "1024", "--width": "1024",
                    "--num_inference_steps": "50", "--guidance_scale": "5.0", "--seed": "42", "--warmup_steps": "1",
                    "--bench_prompt": "a lighthouse", "--dtype": "float16", "--warmup_runs": "1", "--repeats": "3",
                    "--json_out": "/w/result.json", "--family": "sd3"}
    assert argv[-2:] == ["--use_cfg_parallel", "--use_torch_compile"]
    flux = peer_xdit.driver_argv("ring-compile", job(family="flux"), Path("r"))
    assert flux[-5:] == ["--family", "flux", "--ring_degree", "2", "--use_torch_compile"]
    assert peer_xdit.driver_argv("pipefusion", job(), Path("r"))[-2:] == ["--pipefusion_parallel_degree", "2"]
    assert peer_xdit.driver_argv("ring", job(), Path("r"))[-2:] == ["--ring_degree", "2"]


def test_run_level_records_every_configuration(tmp_path: Path, driver: tuple[str, ...]) -> None:
    entry = peer_xdit.run_level("50", list(peer_xdit.CONFIGS["sd3"]), job(), tmp_path, {"EXTRA": "1"},
                                {1: {"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "50"}}, timeout_s=5, driver=driver)
    configs = entry["configs"]
    assert list(configs) == ["cfg", "cfg-compile", "pipefusion", "ulysses", "ring"]
    assert entry["best"] == "cfg-compile" and entry["latency_ms"] == 1140.0
    assert configs["cfg"]["latency_ms"] == 1590.0 and configs["cfg"]["model"] == "/models/random-full-sd3-v2"
    # a crash: exit codes and the error line from the rank's log, progress bars left out
    crash = configs["pipefusion"]
    assert crash["error"].startswith("ranks exited with codes") and 1 in crash["exit_codes"]
    tail = [ln for r in crash["log_tail"].values() for ln in r]
    assert any("RuntimeError: The expanded size of the tensor (128)" in ln for ln in tail)
    assert not any("it/s]" in ln for ln in tail)
    # non-finite latents: measured, never the best
    assert configs["ulysses"]["error"] == "final latents not finite" and configs["ulysses"]["latency_ms"] == 3330.0
    ring = configs["ring"]
    assert ring["error"] == "timed out after 5 s" and 5 <= ring["seconds"] < 30
    # the same MPS share on the last rank as stadi's ranks get, torchrun's variables on both
    seen = [json.loads((tmp_path / "peer-50-cfg" / f"env{r}.json").read_text()) for r in (0, 1)]
    assert [(s["rank"], s["world"], s["mps"]) for s in seen] == [("0", "2", None), ("1", "2", "50")]
    assert seen[0]["argv"][-1] == "--use_cfg_parallel"


def test_single_gpu_path_runs_one_rank_without_parallel_flags(tmp_path: Path, driver: tuple[str, ...]) -> None:
    flux = job(family="flux")
    for name, flags, ms in (("single", [], 3330.0), ("single-compile", ["--use_torch_compile"], 1140.0)):
        entry = peer_xdit.run_config(name, flux, tmp_path / name, {}, {}, timeout_s=20, driver=driver)
        assert entry["latency_ms"] == ms
        seen = json.loads((tmp_path / name / "env0.json").read_text())
        assert (seen["world"], seen["rank"]) == ("1", "0") and not (tmp_path / name / "env1.json").exists()
        argv = seen["argv"]
        assert argv[argv.index("--family") + 1:] == ["flux", *flags]


def test_best_ignores_failures() -> None:
    entry = peer_xdit.best({"cfg": {"latency_ms": 1590.0}, "ring": {"error": "timed out after 5 s"},
                            "ulysses": {"latency_ms": 900.0, "error": "final latents not finite"}})
    assert (entry["best"], entry["latency_ms"]) == ("cfg", 1590.0)
    assert peer_xdit.best({"ring": {"error": "x"}})["best"] is None


def _levels() -> dict[str, Any]:
    strat = {"100": (1100.0, 1200.0), "50": (1400.0, 1500.0)}
    return {lv: {"models": {"sd3": {"ideal_ms": 1000.0, "strategies": {
        "single": {"latency_ms": 2600.0}, "patch": {"latency_ms": 2000.0}, "stadi": {"latency_ms": s},
        "auto": {"latency_ms": a}}}}} for lv, (s, a) in strat.items()}


def _peer(levels: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    block = peer_xdit.new_block(list(peer_xdit.CONFIGS["sd3"]), 300.0)
    for level, configs in levels.items():
        peer_xdit.record_level(block, level, peer_xdit.best(configs))
    return block


PEER = {"100": {"cfg": {"latency_ms": 1590.0, "engine": "xDiT xfuser 0.7.0"}, "cfg-compile": {"latency_ms": 1140.0}},
        "50": {"cfg-compile": {"latency_ms": 1780.0}, "pipefusion": {"error": "timed out after 300 s"}}}


def test_summary_compares_stadi_and_auto_with_the_peer_best() -> None:
    peer = _peer(PEER)
    assert peer["version"] == "xDiT xfuser 0.7.0"
    s = summarize(_levels(), peer)
    assert s["peer_best"] == {"100": {"config": "cfg-compile", "latency_ms": 1140.0},
                              "50": {"config": "cfg-compile", "latency_ms": 1780.0}}
    assert s["stadi_vs_peer"] == {"sd3": {"100": round(1140 / 1100, 4), "50": round(1780 / 1400, 4)}}
    assert s["auto_vs_peer"] == {"sd3": {"100": 0.95, "50": round(1780 / 1500, 4)}}
    assert summarize(_levels())["stadi_vs_peer"] == {}


def test_table_shows_the_peer() -> None:
    table = format_table({"levels": _levels(), "peer": _peer(PEER)})
    rows = table.splitlines()
    assert rows[0].split()[:10] == ["level", "model", "single", "patch", "cfg", "stadi", "hybrid", "auto", "ideal",
                                    "peer"]
    assert rows[1].split()[9] == "1.140" and rows[2].split()[9] == "1.780"
    assert rows[3] == "peer xDiT sd3 level 100: cfg 1.590 | cfg-compile 1.140*"
    assert rows[4] == "peer xDiT sd3 level 50: cfg-compile 1.780* | pipefusion failed (timed out after 300 s)"


def test_merge_keeps_the_peer(tmp_path: Path) -> None:
    base = {"command": "stadi bench speed", "height": 1024, "width": 1024, "steps": 50, "slowdown_kind": "mps"}
    ours = dict(base, levels=_levels())
    # the peer alone, in two runs: the second retries pipefusion and measures ring at 50 %
    first = dict(base, levels={lv: {"models": {}} for lv in PEER}, peer=_peer(PEER))
    second = dict(base, levels={"50": {"models": {}}}, peer=_peer({"50": {
        "pipefusion": {"latency_ms": 2810.0}, "ring": {"error": "ranks exited with codes [1, -9]"},
        "cfg-compile": {"error": "timed out after 300 s"}}}))
    paths = []
    for i, doc in enumerate((ours, first, second)):
        paths.append(tmp_path / f"speed-{i}.json")
        paths[-1].write_text(json.dumps(doc))
    merged = merge(paths, tmp_path / "merged.json")
    assert json.loads((tmp_path / "merged.json").read_text())["peer"] == merged["peer"]
    at50 = merged["peer"]["levels"]["50"]
    # a later failure does not replace an earlier figure; a later figure replaces an earlier failure
    assert at50["configs"]["cfg-compile"] == {"latency_ms": 1780.0}
    assert at50["configs"]["pipefusion"] == {"latency_ms": 2810.0}
    assert "error" in at50["configs"]["ring"] and at50["best"] == "cfg-compile"
    assert merged["levels"]["50"]["models"]["sd3"]["strategies"]["stadi"]["latency_ms"] == 1400.0
    assert merged["summary"]["stadi_vs_peer"]["sd3"] == {"100": round(1140 / 1100, 4), "50": round(1780 / 1400, 4)}
    assert "peer" not in merge(paths[:1], tmp_path / "ours.json")


def test_peer_only_bench_on_cpu(tiny_dir: Any, model_cache: Path, driver: tuple[str, ...]) -> None:
    """``--peer xdit --peer-only`` through run_bench: the peer runs on the pipeline directory stadi uses."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--device", "cpu", "--size", "tiny", "--models", "sd3", "--height", "64",
                              "--steps", "4", "--runs", "2", "--warmup-runs", "0", "--slowdown", "1=2",
                              "--cache-dir", str(model_cache), "--peer", "xdit", "--peer-configs", "cfg,cfg-compile",
                              "--peer-only", "--peer-timeout", "20"])
    model_dir = tiny_dir("sd3")
    seen: list[dict[str, Any]] = []
    result = run_bench(args, ["--peer", "xdit"], lambda r: seen.append(json.loads(json.dumps(r))), driver)
    # partial results after every configuration, then after every level
    both = ["cfg", "cfg-compile"]
    assert [{lv: sorted(e["configs"]) for lv, e in s["peer"]["levels"].items()} for s in seen] == [
        {"1": ["cfg"]}, {"1": both}, {"1": both}, {"1": both, "2": ["cfg"]}, {"1": both, "2": both},
        {"1": both, "2": both}]
    assert seen[0]["summary"]["peer_best"] == {"1": {"config": "cfg", "latency_ms": 1590.0}}
    assert set(result["levels"]) == {"1", "2"} and all(lv["models"] == {} for lv in result["levels"].values())
    peer = result["peer"]
    assert peer["configs"] == ["cfg", "cfg-compile"] and peer["version"] == "xDiT xfuser 0.7.0"
    for entry in peer["levels"].values():
        assert entry["best"] == "cfg-compile" and set(entry["configs"]) == {"cfg", "cfg-compile"}
        assert {c["model"] for c in entry["configs"].values()} == {str(model_dir)}
    assert result["summary"]["peer_best"]["1"] == {"config": "cfg-compile", "latency_ms": 1140.0}


def test_peer_runs_on_the_flux_pipeline(tiny_dir: Any, model_cache: Path, driver: tuple[str, ...]) -> None:
    """``--peer-family flux``: xDiT's Flux configurations on the Flux pipeline directory stadi uses, the driver
    told the family."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--device", "cpu", "--size", "tiny", "--models", "flux", "--height", "64",
                              "--steps", "4", "--guidance", "3.5", "--runs", "1", "--warmup-runs", "0",
                              "--cache-dir", str(model_cache), "--peer", "xdit", "--peer-family", "flux",
                              "--peer-configs", "ulysses,ulysses-compile", "--peer-only", "--peer-timeout", "20"])
    model_dir = tiny_dir("flux")
    peer = run_bench(args, ["--peer", "xdit"], None, driver)["peer"]
    assert peer["family"] == "flux" and peer["configs"] == ["ulysses", "ulysses-compile"]
    entry = peer["levels"]["1"]
    assert {c["model"] for c in entry["configs"].values()} == {str(model_dir)}
    # the stand-in marks Ulysses' latents not finite (as a broken run would be): no best among them
    assert entry["best"] is None and all("error" in c for c in entry["configs"].values())


def test_peer_needs_sd3_and_two_ranks(model_cache: Path) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    common = ["--device", "cpu", "--size", "tiny", "--cache-dir", str(model_cache), "--peer", "xdit", "--peer-only"]
    with pytest.raises(ValueError, match=r"sd3 pipeline \(--peer-family\)"):
        run_bench(parser.parse_args([*common, "--models", "sdxl"]))
    with pytest.raises(ValueError, match="2-GPU configurations"):
        run_bench(parser.parse_args([*common, "--models", "sd3", "--ranks", "3"]))
    with pytest.raises(ValueError, match="--peer-only needs --peer"):
        run_bench(parser.parse_args(["--device", "cpu", "--models", "sd3", "--peer-only"]))


def test_merge_adds_a_re_measured_strategy_and_keeps_the_first_single(tmp_path: Path) -> None:
    base = {"command": "stadi bench speed", "height": 1024, "width": 1024, "steps": 50, "slowdown_kind": "mps"}
    ours = dict(base, levels=_levels())
    # a later run of hybrid alone (single always runs beside it, with its own figure)
    again = dict(base, strategies=["single", "hybrid"], levels={"50": {"models": {"sd3": {"ideal_ms": 900.0,
                 "strategies": {"single": {"latency_ms": 2500.0}, "hybrid": {"latency_ms": 1600.0}}}}}})
    paths = []
    for i, doc in enumerate((ours, again)):
        paths.append(tmp_path / f"speed-{i}.json")
        paths[-1].write_text(json.dumps(doc))
    merged = merge(paths, tmp_path / "merged.json")
    at50 = merged["levels"]["50"]["models"]["sd3"]
    assert at50["strategies"]["hybrid"] == {"latency_ms": 1600.0}
    assert at50["strategies"]["single"] == {"latency_ms": 2600.0} and at50["ideal_ms"] == 1000.0
    assert at50["strategies"]["stadi"] == {"latency_ms": 1400.0}
    assert "hybrid" not in merged["levels"]["100"]["models"]["sd3"]["strategies"]
    assert "hybrid" in merged["strategies"]
