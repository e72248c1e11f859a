"""`e5kit serve`: load the models, log what is served, run uvicorn, drain on SIGTERM.

Every option can also be set with an environment variable: E5KIT_ plus the option name in capitals
with dashes as underscores (E5KIT_PORT=9000, E5KIT_MODEL="a b" for two models, E5KIT_API_KEY_FILE=...).
"""

from __future__ import annotations

from pathlib import Path

import click

from ..cli import load_model, model_options
from ..service.cli import service_options


def parse_model_arg(value: str) -> tuple[str | None, str]:
    """``ID=PATH_OR_HUB_ID`` or just ``PATH_OR_HUB_ID`` -> (served id or None, what to load)."""
    if "=" in value and not Path(value).exists():
        name, _, target = value.partition("=")
        if name and target:
            return name, target
    return None, value


@click.command("serve", context_settings={"auto_envvar_prefix": "E5KIT", "show_default": True})
@model_options(multiple=True)
@click.option("--host", default="127.0.0.1", help="Address to listen on (0.0.0.0 for every interface).")
@click.option("--port", default=8000, type=click.IntRange(0, 65535), help="TCP port.")
@click.option("--api-key", "api_keys", multiple=True, envvar="E5KIT_API_KEY",
              help="Accept this Bearer key (repeatable). No keys: open server.")
@click.option("--api-key-file", type=click.Path(dir_okay=False), default=None,
              help="File of keys, one per line: KEY or 'LABEL KEY' (# comments allowed).")
@click.option("--default-input-type", type=click.Choice(["query", "passage", "raw"]), default="query",
              help="Prefix used when a request gives no input_type ('query' suits symmetric use).")
@click.option("--auto-truncate/--no-auto-truncate", default=True,
              help="Cut inputs longer than the model's limit unless a request says truncate=false.")
@click.option("--max-inputs", default=2048, type=click.IntRange(1), help="Most inputs in one request.")
@click.option("--max-body-bytes", default=16 << 20, type=click.IntRange(1), help="Largest request body.")
@click.option("--max-batch-tokens", default=16384, type=click.IntRange(1),
              help="Tokens the worker takes from the queue at once (padded size of one forward pass).")
@click.option("--max-batch-size", default=32, type=click.IntRange(1), help="Most inputs in one forward pass.")
@click.option("--max-wait-ms", default=2.0, type=click.FloatRange(0), help="Longest wait for a batch to fill.")
@click.option("--max-queued-tokens", default=1 << 20, type=click.IntRange(1),
              help="Tokens admitted but not yet embedded beyond which requests get 429 + Retry-After.")
@click.option("--price-per-million", default=0.0, type=click.FloatRange(0), help="USD per million tokens (metering).")
@click.option("--drain-timeout", default=30.0, type=click.FloatRange(0),
              help="Seconds to let in-flight requests finish after SIGTERM.")
@click.option("--access-log/--no-access-log", default=True, help="Log one line per request (keys are never logged).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info")
@service_options
def serve(model, device, dtype, backend, threads, host, port, api_keys, api_key_file, default_input_type,
          auto_truncate, max_inputs, max_body_bytes, max_batch_tokens, max_batch_size, max_wait_ms,
          max_queued_tokens, price_per_million, drain_timeout, access_log, log_level, **service):
    """Serve E5 models over HTTP: OpenAI /v1/embeddings, /embed, /similarity, /tokenize, /metrics.

    \b
    e5kit serve --model intfloat/e5-small-v2 --port 8000
    e5kit serve -m small=intfloat/e5-small-v2 -m ml=intfloat/multilingual-e5-small --api-key-file keys.txt

    Every option can also come from the environment: E5KIT_PORT=9000, E5KIT_MODEL="a=dir1 b=dir2",
    E5KIT_API_KEY="k1 k2", E5KIT_MAX_QUEUED_TOKENS=..., and so on.
    """
    import logging

    import uvicorn

    from .app import ServerConfig, create_app
    from .auth import KeyFileError, KeyStore

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("e5kit.server")
    try:
        keys = KeyStore.from_sources(api_keys, api_key_file)
        config = ServerConfig(max_batch_tokens=max_batch_tokens, max_batch_size=max_batch_size,
                              max_wait_ms=max_wait_ms, max_queued_tokens=max_queued_tokens, max_inputs=max_inputs,
                              max_body_bytes=max_body_bytes, default_input_type=default_input_type,
                              auto_truncate=auto_truncate, price_per_million=price_per_million)
    except (KeyFileError, ValueError) as e:
        raise click.ClickException(str(e))
    loaded = []
    for value in model:
        name, target = parse_model_arg(value)
        m = load_model(target, device, dtype, backend, threads)
        loaded.append((name or value, m))
        log.info("model %s: %s, dim %d, max %d tokens, prompt style %s, device %s, dtype %s", name or value,
                 m.engine.checkpoint.path, m.dim, m.max_tokens, m.prompt_style, m.device,
                 str(m.dtype).replace("torch.", ""))
    try:
        app = create_app(loaded, config, keys)
        if service["database_url"]:  # accounts, ledger, limits, pages (e5kit.service)
            from ..service.cli import install_from_options

            install_from_options(app, keys, price_per_million=price_per_million, **service)
    except ValueError as e:
        raise click.ClickException(str(e))
    import torch

    log.info("limits: %s", config.describe())
    log.info("torch threads %d; auth: %s", torch.get_num_threads(),
             f"{len(keys)} API key(s)" if keys.enabled else "off (no --api-key / --api-key-file)")
    log.info("listening on http://%s:%d (docs at /docs)", host, port)
    uconfig = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=access_log,
                             timeout_graceful_shutdown=drain_timeout, server_header=False)
    server = _draining_server(uconfig, app.state.e5kit)
    server.run()
    if not server.started:  # e.g. the port was taken; uvicorn has logged why
        raise SystemExit(1)


def _draining_server(config, state: dict):
    """A uvicorn.Server that flags the app as draining (so /ready answers 503) when told to exit."""
    import signal

    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            state["draining"] = True
            super().handle_exit(sig, frame)
            if sig == signal.SIGTERM:
                # uvicorn re-raises captured signals after shutdown; a drained SIGTERM should exit 0.
                captured = getattr(self, "_captured_signals", None)
                if isinstance(captured, list):
                    captured[:] = [s for s in captured if s != signal.SIGTERM]

    return Server(config)
