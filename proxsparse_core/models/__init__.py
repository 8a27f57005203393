"""Loading causal LMs (bundled, hub id, local folder), placing them over devices and the memory
budget of a run."""
from proxsparse_core.models.loading import (BUNDLED, LoadedModel, allow_remote_code,  # noqa: E402,F401
                                            load_model, remote_code_allowed)
