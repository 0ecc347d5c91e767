"""Export a shard directory as the official MegaFace devkit's feature tree: one ``.bin`` per image, at
``<out>/<path><file_ending>`` (the devkit's ``run_experiment.py`` reads features that way, named by its file ending).

Streams the shards block by block, so memory stays bounded whatever the number of rows.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from facesearch.benchmarks import devkit
from facesearch.indexer import shards

log = logging.getLogger(__name__)

#: The devkit file ending of facesearch's own features (``_<algorithm>.bin``).
FILE_ENDING = "_facesearch.bin"


def export_bins(
    shard_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    file_ending: str = FILE_ENDING,
    block_rows: int = 65536,
) -> int:
    """Write every ok row of the shard directory ``shard_dir`` as a devkit ``.bin`` file (float32, the devkit's
    layout) at ``<out>/<path><file_ending>``, folders created, ``block_rows`` rows at a time.  Returns the number of
    files written.

    A bad ``file_ending`` (no ``_<algorithm>.bin`` form), an unreadable or incomplete shard directory, or a path
    that appears twice in one block is a ``ValueError``; an unwritable ``out`` an ``OSError``."""
    devkit.algorithm_name(file_ending)  # refuse a bad ending before reading anything
    n = 0
    for block in shards.iter_shards(Path(shard_dir), block_rows, columns=["path"]):
        paths = block.meta.column("path").to_pylist()
        devkit.write_feature_tree(Path(out), paths, block.xb.astype("float32"), file_ending)
        n += len(block)
    log.info("wrote %d devkit feature files under %s", n, out)
    return n


__all__ = ["FILE_ENDING", "export_bins"]
