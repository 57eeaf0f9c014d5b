"""Benchmarks of serving (in-process torch / ONNX Runtime vs the running service over HTTP) and of training.

    python -m benchmarks.run            # full run: Markdown tables on stdout, JSON in bench-results/bench.json
    python -m benchmarks.run --quick    # a short smoke run (the test suite uses it); numbers are not meaningful

See benchmarks/run.py for what is measured and how.
"""
