"""Run neural-tangents on the same parameters and inputs, in a side venv.

neural-tangents 0.6.5 imports only on jax 0.4.25 (shared facts in
ENVIRONMENT.md), so it cannot share this library's environment. The side
run: build (or reuse) a venv with the pinned versions below, write the
parameters and inputs to an ``.npz`` (``allow_pickle=False`` both ways),
run :mod:`benchmarks.nt_side` there in its own process, and read back the
kernel, its call times and the process's peak RSS.

Opt-in only (``--vs-nt`` on the eNTK benchmarks); building the venv needs
the package index (about 2 minutes, ~1.5 GB with TensorFlow, which
neural-tangents pulls). ``HPFT_NT_VENV`` names the venv (default
``~/.cache/hpft-jax/nt-venv``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

PINS = ["jax==0.4.25", "jaxlib==0.4.25", "neural-tangents==0.6.5", "flax==0.8.2",
        "numpy<2", "scipy<1.13"]
SIDE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "nt_side.py")


def venv_path() -> str:
    return os.environ.get("HPFT_NT_VENV",
                          os.path.expanduser("~/.cache/hpft-jax/nt-venv"))


def ensure_venv(path: str | None = None) -> str:
    """The side venv's python, built with :data:`PINS` if it does not import n-t."""
    path = path or venv_path()
    py = os.path.join(path, "bin", "python")
    probe = [py, "-c", "import neural_tangents, jax; assert jax.__version__ == '0.4.25'"]
    if os.path.exists(py) and subprocess.run(probe, capture_output=True).returncode == 0:
        return py
    print(f"building the neural-tangents side venv at {path} (pip, ~2 min)", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", path], check=True)
    subprocess.run([py, "-m", "pip", "install", "-q", *PINS], check=True)
    subprocess.run(probe, check=True)
    return py


def flatten(params, prefix="p") -> dict:
    """{'p/dense0/kernel': array, ...} from a nested dict of arrays."""
    out = {}
    for k, v in params.items():
        if isinstance(v, dict) or hasattr(v, "items"):
            out.update(flatten(dict(v), f"{prefix}/{k}"))
        else:
            out[f"{prefix}/{k}"] = v
    return out


def run(model: str, params, x, *, trace: bool, reps: int, workdir: str | None = None) -> dict:
    """neural-tangents' structured eNTK of ``model`` ("mlp" | "cnn") on (params, x).

    Returns ``kernel`` (numpy), ``runs_s``, ``median_s``, ``compile_s``
    (first call minus the median), ``peak_rss_gb`` and the side versions.
    """
    import numpy as np

    py = ensure_venv()
    workdir = workdir or tempfile.mkdtemp(prefix="ntside_")
    src, dst = os.path.join(workdir, "in.npz"), os.path.join(workdir, "out.npz")
    arrays = {k: np.asarray(v) for k, v in flatten(params).items()}
    spec = json.dumps({"model": model, "trace": trace, "reps": reps})
    np.savez(src, x=np.asarray(x), spec=np.asarray(spec), **arrays)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    p = subprocess.run([py, SIDE, src, dst], capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"neural-tangents side run failed:\n{p.stderr[-3000:]}")
    z = np.load(dst, allow_pickle=False)
    runs = [float(t) for t in z["runs_s"]]
    med = float(np.median(runs))
    return {"kernel": z["kernel"], "runs_s": runs, "median_s": med,
            "compile_s": max(float(z["first_s"]) - med, 0.0),
            "peak_rss_gb": float(z["peak_rss_gb"]),
            "versions": json.loads(str(z["versions"]))}


def child_case(model: str, params, x, *, trace: bool, reps: int, out_npy: str) -> dict:
    """One benchmark row for neural-tangents; its kernel saved to ``out_npy``.

    neural-tangents' ``trace_axes`` takes the *mean* over the traced output
    axis (measured: its traces are ours / h), so traces are multiplied by h
    before saving, to compare with this library's sums.
    """
    import numpy as np

    r = run(model, params, x, trace=trace, reps=reps)
    k = r.pop("kernel")
    if trace:
        k = k * out_dim(model, params)
    np.save(out_npy, k)
    return {**r, "method": "neural-tangents structured"}


def out_dim(model: str, params) -> int:
    """h, the width of the model's output (its last layer's bias)."""
    if model == "mlp":
        last = max(params, key=lambda n: int("".join(c for c in n if c.isdigit())))
        return int(params[last]["bias"].shape[0])
    return int(params["Dense_0"]["bias"].shape[0])
