"""Routers per API family: OpenAI (/v1/*), native (/embed, /similarity, /tokenize), operations."""
