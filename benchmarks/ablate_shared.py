"""What every variant of ``facesearch ablate`` shares, made once per data set in ``D/shared``.

* The data: the synthetic set (:func:`facesearch.model.faces.synth.generate_faces` at the tier's sizes, data seed
  fixed) in ``data/``, or the user's identity-labelled list CSV split by person
  (:func:`facesearch.benchmarks.split.write_split`) into ``split/``: training people, FaceScrub-style probes and
  MegaFace-style distractor lists.
* The attribute labels, one labelling for every variant: synthetic data trains the tier's attribute teacher on the
  CelebA-style set (``teacher/``) and labels the training people by majority vote (``labels.csv``); a list CSV uses
  its own attribute columns, or the labels of ``predictor`` (then the teacher) when one is given.
* LFW-style pairs (``lfw/pairs.txt`` + ``lfw/lfw/<name>/``; 10 folds) of the probe and distractor people with at
  least 2 images among them: people no variant trains on.  Their features are the probe and distractor features a run
  computes anyway (:attr:`Shared.lfw_images` maps each pair image to its row).
* The teacher's per-identity attribute confusion counts on the probe images against their truth (the generator's,
  or the list's own labels), for Table 4 (``teacher_probes.json``).
* ``shared.json``, written last (so its presence means complete): where everything is, the counts, the SHA-256 of
  every file the results depend on, and the provenance.  A later run checks the hashes before reusing it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from facesearch.benchmarks import devkit
from facesearch.benchmarks.ablate_plan import Tier
from facesearch.benchmarks.ablate_stats import attribute_counts
from facesearch.benchmarks.lfw import lfw_name, pair_key, write_lfw_pairs
from facesearch.benchmarks.split import LANDMARKS, PROBE_LIST, TRAIN_LIST, SplitConfig, write_split
from facesearch.indexer.shards import file_sha256
from facesearch.model.attributes import LabelConfig, label_identities
from facesearch.model.config import ATTRIBUTES
from facesearch.model.faces.datasets import FaceDataset, Sample
from facesearch.model.faces.samples import read_list
from facesearch.model.faces.synth import MANIFEST, SynthConfig, generate_faces
from facesearch.model.fileio import atomic_write_text
from facesearch.model.predictors import load_predictor
from facesearch.model.predictors.base import predict_dataset
from facesearch.model.predictors.training import train_attribute_predictor
from facesearch.model.provenance import provenance
from facesearch.model.trainer_data import detector_factory, read_samples

log = logging.getLogger(__name__)
Say = Callable[[str], None]

KIND = "facesearch.ablate_shared"
SHARED_JSON = "shared.json"
TEACHER_PROBES = "teacher_probes.json"
LFW_FOLDS = 10


def _key(path: str | os.PathLike[str]) -> str:
    return os.path.normpath(os.path.abspath(path))


def devkit_samples(
    rel_paths: Sequence[str], root: Path, identities: Sequence[str | None], landmarks: Path | None
) -> list[Sample]:
    """Samples of devkit list entries (paths relative to ``root``), with landmarks from a list CSV where it has them
    (matched by absolute path; the others are detected when embedded)."""
    marks = {_key(s.path): s.landmarks for s in read_list(landmarks)} if landmarks is not None else {}
    out = []
    for rel, identity in zip(rel_paths, identities, strict=True):
        path = root / rel
        out.append(Sample(path, identity, marks.get(_key(path))))
    return out


@dataclass(frozen=True)
class Shared:
    """The shared inputs of every run (see the module docstring).  ``probes`` / ``distractors``: the probe list's
    images and the union of the distractor lists' images (list order), ``probe_paths`` / ``distractor_paths`` their
    list entries; ``sizes``: the distractor list sizes; ``truth``: (n_probes, 7) float32 0/1 attribute truth of the
    probes in :data:`ATTRIBUTES` order, NaN unknown (None: no labels at all); ``lfw_images``: pair image key ->
    (``probes`` | ``distractors``, row)."""

    root: Path
    record: dict[str, Any]
    train_data: Path
    train_format: str
    labels: Path | None
    identities: int
    probe_list: Path
    distractor_lists: Path
    sizes: tuple[int, ...]
    probes: tuple[Sample, ...]
    probe_paths: tuple[str, ...]
    distractors: tuple[Sample, ...]
    distractor_paths: tuple[str, ...]
    lfw_pairs: Path
    lfw_images: Mapping[str, tuple[str, int]]
    truth: np.ndarray | None
    teacher: dict[str, Any] | None

    @property
    def digest(self) -> str:
        """SHA-256 of ``shared.json``: every result records the shared inputs it was computed on."""
        return file_sha256(self.root / SHARED_JSON)


def _inputs(train: Path, train_format: str, probe_list: Path, probe_root: Path, probe_marks: Path | None,
            lists: Path, distractor_root: Path, distractor_marks: Path | None) -> dict[str, Any]:  # fmt: skip
    return {"train": str(train), "train_format": train_format, "probe_list": str(probe_list),
            "probe_root": str(probe_root), "probe_landmarks": None if probe_marks is None else str(probe_marks),
            "distractor_lists": str(lists), "distractor_root": str(distractor_root),
            "distractor_landmarks": None if distractor_marks is None else str(distractor_marks)}  # fmt: skip


def _synthesised(cfg: SynthConfig) -> bool:
    """Whether ``cfg.out`` already holds the complete output of ``cfg`` (an interrupted preparation resumes)."""
    try:
        made = json.loads((cfg.out / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    ignored = ("out", "workers")  # where and how fast, not what
    same = {k: v for k, v in made.get("config", {}).items() if k not in ignored}
    return bool(made.get("complete")) and same == {k: v for k, v in cfg.to_dict().items() if k not in ignored}


def _synth(root: Path, tier: Tier, seed: int, device: str, say: Say) -> tuple[dict[str, Any], Path, np.ndarray]:
    """The synthetic data, teacher and labels: (inputs, teacher predictor file, probe truth)."""
    data = root / "data"
    synth = tier.synth_config(data, seed)
    if not _synthesised(synth):
        say(f"synthesising the {tier.name} tier's faces into {data}")
        generate_faces(synth)
    cfg = tier.teacher_config(data / "celeba", root / "teacher", seed, device)
    say(f"training the attribute teacher ({tier.teacher_method}, {tier.teacher_iterations} steps)")
    teacher = train_attribute_predictor(cfg).path
    say("labelling the training people by majority vote of the teacher")
    label_identities(LabelConfig(teacher, data / "casia", root / "labels.csv", device=device))
    mf = data / "megaface"
    inputs = _inputs(data / "casia", "casia", mf / "templatelists" / PROBE_LIST, mf / "facescrub",
                     mf / "facescrub_landmarks.csv", mf / "templatelists", mf / "megaface",
                     mf / "megaface_landmarks.csv")  # fmt: skip
    inputs.update(
        labels=str(root / "labels.csv"), record=str(data / MANIFEST), identities_from=str(mf / "megaface_landmarks.csv")
    )
    truth = {_key(s.path): s.attributes or {} for s in read_list(mf / "attributes.csv")}
    return inputs, teacher, _truth_matrix(truth, inputs)


def _split(root: Path, data: Path, tier: Tier, seed: int, predictor: Path | None, device: str,
           say: Say) -> tuple[dict[str, Any], Path | None, np.ndarray | None]:  # fmt: skip
    """The user's list split by person; labels from ``predictor`` or the list's own columns."""
    out = root / "split"
    say(f"splitting {data} by person into {out}")
    rec = write_split(
        SplitConfig(
            data=data,
            out=out,
            probe_identities=tier.probe_identities,
            probe_images_per_identity=tier.probe_images_per_identity,
            seed=seed,
        )
    ).record
    image_root = Path(rec["image_root"])
    marks = out / LANDMARKS if (out / LANDMARKS).is_file() else None
    inputs = _inputs(out / TRAIN_LIST, "list", out / PROBE_LIST, image_root, marks, out, image_root, marks)
    inputs.update(labels=None, record=str(out / "split.json"), identities_from=str(data))
    if predictor is not None:
        say(f"labelling the training people by majority vote of {predictor}")
        label_identities(LabelConfig(predictor, out / TRAIN_LIST, root / "labels.csv", data_format="list",
                                     device=device))  # fmt: skip
        inputs["labels"] = str(root / "labels.csv")
    elif not any(s.attributes for s in read_list(out / TRAIN_LIST)):
        raise ValueError(f"{data} has no attribute columns and no attribute predictor was given (--predictor): the "
                         f"variants with attributes need labels for the training people")  # fmt: skip
    source = read_samples(data, "list")
    truth = {_key(s.path): dict(s.attributes or {}) for s in source}
    matrix = _truth_matrix(truth, inputs)
    return inputs, predictor, matrix if np.isfinite(matrix).any() else None


def _truth_matrix(truth: Mapping[str, Mapping[str, float]], inputs: Mapping[str, Any]) -> np.ndarray:
    probes, _ = _probe_samples(inputs)
    return np.array([[truth.get(_key(s.path), {}).get(a, np.nan) for a in ATTRIBUTES] for s in probes], np.float32)


def _probe_samples(inputs: Mapping[str, Any]) -> tuple[list[Sample], list[str]]:
    plist = devkit.read_probe_list(Path(inputs["probe_list"]))
    marks = inputs["probe_landmarks"]
    return devkit_samples(plist.paths, Path(inputs["probe_root"]), plist.ids,
                          None if marks is None else Path(marks)), list(plist.paths)  # fmt: skip


def _distractor_samples(inputs: Mapping[str, Any]) -> tuple[list[Sample], list[str], tuple[int, ...]]:
    lists = devkit.find_distractor_lists(Path(inputs["distractor_lists"]))
    if not lists:
        raise ValueError(f"no megaface_features_list.json_<size>_<set> files in {inputs['distractor_lists']}")
    union = list(dict.fromkeys(p for f in lists.values() for p in devkit.read_distractor_list(f)))
    marks = inputs["distractor_landmarks"]
    samples = devkit_samples(union, Path(inputs["distractor_root"]), [None] * len(union),
                             None if marks is None else Path(marks))  # fmt: skip
    by_path = {_key(s.path): s.identity for s in read_list(Path(inputs["identities_from"]))}
    samples = [Sample(s.path, by_path.get(_key(s.path)), s.landmarks) for s in samples]
    return samples, union, tuple(sorted({size for size, _ in lists}))


def lfw_image_rows(probes: Sequence[Sample], distractors: Sequence[Sample]) -> dict[str, tuple[str, int]]:
    """Pair image key -> (role, row) for the people with >= 2 images among ``probes`` and ``distractors``, numbered
    as :func:`facesearch.benchmarks.lfw.write_lfw_pairs` numbers them (each person's images in path order, from 1)."""
    by_person: dict[str, list[tuple[Path, str, int]]] = {}
    for role, samples in (("probes", probes), ("distractors", distractors)):
        for i, s in enumerate(samples):
            if s.identity is not None:
                by_person.setdefault(str(s.identity), []).append((Path(s.path), role, i))
    out: dict[str, tuple[str, int]] = {}
    for identity, items in by_person.items():
        if len(items) >= 2:
            for n, (_, role, i) in enumerate(sorted(items, key=lambda t: str(t[0])), start=1):
                out[pair_key(lfw_name(identity), n)] = (role, i)
    return out


def _teacher_counts(teacher: Path, probes: Sequence[Sample], truth: np.ndarray, device: str,
                    workers: int | None) -> dict[str, Any]:  # fmt: skip
    """The teacher's per-identity attribute counts on the probe images (its attributes, in its order)."""
    predictor = load_predictor(teacher, device=device)
    spec = predictor.input_spec
    ds = FaceDataset(probes, size=spec.size, margin=spec.margin, attributes=predictor.attributes,
                     detector_factory=detector_factory(probes))  # fmt: skip
    prob, _ = predict_dataset(predictor, ds, num_workers=workers or 0)
    cols = [ATTRIBUTES.index(a) for a in predictor.attributes]
    names, counts = attribute_counts(prob, truth[:, cols], [str(s.identity) for s in probes])
    return {"attributes": list(predictor.attributes), "identities": names, "counts": counts.tolist(),
            "predictor": str(teacher), "key": predictor.key, "fingerprint": predictor.fingerprint}  # fmt: skip


def _write_pairs(images: Sequence[tuple[Path, str]], out: Path, people: Sequence[str], per_fold: int, seed: int,
                 say: Say) -> tuple[Path, int]:  # fmt: skip
    """:func:`write_lfw_pairs` with ``per_fold`` pairs of each kind, or, when a fold's people cannot give that many,
    as many as the poorest fold can (read back from the ``pairs.txt`` header)."""
    try:
        path = write_lfw_pairs(images, out, folds=LFW_FOLDS, per_fold=per_fold, seed=seed, people=people,
                               fewer_ok=True)  # fmt: skip
    except ValueError as e:
        raise ValueError(f"LFW-style pairs of the {len(people)} test people: {e}") from None
    used = int(path.read_text().split(maxsplit=2)[1])
    if used < per_fold:
        say(f"  a fold's people give fewer pairs than asked: {used} pairs of each kind per fold")
    return path, used


def prepare_shared(root: Path, data: str, tier: Tier, seed: int, device: str, predictor: Path | None,
                   say: Say) -> Shared:  # fmt: skip
    """Make (or check and reuse) ``root`` = ``D/shared`` for ``data`` (``synth`` or a list CSV) at ``tier``."""
    if (root / SHARED_JSON).is_file():
        return load_shared(root)
    root.mkdir(parents=True, exist_ok=True)
    teacher: Path | None
    truth: np.ndarray | None
    if data == "synth":
        inputs, teacher, truth = _synth(root, tier, seed, device, say)
    else:
        inputs, teacher, truth = _split(root, Path(data), tier, seed, predictor, device, say)
    probes, _ = _probe_samples(inputs)
    distractors, _, _ = _distractor_samples(inputs)
    rows = lfw_image_rows(probes, distractors)
    people = sorted({str(s.identity) for role, i in rows.values()
                     for s in [(probes if role == "probes" else distractors)[i]]})  # fmt: skip
    say(f"writing LFW-style pairs of {len(people)} people never trained on")
    images = [(s.path, str(s.identity)) for s in (*probes, *distractors) if s.identity is not None]
    pairs, per_fold = _write_pairs(images, root / "lfw", people, tier.lfw_pairs_per_fold, seed, say)
    teacher_record = None
    if teacher is not None and truth is not None:
        say("scoring the attribute teacher on the probe images")
        counts = _teacher_counts(teacher, probes, truth, device, tier.workers)
        atomic_write_text(root / TEACHER_PROBES, json.dumps(counts) + "\n")
        teacher_record = {"path": str(teacher), "key": counts["key"], "fingerprint": counts["fingerprint"],
                          "counts": TEACHER_PROBES}  # fmt: skip
    if truth is not None:
        np.save(root / "probe_truth.npy", truth)
    files = [
        Path(inputs["record"]),
        Path(inputs["probe_list"]),
        pairs,
        *devkit.find_distractor_lists(Path(inputs["distractor_lists"])).values(),
    ]
    files += [Path(p) for p in (inputs["labels"], teacher) if p is not None]
    files += [root / name for name in (TEACHER_PROBES, "probe_truth.npy") if (root / name).is_file()]
    n_ids = len({s.identity for s in read_samples(Path(inputs["train"]), inputs["train_format"])})
    record = {"kind": KIND, "format_version": 1, "data": data, "tier": tier.name, "seed": seed, **inputs,
              "identities": n_ids, "lfw_pairs": str(pairs), "lfw_people": len(people),
              "lfw_pairs_per_fold": per_fold, "lfw_images": rows,
              "teacher": teacher_record, "truth": truth is not None, "probes": len(probes),
              "probe_identities": len({s.identity for s in probes}), "distractors": len(distractors),
              "files": {str(f): file_sha256(f) for f in files}, "provenance": provenance()}  # fmt: skip
    atomic_write_text(root / SHARED_JSON, json.dumps(record, indent=1) + "\n")
    return load_shared(root)


def load_shared(root: Path) -> Shared:
    """The shared inputs recorded in ``root / shared.json``; ``ValueError`` when a recorded file changed since."""
    record = json.loads((root / SHARED_JSON).read_text(encoding="utf-8"))
    if record.get("kind") != KIND:
        raise ValueError(f"{root / SHARED_JSON} is not a shared-inputs record of facesearch ablate")
    changed = [f for f, sha in record["files"].items() if not Path(f).is_file() or file_sha256(Path(f)) != sha]
    if changed:
        raise ValueError(f"{root}: {len(changed)} shared file(s) are missing or changed since they were recorded "
                         f"(e.g. {changed[0]}); delete {root} to make them again (every run then "
                         f"retrains)")  # fmt: skip
    probes, probe_paths = _probe_samples(record)
    distractors, distractor_paths, sizes = _distractor_samples(record)
    truth = np.load(root / "probe_truth.npy") if record["truth"] else None
    teacher = record["teacher"]
    if teacher is not None:
        teacher = {**teacher, **json.loads((root / teacher["counts"]).read_text(encoding="utf-8"))}
    return Shared(root, record, Path(record["train"]), record["train_format"],
                  None if record["labels"] is None else Path(record["labels"]), int(record["identities"]),
                  Path(record["probe_list"]), Path(record["distractor_lists"]), sizes, tuple(probes),
                  tuple(probe_paths), tuple(distractors), tuple(distractor_paths), Path(record["lfw_pairs"]),
                  {k: (v[0], int(v[1])) for k, v in record["lfw_images"].items()}, truth, teacher)  # fmt: skip


__all__ = ["SHARED_JSON", "Shared", "devkit_samples", "lfw_image_rows", "load_shared", "prepare_shared"]
