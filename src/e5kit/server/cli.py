"""`e5kit serve`: bind the port, load the models, log what is served, run uvicorn, drain on SIGTERM.

Every option can also be set with an environment variable: E5KIT_ plus the option name in capitals
with dashes as underscores (E5KIT_PORT=9000, E5KIT_MODEL="a b" for two models, E5KIT_API_KEY_FILE=...).
The limits are :class:`~e5kit.server.config.ServerConfig`'s fields, one flag each.
"""

from __future__ import annotations

import socket
from pathlib import Path

import click

from ..cli import load_model, model_options
from ..service.cli import SERVICE_OPTIONS, service_options
from .config import ServerConfig, option_fields


def parse_model_arg(value: str) -> tuple[str | None, str]:
    """``ID=PATH_OR_HUB_ID`` or just ``PATH_OR_HUB_ID`` -> (served id or None, what to load)."""
    if "=" in value and not Path(value).exists():
        name, _, target = value.partition("=")
        if name and target:
            return name, target
    return None, value


def _config_options(f):
    for fld in reversed(option_fields()):
        flag, default = fld.name.replace("_", "-"), fld.default
        help_ = fld.metadata["help"]
        if isinstance(default, bool):
            f = click.option(f"--{flag}/--no-{flag}", fld.name, default=default, help=help_)(f)
        elif fld.name == "default_input_type":
            f = click.option(f"--{flag}", fld.name, type=click.Choice(["query", "passage", "raw"]), default=default,
                             help=help_)(f)
        else:
            typ = click.IntRange(1) if isinstance(default, int) else click.FloatRange(0)
            f = click.option(f"--{flag}", fld.name, type=typ, default=default, help=help_)(f)
    return f


@click.command("serve", context_settings={"auto_envvar_prefix": "E5KIT", "show_default": True})
@model_options(multiple=True)
@click.option("--host", default="127.0.0.1", help="Address to listen on (0.0.0.0 for every interface).")
@click.option("--port", default=8000, type=click.IntRange(0, 65535), help="TCP port.")
@click.option("--api-key-file", type=click.Path(dir_okay=False), default=None,
              help="File of keys, one per line: KEY or 'LABEL KEY' (# comments allowed). Preferred: keys on the "
                   "command line show in `ps`.")
@click.option("--api-key", "api_keys", multiple=True, envvar="E5KIT_API_KEY",
              help="Accept this Bearer key (repeatable; prefer E5KIT_API_KEY or --api-key-file). No keys: open server.")
@_config_options
@click.option("--access-log/--no-access-log", default=True,
              help="Log one line per request (credentials in query strings are redacted; keys are never logged).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info")
@service_options
def serve(model, device, dtype, backend, threads, host, port, api_keys, api_key_file, access_log, log_level,
          **limits):
    """Serve E5 models over HTTP: OpenAI /v1/embeddings, /embed, /similarity, /tokenize, /metrics.

    \b
    E5KIT_API_KEY=sk-... e5kit serve --model intfloat/e5-small-v2 --port 8000
    e5kit serve -m small=intfloat/e5-small-v2 -m ml=intfloat/multilingual-e5-small --api-key-file keys.txt

    Every option can also come from the environment: E5KIT_PORT=9000, E5KIT_MODEL="a=dir1 b=dir2",
    E5KIT_API_KEY="k1 k2", E5KIT_MAX_QUEUE_WAIT=..., and so on.
    """
    import logging

    from .auth import KeyFileError, KeyStore
    from .service import served_name

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("e5kit.server")
    service = {k: limits.pop(k) for k in SERVICE_OPTIONS}  # accounts, ledger, limits, pages (e5kit.service)
    try:
        keys = KeyStore.from_sources(api_keys, api_key_file)
        config = ServerConfig(**limits)
    except (KeyFileError, ValueError) as e:
        raise click.ClickException(str(e))
    sock = _bind(host, port)  # before loading anything: a busy port fails in a second, not after the models
    loaded = []
    for value in model:
        name, target = parse_model_arg(value)
        m = load_model(target, device, dtype, backend, threads)
        name = name or served_name(target)
        loaded.append((name, m))
        log.info("model %s: %s, dim %d, max %d tokens, prompt style %s, device %s, %s", name,
                 m.engine.checkpoint.path, m.dim, m.max_tokens, m.prompt_style, m.device, _precision(m))
    from .app import create_app

    try:
        if service["database_url"]:
            from ..service.cli import app_from_options

            app = app_from_options(loaded, config, keys, **service)
        else:
            app = create_app(loaded, config, keys)
    except ValueError as e:
        raise click.ClickException(str(e))
    auth = ("accounts database" + (f" and {len(keys)} API key(s)" if keys.enabled else "") if service["database_url"]
            else f"{len(keys)} API key(s)" if keys.enabled else "off (no --api-key / --api-key-file)")
    _run(app, sock, config, auth, access_log, log_level, log)


def _precision(m) -> str:
    dtype = str(m.dtype).replace("torch.", "")
    if m.backend == "int8":
        return f"backend int8 (int8 linear layers, the rest {dtype})"
    return f"backend {m.backend}, dtype {dtype}"


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise click.ClickException(f"cannot listen on {host}:{port}: {e.strerror or e}")
    sock.set_inheritable(True)
    return sock


def _run(app, sock: socket.socket, config: ServerConfig, auth: str, access_log: bool, log_level: str, log) -> None:
    import gc
    import logging
    import sys

    import torch
    import uvicorn

    from .middleware import RedactFilter, header_timeout_protocol

    # The event loop shares the interpreter with the threads that parse, tokenize and render large
    # bodies. Each time the loop blocks on a socket it must win the GIL back, waiting up to the switch
    # interval (5 ms by default) every time: a few such waits per request put /health at ~100 ms under
    # a /tokenize attack. A shorter interval hands the GIL back sooner (this is the serve process's
    # own setting; the library never changes it).
    sys.setswitchinterval(0.001)
    # What is alive now (modules, the model, the app) lives as long as the process: kept out of the
    # collector's full passes, which otherwise walk it all (~0.1 s holding the GIL) as requests allocate.
    gc.collect()
    gc.freeze()
    host, port = sock.getsockname()[:2]
    log.info("limits: %s", config.describe())
    log.info("torch threads %d; auth: %s", torch.get_num_threads(), auth)
    # uvicorn's own drain limit comes a little after ours, so requests cut off by the drain get
    # their 503 from the service, not a cancelled task.
    uconfig = uvicorn.Config(app, log_level=log_level, access_log=access_log, server_header=False,
                             timeout_graceful_shutdown=config.drain_timeout + 5,
                             timeout_keep_alive=config.keep_alive_timeout, limit_concurrency=config.max_connections,
                             http=header_timeout_protocol(config.request_timeout))
    logging.getLogger("uvicorn.access").addFilter(RedactFilter())
    server = _draining_server(uconfig, app.state.lifecycle, config.drain_timeout)
    log.info("listening on http://%s:%d (docs at /docs)", host, port)
    server.run(sockets=[sock])
    if not server.started:
        raise SystemExit(1)


def _draining_server(config, lifecycle, drain_timeout: float):
    """A uvicorn.Server that starts the app's drain (``/ready`` 503, the drain deadline) when told to exit."""
    import signal

    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            lifecycle.begin_drain(drain_timeout)
            super().handle_exit(sig, frame)
            if sig == signal.SIGTERM:
                # uvicorn re-raises captured signals after shutdown; a drained SIGTERM should exit 0.
                captured = getattr(self, "_captured_signals", None)
                if isinstance(captured, list):
                    captured[:] = [s for s in captured if s != signal.SIGTERM]

    return Server(config)
