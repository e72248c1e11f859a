"""Results on disk in MTEB's layout, and a self-contained HTML / Markdown report with plots.

Layout of an output folder::

    OUT/results/<run>/<TaskName>.json   one per task, MTEB's TaskResult layout
    OUT/results/<run>/model_meta.json    model name, prompt style, dimension
    OUT/results/<run>/details.json       what the plots are drawn from (per-query nDCG, score samples)
    OUT/report.html                      plots embedded as base64 PNG: opens anywhere, offline
    OUT/report.md  + OUT/plots/*.png
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import re
from pathlib import Path
from typing import Sequence

from .tasks import TaskRun

HEADLINE = {"Retrieval": ["ndcg_at_10", "map_at_10", "mrr_at_10", "recall_at_100"],
            "STS": ["cosine_spearman", "cosine_pearson"],
            "Classification": ["accuracy", "f1", "full_train_accuracy", "full_train_f1"]}


def run_dirname(label: str) -> str:
    """A folder name for a run label: ``/`` -> ``__`` as MTEB names model folders, other odd runs -> ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label.replace("/", "__")).strip("_.") or "run"  # never hidden


def mteb_task_result(run: TaskRun, dataset_revision: str = "local") -> dict:
    """One task's result in MTEB's TaskResult layout (scores as fractions)."""
    try:
        from importlib.metadata import version

        mteb_version = version("mteb")
    except Exception:  # noqa: BLE001 - mteb is optional
        mteb_version = None
    return {
        "dataset_revision": dataset_revision, "task_name": run.task_name, "mteb_version": mteb_version,
        "scores": {run.split: [run.scores]}, "evaluation_time": run.evaluation_time, "kg_co2_emissions": None,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(),
    }


def write_results(out: Path, label: str, model_meta: dict, runs: Sequence[TaskRun]) -> Path:
    """Write one run's task results (MTEB layout), model metadata and plot data under OUT/results."""
    d = Path(out) / "results" / run_dirname(label)
    d.mkdir(parents=True, exist_ok=True)
    for r in runs:
        (d / f"{r.task_name}.json").write_text(json.dumps(mteb_task_result(r), indent=2), encoding="utf-8")
    (d / "model_meta.json").write_text(json.dumps({"label": label, **model_meta}, indent=2), encoding="utf-8")
    details = {r.task_name: {"task_type": r.task_type, "split": r.split, **{k: v for k, v in r.details.items()}}
               for r in runs}
    (d / "details.json").write_text(json.dumps(details), encoding="utf-8")
    return d


def load_results(run_dir: Path) -> tuple[str, dict, list[TaskRun]]:
    """A run written by :func:`write_results`: (label, model meta, task runs)."""
    run_dir = Path(run_dir)
    meta_f = run_dir / "model_meta.json"
    if not meta_f.exists():
        raise FileNotFoundError(f"{meta_f} is missing: {run_dir} is not an e5kit eval results folder")
    meta = json.loads(meta_f.read_text(encoding="utf-8"))
    details = json.loads((run_dir / "details.json").read_text(encoding="utf-8")) if (run_dir / "details.json").exists() else {}
    runs = []
    for f in sorted(run_dir.glob("*.json")):
        if f.name in ("model_meta.json", "details.json"):
            continue
        r = json.loads(f.read_text(encoding="utf-8"))
        split, entries = next(iter(r["scores"].items()))
        det = dict(details.get(r["task_name"], {}))
        runs.append(TaskRun(r["task_name"], det.pop("task_type", "Retrieval"), split, entries[0],
                            r.get("evaluation_time") or 0.0, det))
    return meta.get("label", run_dir.name), meta, runs


# ---- plots --------------------------------------------------------------------------------------


def _by_task(runs_by_label: dict[str, list[TaskRun]]) -> dict[str, dict[str, TaskRun]]:
    """{task: {run label: that run's result}}, tasks in first-seen order."""
    tasks: dict[str, dict[str, TaskRun]] = {}
    for label, runs in runs_by_label.items():
        for r in runs:
            tasks.setdefault(r.task_name, {})[label] = r
    return tasks


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def make_plots(runs_by_label: dict[str, list[TaskRun]]) -> list[tuple[str, str, bytes]]:
    """(file name, caption, PNG bytes) for every plot of the report."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    plots = []
    for task, by_label in _by_task(runs_by_label).items():
        ttype = next(iter(by_label.values())).task_type
        if ttype == "Retrieval" and any("per_query_ndcg_at_10" in r.details for r in by_label.values()):
            fig, ax = plt.subplots(figsize=(6.5, 3.6))
            bins = np.linspace(0, 1, 21)
            for label, r in by_label.items():
                vals = list(r.details.get("per_query_ndcg_at_10", {}).values())
                if vals:
                    ax.hist(vals, bins=bins, alpha=0.55, label=f"{label} (mean {np.mean(vals):.3f})")
            ax.set_xlabel("nDCG@10 of a query")
            ax.set_ylabel("queries")
            ax.set_title(f"{task}: per-query nDCG@10")
            ax.legend(fontsize=8)
            plots.append((f"{run_dirname(task)}_ndcg_hist.png", f"{task}: distribution of per-query nDCG@10", _png(fig)))
        if any(r.details.get("positive_scores") for r in by_label.values()):
            fig, axes = plt.subplots(1, len(by_label), figsize=(6.5 * len(by_label) ** 0.5 + 1, 3.6), squeeze=False)
            for ax, (label, r) in zip(axes[0], by_label.items()):
                d = r.details
                series = [("positive (relevant / gold >= 4)", d.get("positive_scores") or []),
                          ("negative (random / gold <= 1)", d.get("negative_scores") or []),
                          ("top-10 non-relevant", d.get("hard_negative_scores") or [])]
                allv = [v for _, s in series for v in s]
                bins = np.linspace(min(allv), max(allv), 40) if allv else 10
                for name, s in series:
                    if s:
                        ax.hist(s, bins=bins, alpha=0.5, density=True, label=f"{name} (n={len(s)})")
                ax.set_xlabel("cosine similarity")
                ax.set_title(label, fontsize=9)
                ax.legend(fontsize=7)
            fig.suptitle(f"{task}: positive vs negative cosine scores")
            plots.append((f"{run_dirname(task)}_scores.png", f"{task}: cosine scores of positive and negative pairs "
                          f"(E5 scores cluster in a narrow high band; ranking, not the absolute value, matters)",
                          _png(fig)))
    return plots


# ---- tables and documents ------------------------------------------------------------------------


def comparison_rows(runs_by_label: dict[str, list[TaskRun]]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: one row per (task, metric), one column per run; scores x 100."""
    labels = list(runs_by_label)
    rows = []
    for task, by_label in _by_task(runs_by_label).items():
        ttype = next(iter(by_label.values())).task_type
        for m in HEADLINE.get(ttype, ["main_score"]):
            if not any(m in r.scores for r in by_label.values()):
                continue
            cells = [f"{100 * by_label[lb].scores[m]:.2f}" if lb in by_label and m in by_label[lb].scores else "–"
                     for lb in labels]
            rows.append([task, m] + cells)
        for key, name, fmt in (("corpus_embedding_seconds", "corpus embedding (s)", "{:.1f}"),
                               ("seconds_per_query", "time per query (ms)", "{:.2f}")):
            if any(key in r.details for r in by_label.values()):
                scale = 1000 if "ms" in name else 1
                rows.append([task, name] + [fmt.format(by_label[lb].details[key] * scale)
                                            if lb in by_label and key in by_label[lb].details else "–"
                                            for lb in labels])
    return ["task", "metric"] + labels, rows


def markdown_report(runs_by_label: dict[str, list[TaskRun]], metas: dict[str, dict],
                    plots: list[tuple[str, str, bytes]], plot_dir: str = "plots") -> str:
    header, rows = comparison_rows(runs_by_label)
    out = ["# e5kit evaluation report", "",
           "Scores x 100. Retrieval: queries `query: `, documents `passage: title text`, exact search; "
           "STS: cosine Spearman, `query: ` both sides; classification: logistic regression on "
           "unnormalised embeddings (MTEB 8-shot x 10 experiments, and the full training set).", ""]
    for label, meta in metas.items():
        out.append(f"- **{label}**: model `{meta.get('model')}`, prompt style `{meta.get('prompt_style')}`, "
                   f"dim {meta.get('dim')}")
    out += ["", "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    out.append("")
    for name, caption, _ in plots:
        out += [f"![{caption}]({plot_dir}/{name})", "", f"*{caption}*", ""]
    return "\n".join(out)


def html_report(runs_by_label: dict[str, list[TaskRun]], metas: dict[str, dict],
                plots: list[tuple[str, str, bytes]]) -> str:
    header, rows = comparison_rows(runs_by_label)
    e = html.escape
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>e5kit evaluation report</title>",
             "<style>body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
             "td:first-child,td:nth-child(2),th{text-align:left}img{max-width:100%}</style></head><body>",
             "<h1>e5kit evaluation report</h1>",
             "<p>Scores x 100. Retrieval: queries <code>query: </code>, documents <code>passage: title text</code>, "
             "exact search; STS: cosine Spearman, <code>query: </code> both sides; classification: logistic "
             "regression on unnormalised embeddings (MTEB 8-shot x 10 experiments, and the full training set).</p><ul>"]
    for label, meta in metas.items():
        parts.append(f"<li><b>{e(label)}</b>: model <code>{e(str(meta.get('model')))}</code>, prompt style "
                     f"<code>{e(str(meta.get('prompt_style')))}</code>, dim {e(str(meta.get('dim')))}</li>")
    parts.append("</ul><table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>")
    for r in rows:
        parts.append("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>")
    parts.append("</table>")
    for _, caption, png in plots:
        b64 = base64.b64encode(png).decode("ascii")
        parts.append(f"<figure><img alt='{e(caption)}' src='data:image/png;base64,{b64}'>"
                     f"<figcaption>{e(caption)}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(out: Path, runs_by_label: dict[str, list[TaskRun]], metas: dict[str, dict]) -> tuple[Path, Path]:
    """Write OUT/report.html (self-contained) and OUT/report.md (+ OUT/plots/*.png)."""
    out = Path(out)
    plots = make_plots(runs_by_label)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    for name, _, png in plots:
        (out / "plots" / name).write_bytes(png)
    md, page = out / "report.md", out / "report.html"
    md.write_text(markdown_report(runs_by_label, metas, plots), encoding="utf-8")
    page.write_text(html_report(runs_by_label, metas, plots), encoding="utf-8")
    return page, md
