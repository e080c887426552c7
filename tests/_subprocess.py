"""What tests that start ``hpft`` in subprocesses share: the repository root,
a tiny sweep's flags and the child environment."""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--quiet", "--no-figures", "--backbone", "mlp", "--width", "16", "--depth", "2",
        "--pretrain-epochs", "2", "--tau", "0,1,2", "--seeds", "0,1", "--ft-epochs", "2",
        "--batch-size", "64", "--hp-lr", "0.005", "--ft-lr", "0.005"]


def child_env() -> dict:
    """CPU JAX with one device (no forced host devices), this checkout importable."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env
