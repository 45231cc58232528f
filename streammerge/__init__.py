"""streammerge: memory-bounded, out-of-core streaming merge of large safetensors checkpoints.

``out = target + alpha * (grpo - sft)`` tensor by tensor and chunk by chunk, on the CPU or a CUDA GPU, with the same
output bytes on every device; several alphas in one pass (:func:`sweep`) and many vectors (:func:`combine`).
"""

from .api import MergeReport, apply, apply_sweep, combine, extract, merge, plan, plan_combine, sweep, sweep_dirname  # noqa: E402
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
from .spec import Spec, VectorSpec, load_spec  # noqa: E402
from .verify import VerifyReport, verify  # noqa: E402
from .version import __version__

__all__ = [
    "CheckpointError",
    "EngineError",
    "HeaderError",
    "MergeOptions",
    "MergeReport",
    "OptionsError",
    "OutputError",
    "Spec",
    "StreamMergeError",
    "TensorMismatchError",
    "VectorSpec",
    "VerifyReport",
    "__version__",
    "apply",
    "apply_sweep",
    "combine",
    "extract",
    "load_spec",
    "merge",
    "plan",
    "plan_combine",
    "sweep",
    "sweep_dirname",
    "verify",
]
