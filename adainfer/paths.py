"""Where packaged resources live, so the CLI works with no arguments."""

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULT_MODEL_DIR = PACKAGE_DIR / "default_model" / "stories260K"
DATA_DIR = PACKAGE_DIR / "data"
DEFAULT_CALIB_DATA = DATA_DIR / "tinystories_calib.txt"
HELDOUT_TEXT = DATA_DIR / "tinystories_heldout.txt"
