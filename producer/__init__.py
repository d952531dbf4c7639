"""qwen-allinone producer: the light client and the job protocol (no torch here)."""

from producer.client import Client
from jobqueue.errors import (
    AlreadyFinal,
    BrokerUnavailable,
    InvalidRequest,
    JobNotFound,
    ProducerError,
    QueueFull,
    WaitTimeout,
)
from jobqueue.protocol import JobRecord, JobStatus

__all__ = [
    "AlreadyFinal",
    "BrokerUnavailable",
    "Client",
    "InvalidRequest",
    "JobNotFound",
    "JobRecord",
    "JobStatus",
    "ProducerError",
    "QueueFull",
    "WaitTimeout",
]
