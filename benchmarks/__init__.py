"""The streammerge benchmark suite: throughput against the I/O floor and against peers, memory against model size.

Run it from the repository root:

    python -m benchmarks.run                      # ~0.5, 2 and 8 GB checkpoints, warm cache, 3 repeats
    python -m benchmarks.run --cold --repeats 5   # cold page cache rounds too
    python -m benchmarks.run --smoke              # tiny sizes, one repeat: what CI runs

Modules, data flowing one way:

- [`benchmarks.inputs`]: synthetic trios per size (cached under a work directory) and sparse 70B-layout trios;
- [`benchmarks.tools`]: what is measured (I/O floor, streammerge, naive torch, mergekit) as command lines;
- [`benchmarks.monitor`]: runs one command as its own process tree and samples its memory every 10 ms;
- [`benchmarks.workers`]: the floor and naive baselines, run as ``python -m benchmarks.workers``;
- [`benchmarks.verify`]: output bytes against an independent numpy reference, and peers' differences in ulps;
- [`benchmarks.machine`]: machine, versions, page-cache residency, dropping caches;
- [`benchmarks.report`]: JSON, CSV, markdown table and PNG plot;
- [`benchmarks.run`]: the command line that ties them together.

Importing the package is cheap (no torch): the floor worker must start as fast as ``cat``.
"""
