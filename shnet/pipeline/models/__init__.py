"""Networks used by the extraction stages, and their loaders for local weight files.

Importing this package first makes torchvision importable on CPU-only torch builds
(see :mod:`shnet.torchvision_compat`), in the main process and in every Dask worker.
"""

from ...torchvision_compat import ensure_torchvision

ensure_torchvision()
