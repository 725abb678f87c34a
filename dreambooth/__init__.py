"""dreambooth: teach a Stable Diffusion model one new subject from a handful of photos."""

import logging as _logging

__version__ = "0.1.0"

# diffusers imports torchao (the `quantize` extra: train.quantize_base=int8) whenever it is
# installed, and that import has four things to say on every command, none of them ours to act
# on: torchao's CUDA kernels do not load on a CPU-only torch, torch deprecates how torchao
# registers its enums, and diffusers misses torchao tensor types that torchao 0.18 dropped.
for _name in ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)
