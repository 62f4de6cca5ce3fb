"""Speed and memory benchmarks that print numbers (never pass/fail tests): `python -m bench [--quick]` and
`python -m bench.scaling`."""
