"""`analyze`: capture, tag, aggregate, override and report, for `dualpath analyze` (docs/ANALYSIS.md)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..errors import DataError, warn
from ..fileio import atomic_open, atomic_write_text
from .aggregate import (ANCHOR_AFTER, DOMINANCE, GATE_HIGH, GATE_LOW, MIN_TAG_COUNT, anchor_compare, anchor_window,
                        collapse_diagnostics, layer_means, nanmean, tag_layer_table)
from .capture import capture_ids
from .corpus import Corpus, corpus_from_path, load_corpus
from .overrides import STATS, token_class_override
from .report import (HTML_MAX_TOKENS, html_table, plot_anchor, plot_collapse, plot_layers, plot_tag_layer,
                     render_html, tag_table_rows, write_csv, write_json)
from .tags import get_tagger, tag_corpus

OVERRIDE_COLUMNS = ["dataset", "class", "to", "tokens", "class_tokens", "loss", "loss_class", "loss_forced",
                    *STATS, *[f"random_{s}_mean" for s in STATS], *[f"random_{s}_std" for s in STATS],
                    *[f"p_{s}" for s in STATS], "repeats", "seed"]
# report.html: each statistic next to its random control and p-value (the CSV keeps OVERRIDE_COLUMNS)
OVERRIDE_HTML_COLUMNS = ["dataset", "class", "to", "class_tokens", "loss",
                         *[c for s in STATS for c in (s, f"random_{s}_mean", f"random_{s}_std", f"p_{s}")], "repeats"]


def _arrays(corpus: Corpus, cap: dict, tags: np.ndarray) -> dict[str, np.ndarray]:
    text, doc_start = corpus.joined()
    flat = corpus.flat()
    out = {k: v for k, v in cap.items()}
    out.update({"start": flat["start"], "end": flat["end"], "doc": flat["doc"], "special": flat["special"],
                "tags": np.asarray(tags).astype(str), "text": np.array(text), "doc_start": doc_start})
    return out


def analyze(checkpoint, *, text=None, data=None, jsonl=None, field: str | None = None, out_dir,
            pos_model: str | None = None, anchor: str | None = None, anchor_after: int = ANCHOR_AFTER,
            compare=None, compare_field: str | None = None, override_tags=("ARITH",), override_to=("wide", "deep"),
            repeats: int = 20, seed: int = 0, max_tokens: int | None = None, chunk_len: int | None = None,
            batch_size: int = 8, device: str = "cpu", min_tag_count: int = MIN_TAG_COUNT,
            html_max_tokens: int = HTML_MAX_TOKENS, log=None) -> dict:
    """Routing analysis of a checkpoint on one dataset (text, data or jsonl), optionally compared with a
    second one (`compare`: a .jsonl, a text file or a prepared folder), writing everything into `out_dir`.

    Returns the summary (also written as summary.json), with "files" listing what was written.
    """
    from ..checkpoint import load_model
    from ..eval.evaluate import check_tokenizer, load_tokenizer

    t0 = time.perf_counter()
    say = log or (lambda m: None)
    if repeats < 0:
        raise DataError(f"--repeats must be >= 0, got {repeats}")
    if max_tokens is not None and max_tokens < 1:
        raise DataError(f"--max-tokens must be >= 1, got {max_tokens}")
    if anchor is not None and not anchor:
        raise DataError("--anchor must not be empty")
    if anchor is not None and compare is None:
        raise DataError("--anchor compares two datasets: also give --compare FILE")
    for to in override_to:
        if to not in ("wide", "deep"):
            raise DataError(f"override direction must be 'wide' or 'deep', got {to!r}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} exists and is not a folder")

    model, cfg, ckpt = load_model(checkpoint, device)
    tokenizer = load_tokenizer(ckpt)
    check_tokenizer(tokenizer, model)
    if chunk_len is not None and not 1 <= chunk_len <= model.cfg.seq_len:
        raise DataError(f"--chunk-len {chunk_len} is outside 1..{model.cfg.seq_len} (the model's context)")
    arch = model.cfg.arch

    corpora = [load_corpus(text=text, data=data, jsonl=jsonl, field=field, tokenizer=tokenizer, max_tokens=max_tokens)]
    if compare is not None:
        comp = corpus_from_path(compare, tokenizer, field=compare_field, max_tokens=max_tokens)
        if comp.name == corpora[0].name:
            comp.name += "-compare"
        corpora.append(comp)
    for c in corpora:
        if not c.offsets_ok:
            warn(f"{c.name}: the tokenizer's offsets do not reproduce the text exactly; tags may be misaligned")
    windows = {}
    if compare is not None:
        for c in corpora:
            if anchor is None:
                idx = np.arange(c.n_tokens)
                windows[c.name] = (idx, c.n_docs)
                continue
            idx, _, n_docs = anchor_window(c.texts, c.offsets, anchor, anchor_after)
            if n_docs == 0:
                raise DataError(f"anchor {anchor!r} occurs in no document of {c.name} (or nothing follows it)")
            windows[c.name] = (idx, n_docs)

    tagger = get_tagger(pos_model)
    say(f"tagger: {tagger.kind} ({tagger.name})")
    tags, caps = {}, {}
    for c in corpora:
        tags[c.name] = tag_corpus(c, tagger)
        say(f"capturing {c.name}: {c.n_docs} documents, {c.n_tokens} tokens")
        caps[c.name] = capture_ids(model, c.ids, bos=c.bos, chunk_len=chunk_len, batch_size=batch_size)

    out.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    main = corpora[0].name
    L = len(model.layers)

    # -- tables ----------------------------------------------------------------------------------
    layers = {c.name: layer_means(caps[c.name]) for c in corpora}
    collapse = {c.name: collapse_diagnostics(caps[c.name]) for c in corpora}
    rho_tables = {c.name: tag_layer_table(caps[c.name], tags[c.name], "rho_deep", min_tag_count) for c in corpora}
    step_tables = {c.name: tag_layer_table(caps[c.name], tags[c.name], "expected_steps", min_tag_count)
                   for c in corpora}
    layer_rows = [{"dataset": n, **r} for n, rows in layers.items() for r in rows]
    files += [write_csv(out / "layers.csv", layer_rows), write_json(out / "layers.json", layers)]
    if arch == "dual":
        files += [write_csv(out / "tag_layer_rho.csv",
                            [r for n, t in rho_tables.items() for r in tag_table_rows(n, t)],
                            ["dataset", "tag", "count", *[f"layer_{i}" for i in range(L)]]),
                  write_json(out / "tag_layer_rho.json", rho_tables)]
        files += [write_csv(out / "collapse.csv", [{"dataset": n, **r} for n, rows in collapse.items() for r in rows]),
                  write_json(out / "collapse.json", {"thresholds": {"gate_high": GATE_HIGH, "gate_low": GATE_LOW,
                                                                    "dominance": DOMINANCE}, "datasets": collapse})]
    if arch in ("loop", "dual"):
        files += [write_csv(out / "tag_layer_steps.csv",
                            [r for n, t in step_tables.items() for r in tag_table_rows(n, t)],
                            ["dataset", "tag", "count", *[f"layer_{i}" for i in range(L)]]),
                  write_json(out / "tag_layer_steps.json", step_tables)]

    anchor_res = None
    if compare is not None:
        a, b = corpora[0].name, corpora[1].name
        rows = anchor_compare(caps[a], windows[a][0], caps[b], windows[b][0], "rho_deep")
        anchor_res = {"anchor": anchor, "after": anchor_after if anchor is not None else None, "a": a, "b": b,
                      "docs_a": windows[a][1], "docs_b": windows[b][1], "key": "rho_deep", "rows": rows}
        if rows:
            files += [write_csv(out / "anchor.csv", [{"a": a, "b": b, **r} for r in rows]),
                      write_json(out / "anchor.json", anchor_res)]
        else:
            anchor_res["note"] = f"rho_deep is defined for dual models only (this one is {arch})"

    # -- overrides ---------------------------------------------------------------------------------
    override_rows: list[dict] = []
    override_note = None
    if override_tags and override_to:
        if arch != "dual":
            override_note = f"token-class overrides need a dual model (this one is {arch}); skipped"
        else:
            for c in corpora:
                for cls in override_tags:
                    for to in override_to:
                        say(f"override {cls} -> {to} on {c.name} ({repeats} random repeats)")
                        r = token_class_override(model, c.ids, tags[c.name], cls=cls, to=to, repeats=repeats, seed=seed,
                                                 bos=c.bos, special=np.concatenate(c.special), chunk_len=chunk_len,
                                                 batch_size=batch_size, base_loss=caps[c.name]["loss"])
                        override_rows.append({"dataset": c.name, **r})
            files += [write_csv(out / "overrides.csv", override_rows, OVERRIDE_COLUMNS),
                      write_json(out / "overrides.json", override_rows)]

    # -- arrays ----------------------------------------------------------------------------------
    with atomic_open(out / "arrays.npz", "wb") as f:
        np.savez_compressed(f, **_arrays(corpora[0], caps[main], tags[main]))
    files.append(out / "arrays.npz")
    if len(corpora) > 1:
        c = corpora[1]
        with atomic_open(out / "arrays_compare.npz", "wb") as f:
            np.savez_compressed(f, **_arrays(c, caps[c.name], tags[c.name]))
        files.append(out / "arrays_compare.npz")

    # -- figures ---------------------------------------------------------------------------------
    images: list[Path] = []
    try:
        import matplotlib  # noqa: F401

        have_mpl = True
    except ImportError:
        have_mpl = False
        warn("matplotlib is not installed; no figures (pip install 'dualpath[analysis]')")
    if have_mpl:
        for p in (plot_tag_layer(out / "tag_layer_rho.png", rho_tables[main], f"mean ρ_d per tag and layer ({main})")
                  if arch == "dual" else None,
                  plot_layers(out / "layer_gates.png", layers),
                  plot_collapse(out / "collapse.png", collapse[main], f"gate collapse diagnostics ({main})"),
                  plot_anchor(out / "anchor_diff.png", anchor_res["rows"], anchor_res["a"], anchor_res["b"], anchor)
                  if anchor_res and anchor_res["rows"] else None):
            if p is not None:
                images.append(p)
                files.append(p)

    # -- summary and report ------------------------------------------------------------------------
    datasets = {}
    for c in corpora:
        t = tags[c.name]
        uniq, cnt = np.unique(t, return_counts=True)
        datasets[c.name] = {"source": c.source, "documents": c.n_docs, "tokens": c.n_tokens,
                            "loss": nanmean(caps[c.name]["loss"]), "offsets_ok": c.offsets_ok, "notes": c.notes,
                            "tag_counts": {k: int(v) for k, v in sorted(zip(uniq.tolist(), cnt.tolist()),
                                                                         key=lambda kv: -kv[1])}}
    summary = {
        "checkpoint": str(ckpt), "arch": arch, "n_layers": L, "seq_len": model.cfg.seq_len,
        "chunk_len": chunk_len or model.cfg.seq_len,
        "tagger": {"kind": tagger.kind, "name": tagger.name},
        "thresholds": {"gate_high": GATE_HIGH, "gate_low": GATE_LOW, "dominance": DOMINANCE,
                       "min_tag_count": min_tag_count},
        "datasets": datasets, "layers": layers, "collapse": collapse if arch == "dual" else None,
        "tag_layer_rho": rho_tables if arch == "dual" else None,
        "tag_layer_steps": step_tables if arch in ("loop", "dual") else None,
        "anchor": anchor_res,
        "overrides": [{k: v for k, v in r.items() if k != "random"} for r in override_rows],
        "overrides_note": override_note, "seconds": None,
    }
    c0 = corpora[0]
    text_joined, _ = c0.joined()
    flat = c0.flat()
    lines = [f"checkpoint: {ckpt}", f"architecture: {arch}, {L} layers, context {model.cfg.seq_len}",
             f"tagger: {tagger.kind} ({tagger.name})"]
    lines += [f"dataset {n}: {d['documents']} documents, {d['tokens']} tokens, mean loss {d['loss']:.4f} nats"
              for n, d in datasets.items()]
    sections = [("Per-layer means", html_table(layer_rows))]
    if arch == "dual":
        sections.append((f"Mean ρ_d per tag and layer (tags with ≥ {min_tag_count} tokens)",
                         html_table([r for n, t in rho_tables.items() for r in tag_table_rows(n, t)])))
        sections.append((f"Gate collapse (high > {GATE_HIGH}, low < {GATE_LOW}, dominated: ρ_d > {DOMINANCE} "
                         f"or < {1 - DOMINANCE:.2g})",
                         html_table([{"dataset": n, **r} for n, rows in collapse.items() for r in rows])))
    if anchor_res and anchor_res["rows"]:
        where = f"after the first '{anchor}', {anchor_after or 'all'} tokens" if anchor else "all tokens"
        sections.append((f"Task comparison: ρ_d[{anchor_res['a']}] − ρ_d[{anchor_res['b']}] ({where})",
                         html_table(anchor_res["rows"])))
    if override_rows:
        sections.append(("Token-class overrides (loss change, nats; p: permutation test against random tokens)",
                         html_table(override_rows, OVERRIDE_HTML_COLUMNS)))
    elif override_note:
        sections.append(("Token-class overrides", f'<p class="muted">{override_note}</p>'))
    steps_range = (1.0, float(model.cfg.K)) if arch in ("loop", "dual") else None
    page = render_html(title=f"dualpath routing analysis: {c0.name}", text=text_joined, cap=caps[main],
                       tags=tags[main], start=flat["start"], end=flat["end"], summary_lines=lines,
                       sections=sections, images=images, max_tokens=html_max_tokens, steps_range=steps_range)
    atomic_write_text(out / "report.html", page)
    files.append(out / "report.html")
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    summary["files"] = [p.name for p in files] + ["summary.json"]
    write_json(out / "summary.json", summary)
    return summary
