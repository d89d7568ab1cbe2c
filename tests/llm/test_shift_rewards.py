"""Reward objectives of the preference-shift experiment, on hand-written sentences.

Expected values are derived from the lexicon entries themselves (VADER's compound score is
S / sqrt(S^2 + 15) for the summed valence S, rounded to 4 decimals; NRC shares are hand counts
of the tagged words, whose tags the tests first check in the lexicon), not copied from a run.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from numpy.testing import assert_allclose

pytest.importorskip("vaderSentiment")

from drdpo_theory.llm.shift import prompts as P  # noqa: E402
from drdpo_theory.llm.shift import rewards as R  # noqa: E402

pytestmark = pytest.mark.llm

ATOL = 1e-12
VADER_ROUND = 5e-5  # compound is rounded to 4 decimals


def _compound(total: float) -> float:
    return total / math.sqrt(total * total + 15.0)


def test_lexicon_is_the_shipped_file_and_needs_no_download():
    lex = R.vader_lexicon()
    assert len(lex) > 7000
    assert lex["good"] == 1.9 and lex["love"] == 3.2 and lex["terrible"] == -2.1
    assert "sky" not in lex and "blue" not in lex


@pytest.mark.parametrize("word", ["good", "love", "wonderful", "terrible", "sad"])
def test_positivity_of_a_single_word_is_the_closed_form(word):
    v = R.vader_lexicon()[word]
    assert_allclose(R.positivity(word), (_compound(v) + 1) / 2, atol=VADER_ROUND / 2 + ATOL)
    # one valenced word, nothing else: all sentiment mass is on it
    assert R.calm(word) == 0.0


def test_neutral_sentence():
    s = "The sky is blue."
    assert R.positivity(s) == 0.5
    assert R.calm(s) == 1.0


def test_two_words_add_valence():
    v = R.vader_lexicon()["good"]
    assert_allclose(R.positivity("good good"), (_compound(2 * v) + 1) / 2, atol=VADER_ROUND / 2 + ATOL)


def test_negation_flips_and_damps_valence():
    # VADER multiplies the valence of a negated word by -0.74
    v = R.vader_lexicon()["good"]
    assert_allclose(R.positivity("not good"), (_compound(-0.74 * v) + 1) / 2, atol=VADER_ROUND / 2 + ATOL)
    assert R.positivity("not good") < 0.5 < R.positivity("good")


def test_orderings_on_hand_written_sentences():
    joyful = "I love this wonderful sunny day, it is amazing!"
    mild = "The day is nice."
    plain = "The train leaves at nine from platform two."
    grim = "This is a terrible, awful day and I hate it."
    pos = [R.positivity(s) for s in (joyful, mild, plain, grim)]
    assert pos[0] > pos[1] > pos[2] > pos[3]
    cal = {s: R.calm(s) for s in (joyful, mild, plain, grim)}
    assert cal[plain] == 1.0
    assert cal[plain] > cal[mild] > cal[joyful]  # positivity and calm conflict on positive text
    assert cal[grim] < 1.0  # ... and agree against negative text (partial conflict)


def test_brevity():
    assert R.brevity("") == 1.0
    assert_allclose(R.brevity("one two three"), 1 - 3 / R.BREVITY_WORDS, atol=ATOL)
    assert R.brevity(" ".join(["w"] * (R.BREVITY_WORDS + 5))) == 0.0
    with pytest.raises(ValueError):
        R.brevity("x", max_words=0)


def test_score_texts_shape_and_unknown_objective():
    s = R.score_texts(["good", "The sky is blue."], ["positivity", "calm", "brevity"])
    assert s.shape == (2, 3)
    assert_allclose(s[1], [0.5, 1.0, 1 - 4 / R.BREVITY_WORDS], atol=ATOL)
    with pytest.raises(ValueError, match="unknown objective"):
        R.score_texts(["x"], ["happiness"])


def test_normalizer_standardises_and_handles_constant_objective():
    raw = np.array([[0.2, 1.0], [0.4, 1.0], [0.9, 1.0]])
    n = R.Normalizer.fit(raw)
    z = n(raw)
    assert_allclose(z[:, 0].mean(), 0.0, atol=ATOL)
    assert_allclose(z[:, 0].std(), 1.0, atol=1e-12)
    assert n.std[1] == 1.0  # constant objective: centred only
    assert_allclose(z[:, 1], 0.0, atol=ATOL)


def test_mixture_reward_endpoints_and_linearity():
    z = np.array([[1.0, -2.0], [0.5, 0.5], [-1.0, 3.0]])
    assert_allclose(R.mixture_reward(z, 1.0), z[:, 0], atol=ATOL)
    assert_allclose(R.mixture_reward(z, 0.0), z[:, 1], atol=ATOL)
    assert_allclose(R.mixture_reward(z, 0.25), 0.25 * z[:, 0] + 0.75 * z[:, 1], atol=ATOL)
    grid = R.mixture_reward(z, np.array([0.0, 0.25, 1.0]))
    assert grid.shape == (3, 3)
    assert_allclose(grid[:, 1], R.mixture_reward(z, 0.25), atol=ATOL)
    with pytest.raises(ValueError, match="alpha"):
        R.mixture_reward(z, 1.5)


def test_best_answer_depends_on_alpha():
    texts = ["I love this wonderful sunny day, it is amazing!", "The train leaves at nine from platform two."]
    raw = R.score_texts(texts, ["positivity", "calm"])
    r1, r0 = R.mixture_reward(raw, 1.0), R.mixture_reward(raw, 0.0)
    assert np.argmax(r1) == 0 and np.argmax(r0) == 1


def test_shipped_prompt_set_matches_its_builder():
    shipped = json.loads(P.prompt_set_path().read_text(encoding="utf-8"))
    assert shipped == P.build_prompt_set()
    assert shipped["version"] == P.PROMPT_SET_VERSION
    train, test = P.load_prompts("train"), P.load_prompts("test")
    assert len(train) == 200 and len(test) == 100
    assert not {p.id for p in train} & {p.id for p in test}
    assert len({p.text for p in train + test}) == 300
    assert [p.id for p in P.load_prompts("test", 5)] == [p.id for p in test[:5]]
    with pytest.raises(ValueError):
        P.load_prompts("dev")


# --------------------------------------------------------------------------- NRC emotion lexicon

# the tags of the words the sentences below use, as listed in nrclex's nrc_en.json
TAGS = {
    "love": {"joy", "positive"},
    "happy": {"anticipation", "joy", "positive", "trust"},
    "sunny": {"anticipation", "joy", "positive", "surprise"},
    "angry": {"anger", "disgust", "negative"},
    "fight": {"anger", "fear", "negative"},
    "storm": {"anger", "negative"},
    "hate": {"anger", "disgust", "fear", "negative", "sadness"},
    "joy": {"joy", "positive"},
    "friend": {"joy", "positive", "trust"},
}
UNTAGGED = ["i", "this", "day", "the", "man", "will", "and", "weather", "today", "is", "a", "don't", "my"]


def test_nrc_lexicon_is_the_file_shipped_in_nrclex():
    pytest.importorskip("nrclex")
    import importlib.util
    from pathlib import Path

    lex = R.nrc_lexicon()
    path = Path(importlib.util.find_spec("nrclex").origin).parent / "data" / "nrc_en.json"
    assert {w: frozenset(c) for w, c in json.loads(path.read_text(encoding="utf-8")).items()} == dict(lex)
    assert len(lex) == 6468
    for w, tags in TAGS.items():
        assert lex[w] == tags, w
    for w in UNTAGGED:
        assert w not in lex, w
    assert set().union(*lex.values()) == set(R.NRC_CATEGORIES)


def test_nrc_shares_and_rates_equal_hand_counts():
    pytest.importorskip("nrclex")
    # words: i love this happy sunny day -> 6 words; tagged: love, happy, sunny
    s1 = "I love this happy, sunny day!"
    # joy: love, happy, sunny = 3; all tags: 2 + 4 + 4 = 10
    assert_allclose(R.nrc_share(s1, "joy"), 3 / 10, atol=ATOL)
    assert R.nrc_share(s1, "anger") == 0.0
    assert_allclose(R.nrc_share(s1, "anticipation"), 2 / 10, atol=ATOL)
    assert_allclose(R.nrc_rate(s1, "joy"), 3 / 6, atol=ATOL)
    # the angry man will fight the storm: 7 words; tags: angry 3, fight 3, storm 2 = 8
    s2 = "The ANGRY man will fight the storm."
    assert_allclose(R.nrc_share(s2, "anger"), 3 / 8, atol=ATOL)
    assert_allclose(R.nrc_share(s2, "negative"), 3 / 8, atol=ATOL)
    assert_allclose(R.nrc_share(s2, "fear"), 1 / 8, atol=ATOL)
    assert R.nrc_share(s2, "joy") == 0.0
    assert_allclose(R.nrc_rate(s2, "anger"), 3 / 7, atol=ATOL)
    # joy, and, hate, don't (one untagged word), my, friend -> 6 words; tags: joy 2, hate 5, friend 3
    s3 = "Joy and hate, don't my friend"
    n, counts = R.nrc_counts(s3)
    assert n == 6 and counts["joy"] == 2 and counts["anger"] == 1 and counts["trust"] == 1
    assert sum(counts.values()) == 2 + 5 + 3
    assert_allclose(R.nrc_share(s3, "joy"), 2 / 10, atol=ATOL)
    assert_allclose(R.nrc_share(s3, "anger"), 1 / 10, atol=ATOL)
    # no tagged word, and no word at all
    for text in ("The weather today.", "", "42 ... !!"):
        assert R.nrc_share(text, "joy") == R.nrc_rate(text, "joy") == 0.0
    with pytest.raises(ValueError, match="unknown NRC category"):
        R.nrc_share("x", "happiness")
    # the objectives are the shares
    raw = R.score_texts([s1, s2], ["joy", "anger"])
    assert_allclose(raw, [[3 / 10, 0.0], [0.0, 3 / 8]], atol=ATOL)


def test_reward_presets_and_correlation():
    pytest.importorskip("nrclex")
    assert R.REWARD_PRESETS == {"vader": ("positivity", "calm"), "emotion": ("joy", "anger")}
    assert all(o in R.OBJECTIVES for pair in R.REWARD_PRESETS.values() for o in pair)
    rng = np.random.default_rng(0)
    x = rng.normal(size=50)
    raw = np.stack([x, -0.5 * x + rng.normal(size=50)], axis=1)
    xc, yc = raw[:, 0] - raw[:, 0].mean(), raw[:, 1] - raw[:, 1].mean()
    assert_allclose(R.objective_correlation(raw), (xc @ yc) / np.sqrt((xc @ xc) * (yc @ yc)), atol=ATOL)
    assert R.objective_correlation(np.array([[0.1, 0.0], [0.3, 0.0], [0.2, 0.0]])) is None  # constant column
    assert R.objective_correlation(np.array([[0.1, 0.2]])) is None
