"""Where the shared test material is (`../shared` beside the checkout), and what follows when it is absent."""

from __future__ import annotations

import os
from pathlib import Path

# NVLM_TEST_SHARED overrides where ../shared is looked for (point it at a missing folder to run
# the suite as a machine without the real metadata would).
SHARED = Path(os.environ.get("NVLM_TEST_SHARED") or Path(__file__).resolve().parents[1].parent / "shared")
REAL_72B = SHARED / "nvlm-d-72b"
TESTDATA_IMAGES = SHARED / "testdata" / "images"
HAS_REAL_TOKENIZER = (REAL_72B / "vocab.json").is_file()
# Without the real tokenizer the tiny checkpoints use the small demo tokenizer, which spends
# several times more tokens on the same text: token budgets in tests scale by this.
TOKEN_SCALE = 1 if HAS_REAL_TOKENIZER else 4
