"""``python -m benchmarks.gpu_check``: everything the CUDA engine must show on a lent GPU, in one run of ~6 minutes.

    python -m benchmarks.gpu_check                  # H100/H200: ~4 GB per checkpoint, <= ~6 min
    python -m benchmarks.gpu_check --size tiny      # seconds; on a machine without a GPU the GPU parts say so

Steps, each in its own process with its own timeout (a hung or crashed step is recorded and the next one runs),
most important first, skipped when the time budget (``--budget``) is spent:

1. ``env``: card, driver, clocks (``nvidia-smi`` queries only), versions, cores, memory, disk, and whether the
   device supports ``cudaHostRegister`` and its ReadOnly flag.
2. ``pytest``: the ``cuda``-marked tests (``pytest -m cuda``): GPU output bytes = CPU engine bytes, both input
   paths, refused registration, resume, null sink, peak memory of a 2 GB embedding, the compiled kernel. A hung
   test fails alone (pytest-timeout, 100 s: one test's 81 kernel compiles take tens of seconds); the log is
   written as it runs (``$OUT/pytest-cuda.log``).
3. ``kernel``: the merge kernel alone against a device-to-device copy of the same bytes (``triton.testing.do_bench``
   medians), a block-size sweep, pinned H2D/D2H and H2D from a registered read-only file mapping, registration speed
   with 1 and 4 threads. Needs no trio, so it runs before the slow steps.
4. ``generate``: a synthetic trio (``streammerge.synth``; full size: Qwen2.5-7B layout cut to 4 layers, 4.0 GB per
   checkpoint), timed.
5. ``pipeline``: page cache -> GPU -> null sink (``sink="null-sha256"``): the CPU engine, then the CUDA engine with
   registered windows (16 and 64 MiB chunks) and with pinned staging, each once plain and once with ``profile`` for
   the per-stage breakdown (host read = registration / pack, H2D, kernel, D2H, write) and the overlap; SHA-256 of
   every output file compared with the CPU engine's.
6. ``e2e``: the I/O floor (read the inputs + write and fsync the output's bytes), then the CPU and the CUDA engine
   to disk; output files re-hashed and compared.
7. ``mergekit``: ``mergekit-yaml --cuda`` on the same trio: an installed mergekit, else the wheels carried in
   ``.whl/`` (``make peer-wheels``), else recorded as absent.
8. ``sparse70b``: a Llama-3-70B-layout trio of holes (2 layers: embedding + head 2.1 GB each) merged on the GPU to
   the null sink with 64 MiB chunks: peak GPU memory.
9. ``sweep``: a 3-alpha sweep against 3 single runs on CUDA, and a 2-vector combine on CUDA against the CPU engine
   (issue 6 on the GPU; last, as the issue 3 targets come first).

Each step saves its parts as they complete, and the results file is rewritten after every step, so a step killed
on its timeout, or the whole run cut short, keeps what was measured before.

The last thing printed is a short table; the full results (card, versions, sizes, every figure, every failure) go
to ``benchmarks/results/gpu_check-<timestamp>.json`` and, when ``$OUT`` is set (the device tool's output folder),
to ``$OUT`` as well.

Modules: :mod:`.config` (sizes, budgets, timeouts), :mod:`.common` (what the steps share), :mod:`.runner` (each step
in its own process, its partial results kept), :mod:`.summary` (the figures and the table printed last), one module
per step (:mod:`.env`, :mod:`.cuda_tests` for the ``pytest`` step, :mod:`.kernel`, :mod:`.generate`,
:mod:`.pipeline`, :mod:`.e2e`, :mod:`.peer` for the ``mergekit`` step, :mod:`.sparse70b`, :mod:`.sweep`), and
:mod:`.cli` (the command line and the run; ``__main__`` calls it).
"""
