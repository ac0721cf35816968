"""langchain-tests standard unit tests for ChatKVAgent (they never load the model: it is loaded lazily)."""

from __future__ import annotations

from langchain_tests.unit_tests import ChatModelUnitTests

from langchain_kvagent import ChatKVAgent


class TestChatKVAgentUnit(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[ChatKVAgent]:
        return ChatKVAgent

    @property
    def chat_model_params(self) -> dict:
        return {"model": "smollm2"}

    @property
    def has_tool_calling(self) -> bool:
        return False

    @property
    def has_structured_output(self) -> bool:
        return False

    @property
    def returns_usage_metadata(self) -> bool:
        return True

    @property
    def supports_model_override(self) -> bool:
        return False  # one loaded model per instance: a per-call ``model=`` cannot switch weights
