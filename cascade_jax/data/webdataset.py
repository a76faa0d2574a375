"""WebDataset tar shards as a random-access source.

Shard paths may be lists, globs and brace ranges (``data/part-{000..099}.tar``, ``{a,b}``), as
webdataset writes them. Each shard's member headers are scanned once (no data is read) to group
members by key: the member path up to the first dot of its file name, as webdataset does, with
the rest (``jpg``, ``txt``, ``json``) the field. A sample is then read by seeking into the tar, so
Grain can shuffle globally and each host reads only its own samples. Shards must be uncompressed
tars (webdataset's default); compressed ones cannot be read at random and are refused by name.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import tarfile
import threading
from concurrent.futures import ThreadPoolExecutor

from cascade_jax.data.config import DataConfig
from cascade_jax.data.filters import MetadataFilter
from cascade_jax.data.sources import RawSample, SkipSample, check_filters, parse_json, text_of

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


def expand_shards(paths) -> list[str]:
    """Every shard named by the paths, globs and brace ranges (one string or a list), in order, without repeats."""
    paths = [paths] if isinstance(paths, str) else paths
    shards: list[str] = []
    for path in paths:
        if path.strip().startswith("pipe:"):  # an official form (webdataset_path: "pipe:aws s3 cp ...")
            raise ValueError(f"webdataset shard {path!r}: a 'pipe:' command is a stream, and this loader reads tar "
                             "files at random (global shuffle, exact resume); give the shard files' paths or a "
                             "brace range (x-{000..099}.tar) instead")
        for pattern in expand_braces(os.path.expanduser(path)):
            found = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
            if not found or not os.path.exists(found[0]):
                raise FileNotFoundError(f"webdataset shard {pattern!r} (from {path!r}) matches no file")
            shards.extend(f for f in found if f not in shards)
    return shards


def split_member(name: str) -> tuple[str, str]:
    """``dir/000123.seg.jpg`` -> (``dir/000123``, ``seg.jpg``): the key and the field."""
    directory, base = os.path.split(name)
    stem, dot, field = base.partition(".")
    return (os.path.join(directory, stem) if directory else stem), (field.lower() if dot else "")


def index_shard(path: str) -> list[tuple[str, dict]]:
    """(key, {field: (offset, size)}) per sample in the shard, in tar order; headers only."""
    if path.endswith((".gz", ".tgz", ".bz2", ".xz", ".zst")):
        raise ValueError(f"webdataset shard {path!r} is compressed; random access needs plain .tar shards "
                         f"(decompress it, e.g. `gunzip`)")
    try:
        members = _scan_ustar(path)
        if members is None:  # pax / GNU long-name headers or an old format: tarfile knows them all
            with tarfile.open(path, mode="r:") as tar:
                members = [(m.name, m.offset_data, m.size) for m in tar if m.isfile()]
    except (tarfile.TarError, OSError) as err:
        raise ValueError(f"webdataset shard {path!r} cannot be read as a tar file: {err}") from None
    samples: dict[str, dict] = {}
    for name, offset, size in members:
        key, field = split_member(name)
        samples.setdefault(key, {})[field] = (offset, size)
    return list(samples.items())


def _scan_ustar(path: str) -> list[tuple[str, int, int]] | None:
    """(name, data offset, size) of the regular files of a plain ustar tar, ~5x faster than tarfile.

    None when a header is not plain ustar (pax, GNU long names, base-256 sizes, bad checksum), so
    the caller falls back to tarfile, which then also reports a damaged file.
    """
    members, offset = [], 0
    with open(path, "rb") as f:
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


def cached_index(path: str, cache_dir: str | None) -> list[tuple[str, dict]]:
    """``index_shard``, kept as JSON in ``cache_dir`` (keyed by path, size and mtime) when given.

    A scan costs ~11 us per member (tarfile: ~60 us), so a 10k-sample shard ~0.3 s, paid by every
    host on every start without a cache; with one, a restart reads a small JSON file per shard.
    """
    if cache_dir is None:
        return index_shard(path)
    stat = os.stat(path)
    stamp = {"path": os.path.abspath(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    name = hashlib.sha1(stamp["path"].encode()).hexdigest()[:20] + ".json"
    cache_file = os.path.join(cache_dir, name)
    try:
        with open(cache_file, encoding="utf-8") as f:
            cached = json.load(f)
        if cached.get("stamp") == stamp:
            return [(key, {field: tuple(v) for field, v in fields.items()}) for key, fields in cached["samples"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass  # absent, stale or damaged: index again and rewrite it
    samples = index_shard(path)
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{cache_file}.{os.getpid()}.{threading.get_ident()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"stamp": stamp, "samples": samples}, f)
    os.replace(tmp, cache_file)  # atomic: hosts sharing the cache folder never read a half-written file
    return samples


class WebDatasetSource:
    """Samples of tar shards: an image field (first of image_keys present) and a caption."""

    def __init__(self, cfg: DataConfig):
        self.shards = expand_shards(cfg.paths)
        self.description = ", ".join(cfg.paths)
        self.image_fields = cfg.image_keys
        caption = cfg.caption_field
        self.caption_json_field = caption[5:] if caption.startswith("json:") else None
        self.caption_field = None if self.caption_json_field else caption.lower().lstrip(".")
        self.filters = MetadataFilter(cfg.filters)
        wanted = set(self.image_fields) | {"json"} | ({self.caption_field} - {None})
        # On network file systems the header scans wait on I/O: overlap them on the worker threads.
        with ThreadPoolExecutor(cfg.num_workers) as pool:
            indexes = list(pool.map(lambda shard: cached_index(shard, cfg.index_cache), self.shards))
        self.records = []
        for shard_index, index in enumerate(indexes):
            for key, fields in index:
                fields = {f: v for f, v in fields.items() if f in wanted}
                if fields:
                    self.records.append((shard_index, key, fields))
        if not self.records:
            raise ValueError(f"webdataset shards {self.description} hold no sample with any of the fields "
                             f"{', '.join(sorted(wanted))}")

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
            metadata = None
            if "json" in fields and (self.filters or self.caption_json_field):
                metadata = parse_json(self._read_field(record, "json"), f"{name}.json")
            check_filters(self.filters, metadata, name)
            caption = self._caption(record, fields, metadata, name)
            return RawSample(self._read_field(record, image_field), caption, f"{name}.{image_field}")
        except OSError as err:
            raise SkipSample("unreadable", f"{name}: {err}") from None

    def _caption(self, record, fields, metadata, name) -> str:
        if self.caption_json_field:
            if not metadata or self.caption_json_field not in metadata:
                raise SkipSample("no_caption", f"{name}: no json field {self.caption_json_field!r}")
            return text_of(metadata[self.caption_json_field], f"{name}.json")
        if self.caption_field not in fields:
            raise SkipSample("no_caption", f"{name}: no .{self.caption_field} member")
        return text_of(self._read_field(record, self.caption_field), f"{name}.{self.caption_field}")
