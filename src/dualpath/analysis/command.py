"""`dualpath analyze`: argparse arguments and the command, for dualpath.cli to register.

    s = sub.add_parser("analyze", help="routing analysis: gates, deep share, POS tags, overrides, HTML report")
    add_arguments(s)
    s.set_defaults(func=run)
"""

from __future__ import annotations

import json
import sys

from .aggregate import ANCHOR_AFTER, MIN_TAG_COUNT
from .report import HTML_MAX_TOKENS


def _csv(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def add_arguments(s) -> None:
    s.add_argument("checkpoint", help="checkpoint, checkpoints or run folder")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="text file (blank lines separate documents)")
    src.add_argument("--data", help="prepared data folder (val split)")
    src.add_argument("--jsonl", help="JSONL file, one document per record")
    s.add_argument("--field", help="JSONL field(s) holding the text, e.g. text or question,answer")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--pos-model", help="spaCy model name or folder (default en_core_web_sm; 'rules': no spaCy)")
    s.add_argument("--compare", help="a second dataset (.jsonl, text file or prepared folder)")
    s.add_argument("--compare-field", help="JSONL field(s) of --compare")
    s.add_argument("--anchor", help="align the task comparison on the first occurrence of this string")
    s.add_argument("--anchor-after", type=int, default=ANCHOR_AFTER,
                   help=f"tokens in the window after the anchor (0: to the end; default {ANCHOR_AFTER})")
    s.add_argument("--override-tags", type=_csv, default=("ARITH",),
                   help="comma-separated tag classes to force onto one path (default ARITH; '' to skip)")
    s.add_argument("--override-to", type=_csv, default=("wide", "deep"), help="wide, deep or wide,deep (default)")
    s.add_argument("--repeats", type=int, default=20, help="random same-size control sets per override (default 20)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--max-tokens", type=int, help="tokens per dataset (default: all; --data: 32768)")
    s.add_argument("--chunk-len", type=int, help="window length (default: the model's context)")
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--device", default="cpu")
    s.add_argument("--min-tag-count", type=int, default=MIN_TAG_COUNT)
    s.add_argument("--html-max-tokens", type=int, default=HTML_MAX_TOKENS)
    s.add_argument("--json", action="store_true", help="print the summary as JSON")


def kwargs_from_args(args) -> dict:
    """The `analyze` keyword arguments of parsed `dualpath analyze` arguments."""
    return dict(text=args.text, data=args.data, jsonl=args.jsonl, field=args.field, out_dir=args.out,
                pos_model=args.pos_model, compare=args.compare, compare_field=args.compare_field, anchor=args.anchor,
                anchor_after=args.anchor_after, override_tags=args.override_tags, override_to=args.override_to,
                repeats=args.repeats, seed=args.seed, max_tokens=args.max_tokens, chunk_len=args.chunk_len,
                batch_size=args.batch_size, device=args.device, min_tag_count=args.min_tag_count,
                html_max_tokens=args.html_max_tokens)


def run(args) -> int:
    from .pipeline import analyze
    from .report import jsonable

    log = None if args.json else (lambda m: print(m, file=sys.stderr))
    summary = analyze(args.checkpoint, **kwargs_from_args(args), log=log)
    if args.json:
        print(json.dumps(jsonable(summary), indent=2))
        return 0
    for name, d in summary["datasets"].items():
        print(f"{name}: {d['documents']} documents, {d['tokens']} tokens, loss {d['loss']:.4f}")
    for name, rows in summary["layers"].items():
        if rows and "rho_deep" in rows[0]:
            print(f"mean rho_d per layer [{name}]: " + " ".join(f"{r['rho_deep']:.3f}" for r in rows))
    for r in summary["overrides"]:
        print(f"force {r['class']} {r['to']} on {r['dataset']} ({r['class_tokens']} tokens): "
              f"dloss {r['delta_all']:+.4f} all (p={r['p_delta_all']:.3g}), "
              f"{r['delta_class']:+.4f} on {r['class']} (p={r['p_delta_class']:.3g})")
    if summary.get("overrides_note"):
        print(summary["overrides_note"])
    print(f"wrote {args.out}: {', '.join(summary['files'])}")
    return 0
