"""The guest's core (no transport): program.py, the boot program (the VM's VMM and its vCPU:
CreateVm, the image, `sc 2` UV_ESM, waiting for the one resume, checking memory), and metrics.py.
It reaches the HV and the UV only through services/guest/ports.py."""
