"""The conversations the proxy keeps for translated Responses requests.

A Chat Completions backend keeps nothing: a Responses client that stores its answers
(``store``, true by default) and continues with ``previous_response_id`` (the openai SDK,
openai-agents) needs the proxy to keep them. Each kept response holds only what it added
(its request's own input, then its output) and the id before it: a conversation is a chain,
walked oldest first when continued, so a long one costs its size once, not once per turn.

Kept per owner (the client id; None for an open proxy): one client never sees, continues
or deletes another's. Bounded by bytes per client (a client past its share loses its own
oldest), per process (past it, anyone's oldest go: with the defaults, four clients at
their whole share before a fifth's is touched), by turns and bytes per chain (a chain is
sent whole when continued: never more than ``server.max_body_size``), and by age.
In this process's memory only: with replicas, a conversation continues on the replica
that holds it (the object placement sends its next request to the same backend, not the
same replica).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

MAX_TURNS = 1000  # responses one chain may hold: a walk stays bounded whatever is kept


@dataclass(slots=True)
class _Kept:
    previous: str | None
    items: bytes  # JSON list: what this response added to the conversation
    response: bytes  # JSON: the response object, as ``GET /v1/responses/{id}`` answers
    expires: float
    turns: int  # responses in the chain up to this one
    chain_bytes: int  # the items of the chain up to this one: what continuing it sends

    @property
    def size(self) -> int:
        return len(self.items) + len(self.response) + 200  # the record's own overhead


class Conversations:
    """The kept responses, by (owner, response id), oldest first."""

    def __init__(
        self,
        max_bytes: int,
        max_bytes_per_client: int,
        ttl: float,
        clock: Callable[[], float] = time.monotonic,
        max_chain_bytes: int = 10 << 20,
    ) -> None:
        self.max_bytes = max_bytes
        self.max_chain_bytes = max_chain_bytes
        self.max_bytes_per_client = max_bytes_per_client
        self.ttl = ttl
        self._clock = clock
        self._kept: OrderedDict[tuple[str | None, str], _Kept] = OrderedDict()
        self._bytes = 0
        self._by_owner: dict[str | None, int] = {}
        # Each owner's ids, oldest first: its own are evicted without a walk over all.
        self._owned: dict[str | None, OrderedDict[str, None]] = {}

    def __len__(self) -> int:
        return len(self._kept)

    @property
    def size(self) -> int:
        return self._bytes

    def owned_bytes(self, owner: str | None) -> int:
        return self._by_owner.get(owner, 0)

    def reconfigure(
        self, max_bytes: int, max_bytes_per_client: int, ttl: float, max_chain_bytes: int
    ) -> None:
        self.max_bytes, self.max_bytes_per_client, self.ttl = max_bytes, max_bytes_per_client, ttl
        self.max_chain_bytes = max_chain_bytes
        self._evict(None)

    def keep(
        self,
        owner: str | None,
        response_id: str,
        previous: str | None,
        items: list[Any],
        response: dict[str, Any],
    ) -> bool:
        """Keep a response; False when it cannot be (too big for the client's share, or a
        chain past ``MAX_TURNS``): its id is then not found when continued."""
        now = self._clock()
        before = self._get(owner, previous, now) if previous is not None else None
        turns = before.turns + 1 if before is not None else 1
        try:
            added, shown = orjson.dumps(items), orjson.dumps(response)
        except (orjson.JSONEncodeError, TypeError):
            return False
        chain = len(added) + (before.chain_bytes if before is not None else 0)
        kept = _Kept(previous, added, shown, now + self.ttl, turns, chain)
        # A chain continued is sent whole: never more than a client may send at once.
        too_long = turns > MAX_TURNS or chain > self.max_chain_bytes
        if too_long or kept.size > min(self.max_bytes_per_client, self.max_bytes):
            return False
        self._drop((owner, response_id))
        self._kept[(owner, response_id)] = kept
        self._owned.setdefault(owner, OrderedDict())[response_id] = None
        self._bytes += kept.size
        self._by_owner[owner] = self._by_owner.get(owner, 0) + kept.size
        self._evict(owner)
        return True

    def history(self, owner: str | None, response_id: str) -> list[Any] | None:
        """The conversation up to and with ``response_id``, oldest first; None when it, or
        any response before it, is not kept (expired, evicted, deleted, another's)."""
        now = self._clock()
        chain: list[_Kept] = []
        wanted: str | None = response_id
        while wanted is not None and len(chain) <= MAX_TURNS:
            kept = self._get(owner, wanted, now)
            if kept is None:
                return None
            chain.append(kept)
            wanted = kept.previous
        items: list[Any] = []
        for kept in reversed(chain):
            items += orjson.loads(kept.items)
        return items

    def response(self, owner: str | None, response_id: str) -> bytes | None:
        kept = self._get(owner, response_id, self._clock())
        return kept.response if kept is not None else None

    def input_items(self, owner: str | None, response_id: str) -> list[Any] | None:
        """What ``response_id``'s request put in (its output excluded): ``input_items``."""
        kept = self._get(owner, response_id, self._clock())
        if kept is None:
            return None
        added: list[Any] = orjson.loads(kept.items)
        output = orjson.loads(kept.response).get("output") or []
        return added[: max(0, len(added) - len(output))]

    def delete(self, owner: str | None, response_id: str) -> bool:
        if self._get(owner, response_id, self._clock()) is None:
            return False
        self._drop((owner, response_id))
        return True

    def _get(self, owner: str | None, response_id: str, now: float) -> _Kept | None:
        key = (owner, response_id)
        kept = self._kept.get(key)
        if kept is None:
            return None
        if kept.expires <= now:
            self._drop(key)
            return None
        self._kept.move_to_end(key)  # used: the last to go
        self._owned[owner].move_to_end(response_id)
        return kept

    def _drop(self, key: tuple[str | None, str]) -> None:
        kept = self._kept.pop(key, None)
        if kept is None:
            return
        owner, response_id = key
        self._bytes -= kept.size
        left = self._by_owner[owner] - kept.size
        owned = self._owned[owner]
        del owned[response_id]
        if owned:
            self._by_owner[owner] = left
        else:
            del self._by_owner[owner], self._owned[owner]

    def _evict(self, owner: str | None) -> None:
        """The owner's oldest past its share, then anyone's oldest past the whole (an owner
        under its share loses only to the process bound, which no owner can fill alone
        when the share is smaller), expired ones on the way."""
        now = self._clock()
        while self._kept:
            key, oldest = next(iter(self._kept.items()))
            if oldest.expires > now:
                break
            self._drop(key)
        while self._by_owner.get(owner, 0) > self.max_bytes_per_client:
            self._drop((owner, next(iter(self._owned[owner]))))
        while self._bytes > self.max_bytes and self._kept:
            self._drop(next(iter(self._kept)))
