"""The short fuzz run (`make fuzz` runs the long one), and the fuzzer's own checks.

The run throws random requests, hostile upstream answers and hostile config files at a real
proxy for a few seconds and must find no invariant break. The checks below it are tested on
hand-made answers, so a check that cannot fail is noticed here, not in production.
"""

from __future__ import annotations

import orjson
import pytest

from tests.fuzz import (
    FORGED,
    SECRETS_ENV,
    Case,
    Result,
    check_case,
    check_log,
    metric_series,
    run_fuzz,
    well_formed,
)

UPSTREAM_KEY = SECRETS_ENV["FUZZ_UPSTREAM_KEY_A"]


@pytest.mark.serial  # a time-boxed run whose invariants include latency and memory bounds
def test_short_fuzz_run_breaks_no_invariant(tmp_path):
    report = run_fuzz(seconds=5, seed=10, concurrency=6, out=tmp_path)
    assert report.cases > 100  # it did throw things (a stuck harness finds nothing)
    assert report.witness_cases > 20  # the other client identity was asked all along
    assert report.reloads >= 2 and report.checks >= 2
    assert report.ok, "\n" + report.render()


def _case(**kwargs) -> Case:
    body = kwargs.pop("body", '{"model": "h-a"}')
    headers = [["Host", "x"], ["Content-Length", str(len(body))]]
    target = kwargs.pop("target", "/v1/chat/completions")
    return Case(method="POST", target=target, headers=headers, body=body, **kwargs)


def _error(status: int, code: str = "x") -> Result:
    body = orjson.dumps({"error": {"message": "m", "type": "t", "param": None, "code": code}})
    return Result(
        status=status, headers=[("content-type", "application/json")], body=body, complete=True
    )


def _invariants(case: Case, result: Result) -> set[str]:
    return {invariant for invariant, _ in check_case(case, result, in_config_window=False)}


def test_a_documented_openai_error_passes():
    assert _invariants(_case(), _error(404, "model_not_found")) == set()
    assert (
        _invariants(_case(plan_status=418, plan_kind="status"), Result(418, [], b"<html>", True))
        == set()
    )


def test_internal_errors_plain_bodies_and_odd_statuses_are_breaks():
    assert "internal error" in _invariants(_case(), _error(500, "internal_error"))
    plain = Result(400, [("content-type", "text/plain")], b"Invalid HTTP request received.", True)
    assert "error not OpenAI-shaped" in _invariants(_case(), plain)
    assert "undocumented status" in _invariants(_case(), Result(307, [], b"", True))
    assert "undocumented status" in _invariants(
        _case(plan_status=None, plan_kind="status"), Result(101, [], b"", True)
    )
    traceback = Result(502, [], b"Traceback (most recent call last):\n  File", True)
    assert "traceback in response" in _invariants(_case(), traceback)


def test_a_secret_anywhere_in_the_answer_is_a_break():
    encoded = "sk-fuzz%2BUP%2Fstream%3Db9c8d7e6f5e4"  # FUZZ_UPSTREAM_KEY_B, URL-encoded
    in_header = Result(200, [("x-request-id", f"Bearer {UPSTREAM_KEY}")], b"{}", True)
    in_body = Result(401, [], encoded.encode(), True)
    assert "secret in response" in _invariants(_case(), in_header)
    assert "secret in response" in _invariants(_case(plan_status=401), in_body)


def test_hangs_and_silent_streams_are_breaks_but_slow_clients_may_be_closed():
    assert "hang" in _invariants(_case(), Result(timed_out=True, seconds=15))
    assert "hang" in _invariants(_case(send="slow_head"), Result(timed_out=True, seconds=8))
    assert _invariants(_case(send="slow_head"), Result(error="closed", seconds=2.5)) == set()
    sse = [("content-type", "text/event-stream")]
    silent = Result(200, sse, b'data: {"choices": []}\n\n', True)
    errored = Result(
        200, sse, b'data: {"choices": []}\n\ndata: {"error": {"message": "x"}}\n\n', True
    )
    done = Result(200, sse, b"data: {}\n\ndata: [DONE]\n\n", True)
    assert "stream ended silently" in _invariants(_case(plan_kind="stream_cut"), silent)
    assert _invariants(_case(plan_kind="stream_cut"), errored) == set()
    assert _invariants(_case(plan_kind="ok"), done) == set()
    responses = {"target": "/v1/responses", "plan_kind": "stream_cut"}
    cut = Result(200, sse, b"event: response.created\ndata: {}\n\n", True)
    assert "stream ended silently" in _invariants(_case(plan_broken=True, **responses), cut)
    assert _invariants(_case(plan_broken=False, **responses), cut) == set()


def test_a_closed_connection_is_a_break_only_for_a_well_formed_request():
    closed = Result(error="connection closed without a response", complete=True)
    assert "no response" in _invariants(_case(), closed)
    garbage = _case(body="x")
    garbage.headers = [["Host", "x"]]  # a body without a length: the server may hang up
    assert not well_formed(garbage)
    assert _invariants(garbage, closed) == set()


def test_log_checks_catch_forged_lines_tracebacks_secrets_and_plain_lines_in_json_mode():
    good = "2026-11-24T21:00:00.000Z access POST /v1/x status=200\n"
    assert check_log(good, "text") == []
    forged = good + FORGED + " status=200\n"
    assert [p[0] for p in check_log(forged, "text")] == ["log: one line per event"]
    traceback = good + "Traceback (most recent call last):\n  File x\nValueError: boom\n" + good
    assert [(p[0], p[2]) for p in check_log(traceback, "text")] == [
        ("traceback in log", "ValueError: boom")
    ]
    assert check_log(f"{good}key {UPSTREAM_KEY}\n", "text")[0][0] == "secret in log"
    assert [p[0] for p in check_log(good, "json")] == ["log line not JSON"]
    assert check_log('{"a": "x\u2028y"}\n', "json") == []  # U+2028 is no line break
    exc = '{"exception": "Traceback (most recent call last):\\n  File x\\nKeyError: 989"}\n'
    assert [(p[0], p[2]) for p in check_log(exc, "json")] == [("traceback in log", "KeyError: 989")]


def test_metric_labels_are_parsed_for_the_label_check():
    text = '# HELP x\nx_total{model="h-*",status="200"} 1.0\ny 2\n'
    assert metric_series(text) == [("x_total", {"model": "h-*", "status": "200"}), ("y", {})]
