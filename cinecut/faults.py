"""Fault injection for crash-consistency tests: kill or wedge a process (daemon, worker, CLI) at named points.

Off unless ``CINECUTD_FAULTS`` is set, e.g. ``CINECUTD_FAULTS="kill:migrate.after_rename"`` (SIGKILL
ourselves when that point is reached), ``"wedge:rescan"`` (block the main loop forever, to prove the
systemd watchdog restarts a wedged daemon) or ``"raise:watch.event"`` (raise ``RuntimeError`` there, to
prove a thread that dies of an exception is noticed; ``raise-once`` only the first time), or ``"slow:prewarm.after_frame"``
(sleep ``SLOW_S`` there: a tiny model's job, done in a fraction of a second, held open long enough for a
test to catch it mid-way). ``kill:*@0.3`` kills at each point with probability 0.3. ``"fail-once:NAME"``
(or ``fail``) is asked for with :func:`fails` where a native call can fail (a GPU out of memory in
``llama_decode``, say): the caller treats it as that call's own failure and takes its real error path.
The cost when unset is one dict lookup per point.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from typing import Final

_SPEC: Final = os.environ.get("CINECUTD_FAULTS", "")
SLOW_S: Final = 0.1


def _parse(spec: str) -> dict[str, tuple[str, float]]:
    out: dict[str, tuple[str, float]] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        action, _, rest = item.partition(":")
        point, _, prob = rest.partition("@")
        out[point] = (action, float(prob) if prob else 1.0)
    return out


_FAULTS: Final = _parse(_SPEC)
#: Whether any fault is asked for: a caller with work to do before asking (a set to build) checks this first.
ARMED: Final = bool(_FAULTS)
_SPENT: set[str] = set()


def point(name: str) -> None:
    """A named place where a test may ask for a crash or a hang."""
    if not _FAULTS:
        return
    action, prob = _FAULTS.get(name) or _FAULTS.get("*") or ("", 0.0)
    if not action or action.startswith("fail") or random.random() >= prob:
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "wedge":
        threading.Event().wait()
    elif action == "slow":
        time.sleep(SLOW_S)
    elif action == "raise" or (action == "raise-once" and name not in _SPENT):
        _SPENT.add(name)
        raise RuntimeError(f"fault injected at {name}")


def fails(name: str) -> bool:
    """Whether a test asks the native call at ``name`` to report a failure now (``fail``, ``fail-once``)."""
    if not _FAULTS:
        return False
    action, prob = _FAULTS.get(name) or ("", 0.0)
    if action not in ("fail", "fail-once") or (action == "fail-once" and name in _SPENT):
        return False
    if random.random() >= prob:
        return False
    _SPENT.add(name)
    return True
