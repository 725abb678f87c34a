"""A stand-in for torchvision, for benchmarks/reference.py only: torchvision cannot be installed
beside this project's CPU torch, and diffusers' train_dreambooth.py imports nothing of it but the
four image transforms in ``transforms``. benchmarks/reference_shim/run_reference.py puts it on the path."""
