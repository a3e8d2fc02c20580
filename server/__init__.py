"""loraplex gateway: OpenAI-compatible API, engine supervision, metrics and CLI."""
