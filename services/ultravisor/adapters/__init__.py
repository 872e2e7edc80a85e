"""The UV core's port implemented over a transport: grpc.py (what ships). The in-process one,
which needs the HV core too, is pefsim/local.py."""
