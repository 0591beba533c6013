"""Phase 1's work on forked worker processes, behind a small interface.

The domain modules call only what this package exports:

- :func:`workers_for` says how many processes an amount of work is worth (1 where forking is
  not possible or not safe: another thread runs, or the platform cannot fork);
- :func:`map_chunks` runs ``work(chunk)`` over contiguous chunks of items, the first in this
  process, the others in forked children whose results stream back (the targets of Phase 1);
- :func:`map_ordered` runs ``work(item)`` for every item in forked children and gives the
  results in order as they arrive (the YAML files of a large inventory, composed ahead);
- :class:`WorkerError`: a worker that ended without a result or an exception to raise.

Children are forked, so they share what this process holds copy-on-write; only results come
back, pickled, in one message format (:mod:`provisioner.parallel.workers`). With one worker,
the work runs in this process and nothing is forked. The push lanes use the process helpers
(:func:`available_cores`, :func:`fork_unsafe_reason`, :func:`reap`).
"""

from provisioner.parallel.processes import (
    available_cores,
    fork_unsafe_reason,
    reap,
    workers_for,
)
from provisioner.parallel.workers import WorkerError, map_chunks, map_ordered

__all__ = [
    "WorkerError",
    "available_cores",
    "fork_unsafe_reason",
    "map_chunks",
    "map_ordered",
    "reap",
    "workers_for",
]
