"""A frame fuzzer over real loopback sockets, shared by `make test` and `make fault`.

Frames are Hypothesis-generated message-like objects and mutations of valid frames
(truncated, bytes flipped, nested, binary). Each client says hello, pipelines a batch no
longer than the bad-frame budget, reads every reply, then reconnects. The coordinator must
never close a connection for anything but the documented reasons.
"""

from __future__ import annotations

import json
import os
import random
import time
import warnings

import trio
from hypothesis import strategies as st

from statemachine import Phase
from statemachine.protocol import MAX_BAD_FRAMES, Ack, Nack, encode
from tests.support.flow import next_error, raw_client, say_hello

_VALID = [
    encode(Ack(migration_id="m-1", phase=Phase.APPLY)),
    encode(Nack(migration_id="m-1", phase=Phase.ANNOUNCE, error="RuntimeError: [/] \x1b[2J")),
    '{"type":"hello","protocol":1,"agent_id":"x","token":null}',
]
_message = st.fixed_dictionaries(
    {"type": st.sampled_from(["hello", "ack", "nack", "welcome", "x"])},
    optional={
        "migration_id": st.text(max_size=8) | st.integers(),
        "phase": st.sampled_from([p.value for p in Phase]) | st.text(max_size=4),
        "error": st.text(max_size=16),
        "agent_id": st.text(max_size=8),
    },
)


def corpus(size: int, seed: int) -> list[str | bytes]:
    """`size` examples from Hypothesis, to mutate from (generated once, outside the loop)."""
    with warnings.catch_warnings():  # .example() outside @given is what we want here
        warnings.simplefilter("ignore")
        examples: list[str | bytes] = [json.dumps(_message.example()) for _ in range(size)]
    return [*examples, *_VALID]


def mutate(rng: random.Random, seeds: list[str | bytes]) -> str | bytes:
    base = rng.choice(seeds)
    text = base if isinstance(base, str) else base.decode("utf-8", "replace")
    kind = rng.randrange(7)
    if kind == 0:
        return text[: rng.randrange(len(text) + 1)]
    if kind == 1:
        i = rng.randrange(len(text) or 1)
        return text[:i] + chr(rng.randrange(0x20, 0x3000)) + text[i + 1 :]
    if kind == 2:
        depth = rng.choice([2, 17, 500, 3000])
        return '{"x":' + "[" * depth + "]" * depth + "," + text.lstrip("{")
    if kind == 3:
        return text.encode()  # binary frame
    if kind == 4:
        return text.replace('"', "", 1)
    if kind == 5:
        return "[" + text + "]"
    return text


async def fuzz_clients(url: str, frames: int, seed: int, clients: int = 4) -> int:
    """Send `frames` fuzzed frames through `clients` concurrent connections; returns sent."""
    rng = random.Random(seed)
    seeds = corpus(200, seed)
    sent = 0

    async def client(share: int, index: int) -> None:
        nonlocal sent
        done = 0
        n = 0
        while done < share:
            async with raw_client(url) as ws:
                await say_hello(ws, f"fuzz-{index}-{n}")
                n += 1
                batch = min(MAX_BAD_FRAMES, share - done)
                for _ in range(batch):
                    await ws.send_message(mutate(rng, seeds))
                for _ in range(batch):
                    await next_error(ws)
                done += batch
                sent += batch

    async with trio.open_nursery() as nursery:
        for i in range(clients):
            nursery.start_soon(client, frames // clients, i)
    return sent


def rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def now() -> float:
    return time.monotonic()
