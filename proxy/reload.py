"""Config hot reload: SIGHUP, or the file changing on disk (polled; no watcher dependency).

The new file is read and validated fully first, in a thread (a big or hostile file never
blocks the event loop). If anything goes wrong, whatever it is (an invalid file, bytes that
are not UTF-8, nesting deep enough to exhaust the parser, a storage URI that cannot be
used, an error while building the runtime), the config in force stays, the error is logged
and counted in ``llm_proxy_config_reloads_total{result="failure"}``, and the watcher goes
on: a later valid file is picked up. Otherwise a new runtime snapshot is built (carrying over what
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
from proxy.config import Config, ConfigError, load_config
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
        gate: Callable[[Config], str | None] = lambda config: None,
    ) -> None:
        self.path = path
        self._gate = gate  # why a new config must not be served (closed by default)
        self._current = current
        self._swap = swap
        self.interval = interval
        self._stamp = self._file_stamp()
        self._lock = asyncio.Lock()
        self._retiring: set[asyncio.Task[None]] = set()
        self._pending: set[asyncio.Future[bool]] = set()

    def install_signal_handler(self) -> None:
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop = asyncio.get_running_loop()
            loop.add_signal_handler(signal.SIGHUP, self._on_sighup)

    def _on_sighup(self) -> None:
        task = asyncio.ensure_future(self.reload("SIGHUP"))
        self._pending.add(task)  # a reference, so the task is not collected half-way
        task.add_done_callback(self._pending.discard)

    async def watch(self) -> None:
        """Poll the file's modification time and size; reload when they change. Survives
        anything a reload can raise."""
        while True:
            await asyncio.sleep(self.interval)
            try:
                stamp = self._file_stamp()
                if stamp != self._stamp:
                    self._stamp = stamp
                    await self.reload("file changed")
            except Exception:  # reload() catches everything; this is the last resort
                metrics.CONFIG_RELOADS.labels("failure").inc()
                log.exception("config watcher: unexpected error; watching on")

    async def reload(self, reason: str) -> bool:
        """Load the file and swap the runtime in; False (logged, counted) when anything fails."""
        async with self._lock:
            try:
                return await self._reload(reason)
            except Exception as exc:
                metrics.CONFIG_RELOADS.labels("failure").inc()
                log.error(
                    "config reload (%s) failed; the config in force stays: %s",
                    reason,
                    _describe(exc),
                )
                return False

    async def _reload(self, reason: str) -> bool:
        old = self._current()
        config = await asyncio.to_thread(load_config, self.path)
        if config.digest == old.config.digest:
            return True  # touched, not changed
        refused = self._gate(config)
        if refused is not None:
            raise ConfigError(self.path, "clients", refused)
        new = build_runtime(config, previous=old)
        try:
            await new.start()
        except BaseException:
            await new.retire(old)  # stop what started; close only what old does not use
            raise
        else:
            self._swap(new)
            metrics.CONFIG_RELOADS.labels("success").inc()
            log.info(
                "config reloaded (%s): %s, sha256 %s; %s",
                reason,
                self.path,
                config.digest[:12],
                new.summary(),
            )
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


def _describe(exc: Exception) -> str:
    """The error for the log: a config error says where and why; anything else its type and
    a bounded message (never a secret: values in config errors are the config's business)."""
    if isinstance(exc, ConfigError):
        return str(exc)
    return f"{type(exc).__name__}: {str(exc)[:300]}"
