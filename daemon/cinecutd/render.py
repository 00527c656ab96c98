"""Human-readable rendering of the daemon's answers with rich.

The daemon's answers are data from another process, possibly another version: every key may be missing or
of an unexpected type, and film names may hold control characters or undecodable bytes. Nothing here may
crash on that or let a file name inject terminal escapes or rich markup.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text


def clean(value: Any) -> str:
    """A printable, encodable string: control characters escaped, lone surrogates replaced."""
    s = value if isinstance(value, str) else str(value)
    try:
        s = s.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:
        s = s.encode("utf-8", "replace").decode("utf-8")
    if s.isprintable():
        return s
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in s)


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def count(value: Any) -> str:
    n = _num(value)
    if n is None:
        return "?" if value is None else clean(value)
    return str(int(n)) if n == int(n) else f"{n:g}"


def human_bytes(value: Any) -> str:
    n = _num(value)
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def human_duration(value: Any) -> str:
    n = _num(value)
    if n is None:
        return "?"
    s = int(max(0.0, n))
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    if d:
        return f"{d}d {h}h {m:02d}m"
    if h:
        return f"{h}h {m:02d}m"
    if m:
        return f"{m}m {s:02d}s"
    return f"{s}s"


def when(value: Any) -> str:
    """A timestamp given as epoch seconds or an ISO string, as local time."""
    if value is None:
        return "-"
    n = _num(value)
    try:
        if n is not None:
            dt = datetime.fromtimestamp(n)
        elif isinstance(value, str):
            dt = datetime.fromisoformat(value)
            if dt.tzinfo is not None:
                dt = dt.astimezone()
        else:
            return clean(value)
    except (ValueError, OverflowError, OSError):
        return clean(value)
    return dt.strftime("%Y-%m-%d %H:%M:%S")


def brief(value: Any) -> str:
    """Any JSON value on one line."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, Mapping):
        return ", ".join(f"{clean(k)}={brief(v)}" for k, v in value.items()) or "-"
    if isinstance(value, list | tuple):
        return ", ".join(brief(v) for v in value) or "-"
    return count(value) if _num(value) is not None else clean(value)


def _map(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _list(value: Any) -> Sequence[Any]:
    return value if isinstance(value, list) else []


def _table(*columns: str, title: str | None = None) -> Table:
    t = Table(box=box.SIMPLE_HEAD, title=title, title_justify="left", title_style="bold", pad_edge=False,
              show_edge=False)
    for c in columns:
        numeric = c in {"films", "files", "reclaimed", "latency", "bytes", "size"}
        t.add_column(c.upper(), justify="right" if numeric else "left", no_wrap=numeric,
                     overflow="fold")
    return t


def _row(t: Table, *cells: str) -> None:
    t.add_row(*(Text(c) for c in cells))


STATE_STYLE = {
    "watching": "green", "poll-fallback": "yellow", "degraded": "yellow", "missing": "red", "unreadable": "red",
    "valid": "green", "stale": "yellow", "corrupt": "red",
    "running": "green", "idle": "", "paused": "yellow", "gpu-build-missing": "red",
    "waiting-window": "cyan", "waiting-vram": "yellow", "disabled": "dim",
}


def _state(value: Any) -> Text:
    s = clean(value) if value is not None else "?"
    return Text(s, style=STATE_STYLE.get(s, ""))


def render_status(result: Mapping[str, Any], console: Console) -> None:
    """The `cinecutd status` summary."""
    d = _map(result.get("daemon"))
    head = Text("cinecutd", style="bold")
    head.append(f" {clean(d.get('version', '?'))}  pid {count(d.get('pid'))}  "
                f"up {human_duration(d.get('uptime_s'))}")
    if d.get("started_at") is not None:
        head.append(f" (since {when(d.get('started_at'))})")
    console.print(head)

    console.print()
    roots = _list(result.get("roots"))
    t = _table("root", "watch", "state", "films", title=f"Roots ({len(roots)})")
    for r in roots:
        r = _map(r)
        t.add_row(Text(clean(r.get("path", "?"))), Text(clean(r.get("watch", "?"))), _state(r.get("state")),
                  Text(count(r.get("films"))))
    console.print(t)

    console.print()
    f = _map(result.get("films"))
    parts = [("total", "total"), ("warm", "warm"), ("cold", "cold"), ("stale_fixed", "stale-fixed"),
             ("orphaned", "orphaned"), ("conflicts", "same-stem conflicts"), ("copying", "copying"),
             ("blocked", "blocked"), ("unverified", "unverified")]
    line = Text("Films: ", style="bold")
    line.append("  ".join(f"{count(f.get(k))} {label}" for k, label in parts if k in f) or "?")
    console.print(line)

    conflicts = _list(result.get("conflicts"))
    if conflicts:
        console.print()
        t = _table("work dir", "films sharing it", title=f"Same-stem conflicts ({len(conflicts)})")
        for c in conflicts:
            c = _map(c)
            _row(t, clean(c.get("work_dir", "?")), brief(c.get("films")))
        console.print(t)

    orphans = _list(result.get("orphans"))
    if orphans:
        console.print()
        t = _table("orphaned work dir", "size", title=f"Orphaned work dirs ({len(orphans)})")
        total = 0.0
        for o in orphans:
            o = _map(o)
            total += _num(o.get("bytes")) or 0
            _row(t, clean(o.get("work_dir", "?")), human_bytes(o.get("bytes")))
        console.print(t)
        console.print(Text(f"{human_bytes(total)} in orphaned work dirs; `cinecutd gc` shows what "
                           "`cinecutd gc --apply` would delete", style="dim"))

    blocked = _list(result.get("blocked"))
    if blocked:
        console.print()
        t = _table("film", "why, and the remedy", "since", title=f"Blocked films ({len(blocked)})")
        for b in blocked:
            b = _map(b)
            t.add_row(Text(clean(b.get("film", "?"))), Text(clean(b.get("blocked", "?")), style="red"),
                      Text(when(b.get("since"))))
        console.print(t)

    console.print()
    pending = _list(result.get("pending"))
    t = _table("film", "reason", "since", title=f"Pending invalidations ({len(pending)})")
    for p in pending:
        p = _map(p)
        _row(t, clean(p.get("film", "?")), brief(p.get("reason")), when(p.get("since")))
    console.print(t if pending else Text("Pending invalidations: none", style="bold"))

    console.print()
    recent = _list(result.get("recent_invalidations"))
    if recent:
        t = _table("at", "film", "reason", "stages", "files", "reclaimed", "latency",
                   title=f"Recent invalidations ({len(recent)})")
        for r in recent:
            r = _map(r)
            lat = _num(r.get("latency_ms"))
            _row(t, when(r.get("at")), clean(r.get("film", "?")), brief(r.get("reason")), brief(r.get("stages")),
                 count(r.get("files_removed")), human_bytes(r.get("bytes_reclaimed")),
                 "?" if lat is None else f"{lat:.1f} ms")
        console.print(t)
    else:
        console.print(Text("Recent invalidations: none", style="bold"))

    counters = _map(result.get("counters"))
    if counters:
        console.print()
        line = Text("Counters: ", style="bold")
        line.append("  ".join(
            f"{clean(k)} {human_bytes(v) if k.startswith('bytes') else count(v)}" for k, v in counters.items()))
        console.print(line)

    hints, hook = _map(result.get("hints")), _map(result.get("webhook"))
    if hints.get("accepted") or hints.get("refused") or hook:
        line = Text("Radarr/Sonarr: ", style="bold")
        if hook:
            line.append(f"webhook {clean(hook.get('state', '?'))} on {clean(hook.get('listen', '?'))}; ")
        line.append(f"{count(hints.get('accepted'))} events accepted ({count(hints.get('paths'))} paths), "
                    f"{count(hints.get('refused'))} refused")
        last = _map(hints.get("last"))
        if last:
            line.append(f"; last: {clean(last.get('source'))} {clean(last.get('event'))} {when(last.get('at'))}")
        console.print(line)

    if "prewarm" in result:
        console.print()
        _render_prewarm(_map(result.get("prewarm")), console)


def _render_throughput(t: Mapping[str, Any], console: Console) -> None:
    """The last job's measured speed and what it means for the queue (nothing before a first job)."""
    fps = _num(t.get("last_fps"))
    if fps is None:
        return
    line = f"  throughput: {fps:.2f} frames/s (last job: {clean(t.get('last_film', '?'))})"
    per_night, nights = _num(t.get("films_per_night")), _num(t.get("nights_needed"))
    if per_night is not None:
        line += (f"; {per_night:.1f} films per {_num(t.get('window_hours')) or 0:g} h window"
                 f" at {count(t.get('frames_per_film'))} keyframes per film")
    if nights is not None:
        line += f"; {count(t.get('films_left'))} films left: {count(nights)} night{'s' * (nights != 1)}"
    console.print(Text(line))


def _render_prewarm(p: Mapping[str, Any], console: Console) -> None:
    line = Text("Pre-warm: ", style="bold")
    line.append_text(_state(p.get("state", "enabled" if p.get("enabled") else "disabled")))
    if p.get("next_window") is not None:
        line.append(f"  next window {when(p.get('next_window'))}")
    console.print(line)
    if p.get("note"):
        console.print(Text(f"  {clean(p['note'])}", style="dim"))
    cur = p.get("current")
    if isinstance(cur, Mapping):
        done, total = _num(cur.get("done")), _num(cur.get("total"))
        pct = f" ({100 * done / total:.0f} %)" if done is not None and total else ""
        fps = _num(cur.get("fps"))
        console.print(Text(
            f"  current: {clean(cur.get('film', '?'))}  {count(cur.get('done'))}/{count(cur.get('total'))} "
            f"frames{pct}  {'?' if fps is None else f'{fps:.2f}'} fps  ETA {human_duration(cur.get('eta_s'))}"))
    _render_throughput(_map(p.get("throughput")), console)
    if isinstance(p.get("remote"), Mapping):
        _render_remote(_map(p.get("remote")), console)
    queue = _list(p.get("queue"))
    if queue:
        console.print(Text(f"  queue ({len(queue)}): " + ", ".join(clean(q) for q in queue[:10])
                           + (f", … {len(queue) - 10} more" if len(queue) > 10 else "")))
    failures = _list(p.get("failures"))
    if failures:
        t = _table("film", "reason", "at", title=f"Pre-warm failures ({len(failures)}); retry with "
                                                 "`cinecutd prewarm --retry FILM`")
        for fl in failures:
            fl = _map(fl)
            _row(t, clean(fl.get("film", "?")), brief(fl.get("reason")), when(fl.get("at")))
        console.print(t)


def _render_remote(r: Mapping[str, Any], console: Console) -> None:
    """Remote workers (``[queue] redis``): each worker, and where the running jobs are."""
    link = "connected" if r.get("connected") else f"unreachable ({clean(r.get('error'))})"
    console.print(Text(f"  queue {clean(r.get('redis'))}: {link}; {count(r.get('queued'))} queued, "
                       f"{len(_list(r.get('running')))} running, {count(r.get('requeued'))} requeued"))
    workers = _list(r.get("workers"))
    t = _table("worker", "host", "state", "film", "frames", "fps", "last seen",
               title=f"Workers ({len(workers)})")
    for w in workers:
        w = _map(w)
        fps = _num(w.get("fps"))
        frames = f"{count(w.get('done'))}/{count(w.get('total'))}" if w.get("film") else "-"
        _row(t, clean(w.get("name")), clean(w.get("host")), clean(w.get("state")), clean(w.get("film") or "-"),
             frames, "-" if not fps else f"{fps:.2f}", when(w.get("last_seen")))
    console.print(t)


#: What proves which film bytes a work dir's stages came from (``cinecut.evidence.Verification``).
_VERIFIED_BY = {
    "recorded": "our record (computed, invalidated or checked here)",
    "cache": "upstream's cache stamp",
    "proxy": "the proxy's media facts against the film's",
    "unverified": "unverified: nothing proves which film the stages came from",
    "nothing": "nothing to verify",
}


def render_film(result: Mapping[str, Any], console: Console) -> None:
    """`cinecutd status FILM`: the per-film detail."""
    g = Table.grid(padding=(0, 2))
    g.add_column(style="bold", no_wrap=True)
    g.add_column(overflow="fold")
    g.add_row("Film", Text(clean(result.get("film", "?"))))
    g.add_row("Work dir", Text(clean(result.get("work_dir", "-")) if result.get("work_dir") else "-"))
    stamp = result.get("stamp")
    if isinstance(stamp, Mapping):
        mt = _num(stamp.get("mtime"))
        g.add_row("Stamp", Text(f"mtime {when(mt)} ({'?' if mt is None else repr(mt)}), "
                                f"size {count(stamp.get('size'))} bytes ({human_bytes(stamp.get('size'))})"))
    else:
        g.add_row("Stamp", Text("none (the film is not readable)"))
    cache = _map(result.get("cache"))
    cell = _state(cache.get("state", "?"))
    if cache.get("records") is not None:
        cell.append(f", {count(cache.get('records'))} records")
    if cache.get("path"):
        cell.append(f"  {clean(cache.get('path'))}")
    g.add_row("Cache", cell)
    if result.get("stages_complete"):
        stages = brief(result.get("stages_complete"))
    elif result.get("checkpoint") == "unreadable":
        stages = f"unknown (checkpoint unreadable: {clean(result.get('checkpoint_reason') or '?')})"
    else:
        stages = "none"
    g.add_row("Stages complete", Text(stages))
    if result.get("verification"):
        g.add_row("Verified by", Text(_VERIFIED_BY.get(str(result["verification"]), clean(result["verification"])),
                                      style="yellow" if result["verification"] == "unverified" else ""))
    if result.get("blocked"):
        g.add_row("Blocked", Text(clean(result.get("blocked")), style="red"))
        for p in _list(result.get("problems")):
            p = _map(p)
            code = f" ({clean(p.get('errno'))})" if p.get("errno") else ""
            done = f" -> {clean(p.get('action'))}" if p.get("action") else ""
            g.add_row("", Text(f"{clean(p.get('path', '?'))}: {clean(p.get('reason', '?'))}{code}{done}"))
    g.add_row("Checkpoint", _state(result.get("checkpoint", "?")))
    g.add_row("Subtitles", Text(brief(result.get("subtitles")) if result.get("subtitles") else "none"))
    ev = result.get("last_event")
    if isinstance(ev, Mapping):
        g.add_row("Last event", Text(f"{clean(ev.get('kind', '?'))} at {when(ev.get('at'))}"))
    else:
        g.add_row("Last event", Text("none since the daemon started"))
    g.add_row("Pending", Text(brief(result.get("pending")) if result.get("pending") else "none"))
    g.add_row("Pre-warm", Text(brief(result.get("prewarm"))))
    salvage = salvage_line(result)
    if salvage:
        g.add_row("Salvage", Text(salvage))
    console.print(g)


def salvage_line(result: Mapping[str, Any]) -> str | None:
    """``salvaged N of M frames``: descriptions kept across a subtitle change (running, waiting, or last)."""
    pw = _map(result.get("prewarm"))
    cur, last, store = _map(pw.get("current")), _map(pw.get("last")), _map(result.get("salvage"))
    if _num(cur.get("salvaged")) is not None:
        return f"salvaged {count(cur.get('salvaged'))} of {count(cur.get('total'))} frames (pre-warm running)"
    if store:
        return (f"{count(store.get('frames'))} descriptions of {count(store.get('of'))} frames kept after a "
                "subtitle change; the next run describes only new frames")
    if _num(last.get("frames_salvaged")):
        return f"salvaged {count(last.get('frames_salvaged'))} of {count(last.get('frames'))} frames (last pre-warm)"
    return None


def render_gc(result: Mapping[str, Any], console: Console) -> None:
    """`cinecutd gc [--apply]`: what was (or would be) deleted from orphaned work dirs."""
    applied = bool(result.get("applied", result.get("apply", False)))
    orphans = [_map(o) for o in _list(result.get("orphans"))]
    t = _table("orphaned work dir", "files", "size", "kept", "note",
               title=f"Orphaned work dirs ({len(orphans)})")
    total, errors, removed_dirs = 0.0, 0, 0
    for o in orphans:
        total += _num(o.get("bytes")) or 0
        files = o.get("reclaimable")
        kept = o.get("kept")
        if o.get("error"):
            errors += 1
            note = f"error: {clean(o['error'])}"
        elif o.get("recognised") is False:
            note = clean(o.get("note") or "not recognised: never touched")
        elif o.get("removed_dir"):
            removed_dirs += 1
            note = "directory removed"
        else:
            note = ""
        _row(t, clean(o.get("work_dir", "?")), str(len(files)) if isinstance(files, list) else "-",
             human_bytes(o.get("bytes")), str(len(kept)) if isinstance(kept, list) else "-", note)
    if orphans:
        console.print(t)
        console.print()
    if not orphans:
        console.print(Text("No orphaned work dirs."))
    elif applied:
        reclaimed = result.get("bytes_reclaimed", total)
        line = (f"Deleted the regenerable data of {len(orphans) - errors} orphaned work dir(s): "
                f"{human_bytes(reclaimed)} reclaimed")
        line += f", {removed_dirs} emptied dir(s) removed" if removed_dirs else ""
        line += f"; {errors} failed (see the note column)" if errors else ""
        console.print(Text(line + ". Manifests and unknown files were kept."))
    else:
        console.print(Text(f"Dry run: {human_bytes(total)} could be reclaimed; run `cinecutd gc --apply` to "
                           "delete the regenerable data (manifests and unknown files are kept)."))
    if result.get("message"):
        console.print(Text(clean(result["message"])))


def render_rescan(result: Mapping[str, Any], console: Console) -> None:
    """`cinecutd rescan`: the reconcile's report."""
    if "films" not in result:
        render_generic("rescan", result, console)
        return
    dur = _num(result.get("duration_s"))
    line = f"Rescanned: {count(result.get('films'))} films"
    for key, label in (("orphans", "orphaned work dirs"), ("conflicts", "same-stem conflicts"),
                       ("invalidated", "invalidated"), ("fixed", "fixed")):
        if key in result:
            line += f", {brief(result.get(key))} {label}"
    if dur is not None:
        line += f" in {dur * 1000:.1f} ms" if dur < 1 else f" in {human_duration(dur)}"
    console.print(Text(line))


def render_generic(cmd: str, result: Mapping[str, Any], console: Console) -> None:
    """rescan, prewarm, pause, resume, ping: the daemon's message, else its fields."""
    if isinstance(result.get("message"), str):
        console.print(Text(clean(result["message"])))
        return
    if not result:
        console.print(Text(f"{cmd}: ok"))
        return
    g = Table.grid(padding=(0, 2))
    g.add_column(style="bold", no_wrap=True)
    g.add_column(overflow="fold")
    for k, v in result.items():
        g.add_row(Text(clean(k)), Text(brief(v)))
    console.print(g)
