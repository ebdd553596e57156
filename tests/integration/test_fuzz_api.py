"""Schemathesis over every endpoint of the live P/D app, driven by the OpenAPI document the
ingress serves: valid, boundary and invalid requests, checked for no 5xx and for answers
that match the documented statuses, content types and shapes.

Generation is real (prefill and decode engines); answers are kept short so the run fits in
the suite. Hypothesis keeps its example database (the seed corpus, including any failing
case it ever found) in tests/fuzz_corpus, which is committed.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from hypothesis.database import DirectoryBasedExampleDatabase
from schemathesis.specs.openapi.checks import positive_data_acceptance

from routing.ingress import app as ingress_app
from tests.conftest import MODEL

CORPUS = Path(__file__).resolve().parents[1] / "fuzz_corpus"
# Generated requests may ask for up to the model's context; the engines are real CPU ones.
MAX_FUZZ_TOKENS = 8


# The document is built from the ingress's own FastAPI app at collection time (the live
# cluster only exists once the session fixture runs); test_served_document_is_this_one
# checks that the live ingress serves the same document.
schema = schemathesis.openapi.from_dict(ingress_app.openapi())

# Under CI (the CI environment variable) Hypothesis loads its "ci" profile: derandomized, so
# every CI run tries the same cases, and no example database (derandomize forbids one).
# Elsewhere generation is random and failing cases are kept in the committed database.
EXAMPLE_DATABASE = (None if settings().derandomize
                    else DirectoryBasedExampleDatabase(str(CORPUS / "hypothesis")))


def test_served_document_is_this_one(cluster):
    served = httpx.get(f"{cluster.url}/openapi.json", timeout=30)
    assert served.status_code == 200
    assert served.json() == ingress_app.openapi()


def _shape_for_the_engines(body: object) -> None:
    """Short answers, and half the bodies name the served model, so that generated requests
    reach the engines instead of all ending at "model not found"."""
    if not isinstance(body, dict):
        return
    model = body.get("model")
    # Only a valid name is swapped for another valid one: a negative case stays negative.
    if isinstance(model, str) and model and zlib.crc32(repr(sorted(body.items(), key=str)).encode()) % 2:
        body["model"] = MODEL
    for field in ("max_tokens", "max_completion_tokens", "min_tokens"):
        value = body.get(field)
        if isinstance(value, int) and not isinstance(value, bool) and value > MAX_FUZZ_TOKENS:
            body[field] = MAX_FUZZ_TOKENS
    if "max_tokens" not in body and "max_completion_tokens" not in body:
        body["max_tokens"] = MAX_FUZZ_TOKENS


@schema.parametrize()
@settings(
    max_examples=60,
    deadline=None,
    database=EXAMPLE_DATABASE,
    suppress_health_check=list(HealthCheck),
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
)
def test_every_endpoint_answers_in_its_documented_shape(case, cluster):
    _shape_for_the_engines(case.body)
    # Every check but "valid input must get a 2xx": a schema-valid request can still be
    # refused for reasons the schema cannot state (a model name that is not served, a
    # prompt past the context); those answers are 4xx with the
    # OpenAI error shape, which the other checks verify.
    case.call_and_validate(base_url=cluster.url, excluded_checks=[positive_data_acceptance], timeout=120)


SEEDS = [json.loads(line) for line in (CORPUS / "seeds.jsonl").read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("seed", SEEDS, ids=[seed["name"] for seed in SEEDS])
def test_hostile_seed_requests_get_clean_answers(cluster, seed):
    """Hand-written requests that once broke, or could break, an OpenAI server: each gets a
    2xx or an OpenAI-shaped 4xx, and the engines stay up (the last seed's check)."""
    if "raw" in seed:
        # Raw bytes: malformed UTF-8 is written as surrogate escapes in the file.
        content = seed["raw"].encode("utf-8", "surrogateescape")
    else:
        content = json.dumps(seed["body"]).encode()
    response = httpx.post(f"{cluster.url}{seed['path']}", content=content, timeout=120,
                          headers={"content-type": "application/json"})
    assert response.status_code < 500, (response.status_code, response.text[:500])
    if response.status_code >= 400:
        error = response.json()["error"]
        assert isinstance(error["message"], str) and error["type"]
    elif seed.get("body", {}).get("stream"):
        assert response.text.rstrip().endswith("data: [DONE]")
    else:
        assert response.json()["choices"]
    assert httpx.get(f"{cluster.url}/health", timeout=60).status_code == 200
