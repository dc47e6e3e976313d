"""Tests of `stadi plan` (issue 2 item 6): the table, the JSON Plan, and one line plus exit code 2 on bad input."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stadi.api import Plan, load_job
from stadi.cli import main
from stadi.planner.cost import COMPILED_WHOLE_FRAME

ROOT = Path(__file__).resolve().parents[2]
SDXL_JOB = ROOT / "manifests" / "examples" / "sdxl.yaml"
ACCEPTANCE = ["plan", "--gpus", "H100,H100:0.5", "--model", "sdxl", "--height", "1024", "--width", "1024",
              "--steps", "50"]


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[dict, Plan]:
    """Run `stadi plan ... --json`; the raw JSON object and the Plan it parses as."""
    assert main([*argv, "--json"]) == 0
    out = capsys.readouterr().out
    return json.loads(out), Plan.model_validate_json(out)


def test_table_names_strategy_and_ranks(capsys: pytest.CaptureFixture[str]) -> None:
    """The table names the chosen strategy, one line per rank (GPU, rows, stride) and the strategies compared."""
    assert main(["plan", "--gpus", "H100,A100-80GB,L4:0.5"]) == 0
    out = capsys.readouterr().out
    _, p = run_json(capsys, "plan", "--gpus", "H100,A100-80GB,L4:0.5")
    assert out.startswith(f"strategy {p.strategy} ")
    for header in ("rank", "gpu", "speed", "rows", "stride"):
        assert header in out
    for r in p.ranks:
        line = next(line for line in out.splitlines() if line.split()[:2] == [str(r.rank), r.gpu])
        assert f"[{r.rows[0]}, {r.rows[1]})" in line
        assert line.split()[-3] == str(r.stride)
    assert "strategies compared" in out
    assert f"fidelity {p.fidelity} " in out.splitlines()[0]
    for name, seconds in p.alternatives.items():
        row = [name, f"{seconds:.3f}", p.alternative_fidelity[name]]
        assert any(line.split()[-3:] == row for line in out.splitlines()), row
    assert f"* {p.strategy}" in out


def test_hybrid_table_names_the_cut(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--gpus", "H100,H100", "--model", "sd3", "--strategy", "hybrid"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("strategy hybrid ")
    assert ("pipeline window: 5 steps, from the step after the discrepancy's slope over 15 steps drops below 0.0005, "
            "at step 40 at the latest; rank 0 runs units [0, 12) of 24, the other from transformer_blocks.12") in out


def test_json_is_a_plan_with_the_documented_keys(capsys: pytest.CaptureFixture[str]) -> None:
    """--json prints a Plan: strategy, ranks (rank, gpu, speed, rows, stride), sync_period, warmup_steps,
    predicted_seconds, alternatives."""
    raw, p = run_json(capsys, "plan", "--gpus", "H100,A100-80GB,L4:0.5")
    for key in ("strategy", "ranks", "sync_period", "warmup_steps", "predicted_seconds", "alternatives"):
        assert key in raw, key
    for rank in raw["ranks"]:
        for key in ("rank", "gpu", "speed", "rows", "stride"):
            assert key in rank, key
        assert len(rank["rows"]) == 2
    p.validate_for()
    assert p.predicted_seconds == p.alternatives[p.strategy]


def test_acceptance_beats_patch(capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 2, done when: H100 + H100 at 50% load, SDXL 1024^2, 50 steps predicts below the patch baseline."""
    _, p = run_json(capsys, *ACCEPTANCE)
    assert p.predicted_seconds < p.alternatives["patch"]


def test_gpus_file_yaml_list(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """--gpus-file takes a YAML list of GPUs (bare product strings or mappings)."""
    path = tmp_path / "pool.yaml"
    path.write_text(yaml.safe_dump([
        {"product": "H100", "node": "node-a", "index": 0},
        {"product": "H100", "load": 0.5, "node": "node-a", "index": 1},
        "L4",
    ]))
    _, p = run_json(capsys, "plan", "--gpus-file", str(path))
    p.validate_for()
    assert len(p.ranks) + len(p.left_out) == 3
    assert (p.ranks[0].gpu, p.ranks[0].node, p.ranks[0].gpu_index) == ("H100", "node-a", 0)
    assert {r.speed for r in p.ranks if r.gpu == "H100"} <= {1.0, 0.5}


def test_job_file(capsys: pytest.CaptureFixture[str]) -> None:
    """--job takes the family, size, steps and parallelism from a DiffusionJob manifest."""
    spec = load_job(yaml.safe_load(SDXL_JOB.read_text())).spec
    _, p = run_json(capsys, "plan", "--gpus", "H100,H100:0.5,L4", "--job", str(SDXL_JOB))
    p.validate_for()
    assert (p.family, p.steps, p.guidance) == (spec.model.family, spec.steps, spec.uses_cfg)
    assert (p.latent_height * 8, p.latent_width * 8) == (spec.height, spec.width)
    assert spec.parallelism.gpus.min <= len(p.ranks) <= spec.parallelism.gpus.max


# Each bad input with the words its one-line message must contain (so that rewording stays free).
BAD_INPUT = {
    "load above 1": (["--gpus", "L4:2"], ("L4:2", "load", "range")),
    "load not a number": (["--gpus", "L4:x"], ("L4:x", "load", "number")),
    "load nan": (["--gpus", "L4:nan"], ("L4:nan", "load")),
    "empty entry": (["--gpus", "H100,,L4"], ("--gpus", "entry 1", "empty")),
    "unknown strategy": (["--gpus", "H100", "--strategy", "fastest"], ("--strategy", "fastest")),
    "unknown model": (["--gpus", "H100", "--model", "dalle"], ("--model", "dalle")),
    "height not a multiple": (["--gpus", "H100", "--height", "1000"], ("height 1000", "multiple of 32")),
    "width not a multiple": (["--gpus", "H100", "--model", "sd15", "--width", "1000"],
                             ("width 1000", "multiple of 64")),
    "height zero": (["--gpus", "H100", "--height", "0"], ("height 0",)),
    "height negative": (["--gpus", "H100,H100", "--height", "-32"], ("height -32",)),
    "steps zero": (["--gpus", "H100", "--steps", "0"], ("steps", "0")),
    "warmup negative": (["--gpus", "H100,H100", "--warmup-steps", "-3"], ("warmup", "-3")),
    "max stride zero": (["--gpus", "H100,L4", "--max-stride", "0"], ("stride", "0")),
    "gpus-min above pool": (["--gpus", "H100", "--gpus-min", "3"], ("min", "3", "pool")),
    "cfg without guidance": (["--gpus", "H100,H100", "--strategy", "cfg", "--guidance-scale", "1"],
                             ("cfg", "guidance")),
    "both pools": (["--gpus", "H100", "--gpus-file", "pool.yaml"], ("--gpus", "--gpus-file")),
    "no pool": ([], ("--gpus", "--gpus-file")),
    "link bogus": (["--gpus", "H100", "--link", "bogus"], ("--link", "bogus")),
    "link nan": (["--gpus", "H100,L4", "--link", "nan"], ("--link", "nan")),
}

GPUS_FILES = {
    "missing": (None, ("--gpus-file", "pool.yaml")),
    "yaml syntax error": ("[H100, {product: L4\n", ("--gpus-file", "pool.yaml")),
    "not utf-8": (b"\xff\xfe\x00garbage", ("--gpus-file", "pool.yaml")),
    "not a list": ("just text\n", ("--gpus-file", "list")),
    "empty list": ("[]\n", ("--gpus-file", "list")),
    "entry without product": ("- load: 0.5\n", ("entry 0", "product")),
    "unknown keys": ("- product: H100\n  colour: red\n", ("entry 0", "colour")),
    "bad load": ("- product: H100\n  load: 1.5\n", ("entry 0", "load", "1.5")),
    "bad speed": ("- product: H100\n  speed: -1\n", ("entry 0", "speed")),
    "bad index": ("- product: H100\n  index: x\n", ("entry 0", "index")),
    "bad node": ("- product: H100\n  node: [1]\n", ("entry 0", "node")),
}


def assert_usage_error(capsys: pytest.CaptureFixture[str], argv: list[str], expected: tuple[str, ...]) -> None:
    """Exit code 2, nothing on stdout, exactly one line on stderr naming the problem."""
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, (code, out, err)
    assert out == ""
    assert err.endswith("\n") and err.count("\n") == 1, f"not one line: {err!r}"
    missing = [word for word in expected if word not in err]
    assert not missing, f"{err.strip()!r} does not mention {missing}"


@pytest.mark.parametrize("argv, expected", BAD_INPUT.values(), ids=BAD_INPUT.keys())
def test_bad_input_one_line_exit_2(capsys: pytest.CaptureFixture[str], argv: list[str],
                                   expected: tuple[str, ...]) -> None:
    """Bad command-line input: one line naming the problem on stderr, exit code 2."""
    assert_usage_error(capsys, ["plan", *argv], expected)


@pytest.mark.parametrize("content, expected", GPUS_FILES.values(), ids=GPUS_FILES.keys())
def test_bad_gpus_file_one_line_exit_2(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                       content: str | bytes | None, expected: tuple[str, ...]) -> None:
    """A missing, unreadable or malformed --gpus-file: one line naming the problem, exit code 2."""
    path = tmp_path / "pool.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    assert_usage_error(capsys, ["plan", "--gpus-file", str(path)], expected)


def test_console_script_end_to_end(tmp_path: Path) -> None:
    """The installed `stadi` script: exit 0 with a JSON plan on good input, exit 2 and one line on bad input."""
    script = Path(sys.executable).with_name("stadi")  # make setup installs it
    good = subprocess.run([str(script), *ACCEPTANCE, "--json"], capture_output=True, text=True, timeout=60,
                          cwd=tmp_path)
    assert good.returncode == 0, good.stderr
    assert Plan.model_validate_json(good.stdout).strategy == "cfg-stride"
    bad = subprocess.run([str(script), "plan", "--gpus", "L4:2"], capture_output=True, text=True, timeout=60,
                         cwd=tmp_path)
    assert bad.returncode == 2
    assert bad.stdout == ""
    assert bad.stderr.count("\n") == 1 and "out of range" in bad.stderr


def test_compile_prices_compiled_steps(capsys: pytest.CaptureFixture[str]) -> None:
    """--compile (a job's model.compile): single and cfg get cheaper by the whole frame's compiled share, banded
    plans by the band's; with --exchange per-layer (the engine that compiled whole frames only) banded plans do
    not, so on an H100 beside a half-loaded one the compiled single GPU beats stadi's bands there."""
    base = ("plan", "--gpus", "H100,H100:0.5", "--model", "sd3")
    _, plain = run_json(capsys, *base)
    _, compiled = run_json(capsys, *base, "--compile")
    assert compiled.alternatives["single"] == pytest.approx(COMPILED_WHOLE_FRAME * plain.alternatives["single"],
                                                            rel=1e-3)
    assert compiled.alternatives["cfg"] < plain.alternatives["cfg"]
    assert compiled.alternatives["patch"] < plain.alternatives["patch"]
    assert (plain.strategy, compiled.strategy) == ("cfg-stride", "cfg-stride")
    assert compiled.alternatives["stadi"] < compiled.alternatives["single"]
    _, old_plain = run_json(capsys, *base, "--exchange", "per-layer")
    _, old = run_json(capsys, *base, "--exchange", "per-layer", "--compile")
    assert old.alternatives["patch"] == old_plain.alternatives["patch"]
    assert old_plain.alternatives["stadi"] < old_plain.alternatives["single"]
    assert old.alternatives["single"] < old.alternatives["stadi"]


def test_quality_limits_what_auto_picks(capsys: pytest.CaptureFixture[str]) -> None:
    """--quality (a job's parallelism.quality) on an H100 beside one at a quarter of its speed: exact keeps auto
    to exact plans (the H100 alone: cfg waits for the loaded GPU), balanced to the measured bound (the loaded GPU's
    branch every 3rd step: cfg-stride, just ahead of stadi once its bands pay their context), fastest lets it take
    stride 4, never measured."""
    base = ("plan", "--gpus", "H100,H100:0.75", "--model", "sd3", "--min-effective-steps", "10")
    _, balanced = run_json(capsys, *base)
    _, exact = run_json(capsys, *base, "--quality", "exact")
    _, fastest = run_json(capsys, *base, "--quality", "fastest")
    assert (balanced.fidelity, exact.fidelity, fastest.fidelity) == ("bounded", "exact", "approximate")
    assert (balanced.strategy, exact.strategy, fastest.strategy) == ("cfg-stride", "single", "cfg-stride")
    assert [r.stride for r in balanced.ranks] == [1, 3] and [r.stride for r in fastest.ranks] == [1, 4]
    assert fastest.predicted_seconds < balanced.predicted_seconds < exact.predicted_seconds


def test_explain_says_where_each_speed_comes_from(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """--explain: a measured speed of the pool (one the operator learned from a finished job) is used ahead of the
    catalogue, and the table says which is which."""
    path = tmp_path / "pool.yaml"
    path.write_text(yaml.safe_dump([{"product": "H100", "node": "node-a", "index": 0, "speed": 1.5},
                                    {"product": "H100", "node": "node-a", "index": 1, "load": 0.5}]))
    assert main(["plan", "--gpus-file", str(path), "--explain"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"node-a/H100#0 +1\.500  measured by an earlier job", out)
    assert re.search(r"node-a/H100#1 +0\.500  catalogue 1\.000 x \(1 - load 0\.50\)", out)
    assert main(["plan", "--gpus-file", str(path)]) == 0
    assert "measured by an earlier job" not in capsys.readouterr().out
