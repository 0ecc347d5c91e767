"""FAISS, imported in one place so that its absence is one clear error naming the extra to install.

FAISS is not in ``install_requires``: ``faiss-cpu`` and ``faiss-gpu-cu12`` both provide the ``faiss`` module and must
not be installed side by side, so the user picks one through an extra (``facesearch[cpu]`` or ``facesearch[gpu]``).
Use ``from facesearch.indexer.faiss_import import faiss`` instead of ``import faiss``."""

from __future__ import annotations

INSTALL_HINT = "pip install 'facesearch[cpu]' (or 'facesearch[gpu]' for CUDA 12)"

try:
    import faiss
except ModuleNotFoundError as e:
    if e.name != "faiss":  # faiss is there but something it needs is not: its own message says what
        raise
    raise ModuleNotFoundError(f"faiss is not installed: {INSTALL_HINT}", name="faiss") from e

__all__ = ["INSTALL_HINT", "faiss"]
