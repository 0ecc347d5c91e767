"""Synthetic people: stable shape and texture parameters, and the paper's seven attributes as their visible traits.

An :class:`Identity` is drawn deterministically from (seed, population, index).  Its 0/1 attribute labels follow
realistic base rates (with CelebA-like dependencies: Big_Nose is commoner in men, Double_Chin mostly comes with Chubby)
and each label drives continuous traits with mild noise, so the classes are learnable but overlap in their tails.
What they look like (drawn by :mod:`facesearch.model.faces.synth_render`, sized to stay visible in the attribute
predictors' margin crop):

- Male: a wider face, squarer jaw, heavier and flatter brows, short or receding hair, often stubble; no make-up.
- Big_Nose: wider alae and nostrils (``nose_w`` about +45 %) and a longer nose (tip and mouth lower).
- Pointy_Nose (``nose_point``): a narrow tip hanging below the nostrils in a V, under a lit ridge down the nose;
  otherwise a broad, shiny, round bulb.
- Narrow_Eyes (``eye_ap``): the lids about half as far apart.
- Chubby (``fullness``, plus face and jaw width): a rounder, wider lower face with lighter cheek pads beside the mouth,
  a jowl crease under each, a slightly lower chin and a wider neck.
- Double_Chin (``double_chin``): a second chin: a fold of skin hanging below the chin with a dark crease between the
  two and a shadow under it on the neck.
- High_Cheekbones (``cheek_bone``): a face wider at the cheekbones and hollow below them, a highlight along each
  cheekbone over a contour shadow from in front of the ear towards the mouth corner; otherwise flat cheeks with a
  low, rosy blush.

Besides the binary labels, ``hair_colour`` is a categorical trait (an index into :data:`HAIR_COLOURS`): the palette
row the hair colour was drawn from, stable per identity like the labels, for training multi-task networks on
categorical as well as binary attributes.  It is read off the draw that already picks the colour (no extra random
numbers), so every other trait and every rendered image is as before.

Units are face units (mean inter-ocular distance = 1); see :mod:`facesearch.model.faces.synth_render`.

Also here: the made-up names of FaceScrub-style probes and the Flickr-style paths of MegaFace-style distractors.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from facesearch.model.config import ATTRIBUTES

__all__ = [
    "ATTRIBUTE_BASE_RATES",
    "HAIR_COLOURS",
    "Colour",
    "Identity",
    "flickr_paths",
    "person_names",
    "sample_identity",
]

Colour = tuple[float, float, float]  # BGR, 0..255

_SYLLABLES = tuple(
    "ka lo mi ra ten vor shi an bel dor el fin gar hal is jo ker lin mar nor ol pen ros sa tor ul ven".split()
)
_P_MALE = 0.45
#: P(label = 1) for (male, female); Double_Chin is conditioned on Chubby instead: (chubby, not chubby).
_RATES: dict[str, tuple[float, float]] = {
    "Narrow_Eyes": (0.15, 0.15),
    "Big_Nose": (0.33, 0.18),
    "Pointy_Nose": (0.22, 0.33),
    "Chubby": (0.15, 0.09),
    "Double_Chin": (0.50, 0.05),
    "High_Cheekbones": (0.35, 0.55),
}
_SKINS = np.array([(188, 204, 236), (150, 176, 220), (122, 156, 198), (98, 132, 178), (72, 102, 150), (48, 68, 104)])
_SKIN_P = (0.25, 0.22, 0.18, 0.15, 0.12, 0.08)
_HAIRS = np.array([(25, 25, 30), (30, 45, 70), (45, 75, 115), (115, 175, 215), (40, 70, 160), (150, 150, 155)])
_HAIR_P = (0.35, 0.25, 0.17, 0.12, 0.04, 0.07)
#: Names of the rows of the hair palette, in order: ``Identity.hair_colour`` indexes this tuple.
HAIR_COLOURS: tuple[str, ...] = ("black", "dark_brown", "brown", "blond", "auburn", "grey")
_IRISES = np.array([(30, 50, 90), (25, 30, 40), (160, 120, 80), (90, 130, 90), (60, 100, 120)])
_IRIS_P = (0.35, 0.25, 0.18, 0.10, 0.12)


def _base_rates() -> dict[str, float]:
    rates = {n: _P_MALE * m + (1.0 - _P_MALE) * f for n, (m, f) in _RATES.items()}
    on, off = _RATES["Double_Chin"]
    rates["Double_Chin"] = rates["Chubby"] * on + (1.0 - rates["Chubby"]) * off
    rates["Male"] = _P_MALE
    return {n: round(rates[n], 4) for n in ATTRIBUTES}


#: Expected fraction of identities with each attribute (the marginals of the sampling model above).
ATTRIBUTE_BASE_RATES: dict[str, float] = _base_rates()


@dataclass(frozen=True)
class Identity:
    """Stable shape and texture of one synthetic person, in face units (see the module docstring)."""

    labels: tuple[int, ...]  # 0/1 per name in facesearch.model.config.ATTRIBUTES
    face_w: float  # half-width at the cheekbones
    face_top: float  # forehead height above the eye line
    chin_y: float
    jaw_w: float  # jaw width as a fraction of face_w
    jaw_sq: float  # superellipse exponent of the jaw (2 = round, larger = square)
    cheek_bone: float  # 0..1: outline bump and hollow, cheekbone highlight and contour shadow (High_Cheekbones)
    fullness: float  # 0..1: lower-cheek fullness, cheek pads and jowl creases (Chubby)
    double_chin: float  # < 0.15 none, ~1 a full second chin: fold, crease and shadow (Double_Chin)
    skin: Colour
    hair: Colour
    hair_colour: int  # index into HAIR_COLOURS: the palette row ``hair`` was drawn around (a categorical trait)
    hair_style: int  # 0 short, 1 long, 2 receding
    hairline: float
    brow_th: float
    brow_arch: float
    brow_y: float
    eye_e: float  # half the inter-ocular distance
    eye_w: float  # half the eye width
    eye_ap: float  # eye aperture / width (Narrow_Eyes)
    eye_tilt: float
    iris: Colour
    makeup: float
    nose_y: float  # nose tip height (longer with Big_Nose)
    nose_w: float  # half alar width (Big_Nose)
    nose_point: float  # 0 round shiny bulb .. 1 narrow point hanging in a V under a lit ridge (Pointy_Nose)
    mouth_y: float
    mouth_w: float
    lip_up: float
    lip_lo: float
    lip: Colour
    stubble: float  # 0 clean .. 1 dense (male texture)
    ear: float
    moles: tuple[tuple[float, float, float], ...]  # (x / face_w, y, radius)

    def label(self, name: str) -> int:
        return self.labels[ATTRIBUTES.index(name)]


def _labels(u: np.ndarray, overrides: Mapping[str, int] | None) -> dict[str, int]:
    ov = dict(overrides or {})
    bad = {k: v for k, v in ov.items() if k not in ATTRIBUTES or v not in (0, 1)}
    if bad:
        raise ValueError(f"overrides must map attribute names {list(ATTRIBUTES)} to 0 or 1, got {bad}")
    lab: dict[str, int] = {}

    def draw(name: str, p: float) -> None:
        lab[name] = int(ov.get(name, int(u[ATTRIBUTES.index(name)] < p)))

    draw("Male", _P_MALE)
    for name in ("Narrow_Eyes", "Big_Nose", "Pointy_Nose", "Chubby", "High_Cheekbones"):
        draw(name, _RATES[name][1 - lab["Male"]])
    draw("Double_Chin", _RATES["Double_Chin"][1 - lab["Chubby"]])
    return lab


def _pick_index(table: np.ndarray, probs: tuple[float, ...], u: float) -> int:
    """The row of ``table`` that the uniform draw ``u`` picks with row probabilities ``probs``."""
    return min(int(np.searchsorted(np.cumsum(probs), u)), len(table) - 1)


def _pick(table: np.ndarray, probs: tuple[float, ...], u: float) -> np.ndarray:
    return table[_pick_index(table, probs, u)].astype(np.float64)


def _clip(v: float, lo: float, hi: float) -> float:
    return min(hi, max(lo, float(v)))


def _trait(label: int, z: float, on: float, off: float, sd: float) -> float:
    """A continuous trait in [0, 1] driven by a 0/1 label: the classes overlap only in the tails."""
    return _clip((on if label else off) + sd * z, 0.0, 1.0)


def _col(c: np.ndarray) -> Colour:
    return (_clip(c[0], 0.0, 255.0), _clip(c[1], 0.0, 255.0), _clip(c[2], 0.0, 255.0))


def sample_identity(seed: int, population: int, index: int, overrides: Mapping[str, int] | None = None) -> Identity:
    """The stable parameters of person ``index`` of ``population`` (one code per data set, so people are disjoint).

    Labels are drawn first (``overrides`` may force some, e.g. ``{"Big_Nose": 1}``); every continuous trait comes from a
    fixed stream afterwards, so forcing one label changes only the traits that label drives.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, population, index, 0x1D]))
    lab = _labels(rng.random(len(ATTRIBUTES)), overrides)
    z, u = rng.standard_normal(30).tolist(), rng.random(12).tolist()  # Python floats: scalar maths is faster
    moles = rng.uniform((-0.7, -0.5, 0.02), (0.7, 1.4, 0.04), size=(3, 3))
    m, big, chubby, dc = lab["Male"], lab["Big_Nose"], lab["Chubby"], lab["Double_Chin"]
    skin = _pick(_SKINS, _SKIN_P, u[0]) * (1.0 + 0.04 * np.array(z[9:12])) * (1.0 - 0.04 * m)
    style = (0 if u[2] < 0.82 else 2 if u[2] < 0.92 else 1) if m else (1 if u[2] < 0.78 else 0)
    nose_y = 0.6 + 0.035 * z[20] + 0.07 * big
    hair_colour = _pick_index(_HAIRS, _HAIR_P, u[1])
    return Identity(
        labels=tuple(lab[a] for a in ATTRIBUTES),
        face_w=1.02 + 0.045 * z[0] + 0.03 * m + chubby * (0.12 + 0.03 * z[1]),
        face_top=1.18 + 0.06 * z[2],
        chin_y=1.62 + 0.06 * z[3] + 0.05 * m + 0.04 * chubby,
        jaw_w=_clip(0.72 + 0.04 * z[4] + 0.1 * m + 0.1 * chubby, 0.6, 0.95),
        jaw_sq=max(1.6, 2.0 + 0.25 * z[5] + 0.9 * m),
        cheek_bone=_trait(lab["High_Cheekbones"], z[6], 0.75, 0.15, 0.13),
        fullness=_trait(chubby, z[7], 0.8, 0.15, 0.12),
        double_chin=_clip(0.85 + 0.15 * z[8], 0.5, 1.2) if dc else _clip(0.1 * z[8], 0.0, 0.3),
        skin=_col(skin),
        hair=_col(_HAIRS[hair_colour].astype(np.float64) * (1.0 + 0.05 * z[12])),
        hair_colour=hair_colour,
        hair_style=style,
        hairline=-1.1 if style == 2 else -0.78 + 0.07 * z[13],
        brow_th=max(0.035, 0.065 + 0.045 * m + 0.012 * z[14]),
        brow_arch=0.09 - 0.04 * m + 0.025 * z[15],
        brow_y=-0.33 + 0.04 * m + 0.03 * z[16],
        eye_e=0.5 + 0.022 * z[17],
        eye_w=0.19 + 0.014 * z[18],
        eye_ap=_clip(0.26 + 0.035 * z[19] if lab["Narrow_Eyes"] else 0.5 + 0.05 * z[19], 0.16, 0.7),
        eye_tilt=0.06 * z[21],
        iris=_col(_pick(_IRISES, _IRIS_P, u[3])),
        makeup=(1 - m) * float(u[4] < 0.5) * (0.5 + 0.5 * float(u[5])),
        nose_y=nose_y,
        nose_w=0.165 + 0.012 * z[22] + big * (0.075 + 0.012 * z[23]),
        nose_point=_trait(lab["Pointy_Nose"], z[24], 0.8, 0.2, 0.12),
        mouth_y=nose_y + 0.45 + 0.04 * z[25],
        mouth_w=0.34 + 0.03 * z[26] + 0.02 * m,
        lip_up=0.055 + 0.01 * z[27] - 0.01 * m,
        lip_lo=0.085 + 0.012 * z[28] - 0.012 * m,
        lip=_col(skin + (np.array((95.0, 85.0, 190.0)) - skin) * (0.35 + 0.3 * (1 - m) * float(u[6]))),
        stubble=m * float(u[7] > 0.35) * (0.4 + 0.6 * float(u[8])),
        ear=1.0 + 0.08 * z[29],
        moles=tuple((float(x), float(y), float(r)) for x, y, r in moles[: int(u[9] * 3.5)]),
    )


def person_names(rng: np.random.Generator, n: int) -> list[str]:
    """``n`` unique made-up ``First_Last`` names built from syllables."""

    def word() -> str:
        return "".join(rng.choice(_SYLLABLES, size=int(rng.integers(2, 4)))).capitalize()

    names: list[str] = []
    while len(names) < n:
        name = f"{word()}_{word()}"
        if name not in names:
            names.append(name)
    return names


def flickr_paths(rng: np.random.Generator, n: int) -> list[str]:
    """``<3 digits>/<user>@N00/<photo>_<face>.jpg``: one image of each of ``n`` distinct Flickr-style users."""
    users = rng.choice(90_000_000, size=n, replace=False) + 10_000_000
    photos = rng.integers(1_000_000_000, 10_000_000_000, size=n)
    faces = np.where(rng.random(n) < 0.8, 0, rng.integers(1, 3, size=n))
    return [f"{str(u)[:3]}/{u}@N00/{p}_{f}.jpg" for u, p, f in zip(users, photos, faces, strict=True)]
