"""Throughput of `dualpath prepare` (MB/s of UTF-8 input), tokenizer training included and excluded.

python -m benchmarks.bench_prepare
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from dualpath.data.prepare import prepare

from .common import table, write

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def main(argv=None) -> dict:
    sources = [SHARED / "tinyshakespeare.txt", SHARED / "grimm" / "tales.txt", SHARED / "wikitext-2" / "valid.txt"]
    sources = [s for s in sources if s.is_file()]
    if not sources:
        raise SystemExit("shared data not found")
    mb = sum(s.stat().st_size for s in sources) / 1e6
    rows = []
    tmp = Path(tempfile.mkdtemp())
    try:
        t = time.perf_counter()
        prepare([str(s) for s in sources], tmp / "a", vocab_size=8192, val_fraction=0.02, mix_until="all", progress=False)
        with_training = time.perf_counter() - t
        rows.append({"what": "train BPE 8192 + tokenize", "MB": mb, "seconds": with_training,
                     "MB_per_s": mb / with_training})
        t = time.perf_counter()
        prepare([str(s) for s in sources], tmp / "b", tokenizer=str(tmp / "a" / "tokenizer.json"),
                val_fraction=0.02, mix_until="all", progress=False)
        tokenize_only = time.perf_counter() - t
        rows.append({"what": "tokenize (existing tokenizer)", "MB": mb, "seconds": tokenize_only,
                     "MB_per_s": mb / tokenize_only})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    path = write("prepare", {"sources": [str(s) for s in sources], "rows": rows})
    print(table(rows, ["what", "MB", "seconds", "MB_per_s"]))
    print(f"wrote {path}")
    return {"rows": rows}


if __name__ == "__main__":
    main()
