"""Unattended operation: the jobs file, schedules, runs, history, alerts.

``load_config(path)`` reads and validates a jobs file (``check_config`` returns every problem);
``Runner(config, state_dir).run([job...])`` runs jobs and returns their outcomes;
``Daemon(config_path, state_dir).run()`` runs them on their schedules; ``History(state_dir)``
is the run history. ``safehold.jobs.schedule`` parses schedules, ``safehold.jobs.notify`` sends
alerts, ``safehold.jobs.units`` writes systemd and cron units.
"""
