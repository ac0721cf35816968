"""LangChain integration for kvagent: read a document once, answer every chain call from its cached KV."""

from .chat_models import ChatKVAgent
from .document_loaders import KVDocumentLoader
from .llms import KVAgentLLM

__all__ = ["ChatKVAgent", "KVAgentLLM", "KVDocumentLoader"]
