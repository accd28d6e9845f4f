"""The relay's connection plumbing to backends (the relay itself is exercised end to end)."""

from __future__ import annotations

from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.testing import MemoryReactorClock
from twisted.trial import unittest
from twisted.web.client import URI

from llmswap.relay import _Endpoints


class EndpointTests(unittest.TestCase):
    def test_one_endpoint_per_backend_origin_and_tls_for_https(self) -> None:
        endpoints = _Endpoints(MemoryReactorClock())

        def at(url: bytes) -> object:
            return endpoints.endpointForURI(URI.fromBytes(url))

        plain = at(b"http://127.0.0.1:8081/v1/chat/completions")
        self.assertIsInstance(plain, HostnameEndpoint)
        self.assertIs(at(b"http://127.0.0.1:8081/health"), plain)
        self.assertIsNot(at(b"http://127.0.0.1:8082/v1/models"), plain)
        tls = at(b"https://127.0.0.1:8081/v1/models")
        self.assertNotIsInstance(tls, HostnameEndpoint)  # a TLS wrapper around one
        self.assertIs(at(b"https://127.0.0.1:8081/v1/embeddings"), tls)
