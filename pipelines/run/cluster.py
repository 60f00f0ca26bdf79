"""The connection to Ray: an address, RAY_ADDRESS, or a local instance this process starts."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
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
