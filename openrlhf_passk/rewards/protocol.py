"""uvicorn's HTTP protocol with a deadline for each request's headers (used by `serve-reward`).

uvicorn times out idle keep-alive connections but not a client that trickles its request line and
headers a byte at a time (slowloris): each byte resets its keep-alive timer, and the connection is
held forever. This protocol closes a connection whose next request's headers are not complete
`OPENRLHF_PASSK_SERVE_HEADER_TIMEOUT` seconds after it opened or after its previous response.
It lives at module level because uvicorn pickles the protocol class into its worker processes.
"""

from __future__ import annotations

import asyncio
import os

from openrlhf_passk import env

try:  # uvicorn's own choice for http="auto": httptools when installed, else h11
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as _Base
except ImportError:  # pragma: no cover - depends on the install
    from uvicorn.protocols.http.h11_impl import H11Protocol as _Base

HEADER_TIMEOUT_ENV = env.SERVE_HEADER_TIMEOUT


class HeaderTimeoutProtocol(_Base):
    _deadline: asyncio.TimerHandle | None = None
    _armed_cycle: object = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        # A new request cycle exists once its headers are complete: the body has its own timeout.
        if self._deadline is not None and self.cycle is not self._armed_cycle:
            self._deadline.cancel()
            self._deadline = None

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._armed_cycle = self.cycle
        timeout = float(os.environ.get(HEADER_TIMEOUT_ENV, "10"))
        self._deadline = self.loop.call_later(timeout, self._expire)

    def _expire(self) -> None:
        self._deadline = None
        if self.cycle is self._armed_cycle and not self.transport.is_closing():
            self.transport.close()
