"""A thin, synchronous adapter over the ``kubernetes`` client for the objects the operator owns.

Objects go in and come out as plain dicts in wire form (camelCase), the form the pure builders produce and the
tests assert on, so the typed models of the client are skipped (``_preload_content=False``-style raw JSON).
One instance is built at startup and handed to the handlers through kopf's ``memo``.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

log = logging.getLogger(__name__)

MERGE_PATCH = "application/merge-patch+json"


@dataclass(frozen=True)
class Resource:
    """Where a kind lives in the REST API."""

    prefix: str  # "api/v1" or "apis/<group>/<version>"
    plural: str
    namespaced: bool = True

    def path(self, namespace: str | None, name: str | None = None, subresource: str | None = None) -> str:
        parts = [self.prefix]
        if self.namespaced and namespace:
            parts += ["namespaces", namespace]
        parts.append(self.plural)
        if name:
            parts.append(name)
        if subresource:
            parts.append(subresource)
        return "/" + "/".join(parts)


RESOURCES: dict[str, Resource] = {
    "ConfigMap": Resource("api/v1", "configmaps"),
    "Service": Resource("api/v1", "services"),
    "ServiceAccount": Resource("api/v1", "serviceaccounts"),
    "Pod": Resource("api/v1", "pods"),
    "Event": Resource("api/v1", "events"),
    "Role": Resource("apis/rbac.authorization.k8s.io/v1", "roles"),
    "RoleBinding": Resource("apis/rbac.authorization.k8s.io/v1", "rolebindings"),
    "PodGroup": Resource("apis/scheduling.volcano.sh/v1beta1", "podgroups"),
    "DiffusionJob": Resource("apis/stadi.dev/v1alpha1", "diffusionjobs"),
}


def is_conflict(error: ApiException) -> bool:
    return error.status == 409


class Kube:
    """Get, list, create, patch and delete objects by kind; raw dicts in and out."""

    def __init__(self, api_client: k8s.ApiClient, timeout: float = 30.0) -> None:
        self.api_client = api_client
        self.timeout = timeout

    @classmethod
    def from_environment(cls, timeout: float = 30.0) -> Kube:
        """In-cluster configuration when running in a pod, else the local kubeconfig."""
        from kubernetes import config

        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        return cls(k8s.ApiClient(), timeout)

    @classmethod
    def for_host(cls, host: str, timeout: float = 30.0) -> Kube:
        """An unauthenticated client of one URL (tests against an emulated API server)."""
        configuration = k8s.Configuration(host=host)
        return cls(k8s.ApiClient(configuration), timeout)

    def request(
        self, method: str, path: str, *, query: dict[str, str] | None = None, body: Any = None,
        content_type: str = "application/json",
    ) -> dict[str, Any]:
        """One API call; raises ``ApiException`` (status, reason, body) on any non-2xx answer."""
        serialized = self.api_client.param_serialize(
            method, path, query_params=list((query or {}).items()),
            header_params={"Accept": "application/json", "Content-Type": content_type},
            body=body, auth_settings=["BearerToken"],
        )
        response = self.api_client.call_api(*serialized, _request_timeout=self.timeout)
        data = response.read()
        if not 200 <= response.status <= 299:
            raise ApiException.from_response(http_resp=response, body=data.decode(errors="replace"), data=None)
        return json.loads(data) if data else {}

    def get(self, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        try:
            return self.request("GET", RESOURCES[kind].path(namespace, name))
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    def list(self, kind: str, namespace: str | None, labels: dict[str, str] | None = None) -> list[dict[str, Any]]:
        """Objects of a kind, filtered by labels on the server and again here (cheap, and exact)."""
        query = {"labelSelector": ",".join(f"{k}={v}" for k, v in labels.items())} if labels else None
        items = self.request("GET", RESOURCES[kind].path(namespace), query=query).get("items") or []
        wanted = labels or {}
        return [
            item for item in items
            if all((item.get("metadata", {}).get("labels") or {}).get(k) == v for k, v in wanted.items())
        ]

    def create(self, body: dict[str, Any]) -> dict[str, Any]:
        meta = body["metadata"]
        return self.request("POST", RESOURCES[body["kind"]].path(meta.get("namespace")), body=body)

    def patch(
        self, kind: str, namespace: str | None, name: str, body: dict[str, Any], subresource: str | None = None
    ) -> dict[str, Any]:
        """JSON merge patch (RFC 7386): dicts merge, lists are replaced, None deletes."""
        path = RESOURCES[kind].path(namespace, name, subresource)
        return self.request("PATCH", path, body=body, content_type=MERGE_PATCH)

    def delete(self, kind: str, namespace: str | None, name: str) -> bool:
        """Delete in the background (children go through the garbage collector); False if already gone."""
        try:
            self.request("DELETE", RESOURCES[kind].path(namespace, name),
                         body={"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"})
        except ApiException as error:
            if error.status == 404:
                return False
            raise
        return True

    def has_resource(self, group_version: str, plural: str) -> bool:
        """Whether the API serves a resource (discovery needs no RBAC beyond being authenticated)."""
        try:
            found = self.request("GET", f"/apis/{group_version}")
        except ApiException:
            return False
        return any(r.get("name") == plural for r in found.get("resources") or [])

    def event(
        self, involved: dict[str, Any], reason: str, message: str, *, warning: bool = False, now: datetime,
    ) -> None:
        """Post a core/v1 Event about an object; never raises (an event is worth less than the handler)."""
        meta = involved.get("metadata", {})
        stamp = now.isoformat().replace("+00:00", "Z")
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{meta.get('name')}.{uuid.uuid4().hex[:16]}", "namespace": meta.get("namespace")},
            "involvedObject": {
                "apiVersion": involved.get("apiVersion"), "kind": involved.get("kind"),
                "name": meta.get("name"), "namespace": meta.get("namespace"), "uid": meta.get("uid"),
            },
            "reason": reason,
            "message": message[:1024],
            "type": "Warning" if warning else "Normal",
            "source": {"component": "stadi-operator"},
            "reportingComponent": "stadi.dev/operator",
            "reportingInstance": "stadi-operator",
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
        }
        try:
            self.create(body)
        except Exception as error:  # events are best effort by design
            log.warning("event not posted", extra={"reason": reason, "error": str(error)})
