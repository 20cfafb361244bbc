"""attnopt: torch.compile passes that make attention and linear layers fast without touching model code.

    model = torch.compile(model, backend="attnopt", options={"attention": {"quant": "int8"}})
    report = attnopt.inspect(model, *example_inputs)
"""

from .version import __version__

from . import logs as _logs  # noqa: E402
from .config import ConfigError, default_options, normalize_options  # noqa: E402
from .ops import attention as _attention_op  # noqa: E402,F401  (registers torch.ops.attnopt.attention)
from .ops import attention_train as _attention_train_op  # noqa: E402,F401  (attention_train, attention_backward)
from .ops import probe as _probe_op  # noqa: E402,F401
from .ops import sparse as _sparse_op  # noqa: E402,F401
from .ops import sparse_train as _sparse_train_op  # noqa: E402,F401  (trainable sparse attention)
from .ops import linear as _linear_op  # noqa: E402,F401
from .ops import linear_train as _linear_train_op  # noqa: E402,F401
from .ops import norm_train as _norm_train_op  # noqa: E402,F401
from .ops.attention import attention  # noqa: E402
from .compiler import AttnoptBackend, backend  # noqa: E402
from .inspection.run import inspect  # noqa: E402
from .calibration import calibrate  # noqa: E402
from .plan import Plan  # noqa: E402
from .report import Report, SiteRecord  # noqa: E402
from .schedule import step  # noqa: E402

_logs.register()

__all__ = [
    "attention", "backend", "calibrate", "inspect", "AttnoptBackend", "ConfigError", "Plan", "Report", "SiteRecord",
    "default_options", "normalize_options", "step", "__version__",
]
