"""Benchmarks of expface_kernels against its peers (DESIGN §6; docs/benchmarks.md).

Run from the repository root::

    python -m bench.run                      # the default device: the gpu preset on a GPU, else
                                             # the quick CPU preset (~3 minutes on 2 cores)
    python -m bench.run --preset full        # every power of two, more repeats
    python -m bench.run --device cuda --preset gpu
    python -m bench.run --preset scale       # C = 2^22 on the CPU, chunked/extension only
    python -m bench.run profile              # GPU: fwd/bwd split, launch configs, capacity
    python -m bench.run host                 # dispatcher ops and µs of one tiny call

Modules: :mod:`bench.run` (the CLI), :mod:`bench.sweep` (the sweep's measurements),
:mod:`bench.peers` (what is measured), :mod:`bench.timing` (alternating runs,
median/p20/p80), :mod:`bench.memory` (peak extra memory; the CPU worker),
:mod:`bench.records` (the long-format CSV), :mod:`bench.report` (the Markdown tables),
:mod:`bench.plots` (PNG figures), :mod:`bench.profile` (the ``profile`` part),
:mod:`bench.host_overhead` (the ``host`` part), :mod:`bench.labels` (how C and times are
written), :mod:`bench.cli` (argparse types).
"""
