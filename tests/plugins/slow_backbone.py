"""A test plugin: the ``hvg`` baseline that logs each chunk it computes and can be held.

Loaded through SCDRUGMAP_PLUGINS, the same way a user's own backbone module would be, so
the crash tests kill a real ``scdrugmap extract`` process at a known point:

* ``SLOW_HVG_LOG``: a file that gets one line per chunk computed;
* ``SLOW_HVG_HOLD_AFTER=N`` with ``SLOW_HVG_GATE=DIR``: after N chunks (of all datasets) the encoder waits until
  ``DIR/go`` exists, so a test sees exactly N finished chunks (their ``done`` markers) and kills
  the process then; it waits on that event, not on a clock;
* ``SLOW_HVG_SECONDS``: a plain delay per chunk.
"""

import os
import time
from pathlib import Path

from scdrugmap.extract.backbones.hvg import PanelExpression
from scdrugmap.extract.registry import register


COMPUTED = [0]          # chunks computed by this process, over all datasets


@register
class SlowPanelExpression(PanelExpression):
    name = "slow-hvg"
    summary = "hvg that logs and can hold its chunks (tests only)"

    def encoder(self, source):
        inner = super().encoder(source)
        delay = float(os.environ.get("SLOW_HVG_SECONDS", "0"))
        log = os.environ.get("SLOW_HVG_LOG")
        hold_after = os.environ.get("SLOW_HVG_HOLD_AFTER")
        gate = Path(os.environ.get("SLOW_HVG_GATE", "."))
        def encode(block):
            if hold_after is not None and COMPUTED[0] >= int(hold_after):
                (gate / "holding").touch()
                while not (gate / "go").exists():
                    time.sleep(0.01)
            COMPUTED[0] += 1
            if log:
                with open(log, "a") as f:
                    f.write(f"{source.name}:{block.shape[0]}\n")
            time.sleep(delay)
            return inner(block)

        return encode
