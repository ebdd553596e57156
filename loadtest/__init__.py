"""Load testing Tandem's OpenAI-compatible endpoint with Locust (docs/loadtest.md).

workloads: prompt generators; shapes: users over time; stream: timing one SSE stream;
report: summary, CSV, PNG, HTML; locustfile: the Locust users and shape; cli: run it headless.
"""
