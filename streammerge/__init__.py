"""streammerge: memory-bounded, out-of-core streaming merge of large safetensors checkpoints.

``out = target + alpha * (grpo - sft)`` tensor by tensor and chunk by chunk, on the CPU or a CUDA GPU, with the same
output bytes on every device; several alphas in one pass (:func:`sweep`) and many vectors (:func:`combine`).
"""

from .api import (
    MergeReport,
    apply,
    apply_sweep,
    combine,
    extract,
    finalize,
    merge,
    plan,
    plan_combine,
    sweep,
    sweep_dirname,
)
from .errors import (
    CheckpointError,
    DistributedError,
    EngineError,
    HeaderError,
    OptionsError,
    OutputError,
    StreamMergeError,
    TensorMismatchError,
)
from .options import MergeOptions
from .spec import Spec, VectorSpec, load_spec
from .verify import VerifyReport, verify
from .version import __version__

__all__ = [
    "CheckpointError",
    "DistributedError",
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
    "finalize",
    "load_spec",
    "merge",
    "plan",
    "plan_combine",
    "sweep",
    "sweep_dirname",
    "verify",
]
