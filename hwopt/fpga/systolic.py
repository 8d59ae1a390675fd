"""Cycle-level cost model of an int8 systolic array, counted the way SCALE-Sim does.

Sits in the *analyse* step of the ``fpga`` target: `hwopt.fpga.cost` asks it for the cycles of
every int8 layer. A layer is a GEMM (conv lowered by im2col): ``m`` output pixels x ``n`` output
channels, reduced over ``k = Cin/groups * kh * kw`` (SCALE-Sim's Sr, Sc and T for the output-
stationary dataflow). The dataflow maps two of (m, n, k) onto the PE rows and columns and streams
the third through the array in time:

    dataflow  rows  cols  temporal  outer fold loop
    os        m     n     k         rows  (outputs stay in the PEs; k streams)
    ws        k     n     m         cols  (weights stay in the PEs; pixels stream)
    is        k     m     n         cols  (inputs stay in the PEs; filters stream)

Each fold (one tile of the rows dim x one tile of the cols dim) takes ``2*R + C + T - 2`` cycles
(fill, stream, drain; SCALE-Sim, Samajdar et al., ISPASS 2020, table II). Memory: operand tiles are
fetched from DRAM into the ifmap / filter buffers (double-buffered, so a fold's fetch overlaps the
previous fold's compute) and outputs are drained to DRAM the same way. A fold stalls when its
fetches take longer than one fold of compute; when a fold's tiles do not fit half of their buffers
nothing overlaps and every fetch stalls. An operand that fits its buffer whole is fetched once;
otherwise tiles that are reused across folds are fetched again. The requantization / ReLU epilogue
is a pipelined post-processing unit on the drain path and adds no cycles.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

DATAFLOWS = ("os", "ws", "is")
# (rows dim, cols dim, temporal dim, dim of the outer fold loop) per dataflow; the inner loop runs
# over the other spatial dim. With k spatial (ws, is), k is the inner loop so partial sums of one
# output tile accumulate in the ofmap buffer across consecutive folds.
_MAPPING = {"os": ("m", "n", "k", "m"), "ws": ("k", "n", "m", "n"), "is": ("k", "m", "n", "m")}
_OPERAND_DIMS = {"ifmap": ("m", "k"), "filter": ("k", "n"), "ofmap": ("m", "n")}


@dataclass(frozen=True)
class FPGAConfig:
    """A systolic-array accelerator: PE array, dataflow, on-chip buffers, DRAM and energy.

    Defaults describe a ZCU102-class board (Xilinx Zynq UltraScale+ XCZU9EG):
    - 32 x 32 int8 PEs = 1024 MACs/cycle; at two int8 MACs per DSP48E2 that is 512 of the part's
      2520 DSPs (DS891 product table), leaving room for the rest of the design;
    - 200 MHz: FPGA ViT/CNN accelerators on the ZCU102 run at 150-300 MHz (HeatViT, Dong et al.,
      HPCA'23, 8-bit fixed point on ZCU102; Shao et al. 2024, EfficientViT accelerator at 200 MHz
      on ZCU102);
    - on-chip buffers: the XCZU9EG has 912 BRAM36 blocks = 32.1 Mb ~ 4 MB (DS891); 2.5 MiB of it
      as ifmap / filter / ofmap buffers, the rest for line buffers, FIFOs and control;
    - DRAM: the PS DDR4 is 64 bit at 2400 MT/s = 19.2 GB/s peak (ZCU102 UG1182) = 96 B/cycle at
      200 MHz; 64 B/cycle (2/3 of peak) is assumed sustained through the HP ports;
    - energy (Horowitz, ISSCC'14, 45 nm): 8-bit multiply 0.2 pJ + 32-bit add 0.1 pJ = 0.3 pJ per
      int8 MAC; 8 KB SRAM read 10 pJ per 64 bit = 1.25 pJ/B for BRAM; DRAM 1.3-2.6 nJ per 64 bit,
      low end = 160 pJ/B. FPGA fabric costs more than these ASIC figures; they rank designs.
    """

    rows: int = 32
    cols: int = 32
    dataflow: str = "os"
    ifmap_buf: int = 1 << 20  # bytes
    filter_buf: int = 1 << 20
    ofmap_buf: int = 512 << 10
    dram_bytes_per_cycle: float = 64.0
    clock_hz: float = 200e6
    mac_energy_j: float = 0.3e-12
    bram_energy_j_per_byte: float = 1.25e-12
    dram_energy_j_per_byte: float = 160e-12

    def __post_init__(self):
        if self.dataflow not in DATAFLOWS:
            raise ValueError(f"FPGAConfig.dataflow must be one of {DATAFLOWS}, "
                             f"got {self.dataflow!r}")
        for name in ("rows", "cols", "ifmap_buf", "filter_buf", "ofmap_buf"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"FPGAConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.dram_bytes_per_cycle <= 0 or self.clock_hz <= 0:
            raise ValueError("FPGAConfig.dram_bytes_per_cycle and clock_hz must be > 0")

    @property
    def peak_macs_per_s(self) -> float:
        return self.rows * self.cols * self.clock_hz


@dataclass(frozen=True)
class GemmShape:
    """One int8 layer as a GEMM per group: O[m, n] = sum_k A[m, k] * B[k, n].

    `ifmap_bytes` is the unique input bytes per group that DRAM must deliver (the input tensor, not
    its im2col expansion: the ifmap buffer's read side expands windows on chip, as FPGA conv
    engines do with line buffers); None means m * k (a linear layer).
    """

    m: int
    n: int
    k: int
    groups: int = 1
    ifmap_bytes: int | None = None

    @property
    def macs(self) -> int:
        return self.groups * self.m * self.n * self.k


@dataclass(frozen=True)
class LayerCycles:
    cycles: int
    compute_cycles: int
    stall_cycles: int
    folds: int
    fold_cycles: int
    macs: int
    dram_bytes: float
    sram_bytes: float
    double_buffered: bool
    utilization: float  # MACs done / MACs the array could have done in `cycles`

    @property
    def stall_fraction(self) -> float:
        return self.stall_cycles / self.cycles if self.cycles else 0.0


def _tiles(extent: int, size: int) -> list[int]:
    full, rest = divmod(extent, size)
    return [size] * full + ([rest] if rest else [])


def conv_gemm(n: int, cin: int, h: int, w: int, cout: int, kh: int, kw: int, ho: int, wo: int,
              groups: int = 1) -> GemmShape:
    """The GEMM of a 2-D convolution (NCHW), per group."""
    return GemmShape(m=n * ho * wo, n=cout // groups, k=(cin // groups) * kh * kw, groups=groups,
                     ifmap_bytes=n * (cin // groups) * h * w)


@dataclass(frozen=True)
class _Plan:
    """How one group's GEMM is folded onto the array and which tiles stay on chip."""

    outer_dim: str
    inner_dim: str
    tiles: dict  # dim -> tile extents along it (the two spatial dims)
    ext: dict  # dim -> full extent
    ratio: dict  # operand -> DRAM bytes per operand-matrix element
    fits_whole: dict  # operand -> the whole operand stays in its buffer
    fits_tile: dict  # operand -> one fold's tile fits its buffer
    k_spatial: bool  # k is on the array: partial sums accumulate across inner folds
    spill: bool  # partial sums do not fit the ofmap buffer and go to DRAM as int32
    double: bool  # every fold's tiles fit half their buffers: fetches overlap compute

    def tile_elems(self, operand: str, i: int, j: int) -> int:
        size = 1
        for d in _OPERAND_DIMS[operand]:
            if d == self.outer_dim:
                size *= self.tiles[d][i]
            elif d == self.inner_dim:
                size *= self.tiles[d][j]
            else:
                size *= self.ext[d]
        return size


def _plan(shape: GemmShape, cfg: FPGAConfig) -> _Plan:
    rows_dim, cols_dim, t_dim, outer_dim = _MAPPING[cfg.dataflow]
    inner_dim = cols_dim if outer_dim == rows_dim else rows_dim
    ext = {"m": shape.m, "n": shape.n, "k": shape.k}
    tiles = {rows_dim: _tiles(ext[rows_dim], cfg.rows), cols_dim: _tiles(ext[cols_dim], cfg.cols)}
    # DRAM bytes per im2col element of the ifmap: < 1 where conv windows overlap.
    ifmap_unique = shape.ifmap_bytes if shape.ifmap_bytes is not None else shape.m * shape.k
    ratio = {"ifmap": ifmap_unique / (shape.m * shape.k), "filter": 1.0}
    bufs = {"ifmap": cfg.ifmap_buf, "filter": cfg.filter_buf}
    whole = {"ifmap": ifmap_unique, "filter": shape.k * shape.n}
    k_spatial = t_dim != "k"
    plan = _Plan(outer_dim, inner_dim, tiles, ext, ratio, {}, {}, k_spatial, False, False)
    biggest = {op: plan.tile_elems(op, 0, 0) for op in _OPERAND_DIMS}
    out_tile = biggest["ofmap"] * (4 if k_spatial else 1)
    return _Plan(outer_dim, inner_dim, tiles, ext, ratio,
                 fits_whole={op: whole[op] <= bufs[op] for op in bufs},
                 fits_tile={op: biggest[op] * ratio[op] <= bufs[op] for op in bufs},
                 k_spatial=k_spatial, spill=k_spatial and out_tile > cfg.ofmap_buf // 2,
                 double=(all(biggest[op] * ratio[op] <= bufs[op] // 2 for op in bufs)
                         and out_tile <= cfg.ofmap_buf // 2))


def _fold_traffic(plan: _Plan, i: int, j: int, last_inner: bool) -> tuple[float, float, float]:
    """(DRAM bytes read, DRAM bytes written, buffer bytes accessed) of fold (i, j)."""
    reads = sram = 0.0
    for op in ("ifmap", "filter"):
        elems = plan.tile_elems(op, i, j)
        sram += elems  # the array reads the whole tile from its buffer
        if _fetch(op, i, j, plan):
            reads += elems * plan.ratio[op]
    out = plan.tile_elems("ofmap", i, j)
    last = not plan.k_spatial or last_inner
    writes = out if last else 0.0
    if plan.spill:  # partial sums do not fit on chip: read back and written out as int32
        reads += 4 * out if j > 0 else 0.0
        writes += 0.0 if last else 4 * out
    sram += out * (4 if plan.k_spatial else 1) + reads + writes
    return reads, writes, sram


@functools.lru_cache(maxsize=4096)
def simulate(shape: GemmShape, cfg: FPGAConfig) -> LayerCycles:
    """Cycles, stalls and traffic of one layer on `cfg` (all groups, run one after another)."""
    plan = _plan(shape, cfg)
    fold_cycles = 2 * cfg.rows + cfg.cols + plan.ext[_MAPPING[cfg.dataflow][2]] - 2
    n_out, n_in = len(plan.tiles[plan.outer_dim]), len(plan.tiles[plan.inner_dim])
    bw = cfg.dram_bytes_per_cycle
    dram = sram = stall = prev_write = 0.0
    for i in range(n_out):
        for j in range(n_in):
            reads, writes, touched = _fold_traffic(plan, i, j, j == n_in - 1)
            if i == 0 and j == 0:
                stall += reads / bw  # cold start: nothing to overlap with
            elif plan.double:  # this fold's fetches and the last one's writes hide behind it
                stall += max(0.0, (reads + prev_write) / bw - fold_cycles)
            else:
                stall += (reads + prev_write) / bw
            dram += reads + writes
            sram += touched
            prev_write = writes
    stall += prev_write / bw  # drain the last outputs
    folds = n_out * n_in
    compute = shape.groups * folds * fold_cycles
    stall_cycles = math.ceil(shape.groups * stall)
    cycles = compute + stall_cycles
    return LayerCycles(cycles=cycles, compute_cycles=compute, stall_cycles=stall_cycles,
                       folds=shape.groups * folds, fold_cycles=fold_cycles, macs=shape.macs,
                       dram_bytes=shape.groups * dram, sram_bytes=shape.groups * sram,
                       double_buffered=plan.double,
                       utilization=shape.macs / (cycles * cfg.rows * cfg.cols))


def _fetch(op: str, i: int, j: int, plan: _Plan) -> bool:
    """Whether fold (i, j) must fetch its `op` tile from DRAM (i: outer index, j: inner index)."""
    dims = _OPERAND_DIMS[op]
    if plan.outer_dim in dims and plan.inner_dim in dims:
        return True  # a different tile every fold
    if plan.outer_dim in dims:
        return j == 0 or not plan.fits_tile[op]  # same tile for the whole inner loop
    # Same tiles again on every outer iteration: fetched once if the whole operand stays on chip.
    return i == 0 or not plan.fits_whole[op]
