"""The conversion: options (:class:`Method`), plan, global schedule, one layer (:func:`layer.convert_layer`), the
calibration stream, the record, and :func:`convert`, which runs them over the model one layer at a time."""

from mha2mla.lazy import lazy_attributes

_WHERE = {
    "convert": "mha2mla.conversion.pipeline",
    "ConversionResult": "mha2mla.conversion.pipeline",
    "Method": "mha2mla.conversion.options",
    "Policy": "mha2mla.conversion.options",
}
__all__ = list(_WHERE)
__getattr__ = lazy_attributes(__name__, _WHERE)
