"""A test plugin: the ``hvg`` baseline, slowed down, logging each chunk it computes.

Loaded through SCDRUGMAP_PLUGINS, the same way a user's own backbone module would be, so
the crash-resume test kills a real ``scdrugmap extract`` process mid-run.
"""

import os
import time

from scdrugmap.extract.backbones.hvg import PanelExpression
from scdrugmap.extract.registry import register


@register
class SlowPanelExpression(PanelExpression):
    name = "slow-hvg"
    summary = "hvg with a delay per chunk (tests only)"

    def encoder(self, source):
        inner = super().encoder(source)
        delay = float(os.environ.get("SLOW_HVG_SECONDS", "0"))
        log = os.environ.get("SLOW_HVG_LOG")

        def encode(block):
            if log:
                with open(log, "a") as f:
                    f.write(f"{source.name}:{block.shape[0]}\n")
            time.sleep(delay)
            return inner(block)

        return encode
