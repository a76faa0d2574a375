"""WebDataset tar shards as a random-access source.

Shard paths may be lists, globs and brace ranges (``data/part-{000..099}.tar``, ``{a,b}``), as
webdataset writes them, local or URLs (``s3://bucket/part-{000..099}.tar``, ``gs://bucket/data/*.tar``); a
URL or folder that is not a ``.tar`` names every ``.tar`` under it, as the official trainer lists
``s3://`` prefixes. Each shard's member headers are scanned once (no data is read) to group
members by key: the member path up to the first dot of its file name, as webdataset does, with
the rest (``jpg``, ``txt``, ``json``) the field. A sample is then read by seeking into the tar (for a
URL: one ranged read of the sample's members), so Grain can shuffle globally and each host reads only
its own samples. Without shuffling, remote shards are streamed instead: aligned blocks with the next
one read ahead, in bounded memory. Remote shard indexes are cached locally (or in ``index_cache``, which
may be a bucket folder shared by the hosts) keyed by the object's generation/ETag and size. Shards must be uncompressed
tars (webdataset's default); compressed ones cannot be read at random and are refused by name.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
import tarfile
from concurrent.futures import ThreadPoolExecutor

from cascade_jax import storage
from cascade_jax.storage import atomic
from cascade_jax.data.config import DataConfig
from cascade_jax.data.filters import MetadataFilter
from cascade_jax.data.sources import RawSample, SkipSample, check_filters, parse_json, text_of

logger = logging.getLogger(__name__)
_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """``a{000..002}b`` -> a000b a001b a002b (zero padding kept); ``{x,y}`` -> both; nested left to right."""
    match = _BRACE.search(pattern)
    if not match:
        return [pattern]
    body, head, tail = match.group(1), pattern[: match.start()], pattern[match.end():]
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        lo, hi = numeric.groups()
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        options = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
        if not options:
            raise ValueError(f"brace range {{{body}}} in {pattern!r} is empty (start > end)")
    else:
        options = body.split(",")
    return [p for option in options for p in expand_braces(head + option + tail)]


def expand_shards(paths, stats: dict | None = None) -> list[str]:
    """Every shard named by the paths, globs and brace ranges (one string or a list), in order, without repeats.
    ``stats``, if given, receives ``{shard: stat}`` of remote shards found by listing (no request per shard later)."""
    paths = [paths] if isinstance(paths, str) else paths
    paths = [p for path in paths for p in _listed_in_yaml(path)]
    shards: list[str] = []
    folders: dict = {}  # folder URL -> its listing, for shards named one by one
    for path in paths:
        if path.strip().startswith("pipe:"):  # an official form (webdataset_path: "pipe:aws s3 cp ...")
            raise ValueError(f"webdataset shard {path!r}: a 'pipe:' command is a stream, and this loader reads tar "
                             "files at random (global shuffle, exact resume); give the shard files' paths or a "
                             "brace range (x-{000..099}.tar) instead (s3:// and gs:// URLs are read directly)")
        for pattern in expand_braces(path if storage.is_url(path) else os.path.expanduser(path)):
            if storage.is_url(pattern):
                found = _remote_shards(pattern, path, stats if stats is not None else {}, folders)
            else:
                found = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
            if not found or not (storage.is_url(found[0]) or os.path.exists(found[0])):
                raise FileNotFoundError(f"webdataset shard {pattern!r} (from {path!r}) matches no file")
            seen = set(shards)
            shards.extend(f for f in found if f not in seen)
    return shards


def _listed_in_yaml(path: str) -> list[str]:
    """``[path]``, or the shards a ``.yml``/``.yaml`` file lists: the official trainer's
    ``webdataset_path: shards.yml`` form (a YAML list of shard paths, or one path)."""
    if not path.strip().endswith((".yml", ".yaml")):
        return [path]
    import yaml

    try:
        listed = yaml.safe_load(storage.read_text(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"webdataset_path {path!r}: no such shard list file") from None
    except yaml.YAMLError as err:
        raise ValueError(f"webdataset_path {path!r}: not a YAML list of shards ({err})") from None
    listed = [listed] if isinstance(listed, str) else listed
    if not isinstance(listed, list) or not listed or not all(isinstance(p, str) for p in listed):
        raise ValueError(f"webdataset_path {path!r} must hold a YAML list of shard paths (or one path), "
                         f"got {type(listed).__name__}: {str(listed)[:80]!r}")
    return listed


def _listed_stat(url: str, folders: dict) -> dict:
    """The size and version of one named shard from one listing of its folder (kept in ``folders``), shared
    by every shard named there: a brace range of 10,000 shards costs a paged listing, not 10,000 requests."""
    folder = storage.parent(url)
    if folder not in folders:
        listed = storage.listing(folder).items()
        folders[folder] = {storage.join(folder, rel): st for rel, st in listed if "/" not in rel}
    return folders[folder][url] if url in folders[folder] else storage.stat(url)  # absent: stat names what is missing


def _remote_shards(pattern: str, path: str, stats: dict, folders: dict) -> list[str]:
    """The shards a URL names: a glob, a prefix (every .tar under it, as the official trainer lists s3
    prefixes) or one object; their sizes and versions go into ``stats``."""
    try:
        if glob.has_magic(pattern):
            matches = storage.glob(pattern)
        elif pattern.rstrip("/").endswith((".tar", ".gz", ".tgz", ".bz2", ".xz", ".zst")):
            matches = [(pattern, _listed_stat(pattern, folders))]
        else:
            matches = [(storage.join(pattern, rel), st) for rel, st in sorted(storage.listing(pattern).items())
                       if rel.endswith(".tar")]
    except FileNotFoundError as err:
        raise FileNotFoundError(f"webdataset shard {pattern!r} (from {path!r}): {err}") from None
    stats.update(matches)
    return [url for url, _ in matches]


def split_member(name: str) -> tuple[str, str]:
    """``dir/000123.seg.jpg`` -> (``dir/000123``, ``seg.jpg``): the key and the field."""
    directory, base = os.path.split(name)
    stem, dot, field = base.partition(".")
    return (os.path.join(directory, stem) if directory else stem), (field.lower() if dot else "")


def index_shard(path: str, size: int | None = None) -> list[tuple[str, dict]]:
    """(key, {field: (offset, size)}) per sample in the shard, in tar order; headers only (a remote shard
    of ``size`` bytes is read in blocks from each header on, so large members are never downloaded)."""
    if path.endswith((".gz", ".tgz", ".bz2", ".xz", ".zst")):
        raise ValueError(f"webdataset shard {path!r} is compressed; random access needs plain .tar shards "
                         f"(decompress it, e.g. `gunzip`)")
    try:
        members = _scan_ustar(path, size)
        if members is None:  # pax / GNU long-name headers or an old format: tarfile knows them all
            with _open_shard(path, size) as f, tarfile.open(fileobj=f, mode="r:") as tar:
                members = [(m.name, m.offset_data, m.size) for m in tar if m.isfile()]
    except storage.StorageError:
        raise
    except (tarfile.TarError, OSError) as err:
        raise ValueError(f"webdataset shard {path!r} cannot be read as a tar file: {err}") from None
    samples: dict[str, dict] = {}
    for name, offset, size in members:
        key, field = split_member(name)
        samples.setdefault(key, {})[field] = (offset, size)
    return list(samples.items())


def _open_shard(path: str, size: int | None):
    if storage.is_url(path):
        from cascade_jax.storage.blocks import RangeReader

        return RangeReader(path, size if size is not None else storage.stat(path)["size"], block_size=1 << 20)
    return open(path, "rb")


def _scan_ustar(path: str, size: int | None = None) -> list[tuple[str, int, int]] | None:
    """(name, data offset, size) of the regular files of a plain ustar tar, ~5x faster than tarfile.

    None when a header is not plain ustar (pax, GNU long names, base-256 sizes, bad checksum), so
    the caller falls back to tarfile, which then also reports a damaged file.
    """
    members, offset = [], 0
    with _open_shard(path, size) as f:
        while True:
            f.seek(offset)
            header = f.read(512)
            if len(header) < 512 or header.count(0) == 512:
                return members
            special = header[156:157] in (b"L", b"K", b"S", b"x", b"g")  # long names, sparse, pax
            if header[257:262] != b"ustar" or special or header[124] & 0x80:  # 0x80: a base-256 size
                return None
            try:
                checksum = int(header[148:156].strip(b"\0 ") or b"0", 8)
                size = int(header[124:136].strip(b"\0 ") or b"0", 8)
            except ValueError:
                return None
            if checksum != sum(header[:148]) + 256 + sum(header[156:]):  # the checksum field counts as spaces
                return None
            name = header[:100].split(b"\0", 1)[0]
            prefix = header[345:500].split(b"\0", 1)[0]
            full = prefix + b"/" + name if prefix else name  # as tarfile joins them
            if header[156:157] in (b"0", b"\0", b"7") and not full.endswith(b"/"):  # "x/": an old-style folder
                members.append((full.decode("utf-8", "surrogateescape"), offset + 512, size))
            offset += 512 + -(-size // 512) * 512


def cached_index(path: str, cache_dir: str | None, stat: dict | None = None) -> list[tuple[str, dict]]:
    """``index_shard``, kept as JSON in ``cache_dir`` (keyed by path, size and mtime; for a URL by its
    generation/ETag and size) when given; a remote shard's index is always cached (default
    ``$CASCADE_JAX_CACHE/webdataset_index``). ``cache_dir`` may be a bucket folder shared by the hosts.

    A scan costs ~11 us per member (tarfile: ~60 us), so a 10k-sample shard ~0.3 s, paid by every
    host on every start without a cache; with one, a restart reads a small JSON file per shard.
    Over the network a scan reads the headers in ranged requests; the cache makes it one small read.
    """
    remote = storage.is_url(path)
    if cache_dir is None and not remote:
        return index_shard(path)
    if remote:
        stat = stat or storage.stat(path)
        stamp = {"path": path, "size": stat["size"], "version": stat["version"]}
        cache_dir = cache_dir or str(storage.cache_root() / "webdataset_index")
    else:
        st = os.stat(path)
        stamp = {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    name = hashlib.sha1(stamp["path"].encode()).hexdigest()[:20] + ".json"
    cache_file = storage.join(cache_dir, name)
    try:
        cached = json.loads(storage.read_bytes(cache_file))
        if cached.get("stamp") == stamp:
            return [(key, {field: tuple(v) for field, v in fields.items()}) for key, fields in cached["samples"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass  # absent, stale or damaged: index again and rewrite it
    samples = index_shard(path, stat["size"]) if remote else index_shard(path)
    _write_index(cache_file, json.dumps({"stamp": stamp, "samples": samples}))
    return samples


def _write_index(cache_file: str, text: str) -> None:
    if storage.is_url(cache_file):
        storage.write_text(cache_file, text)  # one object, published whole
        return
    atomic.write_text(cache_file, text)  # hosts sharing the cache folder never read a half-written file


def _indexes(shards: list[str], stats: dict, cfg: DataConfig) -> list[list]:
    """Every shard's index; a shard that is not a readable tar is skipped with a warning and counted (as a
    corrupt sample is), unless none is readable."""
    def index(shard):
        try:
            return cached_index(shard, cfg.index_cache, stats.get(shard))
        except ValueError as err:
            return err

    # On network file systems and buckets the header scans wait on I/O: overlap them on the worker threads.
    with ThreadPoolExecutor(cfg.num_workers) as pool:
        indexes = list(pool.map(index, shards))
    bad = [i for i in indexes if isinstance(i, ValueError)]
    if bad and len(bad) == len(indexes):
        raise bad[0]
    for err in bad:
        logger.warning("skipping a webdataset shard: %s", err)
        storage.count("skipped_shards")
    return [[] if isinstance(i, ValueError) else i for i in indexes]


class WebDatasetSource:
    """Samples of tar shards: an image field (first of image_keys present) and a caption."""

    def __init__(self, cfg: DataConfig):
        stats: dict = {}
        self.shards = expand_shards(cfg.paths, stats)
        self.description = ", ".join(cfg.paths)
        self.image_fields = cfg.image_keys
        caption = cfg.caption_field
        self.caption_json_field = caption[5:] if caption.startswith("json:") else None
        self.caption_field = None if self.caption_json_field else caption.lower().lstrip(".")
        self.filters = MetadataFilter(cfg.filters)
        wanted = set(self.image_fields) | {"json"} | ({self.caption_field} - {None})
        self.records = []
        for shard_index, index in enumerate(_indexes(self.shards, stats, cfg)):
            for key, fields in index:
                fields = {f: v for f, v in fields.items() if f in wanted}
                if fields:
                    self.records.append((shard_index, key, fields))
        # From the index: the trainer says up front how many samples read() will skip for want of a caption.
        self.uncaptioned = [f"{self.shards[i]}:{key}" for i, key, fields in self.records
                            if self.caption_field and self.caption_field not in fields]
        if not self.records:
            raise ValueError(f"webdataset shards {self.description} hold no sample with any of the fields "
                             f"{', '.join(sorted(wanted))}")
        # Read in order (no shuffle): remote shards are streamed in blocks with read-ahead, bounded memory.
        self.blocks = None
        if not cfg.shuffle and any(storage.is_url(s) for s in self.shards):
            from cascade_jax.storage.blocks import BlockCache

            self.blocks = BlockCache(capacity=2 * cfg.num_workers + 2,
                                     sizes={s: st["size"] for s, st in stats.items()})

    def _fetcher(self, record):
        """``fetch(field) -> bytes`` for one sample: a local seek, a block of the stream, or for a remote
        shard read at random one ranged read covering all the sample's members (they are adjacent)."""
        shard_index, key, fields = record
        shard = self.shards[shard_index]
        if not storage.is_url(shard):
            return lambda field: self._read_field(record, field)
        start = min(offset for offset, _ in fields.values())
        end = max(offset + size for offset, size in fields.values())
        if self.blocks is not None:
            span = self.blocks.read(shard, start, end - start)
        else:
            span = storage.read_range(shard, start, end - start)

        def fetch(field):
            offset, size = fields[field]
            data = span[offset - start:offset - start + size]
            if len(data) != size:
                raise SkipSample("unreadable", f"{shard}:{key}.{field} is truncated")
            return data

        return fetch

    def _read_field(self, record, field: str) -> bytes:
        shard_index, key, fields = record
        offset, size = fields[field]
        with open(self.shards[shard_index], "rb") as f:
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise SkipSample("unreadable", f"{self.shards[shard_index]}:{key}.{field} is truncated")
        return data

    def read(self, record) -> RawSample:
        shard_index, key, fields = record
        name = f"{self.shards[shard_index]}:{key}"
        image_field = next((f for f in self.image_fields if f in fields), None)
        if image_field is None:
            raise SkipSample("no_image", f"{name} has none of the fields {', '.join(self.image_fields)}")
        try:
            fetch = self._fetcher(record)
            metadata = None
            if "json" in fields and (self.filters or self.caption_json_field):
                metadata = parse_json(fetch("json"), f"{name}.json")
            check_filters(self.filters, metadata, name)
            caption = self._caption(fetch, fields, metadata, name)
            return RawSample(fetch(image_field), caption, f"{name}.{image_field}")
        except storage.StorageError:
            raise  # the store is unreachable (retries used up): every sample would fail the same way
        except OSError as err:
            raise SkipSample("unreadable", f"{name}: {err}") from None

    def _caption(self, fetch, fields, metadata, name) -> str:
        if self.caption_json_field:
            if not metadata or self.caption_json_field not in metadata:
                raise SkipSample("no_caption", f"{name}: no json field {self.caption_json_field!r}")
            return text_of(metadata[self.caption_json_field], f"{name}.json")
        if self.caption_field not in fields:
            raise SkipSample("no_caption", f"{name}: no .{self.caption_field} member")
        return text_of(fetch(self.caption_field), f"{name}.{self.caption_field}")
