"""The job record key is written by one module only: ``jobqueue/record/`` (issue 33).

Two checks. A static one reads every project module: outside the owner, the record's key
(``keys.job_key``) may be named only as the argument of a read (GET, MGET, ...), so no other
code can hand it to a write, a pipeline or a Lua script, and no module but ``jobqueue/keys.py``
spells the key itself. A dynamic one runs a submit, a cancel of a queued job, a cancel of a
running one, a running write, a partial reply and a final write against a real Redis under
MONITOR, and checks that every command that wrote the record key came from the owner: inside a
Lua script, from a piece of the owner's Lua (``record.lua.OWNER_PIECES``); outside one, from a
call made in the owner's own code.
"""

from __future__ import annotations

import ast
import re
import sys
import threading
import time
import traceback
from pathlib import Path

import pytest
import redis

ROOT = Path(__file__).resolve().parents[1]
#: The owner of the record's writes.
OWNER = "jobqueue/record/"
#: The module that builds every key's name (``job_key`` is defined there).
KEYS_MODULE = "jobqueue/keys.py"
#: redis-py calls that only read the key they are given.
READS = {"get", "mget", "exists", "ttl", "pttl", "type", "strlen", "watch"}
#: Redis commands that change a string key (the record is one JSON string).
WRITES = {"SET", "SETEX", "PSETEX", "SETNX", "GETSET", "GETDEL", "GETEX", "DEL", "UNLINK", "EXPIRE",
          "PEXPIRE", "EXPIREAT", "PEXPIREAT", "PERSIST", "APPEND", "SETRANGE", "RENAME", "RENAMENX",
          "MSET", "MSETNX", "COPY", "RESTORE", "MOVE", "HSET", "HDEL", "INCR", "INCRBY", "DECR"}


def _project_sources() -> dict[str, str]:
    return {str(path.relative_to(ROOT)): path.read_text(encoding="utf-8")
            for top in ("jobqueue", "producer", "worker") for path in sorted((ROOT / top).rglob("*.py"))}


def record_key_offences(path: str, source: str) -> list[str]:
    """Where ``source`` (the module at ``path``) could write the record key outside the owner."""
    if path.startswith(OWNER):
        return []
    tree = ast.parse(source)
    # The key function as this module imported it (a parameter of another meaning may share its name).
    names = {alias.asname or alias.name for node in ast.walk(tree)
             if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("jobqueue")
             for alias in node.names if alias.name == "job_key"}
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    offences = []
    for node in ast.walk(tree):
        if path != KEYS_MODULE and _spells_the_key(node, parents):
            offences.append(f"{path}:{node.lineno}: spells the record key ({node.value!r})")
        named = (isinstance(node, ast.Name) and node.id in names) or \
            (isinstance(node, ast.Attribute) and node.attr == "job_key")
        if named and not isinstance(parents.get(node), ast.ImportFrom) and not _inside_a_read(node, parents):
            where = ast.unparse(parents[node])
            offences.append(f"{path}:{node.lineno}: the record key outside a read ({where})")
    return offences


def _spells_the_key(node: ast.AST, parents: dict) -> bool:
    """A string (not a docstring) that is the record key's name or its ``:job:`` part of an f-string."""
    if not (isinstance(node, ast.Constant) and isinstance(node.value, str)):
        return False
    if isinstance(parents.get(node), ast.Expr):
        return False
    return node.value == ":job:" or "qwen-allinone:job:" in node.value


def _inside_a_read(node: ast.AST, parents: dict) -> bool:
    """Whether ``node`` is called as ``job_key(...)`` and that call is (in) a read call's argument."""
    call = parents.get(node)
    if not (isinstance(call, ast.Call) and call.func is node):
        return False
    seen = call
    while (parent := parents.get(seen)) is not None:
        if isinstance(parent, ast.Call) and seen is not parent.func:
            return isinstance(parent.func, ast.Attribute) and parent.func.attr in READS
        if not isinstance(parent, (ast.List, ast.Tuple, ast.ListComp, ast.GeneratorExp, ast.comprehension)):
            return False
        seen = parent
    return False


def test_only_the_record_module_writes_the_record_key():
    offences = [line for path, source in _project_sources().items()
                for line in record_key_offences(path, source)]
    assert not offences, "\n".join(offences)


def test_the_static_check_finds_a_write_outside_the_owner():
    """The check is not vacuous: the kinds of writes the tree had before the owner module are found."""
    before = '''
from jobqueue.protocol import job_key
def put(pipe, record):
    key = job_key(record.job_id)
    pipe.set(key, record.to_json())
def admit(client, record):
    keys = [job_key(record.job_id), "open"]
    client.eval("redis.call('SET', KEYS[1], ARGV[1])", len(keys), *keys)
def read(client, job_id):
    return client.get(job_key(job_id)), client.mget([job_key(j) for j in [job_id]])
'''
    found = record_key_offences("jobqueue/store.py", before)
    assert [line.split(":")[1] for line in found] == ["4", "7"], found
    assert record_key_offences(OWNER + "writes.py", before) == []
    assert record_key_offences("producer/x.py", "KEY = 'qwen-allinone:job:' + job_id")


# --- dynamic: every write of the record key under MONITOR -------------------------------------


class _Monitor:
    """Every command Redis runs on ``db`` while it runs, from a thread of its own (MONITOR)."""

    def __init__(self, url: str, db: int):
        self.client = redis.Redis.from_url(url)
        self.db, self.commands, self._stop = db, [], threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self):
        self._thread.start()
        assert self._ready.wait(5)
        return self

    def _watch(self) -> None:
        # MONITOR's lines are read raw: redis-py's parser joins the words, and scripts hold spaces.
        with self.client.monitor() as monitor:
            self._ready.set()
            while True:
                line = monitor.connection.read_response().decode("ascii", "replace")
                db, source, rest = re.match(r"^[\d.]+ \[(\d+) ([^\]]*)\] (.*)$", line, re.S).groups()
                words = _words(rest)
                if int(db) == self.db:
                    self.commands.append((source == "lua", words))
                if self._stop.is_set() and words[-1:] == ["monitor-end"]:
                    return

    def __exit__(self, *exc):
        self._stop.set()
        self.client.echo("monitor-end")
        self._thread.join(5)
        self.client.close()


class _Callers:
    """For every redis-py command whose arguments name a record (a key starting with ``prefix``):
    which project file sent it."""

    def __init__(self, prefix: str):
        self.prefix, self.seen = prefix, []

    def __enter__(self):
        self._patched = [(redis.Redis, "execute_command"),
                         (redis.client.Pipeline, "pipeline_execute_command")]
        self._originals = [getattr(cls, name) for cls, name in self._patched]
        for (cls, name), original in zip(self._patched, self._originals):
            setattr(cls, name, self._wrap(original))
        return self

    def _wrap(self, original):
        def send(instance, *args, **options):
            if any(str(arg).startswith(self.prefix) for arg in args[1:]):
                self.seen.append((str(args[0]).upper(), _project_caller()))
            return original(instance, *args, **options)
        return send

    def __exit__(self, *exc):
        for (cls, name), original in zip(self._patched, self._originals):
            setattr(cls, name, original)


def _project_caller() -> str:
    """The innermost project module on the stack (the one that called redis-py)."""
    for frame in reversed(traceback.extract_stack()):
        path = Path(frame.filename)
        if ROOT in path.parents and path.parts[len(ROOT.parts)] in ("jobqueue", "producer", "worker"):
            return str(path.relative_to(ROOT))
    return "?"


def _record_writes(commands: list[tuple[bool, list[str]]], prefix: str) -> list[tuple[str, str | None, int]]:
    """(command, the script it ran in or None, the written key's place in that script's KEYS) for
    each command that wrote a record (a key starting with ``prefix``). MONITOR shows a script's
    EVAL before the commands it runs."""
    writes, script, script_keys = [], None, []
    for in_lua, words in commands:
        name = words[0].upper()
        if not in_lua:
            is_script = name in ("EVAL", "EVALSHA")
            script = words[1] if is_script else None
            script_keys = words[3:3 + int(words[2])] if is_script else []
        written = [word for word in words[1:] if word.startswith(prefix)]
        if name in WRITES and written:
            place = script_keys.index(written[0]) + 1 if in_lua and written[0] in script_keys else 0
            writes.append((name, script if in_lua else None, place))
    return writes


def _written_outside(script: str, pieces: tuple[str, ...], place: int) -> bool:
    """Whether ``script``, less the owner's pieces, writes its ``place``-th key itself."""
    for piece in pieces:
        script = script.replace(piece, "")
    commands = "|".join(WRITES)
    return bool(re.search(rf"redis\.call\(\s*'(?:{commands})'\s*,\s*KEYS\[{place}\]", script, re.IGNORECASE))


def _words(line: str) -> list[str]:
    """MONITOR's quoted words, unescaped enough to compare keys and scripts."""
    quoted = re.findall(r'"((?:[^"\\]|\\.)*)"', line)
    return [bytes(word, "latin-1").decode("unicode_escape") for word in quoted]


@pytest.fixture
def record_redis(redis_url):
    """A client on the test Redis (its database was flushed when the session began)."""
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"], indirect=True, scope="module")
def test_every_write_of_the_record_key_comes_from_the_owner(redis_url, record_redis, make_client, broker):
    """A submit, one refused (the queue is full), a cancel of a queued job, a running write, a
    partial reply, a cancel of the running job and its final write: every record write the owner's."""
    from jobqueue import cancel
    from jobqueue.errors import QueueFull
    from jobqueue.outcome import save_final
    from jobqueue.protocol import job_key

    db = record_redis.connection_pool.connection_kwargs.get("db", 0)
    client = make_client(max_queue=3)
    queued, running = client.submit("留下", priority="bulk"), client.submit("运行")
    with _Monitor(redis_url, db) as monitor, _Callers(job_key("")) as callers:
        client.submit("新的")
        with pytest.raises(QueueFull):
            client.submit("满了")
        client.cancel(queued)
        record = client.store.get(running)
        record.start(time.time())
        client.store.put(record)
        record.reply = "部分"
        client.store.put(record)
        client.cancel(running)
        save_final(client.store, cancel.stopped(record))
    writes = _record_writes(monitor.commands, job_key(""))
    # The new record, two cancelled finals (queued, running), the running write and the partial
    # reply; on RabbitMQ the refused job's record is written, then taken back (DEL).
    expected = ["SET"] * 5 + (["DEL", "SET"] if broker == "rabbitmq" else [])
    assert sorted(command for command, _, _ in writes) == sorted(expected), writes
    assert _not_the_owners(writes, callers.seen) == []


def test_the_dynamic_check_finds_a_write_outside_the_owner(redis_url, record_redis):
    """A SET of the record key from a script of another module, and one sent by code outside the
    owner (here, this test), are both found."""
    from jobqueue.protocol import job_key

    db = record_redis.connection_pool.connection_kwargs.get("db", 0)
    key = job_key("not-a-job")
    with _Monitor(redis_url, db) as monitor, _Callers(job_key("")) as callers:
        record_redis.eval("redis.call('SET', KEYS[1], ARGV[1])", 1, key, "{}")
        record_redis.set(key, "{}", ex=5)
    record_redis.delete(key)
    found = _not_the_owners(_record_writes(monitor.commands, job_key("")), callers.seen)
    assert found == ["SET from a script not the owner's", "SET outside the owner's Lua",
                     "SET sent by ?"], found


def _not_the_owners(writes, seen) -> list[str]:
    """The record writes that did not come from the owner: a script without its pieces, or that
    writes the key itself; a plain command sent by other code (or one that went around redis-py)."""
    from jobqueue.record.lua import OWNER_PIECES as pieces

    found = [f"{command} from a script not the owner's" for command, script, _ in writes
             if script is not None and not any(piece in script for piece in pieces)]
    found += [f"{command} outside the owner's Lua" for command, script, place in writes
              if script is not None and _written_outside(script, pieces, place)]
    plain = [command for command, script, _ in writes if script is None]
    sent = [(command, caller) for command, caller in seen if command in WRITES]
    if len(plain) != len(sent):
        found.append(f"{len(plain)} plain writes seen by Redis, {len(sent)} sent through redis-py")
    found += [f"{command} sent by {caller}" for command, caller in sent if not caller.startswith(OWNER)]
    return found


if __name__ == "__main__":  # python tests/test_record_owner.py FILE...: the static check on other files
    for name in sys.argv[1:]:
        print("\n".join(record_key_offences(name, Path(name).read_text())) or f"{name}: clean")
