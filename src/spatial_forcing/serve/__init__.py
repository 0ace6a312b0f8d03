"""Serving a policy to robots and simulators (docs/spec/SERVING.md).

- `codec`: the wire encodings: openpi msgpack-numpy (SERVING.md 1.7) and OpenVLA json-numpy (2.1).
- `client`: a websocket client policy (openpi protocol), an HTTP client (OpenVLA `/act`) and the
  action-chunk broker (1.8). Importing it needs numpy, msgpack and websockets, never torch.
- `libero`: client-side helpers for LIBERO-style clients (resize with pad, the openpi LIBERO request).
- `obsmap`: which request keys are which cameras, the state and the prompt (presets per client style),
  and the validation of every request against the policy's inputs (SERVING.md 4).
- `engine`: the inference worker (one thread, a queue, optional cross-client batching).
- `server`: one process serving the openpi websocket protocol and the OpenVLA HTTP protocol.
- `cli`: `sf serve`.

This package imports no simulator, and `__init__` imports nothing, so the client stays torch-free.
"""
