"""`nvlm-serve`: load an NVLM-D checkpoint once and serve the OpenAI chat API on it."""

from __future__ import annotations

import logging
import os

import click

from nvlm_engine import NVLMEngine, NVLMError

from .app import ServerSettings, create_app
from .convert import ServerImagePolicy
from .guard import check_api_key


def _api_key(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    # click reads an empty environment variable as unset; a secret that failed to load must not turn auth off
    empty = [name for name in ("NVLM_API_KEY", "NVLM_SERVE_API_KEY") if os.environ.get(name) == ""]
    if value is None and empty:
        raise click.BadParameter(f"{empty[0]} is set but empty; unset it to serve without a key", ctx, param)
    if value is not None:
        try:
            check_api_key(value)
        except ValueError as e:
            raise click.BadParameter(str(e), ctx, param) from e
    return value


@click.command(context_settings={"help_option_names": ["-h", "--help"], "auto_envvar_prefix": "NVLM_SERVE"})
@click.option("-m", "--model", "model_path", required=True, envvar="NVLM_MODEL", help="NVLM-D checkpoint folder.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback by default).")
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--served-model-name", multiple=True,
              help="Model id clients name (default: the folder name); repeat it for more names (the first is listed).")
@click.option("--api-key", default=None, envvar="NVLM_API_KEY", callback=_api_key,
              help="Require this bearer token on every path but /health (visible ASCII, not empty).")
@click.option("--device-map", default="auto", show_default=True)
@click.option("--dtype", default="auto", show_default=True)
@click.option("--max-batch-size", default=16, show_default=True, type=int)
@click.option("--max-queue", default=256, show_default=True, type=int)
@click.option("--max-tiles", default=6, show_default=True, type=click.IntRange(1, 12))
@click.option("--max-images", default=8, show_default=True, type=int)
@click.option("--max-body-mb", default=32, show_default=True, type=int)
@click.option("--request-timeout", default=600.0, show_default=True, type=float, help="Seconds before a request is cancelled.")
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
@click.option("--log-level", default="info", show_default=True)
def main(model_path: str, host: str, port: int, served_model_name: tuple[str, ...], api_key: str | None, device_map: str,
         dtype: str, max_batch_size: int, max_queue: int, max_tiles: int, max_images: int, max_body_mb: int,
         request_timeout: float, grammar_timeout: float, shutdown_timeout: float, allow_image_urls: bool,
         allowed_hosts: tuple[str, ...],
         allow_private_image_hosts: bool, image_fetch_timeout: float, image_fetch_workers: int, log_level: str) -> None:
    """Serve NVLM-D at http://HOST:PORT/v1/chat/completions (OpenAI format)."""
    import uvicorn

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        engine = NVLMEngine.from_pretrained(model_path, device_map=device_map, dtype=dtype, max_tiles=max_tiles)
    except NVLMError as e:
        raise click.ClickException(str(e)) from e
    settings = ServerSettings(
        model_name=served_model_name[0] if served_model_name else engine.name,
        model_aliases=tuple(served_model_name[1:]), api_key=api_key, max_body_bytes=max_body_mb * 2**20,
        max_tiles=max_tiles, request_timeout_s=request_timeout, max_batch_size=max_batch_size, max_queue=max_queue,
        grammar_timeout_s=grammar_timeout,
        images=ServerImagePolicy(allow_url_fetch=allow_image_urls, allowed_hosts=tuple(h.lower() for h in allowed_hosts),
                                 max_images=max_images, allow_private_addresses=allow_private_image_hosts,
                                 fetch_timeout_s=image_fetch_timeout, fetch_workers=image_fetch_workers),
    )
    # past the grace period uvicorn cancels the request tasks; the app's shutdown then stops the scheduler
    uvicorn.run(create_app(engine, settings), host=host, port=port, log_level=log_level.lower(),
                timeout_graceful_shutdown=shutdown_timeout)


if __name__ == "__main__":
    main()
