"""Tensor-parallel resharding: the plan, and byte-exact transfers between p prefill and d decode ranks (host transport)."""

import pytest

import kvlink
from kvlink.resharding import ReleaseTracker, heads_of_rank, plan_resharding, pull_resharded
from resharding_cases import run_resharded

TP_PAIRS = [(1, 2), (2, 1), (2, 4), (4, 2), (1, 4), (4, 1), (8, 2)]


@pytest.mark.parametrize("num_kv_heads", [8, 2, 1])
@pytest.mark.parametrize("prefill_tp,decode_tp", TP_PAIRS + [(1, 1), (2, 2), (8, 8), (1, 8), (3, 1)])
def test_plan_gives_each_decode_rank_each_of_its_heads_once(prefill_tp, decode_tp, num_kv_heads):
    if num_kv_heads % prefill_tp and prefill_tp % num_kv_heads:
        with pytest.raises(ValueError, match="prefill_tp=3"):
            plan_resharding(num_kv_heads, prefill_tp, decode_tp)
        return
    plan = plan_resharding(num_kv_heads, prefill_tp, decode_tp)
    sent_by = {rank: 0 for rank in range(prefill_tp)}
    for d in range(decode_tp):
        first, stop = heads_of_rank(num_kv_heads, decode_tp, d)
        covered = []
        for s in plan.pulls_of(d):
            p_first, p_stop = heads_of_rank(num_kv_heads, prefill_tp, s.prefill_rank)
            assert 0 <= s.src_heads[0] < s.src_heads[1] <= p_stop - p_first
            assert s.src_heads[1] - s.src_heads[0] == s.dst_heads[1] - s.dst_heads[0]
            # the same global heads on both sides
            assert p_first + s.src_heads[0] - first == s.dst_heads[0]
            covered += range(*s.dst_heads)
            sent_by[s.prefill_rank] += s.src_heads[1] - s.src_heads[0]
        assert sorted(covered) == list(range(stop - first)), f"decode rank {d} gets heads {covered}"
        assert len({s.prefill_rank for s in plan.pulls_of(d)}) == len(plan.pulls_of(d)), "one pull per prefill rank"
    # every prefill rank hears of every request; replicas share the sending
    for rank in range(prefill_tp):
        assert plan.contacts_of(rank) >= 1
    heads_needed = decode_tp * max(1, num_kv_heads // decode_tp)
    assert sum(sent_by.values()) == heads_needed, "a head was sent twice to one decode rank"
    if prefill_tp > num_kv_heads and decode_tp >= prefill_tp:
        assert min(sent_by.values()) >= 1, "a replica sends nothing while another sends twice"


def test_plan_examples_read_like_the_engines_split():
    plan = plan_resharding(8, 2, 4)
    assert [s.__dict__ for s in plan.pulls_of(1)] == [{"prefill_rank": 0, "src_heads": (2, 4), "dst_heads": (0, 2)}]
    plan = plan_resharding(8, 4, 1)
    assert [(s.prefill_rank, s.src_heads, s.dst_heads) for s in plan.pulls_of(0)] == \
        [(0, (0, 2), (0, 2)), (1, (0, 2), (2, 4)), (2, (0, 2), (4, 6)), (3, (0, 2), (6, 8))]
    plan = plan_resharding(2, 8, 2)  # 4 replicas of each head: one sends, three are released
    assert [(s.prefill_rank, s.src_heads) for s in plan.pulls_of(1)] == [(4, (0, 1))]
    assert plan.releases_of(1) == (5, 6, 7) and plan.contacts_of(5) == 1 and plan.pulls_from(5) == 0
    mla = plan_resharding(0, 4, 2, mla=True)
    assert [s.prefill_rank for d in range(2) for s in mla.pulls_of(d)] == [0, 1]
    assert mla.releases_of(0) == (2,) and mla.releases_of(1) == (3,)
    assert "decode 0: p0[0, 1]->[0, 1], release p2" in mla.describe()


@pytest.mark.parametrize("args,match", [
    ((8, 3, 1), "prefill_tp=3 does not split 8 KV heads"),
    ((4, 1, 6), "decode_tp=6 is not a multiple of 4"),
    ((0, 1, 1), "num_kv_heads must be a positive int"),
    ((8, 0, 1), "prefill_tp must be a positive int"),
])
def test_plan_refuses_uneven_splits(args, match):
    with pytest.raises(ValueError, match=match):
        plan_resharding(*args)


def test_release_tracker_reports_a_request_once_all_contacts_confirmed():
    tracker = ReleaseTracker(3)
    assert tracker.update([("a", True), ("b", True), ("a", True)]) == []
    assert tracker.update([("a", True), ("b", False)]) == [("a", True)]
    assert tracker.update([("b", True)]) == [("b", False)]
    with pytest.raises(ValueError, match="expected must be a positive int"):
        ReleaseTracker(0)


@pytest.mark.parametrize("num_kv_heads", [8, 2])
@pytest.mark.parametrize("prefill_tp,decode_tp", TP_PAIRS)
def test_resharded_transfer_is_byte_exact(prefill_tp, decode_tp, num_kv_heads, generator):
    seed = int(generator.initial_seed())
    facts = run_resharded(prefill_tp=prefill_tp, decode_tp=decode_tp, num_kv_heads=num_kv_heads, seed=seed)
    assert sum(facts["pulled_bytes"]) > 0


@pytest.mark.parametrize("prefill_tp,decode_tp", [(1, 2), (2, 1), (2, 4), (4, 1)])
def test_mla_latent_is_sent_once_per_decode_rank_and_the_other_prefill_ranks_are_released(
        prefill_tp, decode_tp, generator):
    run_resharded(prefill_tp=prefill_tp, decode_tp=decode_tp, num_kv_heads=1, mla=True, head_dim=72,
                  src_preset="vllm_mla", dst_preset="sglang_mla", seed=int(generator.initial_seed()))


@pytest.mark.parametrize("src_block_size,dst_block_size", [(16, 32), (32, 16)])
def test_resharding_with_another_block_size(src_block_size, dst_block_size, generator):
    run_resharded(prefill_tp=2, decode_tp=1, num_kv_heads=8, src_block_size=src_block_size,
                  dst_block_size=dst_block_size, seed=int(generator.initial_seed()))


def test_layerwise_resharded_pulls_wait_for_every_layer_of_a_shared_prefill_rank(generator):
    # (1, 2): both decode ranks read prefill rank 0 layer by layer; its ready layers must serve both
    run_resharded(prefill_tp=1, decode_tp=2, num_kv_heads=8, layerwise=True, seed=int(generator.initial_seed()))


def test_bad_resharded_pulls_raise_before_any_pull_starts(generator):
    from sharded_caches import make_truth, poisoned_cache, rank_cache

    truth = make_truth(3, num_layers=2, num_kv=2, num_blocks=8, block_size=16, num_heads=8, head_dim=16)
    plan = plan_resharding(8, 2, 1)
    caches = [rank_cache("vllm_flash_attn_nhd", truth, heads_of_rank(8, 2, r))[1] for r in range(2)]
    _, wrong = rank_cache("vllm_flash_attn_nhd", truth, (0, 2))
    _, dst = poisoned_cache("flashinfer_hnd", num_layers=2, num_blocks=8, block_size=16, num_heads=8,
                            head_dim=16)
    with kvlink.Endpoint(caches[0], name="p0", timeout=5) as p0, kvlink.Endpoint(wrong, name="p1", timeout=5) as p1, \
            kvlink.Endpoint(dst, name="d0", listen=None, timeout=5) as decode:
        peers = [decode.connect(p0.address), decode.connect(p1.address)]
        with pytest.raises(ValueError, match=r"prefill rank 1 \(p1\) should hold 4 of 8 KV heads but its cache has 2"):
            pull_resharded(decode, plan, 0, peers, "r", [0], [0], 10)
        with pytest.raises(ValueError, match="peers must name 2 prefill ranks"):
            pull_resharded(decode, plan, 0, peers[:1], "r", [0], [0], 10)
        with pytest.raises(ValueError, match="decode_rank must be in"):
            pull_resharded(decode, plan, 1, peers, "r", [0], [0], 10)
        with pytest.raises(ValueError, match="decode rank 0 of 2 holds 4 of 8 KV heads"):
            pull_resharded(decode, plan_resharding(8, 2, 2), 0, peers, "r", [0], [0], 10)
        assert p0.finished_sends() == [] and p1.finished_sends() == []


def test_release_needs_a_link_and_a_request_id(generator):
    _, layout = kvlink.presets.allocate("flashinfer_hnd", num_layers=1, num_blocks=2, block_size=4, num_heads=1,
                                        head_dim=8)
    with kvlink.Endpoint(layout, name="lonely", listen=None, timeout=5) as endpoint:
        with pytest.raises(ValueError, match="no link to peer 'nobody'"):
            endpoint.release("nobody", "r")
        with pytest.raises(ValueError, match="no link to peer 'nobody'"):
            endpoint.remote_layout("nobody")



MHA_PRESETS = [p for p in kvlink.presets.PRESETS if p not in kvlink.presets.MLA_PRESETS]
LAYOUT_PAIRS = [(src, dst) for src in MHA_PRESETS for dst in MHA_PRESETS] + \
    [(src, dst) for src in kvlink.presets.MLA_PRESETS for dst in kvlink.presets.MLA_PRESETS]


@pytest.mark.parametrize("src_preset,dst_preset", LAYOUT_PAIRS)
def test_every_pair_of_engine_layouts_over_the_wire(src_preset, dst_preset, generator):
    # the destination's block size cycles through 8, 16, 32 tokens (the source's is 16)
    dst_block_size = (8, 16, 32)[LAYOUT_PAIRS.index((src_preset, dst_preset)) % 3]
    mla = src_preset in kvlink.presets.MLA_PRESETS
    run_resharded(prefill_tp=1, decode_tp=1, num_kv_heads=1 if mla else 4, mla=mla, head_dim=72 if mla else 16,
                  src_preset=src_preset, dst_preset=dst_preset, dst_block_size=dst_block_size, requests=2,
                  seed=int(generator.initial_seed()))


@pytest.mark.parametrize("prefill_tp,decode_tp", [(2, 1), (1, 2)])
def test_fp8_on_the_wire_with_resharding_lands_the_reference_conversion(prefill_tp, decode_tp, generator):
    run_resharded(prefill_tp=prefill_tp, decode_tp=decode_tp, num_kv_heads=8, wire_dtype="fp8",
                  seed=int(generator.initial_seed()))
