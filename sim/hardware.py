"""Hardware tables: GPU specs, link presets and the alpha-beta all-reduce model.

Units: bandwidth in GB/s (1e9 bytes per second, one direction), latency in µs, FLOP/s in TFLOP/s (dense, per
dtype: tensor cores for bf16 / fp16 / fp8, half the datasheets' with-sparsity figures; the FP32 cores for fp32),
memory in GiB. `bytes_per_us = GB/s * 1e3`. Every
entry names its source. Two times are measured on an H100 and assumed for the other cards: `kernel_floor_us`, the
shortest time one decode kernel takes under CUDA graphs, launch gap included (one SmolLM2-135M decoder layer's time
over its 9 kernels; docs/design.md, measured anchors), and `launch_us`, what one captured pass (a graph replay)
costs the device beyond the kernels a latency profile times (docs/simulator.md, stages sharing a device).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

H100_KERNEL_FLOOR_US = 62.0 / 9  # SmolLM2-135M decoder layer, q = 1, CUDA graph: its time over its 9 kernels
H100_LAUNCH_US = 43.0  # a captured pass timed back-to-back over the sum of its profiled components (AR, draft)
DTYPES = ("bf16", "fp16", "fp32", "fp8")  # fp8: draft weights only (a what-if: the executor drafts in bf16 / fp16)


@dataclass(frozen=True)
class GPUSpec:
    name: str
    hbm_bandwidth_GBps: float
    peak_tflops: Mapping[str, float]  # dense peak per dtype (`DTYPES`)
    memory_GiB: float
    kernel_floor_us: float
    source: str
    launch_us: float = H100_LAUNCH_US

    def tflops(self, dtype: str) -> float:
        """The dense peak for `dtype` (bf16 | fp16 | fp32); a ValueError naming the card where it has none."""
        if dtype not in self.peak_tflops:
            raise ValueError(f"{self.name}: no peak_tflops for {dtype} (it gives {sorted(self.peak_tflops)})")
        return self.peak_tflops[dtype]


@dataclass(frozen=True)
class LinkSpec:
    """A point-to-point link: time_us(nbytes) = latency_us + nbytes / bandwidth."""

    name: str
    latency_us: float
    bandwidth_GBps: float | None  # None: infinite bandwidth
    source: str = "custom"

    def time_us(self, nbytes: int) -> float:
        if self.bandwidth_GBps is None:
            return self.latency_us
        return self.latency_us + nbytes / (self.bandwidth_GBps * 1e3)


def _peaks(tensor: float, fp32: float, fp8: float | None = None) -> dict[str, float]:
    return {"bf16": tensor, "fp16": tensor, "fp32": fp32, **({"fp8": fp8} if fp8 else {})}


GPUS: dict[str, GPUSpec] = {
    "H100": GPUSpec(
        "NVIDIA H100 SXM5 80GB", 3350.0, _peaks(989.0, 67.0, 1979.0), 80.0, H100_KERNEL_FLOOR_US,
        "NVIDIA H100 Tensor Core GPU datasheet",
    ),
    "H100-PCIe": GPUSpec(
        "NVIDIA H100 PCIe 80GB", 2000.0, _peaks(756.0, 51.0, 1513.0), 80.0, H100_KERNEL_FLOOR_US,
        "NVIDIA H100 Tensor Core GPU datasheet",
    ),
    "H200": GPUSpec(
        "NVIDIA H200 SXM 141GB", 4800.0, _peaks(989.0, 67.0, 1979.0), 141.0, H100_KERNEL_FLOOR_US,
        "NVIDIA H200 Tensor Core GPU datasheet",
    ),
    "A100": GPUSpec(
        "NVIDIA A100 SXM4 80GB", 2039.0, _peaks(312.0, 19.5), 80.0, H100_KERNEL_FLOOR_US,
        "NVIDIA A100 Tensor Core GPU datasheet",
    ),
    "L40S": GPUSpec(
        "NVIDIA L40S 48GB", 864.0, _peaks(362.0, 91.6, 733.0), 48.0, H100_KERNEL_FLOOR_US, "NVIDIA L40S datasheet",
    ),
}  # fmt: skip

LINKS: dict[str, LinkSpec] = {
    "ideal": LinkSpec("ideal", 0.0, None, "free link, for analytic checks"),
    "nvlink": LinkSpec("nvlink", 5.0, 450.0, "H100 NVLink 4: 900 GB/s bidirectional; latency: NCCL p2p small message"),
    "nvlink3": LinkSpec("nvlink3", 5.0, 300.0, "A100 NVLink 3: 600 GB/s bidirectional"),
    "pcie5": LinkSpec("pcie5", 10.0, 64.0, "PCIe 5.0 x16: 64 GB/s per direction; latency assumed"),
    "pcie4": LinkSpec("pcie4", 10.0, 32.0, "PCIe 4.0 x16: 32 GB/s per direction; latency assumed"),
    "ib-ndr": LinkSpec("ib-ndr", 15.0, 50.0, "InfiniBand NDR 400 Gb/s; latency: NCCL over IB, assumed"),
    "ib-hdr": LinkSpec("ib-hdr", 15.0, 25.0, "InfiniBand HDR 200 Gb/s; latency: NCCL over IB, assumed"),
}


def allreduce_us(link: LinkSpec, nbytes: int, ranks: int) -> float:
    """Ring all-reduce, alpha-beta model: 2(p − 1)·α + 2(p − 1)/p · nbytes / bandwidth (0 for one rank)."""
    if ranks <= 1:
        return 0.0
    steps = 2 * (ranks - 1)
    per_byte_us = 0.0 if link.bandwidth_GBps is None else 1.0 / (link.bandwidth_GBps * 1e3)
    return steps * link.latency_us + steps / ranks * nbytes * per_byte_us


def gpu_named_by(device: str) -> str | None:
    """The `GPUS` entry a device name names (a latency profile's `device`, e.g. "NVIDIA H100 80GB HBM3" -> "H100"):
    the entry all of whose words are words of the name, the one with the most words where several are; None for a
    CPU or a GPU not in the table."""
    words = set(re.findall(r"[a-z0-9]+", device.lower()))
    named = [key for key in GPUS if set(key.lower().split("-")) <= words]
    return max(named, key=lambda key: len(key.split("-")), default=None)
