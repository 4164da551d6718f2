"""Installation and hooks: ``attach`` puts NAG on a denoiser for a family; ``Attachment.detach`` removes it all.

``inputs`` extends a guided call's arguments per layout, ``blocks`` holds the hooks on the modules around
attention, ``attachment`` installs the wrappers and hooks and runs the denoiser-level hooks.
"""

from .attachment import Attachment, attach, unwrap_compiled
from .inputs import conditional_rows

__all__ = ["Attachment", "attach", "conditional_rows", "unwrap_compiled"]
