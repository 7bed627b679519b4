"""Extract KJV books from Debian's bible-kjv-text (via `bible -f`) into plain paragraphs."""
import gzip, re, subprocess, sys
from pathlib import Path

BOOKS = {  # book: (chapters)
    "calibration": [("Genesis", 50), ("Exodus", 40), ("Joshua", 24), ("Judges", 21), ("Ruth", 4)],
    "evaluation": [("Luke", 24), ("Acts", 28)],
}
def chapter_text(book, ch):
    out = subprocess.run(["bible", "-f", f"{book}{ch}:1-200"], capture_output=True, text=True, check=True).stdout
    verses = []
    for line in out.splitlines():
        m = re.match(r"^\S+?\d+:\d+ (.*)$", line)
        if m:
            verses.append(m.group(1).strip())
        elif line.strip() and verses:
            verses[-1] += " " + line.strip()
    return " ".join(verses)
dst = Path(sys.argv[1])
for split, books in BOOKS.items():
    parts = []
    for book, chapters in books:
        for ch in range(1, chapters + 1):
            t = chapter_text(book, ch)
            assert t, (book, ch)
            parts.append(t)
    text = "\n\n".join(parts) + "\n"
    with gzip.GzipFile(dst / f"kjv-{split}.txt.gz", "wb", mtime=0) as f:
        f.write(text.encode())
    print(split, len(text), "chars")
