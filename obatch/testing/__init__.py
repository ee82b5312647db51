"""Test and benchmark helpers for obatch.

``obatch.testing.ollama_sim`` holds a protocol-faithful Ollama simulator (``OllamaSim``) serving the
native Ollama API on a loopback port, with a latency model, Ollama's queue and fault injection;
``obatch.testing.server`` runs a real ``obatch serve`` in a child process on a free port (``free_port``);
``obatch.testing.postgres`` a throwaway PostgreSQL server.
"""
