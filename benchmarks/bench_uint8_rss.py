"""Peak host RSS of loading an image set for FT: read, split, standardise
(float32 before, uint8 after), and put the FT splits on the device, as
:func:`hpft_jax.ft.finetune` does (``jnp.asarray`` of every split).

The synthetic set is N random uint8 images (S, S, 3), N // 8 of them the
test split, in an npz file, written by a separate process so that the measured process
only loads. Run it against two checkouts to compare code versions::

    PYTHONPATH=. python benchmarks/bench_uint8_rss.py --n 8000 --size 224

Prints one Markdown table row: N, GB of the set as uint8 / float32, the
split dtype, RSS after imports, peak RSS (``ru_maxrss``) after loading,
loaded / uint8 size, peak RSS after the device put, and the loading wall
time. On the CPU backend "device" arrays live in host memory too.
"""

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

_WRITER = """
import sys, numpy as np
path, n, s = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(0)
m = n // 8
np.savez(path, x_train=rng.integers(0, 256, (n - m, s, s, 3), dtype=np.uint8),
         y_train=np.arange(n - m) % 10, x_test=rng.integers(0, 256, (m, s, s, 3), dtype=np.uint8),
         y_test=np.arange(m) % 10)
"""


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=8000, help="images (train + test)")
    p.add_argument("--size", type=int, default=224, help="image side")
    p.add_argument("--dir", default=tempfile.gettempdir(), help="where the npz goes")
    args = p.parse_args()
    path = os.path.join(args.dir, f"hpft_bench_{args.n}_{args.size}.npz")
    if not os.path.exists(path):
        subprocess.run([sys.executable, "-c", _WRITER, path, str(args.n), str(args.size)],
                       check=True)
    # Imported here, after the writer: only what loading costs is measured.
    import jax.numpy as jnp  # noqa: PLC0415

    from hpft_jax import config as C, data  # noqa: PLC0415

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    ds = data.load_downstream(C.DataConfig(downstream=f"npz:{path}", distort=False))
    wall = time.perf_counter() - t0
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    dev = [jnp.asarray(s.x) for s in (ds.train, ds.val, ds.test)]
    for a in dev:
        a.block_until_ready()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    u8 = args.n * args.size**2 * 3
    print(f"| {args.n:,} | {u8 / 1e9:.2f} / {4 * u8 / 1e9:.2f} | {ds.train.x.dtype} | "
          f"{base / 1e9:.2f} | {loaded / 1e9:.2f} | {loaded / u8:.2f} | {peak / 1e9:.2f} | "
          f"{wall:.0f} |")


if __name__ == "__main__":
    main()
