"""Where ``parpkit sweep`` runs its points: in this process (the default), as Ray tasks, or as Slurm jobs
through submitit.

Every launcher runs the same thing per point: :func:`run_point`, which is ``parpkit.run(point mapping,
output_dir=SWEEP_DIR/<point>, shared=SWEEP_DIR/shared, file=...)``, the call the in-process sweep makes.
So a finished point is skipped, a killed one resumes from its checkpoints, and work points repeat is done
once in the shared folder under its lock, whichever launcher ran them. A worker never raises: it returns an
:class:`Outcome` (finished, busy, failed, or failed unexpectedly with its traceback), which the sweep reports
by point exactly as it reports the points it runs itself; a worker that dies (killed, out of memory, past
its time limit) is reported as that point failing unexpectedly.

Ray and submitit are optional extras (``pip install 'parpkit[ray]'``, ``'parpkit[slurm]'``), imported only
when their launcher is asked for.
"""

from __future__ import annotations

import importlib
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from parpkit.errors import ParpkitError

LAUNCHERS = ("local", "ray", "slurm")
#: the Python module each launcher needs and the extra that installs it
EXTRAS = {"ray": ("ray", "ray"), "slurm": ("submitit", "slurm")}


@dataclass(frozen=True)
class Outcome:
    state: str  # "finished", "busy" (another process holds the run directory), "failed", "unexpected"
    message: str = ""
    traceback: str = ""  # for "unexpected" (not for OSErrors: the one line says it)
    pid: int = 0  # the process that ran the point (0: none did, its worker died)


@dataclass(frozen=True)
class Job:
    """One point as a worker runs it."""

    name: str
    mapping: dict[str, Any]
    run_dir: str
    shared: str
    file: str


@dataclass(frozen=True)
class Resources:
    cpus: float | None = None  # per point
    gpus: float | None = None  # per point
    address: str | None = None  # ray: an existing cluster (default: a local instance)
    partition: str | None = None  # slurm
    time_min: int | None = None  # slurm: each job's time limit in minutes
    max_parallel: int | None = None  # slurm: points running at once (the job array's parallelism)
    slurm_local: bool = False  # submitit's LocalExecutor: the points as local processes (for testing)
    folder: str | None = None  # submitit's logs and pickles (default SWEEP_DIR/submitit)


#: flags that only one launcher reads, and the launchers that read the others
ONLY = {"address": ("--address", ("ray",)), "partition": ("--partition", ("slurm",)), "time_min": ("--time-min", ("slurm",)),
        "max_parallel": ("--max-parallel", ("slurm",)), "slurm_local": ("--slurm-local", ("slurm",)),
        "cpus": ("--cpus-per-point", ("ray", "slurm")), "gpus": ("--gpus-per-point", ("ray", "slurm"))}


def check(launcher: str, resources: Resources) -> None:
    """A flag the launcher would ignore, or a count that is not positive, is refused before anything runs."""
    for field, (flag, launchers) in ONLY.items():
        value = getattr(resources, field)
        if value is None or value is False:
            continue
        if launcher not in launchers:
            raise ParpkitError(f"{flag} is for --launcher {' or '.join(launchers)}, not {launcher}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ParpkitError(f"{flag} must be a finite number, got {value}")
        if not isinstance(value, bool) and isinstance(value, (int, float)) and (value <= 0 if field != "gpus" else value < 0):
            raise ParpkitError(f"{flag} must be {'positive' if field != 'gpus' else 'zero or more'}, got {value:g}")
        if launcher == "slurm" and field in ("cpus", "gpus") and value != int(value):
            raise ParpkitError(f"{flag} must be a whole number for Slurm, got {value:g} (Ray takes fractions)")


def require(launcher: str) -> Any:
    """The module a launcher needs, or a ParpkitError naming the extra that installs it."""
    if launcher not in EXTRAS:
        return None
    module, extra = EXTRAS[launcher]
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ParpkitError(f"--launcher {launcher} needs {module}: pip install 'parpkit[{extra}]'") from None


def run_point(job: Job, quiet: bool = True, env: Mapping[str, str] | None = None) -> Outcome:
    """Run one sweep point (in a worker process, or in the sweep's own); never raises."""
    from parpkit.api import run
    from parpkit.errors import RunDirBusy
    from parpkit.progress import Progress

    for key, value in (env or {}).items():  # the sweep's PARPKIT_* settings (its cache) on the worker
        os.environ.setdefault(key, value)
    try:
        run(job.mapping, output_dir=Path(job.run_dir), progress=Progress(enabled=not quiet), shared=Path(job.shared),
            file=job.file)
    except RunDirBusy as exc:
        return Outcome("busy", str(exc), pid=os.getpid())
    except ParpkitError as exc:
        return Outcome("failed", str(exc), pid=os.getpid())
    except Exception as exc:  # noqa: BLE001  (a bug in one point: the others still run; its traceback is shown)
        import traceback

        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return Outcome("unexpected", f"{type(exc).__name__}: {first}",
                       "" if isinstance(exc, OSError) else traceback.format_exc(), os.getpid())
    return Outcome("finished", pid=os.getpid())


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith("PARPKIT_")}


def _died(exc: BaseException) -> Outcome:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return Outcome("unexpected", f"the worker died: {type(exc).__name__}: {first}")


Report = Callable[[Job, Outcome], None]


def launch(launcher: str, jobs: Sequence[Job], resources: Resources, quiet: bool, started: Callable[[int, Job], None],
           report: Report) -> None:
    """Run ``jobs`` with ``launcher``; ``started(i, job)`` when one is handed out, ``report(job, outcome)``
    as each ends."""
    if launcher == "local":
        for i, job in enumerate(jobs, 1):
            started(i, job)
            report(job, run_point(job, quiet))
    elif launcher == "ray":
        _ray(jobs, resources, started, report)
    elif launcher == "slurm":
        _slurm(jobs, resources, started, report)
    else:
        raise ParpkitError(f"unknown launcher {launcher!r}; launchers: {', '.join(LAUNCHERS)}")


def _ray(jobs: Sequence[Job], resources: Resources, started: Callable[[int, Job], None], report: Report) -> None:
    ray = require("ray")
    mine = not ray.is_initialized()
    if mine:  # a local instance, or the cluster at --address
        ray.init(address=resources.address, log_to_driver=False)
    try:
        options = {"num_cpus": 1 if resources.cpus is None else resources.cpus, "num_gpus": resources.gpus or 0,
                   "max_retries": 0}
        remote = ray.remote(run_point).options(**options)
        pending = {}
        for i, job in enumerate(jobs, 1):
            started(i, job)
            pending[remote.remote(job, True, _env())] = job
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            job = pending.pop(done[0])
            try:
                outcome = ray.get(done[0])
            except Exception as exc:  # noqa: BLE001  (the worker crashed: that point fails, the others go on)
                outcome = _died(exc)
            report(job, outcome)
    finally:
        if mine:
            ray.shutdown()


def _slurm(jobs: Sequence[Job], resources: Resources, started: Callable[[int, Job], None], report: Report) -> None:
    submitit = require("slurm")
    folder = Path(resources.folder) / "%j"
    params: dict[str, Any] = {}
    if resources.time_min is not None:
        params["timeout_min"] = resources.time_min
    if resources.slurm_local:
        executor = submitit.LocalExecutor(folder=folder)
        if resources.gpus:
            params["gpus_per_node"] = int(resources.gpus)
    else:
        try:
            executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
        except RuntimeError as exc:  # no srun here
            raise ParpkitError(f"--launcher slurm found no Slurm here ({exc}); run the sweep on the cluster's login "
                               "node, or add --slurm-local to run the jobs as local processes") from None
        params.update({"name": "parpkit-sweep", "nodes": 1, "tasks_per_node": 1})
        if resources.partition:
            params["slurm_partition"] = resources.partition
        if resources.cpus:
            params["cpus_per_task"] = int(resources.cpus)
        if resources.gpus:
            params["gpus_per_node"] = int(resources.gpus)
        if resources.max_parallel:
            params["slurm_array_parallelism"] = resources.max_parallel
    executor.update_parameters(**params)
    env = _env()
    # a job array on Slurm (its parallelism caps the points running at once); submitit's local executor has no
    # such cap, so there the points go in waves of --max-parallel
    wave = len(jobs) if not resources.slurm_local or not resources.max_parallel else resources.max_parallel
    for start in range(0, len(jobs), max(wave, 1)):
        batch = list(jobs[start:start + wave])
        for i, job in enumerate(batch, start + 1):
            started(i, job)
        handles = executor.map_array(run_point, batch, [True] * len(batch), [env] * len(batch))
        pending = dict(zip(handles, batch))
        while pending:
            for handle in [h for h in pending if h.done()]:
                job = pending.pop(handle)
                try:
                    outcome = handle.result()
                except Exception as exc:  # noqa: BLE001  (the job died: that point fails, the others go on)
                    outcome = _died(exc)
                report(job, outcome)
            if pending:
                time.sleep(1)
