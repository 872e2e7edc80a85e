"""A guest: the VM's VMM and vCPU in one process. program.py is the boot program; calltable.py
the Guest service's calls (VcpuResume is how the HV or UV hands control back to the vCPU)."""
