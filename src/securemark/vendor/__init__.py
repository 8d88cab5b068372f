"""The vendor as a service: its secret state, the objects derived from it, and the use
cases every entry point calls (issue, trace through weights or an API, null verdicts).

See :mod:`securemark.vendor.service`; the configs are in :mod:`securemark.vendor.config`.
"""

from securemark.vendor.config import BlackboxConfig, CodeConfig, TraceConfig, VendorConfig, VendorFiles
from securemark.vendor.service import ApiTrace, Vendor, WeightsTrace

__all__ = ["ApiTrace", "BlackboxConfig", "CodeConfig", "TraceConfig", "Vendor", "VendorConfig", "VendorFiles", "WeightsTrace"]
