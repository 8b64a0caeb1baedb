"""NUMA discovery and the CXL-aware policy on a fake sysfs topology; binding on this machine's node 0."""

from pathlib import Path

import pytest

from tiertune.errors import ConfigError
from tiertune.memory.numa import PAGE, discover, numa_empty, page_nodes, parse_cpulist, select_cxl_nodes
from tiertune.memory.placement import Request, place_host_bytes
from tiertune.memory.tiers import Kind, Tier

GIB = 2**30


def fake_sysfs(root, nodes):
    """nodes: {id: (cpulist, total GiB, free GiB)} -> a /sys/devices/system/node lookalike."""
    for node_id, (cpus, total, free) in nodes.items():
        d = root / f"node{node_id}"
        d.mkdir(parents=True)
        (d / "cpulist").write_text(cpus + "\n")
        (d / "meminfo").write_text(
            f"Node {node_id} MemTotal:       {total * 2**20} kB\n"
            f"Node {node_id} MemFree:        {free * 2**20} kB\n"
            f"Node {node_id} MemUsed:        0 kB\n"
        )
    (root / "possible").write_text("0-9\n")  # a file that must not be mistaken for a node
    return root


@pytest.fixture
def two_sockets_two_cxl(tmp_path):
    return discover(
        fake_sysfs(
            tmp_path,
            {0: ("0-7", 64, 60), 1: ("8-15", 64, 60), 2: ("", 128, 128), 3: ("", 128, 128), 10: ("", 0, 0)},
        )
    )


def test_parse_cpulist():
    assert parse_cpulist("0-3,8,10-11\n") == (0, 1, 2, 3, 8, 10, 11)
    assert parse_cpulist("\n") == ()


def test_discovery_finds_cpuless_memory_nodes(two_sockets_two_cxl):
    nodes = two_sockets_two_cxl
    assert [n.id for n in nodes] == [0, 1, 2, 3, 10]
    assert (
        nodes[0].cpus == tuple(range(8))
        and nodes[0].total_bytes == 64 * GIB
        and nodes[0].free_bytes == 60 * GIB
    )
    assert [n.id for n in select_cxl_nodes(nodes)] == [2, 3]  # node 10 has no memory
    assert [n.id for n in select_cxl_nodes(nodes, [3])] == [3]
    with pytest.raises(ConfigError, match=r"memory.cxl_nodes: node\(s\) \[7\] do not exist"):
        select_cxl_nodes(nodes, [7])


def test_optimizer_state_goes_to_dram_and_weights_stripe_over_cxl(two_sockets_two_cxl):
    nodes = two_sockets_two_cxl
    dram, cxl = [n for n in nodes if n.cpus], select_cxl_nodes(nodes)
    placed = place_host_bytes(
        [
            Request("moments", Kind.OPTIMIZER, 40 * GIB),
            Request("grads32", Kind.GRADS, 10 * GIB),
            Request("weights16", Kind.PARAMS, 20 * GIB),
            Request("staging", Kind.STAGING, GIB),
        ],
        dram,
        cxl,
        dram_budget=100 * GIB,
        cxl_budget=200 * GIB,
    )
    node_tier = {0: Tier.HOST, 1: Tier.HOST, 2: Tier.CXL, 3: Tier.CXL}
    assert placed.tier_of("moments", node_tier) == {Tier.HOST}
    assert placed.tier_of("grads32", node_tier) == {Tier.HOST}
    assert placed.stripes["weights16"] == [(2, 10 * GIB), (3, 10 * GIB)]  # striped evenly
    assert placed.stripes["staging"] == [(2, GIB // 2), (3, GIB // 2)]
    assert placed.tier_bytes == {Tier.HOST: 50 * GIB, Tier.CXL: 21 * GIB}
    for name, size in [("moments", 40), ("grads32", 10), ("weights16", 20)]:
        assert sum(b for _, b in placed.stripes[name]) == size * GIB


def test_each_kind_overflows_into_the_other_tier_only_when_its_own_is_full(two_sockets_two_cxl):
    nodes = two_sockets_two_cxl
    dram, cxl = [n for n in nodes if n.cpus], select_cxl_nodes(nodes)
    placed = place_host_bytes(
        [Request("moments", Kind.OPTIMIZER, 30 * GIB), Request("weights16", Kind.PARAMS, 30 * GIB)],
        dram,
        cxl,
        dram_budget=40 * GIB,
        cxl_budget=20 * GIB,
    )
    assert placed.stripes["moments"] == [(0, 30 * GIB)]  # all on DRAM
    assert placed.stripes["weights16"] == [(2, 10 * GIB), (3, 10 * GIB), (1, 10 * GIB)]  # CXL full, then DRAM
    with pytest.raises(ConfigError, match="host memory is short by 5.00 GiB"):
        place_host_bytes([Request("moments", Kind.OPTIMIZER, 65 * GIB)], dram, cxl, 40 * GIB, 20 * GIB)


def test_without_cxl_everything_lives_on_dram(two_sockets_two_cxl):
    dram = [n for n in two_sockets_two_cxl if n.cpus]
    placed = place_host_bytes([Request("weights16", Kind.PARAMS, 5 * GIB)], dram, [], 100 * GIB, 0)
    assert placed.tier_bytes == {Tier.HOST: 5 * GIB}


def test_a_node_never_gets_more_than_its_free_memory(tmp_path):
    nodes = discover(fake_sysfs(tmp_path, {0: ("0-1", 8, 2), 1: ("", 16, 1), 2: ("", 16, 16)}))
    placed = place_host_bytes(
        [Request("weights16", Kind.PARAMS, 4 * GIB)], nodes[:1], nodes[1:], 8 * GIB, 32 * GIB
    )
    assert placed.stripes["weights16"] == [(1, GIB), (2, 3 * GIB)]  # node 1 is full after 1 GiB


def _policy_of(buf):
    """The kernel's NUMA policy for the mapping holding ``buf``. The kernel merges neighbouring mappings
    with the same policy, so find the one containing the address in /proc/self/maps, then its line in
    /proc/self/numa_maps (which lists mappings by start address)."""
    addr = buf.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
        if lo <= addr < hi:
            break
    else:
        raise AssertionError("the buffer is in no mapping")
    (policy,) = [
        line.split()[1]
        for line in Path("/proc/self/numa_maps").read_text().splitlines()
        if int(line.split()[0], 16) == lo
    ]
    return policy


def test_binding_to_node_0_lands_every_page_there():
    buf = numa_empty(16 * PAGE + 100, nodes=[0])
    assert buf.data_ptr() % 4096 == 0 and buf.numel() == 16 * PAGE + 100
    assert set(page_nodes(buf)) == {0}
    # On a one-node machine every page lands on node 0 anyway: the policy shows the binding itself.
    assert _policy_of(buf) == "bind:0"
    assert _policy_of(numa_empty(PAGE)) == "default"
    with pytest.raises(OSError, match="mbind to nodes"):
        numa_empty(PAGE, nodes=[max(n.id for n in discover()) + 1])  # a node this machine lacks


def test_budgets_are_whole_pages_and_the_shortfall_names_what_is_usable(two_sockets_two_cxl):
    nodes = two_sockets_two_cxl
    dram, cxl = [n for n in nodes if n.cpus], select_cxl_nodes(nodes)
    placed = place_host_bytes(
        [Request("moments", Kind.OPTIMIZER, 2 * GIB)],
        dram,
        cxl,
        dram_budget=int(0.3 * GIB),
        cxl_budget=10 * GIB,
    )
    assert all(nbytes % PAGE == 0 for _, nbytes in placed.stripes["moments"])
    with pytest.raises(ConfigError, match=r"1.00 GiB of DRAM and 0.00 GiB of CXL are usable"):
        place_host_bytes([Request("moments", Kind.OPTIMIZER, 2 * GIB)], dram, [], GIB, 0)


def test_a_cxl_budget_without_cxl_nodes_is_refused():
    import torch

    from tiertune.config import MemoryConfig
    from tiertune.memory import resolve_budgets

    one_node = discover()
    if select_cxl_nodes(one_node):
        pytest.skip("this machine has CXL nodes")
    with pytest.raises(ConfigError, match="no CXL"):
        resolve_budgets(MemoryConfig(cxl_budget_gib=64.0), torch.device("cpu"), one_node)
