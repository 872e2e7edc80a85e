"""The guest core's ports over a transport: grpc.py (what ships); in one process, services/local.py."""
