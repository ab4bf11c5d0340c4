"""The output folder: CSV and JSON tables, matplotlib figures (Agg, no pyplot state) and report.html,
a self-contained page (inline CSS, JS and JSON; figures as data: URIs; no external URL)."""

from __future__ import annotations

import base64
import csv
import html
import json
import math
from pathlib import Path

import numpy as np

from ..fileio import atomic_open, atomic_save_figure, atomic_write_text

HTML_MAX_TOKENS = 4000  # tokens shown in report.html (the arrays and tables cover all of them)
HTML_KEYS = ("rho_deep", "gate_deep", "gate_wide", "cos_deep_wide", "expected_steps", "delta_norm_deep",
             "delta_norm_wide")
LABELS = {"rho_deep": "ρ_d (deep share)", "gate_deep": "g_d", "gate_wide": "g_w", "cos_deep_wide": "cos(Δ_d, Δ_w)",
          "expected_steps": "expected steps", "delta_norm_deep": "‖Δ_d‖", "delta_norm_wide": "‖Δ_w‖",
          "loss": "loss (nats)"}


# ----------------------------------------------------------------------------------------------
# Tables


def jsonable(obj):
    """NaN and inf become None; NumPy scalars and arrays become Python values."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: Path, obj) -> Path:
    atomic_write_text(path, json.dumps(jsonable(obj), indent=2, allow_nan=False) + "\n")
    return path


def write_csv(path: Path, rows: list[dict], columns: list[str] | None = None) -> Path:
    if columns is None:
        columns = []
        for r in rows:
            columns += [k for k in r if k not in columns and not isinstance(r[k], (list, dict))]
    with atomic_open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for r in rows:
            out = []
            for c in columns:
                v = r.get(c, "")
                if isinstance(v, (float, np.floating)):
                    v = "" if not math.isfinite(float(v)) else f"{float(v):.6g}"
                out.append(v)
            w.writerow(out)
    return path


def tag_table_rows(dataset: str, table: dict) -> list[dict]:
    """Flatten a tag x layer table into CSV rows: dataset, tag, count, layer_0 .. layer_{L-1}."""
    rows = []
    for r in table["rows"]:
        row = {"dataset": dataset, "tag": r["tag"], "count": r["count"]}
        row.update({f"layer_{i}": v for i, v in enumerate(r["values"])})
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------
# Figures (matplotlib's object API: no pyplot, no global backend change)


def _figure(w=7.0, h=4.0):
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), dpi=110, layout="constrained")


def _layer_axis(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer")


def plot_tag_layer(path: Path, table: dict, title: str) -> Path | None:
    rows = table["rows"]
    if not rows:
        return None
    m = np.array([r["values"] for r in rows], dtype=np.float64)
    L = m.shape[1]
    fig = _figure(max(4.0, 1.2 + 0.55 * L), max(2.5, 0.9 + 0.32 * len(rows)))
    ax = fig.subplots()
    finite = m[np.isfinite(m)]
    d = max(0.05, float(np.abs(finite - 0.5).max())) if finite.size else 0.5
    im = ax.imshow(m, cmap="coolwarm", vmin=0.5 - d, vmax=0.5 + d, aspect="auto")
    ax.set_xticks(range(L), [str(i) for i in range(L)])
    ax.set_yticks(range(len(rows)), [f"{r['tag']} ({r['count']})" for r in rows])
    ax.set_xlabel("layer")
    ax.set_title(title)
    if m.size <= 400:
        for (i, j), v in np.ndenumerate(m):
            if math.isfinite(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=ax, label="mean ρ_d (red = deep)")
    atomic_save_figure(fig, path)
    return path


def plot_layers(path: Path, per_dataset: dict[str, list[dict]]) -> Path | None:
    panels = [("gates and deep share", ("gate_deep", "gate_wide", "rho_deep")),
              ("cos(Δ_d, Δ_w)", ("cos_deep_wide",)), ("expected loop steps", ("expected_steps",)),
              ("update norms", ("delta_norm_deep", "delta_norm_wide"))]
    first = next(iter(per_dataset.values()), [])
    panels = [p for p in panels if first and any(k in first[0] for k in p[1])]
    if not panels:
        return None
    fig = _figure(4.0 * len(panels), 3.4)
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    styles = ["-", "--", ":", "-."]
    for ax, (title, keys) in zip(axes, panels):
        for si, (name, rows) in enumerate(per_dataset.items()):
            x = [r["layer"] for r in rows]
            for k in keys:
                if rows and k in rows[0]:
                    ax.plot(x, [r[k] for r in rows], styles[si % 4], marker="o", ms=3,
                            label=f"{LABELS[k]}" + (f" [{name}]" if len(per_dataset) > 1 else ""))
        ax.set_title(title)
        _layer_axis(ax)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    atomic_save_figure(fig, path)
    return path


def plot_collapse(path: Path, rows: list[dict], title: str) -> Path | None:
    if not rows:
        return None
    x = [r["layer"] for r in rows]
    fig = _figure(11, 3.4)
    a1, a2, a3 = fig.subplots(1, 3)
    for k, lab in (("gate_entropy_deep", "entropy g_d"), ("gate_entropy_wide", "entropy g_w")):
        a1.plot(x, [r[k] for r in rows], marker="o", ms=3, label=lab)
    a1.set_title("gate entropy (bits)")
    a1.set_ylim(-0.02, 1.02)
    for k, lab in (("deep_gate_high", "g_d high"), ("deep_gate_low", "g_d low"), ("wide_gate_high", "g_w high"),
                   ("wide_gate_low", "g_w low"), ("any_gate_saturated", "any saturated")):
        a2.plot(x, [r[k] for r in rows], marker="o", ms=3, label=lab)
    a2.set_title("saturated gates (share of tokens)")
    a2.set_ylim(-0.02, 1.02)
    for k, lab in (("polarisation", "polarisation"), ("deep_dominant", "deep-dominated"),
                   ("wide_dominant", "wide-dominated"), ("path_dominated", "either")):
        if k in rows[0]:
            a3.plot(x, [r[k] for r in rows], marker="o", ms=3, label=lab)
    a3.set_title("polarisation and path dominance")
    a3.set_ylim(-0.02, 1.02)
    for ax in (a1, a2, a3):
        _layer_axis(ax)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    atomic_save_figure(fig, path)
    return path


def plot_anchor(path: Path, rows: list[dict], name_a: str, name_b: str, anchor: str | None) -> Path | None:
    if not rows:
        return None
    x = np.array([r["layer"] for r in rows])
    diff = np.array([r["diff"] for r in rows], dtype=np.float64)
    se = np.array([r["se"] for r in rows], dtype=np.float64)
    fig = _figure(8, 3.4)
    a1, a2 = fig.subplots(1, 2)
    a1.plot(x, [r["mean_a"] for r in rows], marker="o", ms=3, label=name_a)
    a1.plot(x, [r["mean_b"] for r in rows], marker="o", ms=3, label=name_b)
    a1.set_title("mean ρ_d in the window")
    a1.legend(fontsize=7)
    a2.bar(x, np.nan_to_num(diff), yerr=np.nan_to_num(se), color=np.where(diff >= 0, "#c0392b", "#2e86de"))
    a2.axhline(0, color="k", lw=0.8)
    a2.set_title(f"ρ_d[{name_a}] − ρ_d[{name_b}]")
    for ax in (a1, a2):
        _layer_axis(ax)
        ax.grid(alpha=0.3)
    where = f"after '{anchor}'" if anchor else "all tokens"
    fig.suptitle(f"Task comparison ({where}); bars: ±1 s.e.")
    atomic_save_figure(fig, path)
    return path


# ----------------------------------------------------------------------------------------------
# report.html

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px;margin:0 0 6px}h2{font-size:17px;margin:26px 0 8px;border-bottom:1px solid #ddd}
#controls{position:sticky;top:0;background:#fff;padding:8px 0;border-bottom:1px solid #eee;z-index:2}
#controls select{margin:0 14px 0 4px}
#text{white-space:pre-wrap;font:13px/1.7 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;
  border:1px solid #ddd;padding:12px;border-radius:4px;word-break:break-word}
.t{border-radius:2px;cursor:default}.t:hover{outline:1px solid #000}
#tip{position:fixed;display:none;background:#222;color:#fff;padding:6px 8px;border-radius:4px;
  font:12px/1.4 ui-monospace,monospace;pointer-events:none;z-index:5;white-space:pre}
.scroll{overflow-x:auto;max-width:100%;margin:6px 0}
table{border-collapse:collapse;font-size:11px;font-variant-numeric:tabular-nums}
td,th{border:1px solid #ddd;padding:1px 4px;text-align:right;white-space:nowrap}
th{background:#f5f5f5;white-space:normal;overflow-wrap:anywhere;vertical-align:bottom;min-width:3.5em}
td:first-child,th:first-child{text-align:left;position:sticky;left:0;background:#fff}th:first-child{background:#f5f5f5}
img{max-width:100%;display:block;margin:8px 0}.muted{color:#777}
#legend span{display:inline-block;width:60px;height:10px;vertical-align:middle;margin:0 4px}
"""

_JS = r"""
(function(){
const D = JSON.parse(document.getElementById('dp-data').textContent);
const spans = Array.from(document.querySelectorAll('#text .t'));
const layerSel = document.getElementById('layer'), metricSel = document.getElementById('metric');
const tip = document.getElementById('tip'), legend = document.getElementById('legend');
for (let l = 0; l < D.n_layers; l++) { const o = document.createElement('option'); o.value = l; o.textContent = l; layerSel.appendChild(o); }
for (const m of D.metrics) { const o = document.createElement('option'); o.value = m; o.textContent = D.labels[m]; metricSel.appendChild(o); }
if (D.n_layers === 0) layerSel.disabled = true;
function value(m, l, i) { if (m === 'loss') return D.loss[i]; const a = D.values[m]; return a ? a[l][i] : null; }
function mix(a, b, t) { return a.map((x, k) => Math.round(x + (b[k] - x) * t)); }
const WHITE = [255,255,255], BLUE = [46,134,222], RED = [214,48,49], PURPLE = [108,52,131], ORANGE = [230,126,34];
function colour(m, v) {
  if (v === null || v === undefined || !isFinite(v)) return '#e6e6e6';
  const [lo, hi] = D.ranges[m]; let t = hi > lo ? (v - lo) / (hi - lo) : 0.5; t = Math.max(0, Math.min(1, t));
  let c;
  if (D.diverging.includes(m)) c = t < 0.5 ? mix(BLUE, WHITE, t * 2) : mix(WHITE, RED, (t - 0.5) * 2);
  else c = mix(WHITE, m === 'loss' ? ORANGE : PURPLE, t);
  return 'rgb(' + c.join(',') + ')';
}
function paint() {
  const l = +layerSel.value || 0, m = metricSel.value;
  for (const s of spans) s.style.background = colour(m, value(m, l, +s.dataset.i));
  const [lo, hi] = D.ranges[m];
  const a = D.diverging.includes(m) ? [colour(m, lo), colour(m, (lo + hi) / 2), colour(m, hi)] : [colour(m, lo), colour(m, hi)];
  legend.innerHTML = '';
  legend.append(document.createTextNode(D.labels[m] + ': ' + lo.toFixed(2)));
  const bar = document.createElement('span'); bar.style.background = 'linear-gradient(to right,' + a.join(',') + ')';
  legend.append(bar, document.createTextNode(hi.toFixed(2) + (m === 'rho_deep' ? '  (blue = wide, red = deep)' : '')));
}
function fmt(v) { return (v === null || v === undefined || !isFinite(v)) ? '—' : (+v).toFixed(4); }
document.getElementById('text').addEventListener('mouseover', e => {
  const s = e.target.closest('.t'); if (!s) return;
  const i = +s.dataset.i, l = +layerSel.value || 0;
  const lines = ['token #' + i + '  id ' + D.ids[i] + '  tag ' + D.tags[i], 'text  ' + JSON.stringify(D.tokens[i]), 'layer ' + l];
  for (const m of D.metrics) if (m !== 'loss') lines.push(D.labels[m].padEnd(18) + fmt(value(m, l, i)));
  lines.push(D.labels.loss.padEnd(18) + fmt(D.loss[i]));
  tip.textContent = lines.join('\n'); tip.style.display = 'block';
});
document.getElementById('text').addEventListener('mousemove', e => {
  tip.style.left = Math.min(e.clientX + 14, window.innerWidth - tip.offsetWidth - 8) + 'px';
  tip.style.top = (e.clientY + 14) + 'px';
});
document.getElementById('text').addEventListener('mouseout', e => { if (e.target.closest('.t')) tip.style.display = 'none'; });
layerSel.addEventListener('change', paint); metricSel.addEventListener('change', paint);
paint();
})();
"""


def _script_json(obj) -> str:
    """JSON safe inside <script>: no '<', '>' or '&' characters at all."""
    s = json.dumps(jsonable(obj), separators=(",", ":"), allow_nan=False)
    return s.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def _round(a: np.ndarray) -> list:
    a = np.asarray(a, dtype=np.float64)
    return [None if not math.isfinite(v) else round(v, 4) for v in a.reshape(-1).tolist()]


def _fmt(v) -> str:
    if isinstance(v, (float, np.floating)):
        return "—" if not math.isfinite(float(v)) else f"{float(v):.4g}"
    return html.escape(str(v))


def html_table(rows: list[dict], columns: list[str] | None = None) -> str:
    if not rows:
        return '<p class="muted">(none)</p>'
    if columns is None:
        columns = []
        for r in rows:
            columns += [k for k in r if k not in columns and not isinstance(r[k], (list, dict))]
    # underscores as break points: long column names wrap instead of widening the table
    head = "".join(f"<th>{html.escape(c).replace('_', '_<wbr>')}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(r.get(c, ''))}</td>" for c in columns) + "</tr>" for r in rows)
    # a wide table scrolls inside its own box, so the page keeps its width and every column stays reachable
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def token_spans(text: str, start, end, n: int) -> str:
    """The text of the first `n` tokens as HTML: one `<span class="t" data-i=...>` per token, in order, with
    the text between tokens as plain escaped text. Characters shared by several tokens (a multi-byte
    character split by byte-level BPE) are shown once, in the first of them."""
    out, cursor = [], 0
    for i in range(n):
        s, e = int(start[i]), int(end[i])
        if s > cursor:
            out.append(html.escape(text[cursor:s]))
            cursor = s
        piece = text[max(s, cursor):e]
        cursor = max(cursor, e)
        out.append(f'<span class="t" data-i="{i}">{html.escape(piece)}</span>')
    return "".join(out)


def render_html(*, title: str, text: str, cap: dict, tags, start, end, summary_lines: list[str],
                sections: list[tuple[str, str]], images: list[Path] = (), max_tokens: int = HTML_MAX_TOKENS,
                steps_range: tuple[float, float] | None = None) -> str:
    """report.html: the text with every token coloured by a chosen value (ρ_d by default) at a chosen layer,
    values on hover; then the tables (`sections`: (heading, HTML)) and the figures."""
    N = int(len(cap["ids"]))
    n = min(N, int(max_tokens))
    start, end = np.asarray(start), np.asarray(end)
    tags = np.asarray(tags).astype(str)
    L = 0
    values = {}
    for k in HTML_KEYS:
        if k in cap:
            values[k] = [_round(cap[k][layer, :n]) for layer in range(cap[k].shape[0])]
            L = cap[k].shape[0]
    metrics = [*values.keys(), "loss"]
    loss = _round(cap["loss"][:n])
    fin = np.asarray([v for v in loss if v is not None], dtype=np.float64)
    ranges = {"rho_deep": [0, 1], "gate_deep": [0, 1], "gate_wide": [0, 1], "cos_deep_wide": [-1, 1],
              "loss": [0.0, float(np.percentile(fin, 99)) if fin.size else 1.0]}
    for k in ("expected_steps", "delta_norm_deep", "delta_norm_wide"):
        if k in cap:
            v = np.asarray(cap[k][:, :n], np.float64)
            v = v[np.isfinite(v)]
            ranges[k] = [float(v.min()), float(v.max())] if v.size else [0.0, 1.0]
    if steps_range and "expected_steps" in values:
        ranges["expected_steps"] = list(steps_range)
    data = {"n_layers": L, "metrics": metrics, "labels": {m: LABELS[m] for m in metrics}, "ranges": ranges,
            "diverging": ["rho_deep", "gate_deep", "gate_wide", "cos_deep_wide"], "values": values, "loss": loss,
            "tags": tags[:n].tolist(), "ids": np.asarray(cap["ids"][:n]).tolist(),
            "tokens": [text[int(s):int(e)] for s, e in zip(start[:n], end[:n])]}
    more = f'<p class="muted">Showing the first {n} of {N} tokens; arrays.npz holds all of them.</p>' if n < N else ""
    figs = "".join(f'<h3>{html.escape(p.stem)}</h3><img alt="{html.escape(p.stem)}" src="data:image/png;base64,'
                   f'{base64.b64encode(p.read_bytes()).decode()}">' for p in images if p and Path(p).is_file())
    secs = "".join(f"<h2>{html.escape(h)}</h2>{body}" for h, body in sections)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>{html.escape(title)}</title><style>{_CSS}</style></head>
<body>
<h1>{html.escape(title)}</h1>
{"".join(f"<div>{html.escape(s)}</div>" for s in summary_lines)}
<h2>Tokens</h2>
<div id="controls">Layer<select id="layer"></select>Colour by<select id="metric"></select>
<span id="legend"></span></div>
{more}
<div id="text">{token_spans(text, start, end, n)}</div>
<div id="tip"></div>
{secs}
<h2>Figures</h2>{figs or '<p class="muted">(none)</p>'}
<script type="application/json" id="dp-data">{_script_json(data)}</script>
<script>{_JS}</script>
</body></html>
"""
