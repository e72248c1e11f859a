"""``e5kit train``, ``e5kit mine`` and ``e5kit filter``. Heavy imports happen inside the commands."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import click

from ..cli import load_model, model_options
from .config import TrainConfig, option_type

_HELP = {
    "data": "Training jsonl: {query, positive, negatives?, teacher_scores?} per line.",
    "model": "Model to fine-tune (hub id or local directory).",
    "batch_size": "Queries per step per process; the contrastive batch is this x processes.",
    "negatives": "Hard negatives per query (0 for pair data).",
    "chunk_size": "GradCache chunk size in sequences (off when not set).",
    "temperature": "InfoNCE temperature (E5: 0.01).",
    "alpha": "Weight of InfoNCE next to the KL term when distilling.",
    "precision": "fp32, bf16 or fp16 autocast.",
    "resume": "checkpoint-N directory to continue, or 'auto' for the latest in --output-dir.",
    "eval_data": "BEIR directory to evaluate on every --eval-every steps (needs e5kit.evaluate).",
    "skip_bad_lines": "Drop malformed lines (with a warning) instead of refusing the file.",
}


def _train_options(f):
    """One flag per TrainConfig field; None (not given) leaves the config file's value alone."""
    for fld in reversed(dataclasses.fields(TrainConfig)):
        typ, flag = option_type(fld), fld.name.replace("_", "-")
        help_ = f"{_HELP.get(fld.name, '')} [default: {fld.default}]".strip()
        if typ is bool:
            f = click.option(f"--{flag}/--no-{flag}", fld.name, default=None, help=help_)(f)
        else:
            f = click.option(f"--{flag}", fld.name, type=typ, default=None, help=help_)(f)
    return f


@click.command("train")
@click.argument("config", required=False, type=click.Path(dir_okay=False))
@_train_options
def train(config, **flags):
    """Fine-tune (or pre-train) an E5 model with its contrastive recipe.

    CONFIG is an optional YAML file of TrainConfig options; flags override it. Multi-process:
    `torchrun --nproc_per_node N -m e5kit train CONFIG` (gloo on CPU, NCCL on GPU).
    """
    import logging

    import yaml

    from ..loading import E5LoadError
    from .data import DataError
    from .trainer import train as run

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        cfg = TrainConfig.from_yaml(config) if config else TrainConfig()
        for k, v in flags.items():
            if v is not None:
                setattr(cfg, k, v)
        result = run(cfg)
    except (DataError, ValueError, FileNotFoundError, E5LoadError, yaml.YAMLError) as e:
        raise click.ClickException(str(e))
    if result.interrupted:
        click.echo(f"stopped at step {result.steps}; continue with the same command plus --resume auto", err=True)
        sys.exit(130)
    if not result.history:
        click.echo(f"nothing to do: {cfg.output_dir} already reached step {result.steps}", err=True)
    else:
        last = result.history[-1]
        click.echo(f"trained {result.steps} steps; last loss {last['loss']:.4f}; model written to {result.output_dir}",
                   err=True)


def _write_jsonl(rows, output: str) -> None:
    out = sys.stdout if output == "-" else open(output, "w", encoding="utf-8")
    try:
        for r in rows:
            out.write(json.dumps(r, ensure_ascii=False) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()


def _read_jsonl(path: str) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line; a malformed line is an error naming it."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append((n, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise click.ClickException(f"{path}:{n}: not valid JSON ({e.msg})")
    return rows


@click.command("mine")
@click.option("--beir", "beir_dir", type=click.Path(file_okay=False), help="BEIR directory (corpus, queries, qrels/).")
@click.option("--split", default="train", show_default=True, help="qrels split whose pairs get negatives.")
@click.option("--input", "-i", "input_path", type=click.Path(dir_okay=False),
              help="Instead of --beir: jsonl of {query, positive} to add negatives to.")
@click.option("--corpus", type=click.Path(dir_okay=False),
              help="With --input: passages to mine from (.jsonl with text/title, or .txt lines); default: all positives.")
@click.option("--output", "-o", required=True, help="Output jsonl ('-' for stdout).")
@click.option("--negatives", "-n", default=7, show_default=True, help="Negatives per query.")
@click.option("--skip-top", default=3, show_default=True, help="Ranks skipped before taking negatives.")
@click.option("--max-length", type=int, default=None, help="Token limit when embedding (default: the model's).")
@click.option("--batch-size", default=64, show_default=True)
@click.option("--task", default=None, help="Instruction for instruct models.")
@model_options
def mine(beir_dir, split, input_path, corpus, output, negatives, skip_top, max_length, batch_size, task,
         model, device, dtype, backend, threads):
    """Mine hard negatives: the top-ranked non-positive passages for each training query."""
    from . import mining
    from .data import passage_text

    if bool(beir_dir) == bool(input_path):
        raise click.UsageError("give exactly one of --beir DIR or --input PAIRS.jsonl")
    if negatives < 1 or skip_top < 0:
        raise click.UsageError("--negatives must be >= 1 and --skip-top >= 0")
    m = load_model(model, device, dtype, backend, threads)
    try:
        if beir_dir:
            rows = mining.mine_beir(m, beir_dir, split, negatives, skip_top, max_length, batch_size, task)
        else:
            examples = []
            for n, obj in _read_jsonl(input_path):
                if not isinstance(obj, dict) or not isinstance(obj.get("query"), str) or "positive" not in obj:
                    raise click.ClickException(f"{input_path}:{n}: expected an object with 'query' and 'positive'")
                try:
                    passage_text(obj["positive"], "'positive'")
                except ValueError as e:
                    raise click.ClickException(f"{input_path}:{n}: {e}")
                examples.append(obj)
            texts = None
            if corpus:
                if corpus.endswith((".jsonl", ".json")):
                    texts = []
                    for n, obj in _read_jsonl(corpus):
                        try:
                            texts.append(passage_text(obj, "passage"))
                        except ValueError as e:
                            raise click.ClickException(f"{corpus}:{n}: {e}")
                else:
                    texts = [ln for ln in Path(corpus).read_text(encoding="utf-8").splitlines() if ln.strip()]
            rows = mining.mine_pairs(m, examples, texts, negatives, skip_top, max_length, batch_size, task)
    except (ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e))
    _write_jsonl(rows, output)
    short = sum(len(r["negatives"]) < negatives for r in rows)
    click.echo(f"wrote {len(rows)} examples with up to {negatives} negatives each to {output}"
               + (f" ({short} with fewer: corpus too small)" if short else ""), err=True)


@click.command("filter")
@click.option("--input", "-i", "input_path", required=True, type=click.Path(dir_okay=False, exists=True),
              help="Training jsonl of {query, positive, ...}.")
@click.option("--output", "-o", required=True, help="Kept lines, unchanged ('-' for stdout).")
@click.option("--top-k", default=2, show_default=True, help="Keep a pair when its passage ranks within this.")
@click.option("--sample", default=1000, show_default=True, help="Passages from other pairs ranked against it.")
@click.option("--seed", default=0, show_default=True)
@click.option("--max-length", type=int, default=None, help="Token limit when embedding (default: the model's).")
@click.option("--batch-size", default=64, show_default=True)
@click.option("--task", default=None, help="Instruction for instruct models.")
@click.option("--skip-bad-lines", is_flag=True, help="Drop malformed lines instead of refusing the file.")
@model_options
def filter_command(input_path, output, top_k, sample, seed, max_length, batch_size, task, skip_bad_lines,
                   model, device, dtype, backend, threads):
    """Consistency filter for noisy pairs: keep a pair only if the model ranks its passage in the
    top-k for its query among itself and --sample passages of other pairs."""
    from . import mining
    from .data import DataError, load_examples

    try:
        examples = load_examples(input_path, skip_bad=skip_bad_lines)
    except (DataError, FileNotFoundError) as e:
        raise click.ClickException(str(e))
    m = load_model(model, device, dtype, backend, threads)
    keep = mining.consistency_filter(m, [e.query for e in examples], [e.positive for e in examples], top_k, sample,
                                     seed, max_length, batch_size, task)
    lines = Path(input_path).read_bytes().split(b"\n")  # numbered as load_examples numbers them
    kept = [lines[e.line - 1].decode("utf-8").rstrip("\r") for e, k in zip(examples, keep) if k]
    out = sys.stdout if output == "-" else open(output, "w", encoding="utf-8")
    try:
        for ln in kept:
            out.write(ln + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    click.echo(f"kept {len(kept)} of {len(examples)} pairs (top-{top_k} among itself + {sample} sampled)", err=True)


__all__ = ["train", "mine", "filter_command"]
