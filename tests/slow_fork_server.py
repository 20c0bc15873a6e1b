"""Imported first by the fork server of the stop tests in tests/test_cli_edges.py (they put it at the head of
lorabench.runner.worker.PRELOAD): it makes the fork server's start last as long as torch's import does on a
loaded core (minutes), so that a stop lands, every time, while a trial has been asked of a fork server that has
not yet forked it. Not a test module: pytest collects test_*.py only."""
import os
import time

time.sleep(float(os.environ.get("LORABENCH_TEST_FORK_SERVER_SLEEP_S", "600")))
