"""Which distractors each MegaFace size uses, and why.

A size runs against its given list (``<name>_features_list.json_<size>_<set>`` in the lists folder) or, where there
is none, against a list drawn from the distractor shard rows with a recorded seed and written beside the results.
MegaFace's distractors are other people, so a drawn list never holds a probe image nor another image of a probe
identity (the candidates are what :func:`~facesearch.benchmarks.megaface_data.probe_overlap` leaves); a size the
candidates cannot fill is a one-line error.  A given list that breaks the rule is refused when it holds probe images
(each outscores its own mates; ``allow_probe_overlap`` evaluates it with a warning) and warned about when it holds other
images of probe identities (the devkit and the official lists tolerate a few).  Each size's record — the given file,
or drawn: seed, rows, candidates, rows excluded as probe images / probe identities; noisy entries removed; warnings —
goes into its result JSON.

    lists = DistractorLists(ListConfig(out=res / "lists", distractors=shard_dir), probes, say=print)
    for size in lists.sizes():
        src, record = lists.source(size, attributes)
        ...  # score src
        settle(record)  # a drawn list's file written, its count and checksum in the record
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from facesearch.benchmarks import devkit
from facesearch.benchmarks.megaface_data import (
    DevkitDistractors,
    DistractorSource,
    ProbeOverlap,
    Probes,
    ShardDistractors,
    draw_selection,
    list_positions,
    probe_overlap,
    selection_record,
    shard_rows,
)
from facesearch.benchmarks.megaface_store import DecodedShards

DEFAULT_SIZES: tuple[int, ...] = (10, 100, 1000, 10_000, 100_000, 1_000_000)


@dataclass(frozen=True)
class ListConfig:
    """Where each size's distractors come from.  ``distractors``: a shard directory (sizes without a list are drawn
    from its rows with ``seed``) or ``distractor_root``: a devkit feature tree (every size needs a list, its files
    named ``<path><file_ending>``); ``lists``: the folder of given lists; ``out``: where drawn lists are written.
    ``sizes`` empty: every size with a list of ``set_number``, plus every standard size (10 … 10^6) the candidate
    rows can fill.  ``name``: the distractor set's name (default: from the list file names, else ``megaface``)."""

    out: Path
    distractors: Path | None = None
    distractor_root: Path | None = None
    lists: Path | None = None
    file_ending: str = "_facesearch.bin"
    sizes: tuple[int, ...] = ()
    set_number: int = 1
    seed: int = 0
    name: str | None = None
    allow_probe_overlap: bool = False


_PENDING = "_pending"


def _write_drawn(path: Path, paths: Sequence[str]) -> dict[str, Any]:
    devkit.write_distractor_list(path, paths)
    return selection_record(paths)


def settle(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` once its drawn list is written (its count and SHA-256 filled in; an error writing it raised here);
    a given list's record as it is."""
    pending: Future[dict[str, Any]] | None = record.pop(_PENDING, None)
    if pending is not None:
        record.update(pending.result())
    return record


class DistractorLists:
    """The distractor selection of every size for one probe set: :meth:`sizes` to run, :meth:`source` to stream one
    (with its record); ``noise`` entries (the cleaned variant) are removed from every list; ``say`` reports what was
    drawn and every warning as it happens; ``store``: the distractor directory's rows decoded once for every size
    (:class:`~facesearch.benchmarks.megaface_store.DecodedShards`), else each size decodes its own."""

    def __init__(
        self, cfg: ListConfig, probes: Probes, noise: tuple[str, ...] = (), say: Callable[[str], None] | None = None,
        store: DecodedShards | None = None,
    ) -> None:  # fmt: skip
        self.cfg, self.probes, self.noise, self.store = cfg, probes, noise, store
        self.say: Callable[[str], None] = say or (lambda msg: None)
        self.lists = devkit.find_distractor_lists(cfg.lists) if cfg.lists else {}
        if cfg.distractors is not None:
            self.ids, self.paths, self.identities = shard_rows(cfg.distractors)

    @property
    def name(self) -> str:
        """The distractor set's name in output file names: the option, else the lists' set name, else megaface."""
        if self.cfg.name:
            return self.cfg.name
        if self.lists:
            return devkit.list_set_name(next(iter(self.lists.values())).name)
        return "megaface"

    @cached_property
    def _keys(self) -> list[str]:
        """Stem keys of the shard rows (computed once, only when a list has to be matched or drawn)."""
        return [devkit.stem_key(p) for p in self.paths]

    @cached_property
    def _overlap(self) -> ProbeOverlap:
        """Which shard rows are probe images / other images of probe identities (computed once)."""
        return probe_overlap(self.probes, self._keys, self.identities)

    def draw_record(self) -> dict[str, Any]:
        """Where drawn lists come from: the rows, the candidates left, and what was excluded."""
        ov = self._overlap
        n_img, n_id = int(ov.image.sum()), int(ov.identity.sum())
        return {"drawn_from": str(self.cfg.distractors), "rows": len(self.ids),
                "candidates": len(self.ids) - n_img - n_id, "excluded_probe_images": n_img,
                "excluded_probe_identities": n_id}  # fmt: skip

    def _too_few(self, size: int) -> str:
        d = self.draw_record()
        return (f"cannot draw {size:,} distractors for size {size:,}: only {d['candidates']:,} of the {d['rows']:,} "
                f"rows of {d['drawn_from']} are candidates ({d['excluded_probe_images']:,} excluded as probe images, "
                f"{d['excluded_probe_identities']:,} as other images of probe identities); give a list for this size "
                f"or more distractor rows")  # fmt: skip

    def sizes(self) -> list[int]:
        """The sizes to run, ascending; every one is checked (a list exists, or the candidates can fill it) before
        the first one runs."""
        cfg = self.cfg
        listed = {size for size, set_number in self.lists if set_number == cfg.set_number}
        if cfg.sizes:
            for size in cfg.sizes:
                if size not in listed and cfg.distractors is None:
                    raise ValueError(f"no distractor list for size {size} set {cfg.set_number} in {cfg.lists}")
                if size not in listed and size > self.draw_record()["candidates"]:
                    raise ValueError(self._too_few(size))
            return sorted(cfg.sizes)
        n = self.draw_record()["candidates"] if cfg.distractors is not None else 0
        drawable = {s for s in DEFAULT_SIZES if s <= n}
        if not listed | drawable:
            more = f" (too few candidate rows to draw 10: {self._too_few(10)})" if cfg.distractors is not None else ""
            raise ValueError(f"no distractor size to run: no list for set {cfg.set_number}{more}")
        return sorted(listed | drawable)

    def source(self, size: int, attributes: tuple[str, ...] = ()) -> tuple[DistractorSource, dict[str, Any]]:
        """The distractors of ``size`` as a stream (with the ``attributes`` probabilities) and the list's record."""
        listed = self.lists.get((size, self.cfg.set_number))
        src, record = self._drawn(size, attributes) if listed is None else self._given(size, listed, attributes)
        for warning in record["warnings"]:
            self.say(f"WARNING: {warning}")
        return src, record

    def _drop_noisy(self, paths: list[str], record: dict[str, Any]) -> np.ndarray:
        keep = ~devkit.noisy_mask(paths, self.noise) if self.noise else np.ones(len(paths), bool)
        if self.noise:
            record["noisy_removed"] = int((~keep).sum())
        return keep

    def _drawn(self, size: int, attributes: tuple[str, ...]) -> tuple[DistractorSource, dict[str, Any]]:
        cfg = self.cfg
        assert cfg.distractors is not None, "drawn lists need a shard directory"
        ov = self._overlap
        candidates = np.flatnonzero(~(ov.image | ov.identity))
        if size > len(candidates):
            raise ValueError(self._too_few(size))
        pos = candidates[draw_selection(len(candidates), size, cfg.seed, cfg.set_number)]
        paths = [self.paths[i] for i in pos]
        drawn = cfg.out / devkit.distractor_list_name(self.name, size, cfg.set_number)
        drawn.parent.mkdir(parents=True, exist_ok=True)
        # Writing the list (1M entries: ~1 s of JSON, checksum and fsync) runs beside the scoring; settle() waits.
        pool = ThreadPoolExecutor(1, thread_name_prefix="write-list")
        pending = pool.submit(_write_drawn, drawn, paths)
        pool.shutdown(wait=False)  # the thread ends with its one task
        record = {"source": "drawn", "seed": cfg.seed, "written": str(drawn), **self.draw_record(),
                  "count": len(paths), _PENDING: pending, "warnings": []}  # fmt: skip
        self.say(f"size {size:>9,}: no list given, drew {size:,} distractors with seed {cfg.seed} from "
                 f"{record['candidates']:,} candidates of the {record['rows']:,} rows of {cfg.distractors} "
                 f"(excluded {record['excluded_probe_images']:,} probe images and "
                 f"{record['excluded_probe_identities']:,} other images of probe identities); "
                 f"written to {drawn}")  # fmt: skip
        ids = self.ids[pos[self._drop_noisy(paths, record)]]
        return ShardDistractors(cfg.distractors, ids, attributes, self.store), record

    def _given(self, size: int, listed: Path, attributes: tuple[str, ...]) -> tuple[DistractorSource, dict[str, Any]]:
        cfg = self.cfg
        paths = list(devkit.read_distractor_list(listed))
        record = {"source": str(listed), "size_in_name": size, **selection_record(paths), "warnings": []}
        if len(paths) != size:  # the devkit tolerates it and names its output by the size in the list's name
            record["warnings"].append(
                f"{listed}: named for {size:,} distractors but holds {len(paths):,}; labelled {size:,} as the "
                f"devkit does (its result file is named by the size in the list's name), evaluated on all "
                f"{len(paths):,}"
            )  # fmt: skip
        paths = [p for p, k in zip(paths, self._drop_noisy(paths, record), strict=True) if k]
        if cfg.distractors is not None:
            pos = list_positions(self._keys, paths, f"distractors {cfg.distractors} vs list {listed}")
            ov = self._overlap
            self._check_given(listed, paths, ProbeOverlap(ov.image[pos], ov.identity[pos]), record)
            return ShardDistractors(cfg.distractors, self.ids[pos], attributes, self.store), record
        assert cfg.distractor_root is not None, "a list without shard rows needs a devkit feature root"
        self._check_given(listed, paths, probe_overlap(self.probes, [devkit.stem_key(p) for p in paths]), record)
        return DevkitDistractors(cfg.distractor_root, paths, cfg.file_ending), record

    def _check_given(self, listed: Path, paths: list[str], ov: ProbeOverlap, record: dict[str, Any]) -> None:
        """Record and judge a given list's overlap with the probes: probe images are refused unless allowed (each
        outscores its own mates: meaningless), other images of probe identities are a warning (the devkit and the
        official lists tolerate them; the noise lists / ``--cleaned`` are the published remedy)."""
        keys = [devkit.stem_key(p) for p in paths]
        n_img, n_id = int(ov.image.sum()), int(ov.identity.sum())
        record.update(probe_images=n_img, probe_identities=n_id)
        if n_img:
            msg = (f"{listed}: {n_img:,} of {len(paths):,} distractors are probe images (same relative path as a "
                   f"probe, e.g. {ov.examples(keys, 'image')}): each outscores its own mates, so the rank-1 of those "
                   f"probes is meaningless")  # fmt: skip
            if not self.cfg.allow_probe_overlap:
                raise ValueError(f"{msg}; remove them from the list, or pass --allow-probe-overlap to evaluate anyway")
            record["warnings"].append(f"{msg} (evaluated anyway: --allow-probe-overlap)")
        if n_id:
            record["warnings"].append(
                f"{listed}: {n_id:,} of {len(paths):,} distractors are other images of probe identities (e.g. "
                f"{ov.examples(keys, 'identity')}): MegaFace distractors must be other people, and each of these "
                f"counts as a non-mate that can only lower rank-1 and TAR (the official lists hold a few: see the "
                f"noise lists and --cleaned)"
            )  # fmt: skip


__all__ = ["DEFAULT_SIZES", "DistractorLists", "ListConfig", "settle"]
