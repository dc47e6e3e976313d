"""The operator's and the node agent's access to the Kubernetes API, through the official ``kubernetes`` client.

:func:`api_client` is the one way this package builds an ``ApiClient``: the pod's ServiceAccount in a cluster
(the library re-reads the projected token, which the kubelet rotates), else a kubeconfig; each client has its
own ``Configuration``, so nothing is process-wide state.

:class:`Kube` is the controller's adapter over that client: objects go in and come out as plain dicts in wire
form (camelCase), the form the pure builders produce and the tests assert on. The client's API classes
(CoreV1Api, RbacAuthorizationV1Api, CustomObjectsApi) build every request; the typed models validate what
is created (a misspelt field fails here rather than being dropped by the API server), and answers are read
raw (``_preload_content=False``) instead of being turned into models.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from kubernetes import client as k8s
from kubernetes import config
from kubernetes.client.exceptions import ApiException

from stadi.api import GROUP, VERSION

log = logging.getLogger(__name__)

MERGE_PATCH = "application/merge-patch+json"


def api_client(kubeconfig: str | None = None) -> k8s.ApiClient:
    """A client of the pod's ServiceAccount when running in a cluster, else of ``kubeconfig`` (default:
    KUBECONFIG, else ~/.kube/config). An explicit ``kubeconfig`` wins over the ServiceAccount."""
    configuration = k8s.Configuration()
    if kubeconfig is None:
        try:
            config.load_incluster_config(client_configuration=configuration, try_refresh_token=True)
            return k8s.ApiClient(configuration)
        except config.ConfigException:
            pass  # not in a pod (or no ServiceAccount token mounted): the kubeconfig says where to go
    config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    return k8s.ApiClient(configuration)


@dataclass(frozen=True)
class Builtin:
    """A kind the client has typed methods for: ``<verb>_namespaced_<noun>`` of ``api``."""

    api: type[Any]
    noun: str

    def call(self, client: k8s.ApiClient, verb: str, namespace: str, **kwargs: Any) -> Any:
        return getattr(self.api(client), f"{verb}_namespaced_{self.noun}")(namespace=namespace, **kwargs)


@dataclass(frozen=True)
class Custom:
    """A custom resource, reached through ``CustomObjectsApi`` (which reads where Builtin says read)."""

    group: str
    version: str
    plural: str

    def call(self, client: k8s.ApiClient, verb: str, namespace: str, **kwargs: Any) -> Any:
        method = getattr(k8s.CustomObjectsApi(client), f"{'get' if verb == 'read' else verb}_namespaced_custom_object")
        return method(group=self.group, version=self.version, namespace=namespace, plural=self.plural, **kwargs)


# Cluster-scoped custom resources the controller reads (``Kube.get_cluster``).
CLUSTER_RESOURCES: dict[str, Custom] = {
    "WorkloadPriorityClass": Custom("kueue.x-k8s.io", "v1beta2", "workloadpriorityclasses"),
    "GPUNode": Custom(GROUP, VERSION, "gpunodes"),
}

RESOURCES: dict[str, Builtin | Custom] = {
    "ConfigMap": Builtin(k8s.CoreV1Api, "config_map"),
    "Service": Builtin(k8s.CoreV1Api, "service"),
    "ServiceAccount": Builtin(k8s.CoreV1Api, "service_account"),
    "Pod": Builtin(k8s.CoreV1Api, "pod"),
    "Event": Builtin(k8s.CoreV1Api, "event"),
    "Role": Builtin(k8s.RbacAuthorizationV1Api, "role"),
    "RoleBinding": Builtin(k8s.RbacAuthorizationV1Api, "role_binding"),
    "ResourceClaimTemplate": Builtin(k8s.ResourceV1Api, "resource_claim_template"),
    "NetworkPolicy": Builtin(k8s.NetworkingV1Api, "network_policy"),
    "PodGroup": Custom("scheduling.volcano.sh", "v1beta1", "podgroups"),
    "Workload": Custom("kueue.x-k8s.io", "v1beta2", "workloads"),
    "DiffusionJob": Custom(GROUP, VERSION, "diffusionjobs"),
}



def _found(read: Callable[[], Any]) -> dict[str, Any] | None:
    """The object an unparsed read returns, or None where the API server answers 404."""
    try:
        response = read()
    except ApiException as error:
        if error.status == 404:
            return None
        raise
    return json.loads(response.data) if response.data else {}

class Kube:
    """Get, list, create, patch and delete namespaced objects by kind; raw dicts in and out. Every failed call
    raises the client's ``ApiException`` (status, reason, body)."""

    def __init__(self, client: k8s.ApiClient, timeout: float = 30.0) -> None:
        self.client = client
        self.timeout = timeout

    @classmethod
    def from_environment(cls, timeout: float = 30.0) -> Kube:
        """In-cluster configuration when running in a pod, else the local kubeconfig."""
        return cls(api_client(), timeout)

    @classmethod
    def for_host(cls, host: str, timeout: float = 30.0) -> Kube:
        """An unauthenticated client of one URL (tests against an emulated API server)."""
        return cls(k8s.ApiClient(k8s.Configuration(host=host)), timeout)

    def _call(self, kind: str, verb: str, namespace: str, **kwargs: Any) -> dict[str, Any]:
        response = RESOURCES[kind].call(self.client, verb, namespace, _preload_content=False,
                                        _request_timeout=self.timeout, **kwargs)
        return json.loads(response.data) if response.data else {}

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """The object, or None when there is none."""
        try:
            return self._call(kind, "read", namespace, name=name)
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    def get_cluster(self, kind: str, name: str) -> dict[str, Any] | None:
        """A cluster-scoped custom object (``CLUSTER_RESOURCES``), or None when there is none."""
        resource = CLUSTER_RESOURCES[kind]
        return _found(lambda: k8s.CustomObjectsApi(self.client).get_cluster_custom_object(
            resource.group, resource.version, resource.plural, name, _preload_content=False,
            _request_timeout=self.timeout))

    def namespace(self, name: str) -> dict[str, Any] | None:
        """The Namespace object (its metadata is what the controller reads), or None when there is none."""
        return _found(lambda: k8s.CoreV1Api(self.client).read_namespace(
            name, _preload_content=False, _request_timeout=self.timeout))

    def create_cluster(self, body: dict[str, Any]) -> dict[str, Any]:
        """Create a cluster-scoped custom object (``CLUSTER_RESOURCES``); the stored object comes back."""
        resource = CLUSTER_RESOURCES[body["kind"]]
        response = k8s.CustomObjectsApi(self.client).create_cluster_custom_object(
            resource.group, resource.version, resource.plural, body, _preload_content=False,
            _request_timeout=self.timeout)
        return json.loads(response.data) if response.data else {}

    def patch_cluster_status(self, kind: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
        """JSON merge patch of a cluster-scoped custom object's status subresource."""
        resource = CLUSTER_RESOURCES[kind]
        response = k8s.CustomObjectsApi(self.client).patch_cluster_custom_object_status(
            resource.group, resource.version, resource.plural, name, body, _preload_content=False,
            _request_timeout=self.timeout, _content_type=MERGE_PATCH)
        return json.loads(response.data) if response.data else {}

    def list(self, kind: str, namespace: str, labels: dict[str, str] | None = None) -> list[dict[str, Any]]:
        """Objects of a kind, filtered by labels on the server and again here (cheap, and exact)."""
        selector = ",".join(f"{k}={v}" for k, v in labels.items()) if labels else None
        items = self._call(kind, "list", namespace, label_selector=selector).get("items") or []
        wanted = labels or {}
        return [
            item for item in items
            if all((item.get("metadata", {}).get("labels") or {}).get(k) == v for k, v in wanted.items())
        ]

    def create(self, body: dict[str, Any]) -> dict[str, Any]:
        """Create the object in its metadata's namespace; the stored object comes back."""
        return self._call(body["kind"], "create", body["metadata"]["namespace"], body=body)

    def patch(self, kind: str, namespace: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
        """JSON merge patch (RFC 7386): dicts merge, lists are replaced, None deletes."""
        return self._call(kind, "patch", namespace, name=name, body=body, _content_type=MERGE_PATCH)

    def delete(self, kind: str, namespace: str, name: str) -> bool:
        """Delete in the background (children go through the garbage collector); False if already gone."""
        try:
            self._call(kind, "delete", namespace, name=name, propagation_policy="Background")
        except ApiException as error:
            if error.status == 404:
                return False
            raise
        return True

    def has_resource(self, group_version: str, plural: str) -> bool:
        """Whether the API serves a resource (discovery needs no RBAC beyond being authenticated)."""
        group, version = group_version.split("/")
        try:
            response = k8s.CustomObjectsApi(self.client).get_api_resources(
                group, version, _preload_content=False, _request_timeout=self.timeout)
        except ApiException:
            return False
        found = json.loads(response.data) if response.data else {}
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
