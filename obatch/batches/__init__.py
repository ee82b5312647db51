"""The batch lifecycle on top of the runner and the store: validate → import → execute → finalise.

``services`` holds what batch work runs with, ``files`` the input files and their import, ``results`` the recorded
results, the output and error files and the wire views, ``lifecycle`` the driving of a batch from creation to a final
status, ``reuse`` the stored answers a batch's lines take before they run. The names the rest of obatch uses are
these.
"""

from obatch.batches.files import (
    delete_expired_files,
    delete_file,
    expiry_seconds,
    file_path,
    quota_exceeded,
    read_chunks,
    store_file,
)
from obatch.batches.lifecycle import concurrency_json, create_batch, live_eta, process, request_cancel, window_seconds
from obatch.batches.results import (
    NOT_RUN_STATUSES,
    ResultWriter,
    batch_object,
    file_object,
    finalize,
    outcome_row,
    result_file_id,
    write_results,
)
from obatch.batches.services import Estimator, Progress, Services, reload

__all__ = [
    "NOT_RUN_STATUSES", "Estimator", "Progress", "ResultWriter", "Services", "batch_object", "concurrency_json",
    "create_batch", "delete_expired_files", "delete_file", "expiry_seconds", "file_object", "file_path", "finalize",
    "live_eta", "outcome_row", "process", "quota_exceeded", "read_chunks", "reload", "request_cancel", "result_file_id",
    "store_file", "window_seconds", "write_results",
]
