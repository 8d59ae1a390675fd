"""Structured sparsity: masks per scheme, least-squares reconstruction, compact layouts, ops.

Used by the ``prune`` pass (``hwopt.passes.prune``) in the *rewrite* step and by the sparse
lowering (``hwopt.lowering.sparse``, ``hwopt.schedules.sparse``) in the *lower* step:

- `masks`: which weights a scheme keeps (kernel patterns + connectivity, block-punched, N:M,
  block-structured), from an importance score per weight;
- `reconstruct`: the kept weights refitted by least squares on calibration activations;
- `layout`: a mask as a compact ``[out, J]`` weight with per-entry input indices (what the sparse
  kernels read), and the detection of an already-pruned layer's structure;
- `ops`: the ``hwopt::sparse_conv2d`` / ``hwopt::sparse_linear`` custom ops (PyTorch reference).
"""
