"""saliency-audit: batch saliency audits of image classifiers on Apache Beam.

The repository's three top-level folders install under this one import name:
``saliency_audit.explainers`` (methods and metrics, pure PyTorch/NumPy), ``saliency_audit.transforms``
(the job's Beam steps over a Beam-free foundation: storage, readers, models) and
``saliency_audit.pipelines`` (the job, its checks, reports and the command line).

    from saliency_audit.explainers import get_explainer, list_methods
"""
from importlib import metadata

try:
    __version__ = metadata.version("saliency-audit")
except metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
