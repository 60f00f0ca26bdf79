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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipelines.tools.bench.peers import measure_raw, run_monai_peer
from pipelines.tools.bench.probes import probe_device
from workers.runtime import with_malloc_tunables

#: The functions a child may run, by the name the driver sends.
CHILD_FUNCTIONS: dict[str, Callable[..., dict[str, Any]]] = {
    "measure_raw": measure_raw,
    "run_monai_peer": run_monai_peer,
    "probe_device": probe_device,
}
#: pipelines/tools/bench/children.py -> the repository root, put on the child's PYTHONPATH.
_REPO_ROOT = Path(__file__).resolve().parents[3]
#: What a child runs: `python -c _CHILD_CODE args.json result.json`.
_CHILD_CODE = "import sys; from pipelines.tools.bench.children import child_main; child_main(*sys.argv[1:])"


def run_in_child(name: str, *, malloc_tuning: bool = False, **kwargs: Any) -> dict[str, Any]:
    """Run one of :data:`CHILD_FUNCTIONS` in a fresh Python process; return its result.

    A fresh interpreter (not a fork of the driver, which holds Ray's threads) gives the
    measurement its own memory peak and torch threads, and needs no `__main__` guard in the
    caller's script. Arguments and the result travel as JSON files. With `malloc_tuning` the child
    starts with the malloc tunables the job gives its predictor actors (workers.runtime), so the
    bare model and the peer run under the same allocator as the job's model.

    Raises:
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
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD_CODE, str(args), str(out)],
            env=env, capture_output=True, text=True, check=False,
        )
        if proc.returncode != 0 or not out.is_file():
            raise RuntimeError(f"benchmark child {name} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        return json.loads(out.read_text())


def child_main(args_path: str, out_path: str) -> None:
    """Entry point of a measurement child: read arguments, run, write the result."""
    request = json.loads(Path(args_path).read_text())
    if request["name"] not in CHILD_FUNCTIONS:
        raise ValueError(f"unknown child function {request['name']!r}")
    result = CHILD_FUNCTIONS[request["name"]](**request["kwargs"])
    Path(out_path).write_text(json.dumps(result))

