"""Run one training job per name, in this process or in spawned worker processes, with one progress bar.

Shared by the diagnostics' runners (:mod:`visionpe.eval.threecell_run`, :mod:`visionpe.eval.vlmdiag_run`): small
models train faster as two single-thread processes on two cores than as one two-thread process, so each runner
hands its job function and its names here.

A job is ``target(name, *args, progress)`` returning a record (a dict); ``progress(n, info)`` advances the bar by
``n`` steps and, when ``info`` is not empty, shows it. A job that raises becomes ``failed(name, exc)``, so the other
names still run.
"""
from __future__ import annotations

import json
import queue
from pathlib import Path
from typing import Callable, Optional, Sequence

__all__ = ["run_jobs", "finished_record", "split_finished"]


def finished_record(path, recipe_hash: str) -> Optional[dict]:
    """The JSON record of a finished job at ``path`` if it exists, reads, and was made with ``recipe_hash``
    (resume: such a job is not run again); else None."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        rec = json.loads(path.read_text())
    except (json.JSONDecodeError, OSError):
        return None
    return rec if rec.get("recipe_hash") == recipe_hash else None


def split_finished(names: Sequence[str], load_done: Callable[[str], Optional[dict]], fresh: bool,
                   what: str) -> tuple[dict, list]:
    """``({name: record} of the finished names, [names still to run])``, in order; ``fresh``: nothing counts as
    finished. Prints one line naming the finished ``what`` (e.g. ``"encoder(s)"``) when there are any."""
    records, todo = {}, []
    for name in names:
        rec = None if fresh else load_done(name)
        if rec is not None:
            records[name] = rec
        else:
            todo.append(name)
    if records:
        print(f"resuming: {len(records)} {what} already finished ({', '.join(records)})", flush=True)
    return records, todo


def _set_threads(threads: int) -> None:
    import torch
    torch.set_num_threads(threads)


def _job(target: Callable, name: str, args: tuple, failed: Callable, q) -> dict:
    """One job in a worker process; progress goes back through the manager queue ``q``."""
    try:
        return target(name, *args, lambda n, info: q.put((n, info)))
    except Exception as e:  # reported in the table; the other names still run
        return failed(name, e)


def run_jobs(names: Sequence[str], target: Callable, args: tuple, *, workers: int, threads: int, bar,
             failed: Callable[[str, Exception], dict], report: Callable[[dict], None]) -> tuple[dict, int]:
    """Run ``target`` for every name; returns ``({name: record}, workers used)``.

    Args:
        names: the jobs, in order (each name once).
        target: a module-level function (workers pickle it by reference) ``target(name, *args, progress)``.
        args: the job's other arguments (picklable).
        workers: processes to use; 1 (or a single name) runs in this process with torch at ``threads`` threads.
        threads: torch intra-op threads per job.
        bar: a tqdm bar (``update``, ``set_postfix_str``).
        failed: the record of a job that raised, ``failed(name, exc)``.
        report: called with each record as it finishes (e.g. a line written above the bar).
    """
    records: dict = {}
    workers = max(1, min(workers, len(names)))

    def progress(n, info):
        bar.update(n)
        if info:
            bar.set_postfix_str(info)

    if workers == 1:
        import torch
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            for name in names:
                bar.set_postfix_str(name)
                try:
                    records[name] = target(name, *args, progress)
                except Exception as e:  # reported in the table; the other names still run
                    records[name] = failed(name, e)
                report(records[name])
        finally:
            torch.set_num_threads(old)
        return records, workers
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager, ProcessPoolExecutor(workers, mp_context=ctx, initializer=_set_threads,
                                                       initargs=(threads,)) as pool:
        q = manager.Queue()
        futs = {pool.submit(_job, target, n, args, failed, q): n for n in names}
        pending = set(futs)
        while pending:
            try:
                progress(*q.get(timeout=0.5))
            except queue.Empty:
                pass
            for f in [f for f in pending if f.done()]:
                pending.discard(f)
                records[futs[f]] = f.result()
                report(records[futs[f]])
        while not q.empty():
            progress(*q.get())
    return records, workers
