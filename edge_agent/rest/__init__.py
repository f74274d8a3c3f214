"""The agent's v2 REST transport, for web pages: the same InferenceService as gRPC, tickets and
a results stream over HTTP, the browser rules, and the kiosk page."""

from edge_agent.rest.app import KIOSK_DIR
from edge_agent.rest.app import create_app as create_rest_app
from edge_agent.rest.server import RestServer, ServerTls

__all__ = ["KIOSK_DIR", "RestServer", "ServerTls", "create_rest_app"]
