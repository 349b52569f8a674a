"""Many clients, one upstream key: each client's objects are its own. With the real openai
SDK, two client keys (team-a, team-b) and a fake upstream that keeps objects per upstream
key (both clients share the operator's one key, so only the proxy can keep them apart):
every object team-a makes is a 404 for team-b (retrieve, content, delete, cancel, continue
with previous_response_id, name it in a body), nothing of those reaches the upstream, lists
show each client its own objects only, and team-a's lists stay whole. In memory and with a
real redis-server shared by two replicas."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest

from tests.conftest import ProxyProcess, RedisServer, ResourceUpstream, start_proxy

KEY = "sk-own-1111111111111111aaaa"
TEAM_A, TEAM_B, OPS = "ck-team-a-0000000001", "ck-team-b-0000000002", "ck-ops-000000000003"


def config(upstream: ResourceUpstream, extra: str = "") -> str:
    return f"""
throttle: {{reconnect: {{enabled: false}}}}
{extra}
clients:
  - {{id: team-a, key: "{TEAM_A}"}}
  - {{id: team-b, key: "{TEAM_B}", models: ["cheap-*"]}}
  - {{id: ops, key: "{OPS}", objects: shared}}
backends:
  openai:
    base_url: {upstream.url}/v1
    keys: [{{id: one, key: "{KEY}"}}]
routes:
  - {{prefix: "", backend: openai}}
default_backend: openai
"""


@pytest.fixture(scope="module", params=["memory", "redis"])
def proxies(
    request: pytest.FixtureRequest,
    resources: ResourceUpstream,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[ProxyProcess, ProxyProcess]]:
    """Two proxies: the same process twice in memory; two replicas sharing Redis."""
    if request.param == "memory":
        one = start_proxy(config(resources), tmp_path_factory.mktemp("own-mem"))
        yield one, one
        one.stop()
        return
    redis_server: RedisServer = request.getfixturevalue("redis_server")
    text = config(resources, f"storage: {redis_server.url}")
    one = start_proxy(text, tmp_path_factory.mktemp("own-r1"))
    two = start_proxy(text, tmp_path_factory.mktemp("own-r2"))
    yield one, two
    one.stop()
    two.stop()


def sdk(proxy: ProxyProcess, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.base_url, api_key=key, max_retries=0)


def not_found(call: Callable[[], Any]) -> dict[str, Any]:
    with pytest.raises(openai.NotFoundError) as raised:
        call()
    body = raised.value.body
    assert isinstance(body, dict)
    return body


def batch_line(question: str = "q") -> bytes:
    """One line of a batch file (the proxy checks each: a model team-b may use too)."""
    body = {"model": "cheap-mini", "messages": [{"role": "user", "content": question}]}
    return (
        orjson.dumps(
            {"custom_id": "q1", "method": "POST", "url": "/v1/chat/completions", "body": body}
        )
        + b"\n"
    )


def test_team_as_objects_are_404_for_team_b_and_nothing_reaches_the_upstream(
    proxies: tuple[ProxyProcess, ProxyProcess], resources: ResourceUpstream
) -> None:
    made_on, asked_on = proxies  # with Redis: made on one replica, asked on the other
    a, b = sdk(made_on, TEAM_A), sdk(asked_on, TEAM_B)
    file = a.files.create(file=("notes.jsonl", batch_line("my secret question")), purpose="batch")
    batch = a.batches.create(
        input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    response = a.responses.create(model="gpt-4o", input="my secret prompt")
    resources.forget()

    refusals = {
        "retrieve file": lambda: b.files.retrieve(file.id),
        "file content": lambda: b.files.content(file.id),
        "delete file": lambda: b.files.delete(file.id),
        "retrieve batch": lambda: b.batches.retrieve(batch.id),
        "cancel batch": lambda: b.batches.cancel(batch.id),
        "batch of a's file": lambda: b.batches.create(
            input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
        ),
        "retrieve response": lambda: b.responses.retrieve(response.id),
        "continue response": lambda: b.responses.create(
            model="cheap-1", input="and then?", previous_response_id=response.id
        ),
        "a's file as input": lambda: b.responses.create(
            model="cheap-1",
            input=[{"role": "user", "content": [{"type": "input_file", "file_id": file.id}]}],
        ),
    }
    bodies = {name: not_found(call) for name, call in refusals.items()}
    assert bodies["retrieve file"] == {
        "message": f"No such File object: {file.id}",
        "type": "invalid_request_error",
        "param": "id",
        "code": None,
    }
    assert bodies["cancel batch"]["message"] == f"No such Batch object: {batch.id}"
    assert bodies["continue response"]["message"] == (
        f"Response with id '{response.id}' not found."
    )
    assert resources.requests() == []  # none of them was sent upstream

    # Lists: the upstream hands every object of its key out; each client sees its own.
    assert [f.id for f in b.files.list()] == []
    assert [x.id for x in b.batches.list()] == []
    assert file.id in [f.id for f in a.files.list()]
    assert batch.id in [x.id for x in a.batches.list()]

    # team-a still has everything, on either replica, and may delete its own.
    assert a.files.retrieve(file.id).id == file.id
    assert sdk(asked_on, TEAM_A).files.content(file.id).read() != b""
    assert a.batches.cancel(batch.id).status == "cancelling"
    follow = sdk(asked_on, TEAM_A).responses.create(
        model="gpt-4o", input="and then?", previous_response_id=response.id
    )
    assert follow.previous_response_id == response.id
    assert a.files.delete(file.id).deleted is True


def test_team_bs_own_objects_work_and_a_shared_client_sees_everyones(
    proxies: tuple[ProxyProcess, ProxyProcess],
) -> None:
    one, two = proxies
    a, b, ops = sdk(one, TEAM_A), sdk(two, TEAM_B), sdk(two, OPS)
    mine = b.files.create(file=("b.jsonl", batch_line()), purpose="batch")
    theirs = a.files.create(file=("a.jsonl", batch_line()), purpose="batch")
    assert b.files.retrieve(mine.id).id == mine.id
    listed_b = [f.id for f in b.files.list()]
    assert mine.id in listed_b and theirs.id not in listed_b
    not_found(lambda: a.files.retrieve(mine.id))
    assert ops.files.retrieve(theirs.id).id == theirs.id  # objects: shared
    listed_ops = [f.id for f in ops.files.list()]
    assert {mine.id, theirs.id} <= set(listed_ops)


def test_an_id_the_proxy_never_recorded_is_refused_for_a_client(
    proxies: tuple[ProxyProcess, ProxyProcess], resources: ResourceUpstream
) -> None:
    one, _ = proxies
    resources.forget()
    body = not_found(lambda: sdk(one, TEAM_A).files.retrieve("file-made-elsewhere"))
    assert body["message"] == "No such File object: file-made-elsewhere"
    assert resources.requests() == []


def test_objects_unknown_allow_sends_an_unrecorded_id_on(
    resources: ResourceUpstream, tmp_path: Path
) -> None:
    proxy = start_proxy(config(resources, "objects: {unknown: allow}"), tmp_path)
    try:
        resources.forget()
        answer = httpx.get(
            f"{proxy.base_url}/files/file-made-elsewhere",
            headers={"authorization": f"Bearer {TEAM_A}"},
        )
        assert answer.status_code == 404  # the upstream's own: it has no such file
        assert [r["path"] for r in resources.requests()] == ["/v1/files/file-made-elsewhere"]
    finally:
        proxy.stop()


def test_one_clients_stored_completions_do_not_evict_anothers_placements(
    resources: ResourceUpstream, tmp_path: Path
) -> None:
    """team-b makes 40 stored completions on a proxy holding 10 ids per client (and 25 in
    all): team-a's completion and file are still found, and still refused to team-b."""
    text = config(resources, "objects: {max_entries: 25, max_entries_per_client: 10}")
    proxy = start_proxy(text, tmp_path)
    try:
        a, b = sdk(proxy, TEAM_A), sdk(proxy, TEAM_B)
        hello = [{"role": "user", "content": "hi"}]
        kept = a.chat.completions.create(model="gpt-4o", messages=hello, store=True)
        file = a.files.create(file=("a.jsonl", batch_line()), purpose="batch")
        for _ in range(40):
            b.chat.completions.create(model="cheap-1", messages=hello, store=True)
        resources.forget()
        assert a.chat.completions.retrieve(kept.id).id == kept.id
        assert a.files.retrieve(file.id).id == file.id
        not_found(lambda: b.chat.completions.retrieve(kept.id))
        assert [r["path"] for r in resources.requests()] == [
            f"/v1/chat/completions/{kept.id}",
            f"/v1/files/{file.id}",
        ]
    finally:
        proxy.stop()


def test_a_list_page_is_filled_from_further_upstream_pages_and_the_sdk_pages_on(
    resources: ResourceUpstream, tmp_path: Path
) -> None:
    """team-b's 45 files between team-a's would leave team-a short pages: the proxy reads
    on (up to 5 upstream pages) and the SDK's auto-pagination finds all of team-a's."""
    proxy = start_proxy(config(resources), tmp_path)
    try:
        a, b = sdk(proxy, TEAM_A), sdk(proxy, TEAM_B)
        before = [a.files.create(file=("a.jsonl", batch_line()), purpose="batch").id for _ in "12"]
        for _ in range(45):
            b.files.create(file=("b.jsonl", batch_line()), purpose="batch")
        after = a.files.create(file=("a.jsonl", batch_line()), purpose="batch").id
        mine = {*before, after}
        page = a.files.list(limit=20)
        assert {f.id for f in page.data} == mine  # one page, from three upstream pages
        assert page.has_more is False
        small = [f.id for f in a.files.list(limit=2)]  # auto-paging: 2 at a time
        assert sorted(small) == sorted(mine)  # each once, none missing
        assert not {f.id for f in b.files.list(limit=20)} & mine
    finally:
        proxy.stop()


@pytest.mark.filterwarnings("ignore:The Evals API is deprecated:DeprecationWarning")
def test_every_other_object_type_of_team_a_is_404_for_team_b(
    proxies: tuple[ProxyProcess, ProxyProcess], resources: ResourceUpstream
) -> None:
    """Vector stores, conversations, containers, fine-tuning jobs and their models, evals,
    uploads: made by team-a, each is a 404 for team-b (retrieve, delete, cancel, list), with
    nothing sent upstream; team-a keeps them."""
    made_on, asked_on = proxies
    a, b = sdk(made_on, TEAM_A), sdk(asked_on, TEAM_B)
    made = {
        "vector store": a.vector_stores.create(name="a's store").id,
        "conversation": a.conversations.create().id,
        "container": a.containers.create(name="a's box").id,
        "fine-tuning job": a.fine_tuning.jobs.create(model="gpt-4o-mini", training_file="f").id,
        "eval": a.evals.create(
            name="a's eval",
            data_source_config={"type": "custom", "item_schema": {}},
            testing_criteria=[],
        ).id,
        "upload": a.uploads.create(
            purpose="batch", filename="a.jsonl", bytes=1, mime_type="text/jsonl"
        ).id,
    }
    job = a.fine_tuning.jobs.retrieve(made["fine-tuning job"])
    assert job.fine_tuned_model is not None
    resources.forget()
    refusals: dict[str, Callable[[], Any]] = {
        "retrieve vector store": lambda: b.vector_stores.retrieve(made["vector store"]),
        "delete vector store": lambda: b.vector_stores.delete(made["vector store"]),
        "retrieve conversation": lambda: b.conversations.retrieve(made["conversation"]),
        "delete conversation": lambda: b.conversations.delete(made["conversation"]),
        "continue conversation": lambda: b.responses.create(
            model="cheap-1", input="hi", conversation=made["conversation"]
        ),
        "retrieve container": lambda: b.containers.retrieve(made["container"]),
        "delete container": lambda: b.containers.delete(made["container"]),
        "retrieve job": lambda: b.fine_tuning.jobs.retrieve(made["fine-tuning job"]),
        "cancel job": lambda: b.fine_tuning.jobs.cancel(made["fine-tuning job"]),
        "retrieve eval": lambda: b.evals.retrieve(made["eval"]),
        "delete eval": lambda: b.evals.delete(made["eval"]),
        "cancel upload": lambda: b.uploads.cancel(made["upload"]),
    }
    for name, call in refusals.items():
        assert not_found(call)["type"] == "invalid_request_error", name
    # team-a's fine-tuned model is team-a's: team-b may not even name it.
    with pytest.raises(openai.APIStatusError) as raised:
        b.chat.completions.create(model=str(job.fine_tuned_model), messages=[])
    assert raised.value.status_code in (403, 404)
    assert resources.requests() == []  # none of them was sent upstream

    assert [v.id for v in b.vector_stores.list()] == []
    assert [c.id for c in b.containers.list()] == []
    assert [j.id for j in b.fine_tuning.jobs.list()] == []
    assert [e.id for e in b.evals.list()] == []
    assert made["vector store"] in [v.id for v in a.vector_stores.list()]
    assert made["eval"] in [e.id for e in a.evals.list()]
    assert (
        sdk(asked_on, TEAM_A).conversations.retrieve(made["conversation"]).id
        == (made["conversation"])
    )
    a.containers.delete(made["container"])  # its own: allowed (a 404 would raise)
    assert made["container"] not in [c.id for c in a.containers.list()]
