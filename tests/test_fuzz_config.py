"""Hostile config files: the loader answers with a config or a ConfigError naming the file, quickly.

test_config.py fuzzes decoded documents and random bytes; here the fuzzing is at the level an admin (or
a broken deployment tool) produces: mutations of the packaged example (lines dropped, duplicated,
swapped, values replaced by other TOML literals, keys misspelled, unicode injected), generated TOML text
with random tables, keys and value types, and files that are not text at all (FIFOs, devices, huge or
deeply nested documents). Every load is timed; a few mutants also go through `cinecutd run`, which must
exit 78 with one line and no traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from datetime import datetime
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cinecutd.config import MAX_CONFIG_BYTES, TABLES, Config, ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = (REPO / "packaging" / "cinecutd.toml").read_text()
CINECUTD = Path(os.environ.get("VIRTUAL_ENV", REPO / ".venv")) / "bin" / "cinecutd"
LOAD_BUDGET_S = 0.5  # a config is a few hundred bytes; anything slow is a denial of service

KEYS = sorted({k.name for keys in TABLES.values() for k in keys})
toml_literals = st.one_of(
    st.integers(-(2**70), 2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(lambda f: repr(f).replace("inf", "inf").lower()),
    st.sampled_from(["true", "false", "nan", "+inf", "-inf", "0o777", "0x1F", "1979-05-27T07:32:00Z",
                     "07:32:00", "[]", "{}", "[[]]", '""', "''", '"""\nx\n"""', '"\\u0000"', '"/"',
                     '"relative/path"', '"/srv/films"', '"0660"', '"0777"', '"always"', '"25:00-26:00"',
                     "[1, \"a\"]", "{a = 1}"]),
    st.text(max_size=30).map(json.dumps),
)


def _load(path: Path) -> Config | ConfigError:
    t0 = time.monotonic()
    try:
        result: Config | ConfigError = load_config(path)
    except ConfigError as exc:
        result = exc
        assert str(exc).startswith(f"{path}: ") and exc.why, str(exc)
        assert "\n" not in exc.why.strip() or "TOML" in exc.why
    took = time.monotonic() - t0
    assert took < LOAD_BUDGET_S, f"loading took {took:.2f} s"
    return result


def _mutate(lines: list[str], ops: list[tuple[int, int, str]]) -> str:
    out = list(lines)
    for kind, pos, payload in ops:
        if not out:
            out.append(payload)
            continue
        i = pos % len(out)
        if kind == 0:
            del out[i]
        elif kind == 1:
            out.insert(i, out[i])
        elif kind == 2 and "=" in out[i]:
            out[i] = out[i].split("=", 1)[0] + "= " + payload
        elif kind == 3 and "=" in out[i]:
            out[i] = payload.strip('"')[:20] + " =" + out[i].split("=", 1)[1]
        elif kind == 4:
            out[i] = out[i][: pos % (len(out[i]) + 1)] + payload + out[i][pos % (len(out[i]) + 1):]
        elif kind == 5:
            j = (pos * 7) % len(out)
            out[i], out[j] = out[j], out[i]
        else:
            out = out[:i]
    return "\n".join(out) + "\n"


mutations = st.lists(st.tuples(st.integers(0, 6), st.integers(0, 10_000), toml_literals), min_size=1, max_size=6)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=mutations)
def test_mutants_of_the_packaged_example_load_or_fail_precisely(tmp_path: Path, ops) -> None:
    path = tmp_path / "mutant.toml"
    path.write_text(_mutate(EXAMPLE.splitlines(), ops))
    result = _load(path)
    if isinstance(result, Config):
        assert result.libraries and all(lib.path.is_absolute() for lib in result.libraries)
        assert result.control.mode & 0o007 == 0  # never a world-accessible socket, whatever was written


def _render_table(name: str, body: dict[str, str], array: bool) -> str:
    head = f"[[{name}]]" if array else f"[{name}]"
    return head + "\n" + "".join(f"{k} = {v}\n" for k, v in body.items())


generated_docs = st.lists(
    st.tuples(
        st.sampled_from([*TABLES, "library", "library", "x", "daemon.sub"]),
        st.dictionaries(st.sampled_from([*KEYS, "bogus", "path"]), toml_literals, max_size=6),
        st.booleans(),
    ),
    max_size=6,
)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tables=generated_docs)
def test_generated_toml_documents_load_or_fail_precisely(tmp_path: Path, tables) -> None:
    path = tmp_path / "generated.toml"
    path.write_text("".join(_render_table(n, b, a or n == "library") for n, b, a in tables))
    _load(path)


def test_files_that_are_not_configs_fail_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)  # nobody writes to it: reading would block forever
    cases = {
        fifo: "not a regular file",
        Path("/dev/zero"): "not a regular file",
        tmp_path: "is a directory",
        tmp_path / "missing.toml": "no such file",
    }
    huge = tmp_path / "huge.toml"
    huge.write_bytes(b"#" * (MAX_CONFIG_BYTES + 10))
    cases[huge] = "larger than"
    nested = tmp_path / "nested.toml"
    nested.write_text('[[library]]\npath = "/srv/f"\n[daemon]\nvideo_extensions = ' + "[" * 5000 + "]" * 5000 + "\n")
    cases[nested] = "nested too deeply"
    bigint = tmp_path / "bigint.toml"
    bigint.write_text('[[library]]\npath = "/srv/f"\n[daemon]\nrescan_interval = ' + "9" * 5000 + "\n")
    cases[bigint] = "invalid TOML"
    nul = tmp_path / "nul.toml"
    nul.write_bytes(b'[[library]]\npath = "/srv/\x00films"\n')
    cases[nul] = "invalid TOML"
    for path, why in cases.items():
        result = _load(path)
        assert isinstance(result, ConfigError) and why in str(result), (path, result)


@pytest.mark.parametrize("seed", range(4))
def test_cinecutd_run_on_a_mutant_exits_78_with_one_line(tmp_path: Path, seed: int) -> None:
    """End to end: the real entry point never shows a traceback for a bad config, even a FIFO."""
    import random

    rng = random.Random(seed)
    lines = EXAMPLE.splitlines()
    bad = {
        0: _mutate(lines, [(2, rng.randrange(len(lines)), '"not absolute"')]) + '\n[[library]]\npath = "rel"\n',
        1: "[[library]]\npath = " + "[" * 3000 + "\n",
        2: '[[library]]\npath = "/srv/films"\n[control]\nmode = "0666"\n',
        3: None,  # a FIFO
    }[seed]
    path = tmp_path / "cinecutd.toml"
    if bad is None:
        os.mkfifo(path)
    else:
        path.write_text(bad)
    proc = subprocess.run([str(CINECUTD), "run", "--config", str(path)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 78, proc.stderr
    assert proc.stderr.startswith(f"cinecutd: {path}: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


# --------------------------------------------------------------------------------- numbers at their bounds

#: Candidate values, from absurd to tiny: each numeric key's bounds are the extreme ones it accepts.
NUMERIC_PROBES = (-1e300, -(2**63), -2, -1, 0, 1e-300, 1e-9, 0.05, 0.1, 0.5, 1, 16, 256, 512, 3600, 3650, 86400,
                  100_000, 604800, 2592000, 1 << 20, 16 << 20, 1 << 24, 2**31 - 1, 2**31, 2**53, 1e12, 2**63, 1e300)
NUMERIC_KEYS = [(table, key) for table, keys in TABLES.items() for key in keys
                if isinstance(key.default, int | float) and not isinstance(key.default, bool)]


def _accepted(key, value: float) -> bool:
    try:
        key.check(value)
    except Exception:  # the checker's refusal type is private
        return False
    return True


def _bounds(key) -> tuple[float, float]:
    ok = [v for v in NUMERIC_PROBES if _accepted(key, v)]
    assert ok, f"{key.name}: no probe accepted"
    return min(ok), max(ok)


def test_every_accepted_duration_fits_the_waits_that_consume_it() -> None:
    """Selectors take milliseconds in a C int, threading waits at most TIMEOUT_MAX, llama.cpp a C int."""
    import threading

    epoll_max_s = (2**31 - 1) / 1000
    for table, key in NUMERIC_KEYS:
        low, high = _bounds(key)
        assert low >= -1 and high <= 2**31 - 1, f"{table}.{key.name} accepts [{low}, {high}]"
        if any(w in key.name for w in ("interval", "seconds", "timeout")):  # handed to waits and timers
            assert high <= min(epoll_max_s, threading.TIMEOUT_MAX), f"{table}.{key.name} accepts {high}"


def _extreme_config(lib: Path, polled: Path, model: Path, socket: Path, state: Path, pick: int) -> str:
    values = {(t, k.name): _bounds(k)[pick] for t, k in NUMERIC_KEYS}
    d = {name: v for (t, name), v in values.items() if t == "daemon"}
    c = {name: v for (t, name), v in values.items() if t == "control"}
    p = {name: v for (t, name), v in values.items() if t == "prewarm"}
    hour = (datetime.now().hour + 12) % 24  # the minima's pre-warm window stays shut: no worker runs
    window = "always" if pick else f"{hour:02d}:00-{hour:02d}:01"
    lines = ["[daemon]", 'log_format = "json"', 'orphans = "reclaim"', f"state_dir = {json.dumps(str(state))}",
             *(f"{k} = {v!r}" for k, v in d.items()),
             "", "[[library]]", f"path = {json.dumps(str(lib))}",
             "", "[[library]]", f"path = {json.dumps(str(polled))}", 'watch = "poll"',
             f"poll_interval = {values[('library', 'poll_interval')]!r}",
             "", "[control]", f"socket = {json.dumps(str(socket))}", *(f"{k} = {v!r}" for k, v in c.items()),
             "", "[prewarm]", "enabled = true", f"window = {json.dumps(window)}", f"model = {json.dumps(str(model))}",
             f"mmproj = {json.dumps(str(model))}", *(f"{k} = {v!r}" for k, v in p.items())]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("pick", [0, 1], ids=["minima", "maxima"])
def test_the_daemon_runs_with_every_number_at_its_bound(tmp_path: Path, pick: int) -> None:
    """Any accepted config runs: with every numeric key at its smallest (or largest) accepted value the
    daemon becomes ready, answers status again after its timers, polls and rescans have run, and no thread
    died (Python reports a dying thread on stderr, which the harness keeps in the log)."""
    from tests.harness.films import make_film
    from tests.harness.runner import DaemonRunner
    from tests.harness.waiting import stays, wait_for

    with DaemonRunner(tmp_path) as runner:
        lib, polled = runner.library("films"), runner.library("nas")
        make_film(lib / "Heat", "Heat")
        make_film(polled / "Ran", "Ran")
        model = runner.base / "model.gguf"
        model.write_bytes(b"GGUF" + bytes(64))
        cfg = runner.base / "cinecutd.toml"
        cfg.write_text(_extreme_config(lib, polled, model, runner.socket, runner.base / "state", pick))
        load_config(cfg)  # accepted, by construction
        d = runner.daemon(cfg).start()
        first = d.status()
        added = make_film(polled / "Later", "Later")
        if pick == 0:  # polled every 0.1 s, rescanned every second: both loops must keep running
            wait_for(lambda: any(f["film"] == str(added.path) for f in d.status().get("films_list", []))
                     or d.status()["films"]["total"] > first["films"]["total"], what="the poll saw a new film")
        else:  # the threads sit in their (long) first wait: they must stay alive in it
            assert stays(lambda: d.running and "Exception in thread" not in d.log_text(), 1.0)
        assert d.status()["films"]["total"] >= 2
        assert d.running
        log = d.log_text()
        assert "Exception in thread" not in log and "Traceback" not in log, log[-3000:]
