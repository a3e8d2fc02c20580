"""The ``loraplex`` command lines: ``serve``, the operator commands (tenants, keys,
bases, adapters) and the training worker. ``main`` is the console script's entry.

May import every other package: it is where processes are assembled.
"""
