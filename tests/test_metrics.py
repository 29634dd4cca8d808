"""The service's Prometheus instruments are registered once per process, however jobs finish."""

from __future__ import annotations

import time

import bentoml

from lipsync_runner.integration import metrics

from .concurrency import raised, run_together


class _SlowInstrument:
    """Stands in for a bentoml.metrics class: slow to build, counts how often it is built."""

    built: list[str] = []

    def __init__(self, name: str, **_: object) -> None:
        time.sleep(0.02)  # widens the window in which a second thread could build it too
        _SlowInstrument.built.append(name)

    def observe(self, value: float) -> None: ...

    def inc(self, value: float = 1) -> None: ...


def test_two_jobs_finishing_at_once_register_each_instrument_once(monkeypatch):
    monkeypatch.setattr(metrics, "_INSTRUMENTS", None)
    monkeypatch.setattr(bentoml.metrics, "Histogram", _SlowInstrument)
    monkeypatch.setattr(bentoml.metrics, "Counter", _SlowInstrument)
    _SlowInstrument.built = []
    errors = raised(run_together(lambda _: metrics.job_finished(1.0, 25), 8))
    assert not errors
    assert sorted(_SlowInstrument.built) == sorted(set(_SlowInstrument.built)), "an instrument was built twice"
    assert "lipsync_frames_generated" in _SlowInstrument.built
