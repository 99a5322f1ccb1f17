"""The sweep's results as a table and a picture: the Pareto frontier (size × perplexity), the CSV
and Markdown tables, and ``pareto.png`` (size on x, perplexity on a log y axis; QAT, round-to-
nearest and FP as separate markers; the frontier circled and drawn as a step line).

A row is a dict with at least ``method`` ("fp" | "rtn" | "qat"), ``bits``, ``group`` (``allocated``: a
mixed-precision row of ``paretoq sweep --budgets``, whose ``bits`` is its budget in bits/weight),
``bytes_total``, ``bytes_quantized_weights``, ``bytes_scales``, ``bytes_other``,
``bits_per_weight``, ``perplexity`` and optionally ``tasks`` ({task: {metric: value}}).
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from paretoq.eval.report import format_table

FIGSIZE, DPI = (8.0, 5.0), 100  # pareto.png is 800 × 500 pixels


def pareto_front(rows: list[dict]) -> list[int]:
    """Indices of the rows that no other row beats on both size and perplexity."""
    front = []
    for i, r in enumerate(rows):
        if not math.isfinite(r["perplexity"]):
            continue
        dominated = any(o["bytes_total"] <= r["bytes_total"] and o["perplexity"] <= r["perplexity"]
                        and (o["bytes_total"] < r["bytes_total"] or o["perplexity"] < r["perplexity"])
                        for j, o in enumerate(rows) if j != i and math.isfinite(o["perplexity"]))
        if not dominated:
            front.append(i)
    return front


def task_columns(rows: list[dict]) -> list[str]:
    cols = []
    for r in rows:
        for task, metrics in (r.get("tasks") or {}).items():
            for m in metrics:
                if m.endswith("_stderr") or m == "sample_len":
                    continue
                key = f"{task}/{m}"
                if key not in cols:
                    cols.append(key)
    return cols


CSV_COLUMNS = ["method", "name", "bits", "group", "allocated", "bytes_total", "bytes_quantized_weights", "bytes_scales",
               "bytes_other", "bits_per_weight", "bits_per_param", "perplexity", "eval_loss", "train_seconds",
               "pareto"]


def _task_value(row: dict, key: str):
    task, _, metric = key.partition("/")
    return (row.get("tasks") or {}).get(task, {}).get(metric)


def to_csv(rows: list[dict]) -> str:
    tasks = task_columns(rows)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS + tasks)
    for r in rows:
        values = [r.get(c) for c in CSV_COLUMNS] + [_task_value(r, k) for k in tasks]
        w.writerow(["" if v is None else repr(v) if isinstance(v, float) else v for v in values])
    return buf.getvalue()


def to_markdown(rows: list[dict], meta: dict) -> str:
    tasks = task_columns(rows)
    header = ["method", "bits", "group", "size (MB)", "q. weights", "scales", "other", "bits/weight",
              "perplexity", *tasks, "train (s)", "Pareto"]
    body = []
    for r in rows:
        body.append([r["method"].upper() if r["method"] != "rtn" else "RTN",
                     f"mix {r['bits']:g}" if r.get("allocated") else _bits_label(r["bits"]),
                     None if r["method"] == "fp" else "per layer" if r.get("allocated")
                     else r["group"] if r["group"] is not None else "row",
                     r["bytes_total"] / 1e6, r["bytes_quantized_weights"] / 1e6, r["bytes_scales"] / 1e6,
                     r["bytes_other"] / 1e6, r["bits_per_weight"], r["perplexity"],
                     *[_task_value(r, k) for k in tasks], r.get("train_seconds"), bool(r.get("pareto"))])
    s = meta["settings"]
    lines = [
        f"# paretoq sweep: {Path(s['input_model_filename']).name}", "",
        f"`{meta['command']}`", "",
        f"{meta['date']} · {meta['machine']} · torch {meta['torch']}", "",
        f"Budget per bit width: {s.get('max_steps')} steps × {meta['tokens_per_step']:,} tokens "
        f"(lr {s.get('learning_rate')}, {'bf16' if s.get('bf16') else 'fp32'}), from the same FP model. "
        f"Perplexity on `{Path(s['eval_data_local_path']).name}` in windows of {s['model_max_length']} tokens, "
        "computed in fp32 on the weights as stored (packed codes + fp16 scales + bf16 rest; FP = bf16 weights). "
        "Sizes are the tensor bytes of the packed folder (FP: bf16). bits/weight = (codes + scales) per "
        "quantized weight. RTN = round-to-nearest with the reference scale init, no training. "
        "\"mix B\" = per-layer bits chosen by paretoq allocate for a budget of B bits/weight (codes + fp16 "
        "scales, ternary as base-3), trained with the same flags.", "",
        format_table(header, body, markdown=True), "",
    ]
    return "\n".join(lines)


def _bits_label(bits) -> str:
    return "16" if bits == 16 else f"{bits:g}"


def plot_pareto(rows: list[dict], title: str) -> bytes:
    """pareto.png: size (MB) on x, perplexity (log) on y; QAT, RTN and FP markers; the frontier."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    ax = fig.add_subplot(1, 1, 1)
    uniform = [r for r in rows if not r.get("allocated")]
    groups = sorted({r["group"] for r in uniform if r["method"] != "fp"}, key=lambda g: (g is not None, g or 0))
    colors = ["tab:blue", "tab:green", "tab:purple", "tab:brown"]
    for gi, g in enumerate(groups):
        gname = "per-row" if g is None else f"group {g}"
        for method, marker, style in (("qat", "o", "-"), ("rtn", "x", ":")):
            pts = sorted((r["bytes_total"] / 1e6, r["perplexity"], r["bits"]) for r in uniform
                         if r["method"] == method and r["group"] == g and math.isfinite(r["perplexity"]))
            if not pts:
                continue
            color = colors[gi % len(colors)] if method == "qat" else "tab:gray"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, linestyle=style, color=color,
                    markersize=7, label=f"{method.upper() if method == 'qat' else 'RTN'} ({gname})")
            for x, y, b in pts:
                ax.annotate(f"{b:g}b", (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8, color=color)
    for method, marker, style, color in (("qat", "D", "-.", "tab:orange"), ("rtn", "P", ":", "tab:olive")):
        pts = sorted((r["bytes_total"] / 1e6, r["perplexity"], r["bits"]) for r in rows
                     if r.get("allocated") and r["method"] == method and math.isfinite(r["perplexity"]))
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, linestyle=style, color=color,
                    markersize=7, label=f"{'QAT' if method == 'qat' else 'RTN'} (allocated mix)")
            for x, y, b in pts:
                ax.annotate(f"{b:g}b mix", (x, y), textcoords="offset points", xytext=(6, -10), fontsize=8,
                            color=color)
    for r in rows:
        if r["method"] == "fp" and math.isfinite(r["perplexity"]):
            ax.plot([r["bytes_total"] / 1e6], [r["perplexity"]], marker="*", markersize=14, linestyle="none",
                    color="tab:red", label="FP (bf16)")
    front = sorted((rows[i]["bytes_total"] / 1e6, rows[i]["perplexity"]) for i in pareto_front(rows))
    if front:
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="black", linestyle="--",
                linewidth=1, alpha=0.6)
        ax.plot([p[0] for p in front], [p[1] for p in front], marker="o", markersize=13, linestyle="none",
                markerfacecolor="none", markeredgecolor="black", label="Pareto frontier")
    ax.set_yscale("log")
    from matplotlib.ticker import FuncFormatter, NullFormatter

    plain = FuncFormatter(lambda v, _pos: f"{v:,.0f}" if v >= 10 else f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    ppls = [r["perplexity"] for r in rows if math.isfinite(r["perplexity"]) and r["perplexity"] > 0]
    # label the minor ticks only when the data span less than a decade (else they collide)
    ax.yaxis.set_minor_formatter(plain if ppls and max(ppls) / min(ppls) < 10 else NullFormatter())
    ax.set_xlabel("model size (MB, packed tensors)")
    ax.set_ylabel("perplexity (log scale, lower is better)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()
