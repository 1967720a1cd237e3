"""cocoon-net: VPC-native networking for microVM hosts."""

__version__ = "0.1.0"
