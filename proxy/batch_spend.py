"""A batch's tokens, counted against its client's budget and in the metrics.

A batch runs later, upstream, with the operator's key: its requests never pass through the
proxy one by one, so its cost is taken in three steps.

1. **Estimated** as its file's lines are checked (``FileEstimate``): each line's prompt
   bytes / 4 plus the output it may produce, priced at its model, as a single request's
   reservation is; kept as a note under the file's id.
2. **Charged** to the client's ``budget`` when the batch is made: reserved like one request
   (429 ``budget_exceeded`` when it does not fit), and the whole estimate spent once the
   upstream made the batch. Not its ``tpm``: the upstream spreads a batch over its
   completion window, not over the minute it was made in. The charge is kept as a note
   under the batch's id.
3. **Corrected** to the upstream's own usage when the batch is seen ended through the proxy
   (a retrieve answer with a final status and a ``usage``): the difference goes back to the
   windows charged, and the tokens and cost are counted in the metrics. Once: the note is
   taken (Redis ``GETDEL``), so two replicas, or two polls, never count it twice.

Notes live in the throttle's storage (memory: at most ``MAX_NOTES`` file estimates and as
many charges per client, so its uploads never push out its charges; Redis:
shared by the replicas, bounded by their TTLs), and what is read back is validated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeGuard

import orjson

from proxy import metrics
from proxy.routing import Target
from proxy.spend import (
    MAX_ESTIMATE,
    REDIS_PREFIX,
    Caller,
    Estimate,
    Meter,
    Refusal,
    Reservation,
    Spend,
    shown_usd,
)
from proxy.usage import MAX_TOKENS, TokenCounts

CHARGE_TTL = 31 * 86400.0  # a batch ends within its completion window (24 h); polls lag
FINAL = frozenset({"completed", "failed", "expired", "cancelled"})
MIXED = "mixed"  # the metrics label of a batch whose lines route to several models
_MAX_NAME = 256
_MAX_TOTAL = 1e15  # tokens or USD a note may hold: anything above is not ours


@dataclass(slots=True)
class FileEstimate:
    """What a batch file's lines may cost, summed as they are checked."""

    tokens: int = 0
    usd: float | None = 0.0  # None once one line's model has no price
    backend: str = ""
    model: str | None = None  # the upstream model id of every line (None: several)
    label: str = ""  # the metrics label of every line's route (``MIXED``: several)

    def add(self, target: Target, estimate: Estimate) -> None:
        first = not self.backend
        self.tokens = min(self.tokens + estimate.prompt + estimate.output, MAX_ESTIMATE * 1000)
        if estimate.price is None or self.usd is None:
            self.usd = None
        else:
            self.usd += estimate.usd
        if first:
            self.backend, self.model, self.label = (
                target.backend,
                target.upstream_model,
                target.label,
            )
            return
        if self.model != target.upstream_model:
            self.model = None
        if self.label != target.label:
            self.label = MIXED

    def dump(self) -> dict[str, Any]:
        return {
            "t": self.tokens,
            "u": self.usd,
            "b": self.backend,
            "m": self.model,
            "l": self.label,
        }


@dataclass(frozen=True, slots=True)
class Charge:
    """What a batch was charged: its client, its estimate, and each budget window's share
    (the window's storage key, its meter, the amount spent there)."""

    client: str
    estimate: FileEstimate
    windows: tuple[tuple[str, Meter, float], ...]


class BatchSpend:
    """The three steps above, over one config's ``Spend`` (built whatever the clients'
    limits: a client without a budget still has its batch's tokens counted)."""

    def __init__(
        self, spend: Spend, file_ttl: float, clients: frozenset[str], backends: frozenset[str]
    ) -> None:
        self.spend = spend
        self.file_ttl = file_ttl
        self.clients = clients  # client labels: a note naming another is not ours
        self.backends = backends  # a metrics label must come from the config

    def line(
        self, file: FileEstimate, target: Target, body: dict[str, Any], size: int, url: str
    ) -> None:
        """One checked line of a batch file, added to its estimate."""
        path = url.removeprefix("/v1")
        file.add(
            target, self.spend.estimate(target.backend, target.upstream_model, body, size, path)
        )

    async def file_made(self, file_id: str, owner: str, file: FileEstimate, call: Caller) -> None:
        ledger = self.spend.ledger
        value = orjson.dumps(file.dump())
        note = _file_note(file_id)
        await call(lambda: ledger.put_note(note, value, self.file_ttl, "file:" + owner), None)

    async def file_estimate(self, file_id: str, call: Caller) -> FileEstimate | None:
        ledger = self.spend.ledger
        raw = await call(lambda: ledger.get_note(_file_note(file_id)), None)
        return _estimate_of(_json(raw))

    def beyond_budget(self, client: str, file: FileEstimate) -> str | None:
        """The estimate, shown, when it is more than the client's whole budget window (a
        single request that big goes alone; a batch of 50,000 must not); else None."""
        for limit in self.spend.limits.get(client, ()):
            if limit.name != "budget":
                continue
            amount = (file.usd or 0.0) if limit.meter is Meter.USD else float(file.tokens)
            if amount > limit.cap:
                return shown_usd(amount) if limit.meter is Meter.USD else f"{file.tokens} tokens"
        return None

    async def reserve(
        self, client: str, file: FileEstimate, call: Caller
    ) -> Reservation | Refusal | None:
        """The batch's estimate reserved against the client's budget alone."""
        estimate = Estimate(file.tokens, 0, file.usd or 0.0, None)
        found = await self.spend.reserve(client, estimate, call, only=("budget",))
        if isinstance(found, Reservation):
            found.whole = True  # settled to the estimate once the upstream made the batch
        return found

    async def made(
        self,
        batch_id: str,
        client: str,
        file: FileEstimate,
        reservation: Reservation | None,
        call: Caller,
    ) -> None:
        """The upstream made the batch: its charge noted, to be corrected when it ends."""
        windows = []
        if reservation is not None:
            for hold in reservation.holds:
                meter = hold.limit.meter
                amount = reservation.usd if meter is Meter.USD else float(reservation.tokens)
                windows.append([hold.key, str(meter), amount])
        value = orjson.dumps({"c": client, "e": file.dump(), "w": windows})
        ledger = self.spend.ledger
        note = _batch_note(batch_id)
        await call(lambda: ledger.put_note(note, value, CHARGE_TTL, "batch:" + client), None)

    async def ended(self, batch_id: str, document: Any, call: Caller) -> None:
        """A batch answer seen on its way to the client: when it is final and says what it
        used, the batch's charge is corrected to that and its tokens counted (once)."""
        if not isinstance(document, dict) or document.get("status") not in FINAL:
            return
        tokens = _usage_of(document.get("usage"))
        if tokens is None:
            return  # no usage (a batch made before the upstream reported it): the estimate stands
        ledger = self.spend.ledger
        raw = await call(lambda: ledger.get_note(_batch_note(batch_id), take=True), None)
        charge = self._charge_of(_json(raw))
        if charge is None:
            return
        file = charge.estimate
        prices = self.spend.prices
        cost = prices.cost(file.backend, file.model, tokens) if file.model is not None else None
        if file.backend in self.backends:
            metrics.count_tokens(
                charge.client, file.backend, file.label, tokens.prompt, tokens.completion, cost
            )
        used = float(tokens.prompt + tokens.completion)
        for key, meter, amount in charge.windows:
            actual = used if meter is Meter.TOKENS else cost
            if actual is None:
                continue  # no price for its model: the USD estimate stands
            await call(partial(ledger.adjust, key, actual - amount), None)

    def _charge_of(self, data: Any) -> Charge | None:
        """A charge note as read back (from Redis: anyone may have written it), or None."""
        if not isinstance(data, dict):
            return None
        client, file, windows = data.get("c"), _estimate_of(data.get("e")), data.get("w")
        if client not in self.clients or file is None or not isinstance(windows, list):
            return None
        checked = []
        prefix = f"{REDIS_PREFIX}{client}:budget:"
        for entry in windows[:4]:
            if not (isinstance(entry, list) and len(entry) == 3):
                return None
            key, meter, amount = entry
            if not (isinstance(key, str) and key.startswith(prefix) and len(key) < 2 * _MAX_NAME):
                return None
            if meter not in (Meter.USD.value, Meter.TOKENS.value) or not _amount(amount):
                return None
            checked.append((key, Meter(meter), float(amount)))
        return Charge(client, file, tuple(checked))


def _file_note(file_id: str) -> str:
    return "file:" + file_id[:_MAX_NAME]


def _batch_note(batch_id: str) -> str:
    return "batch:" + batch_id[:_MAX_NAME]


def _json(raw: bytes | None) -> Any:
    if raw is None or len(raw) > 64 * 1024:
        return None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None


def _amount(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value) and 0 <= value <= _MAX_TOTAL


def _name(value: Any) -> TypeGuard[str]:
    return isinstance(value, str) and 0 < len(value) <= _MAX_NAME and value.isprintable()


def _estimate_of(data: Any) -> FileEstimate | None:
    """A file estimate as read back, or None unless well-formed."""
    if not isinstance(data, dict):
        return None
    tokens, usd, backend, model, label = (data.get(k) for k in ("t", "u", "b", "m", "l"))
    if type(tokens) is not int or not _amount(tokens) or not (usd is None or _amount(usd)):
        return None
    if not (_name(backend) and _name(label)) or not (model is None or _name(model)):
        return None
    return FileEstimate(tokens, None if usd is None else float(usd), backend, model, label)


def _usage_of(usage: Any) -> TokenCounts | None:
    """A batch's ``usage`` (``input_tokens``, ``output_tokens`` and their details) as
    counts, or None unless every count is a sane integer."""
    if not isinstance(usage, dict):
        return None
    prompt, completion = usage.get("input_tokens"), usage.get("output_tokens")
    if not (_count(prompt) and _count(completion)):
        return None
    details = usage.get("input_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else 0
    out = usage.get("output_tokens_details")
    reasoning = out.get("reasoning_tokens") if isinstance(out, dict) else 0
    return TokenCounts(
        prompt=prompt,
        completion=completion,
        cached=min(cached, prompt) if _count(cached) else 0,
        reasoning=min(reasoning, completion) if _count(reasoning) else 0,
    )


def _count(value: Any) -> TypeGuard[int]:
    return type(value) is int and 0 <= value < MAX_TOKENS * 1000
