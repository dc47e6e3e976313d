"""`stadi operator` wiring and the operator settings (no cluster: kopf.run is replaced)."""

from __future__ import annotations

import argparse
from typing import Any

import kopf
import pytest
from stadi_operator import commands
from stadi_operator.settings import OperatorSettings


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="stadi")
    commands.register(root.add_subparsers(dest="command"))
    return root


def test_operator_flags_reach_kopf_run(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}
    monkeypatch.setattr(kopf, "run", lambda **kwargs: seen.update(kwargs))
    args = parser().parse_args(["operator", "--namespace", "a", "--namespace", "b", "--liveness", "8080"])
    assert args.func(args) == 0
    assert seen["standalone"] is True
    assert (seen["clusterwide"], seen["namespaces"]) == (False, ["a", "b"])
    assert seen["liveness_endpoint"] == "http://0.0.0.0:8080/healthz"
    assert seen["memo"].options.namespaces == ["a", "b"]
    ids = {h.id for h in seen["registry"]._changing.get_all_handlers()}
    assert {"admit", "plan"} <= ids


def test_operator_without_namespaces_is_clusterwide(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}
    monkeypatch.setattr(kopf, "run", lambda **kwargs: seen.update(kwargs))
    monkeypatch.delenv("STADI_OPERATOR_NAMESPACES", raising=False)
    args = parser().parse_args(["operator"])
    args.func(args)
    assert seen["clusterwide"] is True and seen["liveness_endpoint"] is None


def test_every_control_plane_command_is_registered() -> None:
    root = argparse.ArgumentParser()
    sub = root.add_subparsers(dest="command")
    commands.register(sub)
    assert {"operator", "agent", "dev-cluster"} <= set(sub.choices)


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STADI_OPERATOR_NAMESPACES", "team-a, team-b")
    monkeypatch.setenv("STADI_OPERATOR_UNSCHEDULABLE_TIMEOUT", "30")
    monkeypatch.setenv("STADI_OPERATOR_VOLCANO", "off")
    settings = OperatorSettings()
    assert settings.namespaces == ["team-a", "team-b"]
    assert settings.unschedulable_timeout == 30 and settings.volcano == "off"
    assert settings.rendezvous_port == 29500


def test_kopf_settings_avoid_hanging_watches_and_status_bookkeeping() -> None:
    kopf_settings = kopf.OperatorSettings()
    OperatorSettings(watch_server_timeout=120, watch_client_timeout=150).configure_kopf(kopf_settings)
    assert kopf_settings.watching.server_timeout == 120
    assert kopf_settings.watching.client_timeout == 150
    assert kopf_settings.watching.connect_timeout == 10
    assert isinstance(kopf_settings.persistence.progress_storage, kopf.AnnotationsProgressStorage)
    assert isinstance(kopf_settings.persistence.diffbase_storage, kopf.AnnotationsDiffBaseStorage)
    assert kopf_settings.posting.enabled is False
    assert kopf_settings.background.cancellation_polling <= 5  # a job the timer deletes goes within seconds
