"""The live replicas of a Serve deployment, by the named actors Serve starts for them.

Serve names each replica's actor ``SERVE_REPLICA::<app>#<deployment>#<replica id>`` in the
``serve`` namespace; Ray lists named actors while they live. Unlike the counts in
``serve.status()``, this names the replicas, drops one as soon as its actor is dead, and
needs no dashboard (the state API does). Callers hold a Ray driver connection.
"""

from __future__ import annotations

REPLICA_ACTOR_PREFIX = "SERVE_REPLICA::"


def replica_actor_names(app_name: str, deployment: str) -> list[str]:
    """The actor names of the deployment's live replicas, sorted."""
    import ray

    prefix = f"{REPLICA_ACTOR_PREFIX}{app_name}#{deployment}#"
    return sorted(
        actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True) if actor["name"].startswith(prefix)
    )


def replica_ids(app_name: str, deployment: str) -> set[str]:
    """The ids of the deployment's live replicas (``serve.get_replica_context().replica_id.unique_id``)."""
    return {name.rsplit("#", 1)[1] for name in replica_actor_names(app_name, deployment)}
