"""The machine profile: measured bandwidths and rates of this machine's tiers, written by ``tiertune probe``.

Its figures are for predicting step times and choosing placements; the machines are noisy, so they are
good for ratios and rough estimates, not for exact timings.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tiertune.errors import TiertuneError

DEFAULT_PROFILE = Path.home() / ".cache" / "tiertune" / "machine-profile.json"


@dataclass
class MachineProfile:
    cpus: int
    host_total_bytes: int
    dram_copy_gbps: float
    cpu_adamw_params_per_s: float
    device_tflops: float  # dense matmul throughput of the training device, in its training dtype
    nvme: dict[str, dict[str, float]] = field(default_factory=dict)  # dir -> {"write_qd8_bs1m": GB/s, ...}
    cuda: dict[str, float] = field(default_factory=dict)  # "h2d_pinned" ... in GB/s; empty without CUDA
    cxl_copy_gbps: dict[str, float] = field(default_factory=dict)  # node id -> GB/s
    # CPU AdamW kernels (tiertune.optim.kernels) -> params/s; optim.kernel=auto takes the fastest
    cpu_adam_kernels: dict[str, float] = field(default_factory=dict)
    created: str = ""

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> MachineProfile:
        try:
            profile = cls(**json.loads(path.read_text()))
            rates = [profile.dram_copy_gbps, profile.cpu_adamw_params_per_s, profile.device_tflops]
            rates += [v for d in profile.nvme.values() for v in d.values()] + list(profile.cuda.values())
            rates += list(profile.cpu_adam_kernels.values())
            if not all(isinstance(r, (int, float)) and r > 0 for r in rates):
                raise ValueError("a measured rate is zero or negative")
            return profile
        except (OSError, ValueError, TypeError) as e:
            raise TiertuneError(
                f"machine profile {str(path)!r} is unreadable ({e}); run `tiertune probe` "
                "to measure this machine again"
            ) from None
