"""Logging as a hook: a progress bar and TensorBoard scalars (and the sample collages' images) on process 0.

``MetricsLogger`` keeps the official smoothed loss (``ema_loss = 0.99·ema_loss + 0.01·loss``), steps/s,
images/s and an MFU estimate; ``LoggingHook`` calls it every ``log_every`` updates, on the first update of a
run (or of its resumption) and on the last, and appends what it logged to ``run.history``.
"""

from __future__ import annotations

import time
from pathlib import Path

import jax

from cascade_jax import storage
from cascade_jax.accelerators import peak_flops_for
from cascade_jax.training.hooks import Hook, StepInfo


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


class LoggingHook(Hook):
    """The console bar and TensorBoard (``output_path/experiment_id/logs``); ``data``'s skip counts and the
    storage retry counts are logged beside the metrics."""

    def __init__(self, cfg, start_step: int, data=None, progress: bool = True):
        super().__init__(every=cfg.log_every)
        self.start_step, self.data = start_step, data
        self.logger = MetricsLogger(storage.join(cfg.output_path, cfg.experiment_id, "logs"), total_steps=cfg.updates,
                                    start_step=start_step, images_per_step=cfg.batch_size,
                                    smoothing=cfg.loss_smoothing, step_flops=None,
                                    peak_flops=peak_flops_per_device(cfg.peak_flops), progress=progress)

    def due(self, info: StepInfo) -> bool:
        return super().due(info) or info.final or info.step == self.start_step + 1

    def run(self, info: StepInfo):
        if self.logger.step_flops is None:
            self.logger.step_flops = info.run.step_flops()
        logged = self.logger.update(info.step, info.metrics, skips(self.data)) | {"step": info.step}
        info.run.history.append(logged)
        return logged

    def close(self):
        self.logger.close()


def skips(data) -> dict:
    """Samples the loader skipped (per reason) and the storage layer's retries and skipped shards, as counts."""
    counts = getattr(data, "skip_counts", None)
    storage_faults = {f"storage_{k}": v for k, v in storage.fault_counts().items()}
    return ({f"skipped_{k}": v for k, v in counts.items()} if counts else {}) | storage_faults
