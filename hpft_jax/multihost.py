"""A sweep over several processes (hosts) with ``jax.distributed``.

``hpft sweep --coordinator HOST:PORT --num-processes N --process-id I`` (or
no flags, where JAX detects the cluster: SLURM with more than one task, TPU
pods, Open MPI) joins N processes. The FT runs need no communication, so
the runs axis spans the processes: process i finetunes every N-th planned run
(``plan[i::N]``) on its own local mesh (``--mesh``), in rounds; after each
round the records are all-gathered (a JAX collective, gloo on CPU) and only
process 0 appends them to ``metrics.jsonl``. Only process 0 writes the
config, logs, report and figures.

Pretraining and HP run on process 0 first (it writes their checkpoints); the
other processes wait at a barrier, then read them from the run directory,
which must be on a file system every process sees. FT epoch checkpoints are
per process (orbax with ``active_processes={i}``), so a killed run resumes
every process's unfinished group.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time

import jax
import numpy as np
from jax.experimental import multihost_utils
# The coordination service's barrier (below); JAX's own array serialization
# uses it the same way, and there is no public equivalent.
from jax._src import distributed

from hpft_jax import prepare as prep_lib, sweep
from hpft_jax.runlog import RunDir

# Environment variables by which JAX's cluster detection recognises a cluster.
_CLUSTER_ENV = (("SLURM_NTASKS", 2), ("OMPI_COMM_WORLD_SIZE", 2))


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` -> (host, port); ``ValueError`` otherwise."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--coordinator: expected HOST:PORT, got {text!r}")
    return host, int(port)


def check_flags(coordinator: str | None, num_processes: int | None,
                process_id: int | None) -> bool:
    """Validate the flags before anything starts; True when they ask for
    several processes explicitly."""
    given = [v is not None for v in (coordinator, num_processes, process_id)]
    if not any(given):
        return False
    if not all(given):
        raise ValueError("--coordinator, --num-processes and --process-id go together")
    parse_address(coordinator)
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise ValueError(f"--process-id {process_id} is not in [0, {num_processes})")
    return True


def cluster_detected(env=os.environ) -> bool:
    """A multi-task cluster job that ``jax.distributed.initialize()`` can join."""
    if "TPU_WORKER_HOSTNAMES" in env and "," in env["TPU_WORKER_HOSTNAMES"]:
        return True
    return any(int(env.get(k, "1") or 1) >= n for k, n in _CLUSTER_ENV)


def wait_for_coordinator(host: str, port: int, timeout_s: float) -> None:
    """Return once ``host:port`` accepts a TCP connection; ``TimeoutError``
    after ``timeout_s`` (JAX's own client would abort the process instead)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"the coordinator {host}:{port} did not answer within {timeout_s:g} s; "
                    "start process 0 first, check the address and the firewall, or raise "
                    "--init-timeout") from None
            time.sleep(0.2)


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, timeout_s: int = 300) -> None:
    """``jax.distributed.initialize`` from the flags, or from the cluster's
    environment when none are given. On CPU, collectives go through gloo."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU only; GPUs use NCCL
    if coordinator is None:
        jax.distributed.initialize(initialization_timeout=timeout_s)
        return
    host, port = parse_address(coordinator)
    if process_id != 0:
        wait_for_coordinator(host, port, timeout_s)
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id, initialization_timeout=timeout_s)


def check_layout(num_devices: int, num_processes: int, local_devices: int) -> None:
    """Every process must bring the same number of devices (meshes are laid
    out process by process); ``ValueError`` in one line otherwise."""
    if num_devices % num_processes or num_devices != num_processes * local_devices:
        raise ValueError(
            f"{num_processes} processes do not divide the {num_devices} devices evenly (this "
            f"process has {local_devices}); start every process with the same number of "
            "devices")


def barrier(name: str, timeout_s: float = 7 * 24 * 3600) -> None:
    """Wait until every process reaches ``barrier(name)``.

    The coordination service's barrier, not a device collective: processes
    may wait here for hours (process 0 pretraining) where a gloo/NCCL
    collective would time out.
    """
    distributed.global_state.client.wait_at_barrier(name, timeout_in_ms=int(timeout_s * 1000))


def gather_json(obj) -> list:
    """Every process's JSON-able ``obj``, in process order (an all-gather)."""
    blob = np.frombuffer(json.dumps(obj).encode(), dtype=np.uint8)
    sizes = multihost_utils.process_allgather(np.array([blob.size], np.int32))
    padded = np.zeros(int(np.max(sizes)), np.uint8)
    padded[:blob.size] = blob
    every = multihost_utils.process_allgather(padded)
    return [json.loads(bytes(row[:int(n)]).decode())
            for row, n in zip(np.asarray(every), np.asarray(sizes).reshape(-1))]


class ReadOnlyRunDir(RunDir):
    """A run directory that processes other than 0 read but never write."""

    def write_config(self, cfg, *, resume: bool = True) -> None:
        return None

    def log(self, event: str, **fields) -> dict:
        return {"event": event, **fields}


def run_sweep(cfg, *, progress: bool = True, mesh=None) -> RunDir:
    """:func:`hpft_jax.sweep.run_sweep` over every process of the job."""
    if tuple(cfg.shard) != (0, 1):
        raise ValueError("--shard and several processes do not mix: the processes "
                         "already split the FT runs")
    n, me = jax.process_count(), jax.process_index()
    path = os.path.join(cfg.runs_dir, cfg.name)
    run = RunDir(path) if me == 0 else ReadOnlyRunDir(path)
    loaded = prep_lib.load(cfg)
    if me == 0:
        prep_lib.warn_opposite_energy(cfg)
        run.write_config(cfg)
        prep = prep_lib.prepare(cfg, run, loaded=loaded, mesh=mesh, progress=progress)
    barrier("hpft: pretraining and HP written")
    if me != 0:
        prep = prep_lib.prepare(cfg, run, loaded=loaded, mesh=mesh, progress=False)
    finished = {(r["variant"], r["seed"], r["tau"]) for r in run.records("ft")}
    todo = [k for k in prep_lib.plan(cfg) if tuple(k) not in finished]
    groups = [sweep.batch_groups(todo[p::n], cfg) for p in range(n)]
    rounds = max(len([g for g in gs if g]) for gs in groups)
    mine = [g for g in groups[me] if g]
    for r in range(rounds):
        recs = (sweep.finetune_group(prep, run, mine[r], progress=progress and me == 0)
                if r < len(mine) else [])
        barrier(f"hpft: FT round {r} finished")  # then the all-gather starts together
        everyone = gather_json(recs)
        if me == 0:
            for rec in (x for per in everyone for x in per):
                run.log("ft", **rec)
        barrier(f"hpft: FT round {r} logged")
        if r < len(mine):  # logged by process 0: the group's checkpoint is done with
            shutil.rmtree(run.checkpoints("ft", sweep.group_id(mine[r])), ignore_errors=True)
    return run

