"""Test-only module named in ``TENSORLINE_PRELOAD_MODULES`` (tests/server/test_preload.py).

Nothing else imports it, so its presence in a process's ``sys.modules`` shows that the process
(the server, or a sandbox worker forked by the preloading launcher) imported it at start.
"""

IMPORTED = True
