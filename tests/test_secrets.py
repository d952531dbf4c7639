"""No secret in any message: an invalid setting stops a worker or the gateway with one line that names
the variable, never a password in a URL or an API key (issue: secrets in error output)."""

from __future__ import annotations

import base64
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


@pytest.mark.parametrize("bad", [{"MAX_BODY_BYTES": "1"}, {"EVENTS_TIMEOUT_S": "0"}, {"API_KEY": "also-set-and-long-enough"},
                                 {"API_KEYS": "acme=acme-key-789abcdef,globex=0123456"}])
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


SHORT_SECRET = "whsec_" + base64.b64encode(b"short-key-16byte").decode()  # 16 bytes, under the spec's 24


@pytest.mark.parametrize("setting, value, says", [
    ("API_KEY", "fifteen-chars-k", "API_KEY: Value error, must be at least 16 characters"),
    ("API_KEYS", "acme=acme-key-789abcdef,globex=short-key-15chr",
     "API_KEYS: Value error, entry 2's key must be at least 16 characters"),
    ("CALLBACK_SECRET", SHORT_SECRET, "CALLBACK_SECRET: Value error, must be whsec_ and the base64 of 24 to 64"),
])
def test_a_short_key_or_secret_is_refused_naming_the_setting_and_the_limit_never_the_value(monkeypatch, setting,
                                                                                           value, says):
    from producer.settings import ApiSettings

    for name in ("API_KEY", "API_KEYS", "CALLBACK_SECRET"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(setting, value)
    with pytest.raises(ValidationError) as raised:
        ApiSettings()
    output = settings_problems(raised.value)
    assert output.startswith(says), output
    for part in [value, *(part for part in value.replace("=", ",").split(",") if len(part) >= 8)]:
        assert part not in output + str(raised.value), part


def test_keys_of_the_minimum_length_are_taken():
    from producer.settings import MIN_KEY_CHARS, ApiSettings, tenant_keys

    assert MIN_KEY_CHARS == 16
    assert ApiSettings(api_key="k" * 16).api_key.get_secret_value() == "k" * 16
    settings = ApiSettings(api_keys=f"acme={'a' * 16},globex={'g' * 40}")
    assert tenant_keys(settings.api_keys) == {"a" * 16: "acme", "g" * 40: "globex"}
