"""verl is installed with --no-deps into ``<venv>/verl-nodeps`` (its metadata pins transformers<5.11, which
would break the venv's resolver state; see duca_fast/integrations/INSTALL.txt). Make it importable here."""

import os
import sys
from pathlib import Path

VERL_DIR = Path(os.environ.get("DUCA_VERL_DIR", Path(sys.prefix) / "verl-nodeps"))
if VERL_DIR.is_dir() and str(VERL_DIR) not in sys.path:
    # Appended, never prepended: nothing in that folder may shadow the project or the venv.
    sys.path.append(str(VERL_DIR))
