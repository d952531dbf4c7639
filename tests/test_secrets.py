"""No secret in any message: an invalid setting stops a worker or the gateway with one line that names
the variable, never a password in a URL or an API key (issue: secrets in error output)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from jobqueue.settings import QueueSettings, settings_problems

ROOT = Path(__file__).resolve().parents[1]
SECRETS = {"REDIS_URL": "redis://:redis-pw-123@127.0.0.1:6399/12",
           "BROKER_URL": "amqp://qwen:amqp-pw-456@127.0.0.1:5672/vhost",
           "API_KEYS": "acme=acme-key-789abcdef,globex=globex-key-0123456"}


def _start(code: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in {"REDIS_URL", "BROKER_URL", "API_KEY", "API_KEYS"}}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**clean, **SECRETS, **env})


def _assert_no_secret(output: str) -> None:
    for secret in ("redis-pw-123", "amqp-pw-456", "acme-key-789abcdef", "globex-key-0123456", "89abcdef", "0123456"):
        assert secret not in output, f"{secret!r} printed: {output[-2000:]}"


@pytest.mark.parametrize("bad", [{"VISIBILITY_TIMEOUT_S": "10"}, {"MAX_QUEUE": "-1"}, {"BATCH_MAX": "many"}])
def test_an_invalid_worker_setting_names_the_variable_and_prints_no_secret(tiny_model_dir, bad):
    result = _start("from worker.app import create_app; create_app()", MODEL=str(tiny_model_dir), **bad)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "qwen-allinone worker: cannot start:" in output and next(iter(bad)) in output
    assert "Traceback" not in output
    _assert_no_secret(output)


@pytest.mark.parametrize("bad", [{"MAX_BODY_BYTES": "1"}, {"EVENTS_TIMEOUT_S": "0"}, {"API_KEY": "also-set"}])
def test_an_invalid_gateway_setting_names_the_variable_and_prints_no_key(bad):
    result = _start("from producer.api.app import create_app; create_app()", **bad)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "qwen-allinone gateway: cannot start:" in output
    assert "Traceback" not in output
    _assert_no_secret(output)


def test_a_settings_error_s_own_text_carries_no_value():
    """Code that prints the ValidationError itself (str(err)) leaks nothing either."""
    with pytest.raises(ValidationError) as raised:
        QueueSettings(redis_url=SECRETS["REDIS_URL"], broker_url="ftp://user:ftp-pw@host/")
    _assert_no_secret(str(raised.value) + settings_problems(raised.value))
    assert "ftp-pw" not in str(raised.value) + settings_problems(raised.value)
    assert "BROKER_URL" in settings_problems(raised.value)
