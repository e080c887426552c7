"""The eNTK scheduler's estimate against XLA's buffer assignment (issue 15).

    PYTHONPATH=$PWD python -m benchmarks.bench_ntk_budget_xla

Compiles (does not run) traces, full blocks and drift, stored and in output
chunks, for the conv zoo of tests/test_ntk_conv.py and ResNet18 at widths 4
and 8, and prints est_bytes − RUNTIME_BYTES against XLA's
temporaries + arguments + outputs (``compiled.memory_analysis()``).
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "tests"))
from test_ntk_conv import _budget_for, zoo  # noqa: E402

from hpft_jax.models import ResNet18  # noqa: E402
from theory import ntk_budget  # noqa: E402
from theory.ntk import empirical_ntk_fn, make_drift_fn  # noqa: E402


def xla(c):
    m = c.memory_analysis()
    return m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes


def rn(width, n):
    m = ResNet18(width=width)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((n, 16, 16, 3)), jnp.float32)
    v = jax.eval_shape(lambda k, x: m.init(k, x, train=False), jax.random.key(0), x)
    v = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), v)
    bs = v["batch_stats"]
    return (lambda p, x: m.apply({"params": p, "batch_stats": bs}, x, train=False)), v["params"], x


def main():
    R = ntk_budget.RUNTIME_BYTES
    for name, (f, params, x) in [("zoo", zoo()[:3]), ("r18w4", rn(4, 6)), ("r18w8", rn(8, 4))]:
        for kind, forms in [("trace", None), ("trace", "gram"), ("full", None), ("drift", None)]:
            for units in (1, 2, None):
                if units == 1 and kind != "trace":
                    continue
                if units is not None and forms is not None:
                    continue
                b = None if units is None else _budget_for(
                    f, params, x, units, kind=kind, sets=2 if kind == "drift" else 1,
                    trace=kind == "trace")
                if kind == "drift":
                    d = make_drift_fn(f, x, memory_budget=b, forms=forms)
                    sch = d.plan(params)["schedule"]
                    c = d._both.lower(params, params).compile()
                else:
                    nt = empirical_ntk_fn(f, trace=kind == "trace", memory_budget=b, forms=forms,
                                          method="structured")
                    sch = nt.plan(params, x)["schedule"]
                    c = nt.lower(params, x).compile()
                est, got = sch["est_bytes"] - R, xla(c)
                print(f"{name:6} {kind:5} forms={forms} units={units} {sch['mode']:7} "
                      f"k={sch['k']:<3} tile={sch['tile']:<2} est-runtime {est / 1e6:8.2f} MB  "
                      f"XLA {got / 1e6:8.2f} MB  {'ok' if got <= est else 'OVER'}", flush=True)


if __name__ == "__main__":
    main()
