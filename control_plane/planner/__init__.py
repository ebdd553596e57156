"""The P:D planner: sizes the prefill and decode pools together from the measured workload
and the SLOs.

- `policy`: the pure policy (`Planner.decide(Observation) -> Plan`), no Ray;
- `fits`: its online models (rate forecast, decode step fit);
- `serve_policy`: the Ray Serve binding, an application-level autoscaling policy.
"""

from control_plane.planner.policy import DecodeSample, Observation, PhasePlan, Plan, Planner

__all__ = ["DecodeSample", "Observation", "PhasePlan", "Plan", "Planner"]
