"""Real English text for the offline demo: Wikipedia articles from the enwiki excerpt in gensim's wheel on PyPI.

The wheel is downloaded with ``pip download`` (never installed or imported); the bz2 XML dump inside it is parsed with
the standard library and the wiki markup stripped. Articles are split by index: every 10th for evaluation, the rest
for calibration, so the demo never calibrates on the text it evaluates.
"""

from __future__ import annotations

import bz2
import os
import re
import zipfile
from xml.etree import ElementTree

from mha2mla.errors import Mha2mlaError

__all__ = ["wiki_texts", "clean_wiki"]

GENSIM = ("gensim", "4.4.0")
DUMP = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def clean_wiki(text: str) -> str:
    """Strip wiki markup to plain prose (keeps lines of at least 8 words)."""
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    text = re.sub(r"<ref[^>/]*/>", "", text)
    text = re.sub(r"<ref[^>]*>.*?</ref>", "", text, flags=re.S)
    for _ in range(6):  # nested templates and tables
        text = re.sub(r"\{\{[^{}]*\}\}", "", text)
        text = re.sub(r"\{\|.*?\|\}", "", text, flags=re.S)
    text = re.sub(r"\[\[(?:File|Image|Category):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]", "", text)
    text = re.sub(r"\[\[(?:[^|\]]*\|)?([^\]]*)\]\]", r"\1", text)
    text = re.sub(r"\[https?://\S+\s*([^\]]*)\]", r"\1", text)
    text = re.sub(r"<[^>]+>", "", text)
    text = text.replace("'''", "").replace("''", "")
    lines = []
    for line in text.splitlines():
        line = re.sub(r"^[=*#:;|! ]+|[= ]+$", "", line).strip()
        line = re.sub(r"\s+", " ", line)
        if len(line.split()) >= 8:
            lines.append(line)
    return "\n".join(lines)


def _dump_path() -> str:
    from mha2mla.demo.assets import cache_dir

    cache = os.path.join(cache_dir(), "wiki")
    path = os.path.join(cache, os.path.basename(DUMP))
    if os.path.isfile(path):
        return path
    from mha2mla.demo.assets import fetch_wheel

    wheel = fetch_wheel(*GENSIM, cache, "for its Wikipedia excerpt, ~28 MB, not installed")
    with zipfile.ZipFile(wheel) as z, z.open(DUMP) as src, open(path + ".part", "wb") as dst:
        dst.write(src.read())
    os.replace(path + ".part", path)
    return path


def wiki_texts() -> tuple[list[str], list[str]]:
    """``(calibration_articles, evaluation_articles)``: plain-text Wikipedia articles, split 9:1 by index."""
    arts = []
    with bz2.open(_dump_path()) as f:
        for _, elem in ElementTree.iterparse(f):
            if elem.tag.endswith("}page") or elem.tag == "page":
                ns = next((c.text for c in elem.iter() if c.tag.endswith("ns")), "0")
                text = next((c.text or "" for c in elem.iter() if c.tag.endswith("text")), "")
                if ns == "0" and not text.lstrip().upper().startswith("#REDIRECT"):
                    body = clean_wiki(text)
                    if len(body) >= 500:
                        arts.append(body)
                elem.clear()
    if len(arts) < 20:
        raise Mha2mlaError("the Wikipedia excerpt gave too little text for the demo")
    return [a for i, a in enumerate(arts) if i % 10], [a for i, a in enumerate(arts) if i % 10 == 0]
