"""What an instance-second of the sd-api function costs: FC's compute-unit (CU) price table.

FC 3.0 pay-as-you-go, international site (docs/fc-deploy.md §4.5, from Alibaba's "Pay-as-you-go billing"
page): every resource of an active instance is counted in CU per second, and one CU has one price. The
defaults describe s.yaml's sd-api instance (fc.gpu.ada.1, 48 GB GPU memory, 8 vCPU, 32 GB); each figure
can be overridden through the environment (sdfc/config.py) for other instance types, regions or prices.
"""
from __future__ import annotations

from dataclasses import dataclass

# Active GPU, CU per GB of GPU memory per second, by the family in the instance type (fc.gpu.<family>.N). The
# price page lists these two; other families take SDFC_PRICE_GPU_CU_PER_GB_S (Tesla's rate until set).
GPU_CU_PER_GB_S = {"tesla": 2.1, "ada": 1.5}
VCPU_CU_PER_S = 1.0
MEMORY_CU_PER_GB_S = 0.15


@dataclass
class Pricing:
    """The estimated cost of one second of the sd-api instance: its GPU, vCPUs and memory, in CU."""
    gpu_type: str = "fc.gpu.ada.1"
    gpu_memory_gb: float = 48.0
    vcpu: float = 8.0
    memory_gb: float = 32.0
    cu_price: float = 0.000020     # USD per CU, tier 1
    currency: str = "USD"
    gpu_cu_per_gb_s: float | None = None  # None: by the GPU family

    @property
    def gpu_rate(self) -> float:
        if self.gpu_cu_per_gb_s is not None:
            return self.gpu_cu_per_gb_s
        parts = self.gpu_type.split(".")
        return GPU_CU_PER_GB_S.get(parts[2] if len(parts) > 2 else "", GPU_CU_PER_GB_S["tesla"])

    @property
    def cu_per_second(self) -> float:
        return self.gpu_rate * self.gpu_memory_gb + VCPU_CU_PER_S * self.vcpu + MEMORY_CU_PER_GB_S * self.memory_gb

    @property
    def per_second(self) -> float:
        return self.cu_per_second * self.cu_price

    def cost(self, seconds: float) -> float:
        return round(seconds * self.per_second, 8)
