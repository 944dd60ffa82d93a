"""`nvlm-serve`: load an NVLM-D checkpoint once and serve the OpenAI chat API on it.

The order is what makes mistakes cheap: flags are checked, then the port is bound (a port in
use fails at once, exit 6), then the weights load (one log line per shard), then uvicorn
serves on the socket already bound. Errors are one line with the exit code of the table the
three commands share (`nvlm_engine/exit_codes.py`); tracebacks only with --debug. Imports
only click at start-up, so `--help` is instant.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from typing import Any

import click

from nvlm_engine import exit_codes
from nvlm_engine.cli_options import (
    CONTEXT_SETTINGS,
    QuietCommand,
    placement_from_options,
    placement_options,
    version_option,
)

DEFAULT_MAX_BATCH = 16


class ServeError(click.ClickException):
    """One line on stderr and an exit code from the table."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _api_key(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    # click reads an empty environment variable as unset; a secret that failed to load must not turn auth off
    empty = [name for name in ("NVLM_API_KEY", "NVLM_SERVE_API_KEY") if os.environ.get(name) == ""]
    if value is None and empty:
        raise click.BadParameter(f"{empty[0]} is set but empty; unset it to serve without a key", ctx, param)
    if value is not None:
        from .guard import check_api_key

        try:
            check_api_key(value)
        except ValueError as e:
            raise click.BadParameter(str(e), ctx, param) from e
    return value


@click.command(cls=QuietCommand, context_settings={**CONTEXT_SETTINGS, "auto_envvar_prefix": "NVLM_SERVE"})
@version_option()
@click.option("-m", "--model", "model_path", required=True, envvar="NVLM_MODEL",
              help="NVLM-D checkpoint folder or Hugging Face id.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback by default).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535),
              help="Port to bind, before the weights load (0: any free port).")
@click.option("--served-model-name", multiple=True,
              help="Model id clients name (default: the folder name); repeat it for more names (the first is listed).")
@click.option("--api-key", default=None, envvar="NVLM_API_KEY", callback=_api_key,
              help="Require this bearer token on every path but /health (visible ASCII, not empty).")
@click.option("--device-map", default="auto", show_default=True, help="auto, cpu, cuda:0, or cuda:0,cuda:1.")
@click.option("--dtype", default="auto", show_default=True)
@placement_options(batch_aliases=("--max-batch-size",),
                   batch_default_help=f"plan for 1, decode up to {DEFAULT_MAX_BATCH} when memory allows")
@click.option("--max-queue", default=256, show_default=True, type=int)
@click.option("--max-tiles", default=6, show_default=True, type=click.IntRange(1, 12))
@click.option("--max-images", default=8, show_default=True, type=int)
@click.option("--max-body-mb", default=32, show_default=True, type=int)
@click.option("--request-timeout", default=600.0, show_default=True, type=float,
              help="Seconds before a request is cancelled.")
@click.option("--grammar-timeout", default=5.0, show_default=True, type=click.FloatRange(min=0.001),
              help="Seconds a tools / response_format grammar may compile; past it: 400 grammar_too_complex.")
@click.option("--shutdown-timeout", default=30.0, show_default=True, type=click.FloatRange(min=0),
              help="Seconds in-flight requests get to finish after SIGTERM; then they are cancelled.")
@click.option("--allow-image-urls/--no-image-urls", default=False, show_default=True,
              help="Fetch http(s) image URLs (off: data URLs only).")
@click.option("--allowed-image-host", "allowed_hosts", multiple=True,
              help="Host allowed for image URLs (repeatable; '.example.com' allows subdomains).")
@click.option("--allow-private-image-hosts/--no-private-image-hosts", default=False, show_default=True,
              help="Let image URLs and their redirects reach loopback, private and link-local addresses "
                   "(off: public addresses only, plus IP literals given with --allowed-image-host).")
@click.option("--image-fetch-timeout", default=10.0, show_default=True, type=click.FloatRange(min=0.1),
              help="Seconds for all of one request's image fetches together.")
@click.option("--image-fetch-workers", default=8, show_default=True, type=click.IntRange(1, 256),
              help="Threads fetching image URLs, shared by all requests (busy until the deadline: 503).")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"], case_sensitive=False))
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def main(model_path: str, host: str, port: int, served_model_name: tuple[str, ...], api_key: str | None,
         device_map: str, dtype: str, max_queue: int, max_tiles: int, max_images: int, max_body_mb: int,
         request_timeout: float, grammar_timeout: float, shutdown_timeout: float, allow_image_urls: bool,
         allowed_hosts: tuple[str, ...], allow_private_image_hosts: bool, image_fetch_timeout: float,
         image_fetch_workers: int, log_level: str, debug: bool, **placement_flags: Any) -> None:
    """Serve NVLM-D at http://HOST:PORT/v1/chat/completions (OpenAI format)."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    placement = placement_from_options(placement_flags)
    arguments = placement.arguments([d.strip() for d in device_map.split(",")] if "," in device_map else device_map)
    listener = bind(host, port)
    try:
        from nvlm_engine import NVLMEngine

        engine = NVLMEngine.from_pretrained(model_path, dtype=dtype, max_tiles=max_tiles, progress="log",
                                            **_given(arguments, batch_size=placement.max_batch or 1))
    except click.ClickException:
        listener.close()
        raise
    except Exception as e:
        listener.close()
        if debug:
            raise
        raise ServeError(_one_line(e), exit_codes.code_for(e)) from e
    from .app import ServerSettings, create_app
    from .convert import ServerImagePolicy

    settings = ServerSettings(
        model_name=served_model_name[0] if served_model_name else engine.name,
        model_aliases=tuple(served_model_name[1:]), api_key=api_key, max_body_bytes=max_body_mb * 2**20,
        max_tiles=max_tiles, request_timeout_s=request_timeout, max_batch_size=placement.max_batch or DEFAULT_MAX_BATCH,
        max_queue=max_queue, grammar_timeout_s=grammar_timeout,
        images=ServerImagePolicy(allow_url_fetch=allow_image_urls,
                                 allowed_hosts=tuple(h.lower() for h in allowed_hosts),
                                 max_images=max_images, allow_private_addresses=allow_private_image_hosts,
                                 fetch_timeout_s=image_fetch_timeout, fetch_workers=image_fetch_workers),
    )
    import uvicorn

    bound_host, bound_port = listener.getsockname()[:2]
    logging.getLogger(__name__).info("serving %s on http://%s:%s/v1", settings.model_name, bound_host, bound_port)
    # past the grace period uvicorn cancels the request tasks; the app's shutdown then stops the scheduler
    config = uvicorn.Config(create_app(engine, settings), host=host, port=bound_port, log_level=log_level.lower(),
                            timeout_graceful_shutdown=shutdown_timeout)
    try:
        uvicorn.Server(config).run(sockets=[listener])
    finally:
        engine.close()  # tensor-parallel workers stop with the server


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, before anything slow happens; handed to uvicorn later.

    Raises:
        ServeError: the address is in use, not allowed, or not this machine's (exit NETWORK).
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise ServeError(f"--host {host!r} is not an address of this machine ({e.strerror}); use 127.0.0.1 or 0.0.0.0",
                         exit_codes.NETWORK) from e
    listener = socket.socket(family, kind, proto)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart need not wait for TIME_WAIT
        listener.bind(address)
        listener.listen(2048)
    except OSError as e:
        listener.close()
        reason = {errno.EADDRINUSE: "is in use; stop what listens there or pass --port N",
                  errno.EACCES: "needs privileges; pass --port 1024 or above",
                  errno.EADDRNOTAVAIL: "is not an address of this machine; use 127.0.0.1 or 0.0.0.0"}.get(
                      e.errno or 0, f"cannot be bound ({e.strerror})")
        raise ServeError(f"{host}:{port} {reason}", exit_codes.NETWORK) from e
    return listener


def _given(arguments: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    """from_pretrained's placement arguments, leaving out download/revision when not asked for."""
    merged = {**arguments, **overrides}
    return {k: v for k, v in merged.items() if k not in ("download", "revision") or v}


def _one_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    if exit_codes.code_for(error) == exit_codes.FAILURE:
        text = f"{type(error).__name__}: {text} (unexpected: rerun with --debug and report it)"
    return text.splitlines()[0]


if __name__ == "__main__":
    main()
