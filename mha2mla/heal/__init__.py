"""``mha2mla heal``: a short fine-tune of a converted checkpoint with accelerate, optionally distilling from its source.
The loop (:mod:`.loop`), its memory-lean losses (:mod:`.losses`), its files (:mod:`.files`) and recipes
(:mod:`.recipe`)."""

from mha2mla.lazy import lazy_attributes

_WHERE = {
    "heal": "mha2mla.heal.loop",
}
__all__ = list(_WHERE)
__getattr__ = lazy_attributes(__name__, _WHERE)
