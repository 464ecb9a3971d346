"""Remote store commands: push, pull, store ls/stats/gc/rm, key generate.

Also the helpers with which ``checkpoint --store URL`` and ``restore URL``
go through a remote store (checkpoint then push; restore while the snapshot
streams in, or with ``--no-stream`` pull then restore).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.progress import Progress as RichProgress
from rich.table import Table

from warmstart.cli.app import app
from warmstart.cli.commands import JsonOpt, StoreOpt, open_store
from warmstart.cli.output import console, emit_json, err_console, human_bytes
from warmstart.errors import EnvironmentProblem, NotFoundError, UsageError
from warmstart.store.local import DEFAULT_ROOT, STORE_ENV, LocalStore

store_app = typer.Typer(help="Inspect and maintain remote snapshot stores.", no_args_is_help=True)
key_app = typer.Typer(help="Signing keys for snapshots.", no_args_is_help=True)
app.add_typer(store_app, name="store")
app.add_typer(key_app, name="key")

JobsOpt = Annotated[int, typer.Option("--jobs", "-j", min=1, max=256, help="Parallel transfers.")]
RateOpt = Annotated[
    Optional[float], typer.Option("--limit-rate", min=0.001, help="Bandwidth limit in MB/s.")
]
SignOpt = Annotated[
    Optional[Path], typer.Option("--sign", help="Sign the index with this private key (NAME.key).")
]
TrustOpt = Annotated[
    list[Path],
    typer.Option(
        "--trusted-keys",
        help="Public keys (.pub files or directories) to trust; default $WARMSTART_TRUSTED_KEYS "
        "or /etc/warmstart/trusted-keys.",
    ),
]
RequireOpt = Annotated[
    bool, typer.Option("--require-signed", help="Refuse unsigned snapshots even with no keys configured.")
]


def is_url(value: str | None) -> bool:
    return bool(value) and "://" in str(value)


def split_snapshot_url(url: str) -> tuple[str, str]:
    """``s3://bucket/prefix/NAME`` -> (``s3://bucket/prefix``, ``NAME``)."""
    base, sep, name = url.rstrip("/").rpartition("/")
    if not sep or not name or base.endswith((":/", ":")):
        raise UsageError(
            f"{url!r} names no snapshot", hint="write STORE_URL/NAME, e.g. s3://bucket/snapshots/qwen"
        )
    return base, name


def check_push_target(store: str | None, sign: Path | None) -> None:
    """Fail before a checkpoint freezes anything if its push could not happen."""
    if sign is None:
        return
    if not is_url(store):
        raise UsageError("--sign needs --store URL (a remote store to push to)", hint="or sign at `warmstart push`")
    from warmstart.store.signing import SigningKey

    SigningKey.load(sign)


def working_store(value: str | None) -> LocalStore:
    """The local store that checkpoint/restore use when --store names a remote URL."""
    import os

    env = os.environ.get(STORE_ENV)
    if value and not is_url(value):
        return LocalStore(value)
    return LocalStore(env if env and not is_url(env) else DEFAULT_ROOT)


class BarProgress:
    """A rich progress bar on stderr (only on a terminal, and not with --json)."""

    def __init__(self, bar: RichProgress | None) -> None:
        self.bar = bar
        self.task: Any = None

    def start(self, total: int, what: str) -> None:
        if self.bar is not None:
            self.task = self.bar.add_task(what, total=total)

    def advance(self, nbytes: int) -> None:
        if self.bar is not None and self.task is not None:
            self.bar.advance(self.task, nbytes)


@contextmanager
def progress_bar(enabled: bool) -> Iterator[BarProgress]:
    if not enabled or not err_console.is_terminal:
        yield BarProgress(None)
        return
    bar = RichProgress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
    )
    with bar:
        yield BarProgress(bar)


def _remote(url: str, jobs: int = 8):  # type: ignore[no-untyped-def]
    try:
        from warmstart.store.remote import RemoteStore
    except ImportError as exc:
        raise EnvironmentProblem(
            f"remote stores need the 'store' extra ({exc.name} is missing)",
            hint="pip install 'warmstart[store]'",
        ) from None
    return RemoteStore.open(url, jobs=jobs)


def _chunk_params(avg_mib: float):  # type: ignore[no-untyped-def]
    from warmstart.store.chunking import ChunkParams

    avg = int(avg_mib * (1 << 20))
    if avg < 4096 or avg & (avg - 1):
        raise UsageError(f"--chunk-size {avg_mib} is not a power of two of at least 4 KiB", hint="try 4")
    return ChunkParams.around(avg)


def _trust(trusted: list[Path], require: bool):  # type: ignore[no-untyped-def]
    from warmstart.store.signing import TrustPolicy

    return TrustPolicy.from_env(trusted or None, require_signed=require)


def _gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9 if seconds > 0 else 0.0


def do_push(
    local: LocalStore,
    name: str,
    url: str,
    *,
    as_name: str | None = None,
    sign: Path | None = None,
    jobs: int = 8,
    chunk_mib: float = 4,
    limit_rate: float | None = None,
    show: bool = True,
) -> Any:
    from warmstart.store.signing import SigningKey

    key = SigningKey.load(sign) if sign else None
    with progress_bar(show) as bar:
        return _remote(url, jobs).push(
            local, name, as_name=as_name, sign=key, params=_chunk_params(chunk_mib), progress=bar,
            limit_rate=limit_rate * 1e6 if limit_rate else None,
        )  # fmt: skip


def do_pull(
    url: str,
    name: str,
    local: LocalStore,
    *,
    as_name: str | None = None,
    trusted: list[Path] | None = None,
    require_signed: bool = False,
    jobs: int = 8,
    limit_rate: float | None = None,
    show: bool = True,
) -> Any:
    trust = _trust(trusted or [], require_signed)
    with progress_bar(show) as bar:
        return _remote(url, jobs).pull(
            name, local, as_name=as_name, trust=trust, progress=bar,
            limit_rate=limit_rate * 1e6 if limit_rate else None,
        )  # fmt: skip


def _already_local(local: LocalStore, name: str, snapshot_id: str) -> bool:
    """Whether ``local`` holds this very snapshot; a different one by that name is refused."""
    try:
        existing = local.manifest(name)
    except NotFoundError:
        return False
    if existing.snapshot_id == snapshot_id:
        return True
    raise UsageError(
        f"a different snapshot {name!r} already exists in {local.root}",
        hint="remove it with `warmstart rm`, or pull under another name with `warmstart pull --as`",
    )


def pull_for_restore(snapshot_url: str, local: LocalStore, *, show: bool) -> str:
    """``restore URL``: check trust, pull into ``local`` unless the same snapshot is there; return its name."""
    url, name = split_snapshot_url(snapshot_url)
    remote = _remote(url)
    index, _decision = remote.open_index(name, _trust([], False))  # the trust check comes first
    if _already_local(local, name, index.snapshot_id):
        return name
    result = do_pull(url, name, local, show=show)
    if show:
        err_console.print(
            f"pulled {name} from {url}: {human_bytes(result.logical_bytes)} in {result.seconds:.2f} s"
        )
    return name


def stream_for_restore(
    snapshot_url: str,
    local: LocalStore,
    request_for: Callable[[Any], Any],
    *,
    listener: Callable[[str], None] | None = None,
) -> Any:
    """``restore URL``, streaming: restore while the page images download (trust check first).

    Returns None when the same snapshot is in ``local`` already (restore that).
    """
    url, name = split_snapshot_url(snapshot_url)
    remote = _remote(url)
    trust = _trust([], False)
    index, _decision = remote.open_index(name, trust)  # refuses before anything is fetched
    if _already_local(local, name, index.snapshot_id):
        return None
    from warmstart.snapshot.streaming import restore_streaming

    return restore_streaming(
        remote, name, local=local, request=request_for, trust=trust, listener=listener
    )


def stream_line(report: dict[str, Any]) -> str:
    """One line on how much of the download the restore overlapped."""
    if not report["overlapped"]:
        return "pulled in full before the restore (no page server for this snapshot)"
    pages, during = report["page_bytes"], report["page_bytes_during_restore"]
    share = during / pages * 100 if pages else 0.0
    return (
        f"streamed: {human_bytes(report['meta_bytes'])} before CRIU started, "
        f"{human_bytes(during)} of {human_bytes(pages)} page images ({share:.0f}%) arrived "
        f"while the restore ran ({report['seconds_fetching_while_restoring']:.2f} s)"
    )


def push_report(r: Any) -> dict[str, Any]:
    out = dataclasses.asdict(r)
    out["gb_per_s"] = _gbps(r.logical_bytes, r.seconds)
    return out


@app.command()
def push(
    name: Annotated[str, typer.Argument(help="Local snapshot name.")],
    url: Annotated[str, typer.Argument(help="Store URL: file:///PATH or s3://BUCKET/PREFIX.")],
    as_name: Annotated[Optional[str], typer.Option("--as", help="Name in the remote store.")] = None,
    sign: SignOpt = None,
    jobs: JobsOpt = 8,
    chunk_mib: Annotated[
        float, typer.Option("--chunk-size", help="Average chunk size in MiB (power of two).")
    ] = 4,
    limit_rate: RateOpt = None,
    store: StoreOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Upload a local snapshot to a remote store (only the chunks it lacks)."""
    r = do_push(
        open_store(store), name, url, as_name=as_name, sign=sign, jobs=jobs, chunk_mib=chunk_mib,
        limit_rate=limit_rate, show=not json_out,
    )  # fmt: skip
    if json_out:
        emit_json(push_report(r))
        return
    if r.already_pushed:
        console.print(f"{r.name} is already in {r.url}")
        return
    console.print(
        f"pushed [bold]{r.name}[/] to {r.url}: {human_bytes(r.logical_bytes)} in {r.chunks} chunks, "
        f"sent {human_bytes(r.uploaded_bytes)} ({r.present_chunks} chunks already there), "
        f"{r.seconds:.2f} s, {_gbps(r.logical_bytes, r.seconds):.2f} GB/s"
        + (f", signed by {r.signed_by}" if r.signed_by else ", unsigned")
    )


@app.command()
def pull(
    url: Annotated[str, typer.Argument(help="Store URL: file:///PATH or s3://BUCKET/PREFIX.")],
    name: Annotated[str, typer.Argument(help="Snapshot name in that store.")],
    as_name: Annotated[Optional[str], typer.Option("--as", help="Local name.")] = None,
    trusted_keys: TrustOpt = [],  # noqa: B006
    require_signed: RequireOpt = False,
    jobs: JobsOpt = 8,
    limit_rate: RateOpt = None,
    store: StoreOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Fetch a snapshot into the local store, verifying its signature and every chunk."""
    r = do_pull(
        url, name, open_store(store), as_name=as_name, trusted=trusted_keys,
        require_signed=require_signed, jobs=jobs, limit_rate=limit_rate, show=not json_out,
    )  # fmt: skip
    if json_out:
        out = dataclasses.asdict(r)
        out["gb_per_s"] = _gbps(r.logical_bytes, r.seconds)
        emit_json(out)
        return
    trust = r.trust
    who = (
        f"signed by trusted key {trust.key_name} ({trust.key_id})"
        if trust and trust.trusted
        else "[yellow]not signature-checked (no trusted keys configured)[/]"
    )
    console.print(
        f"pulled [bold]{r.name}[/] to {r.path}: {human_bytes(r.logical_bytes)}, fetched "
        f"{human_bytes(r.fetched_bytes)}"
        + (f", resumed {human_bytes(r.resumed_bytes)}" if r.resumed_bytes else "")
        + f", {r.seconds:.2f} s; {who}"
    )


@store_app.command("ls")
def store_ls(
    url: Annotated[str, typer.Argument(help="Store URL.")],
    json_out: JsonOpt = False,
) -> None:
    """List the snapshots in a remote store."""
    snaps = _remote(url).snapshots()
    if json_out:
        emit_json([dataclasses.asdict(s) for s in snaps])
        return
    table = Table(title=f"snapshots in {url}", title_justify="left")
    for col in ("name", "pushed", "from", "size", "signed by"):
        table.add_column(col)
    for s in snaps:
        if s.error:
            table.add_row(s.name, "", "", "", f"[red]{s.error}[/]")
            continue
        table.add_row(
            s.name,
            s.pushed_at.strftime("%Y-%m-%d %H:%M:%S") if s.pushed_at else "",
            s.pushed_from or "",
            human_bytes(s.logical_bytes),
            s.signed_by or "unsigned",
        )
    console.print(table)


@store_app.command("stats")
def store_stats(
    url: Annotated[str, typer.Argument(help="Store URL.")],
    json_out: JsonOpt = False,
) -> None:
    """Logical vs stored bytes (deduplication), garbage, pushes in progress."""
    st = _remote(url).stats()
    if json_out:
        emit_json({**dataclasses.asdict(st), "dedup_ratio": st.dedup_ratio})
        return
    console.print(f"[bold]{st.url}[/]: {st.snapshots} snapshots")
    console.print(f"  logical   {human_bytes(st.logical_bytes)}")
    console.print(f"  stored    {human_bytes(st.stored_bytes)} in {st.chunks} chunks")
    console.print(f"  dedup     {st.dedup_ratio:.2f}x (logical / referenced)")
    console.print(
        f"  garbage   {human_bytes(st.unreferenced_bytes)} in {st.unreferenced_chunks} unreferenced chunks"
    )
    if st.pushes_in_progress:
        console.print(f"  {st.pushes_in_progress} push(es) in progress")
    for name in st.broken_snapshots:
        console.print(f"  [red]unreadable index: {name}[/]")


@store_app.command("gc")
def store_gc(
    url: Annotated[str, typer.Argument(help="Store URL.")],
    grace: Annotated[
        float, typer.Option("--grace", min=0, help="Keep unreferenced chunks younger than this (s).")
    ] = 3600.0,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only report what would go.")] = False,
    wait: Annotated[
        float, typer.Option("--wait", min=0, help="Seconds to wait for pushes in progress.")
    ] = 0.0,
    json_out: JsonOpt = False,
) -> None:
    """Delete chunks no snapshot references (safe while others push)."""
    r = _remote(url).gc(grace=grace, dry_run=dry_run, wait=wait)
    if json_out:
        emit_json(dataclasses.asdict(r))
        return
    verb = "would delete" if dry_run else "deleted"
    console.print(
        f"{verb} {r.deleted_chunks} chunks ({human_bytes(r.deleted_bytes)}); "
        f"kept {r.kept_young_chunks} younger than {grace:.0f} s; {r.referenced_chunks} referenced"
    )


@store_app.command("verify")
def store_verify(
    url: Annotated[str, typer.Argument(help="Store URL.")],
    repair: Annotated[
        bool, typer.Option("--repair", help="Delete damaged chunks (the next push re-sends them).")
    ] = False,
    jobs: JobsOpt = 8,
    json_out: JsonOpt = False,
) -> None:
    """Read back every chunk and check its BLAKE3 digest."""
    with progress_bar(not json_out) as bar:
        r = _remote(url, jobs).verify(repair=repair, progress=bar)
    if json_out:
        emit_json(dataclasses.asdict(r))
    else:
        console.print(f"checked {r.chunks} chunks ({human_bytes(r.bytes)}): {len(r.bad)} damaged")
        for d in r.bad:
            console.print(f"  [red]damaged[/] {d}" + (" (deleted)" if repair else ""))
    if r.bad and not repair:
        raise typer.Exit(65)


@store_app.command("rm")
def store_rm(
    url: Annotated[str, typer.Argument(help="Store URL.")],
    names: Annotated[list[str], typer.Argument(help="Snapshot names.")],
    json_out: JsonOpt = False,
) -> None:
    """Remove snapshots from a remote store (their chunks go at the next gc)."""
    remote = _remote(url)
    for n in names:
        remote.remove(n)
    if json_out:
        emit_json({"removed": names})
    else:
        console.print(f"removed {', '.join(names)} from {url} (run `warmstart store gc` to free space)")


@key_app.command("generate")
def key_generate(
    name: Annotated[str, typer.Argument(help="Key name (file stem).")],
    directory: Annotated[
        Path, typer.Option("--dir", help="Where to write NAME.key (0600) and NAME.pub.")
    ] = Path("~/.config/warmstart/keys"),
    json_out: JsonOpt = False,
) -> None:
    """Create an Ed25519 signing key pair."""
    from warmstart.store.signing import generate

    key, pub, public = generate(name, directory.expanduser())
    if json_out:
        emit_json({"private_key": str(key), "public_key": str(pub), "key_id": public.key_id})
        return
    console.print(f"private key {key} (keep it secret), public key {pub}, key id {public.key_id}")
    console.print(f"sign with `warmstart push NAME URL --sign {key}`; trust on nodes by copying {pub.name}")
