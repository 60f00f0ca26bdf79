"""Submitting a job to a Ray cluster through Ray Jobs, and asking after it.

`tessera submit job.yaml --address http://HEAD:8265` packs what the job needs into a Ray
`working_dir` (the spec, rewritten so that its paths mean on the cluster what they mean here,
input manifests, and the model cards and weights it names), ships tessera's own code beside it as
`py_modules`, and starts `python -m pipelines.cli run job.yaml` on the cluster: the job's driver
runs on the head node and its log is the `tessera run` output. Inputs and the output root are not
uploaded: they must be paths the cluster's nodes can read and write (a shared filesystem).

Token authentication (Ray 2.60): the dashboard's HTTP API takes `Authorization: Bearer <token>`.
The token is found here as Ray finds it (`RAY_AUTH_TOKEN`, else the file named by
`RAY_AUTH_TOKEN_PATH`, else `~/.ray/auth_token`) and passed as that header to
`JobSubmissionClient`; it is never printed, logged, put in the job's runtime environment or
written to any output.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipelines.plan.scenes import MANIFEST_PREFIX, manifest_path, read_manifest
from pipelines.run.progress import parse_progress
from pipelines.spec import load_job_spec
from pipelines.writers.outroot import as_location
from schemas.errors import ClusterError, InputError, JobSpecError, ModelCardError
from schemas.job import BUILTIN_PREFIX, parse_job_spec
from schemas.model_card import parse_model_card
from workers.checkpoints import resolve_card_path

TOKEN_ENV = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"
DEFAULT_TOKEN_FILE = Path(".ray") / "auth_token"  # under the home folder

RAY_PACKAGE_LIMIT_BYTES = 512 * 2**20

"""The most Ray 2.60 takes in one uploaded runtime-env package: its gRPC message size limit
(`RAY_max_grpc_message_size`, 512 MiB by default; `ray._private.runtime_env.packaging`)."""

SPEC_FILE = "job.yaml"  # the spec's name in the package
MODELS_DIR = "models"
MANIFESTS_DIR = "inputs"
METADATA_ROOT = "tessera_output_root"
METADATA_NAME = "tessera_job_name"
CODE_PACKAGES = ("pipelines", "schemas", "workers")  # shipped as py_modules


@dataclass(frozen=True)
class AuthToken:
    """A Ray cluster token and where it was found. Its text form names the source, never the value."""

    value: str = field(repr=False)
    source: str

    def __str__(self) -> str:
        return f"the token from {self.source}"

    def headers(self) -> dict[str, str]:
        """The HTTP header Ray's dashboard checks (`Authorization: Bearer <token>`)."""
        return {"Authorization": f"Bearer {self.value}"}


def find_auth_token(env: Mapping[str, str], home: Path) -> AuthToken | None:
    """The token Ray itself would use, in Ray's order: `RAY_AUTH_TOKEN`, else the file
    `RAY_AUTH_TOKEN_PATH` names, else `~/.ray/auth_token`; surrounding whitespace stripped.

    Args:
        env: the environment (os.environ).
        home: the home folder (Path.home()).

    Returns:
        The token, or None when there is none (a cluster without token authentication).

    Raises:
        ClusterError: `RAY_AUTH_TOKEN_PATH` names a file that cannot be read or is empty (Ray
            treats that as a misconfiguration too, rather than falling back).
    """
    if env.get(TOKEN_ENV, "").strip():
        return AuthToken(env[TOKEN_ENV].strip(), TOKEN_ENV)
    if env.get(TOKEN_PATH_ENV):
        path = Path(env[TOKEN_PATH_ENV]).expanduser()
        try:
            value = path.read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ClusterError(f"{path}: cannot read the Ray token file named by {TOKEN_PATH_ENV}: "
                               f"{exc.strerror or type(exc).__name__}") from None
        if not value:
            raise ClusterError(f"{path}: the Ray token file named by {TOKEN_PATH_ENV} is empty")
        return AuthToken(value, f"{TOKEN_PATH_ENV} ({path})")
    path = home / DEFAULT_TOKEN_FILE
    try:
        value = path.read_text().strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise ClusterError(f"{path}: cannot read the Ray token file: {exc.strerror or type(exc).__name__}") from None
    return AuthToken(value, str(path)) if value else None


def package_limit_bytes(env: Mapping[str, str]) -> int:
    """Ray's limit on one uploaded package, as the submitting Ray computes it."""
    return int(env.get("RAY_max_grpc_message_size", RAY_PACKAGE_LIMIT_BYTES))


@dataclass(frozen=True)
class JobPackage:
    """A job staged for upload as a Ray `working_dir`.

    Attributes:
        dir: the folder to upload (SPEC_FILE, MANIFESTS_DIR/, MODELS_DIR/).
        size_bytes: bytes of its files (what Ray zips and uploads).
        output_root: the spec's output root (absolute; where the cluster writes).
        job_name: the spec's `name`.
        files: package-relative paths of its files with their sizes in bytes, largest first.
    """

    dir: Path
    size_bytes: int
    output_root: str
    job_name: str
    files: tuple[tuple[str, int], ...]


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def stage_job_package(spec_path: Path, out_dir: Path, *, upload_models: bool = True,
                      limit_bytes: int = RAY_PACKAGE_LIMIT_BYTES) -> JobPackage:
    """Put a job spec and what it needs into `out_dir`, rewritten to run from there on a cluster.

    Relative input paths and globs become absolute against the spec's folder (the cluster must
    see them at those paths); an input manifest (`@file`) found here is copied with its entries
    made absolute likewise; a model card found here is copied with its weights under `models/`
    (with `upload_models=False`, or `builtin:` cards, the reference is kept, made absolute).
    Nothing is copied when the package would exceed `limit_bytes`.

    Raises:
        JobSpecError: the spec is invalid, or its output root is relative.
        ModelCardError: a card to upload is missing or invalid here.
        InputError: a relative input manifest is missing here.
        ClusterError: the package would exceed Ray's upload limit (names the largest files).
    """
    spec = load_job_spec(spec_path)
    base_dir = spec_path.resolve().parent
    root = as_location(spec.output.root)  # an s3:// root passes as it is (credentials in it refused)
    if isinstance(root, Path):
        root = root.expanduser()
    if isinstance(root, Path) and not root.is_absolute():
        raise JobSpecError(
            f"{spec_path}: output.root {spec.output.root!r} is relative; on the cluster it would land in the "
            "job's temporary working folder and be lost. Give an absolute path that the cluster's nodes can "
            "write (on a multi-node cluster a shared filesystem, with output.shared_filesystem: true)")
    raw = spec.model_dump(mode="json", exclude_unset=True)
    copies: list[tuple[Path, str]] = []  # (source here, path in the package)
    manifests: dict[str, list[str]] = {}  # package path -> entries

    inputs = []
    for entry in spec.inputs:
        path = manifest_path(entry, base_dir=base_dir)
        if path is not None:
            if path.is_file():
                name = f"{MANIFESTS_DIR}/{len(manifests)}-{path.name}"
                manifests[name] = [e if "://" in e else os.path.abspath(e) for e in read_manifest(path)]
                inputs.append(MANIFEST_PREFIX + name)
            elif Path(entry[len(MANIFEST_PREFIX):]).expanduser().is_absolute():
                inputs.append(entry)  # a manifest on the cluster's filesystem
            else:
                raise InputError(f"{path}: input manifest not found (a relative manifest is uploaded with the job)")
        elif "://" in entry or os.path.isabs(os.path.expanduser(entry)):
            inputs.append(entry)
        else:
            inputs.append(str(base_dir / entry))
    raw["inputs"] = inputs
    raw.setdefault("output", {})["root"] = str(root)

    def card_ref(ref: str, slot: int) -> str:
        if ref.startswith(BUILTIN_PREFIX):
            return ref  # shipped with the code
        card_path = resolve_card_path(ref, base_dir=base_dir)
        if not upload_models:
            return str(card_path.resolve())
        try:
            card = parse_model_card(card_path.read_text(), source=str(card_path))
        except FileNotFoundError:
            raise ModelCardError(f"{card_path}: model card not found here (to use a card on the cluster's "
                                 "filesystem, give its absolute path and submit with --no-upload-models)") from None
        weights = card_path.parent / card.weights
        if not weights.is_file():
            raise ModelCardError(f"{weights}: weights named by {card_path} not found")
        folder = f"{MODELS_DIR}/{slot}"
        copies.extend([(card_path, f"{folder}/{card_path.name}"), (weights, f"{folder}/{card.weights}")])
        return f"{folder}/{card_path.name}"

    model = raw.setdefault("model", {})
    model["card"] = card_ref(spec.model.card, 0)
    if spec.model.ensemble:
        model["ensemble"] = [{**m, "card": card_ref(member.card, i + 1)}
                             for i, (m, member) in enumerate(zip(model["ensemble"], spec.model.ensemble))]

    spec_text = yaml.safe_dump(raw, sort_keys=False)
    parse_job_spec(spec_text, source=f"{spec_path} (as submitted)")  # the rewrite is still a valid spec
    texts = {SPEC_FILE: spec_text, **{name: "\n".join(entries) + "\n" for name, entries in manifests.items()}}
    sizes = [(name, len(text.encode())) for name, text in texts.items()]
    sizes += [(dest, src.stat().st_size) for src, dest in copies]
    sizes.sort(key=lambda item: -item[1])
    total = sum(n for _, n in sizes)
    if total >= limit_bytes:
        largest = ", ".join(f"{name} {_mib(n)}" for name, n in sizes[:3])
        raise ClusterError(
            f"{spec_path}: the job's upload would be {_mib(total)} ({largest}); Ray takes at most "
            f"{_mib(limit_bytes)} in one package. Put the model on a shared path the cluster's nodes can read "
            "(or in object storage mounted there), name it by absolute path and submit with --no-upload-models")
    for name, text in texts.items():
        (out_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (out_dir / name).write_text(text)
    for src, dest in copies:
        (out_dir / dest).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, out_dir / dest)
    return JobPackage(dir=out_dir, size_bytes=total, output_root=str(root), job_name=spec.name, files=tuple(sizes))


def code_dirs() -> list[Path]:
    """The folders of tessera's own packages (shipped with each job as Ray `py_modules`)."""
    import importlib

    return [Path(importlib.import_module(name).__file__).parent for name in CODE_PACKAGES]


@dataclass(frozen=True)
class JobsClient:
    """A Ray Jobs client (`ray.job_submission.JobSubmissionClient`) with the token it sends."""

    client: Any
    address: str
    token: AuthToken | None = field(default=None, repr=False)


def connect(address: str | None, token: AuthToken | None) -> JobsClient:
    """A Jobs client for the dashboard at `address` (http://HEAD:8265; None: Ray's own default,
    RAY_API_SERVER_ADDRESS or RAY_ADDRESS), sending `token` as the `Authorization: Bearer` header.

    Raises:
        ClusterError: the dashboard cannot be reached, or refuses the token or its absence (the
            message names the token's source, never its value).
    """
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        client = JobSubmissionClient(address, headers=token.headers() if token else None)
    except AuthenticationError as exc:
        raise ClusterError(_auth_message(address or "the Ray cluster", token, exc)) from None
    except ConnectionError as exc:
        raise ClusterError(f"{address or 'RAY_ADDRESS'}: cannot reach the Ray dashboard ({exc}); is the cluster up "
                           "and its dashboard port (8265) reachable, e.g. through `ray dashboard cluster.yaml`?") from None
    return JobsClient(client=client, address=client.get_address(), token=token)


def _auth_message(where: str, token: AuthToken | None, exc: Exception) -> str:
    if token is None:
        return (f"{where}: the cluster asks for a token and none was found here: set {TOKEN_ENV}, or "
                f"{TOKEN_PATH_ENV} to a file holding it, or put it in ~/{DEFAULT_TOKEN_FILE} "
                "(`ray get-auth-token` on the head node prints it)")
    status = "HTTP 401" if str(exc).startswith("Authentication required") else "HTTP 403"
    return (f"{where}: the cluster refused {token} ({status}); use the cluster's own token "
            "(`ray get-auth-token` on the head node prints it)")


def _call(jobs: JobsClient, job_id: str, fn: Callable[[], Any]) -> Any:
    """Run a Jobs API call, turning Ray's errors into ClusterError (unknown job, refused token)."""
    from ray.exceptions import AuthenticationError

    try:
        return fn()
    except AuthenticationError as exc:
        raise ClusterError(_auth_message(jobs.address, jobs.token, exc)) from None
    except RuntimeError as exc:
        text = str(exc)
        if "404" in text or "does not exist" in text:
            raise ClusterError(f"{jobs.address}: no job {job_id!r} on this cluster") from None
        raise ClusterError(f"{jobs.address}: job {job_id!r}: {text[:500]}") from None
    except OSError as exc:  # requests' connection errors
        raise ClusterError(f"{jobs.address}: the Ray dashboard did not answer ({type(exc).__name__}); is the "
                           "cluster up?") from None


def submit_package(jobs: JobsClient, package: JobPackage, *, python: str = "python",
                   submission_id: str | None = None) -> str:
    """Submit a staged job: upload the package and tessera's code, run `tessera run` on the cluster.

    Args:
        jobs: from `connect`.
        package: from `stage_job_package`.
        python: the cluster's Python command (the one with tessera's dependencies installed).
        submission_id: the job id to use (default: Ray's, raysubmit_...).

    Returns:
        The job id.
    """
    entrypoint = f"{shlex.quote(python)} -m pipelines.cli run {SPEC_FILE}"
    runtime_env = {"working_dir": str(package.dir), "py_modules": [str(d) for d in code_dirs()],
                   "excludes": ["__pycache__", "*.pyc"]}
    metadata = {METADATA_ROOT: package.output_root, METADATA_NAME: package.job_name}
    return _call(jobs, submission_id or "(new)", lambda: jobs.client.submit_job(
        entrypoint=entrypoint, runtime_env=runtime_env, metadata=metadata, submission_id=submission_id))


@dataclass(frozen=True)
class SubmittedJob:
    """A submitted job as Ray Jobs reports it, with tessera's last progress line from its log.

    Attributes:
        job_id: the submission id.
        status: PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED.
        message: Ray's message (why it failed or stopped).
        output_root: where the job writes (from the submission's metadata; "" if not a tessera job).
        progress: the last progress line of the log (`pipelines.run.progress.parse_progress`), or None.
        start_time_ms, end_time_ms: Unix milliseconds (None while unknown).
    """

    job_id: str
    status: str
    message: str
    output_root: str
    progress: dict[str, Any] | None
    start_time_ms: int | None
    end_time_ms: int | None

    @property
    def finished(self) -> bool:
        return self.status in ("SUCCEEDED", "FAILED", "STOPPED")


def job_status(jobs: JobsClient, job_id: str) -> SubmittedJob:
    """Ray's status of a job and the last progress line of its log."""
    info = _call(jobs, job_id, lambda: jobs.client.get_job_info(job_id))
    logs = _call(jobs, job_id, lambda: jobs.client.get_job_logs(job_id))
    return SubmittedJob(job_id=job_id, status=str(getattr(info.status, "value", info.status)),
                        message=info.message or "", output_root=(info.metadata or {}).get(METADATA_ROOT, ""),
                        progress=parse_progress(logs or ""), start_time_ms=info.start_time,
                        end_time_ms=info.end_time)


def job_logs(jobs: JobsClient, job_id: str) -> str:
    """The job's whole log so far."""
    return _call(jobs, job_id, lambda: jobs.client.get_job_logs(job_id))


def follow_job_logs(jobs: JobsClient, job_id: str, emit: Callable[[str], None]) -> None:
    """Stream the job's log to `emit` until the job ends."""
    async def tail() -> None:
        async for lines in jobs.client.tail_job_logs(job_id):
            emit(lines)

    _call(jobs, job_id, lambda: jobs.client.get_job_info(job_id))  # an unknown job fails here, clearly
    _call(jobs, job_id, lambda: asyncio.run(tail()))


def stop_job(jobs: JobsClient, job_id: str) -> bool:
    """Ask Ray to stop a job (SIGTERM to its driver, SIGKILL later); True if it was running."""
    return bool(_call(jobs, job_id, lambda: jobs.client.stop_job(job_id)))
