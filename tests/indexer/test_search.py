"""Exact search back-ends against a brute-force numpy reference (every score materialised)."""

# ruff: noqa: E741  -- FAISS vocabulary: D (scores) and I (ids)
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from facesearch.indexer.search import ResidentGallery, merge_topk, normalize_queries, search_exact


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _brute(xq: np.ndarray, xb: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference: all scores in float64, full sort by (score desc, id asc)."""
    S = xq.astype(np.float64) @ xb.astype(np.float64).T
    order = np.lexsort((np.broadcast_to(ids, S.shape), -S), axis=1)[:, :k]
    return np.take_along_axis(S, order, 1), ids[order]


def assert_same_up_to_ties(D: np.ndarray, I: np.ndarray, Dr: np.ndarray, Ir: np.ndarray, atol: float) -> None:
    """Scores within ``atol``; ids equal except where two items' scores are within ``atol`` (a float32 near-tie can
    order differently between back-ends that round the products differently)."""
    np.testing.assert_allclose(D, Dr, atol=atol)
    for q, j in zip(*np.nonzero(I != Ir), strict=True):
        where = np.flatnonzero(Ir[q] == I[q, j])
        other = Dr[q, where[0]] if len(where) else Dr[q, -1]
        assert abs(other - Dr[q, j]) <= 2 * atol, f"query {q} rank {j}: id {I[q, j]} vs {Ir[q, j]} is not a tie"


def _blocks(ids: np.ndarray, xb: np.ndarray, sizes: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    out, s = [], 0
    for n in sizes:
        out.append((ids[s : s + n], xb[s : s + n]))
        s += n
    return out


@pytest.mark.parametrize(
    "backend,screen", [("faiss", "none"), ("torch", "none"), ("torch", "bf16"), ("torch", "fp16"), ("torch", "int8")]
)
def test_matches_brute_force_over_uneven_blocks(backend: str, screen: str) -> None:
    rng = np.random.default_rng(0)
    nb, d, k = 3000, 64, 10
    xb = _unit(rng, nb, d)
    ids = rng.permutation(10 * nb)[:nb].astype(np.int64)  # ids unrelated to positions
    xq = _unit(rng, 37, d)
    sizes = [0, 1, 999, 0, 1500, 500]  # an empty and a 1-row block, boundaries inside tiles
    D, I = search_exact(xq, _blocks(ids, xb, sizes), k, backend=backend, tile_rows=700, screen=screen, margin=16)
    Dr, Ir = _brute(xq, xb, ids, k)
    # Random scores have no exact ties, so ids must match exactly; float32 products differ from float64 by
    # accumulation rounding, at most ~d * 2^-24 for unit vectors.
    np.testing.assert_array_equal(I, Ir)
    np.testing.assert_allclose(D, Dr, atol=1e-5)
    assert D.dtype == np.float32 and I.dtype == np.int64


def test_screen_on_clustered_data_is_exact_and_falls_back() -> None:
    """Near-duplicates make the bf16 screen's bound fail for some queries; those must fall back to exact."""
    rng = np.random.default_rng(1)
    d = 128
    centres = _unit(rng, 5, d)
    xb = centres[rng.integers(0, 5, 2000)] + 1e-3 * rng.standard_normal((2000, d)).astype(np.float32)
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    ids = np.arange(2000, dtype=np.int64)
    xq = xb[:20] + 1e-3 * rng.standard_normal((20, d)).astype(np.float32)
    xq /= np.linalg.norm(xq, axis=1, keepdims=True)
    Df, If = search_exact(xq, [(ids, xb)], 5, backend="faiss")
    for screen in ("bf16", "int8"):
        Dt, It = search_exact(xq, [(ids, xb)], 5, backend="torch", screen=screen, tile_rows=512, margin=4)
        # Near-duplicates score within a few ulps of each other: ids may swap only inside such near-ties.
        assert_same_up_to_ties(Dt, It, Df, If, atol=1e-5)


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_fewer_than_k_items_are_padded(backend: str) -> None:
    rng = np.random.default_rng(2)
    xb, xq = _unit(rng, 3, 16), _unit(rng, 4, 16)
    ids = np.array([7, 3, 5], dtype=np.int64)
    D, I = search_exact(xq, [(ids[:0], xb[:0]), (ids, xb)], 5, backend=backend)
    _, Ir = _brute(xq, xb, ids, 3)
    np.testing.assert_array_equal(I[:, :3], Ir)
    assert (I[:, 3:] == -1).all() and np.isneginf(D[:, 3:]).all()
    D0, I0 = search_exact(xq, [], 2, backend=backend)
    assert (I0 == -1).all() and np.isneginf(D0).all()


@pytest.mark.parametrize("backend,screen", [("faiss", "none"), ("torch", "none"), ("torch", "bf16")])
def test_ties_broken_by_smaller_id_across_blocks(backend: str, screen: str) -> None:
    """Duplicated vectors tie exactly; the smaller ids win whatever the block order and boundaries."""
    rng = np.random.default_rng(3)
    base = _unit(rng, 4, 32)
    xb = np.repeat(base, 50, axis=0)  # 200 rows, 50 exact copies of each of 4 vectors
    ids = rng.permutation(200).astype(np.int64)
    xq = base[:2]
    D, I = search_exact(xq, _blocks(ids, xb, [37, 100, 63]), 10, backend=backend, tile_rows=30, screen=screen)
    for q in range(2):
        expect = np.sort(ids[q * 50 : (q + 1) * 50])[:10]
        np.testing.assert_array_equal(I[q], expect)
        assert np.all(D[q] == D[q, 0])


def _masked_brute(xq, xb, ids, k, keep):
    Dr, Ir = _brute(xq, xb[keep], ids[keep], k)
    pad = k - Dr.shape[1]
    return np.pad(Dr, ((0, 0), (0, pad)), constant_values=-np.inf), np.pad(Ir, ((0, 0), (0, pad)), constant_values=-1)


@pytest.mark.parametrize("screen", ["none", "bf16", "fp16", "int8"])
@pytest.mark.parametrize("nq", [1, 2, 70])  # one query: the matrix-vector screen; 70: two re-scoring groups
def test_resident_gallery_equals_brute_force_with_rows_and_masks(screen: str, nq: int) -> None:
    rng = np.random.default_rng(5)
    nb, d, k = 3000, 64, 10
    xb = _unit(rng, nb, d)
    ids = rng.permutation(10 * nb)[:nb].astype(np.int64)
    xq = _unit(rng, nq, d)
    gal = ResidentGallery(ids, xb, screen=screen, tile_rows=700, margin=4)
    assert gal.nbytes == {"none": 0, "int8": nb * (d + 4)}.get(screen, nb * d * 2)
    D, I = gal.search(xq, k)
    Dr, Ir = _brute(xq, xb, ids, k)
    np.testing.assert_array_equal(I, Ir)
    np.testing.assert_allclose(D, Dr, atol=1e-5)
    for p in (0.001, 0.01, 0.3, 0.9):
        keep = rng.random(nb) < p
        keep[:2] = True  # never empty
        Dr, Ir = _masked_brute(xq, xb, ids, k, keep)
        rows = np.flatnonzero(keep)
        answers = (gal.search(xq, k, keep=keep), gal.search(xq, k, rows=rows), gal.search(xq, k, rows=gal.gather(rows)))
        for D, I in answers:
            np.testing.assert_array_equal(I, Ir)
            np.testing.assert_allclose(D, Dr, atol=1e-5)
        np.testing.assert_array_equal(answers[1][0], answers[2][0])  # a gathered subset: the very same answer
    other = ResidentGallery(ids, xb, screen=screen, tile_rows=700, margin=4)
    with pytest.raises(ValueError, match="only the gallery that gathered it"):
        gal.search(xq, k, rows=other.gather(np.arange(10)))
    # a tile where nothing passes, one where only a few pass, and an answer shorter than k
    keep = np.zeros(nb, bool)
    keep[[5, 1500, 2999]] = True
    D, I = gal.search(xq, k, keep=keep)
    assert (I[:, 3:] == -1).all() and np.isneginf(D[:, 3:]).all()
    assert set(I[0, :3].tolist()) == set(ids[[5, 1500, 2999]].tolist())
    D, I = gal.search(xq, k, keep=np.zeros(nb, bool))
    assert (I == -1).all() and np.isneginf(D).all()


@pytest.mark.parametrize("screen", ["none", "bf16", "int8"])
def test_resident_gallery_ties_and_near_duplicates(screen: str) -> None:
    """Exact copies tie and the smaller ids win, with or without a mask; near-duplicates (within the bf16 screen's
    error) make the screen fall back, and the answer stays the float32 one."""
    rng = np.random.default_rng(6)
    base = _unit(rng, 4, 32)
    xb = np.repeat(base, 50, axis=0)
    ids = rng.permutation(200).astype(np.int64)
    gal = ResidentGallery(ids, xb, screen=screen, tile_rows=30, margin=2)
    keep = ids % 3 != 0
    for q in range(2):
        mates = ids[q * 50 : (q + 1) * 50]
        D, I = gal.search(base[q : q + 1], 10)
        np.testing.assert_array_equal(I[0], np.sort(mates)[:10])
        D, I = gal.search(base[q : q + 1], 10, keep=keep)
        np.testing.assert_array_equal(I[0], np.sort(mates[mates % 3 != 0])[:10])
        assert np.all(D[0] == D[0, 0])  # exact copies: one score
    centres = _unit(rng, 5, 128)
    xb = centres[rng.integers(0, 5, 2000)] + 1e-3 * rng.standard_normal((2000, 128)).astype(np.float32)
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    ids = np.arange(2000, dtype=np.int64)
    xq = xb[:20] + 1e-3 * rng.standard_normal((20, 128)).astype(np.float32)
    xq /= np.linalg.norm(xq, axis=1, keepdims=True)
    Df, If = search_exact(xq, [(ids, xb)], 5, backend="torch")
    Dt, It = ResidentGallery(ids, xb, screen=screen, tile_rows=512, margin=4).search(xq, 5)
    np.testing.assert_array_equal(It, If)
    np.testing.assert_array_equal(Dt, Df)


def test_merge_topk_orders_by_score_then_id() -> None:
    D = np.array([[0.5, 0.9, 0.5, -np.inf]], dtype=np.float32)
    I = np.array([[9, 4, 2, -1]], dtype=np.int64)
    Dm, Im = merge_topk(D, I, 5)
    np.testing.assert_array_equal(Im, [[4, 2, 9, -1, -1]])
    assert np.isneginf(Dm[0, 3:]).all()


def test_bad_arguments_raise() -> None:
    xq = np.zeros((1, 4), np.float32)
    with pytest.raises(ValueError, match="backend"):
        search_exact(xq, [], 1, backend="annoy")
    with pytest.raises(ValueError, match="screen"):
        search_exact(xq, [], 1, backend="faiss", screen="bf16")
    with pytest.raises(ValueError, match="d=4"):
        search_exact(xq, [(np.zeros(2, np.int64), np.zeros((2, 3), np.float32))], 1)


@pytest.mark.gpu
@pytest.mark.parametrize("screen", ["none", "bf16", "fp16"])
def test_torch_cuda_matches_cpu_reference(screen: str) -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    rng = np.random.default_rng(4)
    nb, d, k = 20000, 256, 10
    xb = _unit(rng, nb, d).astype(np.float16)  # the shard storage dtype
    ids = np.arange(nb, dtype=np.int64)
    xq = _unit(rng, 300, d)
    D, I = search_exact(xq, _blocks(ids, xb, [0, 1, 7000, 12999]), k, backend="torch", device="cuda",
                        tile_rows=4096, screen=screen)  # fmt: skip
    Dr, Ir = _brute(xq, xb.astype(np.float32), ids, k)
    # cuBLAS float32 sums in another order than float64: scores within ~d * 2^-24; ids equal except near-ties.
    assert_same_up_to_ties(D, I, Dr, Ir, atol=1e-5)


@pytest.mark.gpu
def test_resident_gallery_on_cuda_matches_cpu() -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    rng = np.random.default_rng(7)
    xb, xq = _unit(rng, 50000, 256), _unit(rng, 64, 256)
    ids = np.arange(50000, dtype=np.int64)
    keep = rng.random(50000) < 0.3
    cpu = ResidentGallery(ids, xb, screen="none", tile_rows=8192)
    gpu = ResidentGallery(ids, xb, device="cuda", screen="bf16", tile_rows=8192)
    for kw in ({}, {"keep": keep}, {"rows": np.flatnonzero(keep)}):
        for n in (1, 64):
            Dc, Ic = cpu.search(xq[:n], 10, **kw)
            Dg, Ig = gpu.search(xq[:n], 10, **kw)
            assert_same_up_to_ties(Dg, Ig, Dc, Ic, atol=1e-5)


def test_normalize_queries_is_the_models_routine_at_any_scale() -> None:
    """Ordinary rows come out bit for bit as ``F.normalize(x, eps=1e-12)`` (the model's routine) makes them; rows
    of unit norm are returned untouched; rows scaled far out of float32's comfortable range (whose squares
    underflow or overflow, where F.normalize would give ~0 or 0) give the same direction."""
    rng = np.random.default_rng(8)
    x = rng.standard_normal((40, 64)).astype(np.float32)
    ref = F.normalize(torch.from_numpy(x), dim=1, eps=1e-12).numpy()
    for scale in (1.0, 3.0, 0.01):
        np.testing.assert_array_equal(normalize_queries(x * np.float32(scale)), F.normalize(
            torch.from_numpy(x * np.float32(scale)), dim=1, eps=1e-12).numpy())  # fmt: skip
    unit = _unit(rng, 10, 64)
    np.testing.assert_array_equal(normalize_queries(unit), unit)
    assert normalize_queries(unit) is not unit  # a copy, never the caller's array
    # the scaled input itself is rounded to float32 first (x * 1e-30 is not a power of two): a few ulps of 1
    for scaled in (x * np.float32(1e-30), x * np.float32(1e30), x.astype(np.float64) * 1e300,
                   x.astype(np.float64) * 1e-300):  # fmt: skip
        got = normalize_queries(scaled)
        assert got.dtype == np.float32 and got.flags["C_CONTIGUOUS"] and got.shape == x.shape
        np.testing.assert_allclose(got, ref, atol=2e-7)
    np.testing.assert_array_equal(normalize_queries(np.array([1e-45, 0.0], np.float32)), [[1.0, 0.0]])  # subnormal
    np.testing.assert_array_equal(normalize_queries(np.array([3, 4])), np.float32([[0.6, 0.8]]))  # integers, one row
    assert normalize_queries(np.zeros((0, 8), np.float32)).shape == (0, 8)


@pytest.mark.parametrize(
    "row, message",
    [([1.0, np.nan, 0.0], "query row 2 holds NaN or infinite values"),
     ([np.inf, 1.0, 0.0], "query row 2 holds NaN or infinite values"),
     ([0.0, -np.inf, 0.0], "query row 2 holds NaN or infinite values"),
     ([0.0, 0.0, 0.0], "query row 2 is all zeros")],
)  # fmt: skip
def test_normalize_queries_refuses_rows_it_cannot_normalise(row: list[float], message: str) -> None:
    x = np.ones((5, 3), np.float32)
    x[2] = row
    with pytest.raises(ValueError, match=message):
        normalize_queries(x)
    x[3:] = row
    with pytest.raises(ValueError, match=message.replace("row 2", r"row 2 \(also rows 3, 4\)")):
        normalize_queries(x)
    with pytest.raises(ValueError, match="shape"):
        normalize_queries(np.ones((2, 2, 2)))


@pytest.mark.parametrize("by_mv", [True, False])
def test_one_query_screen_products_round_once(by_mv: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both kernels a single query's screen product may use (matrix-vector or 1-row GEMM, whichever reads faster on
    the CPU at hand) accumulate in float32 and round once: within the bound the screen's proof assumes."""
    from facesearch.indexer import screen

    rng = np.random.default_rng(11)
    xb, q = _unit(rng, 5000, 1024), _unit(rng, 1, 1024)
    xbs, qs = torch.from_numpy(xb).to(torch.bfloat16), torch.from_numpy(q).to(torch.bfloat16)
    monkeypatch.setitem(screen.ONE_QUERY_MV, (torch.bfloat16, 1024), by_mv)
    low = screen.low_product(screen.Low(qs), screen.Low(xbs)).double().numpy()[0]
    exact = xbs.double().numpy() @ qs.double().numpy()[0]  # the bf16 inputs' products, in float64
    d, u32, u16 = 1024, 2.0**-24, 2.0**-8
    gamma = d * u32 / (1 - d * u32)
    norms = np.linalg.norm(xbs.double().numpy(), axis=1) * np.linalg.norm(qs.double().numpy())
    assert np.all(np.abs(low - exact) <= u16 / (1 - u16) * np.abs(low) + gamma * norms * (1 + u16))
    rescored, _ = ResidentGallery(np.arange(5000), xb, screen="bf16").search(q, 10)
    np.testing.assert_allclose(rescored[0], np.sort(xb @ q[0])[::-1][:10], atol=1e-6)


def test_batches_skip_a_screen_that_does_not_pay(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where low-precision products are not much faster than float32, a resident gallery answers batches over the
    whole gallery (masked or not) exactly in float32; single queries and subsets keep the screen.  The same answers
    either way; the choice is timed once and cached."""
    from facesearch.indexer import screen
    from facesearch.indexer import search as S

    rng = np.random.default_rng(12)
    xb, xq = _unit(rng, 3000, 64), _unit(rng, 5, 64)
    ids = np.arange(3000, dtype=np.int64)
    gal = ResidentGallery(ids, xb, screen="bf16", tile_rows=700, margin=4)
    keep = rng.random(3000) < 0.3
    screened = [gal.search(xq, 10), gal.search(xq, 10, rows=np.flatnonzero(keep)), gal.search(xq, 10, keep=keep)]
    monkeypatch.setitem(screen.BATCH_SCREEN_PAYS, torch.bfloat16, False)
    screen_tile = S._screened_tile

    def no_screen_for_batches(xq32: torch.Tensor, *args: object, **kw: object) -> object:
        assert len(xq32) == 1 or kw.get("rows") is not None, "a batch over the whole gallery went through the screen"
        return screen_tile(xq32, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(S, "_screened_tile", no_screen_for_batches)
    plain = [gal.search(xq, 10), gal.search(xq, 10, rows=np.flatnonzero(keep)), gal.search(xq, 10, keep=keep)]
    gal.search(xq[:1], 10)  # one query still screens
    for (Da, Ia), (Db, Ib) in zip(screened, plain, strict=True):
        np.testing.assert_array_equal(Ia, Ib)
        np.testing.assert_allclose(Da, Db, atol=1e-6)
    np.testing.assert_array_equal(plain[0][1], _brute(xq, xb, ids, 10)[1])
    for dtype in (torch.float16, torch.int8):
        monkeypatch.delitem(screen.BATCH_SCREEN_PAYS, dtype, raising=False)
        assert isinstance(screen.batch_screen_pays(dtype), bool) and dtype in screen.BATCH_SCREEN_PAYS


def test_int8_screen_bound_holds_on_hard_rows() -> None:
    """The int8 screen's scores stay within its proven bound of the exact products on rows that stress the
    quantisation: Gaussian, one-hot, one large entry among small ones, constant, zero, and tiny-scale rows."""
    from facesearch.indexer import screen

    assert screen.int8_products_exact(), "this CPU's int8 products should be exact (VNNI or exact fallback)"
    rng = np.random.default_rng(13)
    d = 256
    spiky = rng.standard_normal((40, d)) * 1e-3
    spiky[:, 0] = 1.0
    rows = np.concatenate([rng.standard_normal((200, d)), np.eye(d)[:20], spiky, np.ones((5, d)),
                           rng.standard_normal((5, d)) * 1e-30])  # fmt: skip
    xb = (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)
    xb = np.concatenate([xb, np.zeros((1, d), np.float32)])
    xq = np.concatenate([_unit(rng, 20, d), xb[200:230]])
    q32, b32 = torch.from_numpy(xq), torch.from_numpy(xb)
    qs, bs = screen.to_low(q32, "int8"), screen.to_low(b32, "int8")
    assert qs.values.dtype == torch.int8 and int(qs.values.abs().max()) <= 127 and int(bs.values.min()) >= -127
    low = screen.low_product(qs, bs).double().numpy()
    exact = xq.astype(np.float64) @ xb.astype(np.float64).T
    err = screen.screen_error(q32, qs, screen.tile_norms(b32, bs)).double().numpy()
    u = screen.UNIT_ROUNDOFF["int8"]
    slack = np.abs(exact - low) - (err[:, None] + np.abs(low) * u / (1 - u))
    assert (slack <= 0).all(), f"bound exceeded by {slack.max():.3g}"
    assert (err < 0.2).all(), "the bound should be informative, not vacuous"


def test_int8_screen_rescues_failed_proofs_without_the_whole_tile(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the int8 screen's wider bound the first k + margin candidates rarely prove the k-th score on random data;
    the second pass re-scores only the items that may still beat it, never the whole tile, and the answer is the
    float32 search's."""
    from facesearch.indexer import search as S

    rng = np.random.default_rng(14)
    nb, d, k = 20000, 256, 10
    xb, xq = _unit(rng, nb, d), _unit(rng, 8, d)
    ids = np.arange(nb, dtype=np.int64)
    gal = ResidentGallery(ids, xb, screen="int8", tile_rows=nb, margin=2)
    assert gal.xbs is not None
    widths: list[int] = []
    scores = S._scores
    monkeypatch.setattr(S, "_scores", lambda a, b, *r: widths.append(len(b)) or scores(a, b, *r))
    for n in (1, 8):
        D, I = gal.search(xq[:n], k)
        Dr, Ir = _brute(xq[:n], xb, ids, k)
        np.testing.assert_array_equal(I, Ir)
        np.testing.assert_allclose(D, Dr, atol=1e-5)
    assert widths and max(widths) < nb // 8, f"a whole tile was re-scored: {max(widths)} rows"
    assert len(widths) > 2, "the bound never failed: the second pass went untested"


def test_int8_screen_is_refused_where_it_cannot_run() -> None:
    xb = _unit(np.random.default_rng(15), 10, 8)
    with pytest.raises(ValueError, match="int8 screen runs on the CPU"):
        search_exact(xb, [(np.arange(10), xb)], 1, backend="torch", device="cuda", screen="int8")
    with pytest.raises(ValueError, match="screen 'int4' is not one of none, bf16, fp16, int8"):
        ResidentGallery(np.arange(10), xb, screen="int4")
    wide = np.zeros((1, 140_000), np.float32)
    with pytest.raises(ValueError, match=r"sums at most \d+ products in int32; d = 140000"):
        ResidentGallery(np.arange(1), wide, screen="int8")


def test_auto_screen_follows_the_hardware(monkeypatch: pytest.MonkeyPatch) -> None:
    from facesearch.indexer import screen
    from facesearch.model import device

    cases = ((True, True, "int8"), (True, False, "int8"), (False, True, "bf16"), (False, False, "none"))
    for int8, bf16, want in cases:
        monkeypatch.setattr(device, "cpu_has_int8_units", lambda int8=int8: int8)
        monkeypatch.setattr(device, "cpu_has_bf16_units", lambda bf16=bf16: bf16)
        assert screen.auto_screen(torch.device("cpu")) == want, (int8, bf16)
    assert screen.auto_screen(torch.device("cuda")) == "bf16"


def test_top_candidates_by_block_maxima_match_topk() -> None:
    """One query's candidates found through block maxima are torch.topk's, ties and masked (-inf) items included."""
    from facesearch.indexer import search as S

    rng = np.random.default_rng(16)
    n = 64 * S._TOP_BLOCK + 77  # a short last block
    for row in (rng.standard_normal(n).astype(np.float32), np.round(rng.standard_normal(n), 1).astype(np.float32)):
        row[rng.random(n) < 0.5] = -np.inf
        low = torch.from_numpy(row)[None]
        for kk in (1, 74, 3000):
            v, p = S._top_candidates(low, kk)
            ref = torch.topk(low, kk, dim=1)
            assert torch.equal(v, ref.values), kk
            assert torch.equal(low[0, p[0]], v[0]), "positions hold their values"
            assert len(set(p[0].tolist())) == kk


def test_the_batch_screen_choice_is_timed_at_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """A resident gallery times its screen's batch choice when it is built, so no query pays for the timing."""
    from facesearch.indexer import screen

    monkeypatch.delitem(screen.BATCH_SCREEN_PAYS, torch.int8, raising=False)
    ResidentGallery(np.arange(300), _unit(np.random.default_rng(17), 300, 32), screen="int8")
    assert torch.int8 in screen.BATCH_SCREEN_PAYS
