"""The benchmark's configuration resolved on this machine: card, device, threads, job spec, header."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipelines.tools.bench.children import run_in_child
from pipelines.tools.bench.config import BenchConfig
from pipelines.tools.bench.probes import machine_facts
from schemas.job import default_batch_size

#: Version of the result JSON layout.
BENCH_FORMAT_VERSION = 1


@dataclass(frozen=True)
class ResolvedBench:
    """The config with the card's defaults and this machine's device and threads filled in."""

    config: BenchConfig
    out_dir: Path
    card_path: Path
    card: Any  # schemas.model_card.ModelCard
    device: str  # "cpu" or "cuda"
    halo: int
    tile: int
    threads_per_actor: int
    model_threads: int  # the bare model and the peer get the threads all predictors share
    gpus_per_actor: float
    batch: int  # tiles per forward pass (the job's default for the device unless set)
    actors: int = 1  # config.actors, or one per CPU core (CPU) / GPU

    @classmethod
    def from_config(cls, config: BenchConfig) -> ResolvedBench:
        from workers.checkpoints import load_checkpoint, resolve_card_path

        card_path = resolve_card_path(config.model, base_dir=Path.cwd()).resolve()
        card = load_checkpoint(card_path).card
        probe = run_in_child("probe_device", device=config.device)
        device, n_gpus = probe["type"], probe["count"]
        cpus = os.cpu_count() or 1
        actors = config.actors or (max(1, n_gpus) if device == "cuda" else cpus)
        threads = config.torch_threads or max(1, cpus // actors)
        gpus_per_actor = min(1.0, max(n_gpus, 1) / actors) if device == "cuda" else 0.0
        return cls(
            config=config, out_dir=config.out_dir.expanduser().resolve(), card_path=card_path, card=card,
            device=device, halo=config.halo if config.halo is not None else card.halo,
            tile=config.tile_size or card.tile_size, threads_per_actor=threads,
            model_threads=min(cpus, threads * actors), gpus_per_actor=gpus_per_actor, actors=actors,
            batch=config.batch_size or default_batch_size(device),
        )

    @property
    def cpus_per_actor(self) -> float:
        """1 CPU per actor, less when the actors would leave no CPU for the read/write tasks
        (GPU actors run the split pipeline; CPU actors read and write themselves)."""
        cpus = os.cpu_count() or 1
        tasks = 1 if self.device == "cuda" else 0
        return min(1.0, max(0.25, (cpus - tasks) / self.actors))

    def job_spec(self, scene: Path, root: Path) -> Any:
        """The JobSpec of one benchmark job (same model, tiling and resources for every size)."""
        from schemas.job import JobSpec

        c = self.config
        return JobSpec.model_validate({
            "name": "tessera-bench",
            "inputs": [str(scene)],
            "model": {"card": str(self.card_path)},
            "tiling": {"chunk_size": c.chunk_size, "halo": self.halo, "tile_size": self.tile,
                       "tile_overlap": c.tile_overlap, "blend": "gaussian"},
            "resources": {"actors": self.actors, "num_gpus_per_actor": self.gpus_per_actor,
                          "cpus_per_actor": self.cpus_per_actor,
                          "batch_size": self.batch, "torch_threads": self.threads_per_actor,
                          "malloc_tuning": c.malloc_tuning},
            "inference": {"precision": c.precision, "channels_last": c.channels_last,
                          "fold_batchnorm": c.fold_batchnorm},
            "output": {"root": str(root), "overwrite": True},
        })

    def header(self) -> dict[str, Any]:
        card = self.card
        return {
            "format": BENCH_FORMAT_VERSION,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "config": self.config.to_json(),
            "resolved": {"card_path": str(self.card_path), "halo": self.halo, "tile_size": self.tile,
                         "actors": self.actors, "torch_threads_per_actor": self.threads_per_actor, "model_threads": self.model_threads,
                         "num_gpus_per_actor": self.gpus_per_actor, "device": self.device},
            "model": {"name": card.name, "architecture": card.architecture, "in_channels": card.in_channels,
                      "num_classes": card.num_classes, "stride": card.stride, "tile_size": card.tile_size,
                      "halo": card.halo, "weights_sha256": card.weights_sha256},
            "machine": machine_facts(self.device),
            "notes": [
                "stitch (Gaussian blending and crop to the chunk core) runs inside predict",
                "stage seconds are summed over chunks that ran in parallel: shares, not wall time",
                "tessera_total_peak_mib counts shared pages (Ray's object store) once per process: an upper bound",
                "tessera_job_pss_peak_mib: summed PSS of the driver and the Ray worker processes (Ray's "
                "daemons apart, in tessera_system_pss_peak_mib); compared with the peer's RSS",
                "tessera_all_pss_peak_mib: peak of the summed PSS of the driver, workers and Ray's daemons "
                "sampled together; memory_all_vs_monai compares it with the peer's RSS",
                "tessera_vs_monai = tessera_vs_monai_per_model_px * plan_gain_vs_monai * skip_gain; "
                "tessera_vs_monai_eq: against the peer run at tessera's redundancy without nodata skipping",
            ],
        }

