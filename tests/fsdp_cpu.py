"""`python -m dreambooth`, with accelerate's gate on FSDP for CPU processes lifted (tests/test_fsdp.py).

accelerate 1.16 sets ``DistributedType.FSDP`` only in ``AcceleratorState.__init__``'s branch for
accelerator devices (MULTI_GPU, MULTI_NPU, ...); on CPU processes (MULTI_CPU, gloo) it drops the
plugin. PyTorch's ``fully_shard`` itself runs on CPU over gloo, and so does the rest of
accelerate's FSDP2 path (prepare, backward, clip_grad_norm_, the state dicts). This launcher
sets what that branch sets (the distributed type and the plugin) and then runs the CLI unchanged,
so the test trains through exactly the code a GPU run does.
"""

import sys

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

_init = AcceleratorState.__init__


def _init_with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP


AcceleratorState.__init__ = _init_with_fsdp_on_cpu

if __name__ == "__main__":
    from dreambooth.cli import main

    sys.exit(main())
