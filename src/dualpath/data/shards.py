"""Binary token shards, the train-time reader and the stateless window sampler.

Shard layout (little-endian), see docs/DATA.md:

    offset  size  field
    0       8     magic b"DPTOKENS"
    8       4     format version (uint32, currently 1)
    12      4     token width in bytes (uint32: 2 = uint16, 4 = uint32)
    16      8     token count N (uint64)
    24      8     vocab size (uint64, 0 = unknown)
    32      32    zero padding
    64      N*w   the tokens

A shard's file size is exactly 64 + N * width; every reader checks it.
"""

from __future__ import annotations

import os
import re
import struct
from pathlib import Path


import numpy as np

from ..errors import DataError
from ..fileio import atomic_write_bytes, default_mode, fsync_dir  # noqa: F401 (re-exported)

MAGIC = b"DPTOKENS"
FORMAT_VERSION = 1
HEADER_BYTES = 64
_HEADER = struct.Struct("<8sIIQQ")  # magic, version, width, count, vocab size; padded to HEADER_BYTES
_DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}
_SHARD_NAME = re.compile(r"^(?P<split>.+)_(?P<index>\d+)\.bin$")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), else uint32."""
    if vocab_size < 1:
        raise DataError(f"vocab size must be >= 1, got {vocab_size}")
    if vocab_size <= 2**16:
        return _DTYPES[2]
    if vocab_size <= 2**32:
        return _DTYPES[4]
    raise DataError(f"vocab size {vocab_size} does not fit in uint32 token ids")


def _check_ids(tokens: np.ndarray, vocab_size: int, where: str) -> None:
    if tokens.size == 0:
        return
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0:
        raise DataError(f"{where}: negative token id {lo}")
    if hi >= vocab_size:
        raise DataError(f"{where}: token id {hi} is out of range for vocab size {vocab_size}")


def write_shard(path: str | os.PathLike, tokens: np.ndarray, vocab_size: int) -> Path:
    """Write `tokens` (any integer array) as one shard, atomically (temp name + fsync + rename).

    The token width is uint16 when vocab_size <= 65536, else uint32. Every id must be in [0, vocab_size).
    """
    path = Path(path)
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        tokens = tokens.reshape(-1)
    if tokens.size and not np.issubdtype(tokens.dtype, np.integer):
        raise DataError(f"{path}: tokens must be integers, got dtype {tokens.dtype}")
    dtype = token_dtype(vocab_size)
    _check_ids(tokens, vocab_size, str(path))
    data = np.ascontiguousarray(tokens, dtype=dtype)
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, dtype.itemsize, data.size, vocab_size)
    header += b"\0" * (HEADER_BYTES - len(header))
    atomic_write_bytes(path, (header, memoryview(data).cast("B")))
    return path


def read_header(path: str | os.PathLike) -> dict:
    """Read and validate a shard header; returns {version, width, count, vocab_size}. DataError if invalid."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
    except FileNotFoundError:
        raise DataError(f"shard not found: {path}") from None
    except OSError as e:
        raise DataError(f"cannot read shard {path}: {e.strerror or e}") from None
    if len(raw) < HEADER_BYTES:
        raise DataError(f"{path}: truncated shard header ({len(raw)} of {HEADER_BYTES} bytes)")
    magic, version, width, count, vocab_size = _HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise DataError(f"{path}: not a dualpath token shard (bad magic {magic!r})")
    if version != FORMAT_VERSION:
        raise DataError(f"{path}: unsupported shard format version {version} (this reader knows {FORMAT_VERSION})")
    if width not in _DTYPES:
        raise DataError(f"{path}: bad token width {width} (expected 2 or 4)")
    expected = HEADER_BYTES + count * width
    if size != expected:
        raise DataError(f"{path}: file is {size} bytes but its header says {count} tokens ({expected} bytes); "
                        f"the shard is truncated or corrupt")
    return {"version": version, "width": width, "count": count, "vocab_size": vocab_size}


def read_shard(path: str | os.PathLike) -> np.memmap:
    """Memory-map a shard's tokens read-only (uint16 or uint32), after validating its header and size."""
    h = read_header(path)
    if h["count"] == 0:  # mmap cannot map zero bytes
        return np.zeros(0, dtype=_DTYPES[h["width"]])
    return np.memmap(path, dtype=_DTYPES[h["width"]], mode="r", offset=HEADER_BYTES, shape=(h["count"],))


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:03d}.bin"


def find_shards(directory: str | os.PathLike, split: str) -> list[Path]:
    """The `{split}_NNN.bin` files of a folder, in numeric order."""
    directory = Path(directory)
    found = []
    for p in directory.glob(f"{glob_escape(split)}_*.bin"):
        m = _SHARD_NAME.match(p.name)
        if m and m.group("split") == split:
            found.append((int(m.group("index")), p))
    return [p for _, p in sorted(found)]


def glob_escape(s: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", s)


class ShardWriter:
    """Streams tokens into `{split}_000.bin`, `{split}_001.bin`, ... of `shard_tokens` tokens each.

    Memory: one buffer of `shard_tokens` tokens. Call `close()` to write the last (partial) shard; no empty
    shard is ever written. Usable as a context manager (an exception skips the final partial shard).
    """

    def __init__(self, directory: str | os.PathLike, split: str, vocab_size: int, shard_tokens: int = 2**24):
        if shard_tokens < 1:
            raise DataError(f"shard_tokens must be >= 1, got {shard_tokens}")
        self.directory = Path(directory)
        self.split = split
        self.vocab_size = int(vocab_size)
        self.shard_tokens = int(shard_tokens)
        self.dtype = token_dtype(self.vocab_size)
        self._buf = np.empty(self.shard_tokens, dtype=self.dtype)
        self._fill = 0
        self.n_tokens = 0
        self.paths: list[Path] = []
        self._closed = False

    def write(self, tokens: np.ndarray) -> None:
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        tokens = np.asarray(tokens).reshape(-1)
        _check_ids(tokens, self.vocab_size, f"{self.split} tokens")
        pos = 0
        while pos < tokens.size:
            take = min(self.shard_tokens - self._fill, tokens.size - pos)
            self._buf[self._fill:self._fill + take] = tokens[pos:pos + take]
            self._fill += take
            pos += take
            if self._fill == self.shard_tokens:
                self._flush()
        self.n_tokens += tokens.size

    def _flush(self) -> None:
        if self._fill == 0:
            return
        path = self.directory / shard_name(self.split, len(self.paths))
        write_shard(path, self._buf[:self._fill], self.vocab_size)
        self.paths.append(path)
        self._fill = 0

    def close(self) -> list[Path]:
        if not self._closed:
            self._flush()
            self._closed = True
            self._buf = np.empty(0, dtype=self.dtype)
        return self.paths

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._closed = True


class TokenShards:
    """All `{split}_*.bin` shards of a folder as one memory-mapped token sequence (never loaded into RAM).

    `n_tokens` is the total; `get(start, length)` (or `shards[a:b]`) returns tokens as int64 and may cross
    shard boundaries.
    """

    def __init__(self, directory: str | os.PathLike, split: str = "train"):
        self.directory = Path(directory)
        self.split = split
        if not self.directory.is_dir():
            raise DataError(f"data folder not found: {self.directory}")
        paths = find_shards(self.directory, split)
        if not paths:
            raise DataError(f"no {split} shards ({split}_*.bin) in {self.directory}")
        self.paths = paths
        self.arrays = [read_shard(p) for p in paths]
        widths = {a.dtype.itemsize for a in self.arrays}
        if len(widths) > 1:
            raise DataError(f"{self.directory}: {split} shards mix token widths {sorted(widths)}")
        vocab = {read_header(p)["vocab_size"] for p in paths} - {0}
        self.vocab_size = max(vocab) if vocab else None
        sizes = np.array([a.size for a in self.arrays], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])  # offsets[k] = first global index of shard k
        self.n_tokens = int(self.offsets[-1])
        self.dtype = self.arrays[0].dtype

    def __len__(self) -> int:
        return self.n_tokens

    def check_ids(self, vocab_size: int, chunk: int = 1 << 24) -> None:
        """DataError naming the shard unless every token id is below vocab_size (the model's vocabulary):
        a shard from another tokenizer, or one made by hand, must fail here and not as an IndexError later.
        Reads every shard once, in chunks."""
        for path, arr in zip(self.paths, self.arrays):
            for start in range(0, arr.size, chunk):
                hi = int(arr[start:start + chunk].max())
                if hi >= vocab_size:
                    raise DataError(f"{path}: token id {hi} is out of range for the model's vocabulary "
                                    f"({vocab_size}): the data and the model do not belong together")

    def get(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start+length) as int64; crosses shard boundaries as needed."""
        start, length = int(start), int(length)
        if start < 0 or length < 0 or start + length > self.n_tokens:
            raise IndexError(f"tokens [{start}, {start + length}) out of range for {self.n_tokens} "
                             f"tokens in split {self.split}")
        out = np.empty(length, dtype=np.int64)
        k = int(np.searchsorted(self.offsets, start, side="right")) - 1
        pos, filled = start, 0
        while filled < length:
            local = pos - int(self.offsets[k])
            take = min(self.arrays[k].size - local, length - filled)
            out[filled:filled + take] = self.arrays[k][local:local + take]
            filled += take
            pos += take
            k += 1
        return out

    def __getitem__(self, item: slice) -> np.ndarray:
        if not isinstance(item, slice) or item.step not in (None, 1):
            raise TypeError("TokenShards supports contiguous slices only, e.g. shards[a:b]")
        start, stop, _ = item.indices(self.n_tokens)
        return self.get(start, max(0, stop - start))

    def __repr__(self) -> str:
        return f"TokenShards({str(self.directory)!r}, split={self.split!r}, shards={len(self.paths)}, " \
               f"n_tokens={self.n_tokens})"


class WindowSampler:
    """Deterministic, stateless random-access order of non-overlapping windows of `seq_len + 1` tokens.

    Window w covers tokens [w*seq_len, w*seq_len + seq_len + 1) (consecutive windows share one boundary
    token, so every token is a target exactly once per epoch); n_windows = (n_tokens - 1) // seq_len.
    Global sample index i (a counter that grows without bound) maps to epoch e = i // n_windows and window
    perm_e[i % n_windows], where perm_e = shuffle(arange(n_windows)) with np.random.default_rng([seed, e]).
    Nothing depends on call history: resume by storing i; DDP ranks take disjoint ranges of i.
    """

    def __init__(self, n_tokens: int, seq_len: int, seed: int = 0, *, split: str = "train"):
        n_tokens, seq_len = int(n_tokens), int(seq_len)
        if seq_len < 1:
            raise DataError(f"sequence length must be >= 1, got {seq_len}")
        if n_tokens < seq_len + 1:
            raise DataError(f"sequence length {seq_len} is longer than the data ({n_tokens} tokens in split {split})")
        self.n_tokens = n_tokens
        self.seq_len = seq_len
        self.seed = int(seed)
        self.split = split
        self.n_windows = (n_tokens - 1) // seq_len
        self._cache: dict[int, np.ndarray] = {}

    def permutation(self, epoch: int) -> np.ndarray:
        """perm_e (cached for the last two epochs; a pure function of seed and epoch)."""
        perm = self._cache.get(epoch)
        if perm is None:
            dtype = np.int32 if self.n_windows < 2**31 else np.int64
            perm = np.arange(self.n_windows, dtype=dtype)
            np.random.default_rng([self.seed, int(epoch)]).shuffle(perm)
            if len(self._cache) >= 2:
                self._cache.pop(next(iter(self._cache)))
            self._cache[epoch] = perm
        return perm

    def windows(self, start: int, count: int) -> np.ndarray:
        """Window indices for global sample indices start .. start+count-1 (int64)."""
        start, count = int(start), int(count)
        if start < 0 or count < 0:
            raise ValueError(f"start and count must be >= 0, got {start}, {count}")
        out = np.empty(count, dtype=np.int64)
        i, filled = start, 0
        while filled < count:
            epoch, pos = divmod(i, self.n_windows)
            take = min(self.n_windows - pos, count - filled)
            out[filled:filled + take] = self.permutation(epoch)[pos:pos + take]
            filled += take
            i += take
        return out

    def epoch(self, i: int) -> int:
        return int(i) // self.n_windows

    def batch(self, shards: "TokenShards", start: int, count: int) -> np.ndarray:
        """Samples start .. start+count-1 as an int64 array [count, seq_len + 1]."""
        if shards.n_tokens != self.n_tokens:
            raise DataError(f"window sampler was built for {self.n_tokens} tokens but split {shards.split} "
                            f"has {shards.n_tokens}")
        out = np.empty((int(count), self.seq_len + 1), dtype=np.int64)
        for row, w in enumerate(self.windows(start, count)):
            out[row] = shards.get(int(w) * self.seq_len, self.seq_len + 1)
        return out
