"""``drdpo align``: train a Hugging Face causal LM with DPO / KLDPO / WDPO (torch backend).

The parser and runner live in :mod:`drdpo_theory.llm.cli` (torch is imported only when the
command runs).
"""

from __future__ import annotations


def register(sub) -> None:
    from ..llm.cli import register as register_align

    register_align(sub)
