"""docker-compose's api and flower services, and the README, keep the gateway's promises."""

from __future__ import annotations

import re

from jobqueue.settings import QueueSettings
from producer.settings import ApiSettings
from tests.test_deployment import ROOT, compose

README = (ROOT / "README.md").read_text()
SETTINGS_PAGE = (ROOT / "docs" / "settings.md").read_text()
RUN_COMMAND = "uvicorn --factory producer.api:create_app --host 0.0.0.0 --port 8000"


def test_api_service_runs_the_documented_command_against_compose_redis():
    api = compose()["services"]["api"]
    assert " ".join(api["command"]) == RUN_COMMAND
    assert RUN_COMMAND in README
    assert api["environment"]["REDIS_URL"] == "redis://:${REDIS_PASSWORD:?set REDIS_PASSWORD}@redis:6379/0"
    assert "API_KEY" in api["environment"]
    # Published on the host's loopback only, like Redis; the README says to set API_KEY before exposing it.
    assert all(port.startswith("127.0.0.1:") for port in api["ports"])
    assert api["depends_on"]["redis"]["condition"] == "service_healthy"


def test_flower_watches_the_same_broker_on_localhost():
    flower = compose()["services"]["flower"]
    assert flower["image"].startswith("mher/flower:")
    # The broker comes through the environment (CELERY_BROKER_URL): a password stays out of `ps`.
    assert flower["environment"]["CELERY_BROKER_URL"] == "${BROKER_URL:-redis://:${REDIS_PASSWORD:?set REDIS_PASSWORD}@redis:6379/0}"
    assert flower["command"] == ["celery", "flower", "--port=5555"]
    assert all(port.startswith("127.0.0.1:") for port in flower["ports"])


def test_every_gateway_setting_is_in_the_settings_table():
    for name in set(ApiSettings.model_fields) - set(QueueSettings.model_fields):
        assert re.search(rf"^\| `{name.upper()}` \|", SETTINGS_PAGE, re.M), f"{name.upper()} missing from docs/settings.md"
