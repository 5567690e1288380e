"""The benchmark harness (`python -m bench.run MODEL`, `bench.compare`, `bench.table`, `bench.costs`,
`bench.readme`, ...) and, in `bench.studies`, the one-off studies (their index: bench/studies/README.md)."""
