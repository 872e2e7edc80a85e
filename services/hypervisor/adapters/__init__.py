"""The HV core's ports implemented over a transport: grpc.py (what ships). The in-process one,
which needs the UV core too, is pefsim/local.py."""
