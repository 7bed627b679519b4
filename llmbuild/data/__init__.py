"""Data files shipped inside the package (the `kjv` text corpus: corpus/README.md)."""
