"""Engines for a command's independent jobs (a scene of build-records or predict, a run of crossval).

`local` runs them on this machine as always (build-records: a pool of processes; predict and
crossval: in this process). `ray` runs them with Ray Core: tasks (a scene of build-records, a run
of crossval) and actors (predict: each loads the model once and predicts the scenes it is given),
on the cluster of RAY_ADDRESS or on an embedded one-machine Ray.

This is the one module that imports Ray, and only when `--engine ray` is chosen. Both engines
classify a job's errors alike (`run_job`): a user's error confined to one job (a bad input file)
fails that job and the others go on; a full or read-only output disk (OutputError) stops the
command; anything else is a bug and raises. Ray may run a job twice (a lost worker or node, a
retried task); the jobs cope by writing under per-attempt temporary names.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

from rts_tf.errors import InputError, OutputError, disk_problem

ENGINES = ("local", "ray")
# Attempts of a job after its worker or node was lost (or killed for memory); a user's error is never retried.
RETRIES = 3
POLL_SECONDS = 0.25
# The embedded Ray's object store: jobs pass only small objects (settings, manifest parts, summaries).
OBJECT_STORE_BYTES = 200 * 2 ** 20
RAY_MISSING = "--engine ray needs Ray: pip install 'rts-tf[ray]'"


@dataclass
class Outcome:
    """How one job ended: its result, or one line saying why it failed."""

    key: str
    result: Any = None
    error: str | None = None


def job_error(error: BaseException) -> str | None:
    """One line for a user's error confined to one job (an unreadable or invalid input file); None
    for errors of the whole command (a full or read-only output disk) and for bugs."""
    if isinstance(error, OutputError):
        return None
    if isinstance(error, InputError):
        return str(error)
    import rasterio.errors
    from rasterio._err import CPLE_BaseError

    if isinstance(error, (rasterio.errors.RasterioError, CPLE_BaseError)) or (
            isinstance(error, OSError) and disk_problem(error) is None):
        # GDAL's details (the file, the block, the codec's complaint) are in the chained errors.
        lines, seen = [], set()
        while error is not None and id(error) not in seen:
            seen.add(id(error))
            text = str(error).strip()
            if text and "see previous exception" not in text.lower():
                lines.append(text.splitlines()[0])
            error = error.__cause__ or error.__context__
        if not lines:
            return "unreadable input (no detail given)"
        return lines[0] + (f" ({lines[-1]})" if len(lines) > 1 and lines[-1] not in lines[0] else "")
    return None


def run_job(function: Callable, item: Any, advance: Callable[[int], None] | None = None) -> tuple[str, Any]:
    """function(item, advance), classified: ("done", result), ("failed", message) for a user's error
    in this job, ("abort", message) for an error that stops the command (OutputError); bugs raise."""
    try:
        return "done", function(item, advance or (lambda tiles: None))
    except OutputError as error:
        return "abort", str(error)
    except Exception as error:
        message = job_error(error)
        if message is None:
            raise
        return "failed", message


def outcome(key: str, status: str, value: Any) -> Outcome:
    if status == "abort":
        raise InputError(value)
    return Outcome(key, result=value) if status == "done" else Outcome(key, error=value)


def local_jobs(function: Callable, items: Sequence, keys: Sequence[str],
               advance: Callable[[int], None] | None = None) -> Iterator[Outcome]:
    """Run jobs one after the other in this process."""
    for key, item in zip(keys, items):
        yield outcome(key, *run_job(function, item, advance))


def quiet_worker() -> None:
    """Initializer of a local pool's worker processes: quiet TensorFlow, and leave Ctrl-C to the
    command's own process, which stops the workers (stop_workers) instead of each printing a
    KeyboardInterrupt traceback. Lives here, in a light module, so a worker ignores Ctrl-C from
    its first moments (unpickling this function imports its module)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def stop_workers(pool) -> None:
    """End a ProcessPoolExecutor's workers now (Ctrl-C, SIGTERM, an aborting error): shutdown would
    wait for their running jobs. Their futures then fail as a broken pool; they are not cancelled
    first, which makes Python 3.11's pool thread print an InvalidStateError traceback."""
    terminate = getattr(pool, "terminate_workers", None)  # Python 3.14
    if terminate is not None:
        terminate()
        return
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        with contextlib.suppress(Exception):
            process.terminate()


def failures_message(failed: dict[str, str], total: int, what: str, kept: str) -> str:
    """The closing error of a command whose jobs partly failed: how many, which and why (one line)."""
    listed = "; ".join(f"{key}: {message}" for key, message in list(failed.items())[:5])
    more = f"; and {len(failed) - 5} more" if len(failed) > 5 else ""
    return f"{len(failed)} of {total} {what} failed ({kept}): {listed}{more}"


# ----------------------------------------------------------------------------------------- Ray


def import_ray():
    """Ray, quiet and without usage reporting; a one-line error when the extra is not installed."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    imported = "ray" in sys.modules
    changed = False
    if not os.environ.get("RAY_ADDRESS") and "RAY_AUTH_MODE" not in os.environ:
        # An embedded Ray gets a token of this process (in its environment, inherited by the Ray
        # processes it starts) instead of Ray's default of a token file written into ~/.ray.
        os.environ["RAY_AUTH_MODE"] = "token"
        if not os.environ.get("RAY_AUTH_TOKEN") and not os.environ.get("RAY_AUTH_TOKEN_PATH"):
            os.environ["RAY_AUTH_TOKEN"] = uuid.uuid4().hex + uuid.uuid4().hex
        changed = True
    try:
        import ray
    except ImportError:
        raise InputError(RAY_MISSING) from None
    if changed and imported:
        # Ray read its settings when it was imported: have it read the token settings again (as
        # ray.init does when it turns token authentication on by itself).
        from ray._raylet import AuthenticationTokenLoader, Config

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()
    return ray


def session_root() -> str:
    """Where an embedded Ray keeps its session folder: short (Ray's socket paths must stay under
    107 characters), RTS_TF_RAY_TMPDIR if set, else /tmp."""
    root = os.environ.get("RTS_TF_RAY_TMPDIR") or ("/tmp" if os.access("/tmp", os.W_OK) else tempfile.gettempdir())
    os.makedirs(root, exist_ok=True)
    return root


def token_available() -> bool:
    return bool(os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
                or os.path.exists(os.path.expanduser("~/.ray/auth_token")))


@contextlib.contextmanager
def own_sigterm():
    """Keep this process's SIGTERM handler across ray.init, which installs its own (a stack dump,
    then an exit without clean-up): SIGTERM stays a clean stop (rts_tf.errors.Terminated)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handler = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        if handler is not None:
            signal.signal(signal.SIGTERM, handler)


class EmbeddedRayStart:
    """An embedded one-machine Ray started in a background thread (its module imported, its GCS,
    raylet and agents launched), so that it starts while the command plans its jobs; ray_session
    takes it over, or close() stops it when the command ends before its jobs ran (an input error)."""

    def __init__(self, workers: int):
        self.workers, self.folder, self.reaper, self.node, self.error = workers, None, None, None, None
        self._thread = threading.Thread(target=self._start, name="ray-start", daemon=True)
        self._thread.start()

    def _start(self) -> None:
        try:
            ray = import_ray()
            self.folder = tempfile.mkdtemp(prefix="rts-ray-", dir=session_root())
            self.reaper = start_reaper(self.folder)
            self.node = start_minimal_node(ray, self.workers, self.folder)
        except BaseException as error:  # ray_session reports it, or starts Ray the ordinary way
            self.error = error

    def result(self):
        """(folder, reaper, node) once started, handed over to the caller (close() then leaves them);
        node None where the minimal start was not possible."""
        self._thread.join()
        if isinstance(self.error, InputError):
            raise self.error
        taken = self.folder, self.reaper, self.node
        self.folder = self.reaper = self.node = None
        return taken

    def close(self) -> None:
        """Stop what was started (the session was never used)."""
        self._thread.join()
        if self.node is not None:
            with contextlib.suppress(Exception):
                self.node.kill_all_processes(check_alive=False, allow_graceful=True)
        if self.folder:
            shutil.rmtree(self.folder, ignore_errors=True)
        stop_reaper(self.reaper)
        self.node = self.folder = self.reaper = None


def start_ray_early(engine: str, workers: int) -> "EmbeddedRayStart | None":
    """Start the embedded Ray of `--engine ray` now, in the background, where ray_session would start
    one (no RAY_ADDRESS, no Ray running in this process); None otherwise. Pass it to ray_session."""
    if engine != "ray" or workers < 1 or os.environ.get("RAY_ADDRESS"):
        return None
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        return None
    return EmbeddedRayStart(workers)


@contextlib.contextmanager
def ray_session(workers: int, started: EmbeddedRayStart | None = None):
    """Ray for one command: the running one (a program that called ray.init), the cluster of
    RAY_ADDRESS, or an embedded one-machine Ray with `workers` CPUs (and this machine's GPUs) whose
    session folder is removed when it shuts down (`started`: one start_ray_early began). Yields the
    ray module."""
    if workers < 1:
        raise InputError(f"--workers must be at least 1, got {workers}")
    ray = import_ray()
    if ray.is_initialized():
        if started is not None:
            started.close()
        yield ray
        return
    options = dict(log_to_driver=False, logging_level=logging.WARNING)
    address = os.environ.get("RAY_ADDRESS")
    if address:
        if "RAY_AUTH_MODE" not in os.environ and token_available():
            os.environ["RAY_AUTH_MODE"] = "token"  # as `ray.init(address="auto")` does when a token exists
        try:
            with own_sigterm():
                ray.init(address=address, **options)
        except Exception as error:  # Ray raises ConnectionError, RuntimeError, AuthenticationError, ...
            text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise InputError(f"RAY_ADDRESS={address}: cannot connect to Ray: {text} (is the cluster running, and "
                             "is RAY_AUTH_MODE=token with its token set where the cluster uses token "
                             "authentication?)") from None
        try:
            yield ray
        finally:
            ray.shutdown()  # disconnects this driver; the cluster stays
        return
    if started is not None:
        try:
            folder, reaper, node = started.result()
        except BaseException:
            started.close()
            raise
    else:
        folder, reaper, node = None, None, None
    if folder is None:
        folder = tempfile.mkdtemp(prefix="rts-ray-", dir=session_root())
        reaper = start_reaper(folder)
    try:
        with own_sigterm():
            if node is None and (started is None or started.error is None):
                node = start_minimal_node(ray, workers, folder)
            if node is not None:
                ray.init(address=node.address, **options)
            else:
                ray.init(address="local", num_cpus=workers, include_dashboard=False, _temp_dir=folder,
                         object_store_memory=OBJECT_STORE_BYTES, _system_config=MINIMAL_SYSTEM_CONFIG, **options)
        yield ray
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if node is not None:
            with contextlib.suppress(Exception):
                node.kill_all_processes(check_alive=False, allow_graceful=True)
        shutil.rmtree(folder, ignore_errors=True)
        stop_reaper(reaper)


# What the embedded Ray needs no part of: metrics, the task timeline, task events for a dashboard.
MINIMAL_SYSTEM_CONFIG = {"enable_metrics_collection": False, "enable_timeline": False,
                         "task_events_report_interval_ms": 0}


def worker_environment() -> dict[str, str]:
    """What the embedded Ray's raylet, and so its workers, run with: glibc's allocator with one arena
    (MALLOC_ARENA_MAX=1, unless set). An actor runs its job in a thread of its own (its generator
    streams the progress), and glibc gives such a thread an arena of 64 MB heaps that it shrinks and
    grows again block after block: twice the page faults and about 2.5 CPU s more system time per
    worker on an 8-scene build than the local engine's workers, whose jobs run in the main thread."""
    return {} if "MALLOC_ARENA_MAX" in os.environ else {"MALLOC_ARENA_MAX": "1"}


def start_minimal_node(ray, workers: int, folder: str):
    """Start an embedded one-machine Ray head with only the processes a command's jobs use: GCS,
    raylet (with its two agents, which it starts itself) and workers. `ray.init(address="local")`
    also starts the dashboard's API server, the autoscaler's monitor, a log monitor and a reaper of
    its own (about 3 CPU seconds and 1 to 6 s of start-up on two cores); the reaper of
    rts_tf.engine replaces Ray's. Uses Ray's private Node class (Ray is pinned): None when that
    fails, and the caller starts Ray the public way."""
    try:
        from ray._private.node import Node
        from ray._private.parameter import RayParams

        class MinimalNode(Node):
            def start_api_server(self, *, include_dashboard, raise_on_failure):  # noqa: ARG002
                """No dashboard and no API server: nothing here reads jobs, state or metrics."""

        params = RayParams(num_cpus=workers, include_dashboard=False, object_store_memory=OBJECT_STORE_BYTES,
                           temp_dir=folder, no_monitor=True, include_log_monitor=False,
                           _system_config=dict(MINIMAL_SYSTEM_CONFIG), env_vars=worker_environment())
        return MinimalNode(params, head=True, shutdown_at_exit=False, spawn_reaper=False, ray_init_cluster=True)
    except (ImportError, AttributeError, TypeError) as error:  # another Ray than the pinned one
        logging.getLogger(__name__).debug("minimal Ray node not available: %s", error)
        return None


# After a killed driver (kill -9, an out-of-memory kill) an embedded Ray's agents and workers live on
# for minutes: a small process of its own (the reaper) ends them when the driver ends, however.
REAPER_GRACE_SECONDS = 3.0
REAPER_DONE = b"done"  # what the driver writes to the reaper after shutting Ray down itself


def start_reaper(folder: str):
    """Start the reaper of an embedded Ray session kept in `folder`: it waits for this process to
    end (its stdin closes, whatever the cause), then ends the processes that still have files open
    in the folder and removes it. None where it cannot start (then nothing changes)."""
    import subprocess

    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root,
                                                                              os.environ.get("PYTHONPATH")]))}
    try:
        return subprocess.Popen([sys.executable, "-c", "import sys; from rts_tf.engine import reap_session; "
                                 "reap_session(sys.argv[1], int(sys.argv[2]))", folder, str(os.getpid())],
                                stdin=subprocess.PIPE,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=environment,
                                start_new_session=True)  # Ctrl-C in a terminal reaches the driver, not it
    except OSError:
        return None


def stop_reaper(reaper) -> None:
    """Tell the reaper that the driver shut Ray down itself: it ends without touching anything."""
    if reaper is None:
        return
    with contextlib.suppress(OSError, ValueError):
        reaper.stdin.write(REAPER_DONE)
        reaper.stdin.close()
    with contextlib.suppress(Exception):
        reaper.wait(timeout=2 * REAPER_GRACE_SECONDS + 5)


def reap_session(folder: str, driver: int) -> None:
    """The reaper's work: wait for the driver's end, then SIGTERM (and after a grace time SIGKILL)
    every other process with a file open in the session folder (Ray's agents, workers, raylet),
    and remove the folder. Nothing when the driver said it shut Ray down itself."""
    import time

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # Returns once the driver's end of the pipe is closed: it ended (killed), or it is done.
    if sys.stdin.buffer.read() == REAPER_DONE:
        return
    for kind in (signal.SIGTERM, signal.SIGKILL):
        left = [pid for pid in session_processes(folder) if pid != driver]  # never the driver itself
        for pid in left:
            with contextlib.suppress(OSError):
                os.kill(pid, kind)
        deadline = time.monotonic() + REAPER_GRACE_SECONDS
        while left and time.monotonic() < deadline:
            time.sleep(0.1)
            left = [pid for pid in session_processes(folder) if pid != driver]
        if not left:
            break
    shutil.rmtree(folder, ignore_errors=True)


def session_processes(folder: str) -> list[int]:
    """This user's processes with a file open in `folder` (Linux /proc; Ray rewrites its processes'
    command lines, but their log files stay open in the session folder)."""
    prefix, found = os.path.realpath(folder) + os.sep, []
    try:
        pids = [int(name) for name in os.listdir("/proc") if name.isdigit() and int(name) != os.getpid()]
    except OSError:
        return []
    for pid in pids:
        try:
            for descriptor in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{descriptor}").startswith(prefix):
                    found.append(pid)
                    break
        except OSError:  # gone, or another user's
            continue
    return found


def cluster_gpus(ray) -> int:
    return int(ray.cluster_resources().get("GPU", 0))


def cluster_cpus(ray) -> int:
    return int(ray.cluster_resources().get("CPU", 1))


def largest_node_memory(ray) -> float:
    """The memory resource of the largest node: a job asking more would never be scheduled."""
    return max((node["Resources"].get("memory", 0.0) for node in ray.nodes() if node.get("Alive")), default=0.0)


class _Progress:
    """Tiles done per job, counted for the latest attempt only (a retried job starts again)."""

    def __init__(self):
        self.done: dict[str, tuple[str, int]] = {}

    def add(self, key: str, attempt: str, tiles: int) -> None:
        current = self.done.get(key)
        count = current[1] if current is not None and current[0] == attempt else 0
        self.done[key] = (attempt, count + tiles)

    def total(self) -> int:
        return sum(tiles for _, tiles in self.done.values())


def _reporter(progress, key: str):
    if progress is None:
        return None
    attempt = uuid.uuid4().hex
    return lambda tiles: progress.add.remote(key, attempt, tiles)


def _ray_job(function: Callable, item: Any, key: str, progress) -> tuple[str, Any]:
    """A Ray task: one job, classified by run_job."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    return run_job(function, item, _reporter(progress, key))


class _RunnerActor:
    """A Ray actor that makes one runner (say, a loaded model, or a scene builder) once, for the jobs
    it is given; the error of making it, if any, instead."""

    def __init__(self, factory: Callable, arguments: tuple):
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        self.runner, self.error = None, None
        status, value = run_job(lambda _, __: factory(*arguments), None)
        if status == "done":
            self.runner = value
        else:
            self.error = value  # every job it is given reports it: a broken model is not a bad scene


class _JobActor(_RunnerActor):
    """A Ray actor that makes one runner and runs the jobs it is given through it."""

    def run(self, item: Any, key: str, progress) -> tuple[str, str, Any]:
        """(key, status, value): an ActorPool returns results without saying whose they are."""
        if self.error is not None:
            return key, "abort", self.error
        return (key, *run_job(self.runner, item, _reporter(progress, key)))


class _ProgressPoller:
    """Turns the progress actor's running total into advance(tiles) calls on the driver."""

    def __init__(self, ray, advance: Callable[[int], None] | None):
        self.ray, self.advance, self.shown = ray, advance, 0
        self.actor = ray.remote(_Progress).options(num_cpus=0).remote() if advance else None

    def poll(self) -> None:
        if self.actor is None:
            return
        total = self.ray.get(self.actor.total.remote())
        if total != self.shown:
            self.advance(total - self.shown)
            self.shown = total


def error_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else 'no message'}"


def ray_tasks(ray, function: Callable, items: Sequence, keys: Sequence[str], resources: Sequence[dict],
              advance: Callable[[int], None] | None = None, label: str = "job",
              fresh_process: bool = False) -> Iterator[Outcome]:
    """One Ray task per item with its resources (num_cpus, num_gpus, memory, ...); outcomes as they
    finish. A task whose worker is lost is retried (RETRIES times); a user's error is not.
    fresh_process: each task in a worker process of its own (TensorFlow frees a GPU only on exit)."""
    poller = _ProgressPoller(ray, advance)
    remote = ray.remote(max_calls=1)(_ray_job) if fresh_process else ray.remote(_ray_job)
    pending = {remote.options(name=f"{label}:{key}", max_retries=RETRIES, retry_exceptions=False, **options)
               .remote(function, item, key, poller.actor): key
               for item, key, options in zip(items, keys, resources)}
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_SECONDS)
            poller.poll()
            for ref in ready:
                key = pending.pop(ref)
                try:
                    status, value = ray.get(ref)
                except ray.exceptions.RayTaskError:
                    raise  # a bug in the job: its remote traceback
                except ray.exceptions.RayError as error:  # lost more often than retried, or killed for memory
                    yield Outcome(key, error=f"{label} lost after {RETRIES} retries ({error_line(error)})")
                    continue
                yield outcome(key, status, value)
        poller.poll()
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)


def ray_actors(ray, factory: Callable, arguments: tuple, items: Sequence, keys: Sequence[str], actors: int,
               resources: dict, advance: Callable[[int], None] | None = None,
               label: str = "job") -> Iterator[Outcome]:
    """`actors` Ray actors (each with `resources`) that each make factory(*arguments) once and run
    the items given to them (an ActorPool); outcomes as they finish. An actor whose process is lost
    is restarted and its job retried (RETRIES times)."""
    from ray.util import ActorPool

    poller = _ProgressPoller(ray, advance)
    actor = ray.remote(_JobActor).options(max_restarts=RETRIES, max_task_retries=RETRIES, **resources)
    handles = [actor.remote(factory, arguments) for _ in range(max(1, min(actors, len(items))))]
    pool = ActorPool(handles)
    for item, key in zip(items, keys):
        pool.submit(lambda handle, value: handle.run.remote(*value), (item, key, poller.actor))
    unfinished, lost = set(keys), None
    try:
        while pool.has_next():
            try:
                key, status, value = pool.get_next_unordered(timeout=POLL_SECONDS)
            except TimeoutError:
                poller.poll()
                continue
            except ray.exceptions.RayTaskError:
                raise
            except ray.exceptions.RayError as error:  # an actor lost more often than restarted
                lost = error
                continue
            poller.poll()
            unfinished.discard(key)
            yield outcome(key, status, value)
        poller.poll()
        for key in keys:  # jobs whose actor was lost for good
            if key in unfinished:
                yield Outcome(key, error=f"{label} lost after {RETRIES} retries ({error_line(lost)})")
    finally:
        for handle in handles:
            ray.kill(handle)



# A worker streams a job's progress to the driver at most this often (tiles batched in between).
PROGRESS_SECONDS = 0.5


class _StreamingJobActor(_RunnerActor):
    """A Ray actor that makes one runner once and runs the jobs it is given, one at a time, as a
    streaming generator: tile counts as the job advances (batched, at most one every
    PROGRESS_SECONDS), then `("end", status, value)`. Progress thus travels with the job's own
    results: no progress actor, no round trip per block or per poll."""

    def ready(self) -> bool:
        """Answers once the actor is up (again, after a restart)."""
        return True

    def run(self, item: Any):
        import queue
        import time

        if self.error is not None:
            yield ("end", "abort", self.error)
            return
        counts: queue.SimpleQueue = queue.SimpleQueue()
        ended: dict[str, Any] = {}

        def work() -> None:  # the job runs beside the generator, which forwards its counts
            try:
                ended["outcome"] = run_job(self.runner, item, counts.put)
            except BaseException as error:  # a bug: raised in the generator, so the driver sees its traceback
                ended["error"] = error
            finally:
                counts.put(None)

        thread = threading.Thread(target=work, name="job", daemon=True)
        thread.start()
        pending, sent = 0, time.monotonic()
        while True:
            try:
                tiles = counts.get(timeout=PROGRESS_SECONDS)
            except queue.Empty:
                tiles = 0
            if tiles is None:
                break
            pending += tiles
            if pending and time.monotonic() - sent >= PROGRESS_SECONDS:
                yield pending
                pending, sent = 0, time.monotonic()
        thread.join()
        if pending:
            yield pending
        if "error" in ended:
            raise ended["error"]
        yield ("end", *ended["outcome"])


def ray_streaming_actors(ray, factory: Callable, arguments: tuple, items: Sequence, keys: Sequence[str],
                         actors: int, resources: dict, advance: Callable[[int], None] | None = None,
                         label: str = "job") -> Iterator[Outcome]:
    """Like ray_actors: `actors` Ray actors, started once, each making factory(*arguments) once and
    running the items given to it one after the other; outcomes as they finish. Progress comes
    with each job's streamed results (see _StreamingJobActor). An actor whose process is lost is
    restarted and its job run again (RETRIES times; the job's progress counted anew)."""
    import time

    actor = ray.remote(_StreamingJobActor).options(max_restarts=RETRIES, max_task_retries=0, **resources)
    handles = [actor.remote(factory, arguments) for _ in range(max(1, min(actors, len(items))))]
    waiting = list(zip(items, keys))
    running: dict[Any, tuple] = {}  # generator -> (actor handle, item, key)
    pinging: dict[Any, Any] = {}  # ready() call -> an actor that lost its process, until it is back
    lost: list = []  # actors gone for good (restarted RETRIES times)
    counted: dict[str, int] = {}  # tiles reported for each job's current attempt
    attempts: dict[str, int] = {}

    def submit(handle) -> None:
        item, key = waiting.pop(0)
        attempts[key] = attempts.get(key, 0) + 1
        counted[key] = 0
        generator = handle.run.options(num_returns="streaming", name=f"{label}:{key}").remote(item)
        running[generator] = (handle, item, key)

    for handle in handles:
        if waiting:
            submit(handle)
    try:
        while running or (pinging and waiting):
            ready, _ = ray.wait([*running, *pinging], num_returns=1, timeout=POLL_SECONDS)
            for reference in [ref for ref in ready if ref in pinging]:
                handle = pinging.pop(reference)
                try:
                    ray.get(reference)
                except ray.exceptions.ActorUnavailableError:  # still restarting: ask again shortly
                    time.sleep(POLL_SECONDS)
                    pinging[handle.ready.remote()] = handle
                    continue
                except ray.exceptions.RayError:  # gone for good
                    lost.append(handle)
                    continue
                if waiting:
                    submit(handle)
            if waiting and not running and not pinging:  # every actor is gone: nothing will run them
                for _, key in waiting:
                    yield Outcome(key, error=f"{label} lost: its Ray actors were lost {RETRIES} times")
                waiting.clear()
            for generator in [ref for ref in ready if ref in running]:
                handle, item, key = running[generator]
                try:
                    value = ray.get(next(generator))
                except StopIteration:  # ended without its last message: cannot happen, but never hang on it
                    del running[generator]
                    yield Outcome(key, error=f"{label} ended without a result")
                    continue
                except ray.exceptions.RayTaskError:
                    raise  # a bug in the job: its remote traceback
                except ray.exceptions.RayError as error:  # the actor's process was lost: run the job again
                    del running[generator]
                    if advance is not None and counted[key]:
                        advance(-counted[key])
                    if attempts[key] > RETRIES:
                        yield Outcome(key, error=f"{label} lost after {RETRIES} retries ({error_line(error)})")
                    else:
                        waiting.insert(0, (item, key))
                    pinging[handle.ready.remote()] = handle  # jobs go to it again once it is back
                    continue
                if not isinstance(value, tuple):
                    counted[key] += value
                    if advance is not None:
                        advance(value)
                    continue
                del running[generator]
                _, status, result = value
                if waiting:
                    submit(handle)
                yield outcome(key, status, result)
    finally:
        for handle in handles:
            with contextlib.suppress(Exception):
                ray.kill(handle)
