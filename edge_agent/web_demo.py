"""`edge-agent demo --web`: the kiosk page in a browser, with a real cloud to take away.

Starts a cloud gateway and an agent on free local ports, as `edge-agent demo` does, prints the
kiosk page's address, and on each Enter stops or restarts the gateway, so that a provisional
answer can be watched turning into the cloud's. Ends on Ctrl-C or at the end of its input.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import TextIO

from edge_agent.demo import start_pair

__all__ = ["run_web_demo"]


def run_web_demo(lines: Iterable[str] = sys.stdin, out: TextIO = sys.stdout) -> int:
    def say(text: str) -> None:
        print(text, file=out, flush=True)

    pair = start_pair()
    try:
        page = f"http://127.0.0.1:{pair.agent.ports['rest']}/kiosk/"
        say(f"kiosk page: {page}")
        say(f"every answer escalated: {page}?escalation=always")
        say("Enter takes the cloud away, Enter again brings it back; Ctrl-C stops the demo.")
        cloud_up = True
        for _ in lines:
            if cloud_up:
                pair.stop_cloud()
                say("the cloud is gone: unsure answers are now provisional, and queued")
            else:
                pair.start_cloud()
                say("the cloud is back: queued answers are delivered to the page")
            cloud_up = not cloud_up
    except KeyboardInterrupt:
        pass
    finally:
        pair.stop()
    say("stopped")
    return 0
