"""The gateway: authenticates, resolves, limits, places and forwards OpenAI requests.

Owns the gateway's ASGI app and its background loops, the HTTP transport, the
inference hot path, the proxy to engines, engine replicas (supervised or
discovered) and their health, the cached registry view, accounting and metrics.

May import ``registry``, ``router``, ``server.config`` and ``server.errors``;
never ``training``, ``server.api``, ``server.cli`` or ``server.dev``.
"""
