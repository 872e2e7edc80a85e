"""A guest: the VM's VMM and vCPU in one process. core/program.py is the boot program (no
transport; it calls the HV and UV through ports.py); calltable.py the Guest service's calls
(VcpuResume is how the HV or UV hands control back to the vCPU); adapters/grpc.py and server.py
the process around it."""
