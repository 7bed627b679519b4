"""Rebuild the bundled `kjv` corpus (llmbuild/data/corpus/) from Debian's bible-kjv-text.

    apt-get install bible-kjv        # the `bible` program + bible-kjv-text 4.38
    python benchmarks/quantization/make_corpus.py llmbuild/data/corpus

Every chapter of the listed books is printed with `bible -f`, verse references are
dropped, a chapter's verses become one paragraph and chapters are separated by a blank
line. The calibration and evaluation splits are different books. gzip with mtime 0, so
the files are reproducible.
"""

import gzip
import re
import subprocess
import sys
from pathlib import Path

BOOKS = {  # split: [(book, chapters)]
    "calibration": [("Genesis", 50), ("Exodus", 40), ("Joshua", 24), ("Judges", 21), ("Ruth", 4)],
    "evaluation": [("Luke", 24), ("Acts", 28)],
}


def chapter_text(book: str, chapter: int) -> str:
    out = subprocess.run(["bible", "-f", f"{book}{chapter}:1-200"], capture_output=True, text=True,
                         check=True).stdout
    verses = []
    for line in out.splitlines():
        m = re.match(r"^\S+?\d+:\d+ (.*)$", line)
        if m:
            verses.append(m.group(1).strip())
        elif line.strip() and verses:
            verses[-1] += " " + line.strip()
    return " ".join(verses)


def main(dst: Path) -> None:
    for split, books in BOOKS.items():
        parts = []
        for book, chapters in books:
            for chapter in range(1, chapters + 1):
                text = chapter_text(book, chapter)
                assert text, (book, chapter)
                parts.append(text)
        text = "\n\n".join(parts) + "\n"
        with gzip.GzipFile(dst / f"kjv-{split}.txt.gz", "wb", mtime=0) as f:
            f.write(text.encode())
        print(split, len(text), "chars")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
