"""The client side: publish requests and await, or stream, their results."""

from .client import StreamerClient, request_headers

__all__ = ["StreamerClient", "request_headers"]
