"""CLI subcommands: one module each, with ``register(subparsers)`` (see ``drdpo_theory.cli``)."""
