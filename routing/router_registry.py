"""The Tandem request router of each (app, deployment) in this process, for the ingress's
admission control and prefill watchdog.

A module of its own on purpose: Ray Serve ships a request-router class to the process that
routes by pickling it by value, which copies a dict held in the class's own module once per
deployment (the ingress would then find no router at all). A module is always pickled by
reference, so everyone reaches this one dict.
"""

from __future__ import annotations

from typing import Any

ROUTERS: dict[tuple[str, str], Any] = {}
