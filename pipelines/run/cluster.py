"""The connection to Ray: an address, RAY_ADDRESS, or a local instance this process starts."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from workers.runtime import GLIBC_TUNABLES, process_env

_local_ray: tuple[str, dict[str, str]] | None = None

"""(GCS address, the environment its worker processes inherit) of the local Ray this process
started (ensure_ray), so that actors needing no other environment get no runtime env."""


def ensure_ray(address: str | None = None, *, num_cpus: int | None = None,
               worker_env: Mapping[str, str] | None = None) -> None:
    """Connect to Ray (an address, RAY_ADDRESS, or a new local instance) unless connected.

    A new local instance starts with `worker_env` in its processes' environment (Ray's daemons
    and every worker inherit it): with the predictor actors' malloc tunables there, the actors
    need no runtime environment of their own and start 0.3-0.5 s sooner (a per-actor runtime
    environment goes through Ray's runtime-env agent; measured on the 2-core development VM,
    two actors ready in 2.4-2.7 s against 2.7-3.1 s). The daemons' memory was the same with and
    without them.
    """
    import ray

    global _local_ray
    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {
        "include_dashboard": False,
        "log_to_driver": True,
        "logging_level": logging.getLogger("tessera").getEffectiveLevel(),
    }
    if address or os.environ.get("RAY_ADDRESS"):  # an existing cluster: its workers' environment is its own
        ray.init(address=address, **kwargs)
        return
    with process_env(worker_env or {}):
        inherited = {GLIBC_TUNABLES: os.environ.get(GLIBC_TUNABLES, "")}
        # address="local": a new instance even where `ray start` left a cluster (or its address
        # file) on this machine, which a bare ray.init() would try to join with these
        # local-only options. No idle workers started in advance for this driver: the predictor
        # actors get their own processes, so the prestarted ones only held memory (2 x 46 MiB
        # PSS on the 2-core VM, same job time without them).
        ray.init(address="local", num_cpus=num_cpus, _system_config={"prestart_worker_first_driver": False},
                 **kwargs)
    _local_ray = (ray.get_runtime_context().gcs_address, inherited)


def inherited_worker_env() -> dict[str, str] | None:
    """The environment the connected Ray's workers inherit, when this process started that Ray
    (ensure_ray); None for any other Ray."""
    import ray

    if _local_ray is None or not ray.is_initialized():
        return None
    gcs, env = _local_ray
    return dict(env) if ray.get_runtime_context().gcs_address == gcs else None


def shared_output_problem(nodes: Sequence[Mapping[str, Any]], *, root: Path, shared_filesystem: bool,
                          cluster_may_grow: bool = False) -> str | None:
    """Why a job must not start writing to `root` on this cluster, or None.

    Every chunk is written by the process that computed it, on whichever node Ray placed it; the
    driver then merges the chunks' partial statistics and markers from `root`. On more than one
    node that works only when `root` is one filesystem that every node mounts at the same path,
    which the job spec declares (`output.shared_filesystem: true`); a local disk per node would
    scatter the chunks and the scenes would fail at the merge, after all the work.

    Args:
        nodes: `ray.nodes()`: one mapping per node, with "Alive" and "NodeManagerAddress".
        root: the output root.
        shared_filesystem: `output.shared_filesystem` of the job spec.
        cluster_may_grow: the job waits for nodes that are not there yet (an autoscaling cluster
            without the resources the job asks for): more nodes will join.

    Returns:
        The error text (names the root, the nodes and the fix), or None when the job may start.
    """
    if shared_filesystem:
        return None
    alive = [n for n in nodes if n.get("Alive")]
    if len(alive) <= 1 and not cluster_may_grow:
        return None
    where = (f"the Ray cluster has {len(alive)} alive nodes "
             f"({', '.join(sorted(str(n.get('NodeManagerAddress', '?')) for n in alive))})" if len(alive) > 1
             else "the job waits for the Ray cluster to add nodes")
    return (f"output.root {root}: {where}, and each node would write its chunks to its own disk. Put the "
            "root on a filesystem every node mounts at the same path and set output.shared_filesystem: true, "
            "or run on a single node")
