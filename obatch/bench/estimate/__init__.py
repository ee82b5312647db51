"""How long will a workload take? Token-aware, config-aware estimates calibrated on stored benchmark points.

Each configuration's cost model is fitted on the requests its points measured (``fit``); a run is the makespan of
its requests' service times at the calibrated parallelism (``schedule``); a workload is each request's prompt and
answer tokens and its prefix-cache share (``shape``), in the order and with the cache reuse obatch's scheduler will
give it (``replay``), mapped from a file's text by what was measured (``calibrate``); the estimate picks the
configuration and its interval (``predict``), corrected by finished batches (``history``). ``request`` is the one
path from a question to its figures, whoever asks; ``deadline`` compares a batch's estimate with its window. Each
module's docstring gives its part of the method.
"""

from obatch.bench.estimate.fit import ConfigFit, fits_for
from obatch.bench.estimate.history import estimates_vs_actuals
from obatch.bench.estimate.predict import Estimate
from obatch.bench.estimate.request import EstimateRequest, estimate, estimate_groups, estimate_json_for_batch
from obatch.bench.estimate.shape import Shape

__all__ = [
    "ConfigFit", "Estimate", "EstimateRequest", "Shape", "estimate", "estimate_groups", "estimate_json_for_batch",
    "estimates_vs_actuals", "fits_for",
]
