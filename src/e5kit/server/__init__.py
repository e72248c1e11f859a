"""The e5kit embedding server: OpenAI-compatible and native HTTP API with dynamic batching.

``create_app`` builds the FastAPI app; ``e5kit serve`` (:mod:`e5kit.server.cli`) runs it.
"""

from .app import create_app
from .auth import KeyStore
from .config import ServerConfig
from .service import Identity

__all__ = ["create_app", "ServerConfig", "KeyStore", "Identity"]
