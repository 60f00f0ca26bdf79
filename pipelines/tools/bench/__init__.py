"""`tessera bench`: how close the whole job comes to the bare model, and to a whole-scene peer.

For each synthetic scene size, one run measures:

* **raw**: output px/s of the bare forward pass on tiles already on the device (same model,
  tile, batch, precision and torch threads as the job's predictors), in a child process;
* **end to end**: scene px / wall s of :func:`pipelines.run.job.run_job` (plan, read, predict,
  blend, write, stats, merge, tables), Ray already up, peak RSS of the driver and its Ray
  processes (and GPU memory from ``nvidia-smi`` on GPU);
* **redundancy**: model px computed / output px, exactly from the plan (halos, tile overlap,
  stride padding, skipped nodata chunks), so the *ideal* end-to-end/raw ratio is
  ``1 / redundancy`` and ``efficiency = (e2e / raw) * redundancy`` is the share of the
  model's bare speed that the pipeline delivers beyond what the plan makes it compute;
* **breakdown**: read / predict / write / stats / merge shares of the summed stage seconds
  (blending and cropping, the "stitch", happen inside predict);
* **peer**: MONAI ``sliding_window_inference`` over the whole scene held in memory (same
  model, tile, overlap, Gaussian blending, batch, device), in a child process so that its
  peak RSS is its own, with the agreement of its labels with tessera's stored classes;
* **equal redundancy**: the two sides compute different model px per output px (tessera: the
  halo, less the chunks skipped as nodata; the peer: its tile overlap), so the output-px ratio
  is also given per model px computed and factored into pipeline x plan x nodata skip
  (``peer_comparison``, ``nodata_skip_gain``), and the peer runs a second time at the overlap
  that matches tessera's redundancy without the skip (``monai_overlap_for_redundancy``).

Where each part lives:

* :mod:`~pipelines.tools.bench.config`: :class:`BenchConfig` and ``parse_sizes`` (CLI sizes);
  :class:`VolumeBenchConfig`, ``parse_volume_sizes`` and ``parse_classes`` for volumes;
* :mod:`~pipelines.tools.bench.maths`: the pure maths (redundancies, ratios, shares, scaling,
  the peer's memory estimate), no torch, no Ray, no I/O;
* :mod:`~pipelines.tools.bench.probes`: GPU sampler, machine facts, device probe;
* :mod:`~pipelines.tools.bench.children`: running a measurement in a fresh Python process;
* :mod:`~pipelines.tools.bench.peers`: the bare model and the MONAI peer (torch inside, in children);
* :mod:`~pipelines.tools.bench.resolve`: the config resolved on this machine, the job spec, the
  JSON header;
* :mod:`~pipelines.tools.bench.run`: ``run_bench``, the orchestration (scene generation is never
  part of a measurement);
* :mod:`~pipelines.tools.bench.report`: the result JSON and the tables;
* :mod:`~pipelines.tools.bench.volume`: ``tessera bench --volume``, tessera against MONAI on 3D
  volumes per volume size and class count, both sides in memory-watched children (OOM reported).

The driver-side modules never import torch at import time. See docs/benchmarks.md for what each
figure means.
"""
