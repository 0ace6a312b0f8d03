"""One process serving a policy over the openpi websocket protocol and the OpenVLA HTTP protocol.

    server = PolicyServer(policy, ServeConfig(port=8000, http_port=8777))
    await server.start(); ...; await server.stop()          # or: run_server(...) (blocking, Ctrl-C stops it)
    with ServerThread(policy, ServeConfig(port=0)) as s:    # background thread (tests, notebooks)
        ...  s.server.ws_port

Websocket port (SERVING.md 1): `websockets` (the library openpi uses on both ends), compression off.
- `GET /healthz` -> 200 `OK\\n` without an upgrade, answered before the handshake (1.2), also while the
  model runs (4.8).
- Handshake: with a secret, `Authorization: Api-Key <secret>` (what `openpi-client` sends; `Bearer` is
  accepted too) or HTTP 401; above `max_connections` live sessions, HTTP 503 (4.10).
- Frame 0 is the msgpack metadata map (`server_metadata`: the policy's public name and content id, its
  family, and its observation and action contract; never a path of the server's); then one binary
  observation in, one binary response out:
  `{"actions": float64 [K, A], "policy_timing": {"infer_ms"}, "server_timing": {"infer_ms",
  "prev_total_ms"}}` (1.3, 1.5). `server_timing.infer_ms` runs from receiving the frame to the result.
- A bad request gets the openpi error reply: a text frame with a short message, then close 1011, for
  that connection only (1.6, 4). Frames over `max_message_bytes` close with 1009 (4.5). A client that
  stops reading is disconnected after `client_timeout_s` (4.11); inference is bounded by
  `request_timeout_s`.

HTTP port (SERVING.md 2): `aiohttp`, in the same event loop.
- `POST /act` with a json-numpy body, or `{"encoded": "<json-numpy text>"}` (2.3). The answer is a JSON
  list of K json-numpy float64 arrays (A,), or that list's JSON text as a JSON string for `encoded`.
- Errors are JSON `{"error": message, "status": code}` with a 4xx status (issue 7: bad body 400, no or
  wrong secret 401, body too large 413, too many requests in flight 503, timeout 504, model failure 500)
  instead of upstream's `"error"` with status 200.
- `GET /healthz` as on the websocket port.

Why these libraries: `websockets` is what openpi's server and client use, so framing, handshake,
close codes and keepalive behave exactly as openpi clients expect, it has no dependencies and its
`process_request` hook gives `/healthz` and authentication before the upgrade. `/act` needs a real
HTTP/1.1 server (POST bodies, keep-alive, a body-size limit with 413); aiohttp is a mature asyncio one
that runs in the same loop as the websocket server, at a fraction of FastAPI + uvicorn + pydantic.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import signal
import threading
import time
import traceback
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any, Callable

import numpy as np
from aiohttp import web
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from .. import __version__
from .codec import CodecError, json_dumps, json_loads, packb, unpackb
from .engine import InferenceEngine, PolicyError
from .obsmap import InputSpec, RequestError, observation_map, to_policy_observation

log = logging.getLogger("spatial_forcing.serve")
CLOSE_REASON = "Request failed; the error message is in the previous frame."
HANDSHAKE_TIMEOUT_S = 10.0


@dataclass
class ServeConfig:
    """Everything `sf serve` sets. Ports 0 pick free ports; `http_port=None` turns HTTP off."""

    host: str = "0.0.0.0"
    port: int = 8000
    http_port: int | None = 8777
    secret: str | None = None
    obs_map: str = "libero"
    http_obs_map: str = "openvla"
    max_batch: int = 1
    batch_wait_ms: float = 0.0
    max_message_bytes: int = 64 << 20
    request_timeout_s: float = 30.0
    client_timeout_s: float = 30.0
    header_timeout_s: float = HANDSHAKE_TIMEOUT_S  # websocket handshake; HTTP request headers and keep-alive idle
    max_connections: int = 64
    max_prompt_chars: int = 2000
    ping_interval_s: float | None = 20.0
    debug: bool = False

    def __post_init__(self) -> None:
        if self.max_message_bytes < 1024:
            raise ValueError(f"max_message_bytes must be >= 1024, found {self.max_message_bytes}")
        if not all(0 < t < float("inf") for t in (self.request_timeout_s, self.client_timeout_s,
                                                   self.header_timeout_s)):
            raise ValueError(f"request_timeout_s, client_timeout_s and header_timeout_s: expected positive finite "
                             f"seconds, found {self.request_timeout_s}, {self.client_timeout_s}, "
                             f"{self.header_timeout_s}")
        for name in ("port", "http_port"):
            port = getattr(self, name)
            if port is not None and not (isinstance(port, int) and 0 <= port <= 65535):
                raise ValueError(f"{name}: expected a port in 0..65535, found {port!r}")
        if self.max_batch < 1 or not 0 <= self.batch_wait_ms < float("inf"):
            raise ValueError(f"max_batch must be >= 1 and batch_wait_ms >= 0, found {self.max_batch}, "
                             f"{self.batch_wait_ms}")
        if self.max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, found {self.max_connections}")
        if self.secret is not None and not self.secret:
            raise ValueError("secret: an empty secret would accept everyone; leave it unset instead")


class _HeadDeadline(asyncio.Protocol):
    """aiohttp's protocol for one HTTP connection, plus a deadline for the first request head: a client
    that has not sent the request line and headers (up to the blank line) within `timeout` seconds of
    connecting is disconnected, as the websocket port does with its handshake."""

    def __init__(self, inner: asyncio.Protocol, timeout: float, loop: asyncio.AbstractEventLoop) -> None:
        self._inner, self._timeout, self._loop = inner, timeout, loop
        self._timer: asyncio.TimerHandle | None = None
        self._tail = b""
        self._transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self._timer = self._loop.call_later(self._timeout, self._expire)
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._timer is not None:
            seen = self._tail + data
            if b"\r\n\r\n" in seen or b"\n\n" in seen:  # the blank line that ends a request head
                self._timer.cancel()
                self._timer = None
            self._tail = seen[-3:]
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def _expire(self) -> None:
        self._timer = None
        if self._transport is not None and not self._transport.is_closing():
            log.info("http %s: no complete request head within %s s; disconnected",
                     self._transport.get_extra_info("peername"), self._timeout)
            self._transport.abort()


class _Stalled(Exception):
    """The client stopped reading: the connection is dropped."""


def _json_error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message, "status": status}, status=status)


class PolicyServer:
    """`name`: how the policy was given (a checkpoint folder, a hub id, or a label); the server's own lines
    show it, clients get `public_name` (never a local path) and `policy_id` (`server_metadata`)."""

    def __init__(self, policy: Any, config: ServeConfig | None = None, name: str = "policy",
                 public_name: str | None = None) -> None:
        self.config = config = config or ServeConfig()
        self.name = str(name)
        self.spec = InputSpec.of(policy, config.max_prompt_chars)
        self.ws_map = observation_map(config.obs_map)
        self.http_map = observation_map(config.http_obs_map)
        self.ws_map.check(self.spec)
        self.http_map.check(self.spec)
        self.policy = policy
        self.engine = InferenceEngine(policy, config.max_batch, config.batch_wait_ms / 1e3,
                                      (self.spec.action_horizon, self.spec.action_dim))
        self.metadata = server_metadata(policy, self.spec, self.ws_map, self.name, public_name)
        self._metadata_frame = packb(self.metadata)
        self._ws_server: Any = None
        self._http_runner: web.AppRunner | None = None
        self._http_server: asyncio.Server | None = None
        self.ws_port: int | None = None
        self.http_port: int | None = None
        self.ws_sessions = 0
        self.http_in_flight = 0
        self.rejected = 0

    # ================================================================== lifecycle
    def warmup(self) -> float:
        """One inference on a blank observation before serving, so the first client pays no start-up."""
        size = int(getattr(getattr(self.policy, "config", None), "image_size", 224))
        obs: dict[str, Any] = {"images": [np.zeros((size, size, 3), np.uint8)] * self.spec.num_images,
                               "instruction": "warm up"}
        if self.spec.state_dim is not None:
            obs["state"] = np.zeros(self.spec.state_dim)
        return self.engine.warmup(obs)

    async def start(self) -> None:
        c = self.config
        self.engine.start()
        try:
            self._ws_server = await serve(
                self._ws_handler, c.host, c.port, process_request=self._ws_process_request, compression=None,
                max_size=c.max_message_bytes, max_queue=4, ping_interval=c.ping_interval_s,
                ping_timeout=c.ping_interval_s, open_timeout=c.header_timeout_s, close_timeout=5.0,
                logger=logging.getLogger("websockets.server"))
            self.ws_port = self._ws_server.sockets[0].getsockname()[1]
            if c.http_port is not None:
                # Slow-header clients are dropped after header_timeout_s: the first request head of a
                # connection by _HeadDeadline, later ones by aiohttp's keep-alive timer (which also
                # closes a keep-alive connection idle that long; our client reconnects by itself).
                self._http_runner = web.AppRunner(self._http_app(), access_log=None, handle_signals=False,
                                                  shutdown_timeout=1.0, keepalive_timeout=c.header_timeout_s)
                await self._http_runner.setup()
                factory, loop = self._http_runner.server, asyncio.get_running_loop()
                self._http_server = await loop.create_server(
                    lambda: _HeadDeadline(factory(), c.header_timeout_s, loop), c.host, c.http_port,
                    reuse_address=True)
                self.http_port = self._http_server.sockets[0].getsockname()[1]  # the bound port (0 -> chosen)
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        if self._ws_server is not None:
            self._ws_server.close()  # live sessions get close 1001 (going away)
            await self._ws_server.wait_closed()
            self._ws_server = None
        if self._http_server is not None:
            self._http_server.close()  # stop listening; the runner closes the live connections
        if self._http_runner is not None:
            await self._http_runner.cleanup()
            self._http_runner = None
        if self._http_server is not None:
            await self._http_server.wait_closed()
            self._http_server = None
        await asyncio.to_thread(self.engine.stop)

    def describe(self) -> str:
        c, s = self.config, self.spec
        host = "localhost" if c.host in ("0.0.0.0", "", "::") else c.host
        lines = [f"serving {self.name}: {s.num_images} views, state {s.state_dim or 'none'}, actions "
                 f"[{s.action_horizon}, {s.action_dim}]; max batch {c.max_batch}; auth "
                 f"{'shared secret' if c.secret else 'off'}",
                 f"  openpi websocket  ws://{host}:{self.ws_port}  (obs map {self.ws_map.name}; GET /healthz)"]
        if self.http_port is not None:
            lines.append(f"  OpenVLA HTTP      http://{host}:{self.http_port}/act  (obs map {self.http_map.name}; "
                         "GET /healthz)")
        return "\n".join(lines)

    # ================================================================== shared
    def _authorized(self, header: str | None) -> bool:
        if self.config.secret is None:
            return True
        scheme, _, token = (header or "").partition(" ")
        if scheme.lower() not in ("api-key", "bearer"):
            return False
        return hmac.compare_digest(token.strip().encode(), self.config.secret.encode())

    def _policy_error_text(self, exc: PolicyError) -> str:
        if self.config.debug and exc.__cause__ is not None:
            return f"{exc}\n" + "".join(traceback.format_exception(exc.__cause__))
        return str(exc)

    async def _infer(self, observation: dict):
        return await asyncio.wait_for(self.engine.submit(observation), self.config.request_timeout_s)

    # ================================================================== websocket (openpi)
    def _ws_process_request(self, connection: ServerConnection, request: Any) -> Any:
        if request.path.split("?", 1)[0] == "/healthz":
            return connection.respond(HTTPStatus.OK, "OK\n")
        if not self._authorized(request.headers.get("Authorization")):
            self.rejected += 1
            log.info("websocket %s: refused, missing or wrong secret", connection.remote_address)
            return connection.respond(HTTPStatus.UNAUTHORIZED,
                                      "Unauthorized: send the header 'Authorization: Api-Key <secret>'\n")
        if self.ws_sessions >= self.config.max_connections:
            self.rejected += 1
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE,
                                      f"Too many connections (limit {self.config.max_connections})\n")
        return None

    async def _ws_handler(self, ws: ServerConnection) -> None:
        self.ws_sessions += 1
        try:
            await self._ws_session(ws)
        except (ConnectionClosed, _Stalled):
            pass
        except Exception:  # a bug of ours: log it, end this session only
            log.exception("websocket %s: unexpected error", ws.remote_address)
        finally:
            self.ws_sessions -= 1

    async def _ws_send(self, ws: ServerConnection, data: bytes | str) -> None:
        try:
            await asyncio.wait_for(ws.send(data), self.config.client_timeout_s)
        except asyncio.TimeoutError:
            log.info("websocket %s: client stopped reading for %.0f s; disconnecting", ws.remote_address,
                     self.config.client_timeout_s)
            ws.transport.abort()
            raise _Stalled() from None

    async def _ws_error(self, ws: ServerConnection, message: str) -> None:
        log.info("websocket %s: %s", ws.remote_address, message.splitlines()[0][:300])
        await self._ws_send(ws, message)
        await ws.close(1011, CLOSE_REASON)

    async def _ws_session(self, ws: ServerConnection) -> None:
        await self._ws_send(ws, self._metadata_frame)
        prev_total_ms: float | None = None
        told_unused = False
        while True:
            message = await ws.recv()
            t0 = time.perf_counter()
            try:
                if isinstance(message, str):
                    raise RequestError("text frames are not part of the protocol; send each observation as a "
                                       "msgpack binary frame")
                observation, unused = to_policy_observation(unpackb(message), self.ws_map, self.spec)
                if unused and not told_unused:
                    told_unused = True
                    log.info("websocket %s: ignoring keys %s", ws.remote_address, unused[:10])
                result = await self._infer(observation)
            except (CodecError, RequestError) as exc:
                return await self._ws_error(ws, f"bad request: {exc}")
            except asyncio.TimeoutError:
                return await self._ws_error(ws, f"inference did not finish within {self.config.request_timeout_s} s")
            except PolicyError as exc:
                return await self._ws_error(ws, self._policy_error_text(exc))
            except Exception:  # a bug of ours, not the client's: log it, answer this request only
                log.exception("websocket %s: unexpected error while handling a request", ws.remote_address)
                return await self._ws_error(ws, "internal server error (logged on the server)")
            server_timing = {"infer_ms": (time.perf_counter() - t0) * 1e3}
            if prev_total_ms is not None:
                server_timing["prev_total_ms"] = prev_total_ms
            await self._ws_send(ws, packb({"actions": result.actions, "policy_timing": {"infer_ms": result.infer_ms},
                                           "server_timing": server_timing}))
            prev_total_ms = (time.perf_counter() - t0) * 1e3

    # ================================================================== HTTP (OpenVLA)
    def _http_app(self) -> web.Application:
        limit = self.config.max_message_bytes

        @web.middleware
        async def json_errors(request: web.Request, handler: Callable) -> web.StreamResponse:
            try:
                return await handler(request)
            except web.HTTPException as exc:
                if exc.status < 400:
                    raise
                text = f"request body larger than {limit} bytes" if exc.status == 413 else (exc.text or exc.reason)
                return _json_error(exc.status, text)

        app = web.Application(client_max_size=limit, middlewares=[json_errors])
        app.router.add_post("/act", self._http_act)
        app.router.add_get("/healthz", self._http_healthz)
        return app

    async def _http_healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="OK\n")

    async def _http_act(self, request: web.Request) -> web.Response:
        if not self._authorized(request.headers.get("Authorization")):
            self.rejected += 1
            return _json_error(401, "missing or wrong secret: send the header 'Authorization: Api-Key <secret>'")
        if self.http_in_flight >= self.config.max_connections:
            self.rejected += 1
            return _json_error(503, f"too many requests in flight (limit {self.config.max_connections})")
        self.http_in_flight += 1
        try:
            try:
                body = await asyncio.wait_for(request.read(), self.config.client_timeout_s)
            except asyncio.TimeoutError:
                return _json_error(408, f"the request body did not arrive within {self.config.client_timeout_s} s")
            try:
                payload = json_loads(body)
                double = isinstance(payload, dict) and "encoded" in payload
                if double:
                    if len(payload) != 1 or not isinstance(payload["encoded"], str):
                        raise RequestError("a double-encoded body must be {\"encoded\": \"<json-numpy text>\"} and "
                                           f"nothing else; found keys {sorted(map(str, payload))[:10]}")
                    payload = json_loads(payload["encoded"])
                observation, _ = to_policy_observation(payload, self.http_map, self.spec)
                result = await self._infer(observation)
            except (CodecError, RequestError) as exc:
                log.info("http %s: bad request: %s", request.remote, str(exc)[:300])
                return _json_error(400, f"bad request: {exc}")
            except asyncio.TimeoutError:
                return _json_error(504, f"inference did not finish within {self.config.request_timeout_s} s")
            except PolicyError as exc:
                return _json_error(500, self._policy_error_text(exc))
            except Exception:  # a bug of ours, not the client's
                log.exception("http %s: unexpected error while handling a request", request.remote)
                return _json_error(500, "internal server error (logged on the server)")
        finally:
            self.http_in_flight -= 1
        text = json_dumps(list(result.actions))  # K float64 arrays (A,), as deploy.py returns
        return web.Response(text=json.dumps(text) if double else text, content_type="application/json")


# ====================================================================== metadata
def checkpoint_id(folder: str | Path) -> str | None:
    """A short content id of a checkpoint folder (None if it is not one): SHA-256 over its config.json and
    statistics, and each weight file's name, size and first and last MiB. A copy of the checkpoint, on
    any machine, has the same id; a retrained or re-saved one another (modification times are not used)."""
    folder = Path(folder).expanduser()
    if not (folder / "config.json").is_file():
        return None
    h = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        if not f.is_file():
            continue
        if f.suffix == ".json":
            h.update(f.name.encode() + b"\0" + f.read_bytes())
        elif f.suffix in (".safetensors", ".pt", ".bin"):
            size = f.stat().st_size
            h.update(f"{f.name}\0{size}".encode())
            with open(f, "rb") as fh:
                h.update(fh.read(1 << 20))
                fh.seek(max(0, size - (1 << 20)))
                h.update(fh.read(1 << 20))
    return h.hexdigest()[:12]


def _looks_local(name: str) -> bool:
    """Whether `name` names something on this machine (a path) rather than a hub id (`owner/name`) or a label."""
    return (Path(name).expanduser().exists() or name.startswith(("/", ".", "~")) or name.count("/") > 1
            or "\\" in name)


def public_policy_name(name: str, family: str | None, policy_id: str | None) -> str:
    """What clients see as the policy's name: `name` when it is a hub id (`owner/name`) or a plain label;
    for a local checkpoint (any path) the family and content id instead, so no server path leaves it."""
    if not _looks_local(name):
        return name
    return "-".join(p for p in (family or "policy", policy_id) if p)


def server_metadata(policy: Any, spec: InputSpec, obs_map: Any, name: str = "policy",
                    public_name: str | None = None) -> dict[str, Any]:
    """The openpi metadata frame (docs/serving.md lists the fields). The flat keys are the ones `sf eval
    --policy-server` and earlier clients read; `observation` and `action` group the same contract with the
    rest of it. Nothing in it is a path of the server's."""
    pspec = getattr(policy, "spec", None)
    family = getattr(pspec, "family", None) or getattr(policy, "family", None) or None
    policy_id = checkpoint_id(name) if _looks_local(name) else None
    facts = policy_facts(policy)
    omap = obs_map.to_dict()
    observation = {"num_images": spec.num_images, "image_keys": list(omap["images"]),
                   "extra_image_keys": omap.get("extra_images"), "image_size": facts.get("image_size"),
                   "images": "uint8 [H, W, 3] (or [3, H, W]); float [0, 1] where float_images",
                   "float_images": omap.get("float_images"), "center_crop": facts.get("center_crop"),
                   "image_ops": getattr(pspec, "image_ops", None), "state_key": omap.get("state"),
                   "state_dim": spec.state_dim, "prompt_key": omap["prompt"], "max_prompt_chars": spec.max_prompt_chars}
    action = {"horizon": spec.action_horizon, "dim": spec.action_dim, "dtype": "float64",
              "convention": facts.get("action_convention"), "normalization": getattr(pspec, "norm_type", None),
              "unnorm_key": facts.get("unnorm_key"), "replan_steps": getattr(pspec, "replan_steps", None)}
    meta = {"server": "spatial-forcing", "version": __version__,
            "policy": public_name or public_policy_name(name, family, policy_id), "policy_id": policy_id,
            "family": family,
            "action_horizon": spec.action_horizon, "action_dim": spec.action_dim, "num_images": spec.num_images,
            "state_dim": spec.state_dim, "observation_map": omap, **facts,
            "observation": {k: v for k, v in observation.items() if v is not None},
            "action": {k: v for k, v in action.items() if v is not None}}
    return {k: v for k, v in meta.items() if v is not None or k == "state_dim"}


# ====================================================================== running it
def policy_facts(policy: Any) -> dict[str, Any]:
    """What a client needs beyond the input spec to feed the policy like a local caller: its image side,
    whether its processor centre-crops, the statistics entry it un-normalises with, and the convention of
    its actions ("oft": gripper 1 = open, 0 = close). Only the facts the policy has."""
    facts = {"image_size": getattr(getattr(policy, "config", None), "image_size", None),
             "center_crop": getattr(getattr(policy, "processor", None), "center_crop", None),
             "unnorm_key": getattr(policy, "unnorm_key", None),
             "action_convention": getattr(policy, "action_convention", None)}
    return {k: v for k, v in facts.items() if v is not None}


def load_policy(path_or_id: str, unnorm_key: str | None = None, device: str = "auto", dtype: str = "auto"):
    """A checkpoint of any registered family (`policies/registry.load_policy`) in eval mode on `device`
    ("auto": CUDA if present) in `dtype`
    ("auto": bfloat16 on CUDA, float32 on CPU)."""
    import torch

    from ..policies.registry import load_policy

    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine")
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype != "auto" and dtype not in dtypes:
        raise ValueError(f"--dtype: expected auto or one of {sorted(dtypes)}, found {dtype!r}")
    dt = dtypes[dtype] if dtype != "auto" else (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    return load_policy(path_or_id, unnorm_key=unnorm_key, dtype=dt, device=dev).eval()


class ServerThread:
    """A `PolicyServer` on its own event loop in a daemon thread; `start()` returns once both ports listen."""

    def __init__(self, policy: Any, config: ServeConfig | None = None, name: str = "policy",
                 warmup: bool = False) -> None:
        self.server = PolicyServer(policy, config, name)
        self._warmup = warmup
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="sf-serve", daemon=True)

    def _run(self) -> None:
        async def main() -> None:
            self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
            try:
                await self.server.start()
            except BaseException as exc:
                self._error = exc
                self._ready.set()
                return
            self._ready.set()
            await self._stop.wait()
            await self.server.stop()

        asyncio.run(main())

    def start(self, timeout: float = 60.0) -> "ServerThread":
        if self._warmup:
            self.server.warmup()
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"the server did not start within {timeout} s")
        if self._error is not None:
            raise self._error
        return self

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.server.engine.alive

    def stop(self, timeout: float = 30.0) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout)

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def run_server(policy: Any, config: ServeConfig, name: str = "policy", warmup: bool = True,
               out: Callable[[str], None] = print, public_name: str | None = None) -> int:
    """Serve until SIGINT/SIGTERM (Ctrl-C), then close every connection and the worker; returns 0."""
    server = PolicyServer(policy, config, name, public_name)
    if warmup:
        out(f"warm-up inference: {server.warmup():.0f} ms")

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await server.start()
        out(server.describe())
        out("press Ctrl-C to stop")
        try:
            await stop.wait()
        finally:
            out("stopping: closing connections ...")
            await server.stop()

    asyncio.run(main())
    e = server.engine
    out(f"stopped: {e.served} requests answered, {e.failed} failed in the policy, {e.passes} forward passes")
    return 0
