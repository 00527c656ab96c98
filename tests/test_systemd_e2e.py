"""cinecut-cache.service under a real systemd, installed the way a user installs it.

A throwaway systemd (../shared/tools/sd-sandbox) boots as PID 1 of fresh namespaces; the .deb
is installed with apt, the libraries are shared with the service through a group (the documented
way), and then, from outside: `systemctl start` returns after READY, `systemctl status` shows
the STATUS line, `cinecutd status` answers root and group members only, a film replaced on the
host shows up as EVENT=invalidated in `journalctl -o json`, `systemctl reload` adds a root, a
wedged main loop is restarted by the watchdog, a bad config fails once with its message in the
journal, and `systemctl stop` is clean. A second test does the same basics for install.sh.

The sandbox shares /usr, /opt and /srv with the host: /usr and /opt are covered by tmpfs overlays
inside it before anything is installed, and the libraries live in a fresh /srv/cinecut-e2e-*
that is removed afterwards. Root only (CI runs as root).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

REPO = Path(__file__).resolve().parents[1]
SDSB = REPO.parent / "shared" / "tools" / "sd-sandbox"
UNIT = "cinecut-cache.service"
SOCK = "/run/cinecut/cinecutd.sock"
CONFIG = "/etc/cinecut/cinecutd.toml"

pytestmark = [
    pytest.mark.systemd,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="sd-sandbox boots systemd in new namespaces: needs root (CI runs as root)"),
    pytest.mark.skipif(not SDSB.exists(), reason=f"sd-sandbox not found at {SDSB}"),
    pytest.mark.timeout(240),
]

T = TypeVar("T")


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = 20.0, every: float = 0.1) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


class Sandbox:
    """A booted sd-sandbox and the commands the tests run inside it."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env

    def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([str(SDSB), "exec", *cmd], env=self.env, capture_output=True, text=True,
                           timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} -> {r.returncode}\n{r.stdout}\n{r.stderr}")
        return r

    def sh(self, script: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return self.run("sh", "-ec", script, check=check, timeout=timeout)

    def overlay(self, path: str) -> None:
        """Cover a host-shared tree with a tmpfs-backed overlay, so installs never reach the host."""
        d = "/run/e2e-overlay" + path.replace("/", "-")
        self.sh(f"mkdir -p {d}/upper {d}/work && mount -t overlay overlay "
                f"-o lowerdir={path},upperdir={d}/upper,workdir={d}/work {path}")
        assert self.run("stat", "-f", "-c", "%T", path).stdout.strip() == "overlayfs"

    def show(self, *props: str, unit: str = UNIT) -> dict[str, str]:
        out = self.run("systemctl", "show", unit, *(f"--property={p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, *matches: str, unit: str = UNIT) -> list[dict[str, Any]]:
        out = self.run("journalctl", "--no-pager", "-o", "json", "-u", unit, *matches).stdout
        return [json.loads(line) for line in out.splitlines() if line.startswith("{")]

    def journal_text(self, unit: str = UNIT) -> str:
        return self.run("journalctl", "--no-pager", "-o", "cat", "-u", unit).stdout

    def status(self, user: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = ["cinecutd", "status", "--socket", SOCK, "--json"]
        if user:
            cmd = ["runuser", "-u", user, "--", *cmd]
        return self.run(*cmd, check=check)

    def status_json(self) -> dict[str, Any]:
        return json.loads(self.status().stdout)

    def install_file(self, src: Path, dest: str) -> None:
        self.run("install", "-D", "-m", "0644", str(src), dest)


@pytest.fixture
def sandbox(tmp_path_factory) -> Iterator[Sandbox]:
    state = tmp_path_factory.mktemp("sd-sandbox")
    env = {
        **os.environ,
        "SDSB_STATE_DIR": str(state / "state"),
        "SDSB_NAME": f"cinecut-e2e-{os.getpid()}-{state.name}",
        "SDSB_LEASE_PID": str(os.getpid()),  # torn down even if pytest is killed
    }
    r = subprocess.run([str(SDSB), "up"], env=env, capture_output=True, text=True, timeout=120)
    try:
        assert r.returncode == 0, f"sd-sandbox up failed:\n{r.stderr}"
        yield Sandbox(env)
    finally:
        subprocess.run([str(SDSB), "down"], env=env, capture_output=True, text=True, timeout=120)


class Library:
    """Film libraries on the host (under /srv, which the sandbox shares), with valid caches."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.root1 = base / "Films A"
        self.root2 = base / "Second Root"

    def add_film(self, root: Path, stem: str) -> Path:
        from cinecut.checkpoint import PipelineCheckpoint, save_checkpoint
        from cinecut.inference.cache import save_cache
        from cinecut.inference.models import SceneDescription
        from cinecut.models import KeyframeRecord
        from cinecut.workdir import WorkDir

        film = root / stem / f"{stem}.mkv"
        film.parent.mkdir(parents=True)
        film.write_bytes(os.urandom(4096))
        wd = WorkDir.for_film(film)
        save_checkpoint(PipelineCheckpoint(
            source_file=str(film), vibe="noir", stages_complete=["proxy", "subtitles", "keyframes"],
            proxy_path=str(wd.proxy_path), keyframe_count=1, dialogue_event_count=0,
            inference_complete=True, cache_hit=False, proxy_duration_s=1.0), wd)
        wd.proxy_path.write_bytes(b"proxy" * 100)
        frame = str(wd.keyframes_dir / "frame_0000000000.jpg")
        save_cache([(KeyframeRecord(0.0, frame, "scene_change"),
                     SceneDescription("a street at night", "tense", "a car waits", "city"))], film, wd)
        return film

    def share_with_group(self, gid: int) -> None:
        """What the README tells admins: the library's group, group-writable, setgid dirs."""
        for dirpath, _dirnames, filenames in os.walk(self.base):
            os.chown(dirpath, -1, gid)
            os.chmod(dirpath, 0o2775)
            for name in filenames:
                p = os.path.join(dirpath, name)
                os.chown(p, -1, gid)
                os.chmod(p, 0o664)

    @staticmethod
    def replace(film: Path) -> None:
        """A new release replacing the file, as Radarr does it: a new file renamed over the old one."""
        tmp = film.with_name(film.name + ".partial~")
        tmp.write_bytes(os.urandom(8192))
        os.replace(tmp, film)

    @staticmethod
    def cache_of(film: Path) -> Path:
        from cinecut.workdir import WorkDir

        return WorkDir.for_film(film).cache_path

    def config(self, path: Path, *roots: Path, extra: str = "") -> Path:
        libs = "".join(f'[[library]]\npath = "{r}"\n\n' for r in roots)
        path.write_text(f'{extra}{libs}[control]\nsocket = "{SOCK}"\n')
        return path


@pytest.fixture
def library() -> Iterator[Library]:
    base = Path(tempfile.mkdtemp(prefix="cinecut-e2e-", dir="/srv"))
    try:
        lib = Library(base)
        lib.root1.mkdir()
        lib.root2.mkdir()
        yield lib
    finally:
        shutil.rmtree(base, ignore_errors=True)


def prepare_users_and_group(sb: Sandbox, lib: Library) -> None:
    sb.run("groupadd", "--system", "media-e2e")
    gid = int(sb.run("getent", "group", "media-e2e").stdout.split(":")[2])
    sb.run("usermod", "-aG", "media-e2e", "cinecut")  # how the daemon is allowed into the library
    lib.share_with_group(gid)
    sb.run("useradd", "-M", "-N", "-G", "cinecut", "alice")  # may query the daemon
    sb.run("useradd", "-M", "-N", "bob")  # may not


def test_deb_service_lifecycle(sandbox: Sandbox, library: Library, deb_package: Path, tmp_path: Path):
    sb, lib = sandbox, library
    heat = lib.add_film(lib.root1, "Heat (1995)")
    alien = lib.add_film(lib.root1, "Alien (1979)")
    ronin = lib.add_film(lib.root2, "Ronin (1998)")

    # --- install the .deb like a user: apt install ./cinecut-cache_*.deb ---------------------
    sb.overlay("/usr")
    sb.overlay("/opt")
    sb.sh(f"DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends {deb_package}",
          timeout=180)
    assert sb.run("systemctl", "is-enabled", UNIT, check=False).stdout.strip() == "disabled"
    verify = sb.run("systemd-analyze", "verify", f"/lib/systemd/system/{UNIT}", check=False)
    assert verify.returncode == 0 and verify.stderr.strip() == "", verify.stderr
    assert sb.run("stat", "-c", "%a %U", "/run/cinecut").stdout.split() == ["1770", "cinecut"]
    prepare_users_and_group(sb, lib)

    # --- configure: libraries, the drop-in from the config, a test drop-in ------------------
    one = lib.config(tmp_path / "one.toml", lib.root1)
    both = lib.config(tmp_path / "both.toml", lib.root1, lib.root2)
    sb.run("cinecutd", "systemd-dropin", "--config", str(both), "--write")
    e2e = tmp_path / "zz-e2e.conf"
    # a short watchdog keeps the test fast; the fault file arms cinecut.faults for one phase
    e2e.write_text("[Service]\nWatchdogSec=5s\nEnvironmentFile=-/etc/cinecut-e2e.env\nLimitCORE=0\n")
    sb.install_file(e2e, f"/etc/systemd/system/{UNIT}.d/zz-e2e.conf")
    sb.install_file(one, CONFIG)
    sb.run("systemctl", "daemon-reload")
    rw = sb.show("ReadWritePaths")["ReadWritePaths"]
    assert f'"-{lib.root1}"' in rw and f'"-{lib.root2}"' in rw

    # --- start: returns only after READY (reconciled, socket listening) ---------------------
    sb.run("systemctl", "enable", "--now", UNIT, timeout=120)
    p = sb.show("ActiveState", "SubState", "StatusText", "MainPID", "NRestarts", "InvocationID")
    assert (p["ActiveState"], p["SubState"]) == ("active", "running")
    assert p["StatusText"].startswith("watching 2 films in 1 root"), p["StatusText"]
    st = sb.status_json()  # no retry: READY=1 promised the socket
    assert st["films"]["total"] == 2 and st["films"]["warm"] == 2, st["films"]
    out = sb.run("systemctl", "status", "--no-pager", UNIT).stdout
    assert 'Status: "watching 2 films in 1 root' in out
    main_pid = p["MainPID"]
    proc = sb.run("cat", f"/proc/{main_pid}/status").stdout
    fields = dict(line.split(":", 1) for line in proc.splitlines())
    uid = sb.run("id", "-u", "cinecut").stdout.strip()
    assert fields["Uid"].split()[0] == uid and int(fields["CapEff"], 16) == 0
    assert fields["NoNewPrivs"].strip() == "1" and fields["Seccomp"].strip() == "2"

    # --- who may ask ----------------------------------------------------------------------
    assert sb.status(user="alice", check=False).returncode == 0
    denied = sb.status(user="bob", check=False)
    assert denied.returncode != 0 and denied.stdout.strip() == ""

    # --- a replaced film is invalidated, with structured journal fields ---------------------
    lib.replace(heat)
    (entry,) = wait_for("EVENT=invalidated for Heat",
                        lambda: sb.journal("EVENT=invalidated", f"FILM={heat}"))
    assert entry["_SYSTEMD_UNIT"] == UNIT and entry["SYSLOG_IDENTIFIER"] == "cinecutd"
    assert entry["PRIORITY"] == "6" and entry["REASON"]
    assert "proxy" in entry["STAGES"].split(",")
    assert int(entry["FILES_REMOVED"]) >= 2 and int(entry["BYTES_RECLAIMED"]) > 0
    assert float(entry["LATENCY_MS"]) >= 0 and entry["MESSAGE"].startswith("invalidated film=")
    assert entry["CODE_FILE"].endswith(".py") and entry["CODE_FUNC"]  # where it was logged
    assert not lib.cache_of(heat).exists()
    assert lib.cache_of(alien).exists()  # the untouched neighbour keeps its cache

    # --- reload: a new root is watched, same process ----------------------------------------
    sb.install_file(both, CONFIG)
    sb.run("systemctl", "reload", UNIT)
    wait_for("the second root to be watched", lambda: any(
        r["path"] == str(lib.root2) and r["state"] == "watching" for r in sb.status_json()["roots"]))
    p = sb.show("MainPID", "NRestarts", "ActiveState")
    assert (p["MainPID"], p["NRestarts"], p["ActiveState"]) == (main_pid, "0", "active")
    lib.replace(ronin)
    wait_for("EVENT=invalidated for Ronin", lambda: sb.journal("EVENT=invalidated", f"FILM={ronin}"))

    # --- watchdog: a main loop wedged mid-invalidation is killed and restarted --------------
    sb.sh("echo CINECUTD_FAULTS=wedge:invalidate.before_checkpoint > /etc/cinecut-e2e.env")
    sb.run("systemctl", "restart", UNIT, timeout=120)  # nothing is stale: starts normally, armed
    wedged_pid = sb.show("MainPID")["MainPID"]
    lib.replace(alien)
    wait_for("the watchdog to fire", lambda: sb.show("SubState")["SubState"] == "auto-restart"
             or sb.show("NRestarts")["NRestarts"] != "0", timeout=30)
    sb.run("rm", "-f", "/etc/cinecut-e2e.env")  # the restarted daemon comes up unarmed
    wait_for("the restart", lambda: (lambda q: q["SubState"] == "running" and q["MainPID"] not in ("0", wedged_pid))(
        sb.show("SubState", "MainPID")), timeout=60)
    assert sb.show("NRestarts")["NRestarts"] == "1"
    assert "Watchdog timeout" in sb.journal_text()
    # the restarted daemon finishes the invalidation the wedged one started
    wait_for("EVENT=invalidated for Alien", lambda: sb.journal("EVENT=invalidated", f"FILM={alien}"))
    assert not lib.cache_of(alien).exists()

    # --- a config error: failed, once, with the precise message -----------------------------
    bad = lib.config(tmp_path / "bad.toml", lib.root1, extra="[daemon]\nrescan_intervall = 5\n\n")
    sb.install_file(bad, CONFIG)
    assert sb.run("systemctl", "restart", UNIT, check=False, timeout=120).returncode != 0
    p = sb.show("ActiveState", "SubState", "Result", "ExecMainStatus", "NRestarts")
    assert (p["ActiveState"], p["Result"], p["ExecMainStatus"]) == ("failed", "exit-code", "78"), p
    time.sleep(1.0)  # Restart=on-failure would show "auto-restart" now; 78 must not be retried
    assert sb.show("ActiveState", "NRestarts") == {"ActiveState": "failed", "NRestarts": p["NRestarts"]}
    assert any("rescan_intervall" in line and CONFIG in line for line in sb.journal_text().splitlines())

    # --- fixed config, then a clean stop ----------------------------------------------------
    sb.install_file(both, CONFIG)
    sb.run("systemctl", "reset-failed", UNIT)
    sb.run("systemctl", "start", UNIT, timeout=120)
    invocation = sb.show("InvocationID")["InvocationID"]
    t0 = time.monotonic()
    sb.run("systemctl", "stop", UNIT, timeout=120)
    stop_s = time.monotonic() - t0
    p = sb.show("ActiveState", "Result", "ExecMainStatus")
    assert (p["ActiveState"], p["Result"], p["ExecMainStatus"]) == ("inactive", "success", "0"), p
    assert stop_s < 10
    assert sb.run("journalctl", "--no-pager", "-o", "json", f"_SYSTEMD_INVOCATION_ID={invocation}",
                  "EVENT=stopped").stdout.strip()


def test_install_script_path(sandbox: Sandbox, library: Library, tmp_path: Path):
    """packaging/install.sh (no .deb): venv under /opt, unit under /etc, service starts and answers."""
    sb, lib = sandbox, library
    lib.add_film(lib.root1, "Heat (1995)")
    src = tmp_path / "src"
    files = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           capture_output=True, check=True).stdout.split(b"\0")
    for rel in filter(None, (os.fsdecode(f) for f in files)):
        if (REPO / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, src / rel)
    sb.overlay("/usr")
    sb.overlay("/opt")
    # offline: dependencies come from the distro's python3-* packages (system site-packages)
    sb.run(str(src / "packaging" / "install.sh"), "--pip-args", "--no-index --no-deps --no-build-isolation",
           timeout=300)
    unit = sb.run("systemctl", "cat", UNIT).stdout
    assert "ExecStart=/opt/cinecut-cache/venv/bin/cinecutd run --config /etc/cinecut/cinecutd.toml" in unit
    verify = sb.run("systemd-analyze", "verify", f"/etc/systemd/system/{UNIT}", check=False)
    assert verify.returncode == 0 and verify.stderr.strip() == "", verify.stderr
    prepare_users_and_group(sb, lib)
    sb.install_file(lib.config(tmp_path / "one.toml", lib.root1), CONFIG)
    sb.run("cinecutd", "systemd-dropin", "--write")
    sb.run("systemctl", "daemon-reload")
    sb.run("systemctl", "enable", "--now", UNIT, timeout=120)
    assert sb.show("SubState")["SubState"] == "running"
    assert sb.status_json()["films"]["warm"] == 1
    sb.run(str(src / "packaging" / "install.sh"), "--uninstall")
    assert sb.run("systemctl", "cat", UNIT, check=False).returncode != 0
    assert sb.run("test", "-e", "/opt/cinecut-cache/venv", check=False).returncode != 0


PROBE = """
import dataclasses, json, mmap, sys
from pathlib import Path
out = {"uid": __import__("os").getuid()}
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    out["wx_mmap"] = "allowed"
except OSError as exc:
    out["wx_mmap"] = exc.errno
from cinecut.inference.engine import LlavaEngine
with LlavaEngine(Path(sys.argv[1]), Path(sys.argv[2]), n_gpu_layers=0, n_ctx=512, max_tokens=64) as eng:
    d = eng.describe(Path(sys.argv[3]))
out["description"] = None if d is None else dataclasses.asdict(d)
print("PROBE " + json.dumps(out), flush=True)
"""


def _world_readable(path: Path) -> bool:
    return all(os.stat(p).st_mode & 0o005 == 0o005 for p in [path, *path.parents])


def test_hardened_unit_runs_llava_inference(sandbox: Sandbox, tiny_llava, tmp_path: Path):
    """The unit's exact sandbox (MemoryDenyWriteExecute, seccomp, ProcSubset, PrivateUsers...) lets
    llama.cpp load a LLaVA pair, run CLIP and generate, with llama-cpp-python's ctypes log callback
    installed: the CPU half of the W^X decision, proven rather than assumed."""
    sb = sandbox
    work = Path(tempfile.mkdtemp(prefix="cinecut-e2e-probe-", dir="/srv"))
    try:
        os.chmod(work, 0o755)
        for src in (tiny_llava.model_path, tiny_llava.mmproj_path):
            shutil.copy(src, work / src.name)
        frame = work / "frame.jpg"
        subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "testsrc=size=96x64:rate=1", "-frames:v", "1",
                        str(frame)], check=True, timeout=60)
        (work / "probe.py").write_text(PROBE)
        for p in work.iterdir():
            os.chmod(p, 0o644)
        sb.install_file(REPO / UNIT, f"/etc/systemd/system/{UNIT}")
        sb.run("systemd-sysusers", str(REPO / "packaging" / "sysusers.d" / "cinecut.conf"))
        code = [Path(sys.prefix), Path(sys.base_prefix), REPO]
        # the unit's user needs to read this interpreter and checkout; a CI checkout under a
        # private home cannot be read by it, and then the probe runs as root (same sandbox)
        user = "" if all(_world_readable(p) for p in code) else "User=root\nGroup=root\n"
        dropin = tmp_path / "probe.conf"
        dropin.write_text(
            "[Service]\nType=oneshot\nWatchdogSec=0\nExecReload=\nExecStart=\n"
            f"ExecStart={sys.executable} {work / 'probe.py'} {work / tiny_llava.model_path.name} "
            f"{work / tiny_llava.mmproj_path.name} {frame}\n{user}"
            + "".join(f"BindReadOnlyPaths=-{p}\n" for p in code))
        sb.install_file(dropin, f"/etc/systemd/system/{UNIT}.d/probe.conf")
        sb.run("systemctl", "daemon-reload")
        r = sb.run("systemctl", "start", UNIT, check=False, timeout=180)
        text = sb.journal_text()
        assert r.returncode == 0, text[-3000:]
        (line,) = [x for x in text.splitlines() if x.startswith("PROBE ")]
        out = json.loads(line.removeprefix("PROBE "))
        assert out["wx_mmap"] == errno.EPERM  # W^X really enforced in there
        assert (out["uid"] != 0) == (user == ""), out
        assert out["description"] and all(out["description"].values()), out
    finally:
        shutil.rmtree(work, ignore_errors=True)


ALICE = 4321  # the library owner: a uid the host does not use, the same inside the sandbox and out


def _as_alice(fn: Callable[..., T], *args: Any) -> T:
    from upstream_user import run_as

    return run_as(ALICE, ALICE, fn, *args)


def _upstream_run(film: Path) -> Path:
    """CineCut run by the library's owner: upstream's own writers, mkstemp + os.replace, umask 022."""
    import upstream_reader

    return _as_alice(upstream_reader.run_pipeline, film)


def test_upstream_files_of_the_library_owner(sandbox: Sandbox, library: Library, deb_package: Path,
                                             tmp_path: Path):
    """Installed as the README says (`systemd-dropin --run-as` the library's owner), the service reads,
    resets and rewrites upstream's 0600 files, keeping owner, group and mode. Misconfigured (the service
    as its own user), the film is blocked with the reason and remedy, `status --check` fails, and when
    permissions change the retry makes the old film's artifacts unusable to upstream."""
    import upstream_reader
    from upstream_user import chown_tree, upstream_resume_reuses

    sb, lib = sandbox, library
    os.chmod(lib.base, 0o755)
    film = lib.root1 / "Heat (1995)" / "Heat (1995).mkv"
    film.parent.mkdir()
    film.write_bytes(os.urandom(4096))
    chown_tree(lib.root1, ALICE, ALICE)
    wd = _upstream_run(film)
    ckpt, cache = wd / "pipeline_checkpoint.json", wd / "Heat (1995).scenedesc.msgpack"
    for p, mode in ((ckpt, 0o600), (cache, 0o600), (wd, 0o755), (wd / "keyframes", 0o755)):
        st = os.stat(p)
        assert (st.st_uid, st.st_mode & 0o7777) == (ALICE, mode), p

    sb.overlay("/usr")
    sb.overlay("/opt")
    sb.sh(f"DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends {deb_package}",
          timeout=180)
    sb.run("groupadd", "-g", str(ALICE), "alice")
    sb.run("useradd", "-M", "-N", "-u", str(ALICE), "-g", str(ALICE), "alice")
    conf = lib.config(tmp_path / "one.toml", lib.root1)
    sb.install_file(conf, CONFIG)

    # --- as the README says: the service runs as the account that runs CineCut ----------------
    sb.run("cinecutd", "systemd-dropin", "--run-as", "alice", "--write")
    sb.run("systemctl", "daemon-reload")
    sb.run("systemctl", "enable", "--now", UNIT, timeout=120)
    pid = sb.show("MainPID")["MainPID"]
    fields = dict(line.split(":", 1) for line in sb.run("cat", f"/proc/{pid}/status").stdout.splitlines())
    # no private user namespace: the owner's groups are real, so a rewritten file's group can be kept
    assert sb.run("cat", f"/proc/{pid}/gid_map").stdout.split() == ["0", "0", "4294967295"]
    assert fields["Uid"].split()[0] == str(ALICE) and int(fields["CapEff"], 16) == 0
    assert str(ALICE) in fields["Groups"].split(), (fields["Groups"], sb.run("systemctl", "cat", UNIT).stdout)
    st = sb.status_json()
    assert (st["films"]["total"], st["films"]["warm"], st["films"]["blocked"]) == (1, 1, 0), st["films"]
    assert sb.run("cinecutd", "status", "--check", "--socket", SOCK, check=False).returncode == 0

    lib.replace(film)
    wait_for("EVENT=invalidated for Heat", lambda: sb.journal("EVENT=invalidated", f"FILM={film}"))
    after = os.stat(ckpt)
    assert (after.st_uid, after.st_gid, after.st_mode & 0o7777) == (ALICE, ALICE, 0o600)
    assert "proxy" not in _as_alice(upstream_reader.load_checkpoint_strict, wd).stages_complete
    assert _as_alice(upstream_resume_reuses, wd) == [] and not cache.exists()
    assert os.stat(wd / "cinecut_stamps.json").st_uid == ALICE  # new files belong to the owner too
    assert not sb.journal("EVENT=blocked")

    # --- misconfigured: the service as its own user cannot read alice's 0600 files -----------
    wd = _upstream_run(film)  # alice runs CineCut again: a complete work dir of this film
    sb.run("cinecutd", "systemd-dropin", "--write")
    sb.run("systemctl", "daemon-reload")
    sb.run("systemctl", "restart", UNIT, timeout=120)
    wait_for("the film shown as blocked", lambda: sb.status_json()["films"]["blocked"] == 1)
    r = sb.run("cinecutd", "status", "--check", "--socket", SOCK, check=False)
    # the unit's private user namespace hides who owns the files: the remedy names the folder to look at
    assert r.returncode == 6 and "blocked: " in r.stdout and "systemd-dropin --run-as USER" in r.stdout, r.stdout
    text = sb.run("cinecutd", "status", "--socket", SOCK, str(film)).stdout
    assert "blocked: " in text and "unknown (checkpoint unreadable" in text
    (warn,) = [e for e in sb.journal("EVENT=blocked") if e.get("PATH") == str(ckpt)][-1:]
    assert warn["PRIORITY"] == "4" and warn["CINECUT_ERRNO"] == "EACCES" and f"the owner of {wd}" in warn["REMEDY"]

    lib.replace(film)  # replaced while blocked: nothing can be reset, the film stays blocked
    time.sleep(0.5)
    assert sb.status_json()["films"]["blocked"] == 1
    # the admin opens the work dir to the service (files stay alice's 0600): the retry moves the
    # checkpoint aside and deletes the old film's proxy, frames and timestamps, without a restart
    for d in (wd, wd / "keyframes"):
        os.chmod(d, 0o777)
    proxy = wd / "Heat (1995)_proxy.mp4"
    wait_for("the retry to neutralise the stale stages",
             lambda: not ckpt.exists() and not proxy.exists() and not cache.exists(), timeout=90)
    assert (wd / "pipeline_checkpoint.stale.json").exists()
    assert _as_alice(upstream_resume_reuses, wd) == [] and not cache.exists()
    wait_for("the film unblocked", lambda: sb.status_json()["films"]["blocked"] == 0, timeout=90)
    assert sb.run("cinecutd", "status", "--check", "--socket", SOCK, check=False).returncode == 0
    aside = [e for e in sb.journal("EVENT=blocked") if e.get("PATH") == str(ckpt) and "aside" in e.get("ACTION", "")]
    assert aside and aside[-1]["CINECUT_ERRNO"] == "EACCES"
