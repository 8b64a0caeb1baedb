"""Which blocks' AdamW updates run on the CPU and which on the GPU, when the optimizer state lives in host
memory: the CPU updates blocks in place while the GPU updates others, copied over PCIe and back.

The model, per step. The GPU side is a three-stage pipeline on separate streams (copy in of block k+1,
kernel on block k, copy out of block k-1), so a block costs ``launch_s`` plus its slowest stage, and the
step pays once for filling and draining the pipeline: the stages before the slowest one for the first
block and those after it for the last (which stage is slowest does not depend on the block's size: every
stage is linear in it). The CPU side costs ``numel / cpu_rate`` a block, but while the GPU side is busy
its copies compete with the CPU for host memory bandwidth and the CPU runs ``contention`` times slower;
after the GPU side is done it runs at full speed. Both sides start together; the step takes the longer
of the two (the makespan), which :meth:`Interleaver.plan` minimises.

The profile's rates are only a prior: :meth:`Interleaver.observe` folds measured block times into the
rates of either side, so the plan follows what this machine actually does under load.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, replace

from tiertune.memory.profile import MachineProfile

# A GPU update of state homed in host memory copies in the fp32 gradient, fp32 master weights and the two
# fp32 moments (4 + 4 + 4 + 4 bytes a parameter), and copies back the master weights and moments (4 + 8);
# the gradient is consumed on the device.
IN_BYTES_PER_PARAM = 16
OUT_BYTES_PER_PARAM = 12
# The CPU update reads the same 16 bytes a parameter and writes the same 12, all in host memory.
CPU_BYTES_PER_PARAM = IN_BYTES_PER_PARAM + OUT_BYTES_PER_PARAM
# Blocks in flight on the device: one being copied in while another is updated or copied out.
DEVICE_SLOTS = 2
# The profile does not measure a GPU AdamW kernel. It is memory bound and rarely the slowest stage: the
# copies (16 bytes a parameter at 25-55 GB/s, 1.5-3.5e9 params/s) are, so a modest figure does no harm.
GPU_ADAMW_PARAMS_PER_S = 1e10
# Weight of a new measurement in the moving averages of the rates: after 10 observations the prior counts
# 0.8**10 ~ 11%, and one noisy block moves the estimate by a fifth of its error.
EMA_WEIGHT = 0.2


class Side(enum.Enum):
    CPU = "cpu"
    GPU = "gpu"


@dataclass(frozen=True)
class UpdateProfile:
    cpu_rate: float  # params/s of the CPU AdamW kernel
    gpu_rate: float = 0.0  # params/s of the GPU AdamW kernel; 0: no accelerator
    h2d: float = 0.0  # bytes/s host -> device, pinned; 0: none
    d2h: float = 0.0  # bytes/s device -> host, pinned; 0: none
    contention: float = 1.0  # >= 1: how much slower the CPU updates while copies share host memory
    launch_s: float = 50e-6  # fixed GPU cost per block: kernel launches, stream events

    def __post_init__(self) -> None:
        if (
            self.cpu_rate <= 0
            or min(self.gpu_rate, self.h2d, self.d2h, self.launch_s) < 0
            or self.contention < 1
        ):
            raise ValueError(f"{self}: cpu_rate must be positive, the others not negative, contention >= 1")

    @classmethod
    def from_machine(cls, machine: MachineProfile) -> UpdateProfile:
        """The CPU rate and the pinned copy bandwidths as ``tiertune probe`` measured them; the GPU kernel
        rate from :data:`GPU_ADAMW_PARAMS_PER_S` (a machine without CUDA figures gets no GPU side).

        Contention is estimated from the DRAM bandwidth: the CPU update and the copies (28 bytes a
        parameter through each side) share it in proportion, so when together they ask more than DRAM
        delivers the CPU slows by the excess. A CPU update asking more than the measured copy bandwidth on
        its own is taken at its word: that is its uncontended rate."""
        h2d = machine.cuda.get("h2d_pinned", 0.0) * 1e9
        d2h = machine.cuda.get("d2h_pinned", 0.0) * 1e9
        if not (h2d > 0 and d2h > 0):
            return cls(cpu_rate=machine.cpu_adamw_params_per_s)
        free = cls(machine.cpu_adamw_params_per_s, GPU_ADAMW_PARAMS_PER_S, h2d, d2h)
        cpu_demand = free.cpu_rate * CPU_BYTES_PER_PARAM
        demand = cpu_demand + free.gpu_throughput() * CPU_BYTES_PER_PARAM
        contention = max(1.0, demand / max(machine.dram_copy_gbps * 1e9, cpu_demand))
        return replace(free, contention=contention)

    def stages(self) -> tuple[float, float, float]:
        """Seconds per parameter of the GPU pipeline's stages: copy in, kernel, copy out."""
        return (IN_BYTES_PER_PARAM / self.h2d, 1 / self.gpu_rate, OUT_BYTES_PER_PARAM / self.d2h)

    def gpu_throughput(self) -> float:
        """Params/s the GPU side sustains once its pipeline is full (its slowest stage); 0 without one."""
        return 1 / max(self.stages()) if min(self.gpu_rate, self.h2d, self.d2h) > 0 else 0.0


@dataclass(frozen=True)
class UpdatePlan:
    sides: tuple[Side, ...]  # one per block, in update order
    cpu_s: float  # predicted seconds of each side, contention included
    gpu_s: float

    @property
    def makespan_s(self) -> float:
        return max(self.cpu_s, self.gpu_s)


class Interleaver:
    """Plans each step's CPU/GPU split from the current rate estimates, and refines them from measurements."""

    def __init__(self, profile: UpdateProfile, ema_weight: float = EMA_WEIGHT) -> None:
        self.profile = profile
        self.ema_weight = ema_weight
        # Params/s of each side: the CPU kernel uncontended; the GPU pipeline in steady state.
        self.rates = {Side.CPU: profile.cpu_rate, Side.GPU: profile.gpu_throughput()}
        head = tail = 0.0
        if self.rates[Side.GPU] > 0:
            stages = profile.stages()
            slowest = stages.index(max(stages))
            head, tail = sum(stages[:slowest]), sum(stages[slowest + 1 :])
        self._fill = (head, tail)  # seconds per parameter of the first block before, of the last after

    def observe(self, side: Side, numel: int, seconds: float, *, contended: bool = False) -> None:
        """Fold one measured block into that side's rate. For the GPU, ``seconds`` is what the block adds to
        a full pipeline (the time between consecutive blocks leaving it); for the CPU, the update's time,
        which ``contended`` says ran alongside copies (it is then scaled back to the uncontended rate)."""
        if numel <= 0 or seconds <= 0:
            raise ValueError(f"observe() needs a positive block size and time, got {numel} and {seconds}")
        if side is Side.GPU and not self.rates[Side.GPU]:
            raise ValueError(
                "observe(Side.GPU, ...): this profile has no GPU side (gpu_rate, h2d or d2h is 0)"
            )
        if side is Side.GPU:
            seconds = max(seconds - self.profile.launch_s, seconds / 10)  # noise can undercut the launch
        elif contended:
            seconds /= self.profile.contention
        w = self.ema_weight
        self.rates[side] = (1 - w) * self.rates[side] + w * numel / seconds

    def estimate(self, side: Side, numel: int) -> float:
        """Seconds the model now expects for one block on ``side``: uncontended on the CPU, and without the
        pipeline's fill on the GPU."""
        if side is Side.CPU:
            return numel / self.rates[Side.CPU]
        return self.profile.launch_s + numel / self.rates[Side.GPU]

    def predict(self, blocks: Sequence[int], sides: Sequence[Side]) -> tuple[float, float]:
        """Predicted seconds of the CPU side and of the GPU side for this assignment."""
        return self._times(blocks, [s is Side.GPU for s in sides])

    def plan(self, blocks: Sequence[int], device_free_bytes: int) -> UpdatePlan:
        """Assign each block (element counts in update order) to a side, minimising the predicted makespan.

        Only blocks whose state fits the device twice over (:data:`DEVICE_SLOTS`) may go to the GPU. The
        start spreads the GPU's ideal share of elements through the update order, so both sides begin at
        once; then the best single move across is made while one lowers the makespan, and when none does,
        the best exchange of a GPU block for a CPU block. All-CPU is kept if the result is no better."""
        fits = device_free_bytes // (DEVICE_SLOTS * IN_BYTES_PER_PARAM)
        gpu = [False] * len(blocks)
        if self.rates[Side.GPU] > 0:
            cpu_cost = self.profile.contention / self.rates[Side.CPU]  # per parameter, alongside copies
            share = cpu_cost / (cpu_cost + 1 / self.rates[Side.GPU])
            on_gpu = seen = 0
            for i, n in enumerate(blocks):
                seen += n
                if n <= fits and on_gpu + n / 2 <= share * seen:  # keeps the running share nearest the ideal
                    gpu[i], on_gpu = True, on_gpu + n
            gpu = self._descend(blocks, gpu, [i for i, n in enumerate(blocks) if n <= fits])
            if max(self._times(blocks, gpu)) >= max(self._times(blocks, [False] * len(blocks))):
                gpu = [False] * len(blocks)
        cpu_s, gpu_s = self._times(blocks, gpu)
        return UpdatePlan(tuple(Side.GPU if g else Side.CPU for g in gpu), cpu_s, gpu_s)

    def _descend(self, blocks: Sequence[int], gpu: list[bool], movable: list[int]) -> list[bool]:
        """Steepest descent: the best single move across while one helps, else the best exchange."""
        total = sum(blocks)
        while True:
            on = [i for i in movable if gpu[i]]
            off = [i for i in movable if not gpu[i]]
            on_elems = sum(blocks[i] for i in on)

            def span(
                drop: int | None, add: int | None, on: list[int] = on, on_elems: int = on_elems
            ) -> float:
                # Only the GPU side's element count, block count and end blocks change the prediction; the
                # first and last left after one drop are among the two first and two last.
                ends = [i for i in on[:2] + on[-2:] if i != drop] + ([] if add is None else [add])
                elems = on_elems - (0 if drop is None else blocks[drop]) + (0 if add is None else blocks[add])
                count = len(on) - (drop is not None) + (add is not None)
                ends_n = (blocks[min(ends)], blocks[max(ends)]) if ends else (0, 0)
                return max(self._span(total - elems, elems, count, *ends_n))

            best, change = span(None, None) * (1 - 1e-12), None
            for drop, add in [(i, None) for i in on] + [(None, j) for j in off]:
                if (t := span(drop, add)) < best:
                    best, change = t, (drop, add)
            if change is None:
                for drop, add in itertools.product(on, off):
                    if (t := span(drop, add)) < best:
                        best, change = t, (drop, add)
            if change is None:
                return gpu
            for i in change:
                if i is not None:
                    gpu[i] = not gpu[i]

    def _times(self, blocks: Sequence[int], gpu: Sequence[bool]) -> tuple[float, float]:
        on = [n for n, g in zip(blocks, gpu) if g]
        ends = (on[0], on[-1]) if on else (0, 0)
        return self._span(sum(blocks) - sum(on), sum(on), len(on), *ends)

    def _span(self, cpu_elems: int, gpu_elems: int, count: int, first: int, last: int) -> tuple[float, float]:
        """Predicted seconds of each side from what they hold: the GPU side's blocks number ``count`` and
        its first and last hold ``first`` and ``last`` elements (they fill and drain its pipeline)."""
        cpu_work = cpu_elems / self.rates[Side.CPU]
        if not count:
            return cpu_work, 0.0
        head, tail = self._fill
        gpu_s = head * first + tail * last + count * self.profile.launch_s + gpu_elems / self.rates[Side.GPU]
        k = self.profile.contention  # the CPU runs k times slower until the GPU side is done
        cpu_s = cpu_work * k if cpu_work * k <= gpu_s else gpu_s + cpu_work - gpu_s / k
        return cpu_s, gpu_s
