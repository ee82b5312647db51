"""Test and benchmark helpers for obatch.

``obatch.testing.ollama_sim`` holds a protocol-faithful Ollama simulator (``OllamaSim``) serving the
native Ollama API on a loopback port, with a latency model, Ollama's queue and fault injection.
"""
