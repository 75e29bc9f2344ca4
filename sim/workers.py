"""Worker processes (torch-free): pools that end with their parent, and what counts as a user's mistake.

`eesd simulate --jobs N`, `eesd serve-sim --jobs N` and `eesd serve-bench --replicas N` run work in other processes.
A parent killed by SIGTERM or SIGKILL runs no clean-up, so each worker watches its parent and ends once it is gone
(`exit_with_parent`, or `pool` for a process pool). `USER_ERRORS` are the exceptions a command reports as one line
(a missing file, a value out of range) rather than with a traceback, in a worker as in the parent.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor

# what `eesd` and the benchmark scripts report as a user's mistake: one line, no traceback (EESD_DEBUG=1 shows it)
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def exit_with_parent(parent: int, poll_s: float = 1.0) -> None:
    """In a worker process: end it once `parent` (the pid that started it, passed in: a worker that reads its parent
    only when it starts would read init's if the parent died first) is no longer its parent. A daemon thread polls."""
    if os.getppid() != parent:
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


@contextlib.contextmanager
def pool(workers: int) -> Iterator[ProcessPoolExecutor]:
    """A process pool of `workers` processes that end with this one, as a `with` block. Spawned, whatever the
    platform's default: a forkserver's workers are the fork server's children, not this process's (Python 3.14's
    default on Linux). Left by an exception (a worker's mistake, Ctrl-C), the work not started is dropped and the
    workers are stopped at once, rather than the pool running every queued point to its end first."""
    context = multiprocessing.get_context("spawn")
    executor = ProcessPoolExecutor(workers, mp_context=context, initializer=exit_with_parent, initargs=(os.getpid(),))
    try:
        yield executor
    except BaseException:
        processes = list((getattr(executor, "_processes", None) or {}).values())
        executor.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            process.kill()  # SIGKILL: a worker still starting up (or busy in native code) cannot put it off
        raise
    executor.shutdown(wait=True)
