"""rmtorch: train and serve reward models for RLHF in plain PyTorch."""

import logging

# bitsandbytes warns on import that it cannot fetch an optional CPU kernel from the hub; rmtorch runs
# offline and the fallback kernel is fine, so the warning is noise users cannot act on.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

__version__ = "0.1.0"
