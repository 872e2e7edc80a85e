"""The HV's protocol core: no transport. It reaches the UV and the guests' vCPUs only through the
ports of services/hypervisor/ports.py; services/hypervisor/server.py wires it to gRPC, and
pefsim/local.py wires it to a UV core in the same process. No module here imports grpc
(tests/unit/test_layers.py).

    hypervisor.py  Hypervisor: state, ports, call table; recovery, the UV monitor, the watchdog
    svm.py         H_SVM_INIT_START, H_SVM_INIT_DONE, H_SVM_INIT_ABORT
    abort.py       the abort as a journalled task a restarted HV finishes
    pages.py       H_SVM_PAGE_IN, H_SVM_PAGE_OUT, HSvmPageInBulk; secure page-outs
    bulk.py        pages to and from the UV in batches (the bulk streams)
    uv.py          the HV's verbs on the UV: register/unregister a memslot, terminate
    vms.py         the VMM's control surface: CreateVm ... SetMemslot, VmSession, HvStatus
    memory.py      VcpuLoad/VcpuStore, HostReadPage, HostUnmapPage
    state.py       VMs, memslots, GFN states, guest RAM and their durable files
    metrics.py     the HV's Prometheus series
"""
