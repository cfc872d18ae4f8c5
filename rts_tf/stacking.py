"""Stacking for predict: a scene's groups of windows made into model bands ahead of the model, in worker processes."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import pickle
import signal
import traceback
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from multiprocessing import shared_memory
from typing import Iterator, Sequence

import numpy as np
import rasterio

from rts_tf.rasters import GDAL_CACHE_BYTES
from rts_tf.scene import SceneFiles, SceneSources, SceneStack

WINDOWS_PER_READ = 16  # windows stacked per read: bounds memory, keeps reads large enough to be cheap
# Shared buffers per worker: one the model's process reads while the worker fills the next.
SLOTS_PER_READER = 2


# Below this many pixels in all scenes together, starting a process (imports: about 1.5 CPU seconds)
# costs more than stacking in a thread of the predicting process.
SMALL_JOB_PIXELS = 2048 * 2048


def default_readers(pixels: int | None = None) -> int:
    """Stacking processes by default: half the cores (the model takes the rest), 1 to 4; none (a
    thread) for a job of fewer than SMALL_JOB_PIXELS `pixels`. Stacking a 4096 px scene takes
    about 3.5 CPU seconds, a CPU forward pass of UNet-resnet34 about 50."""
    if pixels is not None and pixels < SMALL_JOB_PIXELS:
        return 0
    return max(1, min(4, (os.cpu_count() or 1) // 2))


def column_groups(cols: Sequence[int], per_read: int, readers: int = 1) -> list[list[int]]:
    """A row of tiles' window columns in consecutive groups of at most `per_read`, read together;
    as many groups as a multiple of `readers` (when there are enough windows) and even in size,
    so that each reader stacks a strip of the scene of the same width."""
    count = -(-len(cols) // per_read)
    count = min(len(cols), -(-count // readers) * readers)
    return [list(cols[i * len(cols) // count:(i + 1) * len(cols) // count]) for i in range(count)]


class GroupReader:
    """A scene's groups of windows, row of tiles by row of tiles: the bands (size, width, bands)
    float32 and validity (size, width) of each group. The rows a group shares with the group above
    it (the overlap) are taken from that read, not stacked again: a pixel's bands do not depend on
    the window it is read in."""

    def __init__(self, stack: SceneStack, rows: Sequence[int], size: int, strip: int | None = None):
        self.stack, self.rows, self.size = stack, list(rows), size
        if strip is not None:  # the width of the columns this reader stacks: its chunks only
            stack.keep_chunks(2, strip)
        self.shared = size - (self.rows[1] - self.rows[0]) if len(self.rows) > 1 else 0
        self.above: dict[int, tuple[int, np.ndarray, np.ndarray]] = {}  # group's left -> first row, bands, valid

    def shape(self, group: Sequence[int]) -> tuple[int, int, int]:
        """The shape of a group's bands."""
        return self.size, group[-1] + self.size - group[0], len(self.stack.bands)

    def __call__(self, index: int, group: Sequence[int], image: np.ndarray | None = None,
                 valid: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The group's bands and validity, into `image` and `valid` when given (else new arrays)."""
        size, shared = self.size, self.shared
        top, left = self.rows[index], group[0]
        if image is None or valid is None:
            image = np.empty(self.shape(group), np.float32)
            valid = np.empty(image.shape[:2], bool)
        first, bands, usable = self.above.get(left, (None, None, None))
        reused = shared if first == top else 0
        if reused:
            image[:reused], valid[:reused] = bands, usable
        with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_BYTES):  # GDAL environments are per thread
            self.stack.read_into(image[reused:], valid[reused:], top + reused, left)
        if shared:
            self.above[left] = (top + size - shared, image[size - shared:].copy(), valid[size - shared:].copy())
        return image, valid


def read_order(rows: Sequence[int], groups: Sequence[Sequence[int]]) -> list[tuple[int, list[int]]]:
    """(row of tiles, group) of every read of a scene, in the order the model takes them."""
    return [(index, list(group)) for index in range(len(rows)) for group in groups]


def thread_stacked(stack: SceneStack, rows: Sequence[int], groups: Sequence[Sequence[int]],
                   size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(bands, valid) of each read in read_order, stacked by one thread of this process while the
    model works on the read before (`--readers 0`)."""
    reader, order = GroupReader(stack, rows, size), read_order(rows, groups)
    with ThreadPoolExecutor(1) as pool:
        upcoming = pool.submit(reader, *order[0])
        for number in range(len(order)):
            result = upcoming.result()
            if number + 1 < len(order):
                upcoming = pool.submit(reader, *order[number + 1])
            yield result


def recipe_arguments(sources: SceneSources) -> dict:
    """SceneSources' arguments that open the same recipe in another process (its files, its settings)."""
    terrain = sources.terrain
    paths = {name: getattr(terrain, name).paths if terrain is not None and getattr(terrain, name) is not None else None
             for name in ("dem", "rel_elevation", "slope")}
    return dict(tcvis=sources.tcvis.paths if sources.tcvis is not None else None, **paths,
                rel_elevation_radius=sources.rel_elevation_radius, dem_min_valid=sources.dem_min_valid,
                legacy_dtype=sources.legacy_dtype, bands=list(sources.bands))


def _sendable(error: BaseException) -> BaseException:
    """The error itself when it survives pickling (InputError, GDAL's errors), else a RuntimeError
    with its text; the worker's traceback travels as a note."""
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        error = RuntimeError(f"{type(error).__name__}: {error}")
    return error


def work(connection) -> None:
    """A stacking process: opens the recipe it is sent once, then stacks the reads it is sent into
    shared memory until told to stop or its parent has gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the parent ends us
    sources = stack = reader = failure = None
    memories: dict[str, shared_memory.SharedMemory] = {}
    try:
        while True:
            try:
                message = connection.recv()
            except (EOFError, OSError):  # the parent has gone (killed): nobody to stack for
                break
            if message is None:
                break
            kind = message[0]
            if kind == "recipe":
                if sources is not None:
                    sources.close()
                sources, arguments = None, message[1]
            elif kind == "scene":
                if stack is not None:
                    stack.close()
                stack = reader = failure = None
                try:
                    sources = sources or SceneSources(**arguments)
                    stack = sources.stack(message[1])
                    reader = GroupReader(stack, message[2], message[3], message[4])
                except Exception as error:  # reported with the scene's first read
                    failure = error
            elif kind == "read":
                _, index, group, name = message
                try:
                    if failure is not None:
                        raise failure
                    if name not in memories:
                        memories[name] = shared_memory.SharedMemory(name)
                    # Stacked straight into the shared memory the model's process reads.
                    shape, buffer = reader.shape(group), memories[name].buf
                    image = np.ndarray(shape, np.float32, buffer=buffer)
                    reader(index, group, image, np.ndarray(shape[:2], bool, buffer=buffer, offset=image.nbytes))
                    image = buffer = None
                    connection.send(("ok", shape))
                except Exception as error:
                    image = buffer = None
                    connection.send(("error", _sendable(error), traceback.format_exc()))
            elif kind == "end":  # the scene is over: its buffers are freed by the parent
                if stack is not None:
                    stack.close()
                stack = reader = failure = None
                for memory in memories.values():
                    with contextlib.suppress(BufferError):  # a view still held (an error's traceback): freed with it
                        memory.close()
                memories.clear()
    finally:
        if stack is not None:
            stack.close()
        if sources is not None:
            sources.close()
        for memory in memories.values():
            with contextlib.suppress(BufferError):
                memory.close()


class Stackers:
    """`count` stacking processes (spawned: TensorFlow is not fork-safe), started once per command;
    `open(sources)` sends them the recipe, which each opens once. A scene's groups of windows are
    dealt out in strips of columns (each process keeps its strip's warped auxiliary chunks and
    shared rows), and come back through shared memory in the order the model takes them.

    Spawned processes import the caller's main module: a script that predicts with stacking
    processes needs the `if __name__ == "__main__":` guard of Python's multiprocessing."""

    def __init__(self, count: int = 0):
        self.arguments: dict | None = None
        self.context = multiprocessing.get_context("spawn")
        self.workers: list[tuple] = []  # (process, connection)
        self.start(count)

    def start(self, count: int) -> None:
        """Start `count` more processes."""
        try:
            for _ in range(count):
                self.workers.append(self._start())
        except BaseException:
            self.close()
            raise

    def _start(self) -> tuple:
        parent, child = self.context.Pipe()
        process = self.context.Process(target=work, args=(child,), daemon=True, name="rts-tf stacking")
        process.start()
        child.close()
        if self.arguments is not None:
            parent.send(("recipe", self.arguments))
        return process, parent

    def open(self, sources: SceneSources) -> "Stackers":
        """Send the processes the recipe to stack with (they open its sources once)."""
        self.arguments = recipe_arguments(sources)
        for _, connection in self.workers:
            connection.send(("recipe", self.arguments))
        return self

    @property
    def count(self) -> int:
        return len(self.workers)

    def close(self) -> None:
        """Stop the processes: ask, then end those that do not stop within seconds."""
        for _, connection in self.workers:
            with contextlib.suppress(OSError, ValueError):
                connection.send(None)
        for process, connection in self.workers:
            process.join(timeout=10)
            if process.is_alive():
                process.terminate()
                process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join()
            connection.close()
        self.workers = []

    def __enter__(self) -> "Stackers":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _receive(self, worker: int):
        process, connection = self.workers[worker]
        try:
            return connection.recv()
        except (EOFError, OSError):
            process.join(timeout=5)
            raise RuntimeError(f"a stacking process ended unexpectedly (exit code {process.exitcode})") from None
        except BaseException:
            # Ctrl-C or SIGTERM may cut a reply short: its pipe cannot be trusted, so the process is
            # ended here (and started again for the next scene, if any).
            process.kill()
            process.join()
            connection.close()
            raise

    def stacked(self, scene: SceneFiles, rows: Sequence[int], groups: Sequence[Sequence[int]], size: int,
                channels: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(bands, valid) of each read in read_order: views of shared memory, valid until the next
        one is asked for (copy what must outlive it)."""
        for number, (process, connection) in enumerate(self.workers):  # a process that died with an earlier scene
            if not process.is_alive():
                connection.close()
                self.workers[number] = self._start()
        count, order = len(self.workers), read_order(rows, groups)
        owners = [position * count // len(groups) for position in range(len(groups))]  # strips of columns
        width = max(group[-1] + size - group[0] for group in groups)
        nbytes = size * width * (4 * channels + 1)
        memories: list[list[shared_memory.SharedMemory]] = [[] for _ in range(count)]
        waiting = [deque() for _ in range(count)]  # reads of each process not yet sent
        free = [deque(range(SLOTS_PER_READER)) for _ in range(count)]
        slots: dict[int, int] = {}  # read number -> its slot
        outstanding = [0] * count
        image = valid = None

        def send(worker: int) -> None:
            while waiting[worker] and free[worker]:
                number, slot = waiting[worker].popleft(), free[worker].popleft()
                index, group = order[number]
                slots[number] = slot
                self.workers[worker][1].send(("read", index, group, memories[worker][slot].name))
                outstanding[worker] += 1

        try:
            for worker in range(count):
                memories[worker] = [shared_memory.SharedMemory(create=True, size=nbytes)
                                    for _ in range(SLOTS_PER_READER)]
                strip = [group for position, group in enumerate(groups) if owners[position] == worker]
                width = max(group[-1] for group in strip) + size - min(group[0] for group in strip) if strip else size
                self.workers[worker][1].send(("scene", scene, list(rows), size, width))
            for number in range(len(order)):
                waiting[owners[number % len(groups)]].append(number)
            for worker in range(count):
                send(worker)
            for number in range(len(order)):
                worker = owners[number % len(groups)]
                reply = self._receive(worker)
                outstanding[worker] -= 1
                if reply[0] == "error":
                    error = reply[1]
                    if not isinstance(error, ValueError):  # not a user's error: where it happened helps
                        error.add_note(f"in a stacking process:\n{reply[2]}")
                    raise error
                buffer = memories[worker][slots[number]].buf
                image = np.ndarray(reply[1], np.float32, buffer=buffer)
                valid = np.ndarray(reply[1][:2], bool, buffer=buffer, offset=image.nbytes)
                del buffer
                yield image, valid
                image = valid = None
                free[worker].append(slots.pop(number))
                send(worker)
        finally:
            image = valid = None
            for worker in range(count):
                # Replies still under way (an error, Ctrl-C): wait for them, so the next scene starts clean.
                try:
                    while outstanding[worker]:
                        self._receive(worker)
                        outstanding[worker] -= 1
                    self.workers[worker][1].send(("end",))
                except (RuntimeError, OSError):
                    pass  # a process that died is started again with the next scene
            for memory in (memory for group in memories for memory in group):
                memory.unlink()
                with contextlib.suppress(BufferError):  # a view still held elsewhere: freed with it
                    memory.close()
