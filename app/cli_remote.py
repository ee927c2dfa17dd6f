"""`pocketlm remote add|ls|rm`: OpenAI-compatible endpoints, named like models in chat, run and bench."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from pocketlm.models.remote_endpoints import RemoteEndpoints


def _endpoints() -> RemoteEndpoints:
    from pocketlm.models.locations import database_path
    from pocketlm.models.remote_endpoints import RemoteEndpoints

    return RemoteEndpoints(database_path())


@click.group()
def remote() -> None:
    """Remote OpenAI-compatible servers (vLLM, TGI, llama-server, Ollama, pocketlm serve).

    Once added, `NAME` (or `NAME/MODEL` where it serves several) works in chat, run and bench like a local model.
    """


@remote.command()
@click.argument("name")
@click.argument("url")
@click.option("--api-key-env", metavar="VAR", default="", help="Environment variable holding the server's API key (the key itself is never stored).")
def add(name: str, url: str, api_key_env: str) -> None:
    """Add the server at URL (e.g. http://gpu-box:8000/v1) as NAME, after checking it answers /v1/models."""
    from pocketlm.backends.remote import list_remote_models
    from pocketlm.models.errors import PocketError
    from pocketlm.models.remote_endpoints import RemoteEndpoint, check_endpoint_name, check_env_var_name, normalised_base_url

    check_endpoint_name(name)
    if api_key_env:
        check_env_var_name(api_key_env)
    endpoint = RemoteEndpoint(name, normalised_base_url(url), api_key_env)
    if api_key_env and endpoint.api_key() is None:
        raise PocketError(f"{api_key_env} is not set, so there is no key to send to {endpoint.base_url}.", f"Set it first: export {api_key_env}=...")
    served = list_remote_models(endpoint)  # a sentence when unreachable or the key is refused; nothing is saved then
    endpoints = _endpoints()
    endpoints.add(endpoint)
    ids = ", ".join(model.id for model in served) or "no models yet"
    click.echo(f"Added {name} ({endpoint.base_url}): {ids}.")
    if len(served) == 1:
        click.echo(f"Chat with it: pocketlm chat {name}")
    elif served:
        click.echo(f"Chat with one: pocketlm chat {name}/{served[0].id}")


@remote.command(name="ls")
@click.argument("name", required=False)
def list_endpoints(name: str | None) -> None:
    """List the endpoints; with NAME, the models that endpoint serves now."""
    from pocketlm.backends.remote import list_remote_models

    endpoints = _endpoints()
    if name is not None:
        endpoint = endpoints.require(name)
        for model in list_remote_models(endpoint):
            context = f"  (context {model.context_length})" if model.context_length else ""
            click.echo(f"{name}/{model.id}{context}")
        return
    listed = endpoints.list()
    if not listed:
        click.echo("No remote endpoints yet: add one with `pocketlm remote add NAME URL`.")
    for endpoint in listed:
        key = f"key from ${endpoint.api_key_env}" if endpoint.api_key_env else "no key"
        click.echo(f"{endpoint.name:<16} {endpoint.base_url}  ({key})")


@remote.command()
@click.argument("name")
def rm(name: str) -> None:
    """Forget the endpoint NAME (the server itself is untouched)."""
    _endpoints().remove(name)
    click.echo(f"Removed {name}.")
