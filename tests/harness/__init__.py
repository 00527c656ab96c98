"""The test harness of the daemon: real ``cinecutd`` processes, realistic films and work dirs, checks.

Tests of the daemon's behaviour (watching, invalidation, renames, crashes, soaks) and the churn soak in
``bench/`` share it, so every one of them exercises the installed entry point, real inotify or polling,
the real control socket and real signals, exactly as systemd runs the service. Nothing here is mocked.
One module per idea; import from the module that owns a name:

- :mod:`tests.harness.waiting`: poll until a condition holds (``wait_for``, ``stays``);
- :mod:`tests.harness.runner`: a daemon's config, process, control client and ``sync`` waits;
- :mod:`tests.harness.films`: films with their sidecars, finished work dirs, a pipeline holding a lock;
- :mod:`tests.harness.checks`: what a work dir holds now, and the invariants tests assert on it;
- :mod:`tests.harness.mutate`: the ways tools and people change a film on disk.

Typical use::

    @pytest.fixture
    def runner(tmp_path):
        with DaemonRunner(tmp_path) as r:   # teardown: SIGTERM, exit 0 within 5 s, asserted
            yield r

    def test_x(runner):
        lib = runner.library("films")                       # a library root folder
        film = make_film(lib / "Heat (1995)", "Heat (1995)")  # film + subtitle + trailer beside it
        build_work_dir(film)                                # finished pipeline run, stamps recorded
        d = runner.start([Library(lib)])                    # returns once `ping` answers (READY)
        replace_in_place(film.path)
        wait_for(lambda: video_invalidated(film), what="work dir invalidated")

Helpers return plain data; assertions live in the tests. The package is imported as ``tests.harness``
from the repository root (pytest puts it on ``sys.path``; the benchmarks run as ``python -m bench.x``).
"""
