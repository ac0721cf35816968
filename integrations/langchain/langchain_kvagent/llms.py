"""``KVAgentLLM``: a LangChain text-completion model that resumes from cached document KV."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models.llms import LLM
from langchain_core.outputs import Generation, GenerationChunk, LLMResult

from ._reuse import chat_template_ids
from ._settings import KVAgentSettings


class KVAgentLLM(KVAgentSettings, LLM):
    """A local kvagent model as a LangChain ``LLM``.

    With ``chat_template`` (the default) a prompt is sent as one user message through the
    tokenizer's chat template - the same layout ``KVAgent.read`` caches documents under, so a
    prompt ``"{context}\\n\\nQuestion: {question}"`` resumes from a document read by
    ``KVDocumentLoader``. Every call reports what the cache did in ``generation_info``.
    """

    chat_template: bool = True

    @property
    def _llm_type(self) -> str:
        return "kvagent"

    @property
    def _identifying_params(self) -> Mapping[str, Any]:
        return {**self._settings_params(), "chat_template": self.chat_template}

    def prompt_ids(self, prompt: str) -> list[int]:
        """The token ids a prompt is run as."""
        agent = self.runtime
        if not self.chat_template:
            return list(agent.tokenizer.encode(prompt, add_special_tokens=True))
        return chat_template_ids(agent.tokenizer, [{"role": "user", "content": prompt}])

    def _call(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> str:
        return (
            self._runner().complete(self.prompt_ids(prompt), self._params(**kwargs), self._stops(stop)).text
        )

    def _generate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        """Like ``LLM._generate``, plus each generation's cache report in ``generation_info``."""
        generations = []
        for prompt in prompts:
            done = self._runner().complete(self.prompt_ids(prompt), self._params(**kwargs), self._stops(stop))
            generations.append([Generation(text=done.text, generation_info=done.metadata())])
        return LLMResult(generations=generations)

    def _stream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[GenerationChunk]:
        done, deltas = self._runner().run(self.prompt_ids(prompt), self._params(**kwargs), self._stops(stop))
        for delta in deltas:
            chunk = GenerationChunk(text=delta)
            if run_manager is not None:
                run_manager.on_llm_new_token(delta, chunk=chunk)
            yield chunk
        yield GenerationChunk(text="", generation_info=done.metadata())
