"""Stop a run whose loss or gradient norm stops being finite, before the bad state is saved.

The metrics of each update stay on the device until something reads them anyway (a log line,
a checkpoint, a hook), so watching them costs no extra host-device round trip per update. With
the config's values checked at load (finite lr, eps > 0), the parameters after update ``k`` are
finite exactly when every gradient up to ``k`` was, so checking the pending metrics before each
save keeps every checkpoint a good one.
"""

from __future__ import annotations

import math

import jax

WATCHED = ("loss", "grad_norm")
MAX_PENDING = 1000  # read the metrics at least this often, so the pending list stays small


class NonFiniteError(FloatingPointError):
    """Training produced a NaN or infinite loss or gradient norm; nothing after the last good update was saved."""


class FiniteGuard:
    def __init__(self, checkpoint_dir, latest_saved=None):
        self.checkpoint_dir = checkpoint_dir
        self.latest_saved = latest_saved  # () -> the newest checkpoint's step or None
        self.pending: list[tuple[int, dict]] = []

    def add(self, step: int, metrics: dict) -> None:
        self.pending.append((step, {k: metrics[k] for k in WATCHED if k in metrics}))
        if len(self.pending) >= MAX_PENDING:
            self.check()

    def check(self) -> None:
        """Raise :class:`NonFiniteError` naming the first bad update among those not yet checked."""
        pending, self.pending = self.pending, []
        for step, values in zip([s for s, _ in pending], jax.device_get([v for _, v in pending])):
            bad = {k: float(values[k]) for k in WATCHED if k in values and not math.isfinite(float(values[k]))}
            if bad:
                raise NonFiniteError(self.message(step, bad))

    def message(self, step: int, bad: dict) -> str:
        values = ", ".join(f"{k} = {v}" for k, v in bad.items())
        saved = self.latest_saved() if self.latest_saved is not None else None
        kept = (f"the last good checkpoint is step {saved} in {self.checkpoint_dir} (nothing later was saved)"
                if saved is not None else f"no checkpoint was saved in {self.checkpoint_dir}")
        return (f"training stopped at update {step}: {values}; {kept}. Lower lr, check the data, or set grad_clip; "
                "running the same command again resumes from that checkpoint")
