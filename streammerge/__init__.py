"""streammerge: memory-bounded, out-of-core streaming merge of large safetensors checkpoints.

``out = target + alpha * (grpo - sft)`` tensor by tensor and chunk by chunk, on the CPU or a CUDA GPU, with the same
output bytes on every device.
"""

__version__ = "0.1.0"

from .api import MergeReport, apply, extract, merge, plan  # noqa: E402
from .errors import (  # noqa: E402
    CheckpointError,
    EngineError,
    HeaderError,
    OptionsError,
    OutputError,
    StreamMergeError,
    TensorMismatchError,
)
from .options import MergeOptions  # noqa: E402
from .verify import VerifyReport, verify  # noqa: E402

__all__ = [
    "CheckpointError",
    "EngineError",
    "HeaderError",
    "MergeOptions",
    "MergeReport",
    "OptionsError",
    "OutputError",
    "StreamMergeError",
    "TensorMismatchError",
    "VerifyReport",
    "__version__",
    "apply",
    "extract",
    "merge",
    "plan",
    "verify",
]
