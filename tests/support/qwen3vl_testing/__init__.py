"""Test support for the qwen3vl suite: oracles, fixed cases and the multi-process harness.

Not part of the installed package: pytest puts ``tests/support`` on ``sys.path`` (pytest.ini), the
distributed harness passes it on to its workers, and the benchmarks add it themselves.
"""
