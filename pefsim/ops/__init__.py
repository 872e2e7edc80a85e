"""Operator tools around the services (no protocol logic): the CLI (cli.py), the local stack of
service processes (stack.py), the life-cycle demo (demo.py), the bench (bench.py), the
Prometheus/Grafana helpers (observability.py) and the gRPC health probe (health.py)."""
