r"""Transparent, offline reward objectives for the preference-shift experiment.

Every objective maps a completion (a string) to a number in [0, 1] and is computed from a
lexicon shipped inside a PyPI package, with no download (no NLTK data, no network): the VADER
lexicon (Hutto & Gilbert 2014) that ``vaderSentiment`` ships as ``vader_lexicon.txt`` (read by
its analyzer at construction), and the NRC emotion lexicon (Mohammad & Turney 2013) that
``nrclex`` ships as ``nrclex/data/nrc_en.json``, read here directly (nrclex's own text path,
``load_raw_text``, needs TextBlob corpora, which are not installed).

Objectives (:data:`OBJECTIVES`)
-------------------------------
``positivity``
    :math:`r_{pos}(y) = (c(y) + 1)/2` with :math:`c` VADER's compound score,
    :math:`c = S/\sqrt{S^2 + 15}` for the sum S of the (rule-adjusted) lexicon valences.
``calm``
    :math:`r_{calm}(y) = \mathrm{neu}(y)`, VADER's neutral share: the fraction of the text's
    sentiment mass carried by words without valence (1 for text with no emotional word;
    0 for empty text, VADER's convention).
    Positive wording lowers it, so positivity and calm conflict; negative wording lowers
    both, so the conflict is partial.
``brevity``
    :math:`r_{brev}(y) = \max(0, 1 - w(y)/W)` with :math:`w` the number of
    whitespace-separated words and :math:`W` = :data:`BREVITY_WORDS`.
``anger``, ``anticipation``, ``disgust``, ``fear``, ``joy``, ``sadness``, ``surprise``, ``trust``
    NRC emotion shares (:func:`nrc_share`): with :math:`n_c(y)` the number of words of
    :math:`y` (lower-cased runs of letters, apostrophes inside a word kept; no lemmatisation:
    the lexicon lists inflected forms) that the lexicon tags with category c, over its ten
    categories (the eight emotions plus ``positive`` and ``negative``),

    .. math:: r_e(y) = n_e(y) \,/\, \textstyle\sum_c n_c(y), \qquad 0 \text{ when no word is tagged}.

    This is nrclex's ``affect_frequencies`` on our tokenisation: the lexicon's distribution over
    affect categories, the counterpart of an emotion classifier's class probabilities (the
    paper's emotion rewards). The raw rate per word, :func:`nrc_rate`
    (:math:`n_e(y)/w(y)`), is also provided; on the 384 SmolLM2-135M-Instruct samples of the
    VADER run its joy and anger rates are uncorrelated (Pearson -0.02: most completions hold
    no tagged word and both rates are 0), while the shares are negatively correlated (-0.18):
    affect words compete for the same mass. Hence the ``emotion`` preset
    (:data:`REWARD_PRESETS`) pairs the joy and anger shares.

Mixture and normalisation
-------------------------
For two objectives :math:`r_1, r_2` and a mixture weight :math:`\alpha \in [0, 1]` the
reward is

.. math:: r_\alpha(y) = \alpha\, z_1(y) + (1 - \alpha)\, z_2(y), \qquad
          z_j(y) = (r_j(y) - m_j)/s_j,

with :math:`m_j, s_j` the mean and standard deviation of :math:`r_j` over a reference pool
(the pipeline uses the completions sampled from the initial policy on the train prompts),
so that one unit of :math:`\alpha` trades one standard deviation of one objective for one
of the other (:class:`Normalizer`).
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

__all__ = [
    "BREVITY_WORDS",
    "NRC_CATEGORIES",
    "NRC_EMOTIONS",
    "OBJECTIVES",
    "REWARD_PRESETS",
    "Normalizer",
    "brevity",
    "calm",
    "mixture_reward",
    "nrc_counts",
    "nrc_lexicon",
    "nrc_rate",
    "nrc_share",
    "objective_correlation",
    "positivity",
    "score_texts",
    "vader_analyzer",
    "vader_lexicon",
]

BREVITY_WORDS = 30
"""Word count W at which the brevity reward reaches 0."""


@lru_cache(maxsize=1)
def vader_analyzer():
    """The (cached) ``vaderSentiment.SentimentIntensityAnalyzer``, built from the shipped lexicon."""
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError as exc:  # pragma: no cover - the llm extra installs it
        raise ImportError("the shift rewards need the PyPI package 'vaderSentiment' (pip install vaderSentiment)") from exc
    return SentimentIntensityAnalyzer()


def vader_lexicon() -> Mapping[str, float]:
    """VADER's word -> mean valence table (in [-4, 4]) as read from ``vader_lexicon.txt``."""
    return vader_analyzer().lexicon


def positivity(text: str) -> float:
    """``(compound + 1) / 2`` in [0, 1] (0.5 for text without valence).

    VADER rounds ``compound`` to 4 decimals, so values are multiples of 5e-5.
    """
    return (float(vader_analyzer().polarity_scores(text)["compound"]) + 1.0) / 2.0


def calm(text: str) -> float:
    """VADER's neutral share ``neu`` in [0, 1] (1 for text without valence; 0 for empty text)."""
    return float(vader_analyzer().polarity_scores(text)["neu"])


def brevity(text: str, max_words: int = BREVITY_WORDS) -> float:
    """``max(0, 1 - words / max_words)`` in [0, 1]; 1 for empty text."""
    if max_words < 1:
        raise ValueError(f"max_words must be >= 1; got {max_words}")
    return max(0.0, 1.0 - len(text.split()) / max_words)


NRC_EMOTIONS = ("anger", "anticipation", "disgust", "fear", "joy", "sadness", "surprise", "trust")
"""Plutchik's eight emotions of the NRC lexicon."""
NRC_CATEGORIES = NRC_EMOTIONS + ("negative", "positive")
"""All ten NRC categories (the emotions and the two sentiments): the denominator of :func:`nrc_share`."""

_WORD = re.compile(r"[a-z]+(?:'[a-z]+)*")


@lru_cache(maxsize=1)
def nrc_lexicon() -> Mapping[str, frozenset[str]]:
    """word -> NRC categories, read from ``nrc_en.json`` inside the installed ``nrclex`` package.

    The file is located with ``importlib.util.find_spec`` and parsed as JSON; no nrclex code runs.
    """
    spec = importlib.util.find_spec("nrclex")
    if spec is None or spec.origin is None:  # pragma: no cover - the llm extra installs it
        raise ImportError("the emotion rewards need the PyPI package 'nrclex' (pip install nrclex==4.1.0 --no-deps)")
    path = Path(spec.origin).parent / "data" / "nrc_en.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    return {str(w).lower(): frozenset(cats) for w, cats in data.items()}


def nrc_counts(text: str) -> tuple[int, dict[str, int]]:
    """``(words, {category: tagged words})`` of ``text`` (all ten categories present, 0 if none).

    Words are the lower-cased runs of letters (``don't`` is one word); a word tagged with k
    categories counts once in each of them.
    """
    lex = nrc_lexicon()
    words = _WORD.findall(text.lower())
    counts = {c: 0 for c in NRC_CATEGORIES}
    for w in words:
        for c in lex.get(w, ()):
            counts[c] += 1
    return len(words), counts


def nrc_share(text: str, emotion: str) -> float:
    """Tagged words of ``emotion`` over tagged words of all ten categories, in [0, 1] (0 without tagged words)."""
    if emotion not in NRC_CATEGORIES:
        raise ValueError(f"unknown NRC category {emotion!r}; choose from {NRC_CATEGORIES}")
    _, counts = nrc_counts(text)
    total = sum(counts.values())
    return counts[emotion] / total if total else 0.0


def nrc_rate(text: str, emotion: str) -> float:
    """Tagged words of ``emotion`` per word of the text, in [0, 1] (0 for text without words)."""
    if emotion not in NRC_CATEGORIES:
        raise ValueError(f"unknown NRC category {emotion!r}; choose from {NRC_CATEGORIES}")
    n, counts = nrc_counts(text)
    return counts[emotion] / n if n else 0.0


def _share(emotion: str) -> Callable[[str], float]:
    def f(text: str) -> float:
        return nrc_share(text, emotion)

    f.__name__ = emotion
    f.__doc__ = f"NRC share of {emotion} (:func:`nrc_share`)."
    return f


VADER_OBJECTIVES = ("positivity", "calm", "brevity")
"""The VADER-lexicon objectives (and brevity): scored for every sample whatever the preset."""

OBJECTIVES: dict[str, Callable[[str], float]] = {
    "positivity": positivity, "calm": calm, "brevity": brevity, **{e: _share(e) for e in NRC_EMOTIONS},
}
"""Objective name -> function ``str -> [0, 1]``."""

REWARD_PRESETS: dict[str, tuple[str, str]] = {"vader": ("positivity", "calm"), "emotion": ("joy", "anger")}
"""``drdpo llm-shift --preset``: the objective pair (r_1, r_2). ``vader`` is the original experiment
(positivity vs calm); ``emotion`` the NRC joy and anger shares. On the 384 train-pool completions of
SmolLM2-135M-Instruct (the committed VADER run) their Pearson correlations are -0.52 and -0.18, and
on the top-vs-bottom pairs built from that pool at alpha0 = 0.5 (95 and 91 pairs) the two objectives
rank the answers strictly oppositely in 52% and 3% of the pairs (anger words are rare: 19% of the
completions hold one, so 78% of the joy/anger pairs tie on anger); docs/llm_shift.md."""


def objective_correlation(raw: np.ndarray) -> float | None:
    """Pearson correlation of the two columns of ``raw`` (n, 2); None when a column is constant or n < 2."""
    raw = np.asarray(raw, dtype=np.float64)
    if raw.ndim != 2 or raw.shape[1] != 2:
        raise ValueError(f"expected raw scores of shape (n, 2); got {raw.shape}")
    if raw.shape[0] < 2 or np.any(raw.std(axis=0) < 1e-12):
        return None
    return float(np.corrcoef(raw[:, 0], raw[:, 1])[0, 1])


def score_texts(texts: Sequence[str], objectives: Sequence[str]) -> np.ndarray:
    """Raw objective values.

    Parameters
    ----------
    texts : sequence of str, length n
    objectives : sequence of str, length J
        Names from :data:`OBJECTIVES`.

    Returns
    -------
    numpy.ndarray, shape (n, J)
    """
    unknown = [o for o in objectives if o not in OBJECTIVES]
    if unknown:
        raise ValueError(f"unknown objective(s) {unknown}; choose from {sorted(OBJECTIVES)}")
    out = np.empty((len(texts), len(objectives)), dtype=np.float64)
    for i, t in enumerate(texts):
        for j, o in enumerate(objectives):
            out[i, j] = OBJECTIVES[o](t)
    return out


@dataclass(frozen=True)
class Normalizer:
    """Per-objective affine standardisation ``z = (r - mean) / std``.

    Attributes
    ----------
    mean, std : tuple of float, length J
        Fitted on a reference pool (:meth:`fit`); a ``std`` below ``1e-6`` (a constant
        objective on the pool) is replaced by 1, i.e. the objective is only centred.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def fit(cls, raw: np.ndarray) -> "Normalizer":
        """Fit on raw scores of shape (n, J), n >= 1 (population standard deviation)."""
        raw = np.asarray(raw, dtype=np.float64)
        if raw.ndim != 2 or raw.shape[0] < 1:
            raise ValueError(f"expected raw scores of shape (n >= 1, J); got {raw.shape}")
        std = raw.std(axis=0)
        std = np.where(std < 1e-6, 1.0, std)
        return cls(tuple(float(m) for m in raw.mean(axis=0)), tuple(float(s) for s in std))

    def __call__(self, raw: np.ndarray) -> np.ndarray:
        """Standardised scores, same shape as ``raw`` (n, J)."""
        raw = np.asarray(raw, dtype=np.float64)
        return (raw - np.asarray(self.mean)) / np.asarray(self.std)

    def to_json(self) -> dict[str, list[float]]:
        return {"mean": list(self.mean), "std": list(self.std)}


def mixture_reward(z: np.ndarray, alpha: float | np.ndarray) -> np.ndarray:
    r"""Mixture reward :math:`r_\alpha = \alpha z_1 + (1-\alpha) z_2`.

    Parameters
    ----------
    z : numpy.ndarray, shape (n, 2)
        (Normalised) scores of the two objectives.
    alpha : float or numpy.ndarray of shape (A,)
        Mixture weight(s) in [0, 1].

    Returns
    -------
    numpy.ndarray
        Shape (n,) for a scalar ``alpha``, (n, A) for an array.
    """
    z = np.asarray(z, dtype=np.float64)
    if z.ndim != 2 or z.shape[1] != 2:
        raise ValueError(f"expected scores of shape (n, 2); got {z.shape}")
    a = np.asarray(alpha, dtype=np.float64)
    if np.any(~np.isfinite(a)) or np.any(a < 0) or np.any(a > 1):
        raise ValueError(f"alpha must lie in [0, 1]; got {alpha!r}")
    if a.ndim == 0:
        return float(a) * z[:, 0] + (1.0 - float(a)) * z[:, 1]
    return z[:, :1] * a[None, :] + z[:, 1:2] * (1.0 - a[None, :])


def _compound(total: float, alpha: float = 15.0) -> float:
    """VADER's normalisation S / sqrt(S^2 + alpha) (used by the tests as the closed form)."""
    return total / math.sqrt(total * total + alpha)
