"""``mha2mla eval``: a converted model against its source on lm-eval tasks (:mod:`.tasks`), perplexity
(:mod:`.perplexity`) and long-context checks (:mod:`.long_context`), side by side (:mod:`.compare`,
:mod:`.report`)."""

from mha2mla.lazy import lazy_attributes

_WHERE = {
    "evaluate": "mha2mla.eval.compare",
}
__all__ = list(_WHERE)
__getattr__ = lazy_attributes(__name__, _WHERE)
