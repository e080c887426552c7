"""Memory of FT with the data on device vs streamed (hpft_jax/stream.py).

One process per input path runs :func:`hpft_jax.ft.finetune` (``--runs``
vmapped runs of an MLP on N random uint8 images S x S x 3, one epoch) on
the same generated splits, and reports:

* the peak bytes of live JAX arrays (``jax.live_arrays()``, sampled every
  10 ms; on a GPU/TPU, also the device's ``peak_bytes_in_use``): what the
  data cost on the device;
* the process's peak RSS (``ru_maxrss``): on the CPU backend "device"
  arrays live in host memory too;
* the wall time of the FT call, and whether both paths gave the same
  validation accuracy.

    PYTHONPATH=. python benchmarks/bench_stream_memory.py --n 8000 --size 64

Prints a Markdown table.
"""

import argparse
import json
import os
import subprocess
import sys

_CHILD = r"""
import json, resource, sys, threading, time
import numpy as np
mode, n, s, runs, batch = sys.argv[1], *map(int, sys.argv[2:6])
import jax
from hpft_jax import ft
from hpft_jax.config import FTConfig, ModelConfig
from hpft_jax.models import make_classifier
rng = np.random.default_rng(0)
m = n // 8
data = {"train_x": rng.integers(0, 256, (n, s, s, 3), dtype=np.uint8),
        "train_y": (np.arange(n) % 10).astype(np.int32)}
for k in ("val", "test"):
    data[k + "_x"] = rng.integers(0, 256, (m, s, s, 3), dtype=np.uint8)
    data[k + "_y"] = (np.arange(m) % 10).astype(np.int32)
model = make_classifier(ModelConfig(backbone="mlp", width=64, depth=2), 10,
                        input_norm=((0.5,) * 3, (0.25,) * 3))
v = model.init(jax.random.key(0), data["train_x"][:2], train=False)
inits = [(v["params"], {})] * runs
cfg = FTConfig(epochs=1, batch_size=batch, lr=0.01)
base = sum(a.nbytes for a in jax.live_arrays())
peak = [0]
done = threading.Event()
def sample():
    while not done.is_set():
        try:
            peak[0] = max(peak[0], sum(a.nbytes for a in jax.live_arrays()))
        except Exception:
            pass
        time.sleep(0.01)
t = threading.Thread(target=sample, daemon=True); t.start()
inp = None if mode == "device" else {"input": "stream", "prefetch": 2}
t0 = time.perf_counter()
res, _ = ft.finetune(model, cfg, inits, list(range(runs)), data, data["train_x"][:1000],
                     data["train_y"][:1000], num_classes=10, progress=False, input=inp,
                     ckpt_dir=None)
wall = time.perf_counter() - t0
done.set(); t.join()
stats = jax.local_devices()[0].memory_stats() or {}
print(json.dumps({"mode": mode, "live_peak": peak[0] - base, "wall": wall,
                  "device_peak": stats.get("peak_bytes_in_use"),
                  "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "data": sum(a.nbytes for a in data.values()),
                  "val_acc": [r["val_acc"] for r in res], "backend": jax.default_backend()}))
"""


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=8000, help="training images")
    p.add_argument("--size", type=int, default=64, help="image side")
    p.add_argument("--runs", type=int, default=2, help="vmapped FT runs")
    p.add_argument("--batch", type=int, default=128)
    args = p.parse_args()
    rows = []
    for mode in ("device", "stream"):
        out = subprocess.run([sys.executable, "-c", _CHILD, mode, str(args.n), str(args.size),
                              str(args.runs), str(args.batch)], capture_output=True, text=True,
                             check=True, env=dict(os.environ))
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    mb = lambda b: "–" if b is None else f"{b / 2**20:,.0f}"  # noqa: E731
    print(f"N = {args.n} train images {args.size}x{args.size}x3 uint8 (+ {args.n // 8} val, "
          f"{args.n // 8} test), {args.runs} runs, batch {args.batch}, backend "
          f"{rows[0]['backend']}; data {mb(rows[0]['data'])} MiB\n")
    print("| input | live JAX arrays, peak (MiB) | device peak_bytes_in_use (MiB) | "
          "peak RSS (MiB) | FT wall (s) |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['mode']} | {mb(r['live_peak'])} | {mb(r['device_peak'])} | {mb(r['rss'])} | "
              f"{r['wall']:.1f} |")
    same = rows[0]["val_acc"] == rows[1]["val_acc"]
    print(f"\nval_acc equal on both paths: {same} ({rows[0]['val_acc']} vs {rows[1]['val_acc']})")


if __name__ == "__main__":
    main()
