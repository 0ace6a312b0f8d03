"""Robot-side clients of a served policy and the action-chunk broker; needs numpy, msgpack and websockets,
never torch (SERVING.md 1.3, 1.6, 1.8, 2.3).

    policy = WebsocketClientPolicy("robot-server.local", 8000, api_key="...")    # openpi protocol
    broker = ActionChunkBroker(policy, action_horizon=5)     # query every 5 steps, replay the chunk between
    for step in range(max_steps):
        action = broker.infer(observation)["actions"]       # one [A] action per step

    http = HttpClientPolicy("http://robot-server.local:8777")                    # OpenVLA /act
    chunk = http.infer({"full_image": img, "wrist_image": wrist, "state": s, "instruction": "..."})  # [K, A]

`WebsocketClientPolicy` speaks openpi's protocol exactly as `openpi-client` does (compression off, no
size limit, `Authorization: Api-Key` header, frame 0 = metadata), so it also works against an openpi
server. It retries the connection while the server is not up yet, and after the server closed the
connection (an error reply closes it) the next `infer` reconnects.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.parse
from typing import Any

import numpy as np
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from .codec import Packer, json_dumps, json_loads, unpackb


class ServerError(RuntimeError):
    """The server answered a request with an error."""


class WebsocketClientPolicy:
    """`infer(observation) -> {"actions": [K, A], "policy_timing": ..., "server_timing": ...}` over websocket."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = 8000, api_key: str | None = None, *,
                 connect_timeout: float = 300.0, retry_interval: float = 1.0, open_timeout: float = 10.0,
                 max_size: int | None = None) -> None:
        self.uri = host if host.startswith(("ws://", "wss://")) else f"ws://{host}"
        if port is not None:
            self.uri += f":{port}"
        self.api_key = api_key
        self.connect_timeout = connect_timeout
        self.retry_interval = retry_interval
        self.open_timeout = open_timeout
        self.max_size = max_size
        self._packer = Packer()
        self._ws: ClientConnection | None = None
        self._metadata: dict = {}
        self._connect()

    def _connect(self) -> None:
        headers = {"Authorization": f"Api-Key {self.api_key}"} if self.api_key else None
        deadline = time.monotonic() + self.connect_timeout
        while True:
            try:
                ws = connect(self.uri, compression=None, max_size=self.max_size, additional_headers=headers,
                             open_timeout=self.open_timeout)
                ws.__enter__()  # held open until close(); marks it as managed for websockets >= 17
                break
            except (ConnectionRefusedError, ConnectionResetError):
                if time.monotonic() + self.retry_interval > deadline:
                    raise ConnectionError(f"no policy server at {self.uri} after {self.connect_timeout:.0f} s") from None
                time.sleep(self.retry_interval)
        try:
            metadata = unpackb(ws.recv(timeout=self.open_timeout))
        except BaseException:
            ws.close()
            raise
        self._ws, self._metadata = ws, metadata if isinstance(metadata, dict) else {}

    def get_server_metadata(self) -> dict:
        return self._metadata

    def infer(self, observation: dict) -> dict:
        """Send one observation, return the server's response map. An error reply raises `ServerError`
        (`"Error in inference server:\\n" + message`, as openpi-client) and closes this connection."""
        data = self._packer.pack(observation)
        if self._ws is None:
            self._connect()
        try:
            assert self._ws is not None
            self._ws.send(data)
            response = self._ws.recv()
        except ConnectionClosed:
            self._ws = None
            raise
        if isinstance(response, str):
            self.close()
            raise ServerError(f"Error in inference server:\n{response}")
        return unpackb(response)

    def reset(self) -> None:
        """Nothing to reset on the server (the protocol has no reset message)."""

    def close(self) -> None:
        if self._ws is not None:
            self._ws.close()
            self._ws = None

    def __enter__(self) -> "WebsocketClientPolicy":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class HttpClientPolicy:
    """OpenVLA `POST /act` client: `infer(observation) -> actions [K, A]` (float64), over one keep-alive
    connection. `double_encode=True` sends `{"encoded": json-numpy text}` (SERVING.md 2.3)."""

    def __init__(self, url: str = "http://127.0.0.1:8777", api_key: str | None = None, *,
                 double_encode: bool = False, timeout: float = 60.0) -> None:
        parts = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"url: expected http://host:port, found {url!r}")
        self.host, self.port = parts.hostname, parts.port or 80
        self.path = (parts.path.rstrip("/") or "") + "/act"
        self.api_key, self.double_encode, self.timeout = api_key, double_encode, timeout
        self._conn: http.client.HTTPConnection | None = None

    def _post(self, body: bytes) -> tuple[int, bytes]:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Api-Key {self.api_key}"
        for attempt in (0, 1):  # a keep-alive connection the server closed is reopened once
            if self._conn is None:
                self._conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            try:
                self._conn.request("POST", self.path, body=body, headers=headers)
                response = self._conn.getresponse()
                return response.status, response.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def infer(self, observation: dict) -> np.ndarray:
        text = json_dumps(observation)
        body = json.dumps({"encoded": text}) if self.double_encode else text
        status, data = self._post(body.encode("utf-8"))
        if status != 200:
            try:
                message = json.loads(data)["error"]
            except (ValueError, KeyError, TypeError):
                message = data[:300].decode("utf-8", "replace")
            raise ServerError(f"Error in inference server (HTTP {status}):\n{message}")
        result = json_loads(data)
        if self.double_encode:
            result = json_loads(result)
        return np.stack(result)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _map_tree(fn: Any, tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _map_tree(fn, v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_map_tree(fn, v) for v in tree)
    return fn(tree)


class ActionChunkBroker:
    """Query the inner policy every `action_horizon` steps; in between, replay the cached chunk one step
    at a time (SERVING.md 1.8): every ndarray leaf `x` of the response becomes `x[step]`, other leaves
    (timing maps, strings) pass through; observations given on cached steps are not sent."""

    def __init__(self, policy: Any, action_horizon: int) -> None:
        if action_horizon < 1:
            raise ValueError(f"action_horizon must be >= 1, found {action_horizon}")
        self.policy = policy
        self.action_horizon = int(action_horizon)
        self._cache: Any = None
        self._step = 0

    def infer(self, observation: dict) -> Any:
        if self._cache is None:
            self._cache = self.policy.infer(observation)
            self._step = 0
        step = self._step

        def pick(x: Any) -> Any:
            if not isinstance(x, np.ndarray):
                return x
            if x.ndim == 0 or step >= x.shape[0]:
                raise IndexError(f"action_horizon {self.action_horizon} is longer than the returned chunk "
                                 f"(an array of shape {x.shape})")
            return x[step]

        out = _map_tree(pick, self._cache)
        self._step += 1
        if self._step >= self.action_horizon:
            self._cache = None
        return out

    def reset(self) -> None:
        self.policy.reset()
        self._cache = None
        self._step = 0
