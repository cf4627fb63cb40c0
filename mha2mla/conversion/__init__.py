"""The conversion: options (:class:`Method`), plan, global schedule, one layer (:func:`layer.convert_layer`), the
calibration stream, the record, and :func:`convert`, which runs them over the model one layer at a time."""

import importlib

__all__ = ["convert", "ConversionResult", "Method", "Policy"]
_WHERE = {'convert': 'mha2mla.conversion.pipeline', 'ConversionResult': 'mha2mla.conversion.pipeline', 'Method': 'mha2mla.conversion.options', 'Policy': 'mha2mla.conversion.options'}


def __getattr__(name: str):
    # lazy: importing one module of the package (e.g. from the CLI) does not import them all
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
