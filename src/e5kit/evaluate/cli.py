"""``e5kit eval``: BEIR retrieval, STS and classification scores with a report."""

from __future__ import annotations

from pathlib import Path

import click

from ..cli import load_model, model_options, require_extras


@click.command("eval")
@click.option("--beir", "beir_dirs", multiple=True, type=click.Path(exists=True, file_okay=False),
              help="BEIR folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv). Repeatable.")
@click.option("--sts", "sts_paths", multiple=True, type=click.Path(exists=True),
              help="STS Benchmark folder or tab-separated file. Repeatable.")
@click.option("--classification", "clf_dirs", multiple=True, type=click.Path(exists=True, file_okay=False),
              help="Folder with train.csv and test.csv (text,category). Repeatable.")
@click.option("--split", default="test", show_default=True, help="Evaluation split.")
@click.option("--out", "-o", "out", required=True, type=click.Path(file_okay=False),
              help="Output folder: results/<run>/<Task>.json (MTEB layout), report.html, report.md.")
@click.option("--no-prefix", is_flag=True, help="Ablation: embed without any prefix or instruction.")
@click.option("--ablate-prefix", is_flag=True, help="Run with the model's prefixes and without, side by side.")
@click.option("--compare", "compare_dirs", multiple=True, type=click.Path(exists=True, file_okay=False),
              help="An earlier run's results/<run> folder to show beside this one. Repeatable.")
@click.option("--label", default=None, help="Name of this run in the report [default: the model name].")
@click.option("--batch-size", default=32, show_default=True)
@click.option("--ignore-identical-ids", is_flag=True, help="Drop a query's own id from its ranking (ArguAna, Quora).")
@click.option("--samples-per-label", default=8, show_default=True, help="MTEB's n-shot classification size.")
@click.option("--n-experiments", default=10, show_default=True, help="MTEB's classification repetitions.")
@click.option("--no-full-train", is_flag=True, help="Skip the classifier trained on the full training set.")
@model_options
def eval_command(beir_dirs, sts_paths, clf_dirs, split, out, no_prefix, ablate_prefix, compare_dirs, label,
                 batch_size, ignore_identical_ids, samples_per_label, n_experiments, no_full_train,
                 model, device, dtype, backend, threads):
    """Evaluate a model as the E5 authors did and write MTEB-layout results plus an HTML/Markdown report.

    \b
    e5kit eval -m intfloat/e5-small-v2 --beir scifact/ --sts stsbenchmark/ --classification banking77/ -o out/
    e5kit eval -m my-finetune --beir scifact/ -o out2/ --compare out/results/intfloat__e5-small-v2
    """
    from .data import DatasetError
    from .report import load_results, write_report, write_results
    from .tasks import evaluate_classification, evaluate_retrieval, evaluate_sts

    if not (beir_dirs or sts_paths or clf_dirs or compare_dirs):
        raise click.UsageError("give at least one of --beir, --sts, --classification (or --compare)")
    # before the model is loaded: what each task (and the report's plots) import
    require_extras("eval", "eval", ["matplotlib"] + (["pytrec_eval"] if beir_dirs else []) +
                   (["scipy"] if sts_paths else []) + (["sklearn"] if clf_dirs else []))
    if label is None and Path(model).exists():  # a local model: its folder's name, not "./my-e5" or "/abs/path"
        label = Path(model).resolve().name
    out = Path(out)
    runs_by_label, metas = {}, {}
    for d in compare_dirs:
        try:
            lb, meta, runs = load_results(Path(d))
        except (FileNotFoundError, ValueError, KeyError) as e:
            raise click.ClickException(f"{d}: {e}")
        runs_by_label[lb], metas[lb] = runs, meta
    if beir_dirs or sts_paths or clf_dirs:
        m = load_model(model, device, dtype, backend, threads)
        styles = [m.prompt_style, "none"] if ablate_prefix else ["none" if no_prefix else m.prompt_style]
        for style in dict.fromkeys(styles):
            lb = (label or m.name) + (" (no prefix)" if style == "none" and m.prompt_style != "none" else "")
            runs = []
            try:
                for d in beir_dirs:
                    click.echo(f"[{lb}] retrieval: {d}", err=True)
                    runs.append(evaluate_retrieval(m, d, split, prompt_style=style, batch_size=batch_size,
                                                   ignore_identical_ids=ignore_identical_ids))
                for p in sts_paths:
                    click.echo(f"[{lb}] STS: {p}", err=True)
                    runs.append(evaluate_sts(m, p, split=split, prompt_style=style, batch_size=batch_size))
                for d in clf_dirs:
                    click.echo(f"[{lb}] classification: {d}", err=True)
                    runs.append(evaluate_classification(m, d, split=split, prompt_style=style, batch_size=batch_size,
                                                        samples_per_label=samples_per_label,
                                                        n_experiments=n_experiments, full_train=not no_full_train))
            except DatasetError as e:
                raise click.ClickException(str(e))
            meta = {"model": m.name, "prompt_style": style, "dim": m.dim, "device": str(m.device),
                    "dtype": str(m.dtype).removeprefix("torch.")}
            write_results(out, lb, meta, runs)
            runs_by_label[lb], metas[lb] = runs, meta
            for r in runs:
                click.echo(f"{lb}\t{r.task_name}\t{r.scores['main_score'] * 100:.2f}")
    html_path, md_path = write_report(out, runs_by_label, metas)
    click.echo(f"wrote {html_path} and {md_path}", err=True)
