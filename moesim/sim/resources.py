"""Shared resources of the simulated cluster.

:class:`SharedLink` is a link whose bandwidth concurrent transfers share equally (processor
sharing, the fluid model of TCP / RDMA flows through one bottleneck): when a transfer starts
or ends, every transfer in flight is re-timed. The serving engine moves KV caches between
prefill and decode groups over one; copy engines are ``simpy.Resource`` slots around it.
"""

from __future__ import annotations

import simpy


class SharedLink:
    """``bandwidth`` bytes/s shared by the transfers in flight; each also pays ``latency`` s."""

    def __init__(self, env: simpy.Environment, bandwidth: float, latency: float = 0.0, name: str = "link"):
        self.env, self.bandwidth, self.latency, self.name = env, bandwidth, latency, name
        self.flows: dict[int, list] = {}  # id -> [bytes left, done event]
        self.updated = 0.0
        self.bytes = 0.0
        self._next_id = 0
        self._timer = None

    def _drain(self) -> None:
        """Charge the time since the last change to every flow at its fair share."""
        now = self.env.now
        if self.flows and now > self.updated:
            share = self.bandwidth / len(self.flows) * (now - self.updated)
            for flow in self.flows.values():
                flow[0] -= share
        self.updated = now

    def _reschedule(self) -> None:
        for key, flow in list(self.flows.items()):
            # under a nanosecond of bytes left is float residue: a shorter timer could not move
            # the clock (now + delay == now) and would fire forever
            if flow[0] <= self.bandwidth * 1e-9:
                del self.flows[key]
                flow[1].succeed()
        if self.flows:
            left = min(flow[0] for flow in self.flows.values())
            delay = left * len(self.flows) / self.bandwidth
            timer = self._timer = self.env.timeout(delay)
            timer.callbacks.append(lambda _ev, timer=timer: self._tick(timer))

    def _tick(self, timer) -> None:
        if timer is self._timer:  # a newer change re-timed the flows
            self._drain()
            self._reschedule()

    def transfer(self, nbytes: float):
        """A process body: ``yield from link.transfer(n)`` returns when ``n`` bytes are through."""
        if self.latency:
            yield self.env.timeout(self.latency)
        if nbytes <= 0:
            return
        self._drain()
        done = self.env.event()
        self.flows[self._next_id] = [float(nbytes), done]
        self._next_id += 1
        self.bytes += nbytes
        self._reschedule()
        yield done
