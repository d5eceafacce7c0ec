"""Errors a user can cause. Each one says what was wrong and what would be right."""


class QpassError(Exception):
    """Base class of every error qpass raises on purpose."""


class QuantConfigError(QpassError, ValueError):
    """A config (preset name, quant_cfg, algorithm, quantizer attribute) is malformed."""


class TraceError(QpassError, RuntimeError):
    """The model could not be captured as a graph."""


class CalibrationError(QpassError, RuntimeError):
    """Calibration saw bad data (NaN/Inf), no data, or was asked for without a forward_loop."""


class ExportError(QpassError, RuntimeError):
    """A quantized graph could not be exported."""
