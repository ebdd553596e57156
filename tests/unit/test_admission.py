"""Admission control: the in-flight bound, the predicted-TTFT check, an empty pool, and the
body-size limit (driven through a real ASGI app with httpx)."""

from __future__ import annotations

import httpx
import pytest
from fastapi import FastAPI, Request

from routing.admission import AdmissionGate, BodyLimitMiddleware, Overloaded


def test_in_flight_bound_then_release():
    gate = AdmissionGate(max_in_flight=2)
    gate.admit(None, None)
    gate.admit(None, None)
    with pytest.raises(Overloaded) as err:
        gate.admit(None, None)
    assert err.value.status == 429 and err.value.retry_after_s >= 1
    gate.release()
    gate.admit(None, None)


def test_predicted_ttft_past_the_bound_is_shed_with_a_matching_retry_after():
    gate = AdmissionGate(max_in_flight=100, max_predicted_ttft_s=5.0)
    gate.admit(4.9, 3)
    with pytest.raises(Overloaded) as err:
        gate.admit(12.0, 3)
    assert err.value.status == 429 and err.value.retry_after_s == 8
    assert gate.in_flight == 1  # the refused request took no slot


def test_an_idle_ingress_admits_whatever_the_prediction():
    """A predictor fitted during an overload can predict past the bound for an idle pool;
    refusing then would refuse forever (no request, no observation to correct it)."""
    gate = AdmissionGate(max_in_flight=100, max_predicted_ttft_s=5.0)
    gate.admit(30.0, 3)  # nothing in flight: admitted
    with pytest.raises(Overloaded):
        gate.admit(30.0, 3)  # one in flight: that queue is what the prediction is about
    gate.release()
    gate.admit(30.0, 3)


def test_an_empty_pool_is_503():
    with pytest.raises(Overloaded) as err:
        AdmissionGate(max_in_flight=10).admit(None, 0)
    assert err.value.status == 503


def _app(limit: int) -> FastAPI:
    app = FastAPI()

    @app.post("/echo")
    async def echo(request: Request) -> dict:
        return {"size": len(await request.body())}

    app.add_middleware(BodyLimitMiddleware, max_body_bytes=limit)
    return app


async def test_body_limit_by_content_length_and_when_chunked():
    transport = httpx.ASGITransport(app=_app(1000))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        assert (await client.post("/echo", content=b"x" * 1000)).json() == {"size": 1000}
        too_big = await client.post("/echo", content=b"x" * 1001)
        assert too_big.status_code == 413 and "limit is 1000 bytes" in too_big.json()["error"]["message"]

        async def chunks(n: int):
            for _ in range(n):
                yield b"y" * 300

        assert (await client.post("/echo", content=chunks(3))).json() == {"size": 900}
        assert (await client.post("/echo", content=chunks(4))).status_code == 413
