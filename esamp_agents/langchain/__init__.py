"""LangChain models over the ESamp engine: :class:`ChatESamp` (chat) and :class:`ESampLLM`
(text completion); ``common`` holds what both share (fields, per-call parameters)."""
