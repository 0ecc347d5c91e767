"""``facesearch serve``: the search engine as an HTTP service (see :mod:`facesearch.engine.service`)."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import click

from facesearch.cli._app import DEVICE_OPTION, SCREEN_OPTION, config_option, default_of, user_errors
from facesearch.engine.search import SearchEngine
from facesearch.engine.service import create_app, listening_socket, serve
from facesearch.engine.service_limits import ServiceLimits

_limit = functools.partial(config_option, ServiceLimits)
_POSITIVE = click.IntRange(min=1)


@click.command("serve")
@click.option("--index", "index_dir", type=click.Path(path_type=Path, file_okay=False, exists=True), required=True)
@click.option("--checkpoint", type=click.Path(path_type=Path, dir_okay=False, exists=True),
              help="The index's model: enables POST /search/image.")  # fmt: skip
@click.option("--attributes-from", type=click.Path(path_type=Path, dir_okay=False, exists=True), default=None,
              help="The predictor that filled the index's attributes, if not at its recorded path.")  # fmt: skip
@click.option("--host", default="127.0.0.1", show_default=True, help="Bind address (0.0.0.0 exposes it).")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True, help="TCP port.")
@click.option("--token-env", default="FACESEARCH_TOKEN", show_default=True,
              help="Environment variable holding the bearer token; unset = no authentication.")  # fmt: skip
@click.option("--public-docs", is_flag=True, help="Serve /docs, /redoc and /openapi.json without the token.")
@_limit("--max-bytes", type=_POSITIVE, help="Request body limit.")
@_limit("--max-k", type=_POSITIVE, help="Largest k a request may ask for.")
@_limit("--max-rows", type=_POSITIVE, help="Query rows per request.")
@_limit("--max-hits", type=_POSITIVE, help="Largest k x rows of a request.")
@_limit("--max-filter-chars", type=_POSITIVE, help="Longest filter expression.")
@_limit("--max-filter-terms", type=_POSITIVE,
        help="Most terms in a filter (names, values, operators; each 'in (...)' item counts).")  # fmt: skip
@_limit("--max-pixels", type=_POSITIVE,
        help="Largest query image, read from its header before decoding (16-bit, alpha: fewer).")  # fmt: skip
@_limit("--queue-size", type=_POSITIVE,
        help="Requests that may wait for the search thread or the model; more get 503.")  # fmt: skip
@_limit("--time-budget", type=click.FloatRange(min=0, min_open=True), help="Seconds: a search estimated above it is "
        "refused (503), one that waits longer for its turn is answered 504.")  # fmt: skip
@click.option("--detector-pad", type=click.IntRange(min=0), default=default_of(create_app, "detector_pad"),
              show_default=True, help="Black border before detection.")  # fmt: skip
@SCREEN_OPTION
@DEVICE_OPTION
@user_errors
def serve_command(index_dir: Path, checkpoint: Path | None, attributes_from: Path | None, host: str, port: int,
                  token_env: str, public_docs: bool,
                  detector_pad: int, screen: str, device: str, **limits: int | float) -> None:  # fmt: skip
    """Serve rank-k identification over HTTP: /health, POST /search/embedding, POST /search/image, /docs.

    Posted embeddings are L2-normalised as the gallery's are (scores and thresholds are cosines); a row with NaN or
    infinite values, or all zeros, is answered 422 with a message naming the row.  Every limit is shown in /health."""
    service_limits = ServiceLimits(**limits)  # type: ignore[arg-type]
    try:
        sock = listening_socket(host, port)  # before the index loads: a bad address fails at once
    except OSError as e:
        raise click.ClickException(str(e)) from e
    with sock:
        try:
            engine = SearchEngine.open(
                index_dir, checkpoint=checkpoint, device=device, screen=screen, attributes_from=attributes_from
            )
        except (OSError, RuntimeError) as e:
            raise click.ClickException(f"cannot read the index {index_dir}: {e}") from e
        token = os.environ.get(token_env) or None
        app = create_app(engine, token=token, detector_pad=detector_pad, limits=service_limits,
                         public_docs=public_docs)  # fmt: skip
        auth = f"bearer token from ${token_env}" if token else "no authentication"
        docs = "docs at /docs" if public_docs or not token else "docs at /docs (token needed)"
        images = " image queries UNAVAILABLE (see the warning);" if app.state.service.images_problem else ""
        click.echo(f"serving {index_dir} ({engine.loaded.info.nb:,} faces) on http://{host}:{port} ({auth});"
                   f"{images} {docs}")  # fmt: skip
        serve(app, sock)
