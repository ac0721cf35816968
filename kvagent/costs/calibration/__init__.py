"""Measured costs that outlive the process: prefill, local loads, registry links and circuit breakers.

One JSON file per machine (``<cache_dir>/calibration.json``; ``KVAGENT_CALIBRATION`` names another),
shared by every process: read without a lock (writes are atomic: temp file + ``os.replace``), changed
read-modify-write under a file lock. It holds

* prefill samples ``(new tokens, past tokens, seconds)`` per model fingerprint + dtype + machine, fitted
  as ``a + b·n + c·n·(n/2 + past)`` (attention makes prefill superlinear) by non-negative least squares
  on relative error;
* local-store load samples ``(bytes, seconds)`` per machine, fitted as ``a + b·bytes``;
* per registry URL: round-trip time and download throughput as moving averages (with the throughput's
  spread), and a circuit breaker (``kvagent.costs.breaker``);
* outcomes: the newest ``MAX_OUTCOMES`` reads, prompts and chats, each with the path it took and the seconds
  the model predicted for it against the seconds it took (``kvagent calibrate --show`` prints the errors).

Fits are identifiable and robust (``fit_model``): a term enters only when the samples can tell it apart,
the fixed term never exceeds the fastest sample, outliers are left out, and every estimate carries its
spread. When a profile holds more than ``MAX_SAMPLES``, the oldest sample of the most common length goes
first, so a host that repeats one prompt length keeps what it measured at others.

Samples older than ``max_age_s`` are dropped; samples dated in the future (the clock went backwards) are
re-stamped to now, so they age from there. A corrupt or foreign file is ignored with a warning and rebuilt
on the next write; calibration is best-effort and never fails a read. ``CostModel`` turns all this into
``kvagent.costs.policy`` estimates, each with its provenance.

The package, one job a module (this module re-exports the public API; other names are imported from the
module that defines them):

* ``fitting``: the maths (pure): features, robust identifiable fits, outliers, spread, moving averages;
* ``contents``: the file's contents (pure): shape, validation and ageing, sample keeping, and the changes
  that records make to them;
* ``file``: the persisted file (``CalibrationFile``, ``default_path``): atomic writes under a file lock;
* ``machine``: the machine and the ``Profile`` a prefill sample is valid for;
* ``estimates``: estimates from the contents (pure), and ``summary``;
* ``outcomes``: predictions checked against costs (``Outcome``, ``prediction_errors``, ``OutcomeLog``);
* ``model``: ``CostModel``, the facade the resolver uses (decisions, records, breaker hooks);
* ``measure``: the first-use probe, ``kvagent calibrate``'s measurements and a fresh host's warm-up.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .contents import keep_diverse
from .estimates import summary
from .file import CalibrationFile, default_path
from .fitting import Fit, fit_load, fit_model, fit_prefill, prefill_fit
from .machine import Profile, machine_id
from .measure import calibrate, engine_probe, measure_prefill, probe_prefill, warm_up
from .model import CostModel
from .outcomes import Outcome, describe_ratios, prediction_errors

__all__ = [
    "CalibrationFile",
    "CostModel",
    "Fit",
    "Outcome",
    "Profile",
    "calibrate",
    "default_path",
    "describe_ratios",
    "engine_probe",
    "fit_load",
    "fit_model",
    "fit_prefill",
    "keep_diverse",
    "machine_id",
    "measure_prefill",
    "prediction_errors",
    "prefill_fit",
    "probe_prefill",
    "summary",
    "warm_up",
]


if not TYPE_CHECKING:

    def __getattr__(name: str) -> object:
        """Names this package re-exported before it kept only its public API: importable from here for one
        release, with a warning (``kvagent._moved.MOVED_NAMES``); import them from their module."""
        from ..._moved import moved_attribute

        return moved_attribute(__name__, name)
