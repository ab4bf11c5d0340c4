"""The `dualpath` command: a thin layer over library functions.

Bad input (config, data, checkpoint, argument) ends with one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from .errors import DualPathError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, no usage dump
        raise SystemExit(_fail(f"{self.prog}: {message}"))


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


# ----------------------------------------------------------------------------------------------


def cmd_solve(args) -> int:
    from .config import ModelConfig
    from .solver import PAPER_GRID, solve, solve_grid, table_markdown

    backbone = ModelConfig(d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads,
                           n_kv_heads=args.n_kv_heads or args.n_heads, vocab_size=args.vocab_size,
                           seq_len=args.seq_len, tie_embeddings=args.tie_embeddings, d_ffn_deep=1, d_ffn_wide=1)
    backbone.validate()
    kw = dict(multiple=args.multiple, build_multiple=args.build_multiple, match=args.match, seq_len=args.seq_len)
    if args.table:
        rows = solve_grid(backbone, args.budget, PAPER_GRID, **kw)
        if args.json:
            _print_json([{k: v for k, v in r.items() if k != "config"} for r in rows])
        else:
            print(f"Iso-FLOP grid at F_M = {args.budget:.4g} ({args.match} FLOPs, T={args.seq_len}), "
                  f"d={args.d_model}, L={args.n_layers}")
            print(table_markdown(rows))
        return 0
    r = solve(backbone, args.budget, args.arch, K=args.K, alpha=args.alpha, **kw)
    r = {k: v for k, v in r.items() if k != "config"}
    if args.json:
        _print_json(r)
    else:
        print(table_markdown([r]))
    return 0


def cmd_info(args) -> int:
    from .config import RunConfig, load_config

    cfg = load_config(RunConfig, args.config, args.overrides)
    m = cfg.model
    model = m.meta_model()
    T = m.seq_len
    info = {
        "arch": m.arch, "seq_len": T, "params": model.param_counts(),
        "flops_paper_per_layer": [layer.flops_per_token(T, "paper") for layer in model.layers],
        "flops_paper_total": model.flops_per_token(T, "paper"),
        "flops_true_forward_per_token": model.flops_per_token(T, "true"),
        "flops_true_train_per_token": model.train_flops_per_token(T),
        "hidden_deep": model.layers[0].deep.block.ffn.hidden if hasattr(model.layers[0], "deep") else None,
        "hidden_wide": model.layers[0].wide.block.ffn.hidden if hasattr(model.layers[0], "wide") else None,
    }
    if args.json:
        _print_json(info)
        return 0
    p = info["params"]
    print(f"arch={m.arch}  d_model={m.d_model}  n_layers={m.n_layers}  heads={m.n_heads}/{m.n_kv_heads}  "
          f"K={m.K}  seq_len={T}")
    print(f"hidden widths: deep={info['hidden_deep']}  wide={info['hidden_wide']}")
    print("params: " + "  ".join(f"{k}={v:,}" for k, v in p.items() if v))
    print(f"paper FLOPs per layer: {info['flops_paper_per_layer'][0]:,.0f}")
    print(f"true forward FLOPs per token: {info['flops_true_forward_per_token']:,.0f}  "
          f"(training: {info['flops_true_train_per_token']:,.0f})")
    return 0


def cmd_train(args) -> int:
    from .config import RunConfig, load_config
    from .train import train

    overrides = list(args.overrides)
    for flag, key in (("steps", "train.steps"), ("tokens", "train.tokens"), ("target_flops", "train.target_flops"),
                      ("resume", "train.resume"), ("out", "train.out_dir")):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={value}")
    if any(getattr(args, f) is not None for f in ("steps", "tokens", "target_flops")):
        # a horizon flag replaces whichever horizon the YAML set
        overrides = [f"train.{k}=0" for k in ("steps", "tokens", "target_flops")] + overrides
    cfg = load_config(RunConfig, args.config, overrides)
    result = train(cfg)
    keys = ("step", "tokens", "flops", "loss", "val_loss", "val_bpb", "out_dir")
    print(" ".join(f"{k}={result[k]:.4g}" if isinstance(result.get(k), float) else f"{k}={result.get(k)}"
                   for k in keys if k in result))
    return 0


# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="dualpath", description="Dual-Path and Duo-LLM language models: solve, train, evaluate, analyse.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    s = sub.add_parser("solve", help="solve FFN widths for a per-layer FLOP budget (iso-FLOP matching)")
    s.add_argument("--d-model", type=int, default=768)
    s.add_argument("--n-layers", type=int, default=16)
    s.add_argument("--n-heads", type=int, default=12)
    s.add_argument("--n-kv-heads", type=int, default=None)
    s.add_argument("--vocab-size", type=int, default=50304)
    s.add_argument("--tie-embeddings", action="store_true")
    s.add_argument("--budget", type=float, default=80e6, help="per-layer budget F_M (default 80e6)")
    s.add_argument("--arch", choices=["wide", "loop", "dual"], default="dual")
    s.add_argument("--K", type=int, default=2)
    s.add_argument("--alpha", type=float, default=0.5, help="deep share of the budget (dual)")
    s.add_argument("--multiple", type=int, default=64, help="solver rounding of d_ffn")
    s.add_argument("--build-multiple", type=int, default=256, help="multiple of the built SwiGLU hidden width")
    s.add_argument("--match", choices=["paper", "true"], default="paper")
    s.add_argument("--seq-len", type=int, default=4096)
    s.add_argument("--table", action="store_true", help="print the paper's whole grid")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_solve)

    s = sub.add_parser("info", help="parameters and FLOPs per token of a config")
    s.add_argument("config")
    s.add_argument("overrides", nargs="*", help="key=value overrides, e.g. model.K=3")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("train", help="train a model (torchrun: python -m dualpath.train ...)")
    s.add_argument("config")
    s.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=1e-3 model.K=3")
    s.add_argument("--steps", type=int)
    s.add_argument("--tokens", type=int)
    s.add_argument("--target-flops", type=float, help="true training FLOPs (3x forward) to spend")
    s.add_argument("--resume", help="auto, or a checkpoint/run folder")
    s.add_argument("--out", help="run folder (train.out_dir)")
    s.set_defaults(func=cmd_train)

    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return args.func(args) or 0
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    except DualPathError as e:
        return _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    except KeyboardInterrupt:
        return _fail("interrupted")


if __name__ == "__main__":
    sys.exit(main())
