"""Children created idempotently: create unless it exists, adopt an orphan, bring the per-attempt parts of a kept
child up to date, and read back the plan a previous run committed to."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException

from stadi.api import Plan
from stadi_operator.controller import children as ch
from stadi_operator.kube import Kube


class ChildConflict(kopf.TemporaryError):
    """A child's name is taken by an object another controller owns."""


def controlled_by(obj: Mapping[str, Any], uid: str) -> bool:
    """Whether the object's controller ownerReference points at ``uid``."""
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return any(ref.get("uid") == uid and ref.get("controller") for ref in refs)


def ensure(kube: Kube, desired: dict[str, Any], owner: ch.Owner) -> tuple[dict[str, Any], str]:
    """Create a child unless it exists; adopt an existing one without a controller. Returns (object, what
    happened: "created", "adopted" or "exists")."""
    kind, meta = desired["kind"], desired["metadata"]
    current = kube.get(kind, meta["namespace"], meta["name"])
    if current is None:
        try:
            return kube.create(desired), "created"
        except ApiException as error:
            if error.status != 409:
                raise
            current = kube.get(kind, meta["namespace"], meta["name"])
            if current is None:  # created and deleted in between: try again later
                raise kopf.TemporaryError(f"{kind} {meta['name']} is being replaced", delay=2) from None
    if controlled_by(current, owner.uid):
        return current, "exists"
    refs = list((current.get("metadata") or {}).get("ownerReferences") or [])
    if any(ref.get("controller") for ref in refs):
        raise ChildConflict(f"{kind} {meta['name']} exists and belongs to another controller", delay=30)
    # A merge patch replaces the whole list: the references the object had, plus ours.
    adoption = {"metadata": {"ownerReferences": refs}}
    kopf.append_owner_reference(adoption, owner.body)
    return kube.patch(kind, meta["namespace"], meta["name"], adoption), "adopted"


def committed_plan(config_map: Mapping[str, Any] | None, owner: ch.Owner, attempt: int) -> Plan | None:
    """The plan a previous run already committed to for this attempt, if any (an owner-less ConfigMap is
    about to be adopted; one controlled by another object is not ours to trust)."""
    refs = ((config_map or {}).get("metadata") or {}).get("ownerReferences") or []
    if not config_map or any(r.get("controller") and r.get("uid") != owner.uid for r in refs):
        return None
    annotations = (config_map.get("metadata") or {}).get("annotations") or {}
    if annotations.get(ch.ANNOTATION_ATTEMPT) != str(attempt):
        return None
    try:
        return Plan.model_validate_json((config_map.get("data") or {}).get("plan.json", ""))
    except ValueError:
        return None


def sync(kube: Kube, current: Mapping[str, Any], desired: Mapping[str, Any]) -> None:
    """Bring the per-attempt parts of long-lived children up to date (plan data, Service selector), and a
    NetworkPolicy to the operator's current rules."""
    kind, meta = desired["kind"], desired["metadata"]
    if kind == "ConfigMap":
        want = meta["annotations"][ch.ANNOTATION_ATTEMPT]
        have = ((current.get("metadata") or {}).get("annotations") or {}).get(ch.ANNOTATION_ATTEMPT)
        if have != want or current.get("data") != desired["data"]:
            kube.patch(kind, meta["namespace"], meta["name"],
                       {"metadata": {"annotations": {ch.ANNOTATION_ATTEMPT: want}}, "data": desired["data"]})
    elif kind == "Service":
        selector = desired["spec"]["selector"]
        if (current.get("spec") or {}).get("selector") != selector:
            kube.patch(kind, meta["namespace"], meta["name"], {"spec": {"selector": selector}})
    elif kind == "NetworkPolicy" and current.get("spec") != desired["spec"]:
        kube.patch(kind, meta["namespace"], meta["name"], {"spec": desired["spec"]})
