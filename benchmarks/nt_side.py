"""neural-tangents' eNTK on the benchmark models, run in its own venv.

    <side venv>/bin/python benchmarks/nt_side.py IN.npz OUT.npz

Not part of the library and never imported by it: neural-tangents 0.6.5
(the last release) imports only on jax 0.4.25, so :mod:`benchmarks._ntside`
runs this file with a side venv's interpreter. It imports nothing from
hpft_jax: the models are written here in plain ``jax.lax`` with Flax's
parameter names, and the driver checks the kernels against this library's
to 1e-5 relative, which also checks that the two definitions agree.

IN.npz holds ``x`` (N, ...), the parameters flattened as ``p/<path>``
(``p/Dense_0/kernel``), and ``spec`` (a JSON string): ``model`` ("mlp" or
"cnn"), ``trace`` (bool), ``reps``. OUT.npz gets ``kernel`` ((N, N, h, h)
or traces (N, N)), ``runs_s`` (each call after the first), ``first_s``
(compile + one call) and ``peak_rss_gb``.
"""

from __future__ import annotations

import json
import re
import resource
import sys
import time


def _unflatten(z):
    params: dict = {}
    for k in z.files:
        if not k.startswith("p/"):
            continue
        node = params
        *head, leaf = k[2:].split("/")
        for h in head:
            node = node.setdefault(h, {})
        node[leaf] = z[k]
    return params


def _mlp(params, x):
    """MLPBackbone: flatten, Dense+ReLU per layer (dense0, dense1, ... in order)."""
    import jax.numpy as jnp
    h = x.reshape(x.shape[0], -1)
    for name in sorted(params, key=lambda n: int(re.sub(r"\D", "", n))):
        h = jnp.maximum(h @ params[name]["kernel"] + params[name]["bias"], 0)
    return h


def _cnn(params, x):
    """Conv32 → Conv64/s2 → Conv64/s2 (3×3 SAME, ReLU), mean pool, Dense128."""
    import jax
    import jax.numpy as jnp
    h = x
    for i, s in enumerate((1, 2, 2)):
        p = params[f"Conv_{i}"]
        h = jax.lax.conv_general_dilated(h, p["kernel"], (s, s), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        h = jnp.maximum(h + p["bias"], 0)
    h = jnp.mean(h, axis=(1, 2))
    return h @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"]


def main(src: str, dst: str) -> None:
    import jax
    import neural_tangents as nt
    import numpy as np

    z = np.load(src, allow_pickle=False)
    spec = json.loads(str(z["spec"]))
    params = jax.tree_util.tree_map(jax.numpy.asarray, _unflatten(z))
    x = jax.numpy.asarray(z["x"])
    f = {"mlp": _mlp, "cnn": _cnn}[spec["model"]]
    ntk = jax.jit(nt.empirical_ntk_fn(
        f, trace_axes=(-1,) if spec["trace"] else (), vmap_axes=0,
        implementation=nt.NtkImplementation.STRUCTURED_DERIVATIVES))
    t0 = time.perf_counter()
    k = ntk(x, None, params).block_until_ready()
    first = time.perf_counter() - t0
    runs = []
    for _ in range(spec["reps"]):
        t0 = time.perf_counter()
        k = ntk(x, None, params).block_until_ready()
        runs.append(time.perf_counter() - t0)
    np.savez(dst, kernel=np.asarray(k), runs_s=np.asarray(runs), first_s=first,
             peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
             versions=json.dumps({"jax": jax.__version__, "neural_tangents": nt.__version__}))


if __name__ == "__main__":
    main(*sys.argv[1:3])
