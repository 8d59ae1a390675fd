"""Built-in rewriting passes, one per module; importing this package registers them."""
from . import (
    early_exit,  # noqa: F401
    fuse,  # noqa: F401
    lazy_cache,  # noqa: F401
    prune,  # noqa: F401
    quantize,  # noqa: F401
    split,  # noqa: F401
)
