"""Preference-shift experiment on a real causal LM (``drdpo llm-shift``).

``prompts``   the shipped, versioned prompt set (train/test split)
``rewards``   transparent VADER-lexicon reward objectives and their mixture r_alpha
``pipeline``  sampling -> scoring -> pairs -> DPO/KLDPO/WDPO training -> evaluation under shift

Import the submodules explicitly; ``pipeline`` imports torch lazily inside :func:`run_shift`.
"""

__all__ = ["prompts", "rewards", "pipeline"]
