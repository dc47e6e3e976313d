"""The node agent (``stadi agent``): NVML through a fake at the pynvml boundary, the GPUNode through kmock
(kopf's Kubernetes API emulator), /metrics over real loopback HTTP."""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import urllib.request
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from stadi_operator.agent import Agent, Publisher, add_parser, collect, serve_metrics
from stadi_operator.nvml import NvmlSession, decode_throttle_reasons, gfd_product

from stadi.api import GpuNodeStatus

GPUNODES = "/apis/stadi.dev/v1alpha1/gpunodes"
MIB = 1 << 20


class FakeNVMLError(Exception):
    """Shaped like pynvml.NVMLError: the nvmlReturn_t code in ``value``."""

    def __init__(self, value: int, text: str = "") -> None:
        super().__init__(text or f"NVML error {value}")
        self.value = value


class FakeNvml:
    """The pynvml functions the agent calls, over made-up GPUs (dicts); handles are the indexes."""

    NVMLError = FakeNVMLError
    NVML_CLOCK_SM = 1

    def __init__(self, gpus: list[dict[str, Any]], *, init_error: int | None = None) -> None:
        self.gpus = gpus
        self.init_error = init_error  # e.g. 12 (library not found): nvmlInit raises it
        self.inits = 0
        self.shutdowns = 0

    def nvmlInit(self) -> None:
        self.inits += 1
        if self.init_error is not None:
            raise FakeNVMLError(self.init_error, "NVML Shared Library Not Found")

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        if self.gpus[index].get("lost"):
            raise FakeNVMLError(15, "GPU is lost")
        return index

    def nvmlDeviceGetUUID(self, handle: int) -> str:
        return self.gpus[handle]["uuid"]

    def nvmlDeviceGetName(self, handle: int) -> str | bytes:
        return self.gpus[handle]["name"]

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:
        gpu = self.gpus[handle]
        return SimpleNamespace(total=gpu["total_mib"] * MIB, used=gpu["used_mib"] * MIB,
                               free=(gpu["total_mib"] - gpu["used_mib"]) * MIB)

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> SimpleNamespace:
        if self.gpus[handle].get("util") is None:
            raise FakeNVMLError(3, "Not Supported")
        return SimpleNamespace(gpu=self.gpus[handle]["util"], memory=0)

    def nvmlDeviceGetClockInfo(self, handle: int, kind: int) -> int:
        assert kind == self.NVML_CLOCK_SM
        return self.gpus[handle]["sm_mhz"]

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: int) -> int:
        return self.gpus[handle]["reasons"]

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> list[SimpleNamespace]:
        return [SimpleNamespace(pid=100 + i, usedGpuMemory=MIB) for i in range(self.gpus[handle]["procs"])]


def h100() -> dict[str, Any]:
    return {"uuid": "GPU-11111111-2222-3333-4444-555555555555", "name": "NVIDIA H100 80GB HBM3",
            "total_mib": 81559, "used_mib": 30210, "util": 37, "sm_mhz": 1755, "reasons": 0x20, "procs": 2}


def l4() -> dict[str, Any]:
    return {"uuid": "GPU-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee", "name": "NVIDIA L4",
            "total_mib": 23034, "used_mib": 0, "util": 0, "sm_mhz": 210, "reasons": 0x1, "procs": 0}


@pytest.fixture
def agent_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """caplog on the agent's logger even where stadi.logs.configure() stopped propagation."""
    logger = logging.getLogger("stadi_operator.agent")
    propagate, level = logger.propagate, logger.level
    logger.propagate = False  # the handler is attached here; propagating would record twice
    logger.setLevel(logging.DEBUG)
    logger.addHandler(caplog.handler)
    try:
        yield caplog
    finally:
        logger.removeHandler(caplog.handler)
        logger.propagate, logger.level = propagate, level


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.WARNING and r.name == "stadi_operator.agent"]


def custom_objects(url: Any) -> Any:
    from kubernetes import client

    return client.CustomObjectsApi(client.ApiClient(client.Configuration(host=str(url).rstrip("/"))))


def status_patches(kmock: Any) -> list[Any]:
    return [r for r in kmock if r.method == "PATCH" and r.url.path == f"{GPUNODES}/node-a/status"]


def creates(kmock: Any) -> list[Any]:
    return [r for r in kmock if r.method == "POST" and r.url.path == GPUNODES]


# --- collect ---------------------------------------------------------------------------------------------


def test_collect_reads_every_gpu() -> None:
    h, l4_ = collect(FakeNvml([h100(), l4()]))
    assert (h.index, h.uuid, h.product) == (0, "GPU-11111111-2222-3333-4444-555555555555", "NVIDIA-H100-80GB-HBM3")
    assert h.utilization == pytest.approx(0.37)
    assert (h.memory_total_mib, h.memory_used_mib, h.sm_clock_mhz) == (81559, 30210, 1755)
    assert h.throttle_reasons == ["SwThermalSlowdown"]
    assert h.process_count == 2
    assert h.timestamp is not None and h.timestamp.tzinfo is not None
    assert (l4_.index, l4_.product, l4_.utilization, l4_.process_count, l4_.throttle_reasons) == (
        1, "NVIDIA-L4", 0.0, 0, ["GpuIdle"])


def test_throttle_mask_decoding_and_product_names() -> None:
    assert decode_throttle_reasons(0) == []
    assert decode_throttle_reasons(0x4 | 0x8 | 0x20) == ["SwPowerCap", "HwSlowdown", "SwThermalSlowdown"]
    assert decode_throttle_reasons(0x40 | 0x1000) == ["HwThermalSlowdown", "0x1000"]  # a newer driver's bit
    assert gfd_product(b"NVIDIA A100-SXM4-80GB") == "NVIDIA-A100-SXM4-80GB"  # old bindings give bytes


def test_collect_with_an_old_binding_a_lost_gpu_and_an_unsupported_counter() -> None:
    fake = FakeNvml([h100(), {**h100(), "lost": True}, {**l4(), "name": b"NVIDIA L4", "util": None}])
    # Only the deprecated ClocksThrottleReasons name, as in bindings before driver 535.
    old = SimpleNamespace(**{name: getattr(fake, name) for name in dir(fake) if name.startswith(("nvml", "NVML"))})
    del old.nvmlDeviceGetCurrentClocksEventReasons
    old.nvmlDeviceGetCurrentClocksThrottleReasons = fake.nvmlDeviceGetCurrentClocksEventReasons
    problems: list[str] = []
    gpus = collect(old, problems=problems)
    assert [g.index for g in gpus] == [0, 2]  # the lost GPU is left out, the rest keep their indexes
    assert gpus[0].throttle_reasons == ["SwThermalSlowdown"]
    assert gpus[1].product == "NVIDIA-L4" and gpus[1].utilization == 0.0  # "not supported" reads as 0
    assert problems == ["GPU 1: GPU is lost"]  # "not supported" is not a problem


# --- no NVML ---------------------------------------------------------------------------------------------


def test_without_nvml_one_warning_zero_gpus_and_quiet_retries(agent_log: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    fake = FakeNvml([h100()], init_error=12)
    agent = Agent("node-a", nvml=NvmlSession(fake, retry_seconds=60, clock=lambda: now[0]))

    first = agent.tick()
    assert (first.gpus, first.nvml) == ([], False)
    assert "NVML unavailable" in first.message and "Not Found" in first.message
    assert len(warnings_of(agent_log)) == 1

    agent.tick()  # within the retry interval: no init attempt, no warning
    now[0] = 61.0
    agent.tick()  # retried, failed again, quietly
    assert fake.inits == 2
    assert len(warnings_of(agent_log)) == 1

    fake.init_error = None  # the driver came back
    now[0] = 122.0
    status = agent.tick()
    assert status.nvml and [g.product for g in status.gpus] == ["NVIDIA-H100-80GB-HBM3"]
    assert status.message == ""
    agent.close()
    assert fake.shutdowns == 1


def test_without_the_pynvml_package(agent_log: pytest.LogCaptureFixture) -> None:
    def missing() -> Any:
        raise ImportError("No module named 'pynvml'")

    agent = Agent("node-a", nvml=NvmlSession(loader=missing))
    for _ in range(3):
        status = agent.tick()
    assert (status.gpus, status.nvml, status.message) == ([], False, "NVML unavailable: pynvml is not installed")
    assert len(warnings_of(agent_log)) == 1


def test_nvml_that_stops_answering_reports_zero_gpus(agent_log: pytest.LogCaptureFixture) -> None:
    fake = FakeNvml([h100()])
    agent = Agent("node-a", nvml=fake)
    assert len(agent.tick().gpus) == 1

    def gone() -> int:
        raise FakeNVMLError(999, "Unknown Error")

    fake.nvmlDeviceGetCount = gone  # type: ignore[method-assign]
    status = agent.tick()
    assert (status.gpus, status.nvml) == ([], False) and "Unknown Error" in status.message
    agent.tick()
    assert len(warnings_of(agent_log)) == 1 and fake.shutdowns == 1


# --- publishing against kmock ------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_gpunode_created_once_then_status_patched(kmock: Any) -> None:
    agent = Agent("node-a", nvml=FakeNvml([h100(), l4()]), publisher=Publisher(custom_objects(kmock.url), "node-a"))
    for _ in range(3):
        await asyncio.to_thread(agent.tick)
    assert agent.last_publish_ok

    (create,) = creates(kmock)
    assert create.data["metadata"]["name"] == "node-a"
    assert create.data["spec"] == {"nodeName": "node-a"}
    assert "status" not in create.data

    patches = status_patches(kmock)
    assert len(patches) == 3
    assert patches[0].headers["Content-Type"] == "application/merge-patch+json"
    status = patches[-1].data["status"]
    assert "learned" not in status  # the operator's speeds stay as they are
    assert status["nvml"] is True and status["message"] == ""
    h = status["gpus"][0]
    assert (h["product"], h["utilization"], h["throttleReasons"], h["processCount"]) == (
        "NVIDIA-H100-80GB-HBM3", 0.37, ["SwThermalSlowdown"], 2)
    assert (h["memoryTotalMib"], h["memoryUsedMib"], h["smClockMhz"]) == (81559, 30210, 1755)
    assert status["gpus"][1]["product"] == "NVIDIA-L4"
    GpuNodeStatus.model_validate(status)  # the wire form parses back into the model

    stored = kmock.objects[kmock.resource("stadi.dev", "v1alpha1", "gpunodes"), None, "node-a"]
    assert stored["spec"]["nodeName"] == "node-a" and len(stored["status"]["gpus"]) == 2


@pytest.mark.asyncio
async def test_existing_gpunode_is_adopted_and_a_deleted_one_recreated(kmock: Any) -> None:
    api = custom_objects(kmock.url)
    await asyncio.to_thread(Publisher(api, "node-a").ensure)  # an earlier agent's GPUNode
    agent = Agent("node-a", nvml=FakeNvml([l4()]), publisher=Publisher(api, "node-a"))
    await asyncio.to_thread(agent.tick)  # its create answers 409: adopted
    assert agent.last_publish_ok and len(status_patches(kmock)) == 1

    resp = await kmock.delete(f"{GPUNODES}/node-a")
    assert resp.status == 200
    await asyncio.to_thread(agent.tick)  # the patch answers 404: created again, then patched
    assert agent.last_publish_ok
    assert len(creates(kmock)) == 3 and len(status_patches(kmock)) == 3


@pytest.mark.asyncio
async def test_no_nvml_status_is_published(kmock: Any) -> None:
    agent = Agent("node-a", nvml=FakeNvml([], init_error=9),
                  publisher=Publisher(custom_objects(kmock.url), "node-a"))
    await asyncio.to_thread(agent.tick)
    status = status_patches(kmock)[-1].data["status"]
    assert (status["gpus"], status["nvml"]) == ([], False) and status["message"].startswith("NVML unavailable")


@pytest.mark.asyncio
async def test_api_error_is_logged_and_the_loop_continues(kmock: Any, agent_log: pytest.LogCaptureFixture) -> None:
    kmock["patch"][kmock.subresource("status")][:2] << 503  # the first two status updates fail
    agent = Agent("node-a", nvml=FakeNvml([h100()]), publisher=Publisher(custom_objects(kmock.url), "node-a"),
                  interval=0.01)
    await asyncio.to_thread(agent.run, ticks=4)

    assert len(status_patches(kmock)) == 4 and agent.last_publish_ok
    warnings = warnings_of(agent_log)
    assert len(warnings) == 1 and warnings[0].error == "503 Service Unavailable"  # type: ignore[attr-defined]
    assert any(r.getMessage() == "GPUNode status updates work again" for r in agent_log.records)
    assert _value(_exposition(agent), "stadi_agent_publish_errors_total", node="node-a") == 2


def test_unreachable_api_server_does_not_raise(agent_log: pytest.LogCaptureFixture) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    from kubernetes import client

    configuration = client.Configuration(host=f"http://127.0.0.1:{port}")
    configuration.retries = 0  # fail fast
    api = client.CustomObjectsApi(client.ApiClient(configuration))
    agent = Agent("node-a", nvml=FakeNvml([l4()]), publisher=Publisher(api, "node-a"), interval=0.01)
    agent.run(ticks=2)
    assert not agent.last_publish_ok and len(agent.last_status.gpus) == 1  # type: ignore[union-attr]
    assert len(warnings_of(agent_log)) == 1


# --- /metrics ----------------------------------------------------------------------------------------------


def _exposition(agent: Agent) -> str:
    from prometheus_client import generate_latest

    return generate_latest(agent.registry).decode()


def _value(text: str, name: str, **labels: str) -> float | None:
    """The sample ``name{labels}`` of an exposition, None if absent."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return None


def _scrape(server: Any) -> str:
    host, port = server.server_address[:2]
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def test_metrics_served_with_labels_and_separate_registries() -> None:
    gpu_agent = Agent("node-a", nvml=FakeNvml([h100(), l4()]))
    blind_agent = Agent("node-b", nvml=FakeNvml([], init_error=12))
    gpu_agent.tick()
    blind_agent.tick()
    servers = [serve_metrics(a.registry, 0, "127.0.0.1") for a in (gpu_agent, blind_agent)]
    try:
        text, blind = _scrape(servers[0]), _scrape(servers[1])
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()

    h100_labels = {"node": "node-a", "index": "0", "uuid": "GPU-11111111-2222-3333-4444-555555555555",
                   "product": "NVIDIA-H100-80GB-HBM3"}
    assert _value(text, "stadi_gpu_utilization_ratio", **h100_labels) == 0.37
    assert _value(text, "stadi_gpu_memory_used_bytes", **h100_labels) == 30210 * MIB
    assert _value(text, "stadi_gpu_memory_total_bytes", **h100_labels) == 81559 * MIB
    assert _value(text, "stadi_gpu_sm_clock_hertz", **h100_labels) == 1755e6
    assert _value(text, "stadi_gpu_processes", **h100_labels) == 2
    assert _value(text, "stadi_gpu_throttled", **h100_labels, reason="SwThermalSlowdown") == 1
    assert _value(text, "stadi_gpu_throttled", **h100_labels, reason="HwSlowdown") == 0
    l4_labels = {"node": "node-a", "index": "1", "uuid": "GPU-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee",
                 "product": "NVIDIA-L4"}
    assert _value(text, "stadi_gpu_throttled", **l4_labels, reason="GpuIdle") == 1
    assert _value(text, "stadi_agent_nvml_up", node="node-a") == 1
    assert _value(text, "stadi_agent_gpus", node="node-a") == 2
    assert "node-b" not in text  # each agent its own registry

    assert _value(blind, "stadi_agent_nvml_up", node="node-b") == 0
    assert "stadi_gpu_utilization_ratio{" not in blind


def test_metrics_drop_a_gpu_that_disappears() -> None:
    fake = FakeNvml([h100(), l4()])
    agent = Agent("node-a", nvml=fake)
    agent.tick()
    fake.gpus = [h100()]
    agent.tick()
    assert 'product="NVIDIA-L4"' not in _exposition(agent)


# --- the command -----------------------------------------------------------------------------------------


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="stadi")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["agent", *argv])


@pytest.mark.asyncio
async def test_agent_once_with_a_kubeconfig(kmock: Any, tmp_path: Any) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: kmock\n"
        f"clusters: [{{name: kmock, cluster: {{server: '{str(kmock.url).rstrip('/')}'}}}}]\n"
        "users: [{name: kmock, user: {token: t}}]\n"
        "contexts: [{name: kmock, context: {cluster: kmock, user: kmock}}]\n"
    )
    args = _parse("--once", "--node-name", "node-a", "--kubeconfig", str(kubeconfig))
    assert (args.interval, args.metrics_port, args.metrics_address) == (5.0, 9400, "0.0.0.0")
    code = await asyncio.to_thread(args.func, args, nvml=FakeNvml([h100()]))
    assert code == 0
    assert len(creates(kmock)) == 1
    (patch,) = status_patches(kmock)
    assert patch.headers["Authorization"] == "Bearer t"
    assert patch.data["status"]["gpus"][0]["product"] == "NVIDIA-H100-80GB-HBM3"


def test_agent_once_dry_run_prints_the_gpunode(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    args = _parse("--once", "--dry-run", "--node-name", "ip-10-0-0-1.ec2.internal")
    assert args.func(args, nvml=FakeNvml([l4()])) == 0
    body = json.loads(capsys.readouterr().out)
    assert body["metadata"]["name"] == "ip-10-0-0-1.ec2.internal"
    assert body["spec"] == {"nodeName": "ip-10-0-0-1.ec2.internal"}
    assert body["status"]["gpus"][0]["product"] == "NVIDIA-L4"


def test_agent_needs_a_node_name(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("NODE_NAME", raising=False)
    args = _parse("--once")
    assert args.func(args, nvml=FakeNvml([])) == 2
    assert "NODE_NAME" in capsys.readouterr().err
    monkeypatch.setenv("NODE_NAME", "node-z")
    assert _parse().node_name == "node-z"
    with pytest.raises(SystemExit):
        _parse("--interval", "0")
