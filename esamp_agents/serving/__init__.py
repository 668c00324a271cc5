"""The OpenAI-compatible HTTP server (``esamp-agents serve``)."""
