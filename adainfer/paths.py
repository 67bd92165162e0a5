"""Where packaged resources live, so the CLI works with no arguments."""

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULT_MODEL_DIR = PACKAGE_DIR / "default_model" / "stories260K"
