"""On-device latency: running a flashed bundle's runner there, the local store of runs, comparisons, plots."""
