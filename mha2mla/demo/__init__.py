"""``mha2mla demo``: convert a real pretrained model end to end, offline, and show what it cost (:mod:`.run`), on
Wikipedia text from a PyPI wheel (:mod:`.text`)."""
