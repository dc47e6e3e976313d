"""The one ApiClient factory of the operator and the node agent: the pod's ServiceAccount (with the library's token
refresh), else a kubeconfig; each client with its own Configuration."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from kubernetes import client
from kubernetes.config import incluster_config, kube_config
from stadi_operator.agent import kube_api
from stadi_operator.kube import Kube, api_client


@pytest.fixture
def service_account(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """What the kubelet mounts into a pod, and the env it sets; returns the token file."""
    token, ca = tmp_path / "token", tmp_path / "ca.crt"
    token.write_text("token-1")
    ca.write_text("not checked until a request")
    monkeypatch.setattr(incluster_config, "SERVICE_TOKEN_FILENAME", str(token))
    monkeypatch.setattr(incluster_config, "SERVICE_CERT_FILENAME", str(ca))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    return token


@pytest.fixture
def kubeconfig(tmp_path: Path) -> Path:
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "dev",
        "clusters": [{"name": "dev", "cluster": {"server": "https://dev.example:6443"}}],
        "users": [{"name": "me", "user": {"token": "kubeconfig-token"}}],
        "contexts": [{"name": "dev", "context": {"cluster": "dev", "user": "me"}}],
    }))
    return path


def bearer(api: client.ApiClient) -> str:
    return str(api.configuration.get_api_key_with_prefix("BearerToken")).lower()


def test_in_a_pod_the_service_account_token_is_used_and_refreshed(service_account: Path) -> None:
    api = api_client()
    assert api.configuration.host == "https://10.0.0.1:443"
    assert bearer(api) == "bearer token-1"
    # The library re-reads the projected token (the kubelet rotates it) through this hook on every request.
    assert api.configuration.refresh_api_key_hook is not None
    # Its own Configuration: the process-wide default is left alone.
    assert client.Configuration.get_default_copy().host != "https://10.0.0.1:443"


def test_outside_a_pod_the_kubeconfig_is_used(kubeconfig: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    # The library reads KUBECONFIG once, at import: what it read is what is patched here.
    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(kubeconfig))
    api = api_client()
    assert api.configuration.host == "https://dev.example:6443"
    assert bearer(api) == "bearer kubeconfig-token"


def test_an_explicit_kubeconfig_wins_over_the_service_account(service_account: Path, kubeconfig: Path) -> None:
    assert api_client(str(kubeconfig)).configuration.host == "https://dev.example:6443"


def test_the_agent_and_the_operator_share_the_factory(service_account: Path, kubeconfig: Path) -> None:
    assert Kube.from_environment().client.configuration.host == "https://10.0.0.1:443"
    agent_api = kube_api()
    assert isinstance(agent_api, client.CustomObjectsApi)
    assert agent_api.api_client.configuration.host == "https://10.0.0.1:443"
    assert kube_api(str(kubeconfig)).api_client.configuration.host == "https://dev.example:6443"


def test_a_misspelt_field_of_a_builtin_kind_fails_before_any_request() -> None:
    """The client's typed models check what the adapter creates: the API server would drop the field silently."""
    kube = Kube.for_host("http://127.0.0.1:9", timeout=1)  # nothing listens: a request would fail otherwise
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "ns"},
           "spec": {"nodeSelecter": {"a": "b"}, "containers": [{"name": "c", "image": "i"}]}}
    with pytest.raises(ValueError, match="nodeSelecter"):
        kube.create(pod)
