"""Serving: the Ray Serve app (:mod:`.app`) and its OpenAI-style embeddings API (:mod:`.openai_api`)."""
