"""Config hot reload: SIGHUP, or the file changing on disk (polled; no watcher dependency).

The new file is validated fully first. If it is invalid, the config in force stays, and the
error is logged and counted. Otherwise a new runtime snapshot is built (carrying over what
is still true, see ``build_runtime``) and swapped in with one assignment; requests that
began on the old snapshot, streams included, finish on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable

from proxy import metrics
from proxy.config import ConfigError, load_config
from proxy.runtime import Runtime, build_runtime

log = logging.getLogger("proxy.reload")

POLL_INTERVAL = 1.0


class Reloader:
    def __init__(
        self,
        path: str,
        current: Callable[[], Runtime],
        swap: Callable[[Runtime], None],
        interval: float = POLL_INTERVAL,
    ) -> None:
        self.path = path
        self._current = current
        self._swap = swap
        self.interval = interval
        self._stamp = self._file_stamp()
        self._lock = asyncio.Lock()
        self._retiring: set[asyncio.Task[None]] = set()

    def install_signal_handler(self) -> None:
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop = asyncio.get_running_loop()
            loop.add_signal_handler(
                signal.SIGHUP, lambda: asyncio.ensure_future(self.reload("SIGHUP"))
            )

    async def watch(self) -> None:
        """Poll the file's modification time and size; reload when they change."""
        while True:
            await asyncio.sleep(self.interval)
            stamp = self._file_stamp()
            if stamp != self._stamp:
                self._stamp = stamp
                await self.reload("file changed")

    async def reload(self, reason: str) -> bool:
        async with self._lock:
            old = self._current()
            try:
                config = load_config(self.path)
            except ConfigError as exc:
                metrics.CONFIG_RELOADS.labels("failure").inc()
                log.error("config reload (%s) failed; the config in force stays: %s", reason, exc)
                return False
            if config.digest == old.config.digest:
                return True  # touched, not changed
            new = build_runtime(config, previous=old)
            await new.start()
            self._swap(new)
            metrics.CONFIG_RELOADS.labels("success").inc()
            log.warning(
                "config reloaded (%s): %s, sha256 %s", reason, self.path, config.digest[:12]
            )
            new.report()
            task = asyncio.create_task(old.retire(new))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
            return True

    def _file_stamp(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size
