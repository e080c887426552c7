"""One process of the per-process-slices test (tests/test_multihost.py), not
a test module: streamed FT of two runs on a data mesh over every process's
devices; writes the results and the training rows this process read.

    python tests/_stream_worker.py OUT [PORT NUM_PROCESSES PROCESS_ID]
"""

import json
import sys

import jax
import numpy as np


class Recording:
    """A host array that records which rows are read (``a[rows]``)."""

    def __init__(self, a):
        self.a, self.rows = a, []
        self.shape, self.dtype = a.shape, a.dtype

    def __getitem__(self, idx):
        self.rows.append(np.arange(self.shape[0])[idx].ravel())
        return self.a[idx]

    def __len__(self):
        return self.shape[0]


def main(out, port=None, n=1, me=0):
    from hpft_jax import multihost
    if port is not None:
        multihost.initialize(f"127.0.0.1:{port}", int(n), int(me), timeout_s=120)
    import dataclasses

    from hpft_jax import ft, parallel
    from _toy import FT, data_dict, init_vars, tiny_model

    data = data_dict(n=96)
    model = tiny_model()
    inits = [(init_vars(model, data["train_x"], seed=s)["params"], {}) for s in (0, 1)]
    rec = Recording(data["train_x"])
    data = dict(data, train_x=rec)
    mesh = parallel.data_mesh(jax.devices())  # every process's devices: a global mesh
    cfg = dataclasses.replace(FT, epochs=2, patience=2, lr=0.05)
    results, _ = ft.finetune(model, cfg, inits, [0, 1], data, rec, data["train_y"],
                             num_classes=3, progress=False, mesh=mesh,
                             input={"input": "stream", "prefetch": 2})
    rows = np.concatenate(rec.rows).tolist()
    with open(out, "w") as f:
        json.dump({"process_count": jax.process_count(), "local_devices": len(jax.local_devices()),
                   "rows": rows, "results": [{k: r[k] for k in ("val_acc", "test_acc", "aie",
                                                                 "curves", "adapt")}
                                              for r in results]}, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
