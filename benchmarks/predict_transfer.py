"""How predict's stacking processes hand a group of windows to the model's process: CPU per read.

Run by hand:  .venv/bin/python benchmarks/predict_transfer.py [--reads 40]

One read is a group of 11 windows of a 4096 px scene (256 x 2176 px, 10 float32 bands, and its
validity mask). "pickle" sends the arrays through a pipe (pickled, written, read, unpickled);
"shared memory" writes them into a buffer both processes map (predict's way, where the stacking
writes its bands there directly, saving even this copy) and sends only the shape.
"""

from __future__ import annotations

import argparse
import multiprocessing
import time
from multiprocessing import shared_memory

import numpy as np

SHAPE = (256, 2176, 10)


def stacking_process(connection, mode: str) -> None:
    image = np.random.default_rng(0).random(SHAPE, dtype=np.float32)
    valid = np.ones(SHAPE[:2], bool)
    memory, started, count = None, 0.0, 0
    while True:
        message = connection.recv()
        if message is None:
            connection.send(time.process_time() - started)
            break
        count += 1
        if count == 2:  # after the warm-up read
            started = time.process_time()
        if mode == "pickle":
            connection.send((image, valid))
        else:
            if memory is None:
                memory = shared_memory.SharedMemory(message)
            np.copyto(np.ndarray(SHAPE, np.float32, buffer=memory.buf), image)
            np.copyto(np.ndarray(SHAPE[:2], bool, buffer=memory.buf, offset=image.nbytes), valid)
            connection.send(SHAPE)
    if memory is not None:
        memory.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reads", type=int, default=40)
    args = parser.parse_args()
    context = multiprocessing.get_context("spawn")
    for mode in ("pickle", "shared memory"):
        parent, child = context.Pipe()
        process = context.Process(target=stacking_process, args=(child, mode))
        process.start()
        memory = shared_memory.SharedMemory(create=True, size=int(np.prod(SHAPE)) * 4 + SHAPE[0] * SHAPE[1]) \
            if mode != "pickle" else None
        name = memory.name if memory is not None else ""
        parent.send(name)
        parent.recv()  # warm-up
        cpu, wall = time.process_time(), time.perf_counter()
        for _ in range(args.reads):
            parent.send(name)
            reply = parent.recv()
            if memory is not None:
                image = np.ndarray(reply, np.float32, buffer=memory.buf)  # the model's process reads this view
                del image
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        parent.send(None)
        stacking = parent.recv()
        process.join()
        if memory is not None:
            memory.close()
            memory.unlink()
        print(f"{mode}: {cpu / args.reads * 1000:.1f} ms CPU per read in the model's process, "
              f"{stacking / args.reads * 1000:.1f} ms in the stacking process, {wall / args.reads * 1000:.1f} ms wall")


if __name__ == "__main__":
    main()
