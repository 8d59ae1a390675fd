"""The ``fpga`` target's pieces: an int8 systolic-array accelerator, modelled and simulated.

- `systolic`: the accelerator configuration (`FPGAConfig`) and its SCALE-Sim-style cycle model;
- `cost`: the target's cost model (int8 layers on the array, fp32 nodes on the host CPU);
- `layers`, `int8layer`: int8 layers found in a Q/DQ graph and their integer parameters;
- `requant`: fixed-point requantization (int32 multiplier + shift);
- `codegen`, `cbuild`, `export`: C/HLS-style kernels through TVM's C backend, built with gcc,
  written by ``art.save``;
- `sim`: bit-exact host simulation of those kernels;
- `lowering`: the target's lowering object, which replaces each int8 layer by its kernel.

`hwopt.targets.fpga` assembles them into ``TARGET``.
"""
