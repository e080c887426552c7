"""Subcommands of ``hpft``: each module has ``add_arguments(parser)`` and ``run(args)``."""
