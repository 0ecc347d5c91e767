"""``facesearch serve``: the search engine as an HTTP service (see :mod:`engine.service`)."""

from __future__ import annotations

import os
from pathlib import Path

import click

from engine.cli._app import DEVICE_OPTION, SCREEN_OPTION, main, user_errors
from engine.search import SearchEngine
from engine.service import MAX_BYTES, create_app


@main.command("serve")
@click.option("--index", "index_dir", type=click.Path(path_type=Path, file_okay=False, exists=True), required=True)
@click.option("--checkpoint", type=click.Path(path_type=Path, dir_okay=False, exists=True),
              help="The index's model: enables POST /search/image.")  # fmt: skip
@click.option("--host", default="127.0.0.1", show_default=True, help="Bind address (0.0.0.0 exposes it).")
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--token-env", default="FACESEARCH_TOKEN", show_default=True,
              help="Environment variable holding the bearer token; unset = no authentication.")  # fmt: skip
@click.option("--max-bytes", type=int, default=MAX_BYTES, show_default=True, help="Request size limit.")
@click.option("--max-k", type=int, default=1000, show_default=True, help="Largest k a request may ask for.")
@click.option("--detector-pad", type=int, default=0, show_default=True, help="Black border before detection.")
@SCREEN_OPTION
@DEVICE_OPTION
@user_errors
def serve_command(index_dir: Path, checkpoint: Path | None, host: str, port: int, token_env: str, max_bytes: int,
                  max_k: int, detector_pad: int, screen: str, device: str) -> None:  # fmt: skip
    """Serve rank-k identification over HTTP: /health, POST /search/embedding, POST /search/image, /docs.

    Posted embeddings are L2-normalised as the gallery's are (scores and thresholds are cosines); a row with NaN or
    infinite values, or all zeros, is answered 422 with a message naming the row."""
    import uvicorn

    engine = SearchEngine.open(index_dir, checkpoint=checkpoint, device=device, screen=screen)
    token = os.environ.get(token_env) or None
    app = create_app(engine, token=token, max_bytes=max_bytes, max_k=max_k, detector_pad=detector_pad)
    auth = f"bearer token from ${token_env}" if token else "no authentication"
    click.echo(f"serving {index_dir} ({engine.loaded.info.nb:,} faces) on http://{host}:{port} ({auth}); docs at /docs")
    uvicorn.run(app, host=host, port=port, log_level="warning")
