"""One controller per resource; each handler is a line or two calling ``obatch.server.operations``."""

from obatch.server.controllers.batches import BatchesController
from obatch.server.controllers.benchmarks import BenchmarksController
from obatch.server.controllers.files import FilesController
from obatch.server.controllers.passthrough import PassthroughController
from obatch.server.controllers.system import SystemController

__all__ = ["BatchesController", "BenchmarksController", "FilesController", "PassthroughController",
           "SystemController"]
