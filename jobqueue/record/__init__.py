"""The job record's one writer (issue 33): no other module writes its key
(``tests/test_record_owner.py`` checks the source, and every write under MONITOR).

- ``writes``: ``put`` (an open record, or a final one with all its bookkeeping in one
  step), ``put_final`` inside a caller's transaction (a cancel), ``delete``, and the keys
  a submit script hands to the Lua pieces;
- ``lua``: those pieces (``NEW_RECORD_LUA``: a new record's first write and its take-back)
  and the final write (``FINAL_SCRIPT``).

What a record's fields mean, and the transitions that change them in memory
(``JobRecord.start``, ``finish``, ...), are in ``jobqueue.protocol``.
"""
