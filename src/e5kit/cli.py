"""The ``e5kit`` command line. Each feature area owns its subcommands in its own module; this
file only lists them (imported lazily so ``e5kit embed`` does not load the server or trainer)."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import click

from .models import DEFAULT_MODEL, REGISTRY

# subcommand name -> "module:attribute" (a click command or group)
LAZY_COMMANDS = {
    "serve": "e5kit.server.cli:serve",
    "index": "e5kit.index_cli:index",
    "search": "e5kit.index_cli:search",
    "eval": "e5kit.evaluate.cli:eval_command",
    "train": "e5kit.train.cli:train",
    "mine": "e5kit.train.cli:mine",
    "filter": "e5kit.train.cli:filter_command",
    "accounts": "e5kit.service.cli:accounts_cli",
    "keys": "e5kit.service.cli:keys_cli",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(LAZY_COMMANDS))

    def get_command(self, ctx, name):
        if name in LAZY_COMMANDS:
            module, attr = LAZY_COMMANDS[name].split(":")
            try:
                return getattr(importlib.import_module(module), attr)
            except (ImportError, AttributeError) as e:  # an optional extra is not installed
                return _missing(name, e)
        return super().get_command(ctx, name)


def _missing(name: str, err: Exception) -> click.Command:
    @click.command(name, help=f"(unavailable: {err})", context_settings={"ignore_unknown_options": True})
    @click.argument("args", nargs=-1)
    def cmd(args):
        raise click.ClickException(f"`e5kit {name}` needs an optional dependency: {err}. Try `pip install e5kit[all]`.")

    return cmd


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="e5kit")
def main():
    """e5kit: embed, serve, search, evaluate and train E5 text-embedding models."""


@main.command()
def models():
    """List the known E5 checkpoints."""
    rows = [("model", "arch", "layers", "dim", "heads", "max tok", "prompts", "languages", "license")]
    for s in REGISTRY.values():
        rows.append((s.name, s.architecture, str(s.layers), str(s.hidden), str(s.heads), str(s.max_tokens),
                     s.prompt_style, s.languages, s.license))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for j, r in enumerate(rows):
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if j == 0:
            click.echo("  ".join("-" * w for w in widths))


def model_options(f=None, *, multiple: bool = False):
    """--model / --device / --dtype / --backend / --threads, shared by every command that loads a model.

    ``@model_options(multiple=True)`` makes --model repeatable (the command gets a tuple).
    """
    if f is None:
        return lambda g: model_options(g, multiple=multiple)
    f = click.option("--threads", type=int, default=None, help="CPU threads (default: all cores).")(f)
    f = click.option("--backend", default="auto", show_default=True, help="auto, torch or int8.")(f)
    f = click.option("--dtype", default=None, help="float32, float16 or bfloat16 (default: fp32 on CPU, bf16 on "
                     "CUDA; bfloat16 is the fast path on CPUs with AMX, see docs/speed.md).")(f)
    f = click.option("--device", default=None, help="cpu, cuda, cuda:N (default: CUDA when available).")(f)
    if multiple:
        f = click.option("--model", "-m", multiple=True, default=(DEFAULT_MODEL,), show_default=True,
                         help="Hub id or local directory; repeat to load several models.")(f)
    else:
        f = click.option("--model", "-m", default=DEFAULT_MODEL, show_default=True, help="Hub id or local directory.")(f)
    return f


def load_model(model, device, dtype, backend, threads):
    from .api import E5
    from .loading import E5LoadError

    from .engine import default_threads

    try:  # a command owns its process, so it sets torch's thread count (the library never does unasked)
        return E5(model, device=device, dtype=dtype, backend=backend, threads=threads or default_threads())
    except (E5LoadError, ValueError) as e:
        raise click.ClickException(str(e))


@main.command()
@click.argument("model", default=DEFAULT_MODEL)
def info(model):
    """Show what e5kit knows about MODEL (registry entry, or config of a local/hub checkpoint)."""
    from .loading import E5LoadError, load_checkpoint

    try:
        ck = load_checkpoint(model)
    except E5LoadError as e:
        raise click.ClickException(str(e))
    d = ck.spec.as_dict() | {"path": str(ck.path), "vocab_size": ck.config.vocab_size,
                             "intermediate_size": ck.config.intermediate_size,
                             "position_offset": ck.config.position_offset}
    for k, v in d.items():
        click.echo(f"{k:18} {v}")


def read_texts(texts: tuple[str, ...], input_path: str | None, field: str) -> list[str]:
    """Texts from arguments, a .txt (one per line) / .jsonl file, or stdin (one per line)."""
    if texts and input_path:
        raise click.UsageError("give texts as arguments or --input, not both")
    if texts:
        return list(texts)
    if input_path and input_path != "-":
        p = Path(input_path)
        if not p.exists():
            raise click.ClickException(f"{p} does not exist")
        lines = p.read_text(encoding="utf-8").splitlines()
        is_jsonl = p.suffix in (".jsonl", ".json")
    else:
        lines = sys.stdin.read().splitlines()
        is_jsonl = False
    if not is_jsonl:
        return [ln for ln in lines if ln.strip()]
    out = []
    for n, ln in enumerate(lines, 1):
        if not ln.strip():
            continue
        try:
            d = json.loads(ln)
        except json.JSONDecodeError as e:
            raise click.ClickException(f"{input_path}:{n}: not valid JSON ({e.msg})")
        value = d if isinstance(d, str) else d.get(field) if isinstance(d, dict) else None
        if not isinstance(value, str):
            raise click.ClickException(f"{input_path}:{n}: no string field {field!r}")
        out.append(value)
    return out


@main.command()
@click.argument("texts", nargs=-1)
@click.option("--input", "-i", "input_path", help="A .txt (one text per line) or .jsonl file; '-' for stdin.")
@click.option("--field", default="text", show_default=True, help="The jsonl field holding the text.")
@click.option("--type", "input_type", type=click.Choice(["query", "passage", "raw"]), default="query",
              show_default=True, help="Prefix convention: query, passage, or raw (text already prefixed).")
@click.option("--task", default=None, help="Task name or instruction for instruct models (e.g. SciFact).")
@click.option("--output", "-o", default="-", help="Output .jsonl or .npy file ('-': jsonl on stdout).")
@click.option("--batch-size", default=32, show_default=True)
@click.option("--no-normalize", is_flag=True, help="Skip L2 normalisation.")
@click.option("--precision", type=click.Choice(["float32", "int8", "uint8", "binary", "ubinary"]),
              default="float32", show_default=True)
@click.option("--no-truncate", is_flag=True, help="Fail on inputs longer than the model's limit.")
@model_options
def embed(texts, input_path, field, input_type, task, output, batch_size, no_normalize, precision, no_truncate,
          model, device, dtype, backend, threads):
    """Embed TEXTS (or --input / stdin) and write jsonl or .npy.

    \b
    e5kit embed "how much protein should a female eat"
    e5kit embed --type passage -i docs.jsonl -o docs.npy
    """
    from .engine import InputTooLongError

    items = read_texts(texts, input_path, field)
    if not items:
        raise click.UsageError("no texts given (arguments, --input FILE or stdin)")
    m = load_model(model, device, dtype, backend, threads)
    formatted = m.format(items, input_type, task)
    try:
        emb = m.encode(formatted, batch_size=batch_size, normalize_embeddings=not no_normalize,
                       precision=precision, truncate=not no_truncate, show_progress_bar=None)
    except InputTooLongError as e:
        raise click.ClickException(str(e))
    if m.last_truncated:
        click.echo(f"warning: {len(m.last_truncated)} input(s) truncated to {m.max_tokens} tokens", err=True)
    if output.endswith(".npy"):
        import numpy as np

        np.save(output, emb)
        click.echo(f"wrote {emb.shape[0]} x {emb.shape[1]} {emb.dtype} to {output}", err=True)
        return
    out = sys.stdout if output == "-" else open(output, "w", encoding="utf-8")
    try:
        for text, vec in zip(items, emb):
            out.write(json.dumps({"text": text, "embedding": vec.tolist()}, ensure_ascii=False) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()


if __name__ == "__main__":  # pragma: no cover
    main()
