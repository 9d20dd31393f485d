"""Events: the agent's numbered event log (``log``), OOM kill notices (``oom``) and the
container manager's hooks that feed it (``containers``). Served by ``services.telemetry``."""
