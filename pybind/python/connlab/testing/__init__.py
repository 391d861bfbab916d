"""Ready-made tests: `pytest --pyargs connlab.testing --connlab-target HOST:PORT [--connlab-pid PID]`
runs the lifecycle matrix against any server."""
