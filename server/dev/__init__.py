"""Development tooling: the loopback fleet (``make fleet``), the demo (``make demo``),
SeaweedFS for tests, and the one process runner they, the e2e tests and the
benchmarks share. Never imported by a production process.
"""
