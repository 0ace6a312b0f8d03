"""`sf serve`: load a policy and serve it over the openpi websocket and OpenVLA HTTP protocols."""

from __future__ import annotations

import argparse
import logging
import os

from spatial_forcing.errors import POSITIVE, PORT, UserError, device_arg, float_in

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def add_serve_arguments(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("serve", help="serve a policy to robots: openpi websocket (port 8000) + OpenVLA HTTP /act (8777)",
                       description="Serve a policy over the openpi websocket protocol (msgpack-numpy, metadata "
                                   "frame, /healthz) and the OpenVLA HTTP protocol (POST /act, json-numpy, plain "
                                   "or double-encoded) from one process. Ctrl-C stops it cleanly.")
    p.add_argument("--policy", required=True, help="checkpoint folder (this project's format or upstream OpenVLA-OFT) "
                                                   "or a Hugging Face hub id")
    p.add_argument("--host", default="0.0.0.0", help="interface to bind (default: all)")
    p.add_argument("--port", type=PORT, default=8000, help="openpi websocket port (0 = any free port)")
    p.add_argument("--http-port", type=PORT, default=8777, help="OpenVLA HTTP port (0 = any free port)")
    p.add_argument("--no-http", action="store_true", help="serve the websocket protocol only")
    p.add_argument("--secret", help="shared secret clients must send as 'Authorization: Api-Key <secret>' "
                                    "(default: $SF_SERVE_SECRET)")
    p.add_argument("--no-auth", action="store_true",
                   help="serve without a secret on a network interface (anyone who reaches the ports can drive "
                        "the policy); not needed with --host 127.0.0.1")
    p.add_argument("--obs-map", default="libero", help="websocket request keys: libero, openpi, aloha, openvla, "
                                                       "or a JSON map / file (see spatial_forcing.serve.obsmap)")
    p.add_argument("--http-obs-map", default="openvla", help="HTTP request keys (default: OpenVLA's deploy.py keys)")
    p.add_argument("--max-batch", type=POSITIVE, default=1,
                   help="batch up to N waiting requests from different clients into one forward pass (1 = off)")
    p.add_argument("--batch-wait-ms", type=float_in(0.0), default=0.0,
                   help="with --max-batch > 1: wait this long for more requests before a pass (default 0)")
    p.add_argument("--max-message-mb", type=float_in(1 / 1024), default=64.0, help="largest accepted frame / body (MiB)")
    p.add_argument("--request-timeout", type=float_in(0.0, low_open=True), default=30.0,
                   help="seconds from receiving a request to its actions (queue + inference)")
    p.add_argument("--client-timeout", type=float_in(0.0, low_open=True), default=30.0,
                   help="seconds a client may stall sending a body or reading a response before it is dropped")
    p.add_argument("--header-timeout", type=float_in(0.0, low_open=True), default=10.0,
                   help="seconds a connection may take to send a request's headers (websocket handshake, HTTP "
                        "request line and headers; also how long an idle HTTP keep-alive connection stays open)")
    p.add_argument("--max-connections", type=POSITIVE, default=64,
                   help="live websocket sessions (and HTTP requests in flight); more are refused with 503")
    p.add_argument("--max-prompt-chars", type=POSITIVE, default=2000)
    p.add_argument("--policy-name", help="the name clients see in the metadata frame (default: the hub id, or for a "
                                         "local checkpoint its family and content id; a server path is never sent)")
    p.add_argument("--unnorm-key", help="dataset statistics entry that un-normalises actions (default: the only one)")
    p.add_argument("--device", type=device_arg, default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--no-warmup", action="store_true", help="skip the warm-up inference before serving")
    p.add_argument("--debug", action="store_true", help="include tracebacks of policy failures in error replies")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.set_defaults(func=cmd_serve)
    return p


def resolve_secret(args: argparse.Namespace) -> str | None:
    """The shared secret (--secret, else $SF_SERVE_SECRET), or None with --no-auth or on loopback.
    An empty secret is an error, never "no authentication"."""
    secret, where = args.secret, "--secret"
    if secret is None and "SF_SERVE_SECRET" in os.environ:
        secret, where = os.environ["SF_SERVE_SECRET"], "SF_SERVE_SECRET"
    if secret is not None and not secret.strip():
        raise UserError(f"{where}: expected a non-empty shared secret, found {secret!r}; an empty secret would "
                        f"let everyone in (to serve without one, pass --no-auth)")
    if secret is not None and args.no_auth:
        raise UserError(f"--no-auth: contradicts the secret given by {where}; use one or the other")
    if secret is None and not args.no_auth and args.host not in LOOPBACK:
        raise UserError(f"--host {args.host}: serving on a network interface needs --secret (or SF_SERVE_SECRET), "
                        f"found none; pass --no-auth to serve without authentication, or --host 127.0.0.1")
    return secret


def cmd_serve(args: argparse.Namespace) -> int:
    from .obsmap import observation_map
    from .server import ServeConfig, load_policy, run_server

    observation_map(args.obs_map), observation_map(args.http_obs_map)  # refuse a bad map before loading
    if args.policy_name is not None and not args.policy_name.strip():
        raise UserError(f"--policy-name: expected a non-empty name, found {args.policy_name!r}")
    config = ServeConfig(host=args.host, port=args.port, http_port=None if args.no_http else args.http_port,
                         secret=resolve_secret(args), obs_map=args.obs_map, http_obs_map=args.http_obs_map,
                         max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms,
                         max_message_bytes=int(args.max_message_mb * (1 << 20)),
                         request_timeout_s=args.request_timeout, client_timeout_s=args.client_timeout,
                         header_timeout_s=args.header_timeout, max_connections=args.max_connections,
                         max_prompt_chars=args.max_prompt_chars, debug=args.debug)
    print(f"loading {args.policy} ...", flush=True)
    try:
        policy = load_policy(args.policy, unnorm_key=args.unnorm_key, device=args.device, dtype=args.dtype)
        level = getattr(logging, args.log_level)
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        for noisy in ("websockets", "aiohttp"):  # one line per connection otherwise
            logging.getLogger(noisy).setLevel(max(logging.WARNING, level))
        return run_server(policy, config, name=str(args.policy), warmup=not args.no_warmup,
                          out=lambda line: print(line, flush=True), public_name=args.policy_name)
    except KeyboardInterrupt:  # Ctrl-C before serving started (while loading or warming up)
        print("interrupted before serving started", flush=True)
        return 130
