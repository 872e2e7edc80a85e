"""The Ultravisor service. Where a ucall is handled: calltable.py names the handler of each RPC;
handlers live in calls/<family>.py under the ucall's name in lower case (UV_PAGE_IN ->
calls/page.py:uv_page_in)."""
