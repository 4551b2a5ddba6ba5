"""The commands that run an export: one request (`run`), OpenAI's API and the web demo (`serve`),
a terminal chat, and the app bundle (`bundle`, `verify`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import click

from .. import bounds
from ..cli_types import EXISTING_DIR, Bounded, Utf8Text, WeightedPath
from ..errors import OdloraError
from ..formats.adapter_ids import BASE, adapter_id_from, check_adapter_id
from .app import cli
from .options import (asks_chat, backend_option, chat_option, export_option, json_option, named_adapters_option,
                      sampling_options, write_stdout)


def open_runtime(export_dir: Path, backend: Optional[str]):
    """A Runtime on an export directory, or on a bundle with its adapters registered by id."""
    from ..runtime import Runtime
    from ..runtime.bundle import BUNDLE_MANIFEST

    if (Path(export_dir) / BUNDLE_MANIFEST).exists():
        return Runtime.open_bundle(export_dir, backend=backend)
    return Runtime.open(export_dir, backend=backend)


def register_blobs(rt, specs) -> list[str]:
    """Register packed blobs given as `FILE` or `ID=FILE` with a Runtime; returns their ids in order.

    Without ID a blob's id is its file's stem, made unique ("a", "a-2"); the same file named twice
    keeps one id, so `run --adapter a.blob --adapter a.blob:0.5` blends one adapter with itself.
    Every id follows formats/adapter_ids.py.
    """
    registered: dict[str, Path] = {}  # id -> resolved blob
    ids = []
    for spec in specs:
        name, path = split_id(spec)
        blob = Path(path).resolve()
        if name is None:
            same = [i for i, b in registered.items() if b == blob]
            name = same[0] if same else unique_id(adapter_id_from(path), registered)
        elif registered.get(name, blob) != blob:
            raise OdloraError(f"adapter id {name!r} names two files")
        if name not in registered:
            rt.register_adapter(checked_id(name), blob)
            registered[name] = blob
        ids.append(name)
    return ids


def split_id(spec: str) -> tuple[Optional[str], str]:
    """`ID=FILE` -> (ID, FILE); `FILE` (even one with "=" in its name) -> (None, FILE)."""
    name, sep, path = spec.partition("=")
    if sep and name and not Path(spec).exists():
        return name, path
    return None, spec


def unique_id(stem: str, taken) -> str:
    name, n = stem, 1
    while name in taken or name == BASE:
        n += 1
        name = f"{stem}-{n}"
    return name


def checked_id(name: str) -> str:
    """An adapter id from the command line; a bad one gets the rule and how to give another."""
    try:
        return check_adapter_id(name)
    except OdloraError as e:
        raise OdloraError(f"{e}; give another with --adapter ID=FILE") from None


# -- runtime ----------------------------------------------------------------------------------

@cli.command("run")
@export_option
@click.option("--adapter", "adapters", multiple=True, metavar="FILE[:WEIGHT]", type=WeightedPath(),
              help="Packed adapter blob (`odlora adapter pack`), optionally with a weight; repeat to blend several.")
@click.option("--prompt", required=True, type=Utf8Text(), help="The user's text.")
@backend_option
@sampling_options
@chat_option
@json_option
def run_cmd(export_dir, adapters, prompt, backend, chat, as_json, sampling):
    """Run one request on an exported base with packed adapters; prints the completion, streamed."""
    rt = open_runtime(export_dir, backend)
    ids = register_blobs(rt, [path for path, _ in adapters])
    blend = [(name, weight) for name, (_, weight) in zip(ids, adapters)] or None
    use_chat = asks_chat(rt.prompt_format(blend), chat, " + ".join(ids) or "base")
    result = rt.generate(prompt, adapter=blend, sampling=sampling, on_text=write_stdout, chat=use_chat)
    sys.stdout.write("\n")
    if as_json:
        click.echo(json.dumps({"text": result.text, "adapter": result.adapter, "tokens": len(result.token_ids),
                               "seconds": round(result.seconds, 4)}))


@cli.command()
@export_option
@named_adapters_option
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; the loopback default keeps the server to this machine. Listening "
                   "elsewhere, set --api-key.")
@click.option("--port", default=8000, show_default=True, type=Bounded(bounds.PORT),
              help="TCP port (0: any free port).")
@click.option("--allow-host", "allow_hosts", multiple=True, metavar="NAME",
              help="Also answer requests whose Host header names NAME (any port), e.g. this machine's name on the "
                   "network; repeatable. Loopback names and the --host address are always answered.")
@click.option("--api-key", envvar="ODLORA_API_KEY", default=None, metavar="KEY",
              help="Require `Authorization: Bearer KEY` on every route (default: env ODLORA_API_KEY, which, unlike "
                   "the flag, other users' `ps` cannot see; none: no key). The web page: open /?key=KEY once.")
@click.option("--cors-origin", "cors_origins", multiple=True, metavar="SITE",
              help="Let pages of SITE (http(s)://host[:port], or * for any site) call this server from a browser "
                   "and read its answers (CORS); repeatable. Off by default: other sites' requests get a 403.")
@click.option("--work", "work_dir", default=Path("odlora-web"), show_default=True, type=click.Path(path_type=Path),
              help="Where the web demo's personalisation jobs write adapters, packed blobs and uploads.")
@backend_option
def serve(export_dir, adapters, host, port, allow_hosts, api_key, cors_origins, work_dir, backend):
    """Serve an export over HTTP with OpenAI's API, each request choosing its adapter, and a web demo.

    \b
    GET  /v1/models[/{id}]       base and each --adapter id
    POST /v1/chat/completions    {"model", "messages", ...}, asked as each adapter was trained (chat template or raw)
    POST /v1/completions         {"model", "prompt", ...}, raw text or token ids
    GET  /                       the web demo: chat with several models side by side, personalise

    A request's `model` is `base`, an adapter id or a blend `a:0.7+b:0.3`; it honours OpenAI's
    sampling fields (max_tokens, temperature, top_p, seed, stop, penalties, logit_bias, n),
    logprobs, response_format (JSON, or JSON matching a schema, guaranteed by constrained decoding)
    and stream (server-sent events), plus top_k; any other field is a 400 naming it. Absent fields
    take odlora's defaults (greedy, 128 tokens). Requests from another Host or Origin are refused
    (403; see --allow-host, --cors-origin). The page's
    personalisation jobs train on files of this machine, write under --work, and add each new
    adapter to the served models. Stop with Ctrl-C.
    """
    from ..runtime.access import Access
    from ..runtime.server import build_server, model_ids
    from ..web.app import WebApp

    access = Access.build(host, allow_hosts, api_key, cors_origins)  # a bad flag fails before the export loads
    rt = open_runtime(export_dir, backend)
    register_blobs(rt, adapters)
    webapp = WebApp(rt, work_dir)
    for line in webapp.reloaded:
        click.echo(f"odlora serve: {line}")
    server = build_server(rt, host, port, webapp=webapp, access=access, access_log=True)
    click.echo(f"odlora serve: listening on {server.url} (models: {', '.join(model_ids(rt))})")
    click.echo(f"odlora serve: web demo on {server.root}/")
    if api_key is not None:
        click.echo(f"odlora serve: every route needs the API key (Authorization: Bearer KEY); open "
                   f"{server.root}/?key=KEY once to use the page")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        click.echo("odlora serve: stopped", err=True)
    finally:
        server.server_close()


@cli.command("chat")
@export_option
@named_adapters_option
@backend_option
@sampling_options
def chat_cmd(export_dir, adapters, backend, sampling):
    """Chat with an export in the terminal: answers streamed, the conversation kept, adapters swapped.

    \b
    Answers with the first --adapter (none: the base). Type a message, or:
      /adapter ID   answer with ID from now on (`base`: no adapter; a blend: a:0.7+b:0.3)
      /adapters     list the adapters
      /reset        forget the conversation
      /quit         leave (so does end of input, Ctrl-D)
    Ctrl-C stops an answer; on a terminal, lines can be edited and recalled (arrow keys, Ctrl-R).
    When the conversation outgrows the export's --max-seq-len, its oldest turns are dropped.
    """
    from ..runtime.chat import TerminalInput, run_chat

    rt = open_runtime(export_dir, backend)
    ids = register_blobs(rt, adapters)
    inp = TerminalInput() if sys.stdin.isatty() else sys.stdin.buffer  # bytes: run_chat decodes them
    run_chat(rt, inp, sys.stdout, sampling, ids[0] if ids else "base")


@cli.command("bundle")
@export_option
@named_adapters_option
@click.option("--out", required=True, type=click.Path(path_type=Path), help="The bundle directory to write.")
@click.option("--no-base", is_flag=True, help="Bundle the adapters alone, to be downloaded later onto an installed base bundle.")
@click.option("--force", is_flag=True, help="Replace --out if it exists (only once the new bundle is complete).")
@json_option
def bundle_cmd(export_dir, adapters, out, no_base, force, as_json):
    """Write what an app ships: the exported base, tokenizer, prompt format and packed adapters,
    with a manifest (format version, base fingerprint, slot spec, sha256 and size of every file).

    \b
    --adapter [ID=]FILE   a packed blob for this export (id: the file's stem); repeatable
    --no-base             an adapter bundle, checked against the app's base bundle when opened
    Open one with `odlora run/serve/chat --export BUNDLE`, or check it with `odlora verify`.
    """
    from ..runtime.bundle import write_bundle

    pairs = [split_id(spec) for spec in adapters]
    named = [(checked_id(name or adapter_id_from(path)), Path(path)) for name, path in pairs]
    manifest = write_bundle(export_dir, named, out, with_base=not no_base, force=force)
    size = sum(f["size"] for f in manifest["files"].values())
    summary = {"bundle": str(out), "kind": manifest["kind"], "target": manifest["target"],
               "adapters": [a["id"] for a in manifest["adapters"]], "files": len(manifest["files"]), "bytes": size}
    click.echo(f"wrote {manifest['kind']} bundle {out}: {len(manifest['files'])} files, {size / 2**20:.1f} MiB, "
               f"adapters: {', '.join(summary['adapters']) or 'none'}")
    if as_json:
        click.echo(json.dumps(summary))


@cli.command("verify")
@click.argument("bundle_dir", metavar="BUNDLE", type=EXISTING_DIR)
@click.option("--base", "base_bundle", default=None, type=EXISTING_DIR,
              help="The installed base bundle an adapter bundle must match.")
@json_option
def verify_cmd(bundle_dir, base_bundle, as_json):
    """Check a bundle: format version, paths, every file's sha256, and the base it was made for."""
    from ..runtime.bundle import open_bundle

    base = open_bundle(base_bundle) if base_bundle else None
    bundle = open_bundle(bundle_dir, base=base)
    m = bundle.manifest
    click.echo(f"{bundle_dir}: ok ({m['kind']} bundle, {m['target']}, {len(m['files'])} files verified, "
               f"adapters: {', '.join(a['id'] for a in m['adapters']) or 'none'})")
    if as_json:
        click.echo(json.dumps({"bundle": str(bundle_dir), "ok": True, "kind": m["kind"], "target": m["target"],
                               "adapters": [a["id"] for a in m["adapters"]]}))
