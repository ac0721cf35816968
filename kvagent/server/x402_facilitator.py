"""A facilitator over HTTP (``/supported``, ``/verify``, ``/settle``, as x402's hosted facilitators answer
them), serving the SDK's facilitator: an operator may run one for several hosts; the tests point a
host's ``--x402-facilitator URL`` at it on loopback."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from ..payments import sdk


def facilitator_app(facilitator: Any) -> FastAPI:
    """The HTTP face of an ``x402FacilitatorSync`` (its schemes registered)."""
    schemas = sdk.require("x402.schemas")
    app = FastAPI(title="kvagent x402 facilitator")

    def dump(model: Any) -> dict[str, Any]:
        return model.model_dump(by_alias=True, exclude_none=True)  # type: ignore[no-any-return]

    async def parse(request: Request) -> tuple[Any, Any]:
        body = await request.json()
        return (schemas.PaymentPayload.model_validate(body["paymentPayload"]),
                schemas.PaymentRequirements.model_validate(body["paymentRequirements"]))

    @app.get("/supported")
    def supported() -> dict[str, Any]:
        return dump(facilitator.get_supported())

    @app.post("/verify")
    async def verify(request: Request) -> JSONResponse:
        try:
            payload, reqs = await parse(request)
        except (KeyError, ValueError, TypeError) as exc:
            return JSONResponse({"error": f"malformed request: {type(exc).__name__}"}, status_code=400)
        return JSONResponse(dump(await run_in_threadpool(facilitator.verify, payload, reqs)))

    @app.post("/settle")
    async def settle(request: Request) -> JSONResponse:
        try:
            payload, reqs = await parse(request)
        except (KeyError, ValueError, TypeError) as exc:
            return JSONResponse({"error": f"malformed request: {type(exc).__name__}"}, status_code=400)
        return JSONResponse(dump(await run_in_threadpool(facilitator.settle, payload, reqs)))

    return app
