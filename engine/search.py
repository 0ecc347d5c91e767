"""The search engine: rank-k identification against a built index, optionally restricted by an attribute filter,
optionally aggregated per identity, with open-set thresholds.

``SearchEngine.open(index_dir)`` loads an index directory (``facesearch index build``); ``search(xq, k, ...)``
answers a batch of queries at once.  Queries are L2-normalised first, by the routine the gallery's embeddings went
through (:func:`facesearch.indexer.search.normalize_queries`), so every score is a cosine similarity in [-1, 1]
whatever the scale of the query, and thresholds compare cosines; a query row with NaN or infinite values, or all zeros,
is a
``ValueError`` naming the row.

A flat (exact) index is searched by tiled torch products over its stored vectors, used in place (a zero-copy view of
the FAISS storage; on CUDA a device copy), screened in int8 or bf16 where the hardware runs it natively and re-scored
in float32 with a proven bound (:class:`facesearch.indexer.search.ResidentGallery`): exact answers at the speed of the
low-precision product.  With a filter the strategy follows its selectivity p (the fraction of the gallery that passes):

- ``subset`` (flat, p <= 50 %): gather the passing vectors, a cache-sized block at a time, and search only them (a
  filter used again: its rows' screen copy gathered once, :mod:`facesearch.engine.selections`);
- ``masked`` (flat, p > 50 %): one pass over the gallery with the failing items' scores set to -inf (pre-filtering
  inside the product: never re-fetches, whatever the selectivity);
- ``selector`` (IVF / PQ / HNSW, p <= 50 %): FAISS searches with an ``IDSelectorBatch`` of the passing ids;
- ``postfilter`` (IVF / PQ / HNSW, p > 50 %): over-fetch ~k/p hits, keep those that pass, and re-fetch the queries
  still short with a doubled depth until k pass or the whole gallery was seen.

On a flat index every strategy returns exactly the top-k of the passing items, ties by the smaller id; on IVF / PQ /
HNSW indexes the results are approximate and say so.  Each result reports its strategy and its time; ``strategy=``
forces one (``selector`` and ``postfilter`` work on every kind).
"""

# ruff: noqa: E741  -- FAISS vocabulary: D (scores) and I (ids), as STYLE.md asks
from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, overload

import numpy as np

from facesearch.engine.attribute_match import AttributeMatch, combined_loss, match_groups, resolve_match
from facesearch.engine.filter_cost import literal_recall_loss, statistics_from_source
from facesearch.engine.filters import Filter, parse_filter
from facesearch.engine.results import Hit, QueryResult, drop_ids, format_results, pad_columns
from facesearch.engine.selections import Selection, Selections
from facesearch.engine.strategies import SELECTOR_MAX, STRATEGIES, SUBSET_MAX, FilterStrategies
from facesearch.indexer.embed import predictor_crops
from facesearch.indexer.faiss_import import faiss
from facesearch.indexer.index import LoadedIndex, load_index
from facesearch.indexer.screen import auto_screen
from facesearch.indexer.search import ResidentGallery, normalize_queries
from facesearch.model.device import resolve_device
from facesearch.model.faces.detect import FaceDetector
from facesearch.model.faces.prepare import FACE_REASONS, FaceFailure, prepare_image
from facesearch.model.inference import Embedder, iter_embeddings
from facesearch.model.predictors import AttributePredictor, load_predictor

AGGREGATES = ("max", "mean")


def _index_predictor(
    loaded: LoadedIndex, index_dir: Path, attributes_from: Path | None, device: str
) -> AttributePredictor | None:
    """The attribute predictor that filled the index's attribute columns (``None``: the model's own head)."""
    record = loaded.info.attribute_provenance
    if record.get("source") != "predictor":
        if attributes_from is not None:
            raise ValueError(f"index {index_dir}'s attribute columns come from the model's own head, not a predictor; "
                             "drop --attributes-from")  # fmt: skip
        return None
    path = Path(attributes_from) if attributes_from is not None else Path(str(record.get("path", "")))
    if not path.is_file():
        raise FileNotFoundError(f"index {index_dir}'s attribute columns come from the {record.get('key')} predictor "
                                f"{path}, which does not exist here: give its file with --attributes-from")  # fmt: skip
    predictor = load_predictor(path, device=device)
    if predictor.fingerprint != record.get("fingerprint"):
        raise ValueError(f"attribute predictor {path} is {predictor.fingerprint[:16]}… but index {index_dir}'s "
                         f"attributes came from {str(record.get('fingerprint'))[:16]}…: probe and gallery "
                         "probabilities would not be comparable")  # fmt: skip
    return predictor


class UnknownIdError(KeyError, ValueError):
    """A gallery id that is not in the index: a ``KeyError`` (a missing key) and a ``ValueError`` (bad input), whose
    text is the message itself (``KeyError`` would quote it)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown id"


class SearchEngine(FilterStrategies):
    """A loaded index plus its metadata columns (for filters and hits)."""

    def __init__(
        self,
        loaded: LoadedIndex,
        embedder: Embedder | None = None,
        device: str = "auto",
        screen: str = "auto",
        predictor: AttributePredictor | None = None,
    ) -> None:
        self.loaded, self.embedder, self.predictor = loaded, embedder, predictor
        self.index_kind = loaded.info.kind
        self.exact = self.index_kind == "flat"
        attrs = loaded.attributes
        self.attribute_names = tuple(c for c in attrs.column_names if c not in ("id", "path", "identity"))
        self.columns: dict[str, np.ndarray] = {
            "id": loaded.ids,
            "path": np.asarray(attrs.column("path").to_pylist(), dtype=object),
            "identity": np.asarray(attrs.column("identity").to_pylist(), dtype=object),
            **{a: attrs.column(a).to_numpy(zero_copy_only=False).astype(np.float32) for a in self.attribute_names},
        }
        self._row_of = {int(i): r for r, i in enumerate(loaded.ids.tolist())}
        self.selections = Selections(self.columns)  # recent filters' rows (the columns never change once open)
        ids = loaded.ids
        self._id_span = (int(ids.min()), int(ids.max()) + 1) if len(ids) else (0, 0)  # for bitmap selectors
        self.gallery: ResidentGallery | None = None
        self._xb: np.ndarray | None = None  # flat: the stored vectors in attribute-table row order (a view if possible)
        if self.exact:
            self._open_flat(device, screen)
        if self.gallery is not None and self.gallery.xbs is not None:  # hot filters' rows: up to a quarter of it
            self.selections.max_gathered_bytes = self.gallery.xbs.nbytes // 4

    def _open_flat(self, device: str, screen: str) -> None:
        """The resident exact path: the IndexFlat's storage viewed in place, in the attribute table's row order."""
        index = self.loaded.index
        flat = faiss.downcast_index(index.index if isinstance(index, faiss.IndexIDMap2) else index)
        if not isinstance(flat, faiss.IndexFlat):
            return
        n, d = flat.ntotal, flat.d
        xb = faiss.rev_swig_ptr(flat.get_xb(), n * d).reshape(n, d) if n else np.zeros((0, d), np.float32)
        stored_ids = faiss.vector_to_array(index.id_map) if isinstance(index, faiss.IndexIDMap2) else np.arange(n)
        if not np.array_equal(stored_ids, self.columns["id"]):  # rows out of step with the table: one reordered copy
            xb = xb[self.rows(stored_ids.tolist()).argsort()]
        dev = resolve_device(device)
        if screen == "auto":  # int8 or bf16 only where they run natively; emulated they are slower than float32
            screen = auto_screen(dev)
        self._xb = xb
        self.gallery = ResidentGallery(self.columns["id"], xb, device=str(dev), screen=screen)

    @classmethod
    def open(
        cls,
        index_dir: Path,
        checkpoint: Path | None = None,
        device: str = "auto",
        screen: str = "auto",
        verify: bool = False,
        attributes_from: Path | None = None,
    ) -> SearchEngine:
        """Load ``index_dir``; with ``checkpoint`` (needed for image queries) its model must be the one that built
        the index: another fingerprint is refused, since its embeddings would not be comparable.  ``device`` runs
        the model and a flat index's products; ``screen`` (auto | int8 | bf16 | fp16 | none) is the flat path's
        low-precision screen (exact either way; auto: :func:`facesearch.indexer.screen.auto_screen`).

        A damaged or inconsistent index directory is a one-line ``ValueError`` naming the file and what disagrees
        (:func:`facesearch.indexer.index.load_index`: sizes, checksums of the small files, FAISS header vs
        ``index_info.json`` vs attribute table); ``verify`` adds the SHA-256 of ``index.faiss`` and a NaN / inf scan of
        the vectors.

        When an attribute predictor filled the gallery's attribute columns (``index_info.json``'s attribute source),
        image queries get their attributes from the same predictor, so probe and gallery probabilities are
        comparable: the file recorded there, or ``attributes_from`` (its fingerprint must match the record)."""
        loaded = load_index(Path(index_dir), verify=verify)
        embedder = None
        predictor = None
        if checkpoint is not None:
            embedder = Embedder(Path(checkpoint), device=device)
            if embedder.fingerprint != loaded.info.fingerprint:
                raise ValueError(f"checkpoint {checkpoint} is model {embedder.fingerprint[:16]}… but the index "
                                 f"{index_dir} was built with model {loaded.info.fingerprint[:16]}…: their embeddings "
                                 "are not comparable; use the checkpoint that embedded the gallery")  # fmt: skip
            predictor = _index_predictor(loaded, Path(index_dir), attributes_from, device)
        return cls(loaded, embedder, device=device, screen=screen, predictor=predictor)

    def embed_images(
        self, paths: Sequence[Path], detector: FaceDetector | None = None, pad: int = 0
    ) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """Detect (YuNet, on the image padded by ``pad`` black pixels: tightly cropped faces need it), align and
        embed probe images in one batch: (embeddings, attribute probabilities in the gallery's order, paths).  A
        file that cannot be read or holds no face is a ``ValueError`` naming it and the reason."""
        embedder = self._model()
        detector = detector or FaceDetector(pad=pad)
        names = [str(path) for path in paths]
        attribute_crops: dict[str, np.ndarray | None] = {}
        predictor = self.predictor

        def crop(name: str) -> np.ndarray:
            image = prepare_image(Path(name), detector=detector, size=embedder.input_size, max_faces=1,
                                  keep_image=predictor is not None)  # fmt: skip
            face = image.faces[0]
            if isinstance(face, FaceFailure):
                raise ValueError(f"probe {name}: {face.message}")
            if predictor is not None:  # the predictor's own crop of the same face, from the same pixels
                attribute_crops[name] = predictor_crops(image, predictor.input_spec, embedder.input_size)[0]
            return face.crop

        (out,) = iter_embeddings(embedder, [names], crop=crop)
        crops = [attribute_crops.get(n) for n in names]
        return out.embeddings, self._probe_attributes(out.probabilities, crops, names), names

    def _probe_attributes(
        self, head: np.ndarray, crops: Sequence[np.ndarray | None], names: Sequence[str]
    ) -> np.ndarray:
        """Probes' attribute probabilities (nq, attributes) in the gallery's order, from the source of the gallery's
        columns: the index's predictor on its ``crops`` of the faces, else the model's head (``head``: (nq, the
        model's attributes))."""
        predictor = self.predictor
        if predictor is None:
            order = [list(self._model().attributes).index(a) for a in self.attribute_names]
            return head[:, order]
        order = [list(predictor.attributes).index(a) for a in self.attribute_names]
        missing = [n for n, c in zip(names, crops, strict=True) if c is None]
        if missing:
            raise ValueError(f"probe {missing[0]}: no attribute crop for the index's predictor")
        return predictor.predict_crops(np.stack([c for c in crops if c is not None]))[:, order]

    @property
    def flat_vectors(self) -> np.ndarray | None:
        """A flat index's stored vectors in the attribute table's row order (a view of the FAISS storage when the
        orders agree); None for other kinds."""
        return self._xb

    @property
    def fingerprint(self) -> str:
        return self.loaded.info.fingerprint

    @property
    def d(self) -> int:
        return int(self.loaded.index.d)

    def parse(self, text: str) -> Filter:
        """Parse a filter expression against this gallery's columns."""
        return parse_filter(text, self.columns, numeric=("id", *self.attribute_names))

    def expected_recall_loss(self, flt: Filter | None) -> float | None:
        """The share of a person's gallery images that ``flt`` is expected to drop when the person truly has what it
        asks for, from the validation statistics of the index's attribute columns
        (:func:`facesearch.engine.filter_cost.literal_recall_loss`); None without a filter, for a filter that is not
        a conjunction of attribute thresholds, or when the columns carry no statistics."""
        conditions = None if flt is None else flt.thresholds()
        if not conditions or any(name not in self.attribute_names for name, _, _ in conditions):
            return None
        try:
            stats = statistics_from_source(self.loaded.info.attribute_provenance, sorted({c[0] for c in conditions}))
        except ValueError:
            return None
        return literal_recall_loss(stats, conditions)[0]

    def rows(self, ids: Sequence[int]) -> np.ndarray:
        """Row positions of gallery ids; a missing id is an :class:`UnknownIdError` (a ``KeyError`` and a
        ``ValueError``) naming it and the index's id range."""
        try:
            return np.array([self._row_of[int(i)] for i in ids], np.int64)
        except KeyError as e:
            low, top = self._id_span
            have = f"its {len(self._row_of)} ids lie in {low}..{top - 1}" if self._row_of else "it is empty"
            raise UnknownIdError(f"id {e.args[0]} is not in the index ({have})") from None

    def vectors(self, ids: Sequence[int]) -> np.ndarray:
        """Stored vectors of gallery ids (queries "by id")."""
        if self._xb is not None:
            return np.array(self._xb[self.rows(ids)], dtype=np.float32)
        index = self.loaded.index
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None and ivf.direct_map.type == 0:  # DirectMap::NoMap
            ivf.make_direct_map()  # IVF lists need an id -> slot map to return stored vectors (nb x 8 bytes)
        try:
            return np.stack([index.reconstruct(int(i)) for i in ids]).astype(np.float32)
        except RuntimeError as e:
            raise ValueError(f"this {self.index_kind} index cannot return stored vectors: {e}") from e

    def _model(self) -> Embedder:
        if self.embedder is None:
            raise ValueError("image queries need the model: open the engine with checkpoint=...")
        return self.embedder

    @overload
    def embed_array(
        self, image: np.ndarray, detector: FaceDetector, what: str = ..., attributes: Literal[False] = ...
    ) -> np.ndarray: ...
    @overload
    def embed_array(
        self, image: np.ndarray, detector: FaceDetector, what: str = ..., *, attributes: Literal[True]
    ) -> tuple[np.ndarray, np.ndarray]: ...
    def embed_array(
        self, image: np.ndarray, detector: FaceDetector, what: str = "image", attributes: bool = False
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Detect, align and embed one decoded (H, W, 3) RGB image: (1, d); with ``attributes`` also its attribute
        probabilities (1, attributes) in the gallery's order, as :meth:`embed_images` gives them.  No usable face is a
        ``ValueError`` naming ``what``; an image OpenCV cannot process is an
        :class:`facesearch.model.faces.images.ImageError`."""
        embedder = self._model()
        predictor = self.predictor if attributes else None
        attribute_crops: list[np.ndarray | None] = []

        def crop(source: np.ndarray) -> np.ndarray:
            prepared = prepare_image(source, detector=detector, size=embedder.input_size, max_faces=1, name=what,
                                     keep_image=predictor is not None)  # fmt: skip
            face = prepared.faces[0]
            if isinstance(face, FaceFailure):
                raise ValueError(face.message) if face.reason in FACE_REASONS else face.error
            if predictor is not None:  # the predictor's own crop of the same face, as in embed_images
                attribute_crops.append(predictor_crops(prepared, predictor.input_spec, embedder.input_size)[0])
            return face.crop

        (out,) = iter_embeddings(embedder, [[image]], crop=crop)
        if not attributes:
            return out.embeddings
        return out.embeddings, self._probe_attributes(out.probabilities, attribute_crops, [what])

    def _hit(self, row: int, score: float, count: int = 1, rank_score: float | None = None) -> Hit:
        c = self.columns
        attrs = {a: float(c[a][row]) for a in self.attribute_names}
        return Hit(int(c["id"][row]), str(c["path"][row]), c["identity"][row], float(score), attrs, count, rank_score)

    def retrieve(
        self, xq: np.ndarray, k: int, flt: Filter | np.ndarray | None = None, strategy: str = "auto"
    ) -> tuple[np.ndarray, np.ndarray, str, int]:
        """(D, I, strategy, passing) of the top-k (passing) items for every query; D, I are always (nq, k), padded
        with -inf / -1 where fewer than k items pass (or an approximate index returned fewer).  ``xq`` is used as
        given: :meth:`search` normalises it first.  ``flt``: a filter, or its mask already evaluated ((nb,) bool
        over the attribute table's rows: an attribute match's)."""
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
        if flt is None:
            D, I = pad_columns(*self._search_all(xq, k), k)
            return D, I, "none", len(self.columns["id"])
        sel = Selection.of(flt) if isinstance(flt, np.ndarray) else self.selections.get(flt)
        passing = sel.passing
        p = passing / len(sel.mask) if len(sel.mask) else 0.0
        if strategy == "auto":
            if self.gallery is not None:
                strategy = "subset" if p <= SUBSET_MAX else "masked"
            else:
                strategy = "selector" if p <= SELECTOR_MAX else "postfilter"
        run = {"subset": self._subset, "masked": self._masked, "selector": self._selector,
               "postfilter": self._postfilter}[strategy]  # fmt: skip
        D, I = pad_columns(*run(xq, k, sel), k)
        return D, I, strategy, passing

    # -- the public query ---------------------------------------------------------------------------------------------
    def search(
        self,
        xq: np.ndarray,
        k: int = 10,
        filter: str | Filter | None = None,
        group_by: str | None = None,
        agg: str = "max",
        threshold: float | None = None,
        soft_weight: float = 0.0,
        probe_attributes: np.ndarray | None = None,
        strategy: str = "auto",
        exclude_ids: Sequence[int] | np.ndarray | None = None,
        match: AttributeMatch | None = None,
    ) -> list[QueryResult]:
        """Rank-k answers for every row of ``xq`` (nq, d): items, or identities with ``group_by="identity"`` (``agg``
        max: the identity's best item; mean: the mean score of its items among the retrieved hits).  ``threshold``
        drops hits below it and sets ``accepted`` (the open-set decision).  A ``k`` above the gallery size returns
        the whole gallery (every item, or every identity), ranked.  ``strategy`` forces a filter strategy
        (see the module doc; ``auto`` picks by selectivity).

        Queries are L2-normalised first (:func:`facesearch.indexer.search.normalize_queries`, the gallery's routine),
        so a scaled query gets the same hits and scores as the unit one: scores and ``threshold`` are cosines.  A row
        with NaN or infinite values, or all zeros, is a ``ValueError`` naming the row.

        ``exclude_ids`` (nq,) int64: a gallery id to leave out of each query's hits (-1: none), e.g. the query's own
        id when querying by id; the query still gets k hits.  Grouped, only that item is left out, not its
        identity: the identity still ranks by its other retrieved items (the query's mates are what one wants).

        Soft mode (``soft_weight`` w > 0, with ``probe_attributes`` (nq, attributes) in the gallery's attribute
        order): instead of a hard filter, the top 10 k candidates are re-ranked by (1 - w) * score + w * agreement,
        agreement = the mean of cos(pi (p - q) / 2) over the attributes both have (p, q: probe and gallery
        probabilities; 1 when equal, 0 for opposite certainties; the MegaFace harness's soft score); ``Hit.score``
        stays the identity score and ``Hit.rank_score`` is the combined one.  Grouped, an identity is represented by
        its best item by the combined score and ranked by the max (or mean) combined score of its retrieved items;
        ``Hit.score`` is then the max (or mean) identity score of those items.

        Attribute match (``match``, with ``probe_attributes``; :mod:`facesearch.engine.attribute_match`): each query
        keeps only the items whose matched attributes are not confidently opposed to its probe's (ANDed with
        ``filter``), exactly as a filter of that mask would; the queries are searched in groups of equal probe codes.
        Its results carry ``margins`` (given, or chosen for ``match.max_mate_loss`` from the columns' validation
        statistics), ``passing`` for that query, and ``expected_recall_loss`` = the match's predicted share of
        true mates lost, combined as independent with the literal filter's."""
        xq, exclude = self._check(xq, k, group_by, agg, soft_weight, probe_attributes, exclude_ids)
        if threshold is not None and not math.isfinite(threshold):
            raise ValueError(f"threshold must be a finite number (a cosine), got {threshold}")
        k = min(k, max(len(self.columns["id"]), 1))  # no more hits than items: a huge k must not size the buffers
        flt = self.parse(filter) if isinstance(filter, str) else filter
        source = self.loaded.info.attribute_provenance
        resolved = None if match is None else resolve_match(match, self.attribute_names, source)
        t0 = time.perf_counter()
        parts: list[tuple[np.ndarray, Filter | np.ndarray | None]] = [(np.arange(len(xq)), flt)]
        if resolved is not None:  # one mask per distinct probe code, ANDed with the literal filter's
            base = None if flt is None else self.selections.get(flt).mask
            parts = list(match_groups(resolved, self.columns, self.attribute_names, probe_attributes, len(xq), base))
        fetched: list[Any] = [None] * len(xq)  # per query: its D row, I row, strategy, passing
        for rows, part in parts:
            whole = len(rows) == len(xq)  # rows are in order: the whole batch needs no copy
            sub = exclude if exclude is None or whole else exclude[rows]
            D, I, used, passing = self._fetch(xq if whole else xq[rows], k, part, strategy, group_by is not None,
                                              soft_weight, sub)  # fmt: skip
            for j, q in enumerate(rows.tolist()):
                fetched[q] = (D[j], I[j], used, passing)
        seconds = (time.perf_counter() - t0) / max(len(xq), 1)
        loss = combined_loss(self.expected_recall_loss(flt), None if resolved is None else resolved.mates_lost)
        margins = None if resolved is None else resolved.margins
        results = []
        for q, (Dq, Iq, used, passing) in enumerate(fetched):
            pairs = [(float(s), self._row_of[int(i)]) for s, i in zip(Dq, Iq, strict=True) if i >= 0]
            rank: dict[int, float] | None = None
            if soft_weight > 0:
                assert probe_attributes is not None
                rank = self._soft(pairs, np.atleast_2d(probe_attributes)[q], soft_weight)
                pairs.sort(key=lambda t: (-rank[t[1]], int(self.columns["id"][t[1]])))  # type: ignore[index]
            if group_by:
                hits = self._group(pairs, k, agg, rank)
            else:
                hits = [self._hit(r, s, rank_score=None if rank is None else rank[r]) for s, r in pairs[:k]]
            accepted = None
            if threshold is not None:
                accepted = bool(hits) and max(h.score for h in hits) >= threshold
                hits = [h for h in hits if h.score >= threshold]
            results.append(QueryResult(tuple(hits), used, seconds, self.exact, passing, accepted, loss,
                                       None if margins is None else dict(margins)))  # fmt: skip
        return results

    def _fetch(self, xq: np.ndarray, k: int, flt: Filter | np.ndarray | None, strategy: str, grouped: bool,
               soft_weight: float, exclude: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, str, int]:  # fmt: skip
        """:meth:`search`'s candidates: the top k (one more when an item is excluded), or the deep fetch that
        grouping and re-ranking need."""
        if grouped or soft_weight > 0:
            return self._retrieve_deep(xq, k, flt, strategy, grouped, exclude)
        extra = 0 if exclude is None else 1  # one more: the excluded item may be among the top k
        D, I, used, passing = self.retrieve(xq, k + extra, flt, strategy)
        D, I = drop_ids(D, I, exclude)
        return D, I, used, passing

    def _check(
        self,
        xq: np.ndarray,
        k: int,
        group_by: str | None,
        agg: str,
        soft_weight: float,
        probe_attributes: np.ndarray | None,
        exclude_ids: Sequence[int] | np.ndarray | None,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Validate :meth:`search`'s arguments: the normalised queries (nq, d) float32 and the excluded ids."""
        if not 0.0 <= soft_weight <= 1.0:
            raise ValueError(f"soft_weight must be in [0, 1], got {soft_weight}")
        if soft_weight > 0 and (
            probe_attributes is None or np.shape(probe_attributes)[-1] != len(self.attribute_names)
        ):
            raise ValueError(f"soft re-ranking needs the probes' attribute probabilities ({len(self.attribute_names)} "
                             f"per probe: {', '.join(self.attribute_names)}); use image or id queries")  # fmt: skip
        x = np.atleast_2d(np.asarray(xq))
        if x.ndim != 2:
            raise ValueError(f"queries must be (nq, d) or (d,), got shape {x.shape}")
        if x.shape[1] != self.d:
            raise ValueError(f"queries have d={x.shape[1]} but the index holds d={self.d}")
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        if group_by not in (None, "identity"):
            raise ValueError(f"group_by must be 'identity' or None, got {group_by!r}")
        if agg not in AGGREGATES:
            raise ValueError(f"agg must be one of {list(AGGREGATES)}, got {agg!r}")
        exclude = None
        if exclude_ids is not None:
            exclude = np.asarray(exclude_ids, dtype=np.int64).reshape(-1)
            if len(exclude) != len(x):
                raise ValueError(f"exclude_ids needs one id per query ({len(x)}), got {len(exclude)}")
        return normalize_queries(x), exclude

    def _retrieve_deep(self, xq: np.ndarray, k: int, flt: Filter | np.ndarray | None, strategy: str, grouped: bool,
                       exclude: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, str, int]:  # fmt: skip
        """Candidates for re-ranking or grouping: the top 10 k items (less the excluded ones); grouped, the queries
        whose candidates hold fewer than k identities are searched again 4x deeper (only those) until they do or
        every passing item was fetched.  D, I are (nq, depth) whatever each search returned (padded -inf / -1)."""
        nb = len(self.columns["id"])
        depth = max(1, min(nb, 10 * k))
        D, I, used, passing = self.retrieve(xq, depth, flt, strategy)
        D, I = drop_ids(D, I, exclude)
        short = np.array([grouped and self._identities(row) < k for row in I], dtype=bool)
        while short.any() and depth < min(passing, nb):
            depth = min(passing, nb, depth * 4)  # deeper than the passing items would only fetch padding
            todo = np.flatnonzero(short)
            # the strategy the first fetch used, so both fetches agree; unfiltered it reports "none", not a strategy
            D2, I2, _, _ = self.retrieve(xq[todo], depth, flt, strategy if flt is None else used)
            D2, I2 = drop_ids(D2, I2, None if exclude is None else exclude[todo])
            D, I = pad_columns(D, I, depth)
            D[todo], I[todo] = D2, I2
            short[todo] = [self._identities(row) < k for row in I2]
        return D, I, used, passing

    def _soft(self, pairs: list[tuple[float, int]], probe: np.ndarray, w: float) -> dict[int, float]:
        """Combined score per gallery row: (1 - w) * identity score + w * attribute agreement."""
        if not pairs:
            return {}
        rows = np.array([r for _, r in pairs], np.int64)
        gallery = np.stack([self.columns[a][rows] for a in self.attribute_names], axis=1)
        out = {}
        for j, (s, r) in enumerate(pairs):
            diff = gallery[j] - probe  # agreement: cos(pi (p - q) / 2), the harness's soft score (megaface_soft)
            agree = float(np.nanmean(np.cos(np.pi / 2 * diff))) if np.isfinite(diff).any() else 0.5
            out[r] = (1 - w) * s + w * agree
        return out

    def _identity_key(self, row: int) -> Any:
        """What groups items: the identity, or the item itself when it has none."""
        ident = self.columns["identity"][row]
        return ("<no identity>", row) if ident is None else ident

    def _identities(self, ids: np.ndarray) -> int:
        return len({self._identity_key(self._row_of[int(i)]) for i in ids if i >= 0})

    def _group(
        self, pairs: list[tuple[float, int]], k: int, agg: str, rank: dict[int, float] | None = None
    ) -> list[Hit]:
        """Top-k identities of ranked (score, row) pairs: the first item of each identity represents it."""
        groups: dict[Any, list[tuple[float, int]]] = {}
        for s, r in pairs:
            groups.setdefault(self._identity_key(r), []).append((s, r))
        pick = max if agg == "max" else (lambda v: float(np.mean(v)))
        hits = []
        for members in groups.values():
            score = pick([s for s, _ in members])
            rank_score = None if rank is None else pick([rank[r] for _, r in members])
            hits.append(self._hit(members[0][1], score, len(members), rank_score))
        hits.sort(key=lambda h: (-(h.score if h.rank_score is None else h.rank_score), h.id))
        return hits[:k]


__all__ = [
    "AGGREGATES",
    "STRATEGIES",
    "Hit",
    "QueryResult",
    "SearchEngine",
    "UnknownIdError",
    "format_results",
]
