"""pytest plugin loaded into the openai-python SDK's own test run by scripts/sdk_suite.py.

It records, for every test, the HTTP requests that really left the SDK (method, path,
content type, body size, response status) and its outcome with the failure's last lines,
as one JSON object a line in $SDK_SUITE_RESULTS. Requests answered by the SDK tests' own
respx mocks never reach a transport, so "reached the server" means what it says.

Runs inside the SDK's venv (httpx2, pytest, xdist), not the proxy's: keep it stdlib + those.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Generator
from typing import Any

import pytest

_requests: list[dict[str, Any]] = []  # requests of the test running in this process
_PROPERTY = "sdk_suite_requests"


def _describe(request: Any) -> dict[str, Any]:
    """What the mock or the proxy was asked, without reading a streamed body."""
    content_type = request.headers.get("content-type", "")
    length = request.headers.get("content-length")
    return {
        "method": request.method,
        "path": request.url.path,
        "content_type": content_type.split(";")[0].strip().lower(),
        "length": int(length) if length is not None and length.isdigit() else None,
        "status": None,
    }


def _wrap_sync(original: Callable[..., Any]) -> Callable[..., Any]:
    def handle_request(self: Any, request: Any) -> Any:
        entry = _describe(request)
        _requests.append(entry)
        response = original(self, request)
        entry["status"] = response.status_code
        return response

    return handle_request


def _wrap_async(original: Callable[..., Any]) -> Callable[..., Any]:
    async def handle_async_request(self: Any, request: Any) -> Any:
        entry = _describe(request)
        _requests.append(entry)
        response = await original(self, request)
        entry["status"] = response.status_code
        return response

    return handle_async_request


def _patch_transports() -> None:
    # The transports, not the clients: the SDK tests' respx2 mocks swap the transport per
    # URL, so a mocked call never comes through here.
    import httpx2

    httpx2.HTTPTransport.handle_request = _wrap_sync(httpx2.HTTPTransport.handle_request)  # type: ignore[method-assign]
    httpx2.AsyncHTTPTransport.handle_async_request = _wrap_async(  # type: ignore[method-assign]
        httpx2.AsyncHTTPTransport.handle_async_request
    )
    try:
        from openai._vendor.httpx_aiohttp.transport import AiohttpTransport
    except ImportError:  # an SDK without the aiohttp adapter
        return
    AiohttpTransport.handle_async_request = _wrap_async(  # type: ignore[method-assign]
        AiohttpTransport.handle_async_request
    )


_patch_transports()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    _requests.clear()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Any, None]:
    outcome = yield
    report = outcome.get_result()
    # user_properties travel with the report from an xdist worker to the controller.
    report.user_properties.append((_PROPERTY, json.dumps(_requests)))


class _Results:
    """Folds the setup/call/teardown reports of each test into one line of the results file."""

    def __init__(self, path: str) -> None:
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed at session end)
        self._pending: dict[str, dict[str, Any]] = {}

    def add(self, report: pytest.TestReport) -> None:
        entry = self._pending.setdefault(
            report.nodeid, {"id": report.nodeid, "outcome": "passed", "message": "", "requests": []}
        )
        for name, value in report.user_properties:
            if name == _PROPERTY and report.when in ("call", "setup"):
                entry["requests"] = json.loads(str(value))
        if report.failed:
            entry["outcome"] = "failed" if report.when == "call" else "error"
            entry["message"] = _failure_tail(report)
        elif report.skipped and entry["outcome"] == "passed":
            entry["outcome"] = "skipped"
            entry["message"] = _failure_tail(report)
        if report.when == "teardown":
            self._file.write(json.dumps(self._pending.pop(report.nodeid)) + "\n")
            self._file.flush()  # a run cut short by its timeout keeps what it finished

    def close(self) -> None:
        # Tests still pending here were cut short (the run's timeout): they have no outcome.
        self._file.close()


def _failure_tail(report: pytest.TestReport) -> str:
    """The `E ...` lines of a traceback (the exception and its message), else its end."""
    text = report.longreprtext
    error_lines = [line[1:].strip() for line in text.splitlines() if line.startswith("E ")]
    return "\n".join(error_lines[-6:]) if error_lines else text[-600:]


_results: _Results | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _results
    path = os.environ.get("SDK_SUITE_RESULTS")
    # Only the controller writes (or the single process without xdist).
    if path and not hasattr(config, "workerinput"):
        _results = _Results(path)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if _results is not None:
        _results.add(report)


def pytest_unconfigure(config: pytest.Config) -> None:
    if _results is not None:
        _results.close()
