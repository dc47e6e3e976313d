"""``StepGraphs`` when a capture fails (a compile during capture, as a cold inductor cache causes): the failing
call still returns the step's result, the next call captures again, and a key that fails every try runs eagerly
from then on without being captured again."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from stadi_worker.engine import graphs
from stadi_worker.engine.graphs import StepGraphs


class _FakeGraph:
    """What ``_capture`` returns: replaying it computes ``fn`` on its static inputs (as a graph would)."""

    def __init__(self, fn: Any, static: list[torch.Tensor]) -> None:
        self.fn, self.static, self.output = fn, static, fn(*static)

    def replay(self) -> None:
        self.output.copy_(self.fn(*self.static))


@pytest.fixture
def step_graphs(monkeypatch: pytest.MonkeyPatch) -> Any:
    def make(failures: int) -> tuple[StepGraphs, list[int]]:
        attempts: list[int] = []

        def capture(self: StepGraphs, fn: Any, inputs: tuple[torch.Tensor, ...]) -> Any:
            attempts.append(1)
            if len(attempts) <= failures:
                raise RuntimeError("operation not permitted when stream is capturing")
            fake = _FakeGraph(fn, [x.clone() for x in inputs])
            return graphs._Graph(graph=fake, inputs=fake.static, output=fake.output)

        monkeypatch.setattr(StepGraphs, "_capture", capture)
        monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
        return StepGraphs(enabled=True), attempts

    return make


def _double(x: torch.Tensor) -> torch.Tensor:
    return x * 2


def test_a_failed_capture_is_tried_again_and_then_replayed(step_graphs: Any) -> None:
    g, attempts = step_graphs(1)
    for value in range(1, 5):
        x = torch.full((3,), float(value))
        assert torch.equal(g.run("k", _double, x), x * 2)
    assert len(attempts) == 2  # call 2 failed, call 3 captured, call 4 replayed
    assert g.captured("k", torch.zeros(3)) and g.eager_keys == 0


def test_a_key_that_fails_every_capture_runs_eagerly_for_good(step_graphs: Any) -> None:
    g, attempts = step_graphs(graphs.CAPTURE_TRIES)
    for value in range(1, 7):
        x = torch.full((3,), float(value))
        assert torch.equal(g.run("k", _double, x), x * 2)
    assert len(attempts) == graphs.CAPTURE_TRIES
    assert not g.captured("k", torch.zeros(3)) and g.eager_keys == 1
