"""Torch backend for distributionally robust DPO on causal language models.

Modules (import them explicitly; this package ``__init__`` imports nothing heavy, so
``import drdpo_theory.llm`` works without torch or transformers):

``losses``      per-pair DPO / IPO losses on sequence log-probs and the KLDPO weights
``logprobs``    per-sequence log-probabilities of answer tokens (one forward)
``objectives``  :class:`LossConfig`, :func:`preference_loss` (DPO, IPO, KLDPO, WDPO) and
                :func:`preference_backward` (its gradient; WDPO finite-diff in two passes)
``attention``   switching a model to twice-differentiable (eager) attention for WDPO
``distributed`` the ``torch.distributed`` helpers the losses need

Nothing here imports :mod:`drdpo_theory.solvers` (README.md, "Layout": dependencies point one way).
"""

__all__ = ["losses", "logprobs", "objectives", "attention", "distributed"]
