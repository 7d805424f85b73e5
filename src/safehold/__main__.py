from safehold.cli.main import run

run()
