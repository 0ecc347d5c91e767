"""The low-precision screens of the exact search (:mod:`facesearch.indexer.search`): rows in the screen's precision,
their products, and the error bound that lets a screened top-k be proven exact.

A screen stores the gallery a second time in fewer bytes and multiplies in that precision; its scores only pick
candidates, which are re-scored in float32.  ``bf16`` and ``fp16`` round every value (products accumulate in float32
and round once to the screen's dtype); ``int8`` stores every row as 8-bit integers times one float32 scale per row
(``values * scale`` ~ the row, ``scale = max |x| / 127``): its products are exact int32 sums (``torch._int_mm``;
VNNI / AMX-INT8 instructions on x86), scaled in float32.  One query reads half the bytes of the bf16 copy.

The bound (:func:`screen_error`) is the same for all: with the screen's rows x~ = x + dx and y~ = y + dy (their
*real* values: bf16 rows as stored, int8 rows ``values * scale``), |x~.y~ - x.y| <= |dx| |y| + |x~| |dy|
(Cauchy-Schwarz on the measured rounding-error norms), plus the float32 accumulation of the screen's and of the exact
product (gamma_d terms), plus the rounding of the screen's output (:data:`UNIT_ROUNDOFF`, applied by the caller).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch

from facesearch.model.measure import gemm_flops, seconds_per_call

log = logging.getLogger(__name__)

SCREENS = ("none", "bf16", "fp16", "int8")
#: The relative rounding of one screened score as computed, against the exact product of the screen's rows: bf16 /
#: fp16 round the float32 sum once to their own precision; int8 converts an exact int32 sum to float32 (exact up to
#: d = 1040) and multiplies by the two rows' scales (two roundings): 4 float32 units cover the three.
UNIT_ROUNDOFF = {"bf16": 2.0**-8, "fp16": 2.0**-11, "int8": 4 * 2.0**-24}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.int8}
#: Candidates kept per query beyond k, by default: the int8 bound is ~50x wider than bf16's, and with 16 the first
#: k + 16 candidates proved the k-th score for few queries on 1M synthetic features (a second pass then re-scores
#: the items near it); with 64, for 95 % of them.
DEFAULT_MARGIN = {"bf16": 16, "fp16": 16, "int8": 64}
_U32 = 2.0**-24
_INT8_MAX = 127


@dataclass(frozen=True)
class Low:
    """Rows in a screen's precision: ``values`` (n, d) in its dtype and, for int8, ``scale`` (n,) float32, one per
    row (the row is ``values * scale``)."""

    values: torch.Tensor
    scale: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, rows: slice | torch.Tensor) -> Low:
        return Low(self.values[rows], None if self.scale is None else self.scale[rows])

    @property
    def shape(self) -> torch.Size:
        return self.values.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def nbytes(self) -> int:
        scale = 0 if self.scale is None else self.scale.numel() * 4
        return self.values.numel() * self.values.element_size() + scale

    def select(self, rows: torch.Tensor) -> Low:
        """The rows ``rows`` (positions), gathered."""
        return Low(torch.index_select(self.values, 0, rows),
                   None if self.scale is None else torch.index_select(self.scale, 0, rows))  # fmt: skip

    def upcast(self) -> torch.Tensor:
        """The rows' values in float32 (for int8: ``values * scale`` rounded once to float32)."""
        if self.scale is None:
            return self.values.float()
        return self.values.float() * self.scale[:, None]


def to_low(x32: torch.Tensor, screen: str) -> Low:
    """float32 rows -> the screen's rows.  int8: per row ``scale = max |x| / 127`` (1 for a zero row) and values
    ``round(x / scale)`` clamped to [-127, 127] (symmetric: no -128)."""
    if screen == "int8":
        peak = x32.abs().amax(dim=1)
        scale = torch.where(peak > 0, peak / _INT8_MAX, torch.ones_like(peak))
        q = torch.round(x32 / scale[:, None]).clamp_(-_INT8_MAX, _INT8_MAX).to(torch.int8)
        return Low(q, scale)
    return Low(x32.to(DTYPES[screen]))


def tile_norms(xb32: torch.Tensor, low: Low) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The database side of the screen's error bound: max |y|, max |dy| and max |y~| over the rows (0-d tensors)."""
    up = low.upcast()
    dy = torch.linalg.vector_norm(up - xb32, dim=1).max()
    ny = torch.linalg.vector_norm(up, dim=1).max()
    if low.scale is not None:  # the upcast itself rounded each value of y~ (relative 2^-24): widen by as much
        dy = dy + 2 * _U32 * ny
    return torch.linalg.vector_norm(xb32, dim=1).max(), dy, ny


def screen_error(xq32: torch.Tensor, qs: Low, norms: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Upper bound, per query, of |screened score - float32 score| for every item of a tile, before the rounding of
    the screen's output (:data:`UNIT_ROUNDOFF`, handled by the caller).  ``qs``: the queries in the screen's
    precision; ``norms``: :func:`tile_norms` of the tile (or of any superset of it: the maxima only grow).

    |dx| |y| + |x~| |dy|, plus the float32 accumulation of d products in the screen, gamma_d |x~| |y~| (none for
    int8, whose sums are exact; kept: it only widens the bound), and in the exact product a left-out item would
    get, gamma_d |x| |y| (gamma_d = d u32 / (1 - d u32)), so a left-out item's *computed* float32 score is bounded,
    not only its real one.  The norms are computed in float32; a relative 2^-10 on the whole covers their rounding.
    Returns (m,) float32."""
    return screen_bound(query_terms(xq32, qs), torch.stack(list(norms)), xq32.shape[1])


def query_terms(xq32: torch.Tensor, qs: Low) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The queries' side of :func:`screen_error`, (m,) each: |dx| (widened by the upcast's rounding for int8), |x~|
    and |x|."""
    up = qs.upcast()
    dq = torch.linalg.vector_norm(up - xq32, dim=1)
    nq_s = torch.linalg.vector_norm(up, dim=1)
    if qs.scale is not None:
        dq = dq + 2 * _U32 * nq_s
    return dq, nq_s, torch.linalg.vector_norm(xq32, dim=1)


def screen_bound(terms: tuple[torch.Tensor, torch.Tensor, torch.Tensor], norms: torch.Tensor, d: int) -> torch.Tensor:
    """:func:`screen_error` from the queries' :func:`query_terms` and the database side ``norms`` (3, ...): max |y|,
    max |dy|, max |y~| (one set, or one per group of rows: terms and norms broadcast)."""
    gamma = d * _U32 / (1 - d * _U32)
    dq, nq_s, nq32 = terms
    nb_max, db_max, nbs_max = norms[0], norms[1], norms[2]
    return (dq * nb_max + nq_s * db_max + gamma * (nq_s * nbs_max + nq32 * nb_max)) * (1 + 2.0**-10)


# --- products ------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def int8_products_exact() -> bool:
    """Whether ``torch._int_mm`` sums int8 products exactly on this CPU: checked once per process against int64 on
    the patterns that overflow a 16-bit pair sum (a CPU without VNNI may add pairs with saturation), one query and a
    batch.  The int8 screen is used only where this holds."""
    d = 1024
    g = torch.Generator().manual_seed(0)
    rows = [torch.full((d,), 127), torch.full((d,), -127), torch.tensor([127, -127] * (d // 2)),
            torch.randint(-127, 128, (d,), generator=g)]  # fmt: skip
    a = torch.stack(rows * 17).to(torch.int8)  # 68 rows
    b = torch.stack(rows[::-1] * 5 + [torch.randint(-127, 128, (d,), generator=g) for _ in range(13)]).to(torch.int8)
    try:
        ok = all(torch.equal(torch._int_mm(a[:m], b.T).long(), a[:m].long() @ b.long().T) for m in (1, len(a)))
    except RuntimeError as e:  # pragma: no cover - a torch build without the CPU kernel
        log.debug("no int8 products here: %s", e)
        return False
    if not ok:  # pragma: no cover - depends on the CPU
        log.warning("int8 products are not exact on this CPU (saturating pair sums): the int8 screen is not used")
    return ok


def low_product(qs: Low, bs: Low) -> torch.Tensor:
    """The screen's product (m, n): in its own dtype for bf16 / fp16 (top-k runs on it as is, with no float32 pass
    over it), float32 for int8.  One float query on the CPU goes through whichever of a matrix-vector product and a
    1-row GEMM reads the database faster here (:func:`_one_query_by_mv`); both accumulate in float32 and round once."""
    if qs.scale is not None:
        assert bs.scale is not None, "int8 queries against int8 rows"
        return _scaled(torch._int_mm(qs.values, bs.values.T), qs.scale, bs.scale)
    xqs, xbs = qs.values, bs.values
    if xqs.shape[0] == 1 and xqs.device.type == "cpu" and len(xbs) and _one_query_by_mv(xbs, xqs[0]):
        return torch.mv(xbs, xqs[0])[None]
    return xqs @ xbs.T


def _scaled(acc: torch.Tensor, q_scale: torch.Tensor, b_scale: torch.Tensor) -> torch.Tensor:
    """(m, n) exact int32 sums -> screened scores: float32 (exact up to d = 1040), times the row's then the query's
    scale (two roundings: :data:`UNIT_ROUNDOFF`)."""
    return acc.float().mul_(b_scale).mul_(q_scale[:, None])


#: Rows gathered at a time for a subset's screen product on the CPU: the gathered block (2 MiB at d = 1024 in bf16)
#: stays in cache between its gather and its product, so the subset is read once from memory, not read, written
#: and read again.
GATHER_ROWS = 1024


def gathered_product(qs: Low, bs: Low, rows: torch.Tensor) -> torch.Tensor:
    """The screen's product of ``qs`` with the rows ``rows`` of ``bs``, (m, len(rows)), a cache-sized block of rows
    gathered at a time (each block through :func:`low_product`, as a tile of gathered rows would be)."""
    int8 = bs.scale is not None
    n, m = int(rows.shape[0]), int(qs.shape[0])
    out = torch.empty((m, n), dtype=torch.int32 if int8 else bs.dtype, device=bs.values.device)
    block = torch.empty((min(GATHER_ROWS, n), bs.shape[1]), dtype=bs.dtype, device=bs.values.device)
    for s in range(0, n, GATHER_ROWS):
        e = min(s + GATHER_ROWS, n)
        b = block[: e - s]
        torch.index_select(bs.values, 0, rows[s:e], out=b)
        if int8 and m == 1:  # one query: its row of sums is contiguous, written in place
            torch._int_mm(qs.values, b.T, out=out[:, s:e])
        else:
            out[:, s:e] = torch._int_mm(qs.values, b.T) if int8 else low_product(qs, Low(b))
    if int8:  # the int32 sums scaled once for all blocks, as low_product scales them
        assert bs.scale is not None and qs.scale is not None
        return _scaled(out, qs.scale, torch.index_select(bs.scale, 0, rows))
    return out


#: (screen dtype, d) -> whether one query's screen product runs as a matrix-vector product on this CPU (else as a
#: 1-row GEMM), chosen by timing both once per process (:func:`_one_query_by_mv`).
ONE_QUERY_MV: dict[tuple[torch.dtype, int], bool] = {}


def _one_query_by_mv(xbs: torch.Tensor, q: torch.Tensor) -> bool:
    """Whether ``torch.mv`` reads a database faster than a 1-row matrix product on this CPU, timed once per process
    on (up to) 32,768 of its rows, larger than the caches.  Which is faster depends on the CPU and torch's kernels:
    measured 5.8 against 9.6 GB/s for mv on one machine, 17.8 against 8.9 GB/s for the GEMM on another (avx512_bf16,
    no AMX).  Both accumulate in float32 and round once (the screen's bound holds for either)."""
    key = (xbs.dtype, xbs.shape[1])
    if key not in ONE_QUERY_MV:
        sample = xbs[: min(len(xbs), 32768)]
        mv = seconds_per_call(lambda: torch.mv(sample, q), min_run_time=0.05, warmup=1)
        gemm = seconds_per_call(lambda: q[None] @ sample.T, min_run_time=0.05, warmup=1)
        ONE_QUERY_MV[key] = mv <= gemm
        log.debug("one-query screen product: %s (mv %.2f ms, gemm %.2f ms on %d rows)",
                  "mv" if mv <= gemm else "gemm", 1e3 * mv, 1e3 * gemm, len(sample))  # fmt: skip
    return ONE_QUERY_MV[key]


#: screen dtype -> whether a batch's screened search beats the unscreened float32 one on this CPU
#: (:func:`batch_screen_pays`).
BATCH_SCREEN_PAYS: dict[torch.dtype, bool] = {}
#: How much faster than float32 a screen's products must run to pay for its top-k and re-scoring: int8 more, for the
#: passes that convert and scale its int32 sums and the wider bound's re-scoring (on a 2-core Xeon with VNNI, int8
#: products at 3x the float32 rate made a batch of 256 over 100k gallery vectors no faster than float32).
BATCH_SCREEN_MIN_SPEEDUP = {torch.int8: 4.0}
_DEFAULT_MIN_SPEEDUP = 1.5


def batch_screen_pays(dtype: torch.dtype) -> bool:
    """Whether products in ``dtype`` run at least :data:`BATCH_SCREEN_MIN_SPEEDUP` (1.5 for bf16 / fp16, 4 for int8)
    times the float32 rate on this CPU, timed once per process on a batch-sized product (256 x 1024 by 1024 x 8192).  A
    batch's search is bound by its products: where the low precision is not much faster (a Xeon with ``avx512_bf16`` and
    no AMX ran bf16 GEMMs at half the float32 rate), the screen only adds its top-k and re-scoring, and the resident
    gallery answers batches over the whole gallery exactly in float32 instead; results are the same either way (both are
    exact). int8 products ran at 3.5-5x the float32 rate on that Xeon (VNNI)."""
    if dtype not in BATCH_SCREEN_PAYS:
        from facesearch.indexer.search import strict_matmul

        with strict_matmul():
            f32 = gemm_flops(256, 1024, 8192, torch.float32, min_run_time=0.05)
            low = gemm_flops(256, 1024, 8192, dtype, min_run_time=0.05)
        BATCH_SCREEN_PAYS[dtype] = low >= BATCH_SCREEN_MIN_SPEEDUP.get(dtype, _DEFAULT_MIN_SPEEDUP) * f32
        log.debug("batch screen in %s: %s (%.2f against %.2f TFLOP/s in float32)", dtype,
                  "used" if BATCH_SCREEN_PAYS[dtype] else "skipped", low / 1e12, f32 / 1e12)  # fmt: skip
    return BATCH_SCREEN_PAYS[dtype]


def auto_screen(device: torch.device) -> str:
    """The screen ``auto`` picks: on a GPU bf16; on a CPU with int8 dot-product units (VNNI, AMX-INT8) whose
    products are exact, int8 (one query reads half the bytes of a bf16 copy: 43 against 113 ms on 1M x 1024 on a
    2-core Xeon with VNNI and no AMX); else bf16 where the CPU has bf16 units, else none (emulated bf16 runs slower
    than float32).  A rule on the CPU's flags (and one exactness check), not a timing: the same machine always makes
    the same choice."""
    from facesearch.model.device import cpu_has_bf16_units, cpu_has_int8_units

    if device.type == "cuda":
        return "bf16"
    if device.type == "cpu" and cpu_has_int8_units() and int8_products_exact():
        return "int8"
    return "bf16" if cpu_has_bf16_units() else "none"


#: The largest dimension whose int8 sums fit int32 (127^2 d < 2^31).
INT8_MAX_DIM = (2**31 - 1) // _INT8_MAX**2


def check_screen(screen: str, device: torch.device, d: int | None = None) -> None:
    """A ``ValueError`` for a screen that cannot run here: unknown, or int8 off the CPU, where its products are not
    exact (:func:`int8_products_exact`) or for a dimension ``d`` whose sums could overflow int32."""
    if screen not in SCREENS:
        raise ValueError(f"screen {screen!r} is not one of {', '.join(SCREENS)}")
    if screen == "int8" and d is not None and d > INT8_MAX_DIM:
        raise ValueError(f"the int8 screen sums at most {INT8_MAX_DIM} products in int32; d = {d}: use bf16 or none")
    if screen == "int8" and device.type != "cpu":
        raise ValueError(f"the int8 screen runs on the CPU; on {device} use bf16 (or none)")
    if screen == "int8" and not int8_products_exact():
        raise ValueError("int8 products are not exact on this CPU (saturating pair sums): use bf16 or none")


__all__ = [
    "DEFAULT_MARGIN",
    "DTYPES",
    "INT8_MAX_DIM",
    "SCREENS",
    "UNIT_ROUNDOFF",
    "Low",
    "auto_screen",
    "batch_screen_pays",
    "check_screen",
    "gathered_product",
    "int8_products_exact",
    "low_product",
    "query_terms",
    "screen_bound",
    "screen_error",
    "tile_norms",
    "to_low",
]
