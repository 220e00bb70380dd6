"""The interpreter settings imkit's own processes (twistd imkit, imkit send/listen) run with."""

from __future__ import annotations

import gc
import sys

from twisted.trial import unittest

from imkit.tuning import SWITCH_INTERVAL, YOUNG_THRESHOLD, tune_garbage_collector, tune_thread_switching


class TuningTests(unittest.SynchronousTestCase):
    def test_garbage_collector(self) -> None:
        """Start-up's objects are frozen out of the collector's sight; young collections are rarer."""
        threshold = gc.get_threshold()
        self.addCleanup(gc.set_threshold, *threshold)
        self.addCleanup(gc.unfreeze)
        tune_garbage_collector(collect=False)
        self.assertEqual(gc.get_threshold(), (YOUNG_THRESHOLD,) + threshold[1:])
        self.assertGreater(gc.get_freeze_count(), 0)

    def test_thread_switching(self) -> None:
        interval = sys.getswitchinterval()
        self.addCleanup(sys.setswitchinterval, interval)
        tune_thread_switching()
        self.assertAlmostEqual(sys.getswitchinterval(), SWITCH_INTERVAL)
