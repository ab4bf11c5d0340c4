"""The `dualpath` command: a thin layer over library functions.

Bad input (config, data, checkpoint, argument) ends with one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
from pathlib import Path

from . import __version__
from .errors import ConfigError, DualPathError


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in --help, except unset ones (None, off switches, empty lists) and help texts
    that already state theirs."""

    def _format_action(self, action):
        if action.help is None and action.option_strings and self._shows_default(action):
            action = copy.copy(action)  # argparse shows nothing for an option without a help text
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    @staticmethod
    def _shows_default(action) -> bool:
        d = action.default  # (0 is a default to show; None, an off switch and an empty list are not)
        return d is not argparse.SUPPRESS and d is not None and d is not False and d != []

    def _get_help_string(self, action):
        if not self._shows_default(action) or "default" in (action.help or ""):
            return action.help
        return (action.help + " " if action.help else "") + "(default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

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
                           n_kv_heads=args.n_heads if args.n_kv_heads is None else args.n_kv_heads, vocab_size=args.vocab_size,
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
            print(_rounding_note(args))
        return 0
    r = solve(backbone, args.budget, args.arch, K=args.K, alpha=args.alpha, **kw)
    r = {k: v for k, v in r.items() if k != "config"}
    if args.json:
        _print_json(r)
    else:
        print(table_markdown([r]))
        print(_rounding_note(args))
    return 0


def _rounding_note(args) -> str:
    return (f"d_ffn solved in multiples of {args.multiple} (--multiple); the built SwiGLU hidden widths are "
            f"multiples of {args.build_multiple} (--build-multiple)")


def _config_path(path: str) -> Path:
    """A config file as given, or the config.yaml of a run folder or checkpoint folder."""
    p = Path(path)
    if p.is_dir():
        if (p / "config.yaml").is_file():
            return p / "config.yaml"
        from .checkpoint import resolve

        return resolve(p) / "config.yaml"
    return p


def cmd_info(args) -> int:
    from .config import RunConfig, load_config

    cfg = load_config(RunConfig, _config_path(args.config), args.overrides)
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
    loops = f"K={m.K}  " if m.arch in ("loop", "dual") else ""  # a wide model has no deep path to loop
    print(f"arch={m.arch}  d_model={m.d_model}  n_layers={m.n_layers}  heads={m.n_heads}/{m.n_kv_heads}  "
          f"{loops}seq_len={T}")
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
    result = train(cfg, overwrite=args.overwrite, allow_safe_changes=args.allow_safe_changes)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    keys = ("step", "tokens", "flops", "loss", "val_loss", "val_bpb", "out_dir")
    print(" ".join(f"{k}={result[k]:.4g}" if isinstance(result.get(k), float) else f"{k}={result.get(k)}"
                   for k in keys if k in result))
    return 0


def cmd_prepare(args) -> int:
    from .config import apply_overrides
    from .data.prepare import prepare
    from .data.sources import decode_escapes
    from .data.synthetic import SyntheticConfig

    synthetic = apply_overrides(SyntheticConfig(), [f"{kv}" for kv in args.synthetic]).validate()
    meta = prepare(args.sources, args.out, vocab_size=args.vocab_size, tokenizer=args.tokenizer,
                   val_fraction=args.val_fraction, max_tokens=args.max_tokens, shard_tokens=args.shard_tokens,
                   field=args.field, template=decode_escapes(args.template) if args.template else None, split=args.split, doc_split=args.doc_split,
                   mix_until=args.mix_until, synthetic=synthetic,
                   synthetic_eval_per_category=args.synthetic_eval, seed=args.seed,
                   overwrite=args.overwrite, progress=not args.quiet)
    print(f"wrote {args.out}: {meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens, "
          f"vocab {meta['vocab_size']}")
    return 0


def _load_for_inference(path: str):
    from .checkpoint import load_model
    from .eval.evaluate import check_tokenizer, load_tokenizer

    model, cfg, ckpt = load_model(path)
    tokenizer = load_tokenizer(ckpt)
    check_tokenizer(tokenizer, model)
    return model, tokenizer, ckpt


def _adaptive(text: str):
    from .model import AdaptivePolicy

    try:
        return AdaptivePolicy.parse(text)
    except DualPathError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _float_list(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got '{text}'") from None


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]  # an empty entry ("1,,2") is an error too
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'")
    return values


def _at_least(low: int):
    """argparse type: an integer >= low (argparse then names the flag in its one-line error)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got '{text}'") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    parse.__name__ = "integer"
    return parse


def _number(low: float | None = None, high: float | None = None, low_open: bool = False):
    """argparse type: a finite number in [low, high] ((low, high] when low_open)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got '{text}'") from None
        if not math.isfinite(value) or (low is not None and (value <= low if low_open else value < low)) \
                or (high is not None and value > high):
            lo = "any" if low is None else f"{'(' if low_open else '['}{low:g}"
            hi = "" if high is None else f", {high:g}]"
            raise argparse.ArgumentTypeError(f"must be a finite number in {lo}{hi or ', ...)'}, got {text}")
        return value
    parse.__name__ = "number"
    return parse


def _text(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty")
    return text


def _str_list(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated values, got '{text}'")
    return values


def _stop_string(text: str) -> str:
    from .data.sources import decode_escapes

    if not text:  # whitespace is a stop string (\n); nothing is not
        raise argparse.ArgumentTypeError("is empty")
    return decode_escapes(text)


def check_checkpoint_options(args) -> None:
    """The one check of a subcommand's options against the architecture of its checkpoint (read from the
    checkpoint's config, before any weights or data are loaded): forced K, gate modes, window length."""
    from .checkpoint import load_config, resolve
    from .model import check_overrides

    cfg = load_config(resolve(args.checkpoint)).model
    gates = getattr(args, "gates", None)  # eval: a list of variants; generate: the one setting
    if isinstance(gates, str) and "," in gates:
        raise ConfigError(f"--gates takes one mode here (eval takes a comma-separated list), got '{gates}'")
    check_overrides(cfg, K=getattr(args, "K", None), gates=gates, K_flag="--K", gates_flag="--gates")
    for flag in ("seq_len", "chunk_len"):
        value = getattr(args, flag, None)
        if value is not None and not 1 <= value <= cfg.seq_len:
            raise ConfigError(f"--{flag.replace('_', '-')} {value} is outside 1..{cfg.seq_len} (the model's context)")


def cmd_eval(args) -> int:
    from .eval.evaluate import evaluate_datasets, results_markdown
    from .fileio import atomic_write_text, check_output_file

    if args.out:  # before the evaluation, not after it
        check_output_file(args.out, "--out")
    model, tokenizer, ckpt = _load_for_inference(args.checkpoint)
    if args.adaptive_sweep:
        return _adaptive_sweep(args, model, tokenizer)
    res = evaluate_datasets(model, tokenizer, args.data, K=args.K, gates=args.gates,
                            extra_steps_gain=args.extra_steps_gain, batch_size=args.batch_size, limit=args.limit,
                            adaptive=args.adaptive, exact_match=not args.no_exact_match,
                            log=None if args.json else (lambda m: print(m, file=sys.stderr)))
    res["checkpoint"] = str(ckpt)
    if args.out:
        atomic_write_text(args.out, json.dumps(res, indent=2))
    if args.json:
        _print_json(res)
    else:
        print(results_markdown(res))
    return 0


def _adaptive_sweep(args, model, tokenizer) -> int:
    from .eval.adaptive import DEFAULT_DEEP, DEFAULT_EXIT, adaptive_sweep, policy_grid, sweep_markdown, write_sweep
    from .eval.evaluate import check_tokenizer

    check_tokenizer(tokenizer, model)
    if len(args.data) != 1:
        raise DualPathError("--adaptive-sweep evaluates one dataset (--data PATH)")
    if Path(args.adaptive_sweep).exists() and not Path(args.adaptive_sweep).is_dir():
        raise DualPathError(f"--adaptive-sweep {args.adaptive_sweep} is a file, not a folder")
    grid = policy_grid(model.cfg.arch, DEFAULT_EXIT if args.sweep_exit is None else args.sweep_exit,
                       DEFAULT_DEEP if args.sweep_deep is None else args.sweep_deep, args.sweep_wide or (),
                       args.sweep_delta or ())
    rows = adaptive_sweep(model, tokenizer, args.data[0], grid + list(args.adaptive or []),
                          batch_size=args.batch_size, limit=args.limit, extra_steps_gain=args.extra_steps_gain,
                          log=None if args.json else (lambda m: print(m, file=sys.stderr)))
    files = write_sweep(rows, args.adaptive_sweep, title=f"{args.checkpoint} on {args.data[0]}")
    if args.json:
        _print_json({"rows": rows, "files": files})
    else:
        print(sweep_markdown(rows))
        print("wrote " + ", ".join(files.values()))
    return 0


def cmd_generate(args) -> int:
    from .generate import generate, prompt_ids
    from .model import Overrides

    model, tokenizer, _ = _load_for_inference(args.checkpoint)
    prompt_ids(tokenizer, args.prompt, model.cfg.seq_len)  # too long: an error before anything is printed
    if args.adaptive is not None:
        args.adaptive.check(model.cfg)
    ov = (Overrides(K=args.K, gates=args.gates, adaptive=args.adaptive)
          if (args.K is not None or args.gates or args.adaptive is not None) else None)
    notes: list[str] = []  # printed after the text's final newline, not inside it
    print(args.prompt, end="", flush=True)
    generate(model, tokenizer, args.prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
             top_p=args.top_p, seed=args.seed, use_cache=not args.no_cache, overrides=ov, stop=args.stop,
             stream=lambda piece: print(piece, end="", flush=True), log=notes.append)
    print()
    for note in notes:
        print(note, file=sys.stderr)
    return 0


def cmd_sweep(args) -> int:
    from .experiments import launch
    from .experiments.sweep import check_run_folders, dry_run, emit_configs, load_sweep, plan, run_sweep, train_and_eval
    from .experiments.sweep_report import aggregate

    if args.run_one:  # one run of a sweep, in the child process the sweep started
        train_and_eval(args.config, args.eval, args.eval_limit)
        return 0
    slurm = launch.SlurmOptions(partition=args.slurm_partition, gpus_per_node=args.slurm_gpus_per_node,
                                nodes=args.slurm_nodes, time=args.slurm_time, account=args.slurm_account,
                                extra=args.slurm_extra).validate()
    sweep = load_sweep(args.config, args.overrides)
    if args.emit_configs:
        for path in emit_configs(sweep, args.emit_configs, source=args.config):
            print(path)
        return 0
    if args.dry_run:
        print(dry_run(sweep, plan(sweep), device_kind=args.device_kind,
                      processes=slurm.processes if args.launcher == "slurm" else 1))
        return 0
    if args.status:
        print(launch.status_table(plan(sweep)))
        return 0
    if args.aggregate_only:
        runs = plan(sweep)
        check_run_folders(runs)
        aggregate(sweep, runs)
    elif args.launcher == "slurm":
        launch.submit_slurm(sweep, slurm, threads=args.threads)
        if not args.wait:
            print(f"follow with: dualpath sweep {args.config} --status")
            return 0
        runs = plan(sweep)
        launch.wait(runs, poll_s=5)
        aggregate(sweep, runs)
    else:
        run_sweep(sweep, jobs=args.jobs, threads=args.threads)
    results = Path(sweep.out_dir) / "results.md"
    if results.is_file():
        print(results.read_text())
    return 0


def cmd_analyze(args) -> int:
    from .analysis.command import run

    return run(args)


def cmd_export(args) -> int:
    from .hf import export_hf

    out = export_hf(args.checkpoint, args.hf, overwrite=args.overwrite, adaptive=args.adaptive)
    print(f"exported to {out}  (AutoModelForCausalLM.from_pretrained('{out}', trust_remote_code=True))")
    return 0


def cmd_lm_eval(args) -> int:
    from .eval.lm_eval import main as lm_eval_main

    return lm_eval_main(args.rest)


def _duo_log(args):
    return None if args.json else (lambda m: print(m, file=sys.stderr))


def _duo_common(args) -> dict:
    return dict(max_sequences=args.max_sequences, batch_size=args.batch_size, seq_len=args.seq_len,
                device=args.device, log=_duo_log(args))


def cmd_duo_oracle(args) -> int:
    from .routing import run_oracle

    res = run_oracle(args.checkpoint, args.data, args.budgets, args.out, with_skip=args.with_skip,
                     max_patterns=args.max_patterns, beam=args.beam, **_duo_common(args))
    _print_json(res) if args.json else print(Path(args.out, "oracle.md").read_text())
    return 0


def cmd_duo_gates(args) -> int:
    from .routing import run_gate_search

    res = run_gate_search(args.checkpoint, args.data, args.out, max_patterns=args.max_patterns, beam=args.beam,
                          **_duo_common(args))
    _print_json(res) if args.json else print(json.dumps(res, indent=1, default=str)[:4000])
    return 0


def cmd_duo_train_router(args) -> int:
    from .routing import run_train_router

    common = _duo_common(args)
    common["eval_sequences"] = common.pop("max_sequences")
    res = run_train_router(args.checkpoint, args.data, args.budget, args.out, kind=args.kind, choices=args.choices,
                           router_input=args.input, hidden=args.hidden, steps=args.steps, lr=args.lr,
                           budget_weight=args.budget_weight, tau_end=args.tau_end,
                           label_sequences=args.label_sequences, labels_file=args.labels,
                           max_patterns=args.max_patterns, beam=args.beam,
                           seed=args.seed, **common)
    if args.json:
        _print_json(res)
    else:
        print(f"router {res['router']}: big fraction {res['achieved_big_fraction']:.3f} (target {res['target']:.3f}), "
              f"skip {res['skip_fraction']:.3f}, loss {res['loss']:.4f} -> {res['checkpoint']}")
    return 0


def cmd_duo_report(args) -> int:
    from .routing import run_report

    run_report(args.checkpoint, args.data, args.budgets, args.out, random_trials=args.random_trials,
               routers=args.router or [], router_steps=args.router_steps, with_skip=args.with_skip,
               max_patterns=args.max_patterns, beam=args.beam, help_threshold=args.help_threshold, seed=args.seed,
               select_sequences=args.select_sequences, variable_budget=not args.no_variable_budget,
               n_boot=args.bootstrap, **_duo_common(args))
    print(Path(args.out, "summary.md").read_text())
    return 0


def cmd_duo_findings(args) -> int:
    from .routing.findings import run_findings

    run_findings(args.reports, args.out, skip_dirs=args.skip_report or ())
    print(Path(args.out, "findings.md").read_text())
    return 0


def cmd_mechanism(args) -> int:
    from .experiments.mechanism import gate_study, routing_study, world_seed_check

    if not args.skip_routing:
        routing_study(args.out, seeds=args.seeds, tokens=args.tokens, quick=args.quick)
    if not args.skip_gate_study:
        gate_study(args.out, tokens=args.tokens, quick=args.quick)
    if args.world_seed:
        world_seed_check(args.out, world_seed=args.world_seed, tokens=args.tokens, quick=args.quick)
    return 0


def cmd_demo(args) -> int:
    from .experiments.demo import run_demo

    run_demo(args.out, quick=args.quick, tokens=args.tokens)
    return 0


# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="dualpath", description="Dual-Path and Duo-LLM language models: solve, train, evaluate, analyse.")
    p.add_argument("--version", action="version", version=f"dualpath {__version__}")
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

    s = sub.add_parser("train", help="train a model (distributed: torchrun --nproc_per_node N -m dualpath train ...)")
    s.add_argument("config")
    s.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=1e-3 model.K=3")
    s.add_argument("--steps", type=_at_least(1))
    s.add_argument("--tokens", type=_at_least(1))
    s.add_argument("--target-flops", type=_number(0, None, low_open=True),
                   help="true training FLOPs (3x forward) to spend")
    s.add_argument("--resume", help="auto, or a checkpoint/run folder")
    s.add_argument("--out", help="run folder (train.out_dir)")
    s.add_argument("--overwrite", action="store_true",
                   help="replace the run in the folder (removed only after every check passed)")
    s.add_argument("--allow-safe-changes", action="store_true",
                   help="resume although the horizon or the log/eval/save cadence changed (docs/CHECKPOINTS.md)")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("prepare", help="tokenize text sources into train/val shards (see docs/DATA.md)")
    s.add_argument("sources", nargs="+", help="files, globs, folders, x.jsonl, datasets:DIR, hf:NAME, synthetic; "
                   "each optionally @WEIGHT")
    s.add_argument("--out", required=True)
    s.add_argument("--vocab-size", type=int, default=8192)
    s.add_argument("--tokenizer", help="an existing tokenizer.json instead of training one")
    s.add_argument("--val-fraction", type=float, default=0.01)
    s.add_argument("--max-tokens", type=int)
    s.add_argument("--shard-tokens", type=int, default=2 ** 24)
    s.add_argument("--field", help="JSONL/dataset field holding the text")
    s.add_argument("--template", help='JSONL/dataset template, e.g. "{question}\\n{answer}"')
    s.add_argument("--split", default="train", help="split of datasets:/hf: sources")
    s.add_argument("--doc-split", choices=["chunk", "blank", "heading", "line", "file"])
    s.add_argument("--mix-until", choices=["first", "all"], default="first",
                   help="stop when the first finite source runs out (weights hold), or use every source fully")
    s.add_argument("--synthetic", action="append", default=[], metavar="KEY=VALUE",
                   help="a synthetic corpus knob, e.g. --synthetic n_entities=500 (see docs/SYNTHETIC.md)")
    s.add_argument("--synthetic-eval", type=int, default=200, help="held-out synthetic examples per category")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--overwrite", action="store_true")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_prepare)

    s = sub.add_parser("eval", help="loss, perplexity, BPB, answer accuracy and the paper's ablations")
    s.add_argument("checkpoint")
    s.add_argument("--data", nargs="+", required=True, help="prepared folders, .txt files or Q/A .jsonl files")
    s.add_argument("--K", type=_int_list, action="extend", help="loop steps at inference, one row each: "
                   "comma-separated or repeated, e.g. 1,2,3,5,8,10 (loop and dual models)")
    s.add_argument("--gates", type=_str_list, action="extend", help="gate modes, one row each: comma-separated "
                   "or repeated; rescaling the residual: deep-only, wide-only, both=C; holding g_d+g_w per token: "
                   "deep-favoured, wide-favoured, swapped, share-shuffled, share-shuffled-seq; the paper's "
                   "shuffle: shuffled (dual models)")
    s.add_argument("--extra-steps-gain", choices=("last", "own"), default="last",
                   help="forced K above the trained K: extra steps reuse the last trained step's gain (default) "
                        "or their own, untrained gains")
    s.add_argument("--batch-size", type=_at_least(1), default=8)
    s.add_argument("--limit", type=_at_least(1), help="at most this many windows of a prepared folder, examples (per category) "
                   "of a Q/A or synthetic set, or windows of a text file")
    s.add_argument("--no-exact-match", action="store_true", help="skip greedy answer decoding")
    s.add_argument("--adaptive", type=_adaptive, action="append", metavar="POLICY",
                   help="adaptive depth (repeatable): exit=ε (leave the loop once the remaining halting mass < ε), "
                        "deep=τ_d / wide=τ_w (skip a path when its gate < τ), delta=δ (leave once the state "
                        "changes by < δ); e.g. exit=0.1,deep=0.05 (docs/ADAPTIVE.md)")
    s.add_argument("--adaptive-sweep", metavar="OUT_DIR", help="BPB vs realised FLOPs and tokens/s over a threshold "
                   "grid and the fixed-K curve: OUT_DIR/adaptive_sweep.csv and .png")
    s.add_argument("--sweep-exit", type=_float_list, help="the sweep's ε values (default 0.5,0.3,0.2,0.1,0.05,0.02)")
    s.add_argument("--sweep-deep", type=_float_list, help="the sweep's τ_d values (default 0.1,0.2)")
    s.add_argument("--sweep-wide", type=_float_list, help="the sweep's τ_w values (default none)")
    s.add_argument("--sweep-delta", type=_float_list, help="the sweep's δ values (default none)")
    s.add_argument("--out", help="also write the JSON here")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("generate", help="sample text with a KV cache")
    s.add_argument("checkpoint")
    s.add_argument("--prompt", required=True, type=_text)
    s.add_argument("--max-new-tokens", type=_at_least(1), default=64)
    s.add_argument("--temperature", type=_number(0), default=0.8, help="0: greedy (default: %(default)s; the "
                   "library's dualpath.generate.generate() is greedy unless given a temperature)")
    s.add_argument("--top-k", type=_at_least(1))
    s.add_argument("--top-p", type=_number(0, 1, low_open=True))
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--K", type=int, help="loop steps at inference (loop and dual models)")
    s.add_argument("--gates", help="one gate mode, as eval's --gates: deep-only, wide-only, both=C (C in [0, 1]), "
                   "shuffled, ... (dual models)")
    s.add_argument("--stop", type=_stop_string, action="append", default=[], metavar="STR",
                   help="end at this string, which is not printed (repeatable; \\n and \\t are decoded)")
    s.add_argument("--adaptive", type=_adaptive, metavar="POLICY", help="adaptive depth, e.g. exit=0.1,deep=0.05 "
                   "(loop and dual models; docs/ADAPTIVE.md)")
    s.add_argument("--no-cache", action="store_true", help="recompute the whole sequence every step")
    s.set_defaults(func=cmd_generate)

    d = sub.add_parser("duo", help="Duo-LLM: routing oracles, trained routers, comparison report (docs/DUO.md)")
    dsub = d.add_subparsers(dest="duo_command", required=True, parser_class=_Parser)

    def duo_parser(name, help, func, budgets=True):
        s = dsub.add_parser(name, help=help)
        s.add_argument("checkpoint")
        s.add_argument("--data", required=True, help="prepared folder (val split) or text file")
        s.add_argument("--out", required=True)
        s.add_argument("--max-sequences", type=_at_least(1), default=64)
        s.add_argument("--batch-size", type=_at_least(1), default=8)
        s.add_argument("--seq-len", type=_at_least(1))
        s.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
        s.add_argument("--json", action="store_true")
        if budgets:
            s.add_argument("--budgets", type=_int_list, required=True, help="numbers of big layers, e.g. 1,2,4")
            s.add_argument("--with-skip", action="store_true", help="non-big layers may also be skipped")
        s.set_defaults(func=func)
        return s

    s = duo_parser("oracle", "best routings under a budget of big layers (prefix-shared search)", cmd_duo_oracle)
    s.add_argument("--max-patterns", type=_at_least(1), default=4096, help="enumerate up to this many, else beam search")
    s.add_argument("--beam", type=_at_least(1), default=16)
    s = duo_parser("gates", "the same search over a Dual-Path model's per-layer gate choices", cmd_duo_gates,
                   budgets=False)
    s.add_argument("--max-patterns", type=_at_least(1), default=4096)
    s.add_argument("--beam", type=_at_least(1), default=16)
    s = duo_parser("train-router", "train per-layer routers on a frozen model to a big-layer budget",
                   cmd_duo_train_router, budgets=False)
    s.add_argument("--budget", type=float, required=True, help="target fraction of big layers, 0..1")
    s.add_argument("--kind", choices=["budget", "oracle"], default="budget",
                   help="budget: LM loss + budget penalty; oracle: supervised on the per-token oracle's choices")
    s.add_argument("--input", choices=["pre", "post"], default="pre", help="router reads the layer input (pre) "
                   "or the state after attention (post)")
    s.add_argument("--choices", choices=["bs", "bsx"], default="bs", help="big|small, or big|small|skip")
    s.add_argument("--hidden", type=int, default=0, help="0: a linear router; N: an MLP with N hidden units")
    s.add_argument("--label-sequences", type=int, default=64, help="--kind oracle: training windows labelled")
    s.add_argument("--labels", help="--kind oracle: a file of oracle labels, read if it holds this setting's, "
                   "else written for the next router")
    s.add_argument("--max-patterns", type=_at_least(1), default=4096, help="--kind oracle: the label search")
    s.add_argument("--beam", type=_at_least(1), default=16)
    s.add_argument("--steps", type=int, default=500)
    s.add_argument("--lr", type=float, default=3e-3)
    s.add_argument("--budget-weight", type=float, default=100.0)
    s.add_argument("--tau-end", type=float, default=0.05)
    s.add_argument("--seed", type=int, default=0)
    s = duo_parser("report", "all-big, all-small, random, best-of-N, router and oracles in one table", cmd_duo_report)
    s.add_argument("--random-trials", type=int, default=100)
    s.add_argument("--router", action="append", help="router checkpoint (repeatable)")
    s.add_argument("--router-steps", type=_at_least(0), default=0, help="train quick routers for budgets without one")
    s.add_argument("--max-patterns", type=_at_least(1), default=4096)
    s.add_argument("--beam", type=_at_least(1), default=16)
    s.add_argument("--help-threshold", type=_number(low=0.0), default=0.05)
    s.add_argument("--select-sequences", type=int, default=64,
                   help="training windows on which fixed patterns are chosen (0: on the scored windows)")
    s.add_argument("--no-variable-budget", action="store_true",
                   help="skip the variable-budget oracle (it searches every budget 0..L)")
    s.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamplings for the 95%% intervals")
    s.add_argument("--seed", type=int, default=0)
    s = dsub.add_parser("findings", help="the paper's findings over the reports of several seeds (docs/DUO.md)")
    s.add_argument("reports", nargs="+", help="`duo report` output folders, one per seed")
    s.add_argument("--skip-report", action="append", help="the same seeds' --with-skip reports (repeatable)")
    s.add_argument("--out", required=True, help="output folder: findings.md, findings.json")
    s.set_defaults(func=cmd_duo_findings)

    s = sub.add_parser("sweep", help="iso-FLOP grid: budgets x architectures x K x alpha x seeds")
    s.add_argument("config")
    s.add_argument("overrides", nargs="*", help="key=value overrides of the sweep file, e.g. seeds=[0]")
    s.add_argument("--jobs", type=int, default=1, help="local: runs at a time")
    s.add_argument("--threads", type=int, default=0, help="CPU threads per run (0: local, the cores over --jobs; "
                   "slurm, the job's CPUs)")
    s.add_argument("--dry-run", action="store_true", help="print the grid, params, FLOPs and estimated time")
    s.add_argument("--device-kind", help="--dry-run's device: cpu or a GPU (H100, H200, A100, L40S, A10, 4090); "
                   "by default base.train.device's, an H100 for cuda on a machine without one")
    s.add_argument("--aggregate-only", action="store_true", help="only rebuild results.csv/.md and plots")
    s.add_argument("--emit-configs", metavar="DIR", help="write one training config per grid point")
    s.add_argument("--status", action="store_true", help="each run's state: pending, running (step, ETA), done, "
                   "failed (last error line)")
    s.add_argument("--launcher", choices=("local", "slurm"), default="local",
                   help="local: a process pool on this machine; slurm: one job per run, as a job array "
                   "(docs/CLUSTER.md)")
    s.add_argument("--wait", action="store_true", help="slurm: wait for the jobs, then aggregate")
    s.add_argument("--slurm-partition", help="sbatch --partition")
    s.add_argument("--slurm-gpus-per-node", type=int, default=0, help="GPUs per node; more than one GPU or node "
                   "runs torchrun inside the job")
    s.add_argument("--slurm-nodes", type=int, default=1, help="nodes per run")
    s.add_argument("--slurm-time", default="24:00:00", help="time limit per job: minutes or [D-]HH:MM[:SS]")
    s.add_argument("--slurm-account", help="sbatch --account")
    s.add_argument("--slurm-extra", action="append", default=[], metavar="KEY=VALUE",
                   help="any other sbatch option, e.g. --slurm-extra qos=high --slurm-extra constraint=h100")
    # internal: the child process of one run (CONFIG is then the run's run.yaml)
    s.add_argument("--run-one", action="store_true", help=argparse.SUPPRESS)
    s.add_argument("--eval", action="append", default=[], help=argparse.SUPPRESS)
    s.add_argument("--eval-limit", type=int, default=0, help=argparse.SUPPRESS)
    s.set_defaults(func=cmd_sweep)

    s = sub.add_parser("export", help="export a checkpoint (--hf: a Hugging Face transformers folder)")
    s.add_argument("checkpoint")
    s.add_argument("--hf", metavar="OUT_DIR", required=True, help="write a transformers model folder")
    s.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    s.add_argument("--adaptive", type=_adaptive, metavar="POLICY", help="an adaptive-depth policy the exported "
                   "config runs by default, e.g. exit=0.1,deep=0.05 (docs/ADAPTIVE.md)")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("lm-eval", help="lm-evaluation-harness with the native `dualpath` model type registered "
                       "(arguments, --help included, pass through to lm_eval)", add_help=False)
    s.add_argument("rest", nargs=argparse.REMAINDER)
    s.set_defaults(func=cmd_lm_eval)

    from .analysis.command import add_arguments as add_analyze_arguments

    s = sub.add_parser("analyze", help="routing analysis: gates, deep share, POS tags, token-class overrides, "
                       "HTML report")
    add_analyze_arguments(s)
    s.set_defaults(func=cmd_analyze)

    s = sub.add_parser("demo", help="PureWide vs Dual at matched FLOPs on the synthetic corpus (make demo)")
    s.add_argument("--out", default="runs/demo")
    s.add_argument("--quick", action="store_true", help="a much shorter run")
    s.add_argument("--tokens", type=_at_least(1), default=None,
                   help="training tokens per model (default: experiments/demo.py TOKENS; --quick: QUICK_TOKENS)")
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("mechanism", help="the mechanism study of docs/MECHANISM.md: gate study, routing by "
                       "category over seeds (resumable)")
    s.add_argument("out", help="output folder (runs, tables, JSON)")
    s.add_argument("--seeds", type=_int_list, default=[0, 1, 2], help="comma-separated (default: 0,1,2)")
    s.add_argument("--tokens", type=int, default=None, help="training tokens per run (default: the demo's)")
    s.add_argument("--skip-gate-study", action="store_true")
    s.add_argument("--skip-routing", action="store_true")
    s.add_argument("--world-seed", type=int, default=1,
                   help="also check the calibration on this synthetic world (0: skip; default: 1)")
    s.add_argument("--quick", action="store_true", help="a tiny corpus and few eval examples (tests)")
    s.set_defaults(func=cmd_mechanism)

    return p


# subcommands that write into a folder given as `out` (train, prepare, export and sweep check their own)
OUTPUT_FOLDER_COMMANDS = ("duo", "analyze", "demo", "mechanism")


def preflight(args) -> None:
    """What every subcommand checks before any work: its options against its checkpoint's architecture (one
    validator), and an output folder that is not a file and can be written."""
    from .fileio import check_writable_dir

    if getattr(args, "device", None) == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise DualPathError("--device cuda, but no CUDA device is available")
    if getattr(args, "checkpoint", None) and args.command != "lm-eval":
        check_checkpoint_options(args)
    if args.command in OUTPUT_FOLDER_COMMANDS:
        check_writable_dir(args.out, "--out" if args.command != "mechanism" else "OUT")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if args.command == "lm-eval":  # lm_eval's own flags, --help included, pass through as given
            argv = sys.argv[1:] if argv is None else list(argv)
            args.rest, extra = argv[argv.index("lm-eval") + 1:], []
        # key=value overrides may also follow the flags
        if extra and hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
            args.overrides = list(args.overrides) + extra
        elif extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        preflight(args)
        return args.func(args) or 0
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    except DualPathError as e:
        return _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    except KeyboardInterrupt:
        return _fail("interrupted")
    except BrokenPipeError:  # output piped into `head` and friends: stop quietly, as other CLIs do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
