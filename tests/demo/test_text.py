"""The demo's Wikipedia cleaner (:mod:`mha2mla.demo.text`: pure text processing; the download itself is not
exercised in tests)."""

from mha2mla.demo.text import clean_wiki


def test_clean_wiki_strips_markup_and_keeps_prose():
    raw = (
        "{{Infobox person|name=X|born={{birth date|1900|1|1}}}}\n"
        "'''Alan Turing''' was an English [[mathematician]] and [[computer science|computer scientist]] who "
        "worked on codes<ref name=a>Hodges 1983</ref> during the war.<!-- hidden -->\n"
        "[[File:Turing.jpg|thumb|A [[photo]] of him]]\n"
        "== Early life ==\n"
        "* short item\n"
        "{| class=wikitable\n| a || b\n|}\n"
        "He was born in [https://example.org London] to a family of civil servants and engineers.\n"
    )
    out = clean_wiki(raw).splitlines()
    assert out == [
        "Alan Turing was an English mathematician and computer scientist who worked on codes during the war.",
        "He was born in London to a family of civil servants and engineers.",
    ]
