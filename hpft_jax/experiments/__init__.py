"""Analysis experiments, one module per ``hpft`` subcommand.

Each module defines ``add_parser(subparsers)`` that registers its subcommand
(with ``set_defaults(fn=...)``) and keeps heavy imports inside functions, so
``hpft --help`` stays fast. Every experiment writes ``config.json``,
``metrics.jsonl`` and ``figures/`` under ``runs/<name>/`` (see
:class:`hpft_jax.runlog.RunDir`).
"""

import importlib
import importlib.util

MODULES = (
    "exchange",  # head-exchange matrix (Fig. 3, right)
    "drift",  # eNTK drift during FT (App. A, Fig. 6)
    "eq2",  # one-step decomposition check (Eq. 2)
    "prop1",  # Prop. 1 bound against AIE
    "tricks",  # MLP head, lsHP cases, partial backbone (Tables 2, 3, 5-8)
    "collapse",  # neural-collapse metrics, Layer FT and SCL FT (companion paper)
)


def register(subparsers) -> None:
    """Add every available experiment's subcommand."""
    for name in MODULES:
        if importlib.util.find_spec(f"{__name__}.{name}") is not None:
            importlib.import_module(f"{__name__}.{name}").add_parser(subparsers)
