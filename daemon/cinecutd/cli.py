"""The `cinecutd` command: `run` starts the daemon; the other subcommands talk to it over its socket.

Exit codes: 0 ok, 1 the daemon answered with an error (or another failure), 2 usage, 3 the daemon is not
running, 4 permission denied on the socket, 78 (EX_CONFIG) a bad config. `status --check` adds 5 (a library
root is missing, unreadable or not watched) and 6 (a film is blocked): see ``cinecutd.health``.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from cinecutd.config import EX_CONFIG, ConfigError, default_config_path, load_config

DROPIN_DIR = Path("/etc/systemd/system/cinecut-cache.service.d")
DROPIN_NAME = "libraries.conf"
SLOW_COMMANDS = ("rescan", "gc")  # they answer when the work is done, which may take a while
SLOW_TIMEOUT = 180.0
ARR_HOOK_TIMEOUT = 5.0


def _err(message: str) -> None:
    print(f"cinecutd: {message}", file=sys.stderr)


def _version() -> str:
    try:
        from cinecutd import __version__
    except ImportError:  # the cinecut package is missing: still let --version answer
        return "unknown"
    return str(__version__)


# --------------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cinecutd",
        description="Keeps CineCut caches of watched film libraries valid, and pre-warms them overnight.",
        epilog="Exit codes: 0 ok, 1 error, 2 usage, 3 daemon not running, 4 permission denied, 78 bad config.",
    )
    parser.add_argument("--version", action="version", version=f"cinecutd {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("run", help="run the daemon in the foreground (systemd starts it this way)")
    p.add_argument("--config", metavar="PATH", help=f"config file (default: $CINECUTD_CONFIG or {default_config_path()})")

    def client(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        where = p.add_mutually_exclusive_group()
        where.add_argument("--config", metavar="PATH", help="find the socket in this config's [control].socket")
        where.add_argument("--socket", metavar="PATH", help="the daemon's control socket")
        p.add_argument("--json", action="store_true", help="print the daemon's raw answer as JSON")
        slow = name in SLOW_COMMANDS
        p.add_argument("--timeout", type=float, default=SLOW_TIMEOUT if slow else 10.0, metavar="S",
                       help=f"seconds to wait for the daemon (default: {SLOW_TIMEOUT if slow else 10:g})")
        return p

    p = client("status", "show what the daemon sees (or one film's detail)")
    p.add_argument("film", nargs="?", metavar="FILM", help="a film's path: show its stamps, cache and stages")
    p.add_argument("--check", action="store_true",
                   help="health probe: exit 0 healthy, 3 daemon down, 4 socket permission denied, 5 a root "
                        "missing or not watched, 6 a film blocked (one line per finding on stdout)")
    client("rescan", "reconcile all libraries now")
    p = client("gc", "list orphaned work dirs (dry run), or delete their regenerable data with --apply")
    p.add_argument("--apply", action="store_true", help="delete (caches, proxies, keyframes; never manifests)")
    p = client("prewarm", "queue a film for pre-warming")
    p.add_argument("film", metavar="FILM")
    p.add_argument("--now", action="store_true", help="run it now, ignoring the window")
    p.add_argument("--retry", action="store_true", help="retry a film whose pre-warm failed")
    client("pause", "pause pre-warming (the current job stops after its frame)")
    p = client("sync", "wait until the daemon has handled every change made so far in a library (all by default)")
    p.add_argument("root", nargs="?", metavar="ROOT", help="a library root (it gets a short-lived hidden cookie file)")
    client("resume", "resume pre-warming")

    p = sub.add_parser("arr-hook", help="Radarr/Sonarr custom script: forward the event in the environment "
                                        "(Radarr_*/Sonarr_*) to the daemon")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--config", metavar="PATH", help="find the socket in this config's [control].socket")
    where.add_argument("--socket", metavar="PATH", help="the daemon's control socket")
    p.add_argument("--timeout", type=float, default=ARR_HOOK_TIMEOUT, metavar="S",
                   help=f"seconds to wait for the daemon (default: {ARR_HOOK_TIMEOUT:g}; Radarr waits for the script)")

    p = sub.add_parser("systemd-dropin",
                       help="print (or --write) the unit drop-in that lets the sandboxed service reach the libraries")
    p.add_argument("--config", metavar="PATH", help=f"config file (default: {default_config_path()})")
    p.add_argument("--write", action="store_true",
                   help=f"write it to {DROPIN_DIR / DROPIN_NAME} instead of printing it")
    p.add_argument("--run-as", metavar="USER",
                   help="run the service as USER, the account that runs CineCut on these libraries (its "
                        "checkpoint and cache are 0600: only that user can read them)")
    p.add_argument("--dir", type=Path, default=DROPIN_DIR, metavar="DIR", help=argparse.SUPPRESS)

    p = sub.add_parser("demo", help="run the daemon on a generated demo library and replace the film live")
    p.add_argument("--dir", type=Path, default=Path("demo-run"), metavar="DIR",
                   help="where to build the demo library (replaced if it exists; default: ./demo-run)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for each pre-warm")
    return parser


# --------------------------------------------------------------------------------------------- commands


def _load(config_arg: str | None) -> Any:
    path = Path(config_arg) if config_arg else default_config_path()
    return load_config(path)


def cmd_run(args: argparse.Namespace) -> int:
    try:
        config = _load(args.config)
    except ConfigError as e:
        _err(str(e))
        return EX_CONFIG
    from cinecutd.service import run_daemon

    rc = run_daemon(config)
    return 0 if rc is None else int(rc)


def _film_arg(film: str) -> str:
    """Paths are sent absolute (the daemon knows films by path); a bare name that is no file goes as-is."""
    if "/" in film or os.path.lexists(film):
        return os.path.abspath(film)
    return film


def _console() -> Any:
    from rich.console import Console

    return Console(highlight=False, width=None if sys.stdout.isatty() else 160)


def _sync(c: Any, root: str | None) -> dict[str, Any]:
    """One cookie per root (cinecutd.cookies): the answer comes once the daemon has handled its event."""
    from cinecutd.client import ClientError
    from cinecutd.cookies import sync_root

    roots = [os.path.abspath(root)] if root else [r["path"] for r in c.request("status")["roots"]]
    synced = []
    for r in roots:
        try:
            synced.append(sync_root(lambda req: c.request(req.pop("cmd"), **req), Path(r)))
        except OSError as e:
            raise ClientError(f"cannot create a sync cookie in {r}: {e.strerror or e}") from None
    return {"roots": synced}


def cmd_client(args: argparse.Namespace) -> int:
    from cinecutd.client import ClientError, ControlClient, resolve_socket

    try:
        choice = resolve_socket(args.socket, args.config)
    except ConfigError as e:
        _err(str(e))
        return EX_CONFIG
    if choice.warning:
        _err(choice.warning)

    cmd = args.command
    req: dict[str, Any] = {}
    if cmd == "status" and args.film and not args.check:
        req["film"] = _film_arg(args.film)
    elif cmd == "gc":
        req["apply"] = args.apply
    elif cmd == "prewarm":
        req.update(film=_film_arg(args.film), now=args.now, retry=args.retry)
    try:
        with ControlClient(choice.path, timeout=args.timeout) as c:
            result = _sync(c, args.root) if cmd == "sync" else c.request(cmd, **req)
    except ClientError as e:
        _err(str(e))
        if cmd == "status" and args.check:
            print(f"unhealthy: {e}")
        return e.exit_code

    if cmd == "status" and args.check:
        from cinecutd.health import check_verdict

        code, lines = check_verdict(result)
        print("healthy" if code == 0 else "unhealthy:")
        for line in lines:
            print(f"  {line}")
        return code
    if args.json:
        print(json.dumps(result, indent=2, ensure_ascii=True))
        return 0
    from cinecutd import render

    console = _console()
    if cmd == "status":
        (render.render_film if args.film else render.render_status)(result, console)
    elif cmd == "gc":
        render.render_gc(result, console)
    elif cmd == "rescan":
        render.render_rescan(result, console)
    else:
        render.render_generic(cmd, result, console)
    return 0


def cmd_arr_hook(args: argparse.Namespace) -> int:
    """Radarr's/Sonarr's custom script: the event's paths go to the daemon as a hint, quickly. Exit 0 on
    Test (after trying the socket), 3 when the daemon is not running, 1 when it refused the paths."""
    from cinecutd.client import ClientError, ControlClient, resolve_socket
    from cinecutd.hints import hint_from_env

    hint = hint_from_env(os.environ)
    if not hint.event:
        _err("arr-hook: no Radarr_EventType or Sonarr_EventType in the environment; Radarr/Sonarr run this "
             "(Settings > Connect > Custom Script)")
        return 2
    try:
        choice = resolve_socket(args.socket, args.config)
    except ConfigError as e:
        _err(str(e))
        return EX_CONFIG
    if hint.event.lower() == "test":
        try:
            with ControlClient(choice.path, timeout=args.timeout) as c:
                c.request("ping")
            print(f"cinecutd arr-hook: test from {hint.source}: the daemon answers on {choice.path}")
        except ClientError as e:
            _err(f"arr-hook: test from {hint.source}: the daemon does not answer yet: {e}")
        return 0
    if hint.empty:
        print(f"cinecutd arr-hook: {hint.source} {hint.event}: no file named; nothing to do")
        return 0
    try:
        with ControlClient(choice.path, timeout=args.timeout) as c:
            result = c.request("hint", event=hint.event, source=hint.source, paths=hint.paths,
                               moves=[list(m) for m in hint.moves])
    except ClientError as e:
        _err(f"arr-hook: {hint.source} {hint.event}: {e}" + (
            " (the change is caught by the next poll or rescan once the daemon runs)" if e.exit_code == 3 else ""))
        return e.exit_code
    print(f"cinecutd arr-hook: {hint.source} {hint.event}: {result.get('paths', 0)} path(s), "
          f"{result.get('moves', 0)} rename(s) handed to the daemon")
    return 0


def cmd_dropin(args: argparse.Namespace) -> int:
    try:
        config = _load(args.config)
    except ConfigError as e:
        _err(str(e))
        return EX_CONFIG
    from cinecutd.dropin import DropinError, render_dropin, run_as_user

    try:
        run_as = run_as_user(args.run_as) if args.run_as else None
    except DropinError as e:
        _err(str(e))
        return 2
    try:
        pw = config.prewarm
        models = {p.parent for p in (pw.model, pw.mmproj) if pw.enabled and p is not None}
        m = config.metrics
        text = render_dropin([lib.path for lib in config.libraries], read_only=sorted(models), source=str(config.path),
                             run_as=run_as,
                             # the metrics textfile is replaced by a rename: its folder must be writable
                             extra_read_write=[m.textfile.parent] if m.textfile is not None else [],
                             loopback_listeners=[f"metrics on {m.listen[0]}:{m.listen[1]}"] if m.listen else [])
    except DropinError as e:
        _err(f"{config.path}: library path: {e}")
        return EX_CONFIG
    from cinecutd.webhook import dropin_lines

    text += "".join(f"{line}\n" for line in dropin_lines(config.webhook))
    from cinecutd.prewarm.remote import dropin_lines as queue_dropin_lines

    text += "".join(f"{line}\n" for line in queue_dropin_lines(config.queue))
    if run_as is None:
        _hint_run_as(config.libraries)
    if not args.write:
        sys.stdout.write(text)
        return 0
    target = args.dir / DROPIN_NAME
    try:
        args.dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=args.dir, prefix=f".{DROPIN_NAME}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fchmod(f.fileno(), 0o644)
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as e:
        _err(f"cannot write {target}: {e.strerror or e}" + (" (run it as root)" if e.errno == errno.EACCES else ""))
        return 1
    print(f"wrote {target}\nnow run: systemctl daemon-reload && systemctl restart cinecut-cache")
    return 0


def _hint_run_as(libraries: Any) -> None:
    """Without --run-as, name the account that owns the libraries: its CineCut writes files only it reads."""
    import pwd

    owners = set()
    for lib in libraries:
        try:
            uid = os.stat(lib.path).st_uid
        except OSError:
            continue
        try:
            name = pwd.getpwuid(uid).pw_name
        except KeyError:
            name = str(uid)
        if uid != 0 and name != "cinecut":
            owners.add(name)
    if owners:
        _err(f"note: the libraries belong to {', '.join(sorted(owners))}; CineCut run by that account writes its "
             "checkpoint and cache 0600, which the service cannot read as user cinecut: add "
             f"--run-as {sorted(owners)[0]} (see the README, \"Granting access to the libraries\")")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "run":
        return cmd_run(args)
    if args.command == "systemd-dropin":
        return cmd_dropin(args)
    if args.command == "arr-hook":
        return cmd_arr_hook(args)
    if args.command == "demo":
        from cinecutd.demo import run_demo

        return run_demo(args.dir, timeout=args.timeout)
    return cmd_client(args)


if __name__ == "__main__":
    sys.exit(main())
