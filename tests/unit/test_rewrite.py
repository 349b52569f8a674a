from __future__ import annotations

from proxy.rewrite import NO_RULES, RewriteRules, apply, error_annotations

RULES = RewriteRules(
    rename=(("max_completion_tokens", "max_tokens"),),
    clamp=(("temperature", 0.0, 1.0), ("n", 1.0, 5.0)),
    drop=("functions",),
    set=(("safe_mode", True),),
)


def test_each_operation():
    payload = {
        "model": "m",
        "max_completion_tokens": 50,
        "temperature": 1.7,
        "n": 9,
        "functions": [{"name": "f"}],
        "messages": [],
    }
    assert apply(RULES, payload) is True
    assert payload == {
        "model": "m",
        "max_tokens": 50,
        "temperature": 1.0,
        "n": 5,
        "messages": [],
        "safe_mode": True,
    }
    assert isinstance(payload["n"], int)


def test_nothing_to_do_reports_no_change():
    payload = {"model": "m", "temperature": 0.5, "safe_mode": True}
    assert apply(RULES, payload) is False
    assert apply(NO_RULES, payload) is False and not NO_RULES


def test_rename_keeps_an_existing_value_under_the_new_name():
    payload = {"max_completion_tokens": 50, "max_tokens": 10}
    apply(RewriteRules(rename=(("max_completion_tokens", "max_tokens"),)), payload)
    assert payload == {"max_tokens": 10}


def test_clamp_ignores_non_numbers():
    payload = {"temperature": "hot", "n": True}
    assert apply(RULES.merged(NO_RULES), payload) is True  # only `set` changed something
    assert payload["temperature"] == "hot" and payload["n"] is True


def test_no_retry_errors_and_retry_after_from_the_message():
    quota = b'{"error": {"type": "exceeded_current_quota_error", "message": "no balance"}}'
    assert error_annotations(429, [], quota, frozenset({"exceeded_current_quota_error"})) == [
        (b"x-should-retry", b"false")
    ]
    slow = (
        b'{"error": {"type": "rate_limit_reached_error",'
        b' "message": "please try again after 7 seconds"}}'
    )
    assert error_annotations(429, [], slow, frozenset()) == [(b"retry-after", b"7")]
    assert error_annotations(429, [(b"retry-after", b"3")], slow, frozenset()) == []
    assert error_annotations(500, [], b"not json", frozenset({"x"})) == []
