"""JAX's persistent compilation cache, on by default (issue #35): a second run of the same
program reads its compiled executables instead of compiling them again.

``--compile-cache`` names the folder (default ``$JAXPAR_COMPILE_CACHE``, else
``$XDG_CACHE_HOME/jaxpar/jax`` or ``~/.cache/jaxpar/jax``) or ``off``. Every program is cached,
however quickly it compiled (most of the small models' take under JAX's default threshold of a
second); the folder is bounded (`MAX_BYTES`, least recently used out first), which also makes
JAX guard each write with a file lock, so the processes of a job and the test suite's workers
share one folder safely. What the first train step found is said once (`Cache.report`).
"""

import os
from pathlib import Path

import jax

MAX_BYTES = 4 << 30  # 4 GiB; JAX evicts the least recently used entries beyond it


def folder(setting: str | None) -> Path | None:
    """The cache's folder for ``--compile-cache`` `setting` (None: the default), or None: off."""
    if setting == "off":
        return None
    if setting is not None:
        return Path(setting).expanduser()
    if os.environ.get("JAXPAR_COMPILE_CACHE"):
        return folder(os.environ["JAXPAR_COMPILE_CACHE"])
    home = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(home) / "jaxpar" / "jax"


class Cache:
    """The process's compilation cache, set once per folder, and a count of its hits."""

    used: Path | None = None
    hits = requests = 0
    listening = False

    @classmethod
    def use(cls, setting: str | None) -> Path | None:
        """Point JAX's persistent cache at `setting`'s folder (or turn it off) before anything
        compiles; a later run in the same process with another setting moves it."""
        path = folder(setting)
        if path != cls.used:
            from jax.experimental.compilation_cache import compilation_cache

            compilation_cache.reset_cache()  # JAX reads the folder once; a new one needs this
            jax.config.update("jax_compilation_cache_dir", str(path) if path else None)
            jax.config.update("jax_enable_compilation_cache", path is not None)
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
            jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
            jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
            cls.used = path
        if not cls.listening:
            jax.monitoring.register_event_listener(cls._count)
            cls.listening = True
        return path

    @classmethod
    def _count(cls, event: str, **_) -> None:
        if event == "/jax/compilation_cache/cache_hits":
            cls.hits += 1
        elif event == "/jax/compilation_cache/compile_requests_use_cache":
            cls.requests += 1

    @classmethod
    def report(cls, before: tuple[int, int], what: str) -> str:
        """A line saying whether `what`'s compilation, begun at counts `before` (``(hits,
        requests)`` from `counts`), read the cache."""
        if cls.used is None:
            return f"compilation cache off: {what} compiled"
        hits, requests = cls.hits - before[0], cls.requests - before[1]
        found = "found in" if hits and hits == requests else "compiled and saved to"
        return f"{what} {found} the compilation cache {cls.used}"

    @classmethod
    def counts(cls) -> tuple[int, int]:
        return cls.hits, cls.requests
