"""Files that ship inside the package: the CLIP tokenizer, the shapes model, the demo scenes."""

from pathlib import Path

ASSETS = Path(__file__).resolve().parent
