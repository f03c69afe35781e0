"""Engines that run a study's tasks: ``local`` (reused worker processes) and ``ray`` (Ray Tune trials)."""
