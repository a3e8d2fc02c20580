"""loraplex's programs, one subpackage per process (see docs/ARCHITECTURE.md).

- ``server.gateway``: the gateway process's serving side: the ASGI app, the
  OpenAI inference hot path, engine replicas and their health, metrics.
- ``server.api``: the REST APIs the gateway also serves (registry, fine-tuning
  jobs) with their key checks.
- ``server.engine_plugin``: code that runs inside each vLLM engine process (the
  LoRA resolver and its adapter disk cache). It imports nothing else from ``server``.
- ``server.cli``: the ``loraplex`` command lines (serve, operator, worker).
- ``server.dev``: development tooling (the loopback fleet, the demo, SeaweedFS).

Shared by them all: ``server.config`` (typed settings) and ``server.errors``
(OpenAI-shaped errors). ``server.app`` composes the gateway process's app.
"""
