"""An offline tool-calling agent over a cached document: every turn resumes from the previous turn's KV.

Run: python examples/agent_tools.py   (needs: pip install -e ./integrations/langchain)

The embedded SmolLM2-135M's own chat template has no tools (``bind_tools`` on it raises
``ToolsUnsupportedError``), so this runs its weights under the real Qwen3 chat template (Hermes
``<tool_call>`` format, kept with the tests). A 135M model was not trained to call tools, so each
question forces one call (``tool_choice``): the model picks the tool (or is told which) and decodes
its arguments, guided by the tool's JSON schema; then it answers from the tool's result. The document sits in
the system message, so it is prefilled once; each turn resumes from the KV of the turn before
(conversation, tool call, tool result) and is checked against a full prefill of the same prompt.
"""

from __future__ import annotations

import copy
import re
import tempfile
import time
from pathlib import Path

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.tools import tool
from langchain_kvagent import ChatKVAgent

from kvagent import KVAgent

HERE = Path(__file__).resolve().parent
NOTES = (HERE / "harbour_notes.txt").read_text(encoding="utf-8")
TEMPLATE = (HERE.parent / "tests" / "chat_templates" / "qwen3.jinja").read_text(encoding="utf-8")
QUESTIONS = [  # (question, tool_choice): "any" lets the model pick the tool, a name forces that tool
    ("What is the berth fee for a 12 metre yacht staying 3 nights?", "berth_fee"),
    ("When does the harbour master's office open?", "any"),
]
MAX_TOKENS = 16


@tool
def search_notes(query: str) -> str:
    """Return the sentences of the harbour notes that contain a word of the query."""
    words = [w for w in re.findall(r"[a-z]+", query.lower()) if len(w) > 3]
    hits = [s for s in re.split(r"(?<=\.)\s+", NOTES) if any(w in s.lower() for w in words)]
    return " ".join(hits[:2]) or "no sentence matches"


@tool
def berth_fee(length_metres: int, nights: int) -> str:
    """The berth fee in pounds for a boat of the given length staying some nights."""
    per_night = 18 if length_metres < 10 else 30
    return f"{per_night * max(nights, 0)} pounds ({per_night} a night)"


TOOLS = {t.name: t for t in (search_notes, berth_fee)}


def turn(chat: ChatKVAgent, reference: ChatKVAgent, messages: list[BaseMessage], choice: str) -> AIMessage:
    """One model call with the tools bound; prints what the cache did and checks it against full prefill."""
    t0 = time.perf_counter()
    msg = chat.bind_tools(list(TOOLS.values()), tool_choice=choice).invoke(messages)
    seconds = time.perf_counter() - t0
    ref = reference.bind_tools(list(TOOLS.values()), tool_choice=choice).invoke(messages)
    assert isinstance(msg, AIMessage) and isinstance(ref, AIMessage) and msg.usage_metadata is not None
    same = msg.content == ref.content and [c["args"] for c in msg.tool_calls] == [
        c["args"] for c in ref.tool_calls
    ]
    usage = msg.usage_metadata
    what = ", ".join(f"{c['name']}({c['args']})" for c in msg.tool_calls) or repr(msg.content)
    print(
        f"  cache_read {usage['input_token_details']['cache_read']:5d} of {usage['input_tokens']:5d} prompt "
        f"tokens  {seconds:5.2f} s  same as full prefill: {same}  -> {what}"
    )
    if not same:
        raise SystemExit("output after KV reuse differs from a full prefill")
    return msg


def main() -> None:
    with tempfile.TemporaryDirectory() as cache_dir, KVAgent(cache_dir=cache_dir) as base:
        tokenizer = copy.deepcopy(base.tokenizer)
        tokenizer.chat_template = TEMPLATE
        agent = KVAgent(base.engine.model, tokenizer=tokenizer, cache_dir=Path(cache_dir) / "tools")
        chat = ChatKVAgent(agent=agent, max_tokens=MAX_TOKENS, kv_min_save_tokens=8)
        reference = ChatKVAgent(agent=agent, max_tokens=MAX_TOKENS, kv_reuse=False)
        system = SystemMessage(f"Answer questions about these harbour notes.\n\n{NOTES}")
        for question, choice in QUESTIONS:
            print(f"\nQ: {question}")
            messages: list[BaseMessage] = [system, HumanMessage(question)]
            call_message = turn(chat, reference, messages, choice)
            call = call_message.tool_calls[0]
            result = TOOLS[call["name"]].invoke(call["args"])
            print(f"    tool {call['name']} -> {result[:70]!r}")
            messages += [call_message, ToolMessage(result, tool_call_id=call["id"], name=call["name"])]
            # same tools rendered: the prompt extends the last
            answer = turn(chat, reference, messages, "none")
            print(f"A: {answer.content.strip()}")


if __name__ == "__main__":
    main()
