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

    async def answer(request: Request, call: Any) -> JSONResponse:
        """``call(payload, requirements)`` of the request's body, off the event loop; 400 when malformed."""
        try:
            body = await request.json()
            payload = schemas.PaymentPayload.model_validate(body["paymentPayload"])
            reqs = schemas.PaymentRequirements.model_validate(body["paymentRequirements"])
        except (KeyError, ValueError, TypeError) as exc:
            return JSONResponse({"error": f"malformed request: {type(exc).__name__}"}, status_code=400)
        return JSONResponse(dump(await run_in_threadpool(call, payload, reqs)))

    @app.get("/supported")
    def supported() -> dict[str, Any]:
        return dump(facilitator.get_supported())

    @app.post("/verify")
    async def verify(request: Request) -> JSONResponse:
        return await answer(request, facilitator.verify)

    @app.post("/settle")
    async def settle(request: Request) -> JSONResponse:
        return await answer(request, facilitator.settle)

    return app
