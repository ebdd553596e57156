"""The P/D contract: the keys that cross between the ingress's orchestration, the engines
and Tandem's KV connector. One module, imported by all of them (pure: no torch, no vLLM).

- The ingress asks the prefill engine for KV with `PREFILL_KV_PARAMS` in
  ``kv_transfer_params``, plus the request's SLO class and a pinned compression profile.
- The prefill's connector answers with ``kv_transfer_params[PARAMS_KEY]``: the transfer id,
  the publisher's address, token and block counts; the ingress hands them to decode as is.
- The worker host hands the connector the cluster's KV secret in `AUTH_SECRET_ENV`.
"""

from __future__ import annotations

from typing import Any

# What vLLM's P/D proxies send to the prefill engine: "produce KV for a remote decoder".
PREFILL_KV_PARAMS: dict[str, Any] = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}
# Tandem's transfer description inside the prefill's answer.
PARAMS_KEY = "tandem"
# The request's SLO class: picks the KV compression profile when decode pulls.
SLO_CLASS_PARAM = "tandem_slo_class"
# A profile the request pins (x-tandem-kv-profile), over the controller's choice.
KV_PROFILE_PARAM = "tandem_kv_profile"
# Where an engine's connector finds the cluster's KV secret (never in the vLLM config,
# which vLLM logs).
AUTH_SECRET_ENV = "TANDEM_KV_AUTH_SECRET"
