"""Stop on SIGTERM/SIGINT at the next update boundary, with a checkpoint, instead of dying mid-step.

The handler only records the signal; the loop asks :meth:`GracefulStop.requested` after every update (under
DDP the ranks agree through one all-reduce, so they stop at the same update even when the signal reaches them
at different moments), writes a checkpoint and returns. A second Ctrl-C aborts at once, without saving.
"""
from __future__ import annotations

import logging
import signal
import threading
from typing import Optional

__all__ = ["GracefulStop", "signal_name"]

_logger = logging.getLogger(__name__)
_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class GracefulStop:
    """Context manager installing the handlers (main thread only; elsewhere it does nothing)."""

    def __init__(self):
        self.signum: Optional[int] = None
        self._previous: dict = {}

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            for s in _SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        if self.signum is None:
            _logger.warning("%s received: finishing the current step, then writing a checkpoint "
                            "(Ctrl-C again aborts without saving)", signal_name(signum))
        self.signum = signum

    def requested(self, info, device) -> Optional[int]:
        """The signal to stop for, agreed by every rank (the largest number any rank received), or None."""
        mine = float(self.signum or 0)
        if info.distributed:
            import torch
            import torch.distributed as dist
            t = torch.tensor([mine], dtype=torch.float64, device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            mine = t.item()
        return int(mine) or None
