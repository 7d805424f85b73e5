"""Unattended operation: the jobs file, schedules, runs, history, alerts."""
