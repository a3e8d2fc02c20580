"""The REST APIs served next to the inference routes: registry admin and tenant routes,
fine-tuning jobs and files, and the key checks they share (``auth``).

May import ``registry``, ``training`` (to validate job configs and datasets),
``server.config`` and ``server.errors``; never ``server.gateway``.
"""
