"""The HTTP gateway: ``uvicorn --factory producer.api:create_app --host 0.0.0.0 --port 8000``."""

from producer.api.app import create_app

__all__ = ["create_app"]
