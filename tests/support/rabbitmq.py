"""The suite's own RabbitMQ vhost: made with rabbitmqctl, and only it deleted afterwards."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from dataclasses import dataclass

import pytest
from kombu import Connection

from jobqueue.protocol import QUEUE_NAME


def _unavailable(reason: str) -> None:
    """Skip the RabbitMQ tests with the reason; CI (REQUIRE_RABBITMQ=1) fails instead."""
    if os.environ.get("REQUIRE_RABBITMQ") == "1":
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


@dataclass
class TestVhost:
    host: str
    name: str

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@{self.host}/{self.name}"

    @classmethod
    def create(cls, host: str) -> TestVhost:
        address, _, port = host.partition(":")
        try:
            socket.create_connection((address, int(port or 5672)), timeout=2).close()
        except OSError as err:
            _unavailable(f"no RabbitMQ answers at {host}: {err}")
        if shutil.which("rabbitmqctl") is None:
            _unavailable("rabbitmqctl is not installed: the suite cannot make a vhost of its own")
        vhost = cls(host, f"qwen-allinone-test-{os.getpid()}")
        try:
            _rabbitmqctl("add_vhost", vhost.name)
            _rabbitmqctl("set_permissions", "-p", vhost.name, "guest", ".*", ".*", ".*")
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as err:
            _unavailable(f"rabbitmqctl could not make vhost {vhost.name}: {getattr(err, 'stderr', err)!r}")
        return vhost

    def delete(self) -> None:
        subprocess.run(["rabbitmqctl", "-q", "delete_vhost", self.name], capture_output=True, timeout=60)


def delete_job_queue(url: str) -> None:
    """Delete the job queue (and its messages) in the vhost of ``url``, if it exists."""
    with Connection(url) as connection:
        channel = connection.channel()
        channel.queue_delete(QUEUE_NAME)
        channel.close()


def queue_depth(url: str) -> int:
    """Messages ready in the job queue (0 when it does not exist)."""
    with Connection(url) as connection:
        channel = connection.channel()
        try:
            return channel.queue_declare(QUEUE_NAME, passive=True).message_count
        except connection.channel_errors:
            return 0
