"""The Hypervisor service. Where a call is handled: calltable.py names the handler of each RPC;
hcalls live in hcalls/<family>.py under the hcall's name in lower case (H_SVM_INIT_ABORT ->
hcalls/svm.py:h_svm_init_abort), the QEMU/KVM control surface in control/."""
