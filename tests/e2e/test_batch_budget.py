"""A batch's tokens against its client's budget, with the real openai SDK: estimated as its
file's lines are checked, charged when the batch is made (refused when it does not fit,
nothing sent), corrected to the upstream's usage when the batch is seen ended, once, and
counted in the token and cost metrics."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import orjson
import pytest

from tests.conftest import ProxyProcess, ResourceUpstream, start_proxy
from tests.e2e.test_resources import KEY_1

TEAM_A = "team-a-batch-budget-0001"
TEAM_B = "team-b-batch-budget-0002"
TEAM_C = "team-c-batch-budget-0003"
ADMIN = "ak-batch-budget-admin-000"
MAX_TOKENS = 100
PRICE_IN, PRICE_OUT = 2.0, 8.0  # USD per million tokens
# Three lines (see `line`) estimate about 3 x (40 + 100) tokens: two batches fit, a third not.
BUDGET = 900


def config(upstream: ResourceUpstream) -> str:
    return f"""
throttle: {{reconnect: {{enabled: false}}}}
server: {{admin_key: "{ADMIN}"}}
clients:
  - {{id: team-a, key: "{TEAM_A}", budget: {{tokens: {BUDGET}, per: day}}}}
  - {{id: team-b, key: "{TEAM_B}"}}
  - {{id: team-c, key: "{TEAM_C}", budget: {{usd: 1, per: month}}}}
backends:
  openai:
    base_url: {upstream.url}/v1
    keys: [{{id: one, key: "{KEY_1}"}}]
pricing:
  priced-model: {{input: {PRICE_IN}, output: {PRICE_OUT}}}
routes:
  - {{prefix: "", backend: openai}}
default_backend: openai
"""


@pytest.fixture(scope="module")
def proxy(
    resources: ResourceUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    process = start_proxy(config(resources), tmp_path_factory.mktemp("batch-budget"))
    yield process
    process.stop()


def line(number: int, model: str = "priced-model") -> bytes:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": f"question {number}"}],
        "max_tokens": MAX_TOKENS,
    }
    request = {"custom_id": f"q{number}", "method": "POST", "url": "/v1/chat/completions"}
    return orjson.dumps({**request, "body": body}) + b"\n"


def estimate(data: bytes) -> int:
    """What the proxy reserves for a file: each line's bytes / 4 plus its max_tokens."""
    return sum(len(text) // 4 + MAX_TOKENS for text in data.splitlines() if text.strip())


def used(proxy: ProxyProcess, client: str) -> float:
    answer = httpx.get(f"{proxy.url}/admin/usage", headers={"authorization": f"Bearer {ADMIN}"})
    [budget] = answer.json()["clients"][client]
    assert budget["reserved"] == 0
    return float(budget["used"])


def scrape(proxy: ProxyProcess) -> list[str]:
    answer = httpx.get(f"{proxy.url}/metrics", headers={"authorization": f"Bearer {ADMIN}"})
    assert answer.status_code == 200
    return answer.text.splitlines()


def tokens_metric(proxy: ProxyProcess, client: str, kind: str) -> float:
    total = 0.0
    for text in scrape(proxy):
        mine = f'client="{client}"' in text and f'type="{kind}"' in text
        if text.startswith("llm_proxy_tokens_total{") and mine:
            total += float(text.rsplit(" ", 1)[1])
    return total


def cost_metric(proxy: ProxyProcess, client: str) -> float:
    for text in scrape(proxy):
        if text.startswith("llm_proxy_cost_usd_total{") and f'client="{client}"' in text:
            return float(text.rsplit(" ", 1)[1])
    return 0.0


def end(resources: ResourceUpstream, batch_id: str, prompt: int, completion: int) -> None:
    usage = {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + completion,
    }
    ended = httpx.post(
        f"{resources.url}/_mock/batches/{batch_id}", json={"status": "completed", "usage": usage}
    )
    assert ended.status_code == 200


def batch_posts(resources: ResourceUpstream) -> int:
    return sum(
        1 for r in resources.requests() if r["path"] == "/v1/batches" and r["method"] == "POST"
    )


def make_batch(api: openai.OpenAI, data: bytes) -> str:
    uploaded = api.files.create(file=("batch.jsonl", data), purpose="batch")
    made = api.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    return made.id


def test_a_batch_is_charged_its_estimate_refused_when_it_does_not_fit_and_settled_to_its_usage(
    proxy: ProxyProcess, resources: ResourceUpstream
) -> None:
    api = openai.OpenAI(base_url=proxy.base_url, api_key=TEAM_A, max_retries=0)
    data = line(1) + line(2) + line(3)
    first = make_batch(api, data)
    assert used(proxy, "team-a") == estimate(data)  # charged when made
    make_batch(api, data)
    assert used(proxy, "team-a") == 2 * estimate(data)

    uploaded = api.files.create(file=("batch.jsonl", data), purpose="batch")
    sent = batch_posts(resources)
    with pytest.raises(openai.RateLimitError) as raised:
        api.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
    error = raised.value.response.json()["error"]
    assert error["code"] == "budget_exceeded"
    assert raised.value.response.headers["x-should-retry"] == "false"
    assert batch_posts(resources) == sent  # nothing sent upstream
    assert used(proxy, "team-a") == 2 * estimate(data)  # the refusal holds nothing

    # The first batch ran upstream and used 30 + 20 tokens: seen through the proxy, its
    # charge is corrected to that, and its tokens are counted, once however often polled.
    end(resources, first, 30, 20)
    before = tokens_metric(proxy, "team-a", "prompt"), tokens_metric(proxy, "team-a", "completion")
    for _ in range(3):
        assert api.batches.retrieve(first).status == "completed"
        api.batches.list()
    assert used(proxy, "team-a") == estimate(data) + 50
    assert tokens_metric(proxy, "team-a", "prompt") == before[0] + 30
    assert tokens_metric(proxy, "team-a", "completion") == before[1] + 20

    # Now the third fits.
    made = api.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert made.id.startswith("batch_")
    assert used(proxy, "team-a") == 2 * estimate(data) + 50


def test_a_clients_batch_without_a_budget_has_its_tokens_and_cost_counted_once(
    proxy: ProxyProcess, resources: ResourceUpstream
) -> None:
    api = openai.OpenAI(base_url=proxy.base_url, api_key=TEAM_B, max_retries=0)
    batch = make_batch(api, line(1) + line(2))
    end(resources, batch, 1000, 500)
    before = tokens_metric(proxy, "team-b", "prompt"), cost_metric(proxy, "team-b")
    listed = [b.id for b in api.batches.list()]
    assert batch in listed
    api.batches.retrieve(batch)
    assert tokens_metric(proxy, "team-b", "prompt") == before[0] + 1000
    assert tokens_metric(proxy, "team-b", "completion") == 500
    expected = (1000 * PRICE_IN + 500 * PRICE_OUT) / 1e6
    assert cost_metric(proxy, "team-b") - before[1] == pytest.approx(expected, rel=1e-9)


def test_another_clients_retrieve_cannot_settle_or_count_a_batch(
    proxy: ProxyProcess, resources: ResourceUpstream
) -> None:
    """team-b naming team-a's batch gets a 404 and moves nothing of team-a's."""
    owner = openai.OpenAI(base_url=proxy.base_url, api_key=TEAM_B, max_retries=0)
    other = openai.OpenAI(base_url=proxy.base_url, api_key=TEAM_C, max_retries=0)
    batch = make_batch(owner, line(7))
    end(resources, batch, 10, 10)
    with pytest.raises(openai.NotFoundError):
        other.batches.retrieve(batch)
    assert tokens_metric(proxy, "team-c", "prompt") == 0
    before = tokens_metric(proxy, "team-b", "prompt")
    owner.batches.retrieve(batch)
    assert tokens_metric(proxy, "team-b", "prompt") == before + 10


def test_a_usd_budget_refuses_a_batch_with_an_unpriced_model_before_it_is_made(
    proxy: ProxyProcess, resources: ResourceUpstream
) -> None:
    api = openai.OpenAI(base_url=proxy.base_url, api_key=TEAM_C, max_retries=0)
    uploaded = api.files.create(file=("b.jsonl", line(1) + line(2, "no-price")), purpose="batch")
    sent = batch_posts(resources)
    with pytest.raises(openai.PermissionDeniedError) as raised:
        api.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
    assert raised.value.response.json()["error"]["code"] == "unpriced_model"
    assert batch_posts(resources) == sent
    # All lines priced: charged in USD at the estimate.
    data = line(3) + line(4)
    make_batch(api, data)
    prompt = estimate(data) - 2 * MAX_TOKENS
    usd = (prompt * PRICE_IN + 2 * MAX_TOKENS * PRICE_OUT) / 1e6  # each line at its price
    assert used(proxy, "team-c") == pytest.approx(usd, abs=1e-6)


def test_a_batch_bigger_than_the_whole_budget_is_refused_before_it_is_sent(
    proxy: ProxyProcess, resources: ResourceUpstream
) -> None:
    """Review: the hold is capped at its limit (a single request that big goes alone), so
    a 2,000-line batch went through a 900-token budget (279,900 spent)."""
    api = openai.OpenAI(base_url=proxy.base_url, api_key=TEAM_A, max_retries=0)
    data = b"".join(line(n) for n in range(8))
    assert estimate(data) > BUDGET
    uploaded = api.files.create(file=("big.jsonl", data), purpose="batch")
    sent, before = batch_posts(resources), used(proxy, "team-a")
    with pytest.raises(openai.BadRequestError) as raised:
        api.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
    assert raised.value.response.json()["error"]["code"] == "batch_exceeds_budget"
    assert batch_posts(resources) == sent
    assert used(proxy, "team-a") == before
