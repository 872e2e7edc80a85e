"""The Ultravisor service. Where a ucall is handled: calltable.py names the handler of each RPC;
handlers live in core/<family>.py under the ucall's name in lower case (UV_PAGE_IN ->
core/page.py:uv_page_in; UV_ESM -> core/svm.py:uv_esm, its ESM context core/esm.py). core/ is the
protocol (no grpc), ports.py what it calls out through, adapters/grpc.py and server.py the
process around it."""
