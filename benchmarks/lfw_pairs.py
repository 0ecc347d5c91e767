"""LFW-format verification sets (``pairs.txt`` and the ``lfw/<name>/<name>_<n:04d>.jpg`` images, see
:mod:`facesearch.benchmarks.lfw`) built from data the project has: any identity-labelled images
(:func:`write_lfw_pairs`) or the ORL faces (:func:`write_orl_pairs`).

The people are shuffled with a seed into disjoint folds; each fold samples its matched pairs (two images of one of its
people) and its mismatched pairs (images of two of its people) without duplicates, by index into the enumeration of
every such pair, so a fold of thousands of people is never listed in full.
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path

import cv2
import numpy as np

from facesearch.model.faces.images import read_image
from facesearch.model.fileio import atomic_write_bytes, atomic_write_text


def pair_image_path(root: str | os.PathLike[str], name: str, n: int, ext: str = ".jpg") -> Path:
    """``root/name/name_{n:04d}{ext}``, the LFW layout."""
    return Path(root) / name / f"{name}_{n:04d}{ext}"


def _matched_line(group: Sequence[str], images: Mapping[str, Sequence[int]], index: int) -> str:
    """Matched pair ``index`` of a fold, in the order ``for g in group, for i < j: (images[g][i], images[g][j])``."""
    counts = np.array([len(images[g]) * (len(images[g]) - 1) // 2 for g in group], dtype=np.int64)
    gi = int(np.searchsorted(np.cumsum(counts), index, side="right"))
    g, r = group[gi], index - int(counts[:gi].sum())
    n, i = len(images[g]), 0
    while r >= n - 1 - i:  # row i holds the n - 1 - i pairs (i, j > i)
        r, i = r - (n - 1 - i), i + 1
    return f"{g} {images[g][i]} {images[g][i + 1 + r]}"


def _mismatched_line(group: Sequence[str], images: Mapping[str, Sequence[int]], index: int) -> str:
    """Mismatched pair ``index`` of a fold, in the order ``for g, for h after g, for a of g, for b of h``."""
    n = np.array([len(images[g]) for g in group], dtype=np.int64)
    after = np.concatenate([np.cumsum(n[::-1])[::-1][1:], [0]])  # images of the people after each one
    gi = int(np.searchsorted(np.cumsum(n * after), index, side="right"))
    r = index - int((n * after)[:gi].sum())
    blocks = np.cumsum(n[gi] * n[gi + 1 :])  # one block of n_g x n_h pairs per later person h
    hi = int(np.searchsorted(blocks, r, side="right"))
    r -= int(blocks[hi - 1]) if hi else 0
    g, h = group[gi], group[gi + 1 + hi]
    a, b = divmod(r, int(n[gi + 1 + hi]))
    return f"{g} {images[g][a]} {h} {images[h][b]}"


def _pair_counts(n: Sequence[int]) -> tuple[int, int]:
    """(matched, mismatched) pairs among people with ``n`` images each."""
    return sum(m * (m - 1) // 2 for m in n), (sum(n) ** 2 - sum(m * m for m in n)) // 2


def _write_pairs_file(images: Mapping[str, Sequence[int]], out_dir: Path, folds: int, per_fold: int, seed: int,
                      fewer_ok: bool = False) -> Path:  # fmt: skip
    """``out_dir/pairs.txt`` for the people of ``images`` (LFW name -> image numbers; its order is the people's
    order): the people are shuffled with ``seed`` into ``folds`` disjoint groups; each fold has ``per_fold`` matched
    pairs among its people and ``per_fold`` mismatched pairs across them, sampled without duplicates (by index into
    the enumeration of every pair, so no fold's pairs are ever listed in full).  ``fewer_ok``: when a fold's people
    cannot give ``per_fold`` pairs of a kind, every fold gets as many as the poorest can (the header says how many)
    instead of an error."""
    names = list(images)
    if len(names) < 2 * folds:
        raise ValueError(f"{len(names)} people, need >= 2 per fold ({2 * folds} for {folds} folds); lower folds")
    rank = {name: i for i, name in enumerate(names)}
    rng = np.random.default_rng(seed)
    order = [names[i] for i in rng.permutation(len(names))]
    groups = [sorted(order[k::folds], key=rank.__getitem__) for k in range(folds)]
    if fewer_ok:
        per_fold = min(per_fold, *(min(_pair_counts([len(images[g]) for g in group])) for group in groups))
        if per_fold < 1:
            raise ValueError(f"a fold of {folds} has no matched pair: too few images per person")
    lines = [f"{folds} {per_fold}"]
    for k, group in enumerate(groups):
        n = [len(images[g]) for g in group]
        n_matched, n_mismatched = _pair_counts(n)
        if min(n_matched, n_mismatched) < per_fold:
            raise ValueError(f"fold {k + 1} ({', '.join(group)}) has only {n_matched} matched and {n_mismatched} "
                             f"mismatched pairs; lower per_fold={per_fold}")  # fmt: skip
        for count, line in ((n_matched, _matched_line), (n_mismatched, _mismatched_line)):
            lines += [line(group, images, int(i)) for i in sorted(rng.choice(count, per_fold, replace=False))]
    pairs_path = out_dir / "pairs.txt"
    atomic_write_text(pairs_path, "\n".join(lines) + "\n")
    return pairs_path


def _lfw_jpeg(path: Path, pad: int) -> bytes:
    """The bytes of ``path`` as a JPEG (quality 95) with ``pad`` px of black on each side; a JPEG without padding is
    copied as it is."""
    if pad == 0 and path.suffix.lower() in (".jpg", ".jpeg"):
        return path.read_bytes()
    image = cv2.cvtColor(read_image(path), cv2.COLOR_RGB2BGR)
    if pad:
        image = cv2.copyMakeBorder(image, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=(0, 0, 0))
    ok, jpg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok, "JPEG encoding of a uint8 BGR image cannot fail"
    return jpg.tobytes()


def lfw_name(identity: str) -> str:
    """An identity as an LFW person name (a folder name and one ``pairs.txt`` cell): every character but letters,
    digits, ``.``, ``-`` and ``_`` becomes ``_`` (``"Jane Doe"`` -> ``"Jane_Doe"``)."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", str(identity))
    return "_" + name if name.strip(".") == "" else name


def write_lfw_pairs(
    samples: Iterable[tuple[str | os.PathLike[str], str]],
    out_dir: str | os.PathLike[str],
    folds: int = 10,
    per_fold: int = 100,
    seed: int = 0,
    people: Collection[str] | None = None,
    pad: int = 0,
    fewer_ok: bool = False,
) -> Path:
    """An LFW-format verification set from any identity-labelled images, ``(path, identity)`` pairs:
    ``out_dir/lfw/<name>/<name>_<n:04d>.jpg`` (``name`` = :func:`lfw_name` of the identity; each person's images in
    path order, numbered from 1; JPEGs copied, other formats converted, ``pad`` px of black added on each side when
    asked, which helps a detector find a face filling a tight crop) and ``out_dir/pairs.txt``: the people shuffled
    with ``seed`` into ``folds`` disjoint groups, each fold with ``per_fold`` matched pairs among its people and
    ``per_fold`` mismatched pairs across them, sampled without duplicates.

    ``people``: use only these identities (e.g. the probe and distractor people of a split, so that a model is
    verified on people it never trained on); one absent from ``samples`` is an error.  ``fewer_ok``: when a fold's
    people cannot give ``per_fold`` pairs, every fold gets as many as the poorest can (the ``pairs.txt`` header says
    how many) instead of an error.  Returns the pairs file's path.
    Raises ``ValueError`` for too few people or pairs, two identities with the same LFW name, or no images."""
    out_dir = Path(out_dir)
    if pad < 0:
        raise ValueError(f"pad must be >= 0 pixels, got {pad}")
    by_person: dict[str, list[Path]] = {}
    for path, identity in samples:
        by_person.setdefault(str(identity), []).append(Path(path))
    if people is not None:
        wanted = {str(p) for p in people}
        absent = sorted(wanted - set(by_person))
        if absent:
            raise ValueError(f"{len(absent)} of the {len(wanted)} people asked for have no images, e.g. {absent[:3]}")
        by_person = {k: v for k, v in by_person.items() if k in wanted}
    if not by_person:
        raise ValueError("no images to build pairs from")
    names: dict[str, str] = {}
    for identity in sorted(by_person):
        name = lfw_name(identity)
        if name in names:
            raise ValueError(f"identities {names[name]!r} and {identity!r} both become the LFW name {name!r}")
        names[name] = identity
    images: dict[str, list[int]] = {}
    for name, identity in names.items():
        files = sorted(by_person[identity], key=str)
        for n, path in enumerate(files, start=1):
            atomic_write_bytes(pair_image_path(out_dir / "lfw", name, n), _lfw_jpeg(path, pad), fsync=False)
        images[name] = list(range(1, len(files) + 1))
    return _write_pairs_file(images, out_dir, folds, per_fold, seed, fewer_ok)


def write_orl_pairs(
    orl_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    folds: int = 10,
    per_fold: int = 100,
    seed: int = 0,
) -> Path:
    """An LFW-format verification set from ORL (``s{k}/{n}.pgm``): ``out_dir/lfw/orl_s{k}/orl_s{k}_{n:04d}.jpg``
    (grey, padded by 20 px of black on each side so YuNet finds the face) and ``out_dir/pairs.txt``, the people split
    as :func:`write_lfw_pairs` does (in the order s1, s2, …; image numbers are ORL's own).  Returns the pairs file's
    path."""
    orl_dir, out_dir = Path(orl_dir), Path(out_dir)
    people = sorted(
        (d for d in orl_dir.glob("s*") if d.is_dir() and d.name[1:].isdigit()), key=lambda d: int(d.name[1:])
    )
    if len(people) < 2 * folds:
        raise ValueError(f"{orl_dir}: {len(people)} ORL people (s1, s2, ...) found, need >= 2 per fold ({2 * folds})")
    images = {d.name: sorted(int(p.stem) for p in d.glob("*.pgm") if p.stem.isdigit()) for d in people}
    for name, numbers in images.items():
        for n in numbers:
            pad = cv2.copyMakeBorder(read_image(orl_dir / name / f"{n}.pgm")[:, :, 0], 20, 20, 20, 20,
                                     cv2.BORDER_CONSTANT, value=0)  # fmt: skip
            ok, jpg = cv2.imencode(".jpg", pad, [cv2.IMWRITE_JPEG_QUALITY, 95])
            assert ok, "JPEG encoding of a grey uint8 image cannot fail"
            atomic_write_bytes(pair_image_path(out_dir / "lfw", f"orl_{name}", n), jpg.tobytes(), fsync=False)
    return _write_pairs_file({f"orl_{k}": v for k, v in images.items()}, out_dir, folds, per_fold, seed)


__all__ = ["lfw_name", "pair_image_path", "write_lfw_pairs", "write_orl_pairs"]
