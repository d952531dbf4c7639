import worker.tasks  # noqa
