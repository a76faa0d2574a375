"""Things done every N updates: logging (progress bar, TensorBoard scalars and images) and checkpoints.

A hook is ``Hook(every, fn)``; ``fn(step, state, metrics)`` runs after update ``step`` (1-based)
when ``step % every == 0``. ``MetricsLogger`` keeps the official smoothed loss
(``ema_loss = 0.99·ema_loss + 0.01·loss``), steps/s, images/s and an MFU estimate.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable

import jax

from cascade_jax import storage
from cascade_jax.accelerators import peak_flops_for


@dataclasses.dataclass
class Hook:
    every: int
    fn: Callable

    def __call__(self, step: int, state, metrics: dict):
        if self.every and step % self.every == 0:
            self.fn(step, state, metrics)


def peak_flops_per_device(override: float | None = None) -> float | None:
    if override:
        return float(override)
    return peak_flops_for(jax.devices()[0].device_kind)


class MetricsLogger:
    """Smoothed loss, rates and MFU; writes TensorBoard events and a tqdm bar on process 0."""

    def __init__(self, log_dir, *, total_steps: int, start_step: int, images_per_step: int, smoothing: float,
                 step_flops: float | None, peak_flops: float | None, progress: bool = True):
        self.smoothing, self.images_per_step = smoothing, images_per_step
        self.step_flops, self.peak = step_flops, peak_flops
        self.smoothed = None
        self.last_time, self.last_step = time.perf_counter(), start_step
        self.main = jax.process_index() == 0
        self.writer = self.bar = None
        if self.main:
            from tensorboardX import SummaryWriter

            if storage.is_url(log_dir):
                from cascade_jax.storage.tensorboard import register_for

                register_for(log_dir)  # event files in a bucket (rewritten whole per flush)
            else:
                Path(log_dir).mkdir(parents=True, exist_ok=True)
            self.writer = SummaryWriter(str(log_dir))
            if progress:
                from tqdm import tqdm

                self.bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True)

    def update(self, step: int, metrics: dict, extra: dict | None = None) -> dict:
        """Record one update's metrics (host floats); returns what was logged."""
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        loss = values["loss"]
        self.smoothed = loss if self.smoothed is None else self.smoothed * self.smoothing + loss * (1 - self.smoothing)
        now = time.perf_counter()
        steps_per_s = (step - self.last_step) / max(now - self.last_time, 1e-9)
        self.last_time, self.last_step = now, step
        logged = {**values, "loss_smoothed": self.smoothed, "steps_per_s": steps_per_s,
                  "images_per_s": steps_per_s * self.images_per_step, **(extra or {})}
        if self.step_flops and self.peak:
            logged["mfu"] = self.step_flops * steps_per_s / (self.peak * jax.device_count())
        if self.writer is not None:
            for key, value in logged.items():
                self.writer.add_scalar(f"train/{key}", value, step)
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{self.smoothed:.4f}", raw=f"{loss:.4f}", gn=f"{values['grad_norm']:.3f}",
                                 lr=f"{values['lr']:.2e}")
        return logged

    def add_image(self, tag: str, image, step: int):
        """An (H, W, 3) uint8 image (a sample collage) under ``tag`` in TensorBoard's Images tab."""
        if self.writer is not None:
            self.writer.add_image(tag, image, step, dataformats="HWC")

    def close(self):
        if self.writer is not None:
            self.writer.close()
        if self.bar is not None:
            self.bar.close()
