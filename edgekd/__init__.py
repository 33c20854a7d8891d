"""edgekd: teacher-to-benchmark compression of vision models for edge devices."""

__version__ = "0.1.0"
