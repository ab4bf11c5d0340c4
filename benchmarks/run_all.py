"""`make bench`: every benchmark in turn (each writes benchmarks/results/<name>.json)."""

import importlib

for name in ("bench_train", "bench_generate", "bench_prepare", "bench_duo_oracle", "bench_adaptive", "bench_mfu_125m"):
    try:
        mod = importlib.import_module(f"benchmarks.{name}")
    except ModuleNotFoundError as e:
        print(f"skipping {name}: {e}")
        continue
    print(f"== {name}")
    mod.main([])
