"""The two references the job is measured against, each run in a child process (torch inside).

:func:`measure_raw`: bare forward passes of the job's model on tiles already on the device;
:func:`run_monai_peer`: MONAI ``sliding_window_inference`` over the whole scene held in memory,
with the agreement of its labels with tessera's stored classes. torch, MONAI and the model are
imported inside the functions, so that importing this module leaves the driver without torch.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.tools.bench.probes import cpu_name

_ARGMAX_ROWS = 1024  # MONAI argmax in row strips: avoids a whole-scene int64 temporary


def measure_raw(
    *, card_path: str, tile_shape: Sequence[int], batch_size: int, device: str, precision: str,
    threads: int, batches: int, warmup: int, iterations: int, seed: int,
    barrier_dir: str | None = None, parties: int = 1, channels_last: bool = True, fold_bn: bool = True,
) -> dict[str, Any]:
    """Bare forward passes on random normalised tiles already on the device (run in a child).

    With `barrier_dir`, `parties` such children run side by side (one per predictor actor):
    each waits after its warm-up until all are warm, so their timed passes overlap.

    Returns:
        px_s (output px/s of the median pass), pass_s (all timed pass seconds), device_name,
        gpu_peak_bytes (torch.cuda.max_memory_allocated, None on CPU), threads.
    """
    import contextlib

    t_start = time.perf_counter()
    import torch

    from workers.checkpoints import build_from_checkpoint, load_checkpoint
    from workers.predictor import fold_batchnorm, memory_format, resolve_autocast_dtype, resolve_device

    t_imported = time.perf_counter()
    dev = resolve_device(device)
    if dev.type == "cpu":
        torch.set_num_threads(threads)
    else:
        torch.zeros(1, device=dev)  # the CUDA context, timed apart from the model
    t_device = time.perf_counter()
    ckpt = load_checkpoint(Path(card_path))
    model = build_from_checkpoint(ckpt).eval()
    model = (fold_batchnorm(model) if fold_bn else model).to(dev)
    fmt = memory_format(channels_last=channels_last)
    model = model.to(memory_format=fmt)
    t_model = time.perf_counter()
    dtype = resolve_autocast_dtype(precision, dev)
    generator = torch.Generator().manual_seed(seed)
    inputs = [
        torch.randn((batch_size, ckpt.card.in_channels, *tile_shape), generator=generator)
        .to(dev).contiguous(memory_format=fmt)
        for _ in range(batches)
    ]

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def one_pass() -> None:
        autocast = torch.autocast(device_type=dev.type, dtype=dtype) if dtype else contextlib.nullcontext()
        with torch.inference_mode(), autocast:
            for x in inputs:
                model(x)
        sync()

    first_pass_s = None
    for _ in range(warmup):
        t0 = time.perf_counter()
        one_pass()
        first_pass_s = first_pass_s if first_pass_s is not None else time.perf_counter() - t0
    if barrier_dir is not None:
        Path(barrier_dir, f"ready-{os.getpid()}").touch()
        deadline = time.monotonic() + 600
        while len(list(Path(barrier_dir).glob("ready-*"))) < parties and time.monotonic() < deadline:
            time.sleep(0.05)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    seconds = []
    for _ in range(iterations):
        t0 = time.perf_counter()
        one_pass()
        seconds.append(time.perf_counter() - t0)
    px_per_pass = batches * batch_size * math.prod(tile_shape)
    return {
        "px_s": px_per_pass / float(np.median(seconds)),
        "pass_s": seconds,
        "px_per_pass": px_per_pass,
        "threads": torch.get_num_threads(),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_name(),
        "gpu_peak_bytes": torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None,
        # what a fresh predictor process pays before its first tile: what the job's actors pay too
        "startup_s": {"import_torch": t_imported - t_start, "device": t_device - t_imported,
                      "model": t_model - t_device, "first_pass": first_pass_s},
    }


def run_monai_peer(
    *, card_path: str, scene_path: str, tile_size: int, overlap: float, batch_size: int, device: str,
    precision: str, threads: int, zarr_path: str, channels_last: bool = True, fold_bn: bool = True,
) -> dict[str, Any]:
    """MONAI sliding_window_inference over the whole scene in memory (run in a child).

    Normalised as the predictor does ((x - mean) / std per band, nodata pixels -> 0), the model
    wrapped to pad tiles to its stride and return softmax probabilities (what tessera blends),
    Gaussian blending (sigma 0.125), the model and the blending on `device`. Only the inference
    call and the argmax are timed. Peak RSS is this process's own (ru_maxrss).

    Returns:
        seconds, px_s, peak_rss_bytes, gpu_peak_bytes (None on CPU), agreement (share of pixels
        valid in tessera's stored classes where both label the same), valid_pixels.
    """
    import contextlib
    import resource

    import rasterio
    import torch
    import torch.nn.functional as F
    import zarr
    from monai.inferers import sliding_window_inference

    from pipelines.readers import valid_mask
    from schemas import store as layout
    from workers.checkpoints import build_from_checkpoint, load_checkpoint
    from workers.predictor import fold_batchnorm, memory_format, resolve_autocast_dtype, resolve_device

    dev = resolve_device(device)
    if dev.type == "cpu":
        torch.set_num_threads(threads)
    ckpt = load_checkpoint(Path(card_path))
    card = ckpt.card
    fmt = memory_format(channels_last=channels_last)  # as the job's predictor runs the model
    model = build_from_checkpoint(ckpt).eval()
    model = (fold_batchnorm(model) if fold_bn else model).to(dev).to(memory_format=fmt)
    dtype = resolve_autocast_dtype(precision, dev)
    stride = card.stride

    t_read = time.perf_counter()
    with rasterio.open(scene_path) as ds:
        # The peer's whole point: the whole scene in one array (tessera never does this).
        pixels = ds.read()
        nodata = ds.nodata
    valid = valid_mask(pixels, nodata)
    x = np.empty(pixels.shape, np.float32)
    for b, band in enumerate(card.bands):
        np.subtract(pixels[b], np.float32(band.mean), out=x[b], dtype=np.float32)
        x[b] *= np.float32(1.0 / band.std)
        x[b] *= valid
    del pixels
    inputs = torch.from_numpy(x).unsqueeze(0)
    read_s = time.perf_counter() - t_read

    def predictor(tiles: torch.Tensor) -> torch.Tensor:
        h, w = tiles.shape[-2:]
        ph, pw = (-h) % stride, (-w) % stride
        if ph or pw:
            tiles = F.pad(tiles, (0, pw, 0, ph), mode="replicate")
        tiles = tiles.contiguous(memory_format=fmt)
        autocast = torch.autocast(device_type=dev.type, dtype=dtype) if dtype else contextlib.nullcontext()
        with autocast:
            logits = model(tiles)
        return torch.softmax(logits[..., :h, :w].float(), dim=1)

    height, width = inputs.shape[-2:]
    labels = np.empty((height, width), np.uint8)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    with torch.inference_mode():
        probs = sliding_window_inference(
            inputs, roi_size=(tile_size, tile_size), sw_batch_size=batch_size, predictor=predictor,
            overlap=overlap, mode="gaussian", sigma_scale=0.125, sw_device=dev, device=dev,
        )
        del inputs
        for r in range(0, height, _ARGMAX_ROWS):
            strip = torch.argmax(probs[0, :, r : r + _ARGMAX_ROWS], dim=0)
            labels[r : r + _ARGMAX_ROWS] = strip.to(torch.uint8).cpu().numpy()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - t0
    gpu_peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
    del probs, x

    stored = zarr.open_array(zarr_path, path=layout.classes_path(2), mode="r")
    ch, cw = stored.chunks
    same = n_valid = 0
    for r in range(0, height, ch):
        for c in range(0, width, cw):
            ours = stored[r : r + ch, c : c + cw]
            mask = ours != layout.NODATA_CLASS
            n_valid += int(mask.sum())
            same += int((ours[mask] == labels[r : r + ch, c : c + cw][mask]).sum())
    return {
        "seconds": seconds,
        "read_s": read_s,
        "px_s": height * width / seconds,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # KiB on Linux
        "gpu_peak_bytes": gpu_peak,
        "agreement": same / n_valid if n_valid else None,
        "valid_pixels": n_valid,
    }




# ----------------------------------------------------------------------------- volumes (`tessera bench --volume`)

#: The CT window of the volume bench's band (HU): clipped and scaled to [0, 1] (mean lo, std hi - lo).
VOLUME_CT_WINDOW = (-200.0, 300.0)
_ARGMAX_PLANES = 16  # MONAI argmax in z slabs: avoids a whole-volume int64 temporary


def make_volume_card(*, out_dir: str, num_classes: int, base_channels: int, depth: int, tile_size: int, halo: int,
                     seed: int) -> dict[str, Any]:
    """Write the volume bench's model: the registry's ``unet3d``, random weights seeded by `seed`
    (run in a child: torch inside). One band (CT, windowed to [0, 1]); `num_classes` classes.

    The head's bias is zeroed: with torch's random init it alone decides the argmax (a 48^3
    phantom came out as one class), so the labels would not depend on the image and the two
    sides' agreement would say nothing. Without it the labels follow the image (19 of 117
    classes, 2 of 3 on a 48 x 48 x 32 phantom).

    Returns:
        {"card_path": the card written, "parameters": the model's parameter count}.
    """
    import torch

    from workers.checkpoints import save_checkpoint
    from workers.registry import build_model, native_stride

    arch_args = {"base_channels": base_channels, "depth": depth}
    torch.manual_seed(seed)
    model = build_model("unet3d", in_channels=1, num_classes=num_classes, arch_args=arch_args).eval()
    with torch.no_grad():
        model.head.bias.zero_()
    lo, hi = VOLUME_CT_WINDOW
    fields = {
        "architecture": "unet3d", "arch_args": arch_args, "in_channels": 1,
        "classes": [{"id": k, "name": f"class{k}"} for k in range(num_classes)],
        "bands": [{"name": "ct", "window": [lo, hi], "mean": lo, "std": hi - lo}],
        "tile_size": tile_size, "halo": halo, "stride": native_stride("unet3d", arch_args),
        "training": {"weights": f"random (torch.manual_seed({seed})), head bias 0, for benchmarking only"},
    }
    name = f"bench-unet3d-w{base_channels}-d{depth}-k{num_classes}-seed{seed}"
    card = save_checkpoint(model, fields, Path(out_dir), name=name)
    return {"card_path": str(card), "parameters": sum(p.numel() for p in model.parameters())}


def _is_out_of_memory(exc: BaseException) -> bool:
    """torch's and numpy's ways of saying an allocation failed (CPU or GPU)."""
    if isinstance(exc, MemoryError):
        return True
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text
                                              or "failed to allocate" in text)


def run_monai_volume_peer(
    *, card_path: str, scene_path: str, tile_size: int, overlap: float, batch_size: int, device: str,
    precision: str, threads: int, zarr_path: str | None, channels_last: bool = True, fold_bn: bool = True,
    memory_budget_bytes: int | None = None,
) -> dict[str, Any]:
    """MONAI sliding_window_inference over a whole NIfTI volume held in memory (run in a child).

    The volume is read whole (MONAI's design: the input and the K-class float32 output are held
    at once), normalised as the predictor does (clip to the band's window, ``(x - mean) / std``),
    the model wrapped to return softmax probabilities (what tessera blends), Gaussian blending
    (sigma 0.125), ROI ``tile_size``^3, ``sw_batch_size = batch_size``, output on `device`; then
    argmax in z slabs to uint8. Only the inference call and the argmax are timed.

    With `memory_budget_bytes` on CPU, the process runs under an address-space limit
    (RLIMIT_AS) of its size after start-up plus the budget, so MONAI's output buffer fails to
    allocate at once when it does not fit, instead of swapping the machine; that failure, or a
    GPU out-of-memory, is returned as ``{"oom": True, "error": ...}``, not raised. (No limit on
    GPU: CUDA reserves address space far beyond what it uses; the driver's watchdog still guards
    host memory.)

    Returns:
        oom, error, seconds, read_s, voxels_s, peak_rss_bytes (ru_maxrss), gpu_peak_bytes,
        agreement (share of voxels labelled the same as tessera's stored classes; None without
        `zarr_path`), address_space_limit_bytes.
    """
    import contextlib
    import resource

    import nibabel as nib
    import psutil
    import torch
    from monai.inferers import sliding_window_inference

    from workers.checkpoints import build_from_checkpoint, load_checkpoint
    from workers.predictor import fold_batchnorm, memory_format, resolve_autocast_dtype, resolve_device

    dev = resolve_device(device)
    if dev.type == "cpu":
        torch.set_num_threads(threads)
    ckpt = load_checkpoint(Path(card_path))
    card = ckpt.card
    fmt = memory_format(channels_last=channels_last, spatial_dims=3)
    model = build_from_checkpoint(ckpt).eval()
    model = (fold_batchnorm(model) if fold_bn else model).to(dev).to(memory_format=fmt)
    dtype = resolve_autocast_dtype(precision, dev)
    limit = None
    if memory_budget_bytes is not None and dev.type == "cpu":
        limit = psutil.Process().memory_info().vms + int(memory_budget_bytes)
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))

    def peak_rss() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux

    band = card.bands[0]
    result: dict[str, Any] = {"oom": False, "error": None, "address_space_limit_bytes": limit}
    try:
        t_read = time.perf_counter()
        # the whole volume in one array, (z, y, x): NIfTI stores (x, y, z)
        raw = np.asarray(nib.load(scene_path).dataobj).transpose(2, 1, 0)
        x = np.empty(raw.shape, np.float32)
        np.copyto(x, raw, casting="unsafe")
        del raw
        if band.window is not None:
            np.clip(x, band.window[0], band.window[1], out=x)
        x -= np.float32(band.mean)
        x *= np.float32(1.0 / band.std)
        inputs = torch.from_numpy(x)[None, None]
        result["read_s"] = time.perf_counter() - t_read
        stride = card.stride

        def predictor(tiles: torch.Tensor) -> torch.Tensor:
            pads = [(-n) % stride for n in tiles.shape[-3:]]
            if any(pads):  # roi larger than the volume: MONAI pads to the roi; the stride needs more
                tiles = torch.nn.functional.pad(tiles, (0, pads[2], 0, pads[1], 0, pads[0]), mode="replicate")
            tiles = tiles.to(dev).contiguous(memory_format=fmt)
            autocast = torch.autocast(device_type=dev.type, dtype=dtype) if dtype else contextlib.nullcontext()
            with autocast:
                logits = model(tiles)
            d, h, w = (n - p for n, p in zip(logits.shape[-3:], pads))
            return torch.softmax(logits[..., :d, :h, :w].float(), dim=1)

        depth = inputs.shape[2]
        labels = np.empty(inputs.shape[2:], np.uint8)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        t0 = time.perf_counter()
        with torch.inference_mode():
            probs = sliding_window_inference(
                inputs, roi_size=(tile_size,) * 3, sw_batch_size=batch_size, predictor=predictor,
                overlap=overlap, mode="gaussian", sigma_scale=0.125, sw_device=dev, device=dev,
            )
            del inputs
            for z in range(0, depth, _ARGMAX_PLANES):
                slab = torch.argmax(probs[0, :, z : z + _ARGMAX_PLANES], dim=0)
                labels[z : z + _ARGMAX_PLANES] = slab.to(torch.uint8).cpu().numpy()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        seconds = time.perf_counter() - t0
        del probs, x
    except Exception as exc:  # only out-of-memory is a result; anything else is a failure
        if not _is_out_of_memory(exc):
            raise
        result.update(oom=True, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}",
                      peak_rss_bytes=peak_rss(),
                      gpu_peak_bytes=torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None)
        return result
    result.update(
        seconds=seconds, voxels_s=labels.size / seconds, peak_rss_bytes=peak_rss(),
        gpu_peak_bytes=torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None,
        agreement=None if zarr_path is None else _agreement_3d(zarr_path, labels),
    )
    return result


def _agreement_3d(zarr_path: str, labels: np.ndarray) -> float | None:
    """Share of the voxels valid in tessera's stored classes that `labels` labels the same."""
    import zarr

    from schemas import store as layout

    stored = zarr.open_array(zarr_path, path=layout.classes_path(3), mode="r")
    if tuple(stored.shape) != labels.shape:
        raise ValueError(f"{zarr_path}: classes of shape {tuple(stored.shape)}, MONAI's labels {labels.shape}")
    depth = stored.chunks[0]
    same = n_valid = 0
    for z in range(0, labels.shape[0], depth):
        ours = stored[z : z + depth]
        mask = ours != layout.NODATA_CLASS
        n_valid += int(mask.sum())
        same += int((ours[mask] == labels[z : z + depth][mask]).sum())
    return same / n_valid if n_valid else None
