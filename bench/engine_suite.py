"""The benchmarks that need the real vLLM CPU engine, sharing one engine start.

Gateway (a) vs (b) on the engine (item 1), adapter cold start (item 2) and
multi-adapter throughput (item 3). Each also runs alone (``python -m
bench.cold_start``, ``bench.multi_adapter``); together they pay vLLM's start-up
once.

Run: ``.venv/bin/python -m bench.engine_suite [--quick]``.
"""

from __future__ import annotations

import argparse

from bench import cold_start, gateway, multi_adapter
from bench.engine_session import BASE_NAME, session
from bench.results import publish

ENGINE_PAIRS = 3
"""Direct and through-loraplex runs on the engine, alternated."""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs, for debugging")
    args = parser.parse_args(argv)
    duration = 2.0 if args.quick else 4.0
    mixes = multi_adapter.MixConfig(requests=16) if args.quick else multi_adapter.MixConfig()
    with session() as s:
        print(f"[engine] gateway + engine up in {s.start_seconds:.0f}s", flush=True)
        pairs = [
            (
                gateway.measure_engine(s.engine_url, s.engine_key, BASE_NAME, duration),
                gateway.measure_engine(s.gateway_url, s.tenant_key, BASE_NAME, duration),
            )
            for _ in range(ENGINE_PAIRS)
        ]
        publish("gateway_vllm", gateway.engine_result(pairs))
        publish("cold_start", cold_start.result(cold_start.run(s)))
        publish("multi_adapter", multi_adapter.result(multi_adapter.run(s, mixes)))


if __name__ == "__main__":
    main()
