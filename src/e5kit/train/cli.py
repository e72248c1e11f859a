"""``e5kit train``, ``e5kit mine`` and ``e5kit filter``. Heavy imports happen inside the commands."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import click

from ..cli import load_model, model_options
from .config import TrainConfig, option_type

AMP_NAMES = {"fp32": "fp32", "float32": "fp32", "bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16"}

_HELP = {
    "data": "Training jsonl: {query, positive, negatives?, teacher_scores?} per line.",
    "model": "Model to fine-tune (hub id or local directory).",
    "output_dir": "Where the trained model, metrics.jsonl and checkpoint-N folders go.",
    "epochs": "Passes over the data (ignored when --max-steps is set).",
    "max_steps": "Stop after this many steps (overrides --epochs).",
    "batch_size": "Queries per step per process; the contrastive batch is this x processes.",
    "negatives": "Hard negatives per query (0 for pair data).",
    "chunk_size": "GradCache: sequences encoded at once, bounding memory (off when not set).",
    "lr": "Peak learning rate (AdamW).",
    "weight_decay": "AdamW weight decay (not on biases and LayerNorms).",
    "warmup_steps": "Linear warm-up steps (default: --warmup-ratio of all steps).",
    "warmup_ratio": "Warm-up as a fraction of all steps, when --warmup-steps is not set.",
    "max_grad_norm": "Gradient clipping norm (0: off).",
    "temperature": "InfoNCE temperature (E5: 0.01).",
    "alpha": "Weight of InfoNCE next to the KL term when distilling.",
    "teacher_temperature": "Softmax temperature of the teacher scores when distilling.",
    "distill": "Force distillation on/off (default: on when every line has teacher_scores).",
    "gather": "Score each query against the passages of every process (torchrun).",
    "query_max_length": "Token limit for queries.",
    "passage_max_length": "Token limit for passages.",
    "precision": "fp32, bf16 or fp16 (CUDA only) autocast; the saved model is fp32.",
    "gradient_checkpointing": "Recompute activations in the backward: less memory, one extra forward pass of compute.",
    "dropout": "Hidden and attention dropout (default: the checkpoint's).",
    "seed": "Seed for data order, negatives and dropout.",
    "shuffle": "Shuffle the data every epoch.",
    "device": "cpu, cuda or cuda:N (default: cuda:LOCAL_RANK when CUDA is available).",
    "threads": "CPU threads for torch.",
    "prompt_style": "Override the model's prompt style: e5, instruct or none.",
    "task": "Instruction on queries for instruct models.",
    "skip_bad_lines": "Drop malformed lines (with a warning) instead of refusing the file.",
    "log_every": "Write a metrics.jsonl row every N steps.",
    "save_every": "Write output-dir/checkpoint-N every N steps (resumable).",
    "save_total_limit": "Keep only the newest N checkpoint-N folders.",
    "save_optimizer": "Keep AdamW's state in checkpoints (2x the weights; needed for an exact resume).",
    "eval_data": "BEIR folder evaluated every --eval-every steps and at the end (needs the eval extra).",
    "eval_split": "qrels split of --eval-data (default: dev when it has one, else test).",
    "eval_every": "Evaluate every N steps (default: on the final weights only).",
    "tensorboard": "Also log to output-dir/tensorboard (needs tensorboard).",
    "progress": "Progress bar on stderr (default: when stderr is a terminal).",
    "resume": "checkpoint-N directory to continue, or 'auto' for the latest in --output-dir.",
}
SHORT = {"model": "-m", "data": "-d", "output_dir": "-o"}
# what the command line does when a field is not set, where that differs from the library's None
CLI_DEFAULTS = {"threads": "OMP_NUM_THREADS (torchrun sets 1), else all cores"}


def _train_options(f):
    """One flag per TrainConfig field; None (not given) leaves the config file's value alone."""
    f = click.option("--backend", type=click.Choice(["auto", "torch", "int8"]), default="auto", show_default=True,
                     help="As in embed and serve; training runs torch (auto means torch), int8 is refused: it "
                          "is an inference backend for the trained model.")(f)
    f = click.option("--dtype", "dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
                     help="Same as --precision, in the names embed and serve use.")(f)
    for fld in reversed(dataclasses.fields(TrainConfig)):
        typ, flag = option_type(fld), fld.name.replace("_", "-")
        default = CLI_DEFAULTS.get(fld.name) or ("not set" if fld.default in (None, "") else fld.default)
        help_ = f"{_HELP[fld.name]} [default: {default}]"
        names = [f"--{flag}"] + ([SHORT[fld.name]] if fld.name in SHORT else [])
        if typ is bool:
            f = click.option(f"--{flag}/--no-{flag}", fld.name, default=None, help=help_)(f)
        else:
            f = click.option(*names, fld.name, type=typ, default=None, help=help_)(f)
    return f


@click.command("train")
@click.argument("config", required=False, type=click.Path(dir_okay=False))
@_train_options
def train(config, dtype, backend, **flags):
    """Fine-tune (or pre-train) an E5 model with its contrastive recipe.

    CONFIG is an optional YAML file of TrainConfig options; flags override it. Multi-process:
    `torchrun --nproc_per_node N -m e5kit train CONFIG` (gloo on CPU, NCCL on GPU).
    Training runs the exact torch path in --precision; --backend int8 is for embed/serve/index/eval.

    \b
    e5kit train -m intfloat/multilingual-e5-small -d train.jsonl -o my-e5 --chunk-size 32 --dtype bfloat16
    """
    import logging

    from ..cli import check_device, require_extras

    if backend == "int8":
        raise click.BadParameter("training runs the exact torch path (gradients need it); int8 is an inference "
                                 "backend: train with --backend torch (or auto), then embed, serve or evaluate "
                                 "the trained model with --backend int8", param_hint="--backend")
    require_extras("train", "train", ["yaml"])
    import yaml

    from ..engine import default_threads
    from ..loading import E5LoadError
    from .data import DataError
    from .trainer import train as run

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if dtype and flags["precision"] and AMP_NAMES[dtype] != AMP_NAMES[flags["precision"]]:
        raise click.UsageError(f"--dtype {dtype} and --precision {flags['precision']} disagree; give one")
    flags["precision"] = flags["precision"] or dtype
    try:
        if config and not Path(config).is_file():
            raise FileNotFoundError(f"config file {config} does not exist")
        cfg = TrainConfig.from_yaml(config) if config else TrainConfig()
        for k, v in flags.items():
            if v is not None:
                setattr(cfg, k, v)
        # a command owns its process, so it sets torch's thread count (the library never does unasked)
        if cfg.threads is None:
            cfg.threads = default_threads()
        check_device(cfg.device)
        result = run(cfg)
    except (DataError, ValueError, FileNotFoundError, IsADirectoryError, E5LoadError, yaml.YAMLError) as e:
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
