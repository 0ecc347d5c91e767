"""``facesearch ablate``: the paper's Tables 2–7 in one command, every variant trained with the same seeds (paired),
our numbers as mean ± sd over seeds beside the paper's, and the paired difference to each table's reference row with
a bootstrap interval.

    result = run_ablation(AblateConfig(out=Path("runs/ablate"), tables=("t7",), data="synth", tier="cpu", seeds=3))

Layout of ``out`` (``D``):

* ``config.json`` — the ablation's config (what ``--resume`` compares);
* ``shared/`` — data, attribute labels, probe / distractor lists, LFW-style pairs, made once
  (:mod:`facesearch.benchmarks.ablate_shared`);
* ``runs/<variant key>/seed<s>/`` — one trained model per (variant, seed), its harness results and ``result.json``
  (:mod:`facesearch.benchmarks.ablate_runs`); a variant shared by several tables is trained once;
* ``tables/<table>.md`` / ``.json`` / ``_cmc.png`` / ``_roc.png`` and ``REPORT.md``
  (:mod:`facesearch.benchmarks.ablate_tables`).

What the variants and tiers are: :mod:`facesearch.benchmarks.ablate_plan`.

**Resuming.** Every finished (variant, seed) is kept: a later invocation skips it (checked against the shared
inputs' SHA-256), continues an interrupted training from its checkpoint and trains what is missing.  Running the same
config again in the same ``out`` simply resumes.  A different set of tables, seeds or variants (``only``) needs
``resume=True`` (``--resume``): the finished runs are reused, and without it the call stops, naming the fields that
differ.  A different data set, tier, data seed or attribute predictor can never reuse ``out`` (its shared data and
every result would be another experiment's): that is an error naming them, with or without ``resume``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from facesearch.benchmarks.ablate_plan import TABLE_CHOICES, Tier, Variant, get_tier, plan_variants, resolve_tables
from facesearch.benchmarks.ablate_runs import RunSpec, finished, run_variant
from facesearch.benchmarks.ablate_shared import Shared, prepare_shared
from facesearch.benchmarks.ablate_tables import write_tables
from facesearch.model.fileio import atomic_write_text
from facesearch.model.provenance import command_line

log = logging.getLogger(__name__)
Say = Callable[[str], None]

KIND = "facesearch.ablate"
CONFIG = "config.json"
#: Config fields that fix the experiment: an ``out`` made with other values is never reused.
FIXED_FIELDS: tuple[str, ...] = ("data", "tier", "data_seed", "predictor")
#: Config fields that only add or drop runs and tables: changing them needs ``resume``.
EXTENDABLE_FIELDS: tuple[str, ...] = ("tables", "seeds", "only")


@dataclass(frozen=True)
class AblateConfig:
    """One ablation.  ``tables``: names from :data:`TABLE_CHOICES` (``all`` = every table); ``data``: ``synth`` or an
    identity-labelled list CSV (``path,identity[,x1..y5][,attributes]``); ``tier``: ``smoke`` | ``cpu`` | ``gpu``;
    seeds 0 … ``seeds`` − 1; ``data_seed``: the seed of the synthetic data or of the split; ``predictor``: an
    attribute predictor file labelling a list CSV's training people (and Table 4's teacher); ``only``: variant keys
    to restrict the tables' rows to (e.g. ``fast-head1-none``, ``fast-head1-all``)."""

    out: Path
    tables: tuple[str, ...] = ("all",)
    data: str = "synth"
    tier: str = "cpu"
    seeds: int = 3
    device: str = "auto"
    data_seed: int = 0
    predictor: Path | None = None
    only: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))
        object.__setattr__(self, "tables", resolve_tables(tuple(self.tables)))
        object.__setattr__(self, "only", tuple(self.only))
        get_tier(self.tier)
        if self.seeds < 1 or self.data_seed < 0:
            raise ValueError(f"seeds must be >= 1 and data_seed >= 0, got {self.seeds} and {self.data_seed}")
        if self.data != "synth":
            path = Path(self.data)
            if not path.is_file():
                raise ValueError(f"data {self.data!r}: no such list CSV; give 'synth' or an identity-labelled list "
                                 f"CSV (path,identity[,x1,y1..x5,y5][,attribute columns])")  # fmt: skip
            object.__setattr__(self, "data", str(path.resolve()))
        if self.predictor is not None:
            object.__setattr__(self, "predictor", Path(self.predictor).resolve())
            if not self.predictor.is_file():
                raise ValueError(f"attribute predictor {self.predictor} does not exist")
            if self.data == "synth":
                raise ValueError("a predictor labels a list CSV; the synthetic data trains its own teacher")
        plan_variants(self.tables, self.only)  # validates ``only``

    @property
    def tier_sizes(self) -> Tier:
        return get_tier(self.tier)

    @property
    def variants(self) -> tuple[Variant, ...]:
        return plan_variants(self.tables, self.only)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(out=str(self.out), predictor=None if self.predictor is None else str(self.predictor),
                 tables=list(self.tables), only=list(self.only))  # fmt: skip
        return d


@dataclass(frozen=True)
class AblateResult:
    """``tables``: {table: its Markdown file}; ``trained`` / ``reused``: (variant key, seed) of this invocation."""

    out: Path
    report: Path
    tables: dict[str, Path]
    trained: tuple[tuple[str, int], ...]
    reused: tuple[tuple[str, int], ...]


def check_out(cfg: AblateConfig, resume: bool) -> None:
    """Refuse an ``out`` that holds another experiment, or (without ``resume``) another set of runs (see the module
    docstring); an ``out`` that is not empty and holds no ablation is refused too."""
    path = cfg.out / CONFIG
    if not path.is_file():
        if cfg.out.is_dir() and any(cfg.out.iterdir()):
            raise ValueError(f"{cfg.out} is not empty and holds no {CONFIG}: not an ablation folder; choose a new or "
                             f"empty --out")  # fmt: skip
        return
    saved = json.loads(path.read_text(encoding="utf-8")).get("config", {})
    now = cfg.to_dict()
    fixed = [f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in FIXED_FIELDS if saved.get(k) != now[k]]
    if fixed:
        raise ValueError(f"{cfg.out} holds an ablation of other data ({'; '.join(fixed)}); its shared data and runs "
                         f"cannot be reused, with or without --resume: choose a new --out")  # fmt: skip
    other = [f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in EXTENDABLE_FIELDS if saved.get(k) != now[k]]
    if other and not resume:
        raise ValueError(f"{cfg.out} holds an ablation with another config ({'; '.join(other)}); pass --resume to "
                         f"reuse its finished runs and train the missing ones, or choose a new --out")  # fmt: skip


def _duration(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _estimate(done: dict[str, list[float]], pending: list[RunSpec]) -> float | None:
    """Seconds left: each pending run at the mean duration of the finished runs of its block (else of all)."""
    every = [s for v in done.values() for s in v]
    if not every:
        return None
    mean = sum(every) / len(every)
    return sum(sum(done[s.variant.arch]) / len(done[s.variant.arch]) if done.get(s.variant.arch) else mean
               for s in pending)  # fmt: skip


def _run_all(cfg: AblateConfig, shared: Shared, say: Say) -> tuple[dict[tuple[str, int], dict[str, Any]], list, list]:
    specs = [RunSpec(cfg.out / "runs", shared, cfg.tier_sizes, v, s, cfg.device) for s in range(cfg.seeds)
             for v in cfg.variants]  # fmt: skip
    results: dict[tuple[str, int], dict[str, Any]] = {}
    done: dict[str, list[float]] = {}
    trained, reused, todo = [], [], []
    for spec in specs:
        old = finished(spec)
        if old is not None:
            results[(spec.variant.key, spec.seed)] = old
            reused.append((spec.variant.key, spec.seed))
            done.setdefault(spec.variant.arch, []).append(float(old["seconds"]["total"]))
        else:
            todo.append(spec)
    say(f"{len(specs)} runs ({len(cfg.variants)} variants x {cfg.seeds} seeds): {len(reused)} finished, "
        f"{len(todo)} to run")  # fmt: skip
    for i, spec in enumerate(todo):
        say(f"run {i + 1}/{len(todo)}: {spec.variant.key} seed {spec.seed}")
        t0 = time.perf_counter()
        results[(spec.variant.key, spec.seed)] = run_variant(spec, say)
        trained.append((spec.variant.key, spec.seed))
        done.setdefault(spec.variant.arch, []).append(time.perf_counter() - t0)
        left = _estimate(done, todo[i + 1 :])
        r = results[(spec.variant.key, spec.seed)]
        eta = "" if left is None or i + 1 == len(todo) else f"; about {_duration(left)} left"
        say(f"done {spec.variant.key} seed {spec.seed} in {_duration(time.perf_counter() - t0)}: rank-1 "
            f"{100 * r['megaface'][-1]['rank1']:.2f} % at {r['megaface'][-1]['size']:,}, LFW "
            f"{100 * r['lfw']['mean_accuracy']:.2f} %{eta}")  # fmt: skip
    return results, trained, reused


def run_ablation(cfg: AblateConfig, resume: bool = False, progress: Say | None = None) -> AblateResult:
    """Make the shared inputs, train and evaluate every (variant, seed) not finished yet, and write the tables and
    ``REPORT.md`` (see the module docstring).  ``progress`` receives one line per step, with an estimate of the time
    left once a run has finished."""
    say = progress or (lambda msg: log.info("%s", msg))
    cfg = dataclasses.replace(cfg, out=cfg.out.absolute())
    check_out(cfg, resume)
    cfg.out.mkdir(parents=True, exist_ok=True)
    record = {"kind": KIND, "config": cfg.to_dict(), "tier_sizes": cfg.tier_sizes.to_dict()}
    atomic_write_text(cfg.out / CONFIG, json.dumps(record, indent=1) + "\n")
    shared = prepare_shared(cfg.out / "shared", cfg.data, cfg.tier_sizes, cfg.data_seed, cfg.device, cfg.predictor,
                            say)  # fmt: skip
    results, trained, reused = _run_all(cfg, shared, say)
    say(f"writing the tables {', '.join(cfg.tables)} into {cfg.out / 'tables'}")
    tables = write_tables(cfg.out, cfg.tables, results, range(cfg.seeds), shared, cfg.tier_sizes, cfg.only,
                          command_line())  # fmt: skip
    return AblateResult(cfg.out, cfg.out / "REPORT.md", tables, tuple(trained), tuple(reused))


__all__ = [
    "CONFIG",
    "EXTENDABLE_FIELDS",
    "FIXED_FIELDS",
    "TABLE_CHOICES",
    "AblateConfig",
    "AblateResult",
    "check_out",
    "run_ablation",
]
