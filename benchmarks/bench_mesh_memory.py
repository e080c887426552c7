"""Per-device memory of the vmapped FT state (parameters, momentum, best
parameters, BN statistics) against the device count, runs axis on every
device (``--mesh runs``). Shapes only (``jax.eval_shape``; nothing is
allocated), per-device shard shapes from the sharding itself.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
        PYTHONPATH=. python benchmarks/bench_mesh_memory.py --runs 16
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from hpft_jax import config as C, ft, parallel
from hpft_jax.models import make_classifier


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=16)
    p.add_argument("--backbone", default="resnet18")
    args = p.parse_args()
    model = make_classifier(C.ModelConfig(backbone=args.backbone), 10)
    x = jnp.zeros((2, 32, 32, 3))
    v = jax.eval_shape(lambda k: model.init(k, x, train=False), jax.random.key(0))
    tx = ft.ft_tx(C.FTConfig(), 1000)
    stack = lambda t: jax.tree_util.tree_map(  # noqa: E731
        lambda a: jax.ShapeDtypeStruct((args.runs,) + a.shape, a.dtype), t)
    carry = jax.eval_shape(jax.vmap(lambda p, s: ft.init_carry(p, s, tx)),
                           stack(v["params"]), stack(v.get("batch_stats", {})))
    n_params = sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(v["params"]))
    print(f"{args.backbone}: {n_params / 1e6:.1f} M parameters; R = {args.runs} runs; "
          f"FT state per run {sum(a.size * a.dtype.itemsize for a in jax.tree_util.tree_leaves(carry)) / args.runs / 2**20:.0f} MiB")
    print("| devices | mesh | runs per device | FT state per device (MiB) |")
    print("|---|---|---|---|")
    for n in (1, 2, 4, 8):
        if n > jax.local_device_count():
            break
        for spec in (["data"] if n == 1 else ["data", "runs"]):
            mesh = parallel.parse_mesh(spec, jax.local_devices()[:n])
            sh = (parallel.replicated(mesh) if parallel.runs_size(mesh) == 1
                  else jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(parallel.RUNS)))
            per_dev = sum(int(np.prod(sh.shard_shape(a.shape))) * a.dtype.itemsize
                          for a in jax.tree_util.tree_leaves(carry) if a.ndim)
            rpd = args.runs // parallel.runs_size(mesh)
            print(f"| {n} | {spec} | {rpd} | {per_dev / 2**20:,.0f} |")


if __name__ == "__main__":
    main()
