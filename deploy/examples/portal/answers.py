"""Print what each portal replica answers: reads `berth service ps portal -o json` on stdin.

Used by `make demo`; plain standard library so it runs anywhere the venv does.
"""

from __future__ import annotations

import json
import sys
import urllib.request

opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
for task in json.load(sys.stdin):
    address = task.get("address")
    if not address:
        print(f"  {task['id']:<22} {task['state']:<9} (no published address) {task.get('reason', '')}")
        continue
    try:
        with opener.open(f"http://{address}/whoami", timeout=3) as response:
            answer = response.read().decode().strip()
    except OSError as exc:
        answer = f"no answer ({exc})"
    print(f"  http://{address:<21} -> {answer}")
