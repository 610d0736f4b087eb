"""Multi-host start-up through JAX's own runtime (``jax.distributed``), from flags or the environment.

Every process of a run executes the same program; ``initialize`` connects it to the others before
any JAX computation. Where the process count and ids come from, in order:

1. explicit arguments (``python -m diffjax.main --coordinator_address=host:port --num_processes=N
   --process_id=i``);
2. ``DIFFJAX_COORDINATOR_ADDRESS`` / ``DIFFJAX_NUM_PROCESSES`` / ``DIFFJAX_PROCESS_ID`` (set by
   ``launch/local.sh``);
3. an ``srun`` step of more than one task (``SLURM_JOB_ID``, ``SLURM_STEP_NODELIST``,
   ``SLURM_NTASKS`` > 1): JAX reads the node list, task count and task id itself;
4. ``DIFFJAX_DISTRIBUTED=auto`` (``launch/tpu_pod.sh``): JAX's cluster auto-detection (Cloud TPU
   VM pods via the metadata server, GKE, Open MPI, SLURM).

Otherwise the run is single-process and nothing is initialised. Liveness: every process sends
heartbeats to the coordinator; when one stops (crash, SIGKILL, lost host) for
``heartbeat_timeout_seconds`` the runtime stops the others with an error naming the dead task,
instead of leaving them blocked in a collective.
"""

from __future__ import annotations

import os
from typing import Mapping, Optional

import jax

__all__ = ["ENV_PREFIX", "detect", "initialize"]

ENV_PREFIX = "DIFFJAX_"


def _int(env, name):
    value = env.get(name)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an integer; got {value!r}") from None


def detect(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
           process_id: Optional[int] = None, env: Optional[Mapping[str, str]] = None) -> Optional[dict]:
    """The ``jax.distributed.initialize`` arguments for this process, or None for a single-process run.

    A pure function of the arguments and ``env`` (default ``os.environ``); the dict carries the
    source under ``"source"`` (``flags``, ``env``, ``slurm``, ``auto``).
    """
    env = os.environ if env is None else env
    if coordinator_address is not None or num_processes is not None or process_id is not None:
        missing = [n for n, v in (("coordinator_address", coordinator_address), ("num_processes", num_processes),
                                  ("process_id", process_id)) if v is None]
        if missing:
            raise ValueError(f"a multi-host run needs coordinator_address, num_processes and process_id; "
                             f"missing: {missing}")
        args = dict(coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id)
        return _checked(args, "flags")
    if env.get(ENV_PREFIX + "COORDINATOR_ADDRESS"):
        args = dict(coordinator_address=env[ENV_PREFIX + "COORDINATOR_ADDRESS"],
                    num_processes=_int(env, ENV_PREFIX + "NUM_PROCESSES"),
                    process_id=_int(env, ENV_PREFIX + "PROCESS_ID"))
        return _checked(args, "env")
    if (env.get("SLURM_JOB_ID") and env.get("SLURM_STEP_NODELIST")  # inside an srun step
            and _int(env, "SLURM_NTASKS") > 1):
        return {"cluster_detection_method": "slurm", "source": "slurm"}
    if env.get(ENV_PREFIX + "DISTRIBUTED", "").lower() == "auto":
        return {"source": "auto"}
    return None


def _checked(args: dict, source: str) -> dict:
    n, i, addr = args["num_processes"], args["process_id"], args["coordinator_address"]
    if not (isinstance(n, int) and n >= 1):
        raise ValueError(f"num_processes must be a positive integer; got {n!r} (from {source})")
    if not (isinstance(i, int) and 0 <= i < n):
        raise ValueError(f"process_id must lie in [0, {n}); got {i!r} (from {source})")
    host, _, port = str(addr).rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"coordinator_address must be host:port; got {addr!r} (from {source})")
    return {**args, "source": source}


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, *, heartbeat_timeout_seconds: int = 100,
               initialization_timeout: int = 300, env: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """Start ``jax.distributed`` if this is a multi-host run (see the module docstring); return the source."""
    args = detect(coordinator_address, num_processes, process_id, env)
    if args is None:
        return None
    source = args.pop("source")
    jax.distributed.initialize(**args, heartbeat_timeout_seconds=heartbeat_timeout_seconds,
                               initialization_timeout=initialization_timeout)
    return source
