"""One table of worker images against one allowed list, judged alike by ``stadi.policy.image_allowed`` (unit tests),
the operator (kmock) and the chart's ValidatingAdmissionPolicy on the real API server (e2e, where the chart is
installed with ``security.allowedImages`` = ``EXTRA``)."""

from __future__ import annotations

DIGEST = "sha256:" + "a" * 64
OTHER_DIGEST = "sha256:" + "c" * 64
WORKER_REPO = "ghcr.io/stadi-dev/stadi-worker"  # the chart's worker image repository, always allowed
EXTRA = ["registry.local/team/", DIGEST]  # security.allowedImages
ALLOWED = [WORKER_REPO, *EXTRA]

# (image, allowed)
IMAGES: list[tuple[str, bool]] = [
    (WORKER_REPO, True),
    (f"{WORKER_REPO}:1.2", True),
    (f"{WORKER_REPO}@{OTHER_DIGEST}", True),
    (f"{WORKER_REPO}:1.2@{OTHER_DIGEST}", True),
    ("registry.local/team/any/thing:2", True),  # a prefix
    (f"evil.example/exfil@{DIGEST}", True),  # the digest pins the content, whatever the name
    ("evil.example/exfil:latest", False),  # the case
    (f"{WORKER_REPO}-evil:1", False),  # a longer repository is another one
    ("ghcr.io/stadi-dev/stadi-worker:5000/evil/x:1", False),  # a tag with a path: a registry on a port
    ("ghcr.io/stadi-dev/other:1", False),
    ("registry.local/teammate/x:1", False),  # a prefix ends in /
    (f"evil.example/exfil@{OTHER_DIGEST}", False),
    ("stadi-worker:1", False),  # compared as written
]
