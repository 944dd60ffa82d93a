"""nvlm_server: an OpenAI-compatible chat server for NVLM-D, sharing one loaded model among many clients."""

from .app import ServerSettings, create_app
from .convert import ServerImagePolicy

__all__ = ["ServerImagePolicy", "ServerSettings", "create_app"]
