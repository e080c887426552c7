"""Analysis experiments, one module per ``hpft`` subcommand.

Each module defines its config, ``run`` and ``report`` and registers them as
``EXPERIMENT`` (:class:`hpft_jax.experiment.Experiment`); the command table
in :mod:`hpft_jax.cli` names it. Every experiment writes ``config.json``,
``metrics.jsonl``, ``<name>.md`` and ``figures/`` under ``runs/<name>/``.
"""
