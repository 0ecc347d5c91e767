"""facesearch: a multi-task face network (Wang et al., ICMR 2017), million-scale gallery indexing, search and
MegaFace-style benchmarks, under one import name.

Layers, each importing only those before it: :mod:`facesearch.model` (the network and the face data) →
:mod:`facesearch.indexer` (shards and FAISS indexes) → :mod:`facesearch.engine` (queries and the HTTP service) →
:mod:`facesearch.benchmarks` (the MegaFace harness and the speed runs).  This package itself is the application layer:
the ``facesearch`` command line (:mod:`facesearch.cli`) and the end-to-end demo (:mod:`facesearch.demo`), the only code
that may see every layer.  Importing ``facesearch`` imports none of them.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("facesearch")
except PackageNotFoundError:  # pragma: no cover - running from a checkout that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
