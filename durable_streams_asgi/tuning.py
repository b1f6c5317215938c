"""Process-wide settings that a server of many live connections wants, for the host to opt into.

The library never changes them by itself: they belong to the whole process. The standalone
server (``durable-streams-asgi serve``) applies them in every worker.
"""

from __future__ import annotations

import gc

# Measured with bench/ (500 long-poll readers on one stream, memory storage, one worker): the
# default threshold of 700 gave a delivery p50 of 42-64 ms, growing as the process aged; 10,000
# gave 17-18 ms, steady.
DEFAULT_GC_THRESHOLD = 10_000


def tune_gc(threshold: int = DEFAULT_GC_THRESHOLD) -> None:
    """Make Python's cyclic garbage collector run less often, and never over startup objects.

    Every request allocates a few dozen tracked objects (the scope, header lists, its task,
    coroutine frames, futures) that reference counting frees at once. With the default young
    generation threshold (700 allocations) a burst of requests, such as an append waking hundreds
    of long-poll readers, still runs a young collection every few requests, and each one walks
    every object then alive, including the suspended state of every other open connection, and
    promotes it, which soon makes the older generations' full passes frequent too. A threshold
    of ``threshold`` allocations makes that work rare; the memory it lets wait for collection is
    bounded by that many small objects. ``gc.freeze()`` moves everything allocated so far (modules,
    the app) out of the collector's sight: it is never garbage.

    Call it once at startup, after the app is built (for example in a lifespan handler).
    """
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(threshold, max(gen1, 20), max(gen2, 20))
