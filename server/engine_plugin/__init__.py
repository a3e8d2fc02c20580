"""Code that runs inside each vLLM engine process: the LoRA resolver and its disk cache.

vLLM loads ``server.engine_plugin.resolver:register`` as a general plugin. It
may import ``registry`` (lazily, only when enabled) and the standard library;
never the rest of ``server``: an engine must not carry the gateway.
"""
