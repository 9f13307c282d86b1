"""Benchmarks that tell the truth: ``python -m sjd_kernels.bench {list,ops,e2e,compare}``.

- ``cases``: the registered op cases (SPEC section 8 shapes), their checks and byte counts;
- ``timing``: CUDA events, warm-up, cold L2, CUDA-graph replay, copy bandwidth; refuses on CPU;
- ``ops``: check-then-time over every op and backend, CSV + markdown + plot;
- ``e2e``: decoding on a model (NFE, compression, tokens/s, latency split, laws against AR);
- ``compare``: a run against a saved baseline, exit 1 on regression;
- ``reference_sjd``: the public SJD loop in PyTorch, the "reference SJD" baseline;
- ``plots``: PNG plots (Agg).
"""
