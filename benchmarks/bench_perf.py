"""FT step speed against PyTorch in ONE process, rounds interleaved (issue 14).

    PYTHONPATH=$PWD python -m benchmarks.bench_perf resnet --batch 128 --rounds 1
    PYTHONPATH=$PWD python -m benchmarks.bench_perf resnet --batch 32 --rounds 3
    PYTHONPATH=$PWD python -m benchmarks.bench_perf resnet --width 16 --image 16 --epoch
    PYTHONPATH=$PWD python -m benchmarks.bench_perf mlp --rounds 5

On a shared machine, numbers from separate processes drift with the load;
here every variant is compiled first, then each round times every variant
back to back (JAX variants, then PyTorch with 1 and with 2 threads), so the
ratios of one round share the load. The report gives per-round ratios of each
JAX variant to PyTorch's better thread setting in that round, and their
median.

resnet: ResNet18 (CIFAR stem), SGD + momentum + cosine (FTConfig), batch
``--batch``. JAX variants: one jitted step with the model's ``conv`` =
``lax`` (XLA's convolutions) and ``patches`` (:mod:`hpft_jax.convs`);
``--epoch`` adds the library's in-program epoch (:func:`steps.make_epoch`,
a ``fori_loop`` over gathered batches) with each conv implementation, per step.

mlp: the toy MLP (784 -> 4 x 128 -> 10), batch 128: the library's epoch
(50 steps per call) and a lone jitted step; PyTorch's plain loop over a
fresh permutation, and a lone step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from benchmarks.bench_train import NUM_CLASSES, _torch_model
from benchmarks._timing import flops as _flops


def _jax_variants(args):
    """{name: (fn() -> result to block on, steps per call)} after compiling."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from hpft_jax import steps
    from hpft_jax.config import FTConfig
    from hpft_jax.models import Classifier, LinearHead, MLPBackbone, ResNet18

    b = args.batch
    nb = args.epoch_steps
    n = nb * b
    if args.model == "mlp":
        shape, impls = (28, 28, 1), ("auto",)
    else:
        shape, impls = (args.image, args.image, 3), ("lax", "patches")
    rng = np.random.default_rng(0)
    xs = jnp.asarray(rng.standard_normal((n,) + shape), jnp.float32)
    ys = jnp.asarray(rng.integers(0, NUM_CLASSES, n), jnp.int32)
    cfg = FTConfig()
    tx = steps.ft_optimizer(cfg, cfg.epochs * nb)
    key = jax.random.key(1)
    out, info = {}, {}
    for impl in impls:
        bb = MLPBackbone() if args.model == "mlp" else ResNet18(width=args.width, stem="cifar")
        model = Classifier(bb, LinearHead(NUM_CLASSES), conv=impl)
        v = jax.jit(lambda k: model.init(k, xs[:2], train=False))(jax.random.key(0))  # noqa: B023
        p, bs = v["params"], v.get("batch_stats", {})
        fresh = lambda: steps.init_state(*jax.tree.map(  # noqa: E731
            lambda a: jnp.array(a, copy=True), (p, bs)), tx)  # noqa: B023
        step = steps.make_train_step(model, tx, num_classes=NUM_CLASSES, eta=cfg.eta)
        tag = "" if args.model == "mlp" else f"[{impl}]"
        xb, yb = xs[:b], ys[:b]
        t0 = time.perf_counter()
        cstep = jax.jit(step, donate_argnums=0).lower(fresh(), xb, yb, key).compile()
        info[f"step{tag}"] = {"compile_s": time.perf_counter() - t0, "flops": _flops(cstep)}
        box = [fresh()]

        def one(cstep=cstep, box=box, xb=xb, yb=yb):
            box[0], m = cstep(box[0], xb, yb, key)
            return m["loss"]

        jax.block_until_ready(one())
        out[f"step{tag}"] = (one, 1)
        if args.model == "mlp" or args.epoch:
            epoch = jax.jit(steps.make_epoch(step, batch_size=b, num_examples=n), donate_argnums=0)
            t0 = time.perf_counter()
            cep = epoch.lower(fresh(), xs, ys, key, 0).compile()
            info[f"epoch{tag}"] = {"compile_s": time.perf_counter() - t0}
            ebox = [fresh(), 0]

            def one_epoch(cep=cep, ebox=ebox):
                ebox[0], m = cep(ebox[0], xs, ys, key, ebox[1])
                ebox[1] += 1
                return m["loss"]

            jax.block_until_ready(one_epoch())
            out[f"epoch{tag}"] = (one_epoch, nb)
    return out, info


def _torch_variants(args):
    import torch
    import torch.nn.functional as F

    from hpft_jax.config import FTConfig

    class A:  # _torch_model's size arguments
        resnet_width, resnet_image = args.width, args.image

    dev = args.torch_device
    torch.manual_seed(0)
    model, shape = _torch_model("mlp" if args.model == "mlp" else "resnet18", A)
    model.to(dev).train()
    b, nb = args.batch, args.epoch_steps
    n = nb * b
    g = torch.Generator().manual_seed(0)
    X, Y = torch.randn((n,) + shape, generator=g), torch.randint(0, NUM_CLASSES, (n,), generator=g)
    X, Y = X.to(dev), Y.to(dev)
    sync = torch.cuda.synchronize if dev.startswith("cuda") else (lambda: None)
    cfg = FTConfig()
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * nb)

    def step(idx):
        opt.zero_grad()
        loss = F.cross_entropy(model(X[idx]), Y[idx])
        loss.backward()
        opt.step()
        sched.step()
        return loss

    def epoch():
        perm = torch.randperm(n, generator=g).to(dev)
        for i in range(nb):
            loss = step(perm[i * b:(i + 1) * b])
        return float(loss.detach())

    idx = torch.arange(b).to(dev)
    out = {}
    for threads in ((1, 2) if dev == "cpu" else (torch.get_num_threads(),)):
        def with_threads(fn, threads=threads):
            def run():
                torch.set_num_threads(threads)
                return fn()
            return run
        one = with_threads(lambda: (float(step(idx).detach()), sync())[0])
        one()  # warm-up
        out[f"torch{threads} step"] = (one, 1)
        if args.model == "mlp" or args.epoch:
            ep = with_threads(epoch)
            ep()
            out[f"torch{threads} epoch"] = (ep, nb)
    return out


def _time(fn, reps: int) -> float:
    """Median seconds of ``reps`` calls."""
    import jax

    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", choices=("resnet", "mlp"))
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--width", type=int, default=64, help="ResNet18 width")
    ap.add_argument("--image", type=int, default=32, help="ResNet18 input size")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=None,
                    help="calls timed per variant per round (default: resnet 1, mlp 20)")
    ap.add_argument("--epoch", action="store_true", help="resnet: also the in-program epoch")
    ap.add_argument("--epoch-steps", type=int, default=None,
                    help="steps per epoch (default: mlp 50, resnet 2)")
    ap.add_argument("--torch-device", default="cpu",
                    help="PyTorch's device: cpu (1 and 2 threads) or cuda (benchmarks/bench_gpu.sh)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.epoch_steps is None:
        args.epoch_steps = 50 if args.model == "mlp" else 2
    reps = args.reps or (1 if args.model == "resnet" else 20)
    t_start = time.perf_counter()
    variants, info = _jax_variants(args)
    variants.update(_torch_variants(args))
    rounds = []
    for r in range(args.rounds):
        load0 = os.getloadavg()[0]
        row = {}
        for name, (fn, nsteps) in variants.items():
            row[name] = _time(fn, max(1, reps // nsteps) if "epoch" in name else reps) / nsteps
        row["load"] = [load0, os.getloadavg()[0]]
        rounds.append(row)
        print(json.dumps({"round": r, **{k: (round(v, 5) if isinstance(v, float) else v)
                                         for k, v in row.items()}}), flush=True)
    names = [k for k in variants]
    import jax

    print(f"\n{args.model}: JAX on {jax.default_backend()}, PyTorch on {args.torch_device}; "
          f"batch {args.batch}" + (
        f", width {args.width}, input {args.image}x{args.image}" if args.model == "resnet" else "")
        + f"; {args.rounds} round(s); total {time.perf_counter() - t_start:.0f} s")
    print("| variant | s/step (median over rounds) | steps/s | vs best PyTorch step (median of "
          "per-round ratios) | vs best PyTorch epoch |")
    print("|---|---|---|---|---|")
    for k in names:
        med = statistics.median(r[k] for r in rounds)
        best = lambda r, what: min(v for n, v in r.items() if n.startswith("torch")  # noqa: E731
                                   and n.endswith(what))
        vs_step = statistics.median(best(r, " step") / r[k] for r in rounds)
        vs_ep = "–"
        if any(n.endswith(" epoch") and n.startswith("torch") for n in variants):
            vs_ep = f"{statistics.median(best(r, ' epoch') / r[k] for r in rounds):.2f}x"
        print(f"| {k} | {med:.4g} | {1 / med:.4g} | {vs_step:.2f}x | {vs_ep} |")
    print("compile/FLOPs:", json.dumps(info))
    print("load (1-min average) per round:", [[round(x, 1) for x in r["load"]] for r in rounds])
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "rounds": rounds, "info": info}, fh, indent=1)


if __name__ == "__main__":
    main()
