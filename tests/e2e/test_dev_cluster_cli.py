"""``stadi dev-cluster up --kueue --dra`` / ``status`` / ``down`` as a user runs them (a state folder of the
test's own, so a developer's running dev cluster is left alone)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from stadi_operator.devcluster import testbin

pytestmark = pytest.mark.slow

STADI = str(Path(sys.executable).with_name("stadi"))


def test_up_with_kueue_and_dra_then_down(tmp_path: Path) -> None:
    env = {**os.environ, "STADI_DEV_CLUSTER_DIR": str(tmp_path / "dev")}

    def stadi(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([STADI, "dev-cluster", *args], env=env, capture_output=True, text=True, timeout=300,
                              check=False)

    def kubectl(*args: str) -> str:
        return subprocess.run([str(testbin.testbin_dir() / "kubectl"), *args], env=env | {"KUBECONFIG": kubeconfig},
                              capture_output=True, text=True, timeout=60, check=True).stdout

    up = stadi("up", "--kueue", "--dra")
    assert up.returncode == 0, up.stderr[-3000:]
    try:
        kubeconfig = up.stdout.strip().removeprefix("export KUBECONFIG=")
        assert Path(kubeconfig).is_relative_to(tmp_path)
        assert "kueue" in stadi("status").stdout
        slices = json.loads(kubectl("get", "resourceslices", "-o", "json"))["items"]
        assert sorted(s["spec"]["nodeName"] for s in slices) == ["dra-a100-0", "dra-h200-0"]
        kubectl("get", "deviceclass", "gpu.nvidia.com")
        nodes = json.loads(kubectl("get", "nodes", "-o", "json"))["items"]
        assert {"gpu-h100-0", "dra-h200-0"} <= {n["metadata"]["name"] for n in nodes}
        kubectl("get", "clusterqueues.kueue.x-k8s.io")  # Kueue's CRDs served
    finally:
        down = stadi("down")
    assert down.returncode == 0 and not (tmp_path / "dev" / "state.json").exists()
