"""Unattended operation: the jobs file, schedules, runs, history, alerts.

``load_config(path)`` reads and validates a jobs file (``check_config`` returns every problem);
``Runner(config, state_dir).run([job...])`` runs jobs and returns their outcomes;
``Daemon(config_path, state_dir).run()`` runs them on their schedules; ``History(state_dir)``
is the run history. ``safehold.jobs.schedule`` parses schedules, ``safehold.jobs.notify`` sends
alerts, ``safehold.jobs.units`` writes systemd and cron units.
"""

from typing import Any

__all__ = ["Daemon", "History", "Runner", "check_config", "load_config"]


def __getattr__(name: str) -> Any:
    """The names above, imported when first used (the runner loads apprise, which the other
    commands of the CLI do not need)."""
    if name in ("load_config", "check_config"):
        from safehold.jobs import config

        return getattr(config, name)
    if name == "Runner":
        from safehold.jobs.runner import Runner

        return Runner
    if name == "Daemon":
        from safehold.jobs.daemon import Daemon

        return Daemon
    if name == "History":
        from safehold.jobs.history import History

        return History
    raise AttributeError(f"module 'safehold.jobs' has no attribute {name!r}")
