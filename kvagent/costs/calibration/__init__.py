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

The package, one job a module (this module re-exports their public names):

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

from ..breaker import PROBE_LOOKUP_DEADLINE_S, PROBE_WAIT_S
from .contents import (
    CLOCK_SLACK_S,
    DEFAULT_MAX_AGE_S,
    FORMAT,
    MAX_OUTCOMES,
    MAX_SAMPLES,
    OUTCOME_KINDS,
    VERSION,
    CorruptCalibration,
    clean,
    empty,
    keep_diverse,
)
from .estimates import link_estimates, load_estimate, prefill_estimate, summary
from .file import CalibrationFile, default_path
from .fitting import (
    EWMA_ALPHA,
    EXTRAPOLATION_SPREAD,
    LOAD_SUBSETS,
    MIN_TERM_SPREAD,
    OUTLIER_FACTOR,
    PREFILL_SUBSETS,
    PRIOR_DOF,
    PRIOR_SPREAD,
    PROBE_WEIGHT,
    SPREAD_FLOOR,
    Fit,
    Row,
    ewma,
    fit_load,
    fit_model,
    fit_prefill,
    load_fit,
    prefill_features,
    prefill_fit,
)
from .machine import Profile, machine_id
from .measure import (
    PROBE_BUDGET_S,
    WARMUP_LENGTHS,
    WARMUP_TAILS,
    calibrate,
    engine_probe,
    measure_prefill,
    probe_prefill,
    warm_up,
)
from .model import MIN_DOWNLOAD_BYTES, MIN_LOAD_BYTES, MIN_PREFILL_TOKENS, CostModel
from .outcomes import OUTCOME_FLUSH_S, PERCENTILES, Outcome, OutcomeLog, describe_ratios, prediction_errors

__all__ = [
    "CalibrationFile", "CostModel", "Fit", "Outcome", "Profile", "calibrate", "default_path",
    "describe_ratios", "engine_probe",
    "fit_load", "fit_model", "fit_prefill", "keep_diverse", "machine_id", "measure_prefill",
    "prediction_errors", "prefill_fit", "probe_prefill", "summary", "warm_up",
    # also importable from here, as before the split
    "CLOCK_SLACK_S", "DEFAULT_MAX_AGE_S", "EWMA_ALPHA", "EXTRAPOLATION_SPREAD", "FORMAT", "LOAD_SUBSETS",
    "MAX_OUTCOMES", "MAX_SAMPLES", "MIN_DOWNLOAD_BYTES", "MIN_LOAD_BYTES", "MIN_PREFILL_TOKENS",
    "MIN_TERM_SPREAD", "OUTCOME_FLUSH_S", "OUTCOME_KINDS", "OUTLIER_FACTOR", "PERCENTILES",
    "PREFILL_SUBSETS", "PRIOR_DOF",
    "PRIOR_SPREAD", "PROBE_BUDGET_S", "PROBE_LOOKUP_DEADLINE_S", "PROBE_WAIT_S", "PROBE_WEIGHT",
    "SPREAD_FLOOR", "VERSION", "WARMUP_LENGTHS", "WARMUP_TAILS", "CorruptCalibration", "OutcomeLog", "Row",
    "clean", "empty", "ewma",
    "link_estimates", "load_estimate", "load_fit", "prefill_estimate", "prefill_features",
]
