"""Shared fixtures for the theory-side tests (numpy/cvxpy only)."""

import pytest

from drdpo_theory.model import make_model


@pytest.fixture
def small_model():
    return make_model(n_prompts=3, n_answers=3, d=3, beta=1.0, radius=2.0, seed=7)
