"""The Hypervisor service. Where a call is handled: calltable.py names the handler of each RPC;
handlers live in core/<family>.py under the call's name in lower case (H_SVM_INIT_ABORT ->
core/svm.py:h_svm_init_abort, its journalled work core/abort.py; CreateVm -> core/vms.py:create_vm).
core/ is the protocol (no grpc), ports.py what it calls out through, adapters/grpc.py and
server.py the process around it."""
