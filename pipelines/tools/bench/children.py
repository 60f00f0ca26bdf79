"""Measurement functions run in fresh Python processes, arguments and results as JSON files.

The driver (the bench process, which is also the job's driver) never imports torch, like
`tessera run`: the device probe, the bare model and the MONAI peer run in children started with
``python -c "from pipelines.tools.bench.children import child_main; ..."``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipelines.tools.bench.peers import make_volume_card, measure_raw, run_monai_peer, run_monai_volume_peer
from pipelines.tools.bench.probes import probe_device
from workers.runtime import with_malloc_tunables

#: The functions a child may run, by the name the driver sends.
CHILD_FUNCTIONS: dict[str, Callable[..., dict[str, Any]]] = {
    "measure_raw": measure_raw,
    "run_monai_peer": run_monai_peer,
    "probe_device": probe_device,
    "make_volume_card": make_volume_card,
    "run_monai_volume_peer": run_monai_volume_peer,
    "run_tessera_volume": lambda **kw: _tessera_volume(**kw),
}


def _tessera_volume(**kwargs: Any) -> dict[str, Any]:
    from pipelines.tools.bench.volume import run_tessera_volume  # Ray and the job, only in that child

    return run_tessera_volume(**kwargs)


class ChildOutOfMemory(RuntimeError):
    """A measurement child (with its descendants) went over its memory limit and was stopped.

    Attributes:
        limit_bytes: the limit it was run under.
        peak_bytes: the largest summed PSS of its process tree that was sampled.
    """

    def __init__(self, name: str, limit_bytes: int, peak_bytes: int):
        super().__init__(f"benchmark child {name} held {peak_bytes / 2**30:.2f} GiB with its descendants, over its "
                         f"limit of {limit_bytes / 2**30:.2f} GiB: stopped")
        self.limit_bytes, self.peak_bytes = limit_bytes, peak_bytes
#: pipelines/tools/bench/children.py -> the repository root, put on the child's PYTHONPATH.
_REPO_ROOT = Path(__file__).resolve().parents[3]
#: What a child runs: `python -c _CHILD_CODE args.json result.json`.
_CHILD_CODE = "import sys; from pipelines.tools.bench.children import child_main; child_main(*sys.argv[1:])"


def run_in_child(name: str, *, malloc_tuning: bool = False, memory_limit_bytes: int | None = None,
                 **kwargs: Any) -> dict[str, Any]:
    """Run one of :data:`CHILD_FUNCTIONS` in a fresh Python process; return its result.

    A fresh interpreter (not a fork of the driver, which holds Ray's threads) gives the
    measurement its own memory peak and torch threads, and needs no `__main__` guard in the
    caller's script. Arguments and the result travel as JSON files. With `malloc_tuning` the child
    starts with the malloc tunables the job gives its predictor actors (workers.runtime), so the
    bare model and the peer run under the same allocator as the job's model.

    With `memory_limit_bytes`, the summed PSS of the child and every process it started (a local
    Ray's daemons and workers included) is sampled every :data:`WATCH_INTERVAL_S`; over the
    limit, those processes are killed, by id, descendants first, and :class:`ChildOutOfMemory`
    is raised: a runaway measurement stops before it takes the machine down.

    Raises:
        ChildOutOfMemory: the child went over `memory_limit_bytes`.
        RuntimeError: the child failed; the message ends with its stderr.
    """
    import tempfile

    if name not in CHILD_FUNCTIONS:
        raise ValueError(f"unknown child function {name!r}; known: {tuple(CHILD_FUNCTIONS)}")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    if malloc_tuning:
        env.update(with_malloc_tunables(env))
    with tempfile.TemporaryDirectory(prefix="tessera-bench-") as tmp:
        args, out = Path(tmp) / "args.json", Path(tmp) / "result.json"
        args.write_text(json.dumps({"name": name, "kwargs": kwargs}))
        command = [sys.executable, "-c", _CHILD_CODE, str(args), str(out)]
        if memory_limit_bytes is None:
            proc = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
            returncode, stderr = proc.returncode, proc.stderr
        else:
            returncode, stderr = _run_watched(name, command, env, int(memory_limit_bytes), Path(tmp))
        if returncode != 0 or not out.is_file():
            raise RuntimeError(f"benchmark child {name} failed (exit {returncode}):\n{stderr[-4000:]}")
        return json.loads(out.read_text())


#: Seconds between two memory samples of a watched child's process tree.
WATCH_INTERVAL_S = 0.25


def _run_watched(name: str, command: list[str], env: dict[str, str], limit: int, tmp: Path) -> tuple[int, str]:
    """Run `command`, killing its process tree when its summed PSS exceeds `limit`."""
    import psutil

    from pipelines.tools.monitor import tree_memory

    err_path = tmp / "stderr.txt"
    with open(err_path, "w") as err:
        proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=err)
        peak = 0
        try:
            while proc.poll() is None:
                try:
                    pss, _ = tree_memory(proc.pid)
                except psutil.NoSuchProcess:
                    break
                peak = max(peak, pss)
                if pss > limit:
                    _kill_tree(proc)
                    raise ChildOutOfMemory(name, limit, peak)
                time.sleep(WATCH_INTERVAL_S)
        except BaseException:
            if proc.poll() is None:
                _kill_tree(proc)
            raise
        proc.wait()
    return proc.returncode, err_path.read_text(errors="replace")


def _kill_tree(proc: subprocess.Popen) -> None:
    """Kill a child we started and every process it started (by id: descendants, then it)."""
    import psutil

    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    for p in reversed(children):
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.kill()
    proc.wait()
    psutil.wait_procs(children, timeout=10)


def child_main(args_path: str, out_path: str) -> None:
    """Entry point of a measurement child: read arguments, run, write the result."""
    request = json.loads(Path(args_path).read_text())
    if request["name"] not in CHILD_FUNCTIONS:
        raise ValueError(f"unknown child function {request['name']!r}")
    result = CHILD_FUNCTIONS[request["name"]](**request["kwargs"])
    Path(out_path).write_text(json.dumps(result))

