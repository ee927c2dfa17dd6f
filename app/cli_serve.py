"""`pocketlm serve`: local models over an OpenAI-compatible HTTP API (FastAPI on uvicorn, in this process)."""

from __future__ import annotations

import click

from pocketlm.app.serve_settings import DEFAULT_PORT


@click.command()
@click.argument("models", nargs=-1)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on; other than loopback needs --api-key.")
@click.option("--port", type=click.IntRange(0, 65535), default=DEFAULT_PORT, show_default=True)
@click.option("--api-key", envvar="POCKETLM_API_KEY", help="Key clients must send as `Authorization: Bearer KEY` (env POCKETLM_API_KEY).")
@click.option("--idle-unload", type=click.FloatRange(min=1), default=600, show_default=True, help="Seconds unused before a model is unloaded.")
@click.option("--max-queue", type=click.IntRange(min=0), default=8, show_default=True, help="Requests that may wait per model; more get 429.")
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads per model (default: physical cores).")
@click.option("--ctx", "context_length", type=click.IntRange(min=64), help="Context window in tokens.")
def serve(models: tuple[str, ...], host: str, port: int, api_key: str | None, idle_unload: float, max_queue: int,
          threads: int | None, context_length: int | None) -> None:  # fmt: skip
    """Serve MODEL... (and any stored model, loaded on first use) over an OpenAI-compatible API.

    Endpoints: GET /v1/models, POST /v1/chat/completions, POST /v1/completions. Point any OpenAI client at
    http://HOST:PORT/v1.
    """
    from rich.console import Console

    from pocketlm.app.serve_settings import ServeSettings, is_loopback
    from pocketlm.models.errors import PocketError

    console = Console(stderr=True)
    if not api_key and not is_loopback(host):
        raise PocketError(f"Serving on {host} without an API key would let anyone on the network use this machine's models.",
                          "Set --api-key (or POCKETLM_API_KEY), or serve on 127.0.0.1.")  # fmt: skip
    if not is_loopback(host):
        console.print(f"[yellow]Warning:[/] listening on {host}: other machines can reach this server; only the API key keeps them out.")
    settings = ServeSettings(host=host, port=port, api_key=api_key or None, idle_unload_s=idle_unload, max_queue=max_queue,
                             threads=threads, context_length=context_length, models=models)  # fmt: skip
    _run(settings, console)


def _run(settings, console) -> None:  # type: ignore[no-untyped-def]
    try:
        import uvicorn

        from pocketlm.app.serve_app import create_app
    except ImportError as missing:
        from pocketlm.models.errors import PocketError

        raise PocketError(f"Serving needs {missing.name}, which is not installed.", 'Run `pip install "pocketlm[serve]"`.') from None
    from pocketlm.models.locations import database_path
    from pocketlm.models.store import ModelStore

    _require_free_port(settings.host, settings.port)
    store = ModelStore(database_path())
    app = create_app(store, settings)
    for name in settings.models:
        console.print(f"Loading {name}…", highlight=False)
    app.state.pool.load_now(settings.models)
    console.print(f"Serving on http://{settings.host}:{settings.port}/v1 (Ctrl+C stops)")
    try:
        uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning")
    finally:
        store.close()


def _require_free_port(host: str, port: int) -> None:
    """A sentence, before any model loads, when the address cannot be listened on (uvicorn would log and exit)."""
    import socket

    from pocketlm.models.errors import PocketError

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise PocketError(f"{host} is not an address of this machine.", "Give --host 127.0.0.1, 0.0.0.0 or one of its addresses.") from None
    family, kind, protocol, _, address = infos[0]
    with socket.socket(family, kind, protocol) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a port in TIME_WAIT is free
        try:
            probe.bind(address)
        except OSError as error:
            raise PocketError(f"Cannot listen on {host}:{port}: {error.strerror}.", "Pick another --port, or stop what uses it.") from None
