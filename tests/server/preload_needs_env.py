"""Test-only preload module that imports only where ``TENSORLINE_TEST_PRELOAD_ENV`` is set.

The test server's environment has it, the sandbox launcher's minimal environment does not: so
the server imports this module and the launcher fails to, which it must report (logged) without
stopping the server (tests/server/test_preload.py).
"""

import os

if "TENSORLINE_TEST_PRELOAD_ENV" not in os.environ:
    raise ImportError("TENSORLINE_TEST_PRELOAD_ENV is not set in this process")
