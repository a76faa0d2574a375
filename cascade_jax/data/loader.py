"""The training loader: Grain-ordered samples, agreed buckets, per-host batches, exact resume.

Order: Grain ``MapDataset.source(records).shuffle(seed).repeat()`` gives one global order, a new
permutation each epoch, identical on every host; host ``i`` of ``n`` reads every ``n``-th block of
``batch_size`` positions of it (``LoaderPlan.global_position``), so hosts never share a sample
within an epoch. Batches: the bucket of step ``s`` comes from
:class:`BucketSchedule` (seed and step only, so all hosts agree); a host fills its part of the batch
with its next samples whose closest bucket it is, holds the others back (bounded) for their own
buckets' steps, and when too many are held back crops the best-fitting one into the current bucket.

The iterator is a ``grain.DatasetIterator``: ``get_state()`` is a small JSON dict (step, stream
position, held-back positions, skip counts) taken after the last batch the trainer received, so
Orbax's Grain handler saves it and ``set_state`` resumes with exactly the batches an uninterrupted
run would have produced. Decoding runs on ``num_workers`` threads (PIL releases the GIL) ahead of the
trainer; the batch order never depends on thread timing.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import json
import logging
import queue
import threading
import zlib
from concurrent.futures import Future, ThreadPoolExecutor

import grain
import jax
import numpy as np

from cascade_jax.data import buckets as bk
from cascade_jax.storage import StorageError
from cascade_jax.data.config import DataConfig
from cascade_jax.data.sources import SKIP_REASONS, FolderSource, SkipSample, check_pixels, decode_rgb, open_image

logger = logging.getLogger(__name__)


def make_source(cfg: DataConfig):
    """The source object for ``cfg.source``; sources are imported lazily (TFDS is optional). Here, not in
    sources.py, which the source modules import: picking one there would be an import cycle."""
    if cfg.source == "folder":
        return FolderSource(cfg)
    if cfg.source == "webdataset":
        from cascade_jax.data.webdataset import WebDatasetSource

        return WebDatasetSource(cfg)
    from cascade_jax.data.tfds_source import TfdsSource

    return TfdsSource(cfg)


@dataclasses.dataclass(frozen=True)
class LoaderPlan:
    """What every iterator of one loader shares: source, host's order, buckets, batch size."""

    cfg: DataConfig
    source: object
    records: grain.MapDataset  # the global order, shuffled per epoch, endless
    local_size: int
    schedule: bk.BucketSchedule
    batch_size: int
    seed: int
    process_index: int
    process_count: int

    def global_position(self, position: int) -> int:
        """This host's ``position``-th sample in the global order: hosts take consecutive blocks of
        ``batch_size``, so with one bucket the global batch of a step (hosts concatenated in process
        order) is exactly the batch one process would read."""
        block, offset = divmod(position, self.batch_size)
        return (block * self.process_count + self.process_index) * self.batch_size + offset

    @property
    def max_pending(self) -> int:
        return self.cfg.max_pending if self.cfg.max_pending is not None else max(4 * self.batch_size, 16)


class TrainLoader:
    """``iter(loader)`` gives a fresh :class:`TrainIterator` at step 0 (``set_state`` moves it)."""

    def __init__(self, plan: LoaderPlan):
        self.plan = plan

    @property
    def buckets(self) -> list[tuple[int, int]]:
        return list(self.plan.schedule.sizes)

    def fingerprint(self) -> int:
        """A checksum of what must be equal on every host (sample count, buckets and their
        frequencies, seed): hosts that list different shards would otherwise feed different shapes."""
        plan = self.plan
        summary = [len(plan.source.records), plan.schedule.sizes, plan.schedule.probabilities.round(12).tolist(),
                   plan.schedule.random_ratio, plan.seed, plan.cfg.shuffle, plan.batch_size * plan.process_count]
        return zlib.crc32(json.dumps(summary).encode()) & 0x7FFFFFFF  # fits int32: jax gathers without x64

    def __iter__(self) -> "TrainIterator":
        return TrainIterator(self.plan)


def _initial_state() -> dict:
    return {"step": 0, "position": 0, "pending": [], "skipped": {r: 0 for r in SKIP_REASONS},
            "consecutive_skips": 0}


class TrainIterator(grain.DatasetIterator):
    """Per-host batches ``{"images": uint8 (b, H, W, 3), "captions": [str], "bucket": (H, W)}``."""

    def __init__(self, plan: LoaderPlan):
        super().__init__()
        self._plan = plan
        self._state = _initial_state()  # as of the last batch handed out
        self._executor = ThreadPoolExecutor(plan.cfg.num_workers, thread_name_prefix="cascade-data")
        self._producer: _Producer | None = None

    @property
    def skip_counts(self) -> dict[str, int]:
        """Samples dropped so far by reason (``filtered`` are rejected by the filters, not bad)."""
        return dict(self._state["skipped"])

    @property
    def step(self) -> int:
        return self._state["step"]

    @property
    def source(self):
        """The sample source (``records``, ``description``), for the trainer's start-up lines."""
        return self._plan.source

    def sample_captions(self, count: int, scan: int = 64) -> list[str]:
        """Up to ``count`` distinct non-empty captions of the first ``scan`` samples of the global order: the
        same on every host and after a resume (the trainer's sample collages prompt with them)."""
        plan, captions = self._plan, []
        for position in range(min(scan, len(plan.source.records))):
            try:
                caption = plan.source.read(plan.records[position]).caption
            except SkipSample:
                continue
            if caption and caption not in captions:
                captions.append(caption)
                if len(captions) == count:
                    break
        return captions

    def start_prefetch(self) -> None:
        if self._producer is None:
            self._producer = _Producer(self._plan, copy.deepcopy(self._state), self._executor)

    def __next__(self) -> dict:
        self.start_prefetch()
        state_after, batch = self._producer.get()
        self._state = state_after
        return batch

    def get_state(self) -> dict:
        return copy.deepcopy(self._state)

    def set_state(self, state: dict) -> None:
        missing = set(_initial_state()) - set(state)
        if missing:
            raise ValueError(f"data iterator state lacks {sorted(missing)}; was it saved by another loader?")
        self._stop_producer()
        self._state = copy.deepcopy(state)

    def close(self) -> None:
        self._stop_producer()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _stop_producer(self) -> None:
        if self._producer is not None:
            self._producer.stop()
            self._producer = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: nothing left to release
            pass


class _Producer:
    """A thread that assembles batches in order into a bounded queue, each with its state after."""

    def __init__(self, plan: LoaderPlan, state: dict, executor: ThreadPoolExecutor):
        self._assembler = _BatchAssembler(plan, state, executor)
        self._queue: queue.Queue = queue.Queue(maxsize=plan.cfg.prefetch_batches)
        self._stopped = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name="cascade-data-producer")
        self._thread.start()

    def _run(self) -> None:
        while not self._stopped.is_set():
            try:
                item = self._assembler.next_batch()
            except BaseException as err:  # handed to the trainer's thread, which re-raises it
                item = err
            while not self._stopped.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, BaseException):
                return

    def get(self):
        if self._error is not None:  # the thread has ended: asking again must not wait forever
            raise self._error
        item = self._queue.get()
        if isinstance(item, BaseException):
            self._error = item
            raise item
        return item

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()


class _BatchAssembler:
    """The deterministic part: which samples form each batch, given the state."""

    def __init__(self, plan: LoaderPlan, state: dict, executor: ThreadPoolExecutor):
        self.plan, self.state, self.executor = plan, state, executor
        self.lookahead: collections.OrderedDict[int, Future] = collections.OrderedDict()
        self.depth = max(2 * plan.batch_size, 2 * plan.cfg.num_workers)

    def next_batch(self) -> tuple[dict, dict]:
        plan, state = self.plan, self.state
        index = plan.schedule.bucket_index(state["step"])
        size = plan.schedule.sizes[index]
        taken: list[Future] = []
        # Ratios may share a shape (4/5 and 5/6 at 768): a bucket is its shape.
        held = [p for p in state["pending"] if plan.schedule.sizes[p[0]] == size][: plan.batch_size]
        for entry in held:  # held-back samples of this bucket go first, oldest first
            state["pending"].remove(entry)
            taken.append(self.executor.submit(_load_and_crop, plan, entry[1], size))
        while len(taken) < plan.batch_size:
            taken.extend(self._take_next(index, size))
        images, captions = self._finish(taken, index, size)
        state["step"] += 1
        return copy.deepcopy(state), {"images": images, "captions": captions, "bucket": size}

    def _take_next(self, index: int, size) -> list[Future]:
        """Read the next stream sample: take it, hold it back, or (held-back queue full) take the best held."""
        state, plan = self.state, self.plan
        position = state["position"]
        result = self._decoded(position)
        state["position"] += 1
        if isinstance(result, SkipSample):
            self._count_skip(result.reason)
            return []
        state["consecutive_skips"] = 0
        image, caption = result
        aspect = image.size[0] / image.size[1]
        own = bk.closest_bucket(image.size[0], image.size[1], plan.schedule.ratios)
        if plan.schedule.sizes[own] == size:
            return [self.executor.submit(_crop, plan, position, image, caption, size)]
        state["pending"].append([own, position, aspect])
        if len(state["pending"]) <= plan.max_pending:
            return []
        target = plan.schedule.ratios[index]
        best = min(state["pending"], key=lambda p: abs(p[2] - target))  # min keeps the oldest on ties
        state["pending"].remove(best)
        return [self.executor.submit(_load_and_crop, plan, best[1], size)]

    def _decoded(self, position: int):
        """The decode of ``position``, keeping ``depth`` positions decoding ahead on the workers."""
        for ahead in range(position, position + self.depth):
            if ahead not in self.lookahead:
                self.lookahead[ahead] = self.executor.submit(_load, self.plan, ahead)
        for stale in [p for p in self.lookahead if p < position]:
            del self.lookahead[stale]
        return self.lookahead.pop(position).result()

    def _count_skip(self, reason: str) -> None:
        state = self.state
        state["skipped"][reason] = state["skipped"].get(reason, 0) + 1  # .get: states saved before a new reason
        state["consecutive_skips"] += 1
        # Each pass is reshuffled, so a run of bad samples may end one pass and start the next: only twice the
        # dataset's length of skips in a row proves a whole pass without one usable sample (on one host; with
        # several, this host reads its share of 2 x process_count passes).
        if state["consecutive_skips"] >= 2 * max(len(self.plan.source.records), 1):
            counts = {k: v for k, v in state["skipped"].items() if v}
            raise ValueError(f"no usable sample in a whole pass over {self.plan.source.description} "
                             f"(host {self.plan.process_index}, {state['consecutive_skips']} skipped in a row): "
                             f"skipped {counts}; check the paths, image_key/caption_key and filters")

    def _finish(self, taken: list[Future], index: int, size) -> tuple[np.ndarray, list[str]]:
        images, captions = [], []
        for future in taken:
            result = future.result()
            if isinstance(result, SkipSample):  # a held-back sample that no longer reads: replace it
                self._count_skip(result.reason)
                replacement: list[Future] = []
                while not replacement:
                    replacement = self._take_next(index, size)
                taken.extend(replacement)
                continue
            images.append(result[0])
            captions.append(result[1])
        return np.stack(images), captions


def _load(plan: LoaderPlan, position: int):
    """(decoded RGB image, caption) of a stream position, or the SkipSample saying why not."""
    record = plan.records[plan.global_position(position)]
    try:
        raw = plan.source.read(record)
        return decode_rgb(raw, plan.cfg.max_image_pixels), raw.caption
    except SkipSample as skip:
        return skip
    except StorageError:
        raise  # the bucket is unreachable after retries: every sample would fail, so the run stops here
    except Exception as err:  # noqa: BLE001 - one odd sample must not end a run; it is counted and logged
        logger.warning("skipping unreadable sample %r of %s: %s: %s", record, plan.source.description,
                       type(err).__name__, err)
        return SkipSample("unreadable", f"{record!r}: {err}")


def _crop(plan: LoaderPlan, position: int, image, caption: str, size):
    # Keyed on the global position: the same sample gets the same crop however many hosts read.
    rng = np.random.default_rng([plan.seed, plan.global_position(position), 0xC409])
    return bk.resize_and_crop(image, size, rng), caption


def _load_and_crop(plan: LoaderPlan, position: int, size):
    result = _load(plan, position)
    return result if isinstance(result, SkipSample) else _crop(plan, position, *result, size)


def probe_frequencies(source, records: grain.MapDataset, count: int, ratios, limit: int,
                      max_pixels: int | None = None) -> np.ndarray:
    """Closest-bucket counts of the first ``count`` usable samples of the global order (headers only).

    Every host reads the same positions, so every host derives the same bucket frequencies.
    """
    frequencies = np.zeros(len(ratios))
    skipped = collections.Counter()
    for position in range(limit):
        try:
            image = open_image(source.read(records[position]))
            check_pixels(image, max_pixels, str(records[position]))
            width, height = image.size
        except SkipSample as skip:
            skipped[skip.reason] += 1
            continue
        frequencies[bk.closest_bucket(width, height, ratios)] += 1
        if frequencies.sum() >= count:
            break
    if frequencies.sum() == 0:
        raise ValueError(f"no usable sample in {source.description}: all {limit} skipped ({dict(skipped)}); "
                         f"check the paths, image_key/caption_key and filters")
    return frequencies


def make_train_loader(data_cfg: DataConfig | dict, *, global_batch_size: int, image_size: int,
                      multi_aspect_ratio=None, seed: int = 0, process_index: int = 0,
                      process_count: int = 1) -> TrainLoader:
    """The loader of this host's part of every global batch (see the module docstring).

    ``multi_aspect_ratio``: the official list (``["1/1", "9/16", ...]``) or None for one square
    ``image_size`` bucket. ``global_batch_size`` must divide evenly over ``process_count`` hosts.
    """
    cfg = data_cfg if isinstance(data_cfg, DataConfig) else DataConfig.from_dict(data_cfg)
    if global_batch_size % process_count or global_batch_size <= 0:
        raise ValueError(f"global batch size {global_batch_size} must be a positive multiple of the "
                         f"{process_count} hosts")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is outside 0..{process_count - 1}")
    source = make_source(cfg)
    records = grain.MapDataset.source(source.records)
    if cfg.shuffle:
        records = records.shuffle(seed=seed % 2**32)
    records = records.repeat()
    if multi_aspect_ratio:
        ratios = bk.bucket_ratios(multi_aspect_ratio)
        sizes = bk.bucket_sizes(image_size, ratios)
        probe_count = cfg.bucket_probe_size
    else:
        ratios, sizes = bk.single_bucket(image_size)
        probe_count = 1  # one usable sample proves the source is not empty
    frequencies = probe_frequencies(source, records, probe_count, ratios, limit=len(source.records),
                                    max_pixels=cfg.max_image_pixels)
    schedule = bk.BucketSchedule(sizes, ratios, frequencies, cfg.bucket_random_ratio if multi_aspect_ratio else 0,
                                 seed)
    local_size = -(-len(source.records) // process_count)
    plan = LoaderPlan(cfg, source, records, local_size, schedule, global_batch_size // process_count, seed,
                      process_index, process_count)
    loader = TrainLoader(plan)
    if process_count > 1 and jax.process_count() == process_count:  # real hosts, not simulated ones
        from jax.experimental import multihost_utils

        multihost_utils.assert_equal(np.asarray([loader.fingerprint()], np.int32),
                                     f"the data loaders of {source.description} differ between hosts (different "
                                     f"files or config?); every host must see the same dataset")
    return loader
