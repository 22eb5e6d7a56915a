"""Read model checkpoints into numpy arrays without PyTorch and without running code from the file:
``readers`` (the formats), ``torch_pickle`` (the restricted unpickler) and ``storage_views`` (tensor data as
views of the mapped file). Private names stay inside the package."""
from models.checkpoint_io.readers import (
                                          PADDLE_EXTENSIONS,
                                          SAFETENSORS_EXTENSIONS,
                                          SUPPORTED_EXTENSIONS,
                                          TORCH_EXTENSIONS,
                                          read_checkpoint,
)

__all__ = ['PADDLE_EXTENSIONS', 'SAFETENSORS_EXTENSIONS', 'SUPPORTED_EXTENSIONS', 'TORCH_EXTENSIONS', 'read_checkpoint']
