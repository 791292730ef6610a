"""A lossy asyncio UDP relay for SRT tests.

Callers send to the relay's port; the relay keeps one upstream UDP socket
per caller address towards the target (the SRT listener) and forwards both
ways, dropping datagrams at random (``loss``) and in bursts (``burst_len``
consecutive datagrams, starting after a random gap of ``burst_gap``
datagrams). The loss pattern comes from a seeded PRNG per direction, so a
run is reproducible up to packet timing. The first ``spare_first``
datagrams of each direction of each caller pass untouched (the handshake),
so a test measures ARQ on media, not connection-setup retries.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field


@dataclass(slots=True)
class LossModel:
    loss: float = 0.05
    burst_gap: tuple[int, int] = (150, 300)
    burst_len: int = 5
    spare_first: int = 8
    seed: int = 1


@dataclass(slots=True)
class DirectionStats:
    forwarded: int = 0
    dropped: int = 0
    burst_dropped: int = 0


class _Dropper:
    def __init__(self, model: LossModel, seed: int) -> None:
        self.model = model
        self.rng = random.Random(seed)
        self.seen = 0
        self.until_burst = self.rng.randint(*model.burst_gap)
        self.burst_left = 0
        self.stats = DirectionStats()

    def drop(self) -> bool:
        self.seen += 1
        if self.seen <= self.model.spare_first:
            self.stats.forwarded += 1
            return False
        if self.burst_left > 0:
            self.burst_left -= 1
            self.stats.dropped += 1
            self.stats.burst_dropped += 1
            return True
        self.until_burst -= 1
        if self.until_burst <= 0 and self.model.burst_len > 0:
            self.until_burst = self.rng.randint(*self.model.burst_gap)
            self.burst_left = self.model.burst_len - 1
            self.stats.dropped += 1
            self.stats.burst_dropped += 1
            return True
        if self.rng.random() < self.model.loss:
            self.stats.dropped += 1
            return True
        self.stats.forwarded += 1
        return False


class _Upstream(asyncio.DatagramProtocol):
    def __init__(self, relay: LossyUdpRelay, client: tuple[str, int], dropper: _Dropper) -> None:
        self.relay = relay
        self.client = client
        self.dropper = dropper

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if not self.dropper.drop() and self.relay.transport is not None:
            self.relay.transport.sendto(data, self.client)


@dataclass(slots=True)
class _Client:
    transport: asyncio.DatagramTransport | None
    to_target: _Dropper
    to_client: _Dropper
    queue: list[bytes] = field(default_factory=list)


class LossyUdpRelay(asyncio.DatagramProtocol):
    """Forward UDP between callers and ``target`` with a :class:`LossModel`."""

    def __init__(self, target: tuple[str, int], model: LossModel | None = None) -> None:
        self.target = target
        self.model = model or LossModel()
        self.transport: asyncio.DatagramTransport | None = None
        self.port = 0
        self._clients: dict[tuple[str, int], _Client] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: self, local_addr=(host, port))
        self.transport = transport
        self.port = transport.get_extra_info("sockname")[1]
        return self.port

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        client = self._clients.get(addr)
        if client is None:
            n = len(self._clients)
            client = _Client(
                None,
                _Dropper(self.model, self.model.seed * 1000 + 2 * n),
                _Dropper(self.model, self.model.seed * 1000 + 2 * n + 1),
            )
            self._clients[addr] = client
            task = asyncio.get_running_loop().create_task(self._open_upstream(addr, client))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if client.to_target.drop():
            return
        if client.transport is None:
            client.queue.append(data)
        else:
            client.transport.sendto(data)

    async def _open_upstream(self, addr: tuple[str, int], client: _Client) -> None:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Upstream(self, addr, client.to_client), remote_addr=self.target
        )
        client.transport = transport
        for data in client.queue:
            transport.sendto(data)
        client.queue.clear()

    def stats(self) -> dict[str, int]:
        out = {"to_target_forwarded": 0, "to_target_dropped": 0, "to_client_forwarded": 0, "to_client_dropped": 0}
        out["burst_dropped"] = 0
        for c in self._clients.values():
            out["to_target_forwarded"] += c.to_target.stats.forwarded
            out["to_target_dropped"] += c.to_target.stats.dropped
            out["to_client_forwarded"] += c.to_client.stats.forwarded
            out["to_client_dropped"] += c.to_client.stats.dropped
            out["burst_dropped"] += c.to_target.stats.burst_dropped + c.to_client.stats.burst_dropped
        return out

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for c in self._clients.values():
            if c.transport is not None:
                c.transport.close()
        if self.transport is not None:
            self.transport.close()
        await asyncio.sleep(0)
