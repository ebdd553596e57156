"""The cluster in a box's pure parts: link specs, roles, the loss filter, box settings.
The box itself (namespaces, Ray nodes, engines) is tested in tests/cluster/."""

from __future__ import annotations

import pytest

from control_plane.cluster import box
from control_plane.cluster.netns import LinkSpec, loss_filter, rate_bits


def test_link_spec_parses_rate_delay_jitter_loss():
    spec = LinkSpec.parse("10gbit,2ms")
    assert (spec.rate, spec.delay_ms, spec.jitter_ms, spec.loss_pct) == ("10gbit", 2.0, 0.0, 0.0)
    spec = LinkSpec.parse("1Gbit, 20ms, 500us, 1%")
    assert (spec.rate, spec.delay_ms, spec.jitter_ms, spec.loss_pct) == ("1gbit", 20.0, 0.5, 1.0)
    assert LinkSpec.parse("unshaped").rate is None
    assert LinkSpec.parse("5ms").rate is None
    assert str(LinkSpec.parse("500mbit,5ms,1ms,0.5%")) == "500mbit,5ms,1ms,0.5%"
    assert rate_bits("2.5gbit") == 2.5e9


@pytest.mark.parametrize("text", ["10gbps", "fast", "1ms,2ms,3ms", "1gbit,101%", "4bit"])
def test_link_spec_refuses_what_tc_would_misread(text):
    with pytest.raises(ValueError):
        LinkSpec.parse(text)


def test_loss_filter_is_classic_bpf_with_the_right_threshold():
    program = loss_filter(1.0).split(",")
    assert program[0] == "4"
    load, jump, keep, drop = (tuple(int(x) for x in op.split()) for op in program[1:])
    assert load == (0x20, 0, 0, 0xFFFFF038)  # ld rand
    assert jump[:3] == (0x35, 0, 1) and abs(jump[3] / 2**32 - 0.01) < 1e-9
    assert keep == (6, 0, 0, 2**32 - 1) and drop == (6, 0, 0, 0x10002)
    assert loss_filter(100.0).split(",")[2].split()[3] == str(2**32 - 1)


def test_default_roles_put_prefill_and_decode_on_their_own_nodes():
    assert box.default_roles(3) == [["head"], ["prefill"], ["decode"]]
    assert box.default_roles(2) == [["head", "prefill"], ["decode"]]
    assert box.default_roles(5)[3:] == [["decode"], ["prefill"]]
    with pytest.raises(box.BoxError):
        box.default_roles(1)


def test_roles_are_validated():
    assert box.parse_roles("head+prefill,decode,decode") == [["head", "prefill"], ["decode"], ["decode"]]
    for bad in ("prefill,decode", "head,head,prefill,decode", "head,prefill", "head,prefill,gpu"):
        with pytest.raises(box.BoxError):
            box.parse_roles(bad)


@pytest.mark.parametrize("name", ["box", "ci", "a12345"])
def test_box_names_fit_interface_names(name):
    assert box.check_name(name) == name
    assert len(f"tdm-{name}-br") <= 15 and len(f"tdm-{name}-99") <= 15


@pytest.mark.parametrize("name", ["", "Box", "1box", "toolong7", "a-b"])
def test_bad_box_names(name):
    with pytest.raises(ValueError):
        box.check_name(name)


def _state(roles=(("head",), ("prefill",), ("decode",))) -> box.BoxState:
    return box.BoxState(
        name="t", subnet="198.18.0.0/24", bridge="tdm-t-br", bridge_address="198.18.0.1/24",
        nodes=[box.NodeState(name=f"n{i}", roles=list(r), namespace=f"tandem-t-n{i}", address=f"198.18.0.{10 + i}",
                             host_end=f"tdm-t-{i}", num_cpus=4) for i, r in enumerate(roles)],
        ray_token="t" * 64, redis_password="p" * 24, kv_secret="k" * 32,
    )  # fmt: skip


def test_box_settings_place_engines_by_role_and_authenticate_kv(monkeypatch):
    from control_plane.cluster.deploy import box_settings

    for var in ("TANDEM_CONFIG", "TANDEM_HOST", "TANDEM_KV_CONNECTOR__AUTH_SECRET"):
        monkeypatch.delenv(var, raising=False)
    state = _state()
    settings = box_settings(state, decode={"replicas": 2})
    assert settings.prefill.ray_resources == {"tandem_prefill": 1}
    assert settings.decode.ray_resources == {"tandem_decode": 1} and settings.decode.replicas == 2
    assert settings.ingress_ray_resources == {"tandem_head": 1}
    assert settings.kv_connector.listen == "node" and settings.kv_connector.auth_secret == state.kv_secret
    assert settings.redis_url == state.redis_url and "198.18.0.10" in settings.redis_url
    assert settings.host == "0.0.0.0" and not settings.auth_required
    colocated = box_settings(state, mode="colocated", app_name="ref", route_prefix="/ref")
    assert colocated.colocated.ray_resources == {"tandem_decode": 1}
    keyed = box_settings(state, auth={"api_keys": ["tk-0123456789abcdef"]})
    assert keyed.auth_required


def test_box_state_finds_nodes_and_head():
    state = _state()
    assert state.head.name == "n0" and state.ray_address == "198.18.0.10:6379"
    assert state.node("198.18.0.12").name == "n2" and state.node("tandem-t-n1").name == "n1"
    assert [n.name for n in state.nodes_with("decode")] == ["n2"]
    assert state.node("n1").resources == {"tandem_prefill": float(box.ROLE_UNITS)}
    with pytest.raises(box.BoxError):
        state.node("n9")


def test_a_config_deploy_on_the_box_gets_its_secrets_from_the_nodes(monkeypatch):
    """With the planner on, the app is deployed from a Serve config whose args hold no
    secret: the builder (and the planner's policy) on the box's nodes read them from the
    nodes' environment, as a pod reads a Kubernetes Secret."""
    from control_plane.app import config_deploy_args
    from control_plane.cluster.deploy import box_settings
    from control_plane.settings import load_settings

    for var in ("TANDEM_CONFIG", "TANDEM_HOST", "TANDEM_KV_CONNECTOR__AUTH_SECRET", "TANDEM_REDIS_URL"):
        monkeypatch.delenv(var, raising=False)
    state = _state()
    settings = box_settings(state, planner={"enabled": True})
    args = config_deploy_args(settings)
    assert "auth_secret" not in args["kv_connector"] and "redis_url" not in args  # Redis has a password
    env = box.node_env(state, state.node("n1"))
    for var in ("TANDEM_KV_CONNECTOR__AUTH_SECRET", "TANDEM_REDIS_URL"):
        monkeypatch.setenv(var, env[var])
    rebuilt = load_settings(None, **{k: v for k, v in args.items() if k != "config"})
    assert rebuilt.kv_connector.auth_secret == state.kv_secret and rebuilt.redis_url == state.redis_url
    assert rebuilt.prefill.ray_resources == {"tandem_prefill": 1} and rebuilt.kv_connector.listen == "node"
