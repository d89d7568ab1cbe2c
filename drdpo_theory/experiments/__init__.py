"""Experiments: grids of exact solves turned into tidy pandas tables (sweep engine and studies)."""
