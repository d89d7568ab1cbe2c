"""drdpo-theory: distributionally robust DPO (WDPO, KLDPO) — exact theory, approximations, practice.

Reference: Xu, Vemuri, Panaganti, Kalathil, Jain, Ramachandran, "Robust LLM Alignment via
Distributionally Robust Direct Preference Optimization", arXiv 2502.01930 (NeurIPS 2025).

The main API, importable from the package itself::

    from drdpo_theory import PreferenceData, load_npz, make_model, solve
    model = make_model(seed=0)                        # a finite log-linear model
    data = model.nominal().sample(200, seed=1)        # PreferenceData: x (n, d), y (n,)
    res = solve("wdpo", data, beta=1.0, radius=2.0, eps=0.1)
    res.theta, res.objective, res.duality_gap, res.worst_case.masses

Names are loaded on first use (PEP 562), so ``import drdpo_theory`` (and ``drdpo --help``) stays
light and ``import drdpo_theory.llm`` does not pull in the solvers.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

#: public name -> module that defines it
_EXPORTS = {
    "solve": "drdpo_theory.solvers",
    "SolverResult": "drdpo_theory.solvers.result",
    "SolverError": "drdpo_theory.solvers.result",
    "WorstCase": "drdpo_theory.solvers.worst_case",
    "CERTIFIED_GAP": "drdpo_theory.solvers.result",
    "make_model": "drdpo_theory.model",
    "LogLinearModel": "drdpo_theory.model",
    "NominalDistribution": "drdpo_theory.model",
    "PreferenceData": "drdpo_theory.data",
    "DataError": "drdpo_theory.data",
    "load_npz": "drdpo_theory.data",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'drdpo_theory' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # cache: later look-ups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
