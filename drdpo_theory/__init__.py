"""drdpo-theory: distributionally robust DPO (WDPO, KLDPO) — exact theory, approximations, practice.

Reference: Xu, Vemuri, Panaganti, Kalathil, Jain, Ramachandran, "Robust LLM Alignment via
Distributionally Robust Direct Preference Optimization", arXiv 2502.01930 (NeurIPS 2025).
"""

__version__ = "0.1.0"
