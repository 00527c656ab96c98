"""Pre-warming SceneDescription caches: the queue, the overnight window, the VRAM check and the
supervised worker process.

``scheduler`` composes one owner per question: ``backlog`` (which film next; ``jobqueue`` orders),
``gate`` (may a job run now), ``placement`` (GPU, CPU or wait; ``vram``, ``probe``), ``localjob`` (the
running ``python -m cinecut.worker`` child, run by ``supervisor``, and what became of it), ``ledger``
(outcomes and failures, local and remote alike), ``report`` (status); ``remote`` and its ``remote_*``
modules run the same films on other hosts through RQ. ``writers`` tells whether a film is still open
for writing.
"""

from cinecutd.prewarm.scheduler import PrewarmScheduler

__all__ = ["PrewarmScheduler"]
