"""A local websocket server that speaks openpi's policy-server protocol, for tests.

Protocol (openpi's WebsocketPolicyServer): on connect the server sends its metadata as a
msgpack-numpy message; then for every observation message it answers with a msgpack-numpy
dict holding "actions" [H, 7]. ``die_after`` requests, the server closes the connection,
as a crashed or restarted server would.
"""

from __future__ import annotations

import threading

import numpy as np
from openpi_client import msgpack_numpy
from websockets.sync.server import serve


class FakeOpenPIServer:
    def __init__(self, horizon: int = 10, die_after: int | None = None):
        self.horizon = horizon
        self.die_after = die_after
        self.requests: list[dict] = []
        self._server = serve(self._handle, "127.0.0.1", 0, compression=None, max_size=None)
        self.port = self._server.socket.getsockname()[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._thread.join(timeout=5)

    def actions_for(self, index: int) -> np.ndarray:
        """Deterministic actions so tests can check what was executed: small moves, gripper open."""
        a = np.zeros((self.horizon, 7), dtype=np.float32)
        a[:, 0] = 0.1 * np.sin(index + np.arange(self.horizon))
        a[:, 6] = -1.0
        return a

    def _handle(self, ws):
        packer = msgpack_numpy.Packer()
        ws.send(packer.pack({"server": "fake-openpi", "horizon": self.horizon}))
        for message in ws:
            if self.die_after is not None and len(self.requests) >= self.die_after:
                ws.close()
                return
            obs = msgpack_numpy.unpackb(message)
            self.requests.append(obs)
            ws.send(packer.pack({"actions": self.actions_for(len(self.requests) - 1)}))
