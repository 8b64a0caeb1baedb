"""The placement planner as a pure function: synthetic blocks and budgets, exact expectations."""

import pytest

from tiertune.memory import Budgets, Kind, Tier
from tiertune.memory.profile import MachineProfile
from tiertune.offload.planner import (
    OPTIMIZER_SLOTS,
    BlockShape,
    PlanError,
    activation_bytes_estimate,
    block_bytes,
    plan_placement,
)

MIB = 2**20
AUTO = {Kind.PARAMS: None, Kind.GRADS: None, Kind.OPTIMIZER: None}
# 1 embed, 8 layers, 1 head; full tuning; 100M parameters in all.
BLOCKS = [BlockShape("embed", "embed", 10_000_000, 10_000_000)]
BLOCKS += [BlockShape(f"layers.{i}", "layer", 10_000_000, 10_000_000) for i in range(8)]
BLOCKS += [BlockShape("head", "head", 10_000_000, 10_000_000)]
ACT = 50 * MIB


def gpu(device_mib, host_mib, cxl_mib=0):
    return Budgets(
        device_mib * MIB, host_mib * MIB, cxl_mib * MIB, (2,) if cxl_mib else (), device_is_host=False
    )


def plan(budgets, nvme_mib=100_000, forced=None, depth=None, blocks=BLOCKS, compute_bytes=2, profile=None):
    return plan_placement(
        blocks,
        budgets,
        nvme_mib * MIB,
        compute_bytes=compute_bytes,
        activation_bytes=ACT,
        tokens_per_step=4096,
        forced={**AUTO, **(forced or {})},
        prefetch_depth=depth,
        profile=profile,
    )


def homes(p, kind):
    return [b.home[kind] for b in p.blocks]


def test_bytes_per_kind():
    k = 1024
    b = block_bytes(BlockShape("x", "layer", 100 * k, 40 * k), compute_bytes=2)
    assert b == {
        Kind.PARAMS: 200 * k,
        Kind.GRADS: 160 * k,
        Kind.OPTIMIZER: 40 * k * 12,
    }  # bf16: fp32 master too
    assert (
        block_bytes(BlockShape("x", "layer", 100 * k, 40 * k), compute_bytes=4)[Kind.OPTIMIZER] == 40 * k * 8
    )
    assert block_bytes(BlockShape("x", "layer", 100, 0), compute_bytes=2) == {
        Kind.PARAMS: 4096,
        Kind.GRADS: 0,
        Kind.OPTIMIZER: 0,
    }  # 4 KiB units


def test_a_job_that_fits_stays_resident_and_streams_nothing():
    p = plan(gpu(10_000, 0))
    assert p.homes(Kind.PARAMS) == p.homes(Kind.GRADS) == p.homes(Kind.OPTIMIZER) == {Tier.DEVICE}
    assert p.prefetch_depth == 0 and p.buffers == {}
    per_block = sum(block_bytes(BLOCKS[0], 2).values())
    assert p.peak_bytes == {Tier.DEVICE: 10 * per_block + ACT}
    assert p.step_time_s["weights_io"] == p.step_time_s["optimizer"] == 0


def test_full_tuning_on_a_small_gpu_keeps_weights_on_it_and_optimizer_state_on_the_host():
    p = plan(gpu(600, 4000))
    assert p.homes(Kind.PARAMS) == {Tier.DEVICE}
    assert p.homes(Kind.OPTIMIZER) == {Tier.HOST}
    assert p.prefetch_depth == 0  # no weight streams
    assert set(p.buffers) == {"grads"}  # gradients leave the device
    assert all(p.peak_bytes[t] <= p.budgets[t] for t in p.peak_bytes)


def test_weights_stream_from_the_host_then_nvme_with_a_deeper_prefetch():
    from_host = plan(gpu(300, 4000))
    assert Tier.HOST in from_host.homes(Kind.PARAMS) and from_host.prefetch_depth == 1
    from_nvme = plan(gpu(250, 1000))
    assert Tier.NVME in from_nvme.homes(Kind.PARAMS) and from_nvme.prefetch_depth == 2
    assert from_nvme.window == (block_bytes(BLOCKS[0], 2)[Kind.PARAMS], 4)  # depth 2, computing, just done
    assert from_nvme.step_time_s["weights_io"] > from_host.step_time_s["weights_io"] > 0
    for p in (from_host, from_nvme):
        assert all(p.peak_bytes[t] <= p.budgets[t] for t in p.peak_bytes)


def test_cxl_takes_weights_before_optimizer_state_and_host_the_reverse():
    p = plan(gpu(250, 1200, cxl_mib=1000))

    def on(tier, kind):
        return sum(b.bytes[kind] for b in p.blocks if b.home[kind] is tier)

    assert on(Tier.HOST, Kind.OPTIMIZER) > on(Tier.HOST, Kind.PARAMS)  # the CPU update's state first
    assert on(Tier.CXL, Kind.PARAMS) > 0 and on(Tier.NVME, Kind.PARAMS) == 0  # weights to CXL before NVMe
    assert on(Tier.NVME, Kind.OPTIMIZER) > 0  # what CXL cannot take after the weights and grads


def test_forced_tiers_are_obeyed_and_nvme_optimizer_state_streams_in_chunks():
    p = plan(gpu(10_000, 1000), forced={Kind.OPTIMIZER: Tier.NVME})
    assert p.homes(Kind.OPTIMIZER) == {Tier.NVME} and p.homes(Kind.PARAMS) == {Tier.DEVICE}
    assert p.buffers["optimizer"] == (
        block_bytes(BLOCKS[0], 2)[Kind.OPTIMIZER],
        OPTIMIZER_SLOTS,
    )  # one block's state per slot
    assert p.step_time_s["optimizer"] > 0


LORA = [BlockShape(b.name, b.kind, b.numel, b.numel // 100) for b in BLOCKS]


def test_adapters_keep_their_whole_update_on_the_device_when_nothing_streams():
    p = plan(gpu(1_000, 200), blocks=LORA)
    assert p.homes(Kind.PARAMS) == p.homes(Kind.GRADS) == p.homes(Kind.OPTIMIZER) == {Tier.DEVICE}


def test_on_an_accelerator_streamed_blocks_are_updated_from_host_memory():
    """Once weights stream, the block engine updates on the CPU: gradients and moments go to the host,
    though they would fit on the device (the engine refuses them there)."""
    p = plan(gpu(175, 200), blocks=LORA)  # the window (4 x 20 MB) and activations (50) leave room
    assert Tier.NVME in p.homes(Kind.PARAMS)
    assert p.homes(Kind.GRADS) == p.homes(Kind.OPTIMIZER) == {Tier.HOST}
    full = plan(gpu(250, 1000))
    assert Tier.DEVICE not in p.homes(Kind.GRADS) | full.homes(Kind.GRADS) | full.homes(Kind.OPTIMIZER)
    with pytest.raises(PlanError, match="updated by the CPU"):
        plan(gpu(175, 200), blocks=LORA, forced={Kind.OPTIMIZER: Tier.DEVICE})


def test_explicit_prefetch_depth_is_used_when_weights_stream():
    assert plan(gpu(300, 4000), depth=3).prefetch_depth == 3
    assert plan(gpu(10_000, 0), depth=3).prefetch_depth == 0  # nothing streams: no window


def test_without_an_accelerator_the_device_tier_is_the_host():
    cpu = Budgets(1500 * MIB, 1500 * MIB, 0, (), device_is_host=True)
    p = plan(cpu)
    assert Tier.HOST not in p.peak_bytes
    assert Tier.NVME in p.homes(Kind.OPTIMIZER) and p.homes(Kind.PARAMS) == {Tier.DEVICE}


@pytest.mark.parametrize(
    "budgets, forced, nvme, fragment",
    [
        (gpu(100, 10_000), {}, 100_000, "memory.device_budget_gib is short by"),
        (
            gpu(10_000, 200),
            {Kind.OPTIMIZER: Tier.HOST},
            100_000,
            "offload.optimizer=host: 1.1 GiB of optimizer do not fit",
        ),
        (
            gpu(300, 700),
            {},
            300,
            "fit no tier: every budget is full (device 300.0 MiB, host 700.0 MiB, nvme 300.0 MiB)",
        ),
    ],
)
def test_when_nothing_fits_the_error_names_the_short_budget(budgets, forced, nvme, fragment):
    with pytest.raises(PlanError) as info:
        plan(budgets, nvme_mib=nvme, forced=forced)
    assert any(fragment in p for p in info.value.problems), info.value.problems


def test_a_measured_profile_changes_the_prediction_not_the_placement():
    slow = MachineProfile(
        cpus=2,
        host_total_bytes=0,
        dram_copy_gbps=10,
        cpu_adamw_params_per_s=1e8,
        device_tflops=0.1,
        cuda={"h2d_pinned": 1.0, "d2h_pinned": 1.0},
    )
    fast = MachineProfile(
        cpus=2,
        host_total_bytes=0,
        dram_copy_gbps=10,
        cpu_adamw_params_per_s=1e9,
        device_tflops=100,
        cuda={"h2d_pinned": 50.0, "d2h_pinned": 50.0},
    )
    a, b = plan(gpu(300, 4000), profile=slow), plan(gpu(300, 4000), profile=fast)
    assert [x.home for x in a.blocks] == [x.home for x in b.blocks]
    assert a.step_time_s["total"] > 10 * b.step_time_s["total"]
    assert a.profile_source == "from the machine profile"


def test_activation_estimate_scales_with_tokens_and_width():
    one = activation_bytes_estimate(hidden=256, layers=4, ffn=688, vocab=260, tokens=1024, compute_bytes=4)
    assert one == 4 * 1024 * (9 * 256 + 4 * 688) * 4 + 2 * 1024 * 260 * 4
    assert activation_bytes_estimate(256, 4, 688, 260, 2048, 4) == 2 * one


def test_weights_pinned_to_the_device_reserve_no_streaming_window():
    p = plan(gpu(300, 4000), forced={Kind.PARAMS: Tier.DEVICE})
    assert p.homes(Kind.PARAMS) == {Tier.DEVICE} and p.prefetch_depth == 0 and p.window == (0, 0)


def test_a_host_too_small_for_the_staging_buffers_is_named():
    with pytest.raises(PlanError, match="memory.host_budget_gib is short by .* for the staging buffers"):
        plan(gpu(250, 10))


@pytest.mark.parametrize("device", [200, 300, 600, 1200, 2500])
@pytest.mark.parametrize("host", [0, 400, 900, 1600])
@pytest.mark.parametrize("cxl", [0, 500])
@pytest.mark.parametrize("nvme", [0, 800, 5000])
def test_a_plan_either_fits_every_budget_or_says_what_is_short(device, host, cxl, nvme):
    try:
        p = plan(gpu(device, host, cxl), nvme_mib=nvme)
    except PlanError as e:
        assert e.problems and all("short" in m or "fit" in m for m in e.problems)
        return
    assert all(p.peak_bytes[t] <= p.budgets[t] for t in p.peak_bytes)
    assert all(len(b.home) == 3 for b in p.blocks)


def test_a_trained_tied_weight_reserves_the_gradient_backward_keeps_for_it():
    """The tied embedding and LM head of llama-1b: the head's gradient goes into the empty gradient home at
    once (fp32, one rank, no accumulation: nothing to reserve), else it is kept until the embedding's
    arrives: one weight-sized tensor beyond the homes, reserved with the activations."""
    import torch

    from tiertune.config import ModelConfig
    from tiertune.launch.models import cast_parameters, skeleton
    from tiertune.launch.plan import tied_gradient_bytes
    from tiertune.offload import find_blocks

    tied = skeleton(ModelConfig(preset="llama-1b"))  # on the meta device: no memory
    weight = 128256 * 2048
    assert tied_gradient_bytes(tied, find_blocks(tied), accumulating=False) == 0
    assert tied_gradient_bytes(tied, find_blocks(tied), accumulating=True) == 4 * weight
    assert tied_gradient_bytes(tied, find_blocks(tied), accumulating=False, shards=2) == 4 * weight
    bf16 = cast_parameters(skeleton(ModelConfig(preset="llama-1b")), torch.bfloat16)
    assert tied_gradient_bytes(bf16, find_blocks(bf16), accumulating=False) == 2 * weight
    tied.get_parameter("lm_head.weight").requires_grad_(False)  # frozen (LoRA): no gradient to hold
    assert tied_gradient_bytes(tied, find_blocks(tied), accumulating=True) == 0
    untied = skeleton(ModelConfig(preset="llama-1.1b"))
    assert tied_gradient_bytes(untied, find_blocks(untied), accumulating=True) == 0
