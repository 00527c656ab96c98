"""Pre-warming SceneDescription caches: the queue, the overnight window, the VRAM check and the
supervised worker process.

``scheduler`` decides which film runs when; ``supervisor`` runs one ``python -m cinecut.worker`` child
and turns its exit into an outcome; ``vram`` decides GPU, CPU or wait; ``probe`` asks the worker's
interpreter whether llama.cpp can offload; ``jobqueue`` orders films; ``writers`` tells whether a film is
still open for writing.
"""

from cinecutd.prewarm.scheduler import PrewarmScheduler

__all__ = ["PrewarmScheduler"]
