"""cmrp — Customized Multimodal Role-Play.

Importing `cmrp` is cheap: heavy libraries (lightning, transformers, mlflow, ...) are imported
only inside the functions that need them.
"""

from cmrp.errors import CmrpError, ConfigError, DataError, WeightsError

__version__ = "0.1.0"
__all__ = ["CmrpError", "ConfigError", "DataError", "WeightsError", "__version__"]
