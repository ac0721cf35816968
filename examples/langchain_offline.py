"""An offline LangChain agent over a few documents, reusing each document's KV across questions.

Run: python examples/langchain_offline.py   (needs: pip install -e ./integrations/langchain)

Documents are read once by ``KVDocumentLoader``; the chain's prompt starts with the document the
way the agent cached it, so every question resumes from the cached KV. Each answer is checked
against the same chain with KV reuse disabled (full prefill): greedy output must be identical.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_kvagent import ChatKVAgent, KVDocumentLoader

from kvagent import KVAgent

HERE = Path(__file__).resolve().parent
DOCUMENTS = [HERE.parent / "kvagent" / "data" / "sample.txt", HERE / "harbour_notes.txt"]
QUESTIONS = {
    "sample.txt": ["Who founded the ferry company?", "How much does a return ticket cost?"],
    "harbour_notes.txt": ["When does the harbour office open?", "How far can the lighthouse be seen?"],
}
MAX_TOKENS = 24


def main() -> None:
    with tempfile.TemporaryDirectory() as cache_dir, KVAgent(cache_dir=cache_dir) as agent:
        prompt = ChatPromptTemplate.from_messages([("human", "{context}\n\nQuestion: {question}")])
        chat = ChatKVAgent(agent=agent, max_tokens=MAX_TOKENS)
        cached_chain = prompt | chat
        reference_chain = (
            prompt | ChatKVAgent(agent=agent, max_tokens=MAX_TOKENS, kv_reuse=False) | StrOutputParser()
        )
        saved = 0.0
        all_exact = True
        for doc in KVDocumentLoader(DOCUMENTS, agent=agent).lazy_load():
            name = Path(doc.metadata["source"]).name
            print(f"\n== {name}: {doc.metadata['kv_tokens']} tokens, read: {doc.metadata['kv_status']}")
            for question in QUESTIONS[name]:
                inputs = {"context": doc.page_content, "question": question}
                t0 = time.perf_counter()
                message = cached_chain.invoke(inputs)
                t1 = time.perf_counter()
                reference = reference_chain.invoke(inputs)
                t2 = time.perf_counter()
                meta = message.response_metadata
                exact = message.content == reference
                all_exact &= exact
                saved += (t2 - t1) - (t1 - t0)
                print(f"Q: {question}\nA: {message.content.strip()}")
                print(
                    f"   cache {meta['kv_status']}: {meta['kv_cached_tokens']} tokens reused, "
                    f"{meta['kv_prefilled_tokens']} prefilled; {t1 - t0:.2f}s vs {t2 - t1:.2f}s uncached; "
                    f"exact={exact}"
                )
        print(
            f"\ntime saved over {sum(map(len, QUESTIONS.values()))} questions: {saved:.2f}s; all exact: "
            f"{all_exact}"
        )
        if not all_exact:
            raise SystemExit("cached and uncached greedy outputs differ")


if __name__ == "__main__":
    main()
