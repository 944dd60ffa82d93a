"""`nvlm-serve`: load an NVLM-D checkpoint once and serve the OpenAI chat API on it."""

from __future__ import annotations

import logging

import click

from nvlm_engine import NVLMEngine, NVLMError

from .app import ServerSettings, create_app
from .convert import ImagePolicy


@click.command(context_settings={"help_option_names": ["-h", "--help"], "auto_envvar_prefix": "NVLM_SERVE"})
@click.option("-m", "--model", "model_path", required=True, envvar="NVLM_MODEL", help="NVLM-D checkpoint folder.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback by default).")
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--served-model-name", default=None, help="Model id shown to clients (default: the folder name).")
@click.option("--api-key", default=None, envvar="NVLM_API_KEY", help="Require this bearer token on /v1 and /metrics.")
@click.option("--device-map", default="auto", show_default=True)
@click.option("--dtype", default="auto", show_default=True)
@click.option("--max-batch-size", default=16, show_default=True, type=int)
@click.option("--max-queue", default=256, show_default=True, type=int)
@click.option("--max-tiles", default=6, show_default=True, type=click.IntRange(1, 12))
@click.option("--max-images", default=8, show_default=True, type=int)
@click.option("--max-body-mb", default=32, show_default=True, type=int)
@click.option("--request-timeout", default=600.0, show_default=True, type=float, help="Seconds before a request is cancelled.")
@click.option("--allow-image-urls/--no-image-urls", default=False, show_default=True,
              help="Fetch http(s) image URLs (off: data URLs only).")
@click.option("--allowed-image-host", "allowed_hosts", multiple=True,
              help="Host allowed for image URLs (repeatable; '.example.com' allows subdomains).")
@click.option("--log-level", default="info", show_default=True)
def main(model_path: str, host: str, port: int, served_model_name: str | None, api_key: str | None, device_map: str,
         dtype: str, max_batch_size: int, max_queue: int, max_tiles: int, max_images: int, max_body_mb: int,
         request_timeout: float, allow_image_urls: bool, allowed_hosts: tuple[str, ...], log_level: str) -> None:
    """Serve NVLM-D at http://HOST:PORT/v1/chat/completions (OpenAI format)."""
    import uvicorn

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        engine = NVLMEngine.from_pretrained(model_path, device_map=device_map, dtype=dtype, max_tiles=max_tiles)
    except NVLMError as e:
        raise click.ClickException(str(e)) from e
    settings = ServerSettings(
        model_name=served_model_name or engine.name, api_key=api_key, max_body_bytes=max_body_mb * 2**20,
        max_tiles=max_tiles, request_timeout_s=request_timeout, max_batch_size=max_batch_size, max_queue=max_queue,
        images=ImagePolicy(allow_url_fetch=allow_image_urls, allowed_hosts=tuple(h.lower() for h in allowed_hosts),
                           max_images=max_images),
    )
    uvicorn.run(create_app(engine, settings), host=host, port=port, log_level=log_level.lower())


if __name__ == "__main__":
    main()
