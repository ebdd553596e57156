"""The connector's scheduler side on its own: the block arithmetic vLLM's scheduler relies
on (how many tokens a decode request loads, which blocks it pulls into, which blocks a
finished prefill hands over) and the queues it drains into each step's metadata. Fake
requests and block lists stand in for vLLM's: the scheduler side reads nothing else."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pytest
from vllm.v1.request import RequestStatus

from kv_transport.connector import (
    ConnectorConfig,
    InvalidTransferParams,
    TandemConnectorScheduler,
    TransferDescription,
)
from kv_transport.contract import KV_PROFILE_PARAM, PARAMS_KEY, PREFILL_KV_PARAMS, SLO_CLASS_PARAM

BLOCK_SIZE = 16
ADDRESS = {"transport": "tcp", "host": "10.0.0.7", "port": 45123}


@dataclass
class FakeRequest:
    request_id: str
    kv_transfer_params: dict[str, Any] | None
    num_prompt_tokens: int
    prompt_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            self.prompt_token_ids = list(range(self.num_prompt_tokens))


@dataclass
class FakeBlocks:
    """vLLM's KVCacheBlocks as the scheduler side sees it: block ids per KV cache group."""

    ids: list[int]

    def get_block_ids(self) -> tuple[list[int], ...]:
        return (self.ids,)


def _scheduler(**config: Any) -> TandemConnectorScheduler:
    return TandemConnectorScheduler(BLOCK_SIZE, ConnectorConfig(**config), dict(ADDRESS))


def _transfer(num_tokens: int, transfer_id: str = "ab" * 16) -> TransferDescription:
    return TransferDescription(transfer_id, dict(ADDRESS), num_tokens, -(-num_tokens // BLOCK_SIZE), BLOCK_SIZE)


def _decode_request(
    prompt_tokens: int, transfer_tokens: int, request_id: str = "decode-1", transfer_id: str = "ab" * 16
) -> FakeRequest:
    params = {"do_remote_prefill": True, "do_remote_decode": False,
              PARAMS_KEY: _transfer(transfer_tokens, transfer_id).to_params()}
    return FakeRequest(request_id, params, prompt_tokens)


def _prefill_request(prompt_tokens: int, status: RequestStatus, **params: Any) -> FakeRequest:
    return FakeRequest("prefill-1", {**PREFILL_KV_PARAMS, **params}, prompt_tokens, status=status)


# ---- get_num_new_matched_tokens ---------------------------------------------------------


@pytest.mark.parametrize("params", [None, {}, {"do_remote_prefill": False, PARAMS_KEY: _transfer(40).to_params()},
                                    {"do_remote_prefill": True}, dict(PREFILL_KV_PARAMS),
                                    # What a client's vllm_xargs could put there.
                                    "do_remote_prefill", ["do_remote_decode"], 1])
def test_a_request_without_a_transfer_loads_nothing(params):
    scheduler = _scheduler()
    request = FakeRequest("r", params, 40)
    assert scheduler.get_num_new_matched_tokens(request, 0) == (0, False)
    scheduler.update_state_after_alloc(request, FakeBlocks([1, 2, 3]), 0)
    assert scheduler.request_finished(request, [1, 2, 3]) == (False, None)
    meta = scheduler.build_connector_meta()
    assert not meta.sends and not meta.recvs and not meta.releases


def test_a_full_transfer_is_an_asynchronous_hit_of_the_whole_prompt():
    assert _scheduler().get_num_new_matched_tokens(_decode_request(40, 40), 0) == (40, True)


def test_a_local_prefix_hit_leaves_only_the_rest_to_load():
    scheduler = _scheduler()
    assert scheduler.get_num_new_matched_tokens(_decode_request(40, 40), 16) == (24, True)
    assert scheduler.get_num_new_matched_tokens(_decode_request(40, 40), 32) == (8, True)
    # The local cache holds all of it: nothing to load.
    assert scheduler.get_num_new_matched_tokens(_decode_request(32, 32), 32) == (0, False)


def test_a_transfer_claiming_more_tokens_than_the_prompt_loads_the_prompt_only():
    scheduler = _scheduler()
    assert scheduler.get_num_new_matched_tokens(_decode_request(40, 4000), 0) == (40, True)
    assert scheduler.get_num_new_matched_tokens(_decode_request(40, 4000), 16) == (24, True)
    # And one claiming fewer loads what it has.
    assert scheduler.get_num_new_matched_tokens(_decode_request(40, 20), 0) == (20, True)


# ---- update_state_after_alloc -----------------------------------------------------------


def test_the_pull_fills_the_prompts_blocks():
    scheduler = _scheduler()
    request = _decode_request(40, 40)  # 3 blocks, the last one partial
    scheduler.update_state_after_alloc(request, FakeBlocks([7, 8, 9, 10]), 40)
    recv = scheduler.build_connector_meta().recvs["decode-1"]
    # Blocks past the prompt's (room for generated tokens) are not pulled into.
    assert recv.block_ids == [7, 8, 9] and recv.first_block == 0
    assert recv.transfer == _transfer(40)
    assert request.kv_transfer_params["do_remote_prefill"] is False


@pytest.mark.parametrize("hit_blocks", [1, 2])
def test_after_a_local_prefix_hit_only_the_blocks_after_it_are_pulled(hit_blocks):
    scheduler = _scheduler()
    request = _decode_request(40, 40)
    external = 40 - hit_blocks * BLOCK_SIZE
    assert scheduler.get_num_new_matched_tokens(request, hit_blocks * BLOCK_SIZE) == (external, True)
    scheduler.update_state_after_alloc(request, FakeBlocks([7, 8, 9, 10]), external)
    recv = scheduler.build_connector_meta().recvs["decode-1"]
    assert recv.first_block == hit_blocks  # the remote index of the first block pulled
    assert recv.block_ids == [7, 8, 9][hit_blocks:]


def test_a_transfer_longer_than_the_prompt_fills_the_prompts_blocks_only():
    scheduler = _scheduler()
    request = _decode_request(40, 4000)
    scheduler.update_state_after_alloc(request, FakeBlocks([7, 8, 9, 10]), 40)
    recv = scheduler.build_connector_meta().recvs["decode-1"]
    assert recv.block_ids == [7, 8, 9] and recv.first_block == 0


def test_nothing_to_load_releases_the_transfer_at_once():
    scheduler = _scheduler()
    request = _decode_request(40, 40)
    scheduler.update_state_after_alloc(request, FakeBlocks([7, 8, 9]), 0)
    meta = scheduler.build_connector_meta()
    assert meta.releases == [_transfer(40)] and not meta.recvs
    assert request.kv_transfer_params["do_remote_prefill"] is False


def test_a_transfer_is_pulled_once():
    scheduler = _scheduler()
    request = _decode_request(40, 40)
    scheduler.update_state_after_alloc(request, FakeBlocks([7, 8, 9]), 40)
    assert list(scheduler.build_connector_meta().recvs) == ["decode-1"]
    # Scheduled again (e.g. preempted and resumed): the transfer is consumed.
    assert scheduler.get_num_new_matched_tokens(request, 0) == (0, False)
    scheduler.update_state_after_alloc(request, FakeBlocks([7, 8, 9]), 0)
    assert scheduler.request_finished(request, [7, 8, 9]) == (False, None)
    meta = scheduler.build_connector_meta()
    assert not meta.recvs and not meta.releases and not meta.sends


# ---- request_finished -------------------------------------------------------------------


@pytest.mark.parametrize("status", [RequestStatus.FINISHED_LENGTH_CAPPED, RequestStatus.FINISHED_STOPPED])
def test_a_finished_prefill_hands_over_its_prompts_blocks(status):
    scheduler = _scheduler(default_slo_class="standard")
    request = _prefill_request(40, status)
    # 3 prompt blocks, and one the generated token went into.
    delay_free, params = scheduler.request_finished(request, [3, 4, 5, 6])
    assert delay_free is True
    transfer = params[PARAMS_KEY]
    assert params == {"do_remote_prefill": True, "do_remote_decode": False, PARAMS_KEY: transfer}
    # The description's keys, in the order clients have always seen them, then its version.
    assert list(transfer) == ["transfer_id", "address", "num_tokens", "num_blocks", "block_size", "version"]
    assert transfer["address"] == ADDRESS
    assert (transfer["num_tokens"], transfer["num_blocks"], transfer["block_size"]) == (40, 3, BLOCK_SIZE)
    assert len(transfer["transfer_id"]) == 32 and int(transfer["transfer_id"], 16) >= 0
    send = scheduler.build_connector_meta().sends["prefill-1"]
    assert send.transfer_id == transfer["transfer_id"] and send.block_ids == [3, 4, 5]
    assert (send.num_tokens, send.slo_class, send.profile) == (40, "standard", "")


def test_the_handed_over_params_are_what_a_decode_request_pulls():
    prefill = _scheduler()
    _, params = prefill.request_finished(_prefill_request(40, RequestStatus.FINISHED_LENGTH_CAPPED), [3, 4, 5, 6])
    # Through the ingress: JSON.
    decode_request = FakeRequest("decode-1", json.loads(json.dumps(params)), 40)
    decode = _scheduler()
    assert decode.get_num_new_matched_tokens(decode_request, 0) == (40, True)
    decode.update_state_after_alloc(decode_request, FakeBlocks([0, 1, 2]), 40)
    recv = decode.build_connector_meta().recvs["decode-1"]
    assert recv.transfer.to_params() == params[PARAMS_KEY]


def test_block_ids_per_kv_cache_group_hand_over_the_first_groups():
    scheduler = _scheduler()
    request = _prefill_request(20, RequestStatus.FINISHED_STOPPED)
    delay_free, params = scheduler.request_finished(request, ([8, 9, 10],))  # type: ignore[arg-type]
    assert delay_free and params[PARAMS_KEY]["num_blocks"] == 2
    assert scheduler.build_connector_meta().sends["prefill-1"].block_ids == [8, 9]


def test_the_requests_class_and_pinned_profile_travel_with_the_send():
    scheduler = _scheduler()
    request = _prefill_request(
        20, RequestStatus.FINISHED_LENGTH_CAPPED, **{SLO_CLASS_PARAM: "relaxed", KV_PROFILE_PARAM: "int8-kivi"}
    )
    scheduler.request_finished(request, [1, 2])
    send = scheduler.build_connector_meta().sends["prefill-1"]
    assert (send.slo_class, send.profile) == ("relaxed", "int8-kivi")


@pytest.mark.parametrize(
    "status", [RequestStatus.FINISHED_ABORTED, RequestStatus.FINISHED_ERROR, RequestStatus.RUNNING]
)
def test_an_aborted_prefill_hands_nothing_over(status):
    scheduler = _scheduler()
    assert scheduler.request_finished(_prefill_request(40, status), [3, 4, 5]) == (False, None)
    assert not scheduler.build_connector_meta().sends


def test_a_prefill_without_blocks_hands_nothing_over():
    scheduler = _scheduler()
    assert scheduler.request_finished(_prefill_request(40, RequestStatus.FINISHED_STOPPED), []) == (False, None)
    assert not scheduler.build_connector_meta().sends


def test_a_decode_request_that_never_pulled_releases_its_transfer():
    scheduler = _scheduler()
    request = _decode_request(40, 40)
    request.status = RequestStatus.FINISHED_ABORTED  # e.g. the client left while it queued
    assert scheduler.request_finished(request, []) == (False, None)
    meta = scheduler.build_connector_meta()
    assert meta.releases == [_transfer(40)] and not meta.sends
    assert request.kv_transfer_params["do_remote_prefill"] is False


# ---- build_connector_meta ---------------------------------------------------------------


def test_each_step_drains_the_queues():
    scheduler = _scheduler()
    scheduler.request_finished(_prefill_request(40, RequestStatus.FINISHED_STOPPED), [3, 4, 5])
    scheduler.update_state_after_alloc(_decode_request(40, 40, "pull"), FakeBlocks([7, 8, 9]), 40)
    scheduler.update_state_after_alloc(_decode_request(40, 40, "release", "cd" * 16), FakeBlocks([1, 2, 3]), 0)
    meta = scheduler.build_connector_meta()
    assert (list(meta.sends), list(meta.recvs), len(meta.releases)) == (["prefill-1"], ["pull"], 1)
    empty = scheduler.build_connector_meta()
    assert not empty.sends and not empty.recvs and not empty.releases
    assert meta.sends and meta.recvs and meta.releases  # what was handed out stays as it was


# ---- what comes in from the ingress -----------------------------------------------------


def _without(key: str) -> dict[str, Any]:
    params = _transfer(40).to_params()
    del params[key]
    return params


@pytest.mark.parametrize(
    "description",
    [
        "not an object",
        _without("transfer_id"),
        _without("num_blocks"),
        {**_transfer(40).to_params(), "transfer_id": ""},
        {**_transfer(40).to_params(), "address": "10.0.0.7:45123"},
        {**_transfer(40).to_params(), "address": {"host": "10.0.0.7", "port": "45123"}},
        {**_transfer(40).to_params(), "address": {"host": "10.0.0.7", "port": 70000}},
        {**_transfer(40).to_params(), "address": {"port": 45123}},
        {**_transfer(40).to_params(), "num_tokens": True},
        {**_transfer(40).to_params(), "num_tokens": 40.0},
        {**_transfer(40).to_params(), "num_blocks": -1},
        {**_transfer(40).to_params(), "block_size": 0},
    ],
)
def test_a_malformed_transfer_is_refused_and_the_prompt_computed_locally(description):
    with pytest.raises(InvalidTransferParams):
        TransferDescription.from_params(description)
    scheduler = _scheduler()
    request = FakeRequest("decode-1", {"do_remote_prefill": True, PARAMS_KEY: description}, 40)
    assert scheduler.get_num_new_matched_tokens(request, 0) == (0, False)
    scheduler.update_state_after_alloc(request, FakeBlocks([7, 8, 9]), 0)
    assert scheduler.request_finished(request, [7, 8, 9]) == (False, None)
    meta = scheduler.build_connector_meta()
    assert not meta.recvs and not meta.releases and not meta.sends


def test_a_description_keeps_what_it_does_not_know():
    params = {**_transfer(40).to_params(), "from_a_newer_prefill": 1}
    params["address"] = {**ADDRESS, "rdma": "mlx5_0"}
    transfer = TransferDescription.from_params(params)
    assert transfer == TransferDescription("ab" * 16, {**ADDRESS, "rdma": "mlx5_0"}, 40, 3, BLOCK_SIZE)


def test_the_advertised_address_is_the_configured_listener():
    assert ConnectorConfig(host="0.0.0.0", advertise_host="10.0.0.7", port=45123).advertised_address == ADDRESS
    assert ConnectorConfig(transport="nixl", host="10.0.0.8", port=5).advertised_address == {
        "transport": "nixl", "host": "10.0.0.8", "port": 5,
    }


# ---- one transfer shared by the n children of a request ---------------------------------


@dataclass
class FakeOutput:
    """vLLM's KVConnectorOutput as the scheduler side reads it."""

    finished_recving: set[str] | None = None
    failed_recving: set[str] = field(default_factory=set)


def _children(n: int, prompt_tokens: int = 40) -> list[FakeRequest]:
    # vLLM names a parent's children "{index}_{parent id}"; each has its own copy of the params.
    return [_decode_request(prompt_tokens, prompt_tokens, f"{i}_cmpl-1") for i in range(n)]


def test_the_first_child_pulls_and_its_siblings_wait():
    scheduler = _scheduler()
    first, *rest = _children(3)
    assert scheduler.get_num_new_matched_tokens(first, 0) == (40, True)
    for child in rest:
        assert scheduler.get_num_new_matched_tokens(child, 0) == (None, False)  # asked again next step
    scheduler.update_state_after_alloc(first, FakeBlocks([7, 8, 9]), 40)
    meta = scheduler.build_connector_meta()
    assert list(meta.recvs) == ["0_cmpl-1"] and not meta.releases
    # While the pull runs, they keep waiting.
    assert scheduler.get_num_new_matched_tokens(rest[0], 0) == (None, False)


def test_once_the_pull_landed_the_siblings_take_the_prefix_cache():
    scheduler = _scheduler()
    first, second, third = _children(3)
    scheduler.get_num_new_matched_tokens(first, 0)
    scheduler.get_num_new_matched_tokens(second, 0)
    scheduler.update_state_after_alloc(first, FakeBlocks([7, 8, 9]), 40)
    assert list(scheduler.build_connector_meta().recvs) == ["0_cmpl-1"]
    scheduler.update_connector_output(FakeOutput(finished_recving={"0_cmpl-1"}))
    # vLLM cached the landed blocks: the sibling's local hit is 32 tokens (2 whole blocks);
    # it loads nothing external and computes the partial block's 8 tokens itself.
    for child in (second, third):
        assert scheduler.get_num_new_matched_tokens(child, 32) == (0, False)
        scheduler.update_state_after_alloc(child, FakeBlocks([7, 8, 12]), 0)
        assert child.kv_transfer_params["do_remote_prefill"] is False
    meta = scheduler.build_connector_meta()
    assert not meta.recvs and not meta.releases  # pulled once, released by nobody
    assert not scheduler._shared and not scheduler._pulling  # nothing left behind but a bounded memory


def test_a_failed_pull_lets_each_sibling_compute_its_own_prompt():
    scheduler = _scheduler()
    first, second = _children(2)
    scheduler.get_num_new_matched_tokens(first, 0)
    scheduler.update_state_after_alloc(first, FakeBlocks([7, 8, 9]), 40)
    assert scheduler.get_num_new_matched_tokens(second, 0) == (None, False)
    scheduler.update_connector_output(FakeOutput(finished_recving={"0_cmpl-1"}, failed_recving={"0_cmpl-1"}))
    assert scheduler.get_num_new_matched_tokens(second, 0) == (0, False)
    scheduler.build_connector_meta()
    assert not scheduler._shared


def test_a_puller_aborted_before_its_blocks_were_allocated_hands_the_pull_on():
    scheduler = _scheduler()
    first, second = _children(2)
    assert scheduler.get_num_new_matched_tokens(first, 0) == (40, True)
    assert scheduler.get_num_new_matched_tokens(second, 0) == (None, False)
    first.status = RequestStatus.FINISHED_ABORTED
    assert scheduler.request_finished(first, []) == (False, None)
    assert not scheduler.build_connector_meta().releases  # the sibling still wants it
    assert scheduler.get_num_new_matched_tokens(second, 0) == (40, True)
    scheduler.update_state_after_alloc(second, FakeBlocks([4, 5, 6]), 40)
    assert list(scheduler.build_connector_meta().recvs) == ["1_cmpl-1"]


def test_when_every_child_ended_before_a_pull_the_transfer_is_released_once():
    scheduler = _scheduler()
    children = _children(3)
    for child in children:
        scheduler.get_num_new_matched_tokens(child, 0)
    for child in children:
        child.status = RequestStatus.FINISHED_ABORTED
        scheduler.request_finished(child, [])
    assert scheduler.build_connector_meta().releases == [_transfer(40)]
    assert not scheduler._shared


def test_a_puller_with_nothing_to_load_releases_and_frees_its_siblings():
    scheduler = _scheduler()
    first, second = _children(2)
    # Its prompt is already in the local cache (the scheduler zeroes the hit, or it asks
    # with the whole prompt computed): nobody pulls, the publisher is told at once.
    assert scheduler.get_num_new_matched_tokens(first, 40) == (0, False)
    scheduler.update_state_after_alloc(first, FakeBlocks([7, 8, 9]), 0)
    assert scheduler.get_num_new_matched_tokens(second, 40) == (0, False)
    scheduler.update_state_after_alloc(second, FakeBlocks([7, 8, 9]), 0)
    assert scheduler.build_connector_meta().releases == [_transfer(40)]
    assert not scheduler._shared


def test_a_sibling_aborted_while_the_pull_runs_releases_nothing():
    scheduler = _scheduler()
    first, second = _children(2)
    scheduler.get_num_new_matched_tokens(first, 0)
    scheduler.update_state_after_alloc(first, FakeBlocks([7, 8, 9]), 40)
    scheduler.get_num_new_matched_tokens(second, 0)
    second.status = RequestStatus.FINISHED_ABORTED
    scheduler.request_finished(second, [])
    meta = scheduler.build_connector_meta()
    assert not meta.releases  # the puller is reading it
    scheduler.update_connector_output(FakeOutput(finished_recving={"0_cmpl-1"}))
    assert not scheduler._shared and not scheduler._pulling


def test_a_description_from_a_newer_contract_is_refused_and_an_unversioned_one_read():
    params = _transfer(40).to_params()
    with pytest.raises(InvalidTransferParams, match="newer"):
        TransferDescription.from_params({**params, "version": 99})
    del params["version"]  # written before versions existed
    assert TransferDescription.from_params(params) == _transfer(40)
