"""Build the operator and worker images from ``operator/Dockerfile`` and ``worker/Dockerfile`` with buildah and no
registry: ``python -m stadi_operator.devcluster.images`` (``make images``, which ``make test`` runs).

The Dockerfiles' usual bases (``python:3.11-slim``, ``pytorch/pytorch:...``) come from Docker Hub, which cannot be
reached here; this module makes stand-ins from package registries and passes them as the build arguments
``PYTHON_IMAGE`` and ``TORCH_IMAGE``:

- ``localhost/stadi-base``: Debian ``bookworm`` (Python 3.11, the version constraints.txt is compiled for) made
  with ``debootstrap --variant=minbase`` from the Debian mirror, plus python3, venv and ``python`` as Debian
  packages;
- ``localhost/stadi-torch``: that base plus a venv ``/opt/torch``, first on PATH as conda is in the PyTorch image,
  holding PyPI's torch at the version of constraints.txt (with the CUDA libraries its wheel depends on), installed
  with uv from ``$STADI_CACHE/uv``, which ``make setup`` has filled already.

Everything lives in buildah's storage under ``$STADI_CACHE/containers`` with the vfs driver (plain copies: no
overlay or fuse needed) and chroot isolation, which run as root in a container. The bases are tagged with a hash
of their recipe and made once; the two images carry a label with the hash of their build inputs (Dockerfile,
the sources it copies, the base) and are rebuilt only when that changes. buildah and debootstrap are the
distribution's packages (apt-get installs them when missing). A build sees the host's CA bundle (a
TLS-intercepting proxy) through a mount and a build argument, so it never ends up in an image.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stadi_operator.controller.children import DEFAULT_WORKER_IMAGE
from stadi_operator.devcluster.testbin import Log, cache_root, locked

ROOT = Path(__file__).resolve().parents[3]
SUITE = "bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"  # apt's; STADI_DEBIAN_MIRROR overrides it
BASE_PACKAGES = ("ca-certificates", "python3", "python3-venv", "python-is-python3")
BASE_REPO = "localhost/stadi-base"
TORCH_REPO = "localhost/stadi-torch"
TORCH_VENV = "/opt/torch"
# The chart's default references (tests/images checks them against values.yaml).
WORKER_IMAGE = DEFAULT_WORKER_IMAGE
OPERATOR_IMAGE = DEFAULT_WORKER_IMAGE.replace("/stadi-worker:", "/stadi-operator:")
INPUTS_LABEL = "dev.stadi.build-inputs"
CA_IN_BUILD = "/run/stadi-ca.crt"
# Working containers of test sessions are named so; any other container is a build's.
TEST_CONTAINER_PREFIX = "stadi-images-test-"
TOOLS = {"buildah": "buildah", "debootstrap": "debootstrap"}  # command -> Debian package


@dataclass(frozen=True)
class Image:
    """One of the project's images: its reference, its Dockerfile, what that copies, and the base's build arg."""

    ref: str
    dockerfile: str
    sources: tuple[str, ...]
    base_arg: str


COMMON = ("pyproject.toml", "README.md", "constraints.txt", ".dockerignore", "stadi")
OPERATOR = Image(OPERATOR_IMAGE, "operator/Dockerfile", (*COMMON, "operator/stadi_operator"), "PYTHON_IMAGE")
WORKER = Image(WORKER_IMAGE, "worker/Dockerfile", (*COMMON, "worker/stadi_worker"), "TORCH_IMAGE")


def _log(msg: str) -> None:
    print(f"[images] {msg}", file=sys.stderr, flush=True)


def storage_dir() -> Path:
    """buildah's storage (images, containers) for the project: ``$STADI_CACHE/containers``."""
    return cache_root() / "containers"


def buildah_cmd(*args: str) -> list[str]:
    """A buildah command line on the project's storage (vfs, under the cache)."""
    root = storage_dir()
    return ["buildah", "--root", str(root / "storage"), "--runroot", str(root / "run"), "--storage-driver", "vfs",
            *args]


def buildah(*args: str, stream: bool = False) -> str:
    """Run buildah; return its stdout, or with ``stream`` pass its output through to stderr (long builds)."""
    if stream:
        subprocess.run(buildah_cmd(*args), check=True, stdout=sys.stderr)
        return ""
    done = subprocess.run(buildah_cmd(*args), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"buildah {' '.join(args)} failed:\n{done.stderr.strip()}")
    return done.stdout


def inspect(ref: str) -> dict[str, Any] | None:
    """The image's ``buildah inspect`` document, or None when the storage has no such image."""
    done = subprocess.run(buildah_cmd("inspect", "--type", "image", ref), capture_output=True, text=True)
    return json.loads(done.stdout) if done.returncode == 0 else None


def missing_tools() -> list[str]:
    """The commands of TOOLS that are not on PATH."""
    return [cmd for cmd in TOOLS if shutil.which(cmd) is None]


def ensure_tools(log: Log = _log) -> None:
    """Install buildah and debootstrap from the distribution's packages when missing (needs root and apt-get)."""
    missing = missing_tools()
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise RuntimeError(f"{', '.join(missing)} missing: install {' '.join(TOOLS[m] for m in missing)} "
                           "(Debian packages) or run as root on Debian")
    log(f"installing {', '.join(missing)} with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env, stdout=sys.stderr)
    subprocess.run(["apt-get", "install", "-y", "-q", *(TOOLS[m] for m in missing)], check=True, env=env,
                   stdout=sys.stderr)


def _host_ca() -> Path | None:
    """The host's CA bundle, which a TLS-intercepting proxy's CA is added to; a build trusts what the host does."""
    for candidate in (os.environ.get("SSL_CERT_FILE"), "/etc/ssl/certs/ca-certificates.crt"):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def _ca_mount() -> list[str]:
    ca = _host_ca()
    return ["--volume", f"{ca}:{CA_IN_BUILD}:ro"] if ca else []


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:12]


def _drop_other_tags(repo: str, keep: str) -> None:
    """Remove the repository's images other than ``keep`` (an older recipe's), so the cache does not grow."""
    for line in buildah("images", "--format", "{{.Name}}:{{.Tag}}").split():
        if line.startswith(f"{repo}:") and line != keep:
            subprocess.run(buildah_cmd("rmi", line), capture_output=True)


@contextlib.contextmanager
def _container(image: str, ref: str, config: list[str]) -> Iterator[str]:
    """A working container of ``image``, committed as ``ref`` with ``config`` when the block succeeds and removed
    when it fails."""
    container = buildah("from", "--pull=never", image).strip()
    try:
        yield container
    except BaseException:
        subprocess.run(buildah_cmd("rm", container), capture_output=True)
        raise
    buildah("config", *config, container)
    buildah("commit", "--rm", "--format", "oci", container, ref)


def _mirror() -> str:
    return os.environ.get("STADI_DEBIAN_MIRROR") or DEBIAN_MIRROR


def base_ref() -> str:
    """The Debian base's reference: its tag is a hash of its recipe."""
    return f"{BASE_REPO}:{SUITE}-{_digest(SUITE, platform.machine(), *BASE_PACKAGES, _mirror())}"


def prepare_base(log: Log = _log) -> tuple[str, bool]:
    """Make the Debian base with debootstrap unless it exists; returns its reference and whether it was made."""
    ref = base_ref()
    if inspect(ref):
        return ref, False
    log(f"making {ref}: debootstrap --variant=minbase {SUITE} from {_mirror()}")
    config = ["--env", "LANG=C.UTF-8", "--cmd", "/bin/bash",
              "--label", f"org.opencontainers.image.description=Debian {SUITE} minbase, python3"]
    with _container("scratch", ref, config) as container:
        rootfs = Path(buildah("mount", container).strip())  # with vfs a plain folder: debootstrap writes into it
        subprocess.run(["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", SUITE,
                        str(rootfs), _mirror()], check=True, stdout=sys.stderr)
        # What apt downloaded and indexed: not needed in an image (the python:*-slim images drop it too).
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for path in (rootfs / junk).glob("*"):
                if path.is_file():
                    path.unlink()
        buildah("umount", container)
    _drop_other_tags(BASE_REPO, ref)
    return ref, True


def torch_version() -> str:
    """The torch version constraints.txt pins (the GPU image's base carries the same)."""
    return next(line for line in (ROOT / "constraints.txt").read_text().splitlines()
                if line.startswith("torch==")).split("==")[1]


def torch_ref(base: str) -> str:
    """The torch base's reference: torch's version, then a hash of the Debian base and constraints.txt (which
    pins torch's dependencies too)."""
    return f"{TORCH_REPO}:{torch_version()}-{_digest(base, (ROOT / 'constraints.txt').read_text())}"


def _uv() -> Path:
    found = shutil.which("uv") or str(cache_root() / "bootstrap" / "bin" / "uv")
    if not os.access(found, os.X_OK):
        raise RuntimeError("uv not found: run `make setup` first (it installs uv and fills its cache)")
    return Path(found)


def prepare_torch(base: str, log: Log = _log) -> tuple[str, bool]:
    """Make the torch base (the PyTorch image's stand-in) unless it exists; returns its reference and whether it
    was made."""
    ref = torch_ref(base)
    if inspect(ref):
        return ref, False
    log(f"making {ref}: a venv {TORCH_VENV} with torch=={torch_version()} from PyPI (uv, its cache)")
    uv_cache = Path(os.environ.get("UV_CACHE_DIR") or cache_root() / "uv")
    uv_cache.mkdir(parents=True, exist_ok=True)
    config = ["--env", f"PATH={TORCH_VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
              "--label", "org.opencontainers.image.description=Debian, PyPI's torch in a venv (stadi-torch)"]
    env = ["UV_CACHE_DIR=/run/uv-cache", "UV_LINK_MODE=copy", "UV_PYTHON_DOWNLOADS=never"]
    env += [f"SSL_CERT_FILE={CA_IN_BUILD}"] if _host_ca() else []
    with _container(base, ref, config) as container:
        buildah("run", "--isolation", "chroot", "--network", "host", *_ca_mount(),
                "--volume", f"{_uv()}:/run/uv:ro", "--volume", f"{uv_cache}:/run/uv-cache",
                "--volume", f"{ROOT / 'constraints.txt'}:/run/constraints.txt:ro",
                *(a for e in env for a in ("--env", e)), container, "--", "sh", "-c",
                f"python -m venv {TORCH_VENV} && /run/uv pip install --quiet --python {TORCH_VENV}/bin/python "
                f"-c /run/constraints.txt torch=={torch_version()}", stream=True)
    _drop_other_tags(TORCH_REPO, ref)
    return ref, True


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc")


def inputs_hash(image: Image, base: str) -> str:
    """A hash of everything the image is built from: its Dockerfile, the sources it copies and its base's ID."""
    h = hashlib.sha256()
    base_doc = inspect(base)
    h.update((base_doc or {}).get("FromImageID", base).encode())
    for path in [ROOT / image.dockerfile, *(f for s in image.sources for f in _files(ROOT / s))]:
        h.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def build(image: Image, base: str, log: Log = _log) -> bool:
    """Build ``image`` on ``base`` unless its label already holds the current inputs' hash; whether it built."""
    digest = inputs_hash(image, base)
    doc = inspect(image.ref)
    if doc and (doc.get("OCIv1", {}).get("config", {}).get("Labels") or {}).get(INPUTS_LABEL) == digest:
        return False
    log(f"building {image.ref} from {image.dockerfile} on {base}")
    ca = ["--build-arg", f"PIP_CERT={CA_IN_BUILD}", *_ca_mount()] if _host_ca() else []
    buildah("bud", "--isolation", "chroot", "--network", "host", "--pull=never", "--layers=false", "--force-rm",
            "--format", "oci", "--build-arg", f"{image.base_arg}={base}", *ca, "--label", f"{INPUTS_LABEL}={digest}",
            "-f", str(ROOT / image.dockerfile), "-t", image.ref, str(ROOT), stream=True)
    # The image the tag moved away from (and any stage left untagged) is garbage now.
    subprocess.run(buildah_cmd("rmi", "--prune"), capture_output=True)
    return True


def size(ref: str) -> int:
    """The image's size in bytes, unpacked: the sum of its layers (uncompressed tars in buildah's storage)."""
    doc = inspect(ref)
    if doc is None:
        raise RuntimeError(f"no image {ref}")
    return sum(layer["size"] for layer in json.loads(doc["Manifest"])["layers"])


def _remove_dead_builds() -> None:
    """Remove build containers (each a full copy of its base under vfs) that a killed build left: under the build
    lock no build runs, so every container that is not a test session's is one."""
    for name in buildah("containers", "--format", "{{.ContainerName}}").split():
        if not name.startswith(TEST_CONTAINER_PREFIX):
            subprocess.run(buildah_cmd("rm", name), capture_output=True)


def prepare(log: Log = _log) -> dict[str, dict[str, Any]]:
    """Make sure both images are built from the current tree, and their bases; returns, per reference (bases
    first), ``{"base": ref or None, "built": bool, "seconds": s, "size": bytes}``. Seconds when nothing changed;
    about seven minutes cold on 2 cores (mostly the worker's torch)."""
    ensure_tools(log)
    out: dict[str, dict[str, Any]] = {}
    with locked(storage_dir() / "build.lock", "the images"):
        _remove_dead_builds()
        start = time.monotonic()

        def done(ref: str, built: bool, base: str | None = None) -> None:
            nonlocal start
            out[ref] = {"base": base, "built": built, "seconds": round(time.monotonic() - start), "size": size(ref)}
            start = time.monotonic()

        base, built = prepare_base(log)
        done(base, built)
        torch, built = prepare_torch(base, log)
        done(torch, built, base)
        for image, on in ((OPERATOR, base), (WORKER, torch)):
            done(image.ref, build(image, on, log), on)
    return out


def main() -> int:
    """``python -m stadi_operator.devcluster.images [--json PATH]``: build both images, print their sizes."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="also write the references, sizes and seconds here")
    args = parser.parse_args()
    result = prepare()
    for ref, entry in result.items():
        state = "built" if entry["built"] else "up to date"
        print(f"{ref}  {entry['size'] / 1e6:,.0f} MB  ({state}, {entry['seconds']} s)")
    if args.json:
        args.json.write_text(json.dumps({"command": " ".join(["python -m", __spec__.name, *sys.argv[1:]]),
                                         "images": result}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
